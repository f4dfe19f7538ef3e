"""The README's Python example, run as written against a real server."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np

import gradwire

README = Path(__file__).resolve().parents[1] / "README.md"


def python_example(heading: str) -> str:
    """The first ```python block after `heading` in the README."""
    text = README.read_text()
    start = text.index(heading)
    found = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert found is not None, f"no python block after {heading!r}"
    return found.group(1)


def test_the_python_client_example_prints_what_its_comments_say(address: str) -> None:
    # On a server that has trained already, as it has after the README's CLI walkthrough:
    # the example read as its comments say only on a fresh server (found by a newcomer's
    # walkthrough: the gradient it says is None printed in full, NaN).
    with gradwire.connect(address) as client:
        for _ in range(3):
            client.train_step(
                gradwire.Fill.normal(8, 3, 10, 10), gradwire.Fill.ones(8, dtype="int64")
            )
    code = python_example("## The Python client").replace('"localhost:50051"', repr(address))
    printed, names = io.StringIO(), {}
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), names)
    lines = printed.getvalue().splitlines()
    assert lines[0].startswith("(8, 20) 2.9957"), lines
    assert lines[1] == "None", lines
    # Every parameter 0.1 and the input ones: the logits are equal, and the convolutions'
    # gradients are 0 but for rounding (a few 1e-7), not what earlier steps left.
    grad = names["grad"]
    assert grad.shape == (16, 3, 3, 3) and np.abs(grad).max() < 1e-5, lines
    read = names["read"]
    assert read.full_shape == (20, 3200) and read.value.shape == (5,)
    assert lines[3] == f"{read.version} (20, 3200) {read.value}"


def development_tree() -> dict[str, str]:
    """The README's layout of the checkout ("## Development"): each top folder's lines."""
    text = README.read_text()
    start = text.index("## Development")
    found = re.search(r"```\n(.*?)```", text[start:], re.S)
    assert found is not None, "no layout block under ## Development"
    folders: dict[str, str] = {}
    folder = ""
    for line in found.group(1).splitlines():
        if line and not line[0].isspace():
            folder = line.split()[0]
            folders[folder] = ""
        elif folder:
            folders[folder] += line + "\n"
    return folders


def test_the_development_layout_names_every_module() -> None:
    # The layout is where a newcomer looks for a file's purpose: random_stream.py, which the
    # README sends readers to, was missing from it (found by a walkthrough of the README).
    root = README.parent
    folders = development_tree()
    for folder in ("client/gradwire/", "server/gradwire_server/"):
        listed = set(re.findall(r"[\w.]+\.py\b", folders[folder]))
        modules = {p.name for p in (root / folder).glob("*.py") if p.name != "__init__.py"}
        assert modules <= listed, f"{folder} not in the README's layout: {modules - listed}"


def test_every_command_is_shown_in_the_readme() -> None:
    # The README is the command's manual (`gradwire --help` lists the names alone): a
    # command added without its line there was found by nothing (a maintainer's review).
    from gradwire.cli import build_parser

    text = README.read_text()
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [c for c in commands.choices if not re.search(rf"`?gradwire {re.escape(c)}\b", text)]
    assert not missing, f"commands the README never shows: {missing}"


