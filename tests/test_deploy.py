"""The Docker deployment, read as data (no Docker engine here); its health probe run for real."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import yaml

from gradwire.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def test_server_reserves_a_gpu_and_listens_inside_the_container() -> None:
    server = _compose()["services"]["server"]
    assert server["build"] == "."
    (device,) = server["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    command = server["command"]
    assert command[:2] == ["gradwire", "serve"]
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert server["ports"] == ["127.0.0.1:50051:50051"]
    # The GPU it reserves, asked for by name: `auto` fell back to the CPU, one INFO line
    # in the log, where the container got no usable GPU (found by a review of deployment).
    assert command[command.index("--device") + 1] == "cuda"


def test_replay_waits_for_a_healthy_server() -> None:
    services = _compose()["services"]
    replay = services["replay"]
    assert replay["depends_on"] == {"server": {"condition": "service_healthy"}}
    assert replay["image"] == services["server"]["image"]
    assert replay["command"] == ["gradwire", "replay", "--target", "server:50051"]
    # The image's HEALTHCHECK probed a server inside the replay container, where there is
    # none (an operator's reading of the files).
    assert replay["healthcheck"] == {"disable": True}


def test_the_health_probe_answers_against_a_real_server(address: str) -> None:
    test = _compose()["services"]["server"]["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "gradwire"
    argv = [address if arg == "127.0.0.1:50051" else arg for arg in test[2:]]
    out = io.StringIO()
    assert main(argv, out=out) == 0
    assert out.getvalue().strip() == "SERVING"


def test_dockerfile_uses_a_cuda_pytorch_base_and_the_server_extra() -> None:
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.MULTILINE)
    assert base and re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime", base[1])
    # With the versions CI tested, not the newest on the day of a build.
    assert 'pip install -c constraints.txt ".[server]"' in text
    assert _dockerfile_cmd()[:2] == ["gradwire", "serve"]


def test_the_image_checks_its_health_as_compose_does() -> None:
    """The image has a HEALTHCHECK of its own, for `docker run`; compose's repeats it, to be
    changed there (TLS needs --tls-ca), and the two must not drift apart."""
    text = (ROOT / "Dockerfile").read_text()
    found = re.search(r"^HEALTHCHECK (.*?) \\\n\s+CMD (\[.*?\])$", text, re.MULTILINE)
    assert found, "no HEALTHCHECK ... CMD [...] in the Dockerfile"
    options = dict(option[2:].split("=") for option in found[1].split())
    compose = _compose()["services"]["server"]["healthcheck"]
    assert ["CMD", *json.loads(found[2])] == compose["test"]
    assert options == {
        "interval": compose["interval"],
        "timeout": compose["timeout"],
        "start-period": compose["start_period"],
        "retries": str(compose["retries"]),
    }


def _dockerfile_cmd() -> list[str]:
    """The Dockerfile's CMD, in exec form (a JSON list, perhaps continued over lines)."""
    text = (ROOT / "Dockerfile").read_text()
    cmd = re.search(r"^CMD (\[.*?\])$", text, re.MULTILINE | re.DOTALL)
    assert cmd, "no CMD in exec form"
    return json.loads(cmd[1].replace("\\\n", ""))  # type: ignore[no-any-return]


def test_the_state_is_saved_on_a_volume_the_server_can_write() -> None:
    # Neither file named a state dir: every restart, rebuild or `down`/`up` began from fresh
    # weights (found by an operator's review). A named volume takes the ownership of the
    # image's folder, so that folder must exist and be the unprivileged user's.
    server = _compose()["services"]["server"]
    command = server["command"]
    state = command[command.index("--state-dir") + 1]
    (volume,) = server["volumes"]
    name, mounted = volume.split(":")
    assert mounted == state and name in _compose()["volumes"]
    text = (ROOT / "Dockerfile").read_text()
    assert f"chown gradwire:gradwire {state}" in text
    assert f"VOLUME {state}" in text
    cmd = _dockerfile_cmd()
    assert cmd[cmd.index("--state-dir") + 1] == state


def test_docker_waits_for_the_stop_s_save_before_it_kills_the_server() -> None:
    """A 1.4 GB model's save at the stop (5.6 GB with Adam) took 22 s, past the 15 s the
    file gave, and Docker would have killed the server mid-save, its training lost; it gives
    120 s (a review serving a large model; RELIABILITY.md's row held by no test until a
    review of its rows)."""
    server = _compose()["services"]["server"]
    assert server["stop_signal"] == "SIGTERM"  # the graceful stop, which saves
    grace = re.fullmatch(r"(\d+)s", server["stop_grace_period"])
    assert grace, server["stop_grace_period"]
    command = server["command"]
    calls = float(command[command.index("--grace") + 1]) if "--grace" in command else 5.0
    assert int(grace[1]) >= 120 > calls  # the calls' grace and then the save itself
