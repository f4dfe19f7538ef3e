"""The distributions, built from the checkout's tracked files by the build backend that
pyproject.toml names: what a packager, or a user of the wheel, gets."""

from __future__ import annotations

import email
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import gradwire

# The interpreter's own setuptools builds here (no isolated build: no network in tests);
# pyproject.toml asks for 77 or later, and an older one refuses its licence fields.
pytest.importorskip("setuptools", minversion="77", reason="needs setuptools 77 or later")

ROOT = Path(__file__).resolve().parent.parent
#: Tracked, and rightly left out of the sdist: CI's entry point and git's and Docker's own.
NOT_SHIPPED = {".ci/run", ".gitignore", ".dockerignore"}


def _tracked() -> list[str]:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout (an unpacked sdist): nothing to compare with")
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    return [name for name in listed.decode().split("\0") if name]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path, Path]:
    """The tracked files, and the sdist and wheel built from a copy of them (building in the
    checkout would leave build/ and egg-info behind)."""
    tracked = _tracked()
    source = tmp_path_factory.mktemp("source")
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    dist = tmp_path_factory.mktemp("dist")
    script = (
        "import sys\nfrom setuptools import build_meta as b\n"
        "out = sys.argv[1]\n"  # build_meta sets sys.argv of its own
        "sdist, wheel = b.build_sdist(out), b.build_wheel(out)\n"
        "print('built', sdist, wheel)\n"  # the last line: setuptools prints its own
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(dist)],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    said, sdist_name, wheel_name = done.stdout.splitlines()[-1].split()
    assert said == "built", done.stdout[-3000:]
    return tracked, dist / sdist_name, dist / wheel_name


def test_the_sdist_holds_every_tracked_file_so_that_its_tests_run(
    built: tuple[list[str], Path, Path],
) -> None:
    """It held the packages and, of the tests, only test_*.py: not the .proto the README
    sends other languages to, nor conftest.py, the scripts or the files the tests read
    (found by a review of the packaging)."""
    tracked, sdist, _ = built
    with tarfile.open(sdist) as archive:
        shipped = {name.partition("/")[2] for name in archive.getnames()}
    missing = sorted(set(tracked) - NOT_SHIPPED - shipped)
    assert not missing, missing
    assert "LICENSE" in shipped and "proto/gradwire/v1/trainer.proto" in shipped
    assert not [name for name in shipped if "node_modules" in name or "__pycache__" in name]


def test_the_wheel_carries_its_licence_stubs_and_command(
    built: tuple[list[str], Path, Path],
) -> None:
    _, _, wheel = built
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(name for name in names if name.endswith(".dist-info/METADATA"))
        metadata = email.message_from_bytes(archive.read(info))
        entry_points = archive.read(info.replace("METADATA", "entry_points.txt")).decode()
        licence = archive.read(info.replace("METADATA", "licenses/LICENSE")).decode()
    assert "Apache License" in licence and "Version 2.0" in licence
    assert metadata["License-Expression"] == "Apache-2.0"
    for name in ("trainer_pb2.py", "trainer_pb2.pyi", "trainer_pb2_grpc.py"):
        assert f"gradwire/_pb/{name}" in names
    assert {"gradwire/py.typed", "gradwire_server/py.typed"} <= names
    assert "gradwire = gradwire_cli:main" in entry_points
    # Written twice, pyproject.toml's and the package's (what `gradwire --version` and
    # GetServerInfo say): a release that bumps one alone would misreport it (found by a
    # maintainer's review).
    assert metadata["Version"] == gradwire.__version__
    # The thin client needs no torch; the server's extra brings it.
    requires = metadata.get_all("Requires-Dist") or []
    assert not [r for r in requires if r.startswith("torch") and "extra ==" not in r]
    assert any(r.startswith("torch") and 'extra == "server"' in r for r in requires)


def test_what_the_dockerfile_copies_is_enough_to_build_the_package(tmp_path: Path) -> None:
    """The image builds the package from the files its Dockerfile copies: the licence that
    pyproject.toml names was not among them (setuptools warns, and says it will refuse)."""
    copied = [
        source
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ")
        for source in line.split()[1:-1]
    ]
    assert "pyproject.toml" in copied
    for source in copied:
        if (ROOT / source).is_dir():
            shutil.copytree(
                ROOT / source,
                tmp_path / source,
                ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
            )
        else:
            shutil.copy2(ROOT / source, tmp_path / source)
    script = "import sys\nfrom setuptools import build_meta as b\nb.build_wheel(sys.argv[1])\n"
    done = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", "-c", script, str(tmp_path / "out")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "did not match any files" not in done.stdout + done.stderr


def _pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    pairs = [line.split("==") for line in lines if line.strip() and not line.startswith("#")]
    return {name.strip(): version.strip() for name, version in pairs}


def test_the_pinned_versions_are_the_ones_installed_and_in_the_package_s_ranges() -> None:
    """constraints.txt is what `make setup` installs and the image installs: the tests run
    against those versions, and each lies in the range the package asks for."""
    pins = _pins()
    assert {"grpcio", "protobuf", "grpcio-health-checking"} <= pins.keys()
    wanted = {
        canonicalize_name(requirement.name): requirement.specifier
        for requirement in map(Requirement, importlib.metadata.requires("gradwire") or [])
    }
    for name, version in pins.items():
        assert importlib.metadata.version(name) == version, f"{name}: run `make setup`"
        assert canonicalize_name(name) in wanted, f"{name} is no dependency of gradwire"
        assert version in wanted[canonicalize_name(name)], f"{name} {version}"
    makefile = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt" in makefile
    assert re.search(r"^\$\(BIN\)/\.installed: .*constraints\.txt", makefile, re.MULTILINE)
