"""The contract keeps what gradwire.v1 has published, and follows buf's lint rules.

proto/published.txtpb holds every message, field, enum value, RPC and file option that v1
has published: a buf image of trainer.proto, without its comments, written by `make
publish-contract`. Code generated in any language from an older trainer.proto keeps
building and talking to the server only if none of it is renamed, renumbered, retyped or
removed: buf's FILE rules, set in proto/buf.yaml. Adding is compatible, and is recorded in
published.txtpb in the same commit, so that an addition cannot be taken back quietly later.

Needs buf, which `make setup` installs with npm into tools/buf when npm is on the machine.
Without it these tests are skipped, and say why.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"
PUBLISHED = PROTO / "published.txtpb"
TRAINER = Path("gradwire", "v1", "trainer.proto")
BUF = ROOT / "tools" / "buf" / "node_modules" / ".bin" / "buf"
PUBLISH = ROOT / "scripts" / "publish_contract.py"

pytestmark = pytest.mark.skipif(
    not BUF.is_file(),
    reason="tools/buf has no buf: `make setup` installs it when npm is found and its registry "
    "answers (its output says which it was)",
)


def _buf(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BUF), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def _said(done: subprocess.CompletedProcess[str]) -> str:
    return (done.stdout + done.stderr).strip()


def test_the_contract_follows_bufs_lint_rules() -> None:
    done = _buf(PROTO, "lint")
    assert done.returncode == 0, (
        f"buf lint found (proto/buf.yaml names the rules, and the published names excepted):\n"
        f"{_said(done)}"
    )


def test_nothing_published_is_changed_or_gone() -> None:
    done = _buf(PROTO, "breaking", "--against", str(PUBLISHED))
    assert done.returncode == 0, (
        "proto/ breaks what gradwire.v1 has published, so code generated from the published "
        ".proto would no longer build or talk to the server:\n"
        f"{_said(done)}\n"
        "Add instead: a new field, message or RPC. What is no longer used stays, marked "
        "deprecated: [deprecated = true] on a field or enum value, `option deprecated = "
        "true;` in a message or RPC."
    )


def test_every_part_of_the_contract_is_published() -> None:
    # The same comparison the other way round: what proto/ has and published.txtpb lacks,
    # buf reads as deleted from proto/.
    done = _buf(PROTO, "breaking", str(PUBLISHED), "--against", ".")
    assert done.returncode == 0, (
        "proto/ adds to the contract what proto/published.txtpb does not hold yet (buf "
        "compares backwards here: 'deleted' names each addition):\n"
        f"{_said(done)}\n"
        "Adding is compatible: record it with `make publish-contract` and commit "
        "proto/published.txtpb with the change. (A change, not an addition, shows here too, "
        "and fails test_nothing_published_is_changed_or_gone: mend that first.)"
    )


def _changed_contract(tmp_path: Path, old: str, new: str) -> Path:
    """A copy of proto/ with one change made to trainer.proto."""
    copy = tmp_path / "proto"
    shutil.copytree(PROTO, copy, ignore=shutil.ignore_patterns("*.txtpb"))
    trainer = copy / TRAINER
    text = trainer.read_text()
    assert text.count(old) == 1, f"{old!r} is no longer in trainer.proto once: update this test"
    trainer.write_text(text.replace(old, new))
    return copy


@pytest.mark.parametrize(
    ("old", "new", "found"),
    [
        pytest.param(
            "rpc Step(StepRequest) returns (StepResponse);",
            "",
            'Previously present RPC "Step" on service "Trainer" was deleted.',
            id="an RPC removed",
        ),
        pytest.param(
            "int64 version = 2;             // its state version",
            "uint64 version = 2;",
            'Field "2" with name "version" on message "SessionInfo" changed type from "int64" '
            'to "uint64".',
            id="a field retyped, as SessionInfo.version once was",
        ),
        pytest.param(
            "repeated float float_values = 3;",
            "repeated float float_values = 30;",
            'Previously present field "3" with name "float_values" on message "Tensor" was '
            "deleted.",
            id="a field renumbered",
        ),
        pytest.param(
            "DTYPE_FLOAT32 = 1;",
            "DTYPE_F32 = 1;",
            'Enum value "1" on enum "DType" changed name from "DTYPE_FLOAT32" to "DTYPE_F32".',
            id="an enum value renamed",
        ),
    ],
)
def test_a_breaking_change_is_found(tmp_path: Path, old: str, new: str, found: str) -> None:
    changed = _changed_contract(tmp_path, old, new)
    done = _buf(changed, "breaking", "--against", str(PUBLISHED))
    assert done.returncode != 0
    assert found in _said(done)


def test_an_addition_breaks_nothing_and_is_asked_to_be_published(tmp_path: Path) -> None:
    changed = _changed_contract(
        tmp_path, "message StepRequest {", "message StepRequest {\n  bool added = 99;"
    )
    assert _buf(changed, "breaking", "--against", str(PUBLISHED)).returncode == 0
    backwards = _buf(changed, "breaking", str(PUBLISHED), "--against", ".")
    assert backwards.returncode != 0
    assert 'field "99" with name "added" on message "StepRequest"' in _said(backwards)


def _publish(proto: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(PUBLISH), "--proto", str(proto), "--buf", str(BUF)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_publishing_records_an_addition_and_then_keeps_it(tmp_path: Path) -> None:
    """`make publish-contract`: the addition is written down, after which both checks pass,
    and taking it back is a break."""
    changed = _changed_contract(
        tmp_path, "message StepRequest {", "message StepRequest {\n  bool added = 99;"
    )
    shutil.copy(PUBLISHED, changed / PUBLISHED.name)
    done = _publish(changed)
    assert done.returncode == 0, done.stderr
    written = (changed / PUBLISHED.name).read_text()
    assert written.startswith("# What gradwire.v1 has published")
    assert 'name: "added"' in written and 'name: "added"' not in PUBLISHED.read_text()
    assert _buf(changed, "breaking", "--against", PUBLISHED.name).returncode == 0
    assert _buf(changed, "breaking", PUBLISHED.name, "--against", ".").returncode == 0
    trainer = changed / TRAINER
    trainer.write_text(trainer.read_text().replace("\n  bool added = 99;", "", 1))
    taken_back = _buf(changed, "breaking", "--against", PUBLISHED.name)
    assert 'field "99" with name "added" on message "StepRequest" was deleted' in _said(taken_back)


def test_publishing_refuses_a_break_and_leaves_the_record_as_it_was(tmp_path: Path) -> None:
    changed = _changed_contract(tmp_path, "DTYPE_FLOAT32 = 1;", "DTYPE_F32 = 1;")
    shutil.copy(PUBLISHED, changed / PUBLISHED.name)
    done = _publish(changed)
    assert done.returncode == 1
    assert 'changed name from "DTYPE_FLOAT32" to "DTYPE_F32"' in done.stderr
    assert "not published" in done.stderr
    assert (changed / PUBLISHED.name).read_bytes() == PUBLISHED.read_bytes()
