"""The contract alone is enough: a Node.js client built from trainer.proto (examples/node), with
none of gradwire's Python, replays the tutorial against a real server and gets what PyTorch
computes here, bit for bit; and reads, writes, retries and errors work from another language.

Needs Node.js and the example's packages, which `make setup` installs with npm when npm is on
the machine. Without them these tests are skipped, and say why.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import google.rpc.status_pb2
import numpy as np
import pytest
import torch

import gradwire
from tests.reference import run_tutorial

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "node"
SCRIPT = EXAMPLE / "tutorial.mjs"
# The folder holding google/rpc/status.proto and error_details.proto: googleapis-common-protos.
GOOGLEAPIS = Path(google.rpc.status_pb2.__file__).parents[2]

NODE = shutil.which("node")
pytestmark = [
    pytest.mark.skipif(NODE is None, reason="Node.js is not installed"),
    pytest.mark.skipif(
        not (EXAMPLE / "node_modules").is_dir(),
        reason="examples/node has no node_modules: `make setup` installs them when npm is found",
    ),
]


def _node(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    assert NODE is not None
    return subprocess.run(
        [NODE, str(SCRIPT), address, "--googleapis", str(GOOGLEAPIS), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _replay(address: str, *args: str) -> dict[str, Any]:
    done = _node(address, "--json", *args)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _float32(received: dict[str, Any] | None) -> np.ndarray[Any, Any]:
    assert received is not None and received["dtype"] == "DTYPE_FLOAT32"
    return (
        np.array(received["values"], dtype=np.float64).astype(np.float32).reshape(received["shape"])
    )


def _same(received: dict[str, Any] | None, local: torch.Tensor) -> bool:
    # JSON carries each float32 as the double that equals it, so the cast back is exact.
    return np.array_equal(_float32(received), local.numpy())


@pytest.mark.parametrize(("init", "seed"), [("fill", 0), ("random", 7)])
def test_node_replay_equals_local_pytorch(address: str, init: str, seed: int) -> None:
    result = _replay(address, "--init", init, "--seed", str(seed))
    local = run_tutorial(init, seed)

    assert tuple(result["output_shape"]) == local.output_shape == (8, 20)
    assert result["loss"] == local.loss
    assert result["grad_before_backward"] is None and local.grad_before_backward is None
    for name in (
        "grad_slice",
        "linear_grad_rows",
        "weight_slice_before",
        "weight_before",
        "grad",
        "weight_slice_after",
        "weight_after",
    ):
        assert _same(result[name], getattr(local, name)), name
    assert result["grad_after_zero"] is None and local.grad_after_zero is None
    assert result["identity_holds"] is True


def test_node_retry_with_one_request_id_is_applied_once(address: str) -> None:
    result = _replay(address)
    first, again = result["steps"]
    assert first == again and first["parameters_updated"] == 3
    # Applied once: the weight after both sends is the weight after one local step.
    assert _same(result["weight_after"], run_tutorial("fill").weight_after)


def test_node_reads_listing_int64_stream_and_writes(address: str, client: gradwire.Client) -> None:
    result = _replay(address)

    listing = result["listing"]
    assert listing["model"] == "Simple" and listing["device"] == "cpu"
    assert listing["sample_shape"] == [3, 10, 10] and listing["outputs"] == 20
    assert {"conv1.weight", "conv1.weight.grad", "linear.weight", "input", "target"} <= set(
        listing["names"]
    )

    assert result["targets"] == {"dtype": "DTYPE_INT64", "shape": [8], "values": [1] * 8}

    stream = result["stream"]
    # linear.weight: 64,000 float32 values, 256,000 bytes, in chunks of 64 KiB (16,384 values).
    assert stream["chunks"] == 4 and stream["offsets"] == [0, 16384, 32768, 49152]
    assert stream["full_shape"] == [20, 3200]
    assert len(set(stream["versions"])) == 1
    assert stream["equal_to_unary"] is True
    streamed = np.array(stream["values"], dtype=np.float64).astype(np.float32).reshape(20, 3200)
    assert np.array_equal(streamed, client.remote.linear.weight.numpy())

    assert result["set"]["written"] == [1.5, -2.25, 3.125]
    assert np.array_equal(client.remote.conv1.weight[0, 0, 0].numpy(), [1.5, -2.25, 3.125])


def test_node_reads_each_error_status_and_reason(address: str) -> None:
    errors = _replay(address)["errors"]
    expected = {
        "unknown_name": ("NOT_FOUND", "UNKNOWN_TENSOR", "did you mean 'conv1.weight'"),
        "past_the_end": ("OUT_OF_RANGE", "INDEX_OUT_OF_RANGE", "index 16 is out of range"),
        "backward_again": ("FAILED_PRECONDITION", "GRAPH_FREED", "call Forward again"),
        "stale_version": ("ABORTED", "VERSION_MISMATCH", "nothing was changed"),
        "bad_shape": ("INVALID_ARGUMENT", "BAD_INPUT_SHAPE", "Simple takes [N, 3, 10, 10]"),
    }
    assert set(errors) == set(expected)
    for case, (code, reason, words) in expected.items():
        error = errors[case]
        assert error is not None, f"{case} succeeded"
        assert (error["code"], error["reason"], error["domain"]) == (code, reason, "gradwire.dev")
        assert words in error["message"], error["message"]


def test_node_transcript_reads_as_the_tutorial(address: str) -> None:
    done = _node(address)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert ">>> loss.backward()" in text
    assert "weight after step == weight before - lr * grad, bit for bit: true" in text
    assert "linear.weight in 4 chunks: true" in text
    assert "unknown_name: NOT_FOUND UNKNOWN_TENSOR" in text


def test_node_reports_an_unreachable_server() -> None:
    done = _node("127.0.0.1:1")
    assert done.returncode == 1
    assert "UNAVAILABLE" in done.stderr and "127.0.0.1:1" in done.stderr