def test_the_developers_guide_names_what_there_is() -> None:
    # docs/DEVELOPING.md walks a newcomer through a change by file, make target, function and
    # test: each must be there, or the guide sends them looking for something gone.
    root = README.parent
    guide = (root / "docs" / "DEVELOPING.md").read_text()
    quoted = re.findall(r"`([^`\n]+)`", guide)
    paths = {q for q in quoted if re.fullmatch(r"[\w.]*/[\w./]+|\.ci/run", q)}
    assert {"proto/gradwire/v1/trainer.proto", "tests/test_errors.py"} <= paths  # read
    gone = [p for p in paths if not (root / p).exists()]
    assert not gone, f"docs/DEVELOPING.md names files there are not: {gone}"
    makefile = (root / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    named = {t for line in re.findall(r"`?make ([\w -]+)", guide) for t in line.split()}
    named = {t for t in named if not t.startswith("-")}
    assert named and not named - targets, f"make targets there are not: {named - targets}"
    code = "\n".join(  # not this file, which names some of them
        p.read_text()
        for d in ("client", "server", "tests")
        for p in (root / d).rglob("*.py")
        if p.name != Path(__file__).name
    )
    # Every name: one word too (READS, Encoded), which a rename would leave behind unseen.
    names = {q for q in quoted if re.fullmatch(r"@?[A-Za-z_]\w*", q)}
    assert {"READS", "Encoded", "MAY_LAND", "@on_torch_thread"} <= names  # read
    missing = [n for n in names if not re.search(rf"\b{re.escape(n.lstrip('@'))}\b", code)]
    assert not missing, f"docs/DEVELOPING.md names what the code lacks: {missing}"


def test_the_developers_guide_gives_every_module_its_layer() -> None:
    # docs/DEVELOPING.md's "One job per layer" is where a newcomer learns which module owns
    # what: it named 24 of the 74 modules, not unary.py, where its own "Adding a unary RPC"
    # builds each call, nor four of the command line's ten (found by a review of
    # DEVELOPING.md as a newcomer reads it).
    root = README.parent
    guide = (root / "docs" / "DEVELOPING.md").read_text()
    start = guide.index("## One job per layer")
    table = guide[start : guide.index("\n## ", start + 1)]
    named = set(re.findall(r"([\w]+\.py)`", table))
    for folder in ("client/gradwire", "client/gradwire/cli", "server/gradwire_server"):
        modules = {p.name for p in (root / folder).glob("*.py")} - {"__init__.py", "__main__.py"}
        assert modules <= named, f"{folder}/ modules DEVELOPING.md's layers lack: {modules - named}"


def test_the_mutation_recipe_s_link_to_the_virtualenv_is_ignored(tmp_path: Path) -> None:
    # docs/DEVELOPING.md's mutation testing links .venv into a worktree; .gitignore's
    # ".venv/" matches a folder, not a link, so `git status` there listed .venv and `git add
    # -A` took it (found by a review of DEVELOPING.md as a newcomer reads it).
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    shutil.copy(README.parent / ".gitignore", tmp_path / ".gitignore")
    (tmp_path / ".venv").symlink_to(README.parent / ".venv")
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    ).stdout.split("\n")  # fmt: skip
    assert "?? .gitignore" in status and "?? .venv" not in status, status


def test_the_readme_puts_the_command_on_the_path_before_its_first_use() -> None:
    # `make demo` installs the `gradwire` command into .venv/bin, which is on no one's PATH:
    # a newcomer who ran it and went on to "Serving" met `gradwire: command not found` at
    # its first line, the README never saying how to reach the command (found by a review of
    # the README read top to bottom by a newcomer).
    text = README.read_text()
    first_use = re.search(r"^gradwire ", text, re.M)
    assert first_use is not None
    activate = text.find(". .venv/bin/activate")
    assert 0 <= activate < first_use.start(), "no `. .venv/bin/activate` before `gradwire ...`"


def test_each_python_example_imports_what_it_uses() -> None:
    # A newcomer runs the README's Python as they reach it: "Who gets in" used os and
    # gradwire, and "Watching training remotely" Fill, none imported there or before, so
    # each raised NameError (found by a review of the README read top to bottom by a
    # newcomer). A value an example leaves to its reader (`version`) is not a module's.
    import ast
    import importlib.util

    text = README.read_text()
    bound: set[str] = set()  # imported or assigned by an example so far
    missing = []
    for found in re.finditer(r"```python\n(.*?)```", text, re.S):
        tree = ast.parse(found.group(1))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
            elif isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
                bound.add(node.id)
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        line = text.count("\n", 0, found.start()) + 1
        for name in sorted(used - bound):
            if hasattr(gradwire, name) or importlib.util.find_spec(name) is not None:
                missing.append(f"README.md:{line}: {name}")
    assert not missing, f"used before any example imports them: {missing}"


def test_the_command_line_walkthrough_loads_and_deletes_only_what_it_saved() -> None:
    # "The command line" is run line by line by a newcomer: it saved epoch3 and then deleted
    # epoch1, which nothing had saved, so that line failed NOT_FOUND, exit 1 (found by a
    # review of the README read top to bottom by a newcomer).
    text = README.read_text()
    start = text.index("## The command line")
    found = re.search(r"```sh\n(.*?)```", text[start:], re.S)
    assert found is not None
    saved: set[str] = set()
    used = []
    for command, name in re.findall(
        r"^gradwire (save|load|delete-checkpoint) ([\w.-]+)", found.group(1), re.M
    ):
        if command == "save":
            saved.add(name)
        else:
            used.append((command, name, name in saved))
    assert used and all(ok for *_, ok in used), used
