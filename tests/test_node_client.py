"""The contract alone is enough: a Node.js client built from trainer.proto (examples/node), with
none of gradwire's Python, replays the tutorial against a real server and gets what PyTorch
computes here, bit for bit; and reads, writes, retries and errors work from another language.
examples/node/wire.mjs, which reads GetTensor's values as typed arrays, reads every dtype
exactly, and passes its own tests (wire.test.mjs) on every encoding protobuf allows.

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
from torch import nn

import gradwire
from gradwire.limits import ServerConnections
from gradwire_server.models import ModelSpec
from tests.reference import run_tutorial
from tests.serve_in_process import running_server, serving

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
        reason="examples/node has no node_modules: `make setup` installs them when npm is "
        "found and its registry answers (its output says which it was)",
    ),
]


def _run_node(
    *args: str, timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`node ARGS`, its output kept; run from `cwd` when given."""
    assert NODE is not None
    return subprocess.run(
        [NODE, *args], capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd
    )


def _node(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return _run_node(str(SCRIPT), address, "--googleapis", str(GOOGLEAPIS), *args)


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

    limits = client.server_info().limits
    assert result["info"] == {
        "version": gradwire.__version__,
        "torch_version": torch.__version__,
        "device": "cpu",
        "max_value_bytes": limits.max_value_bytes,
        "max_elements": limits.max_elements,
        "max_concurrent": limits.max_concurrent,
        "session_idle_timeout_s": limits.session_idle_timeout_s,
    }

    assert result["targets"] == {"dtype": "DTYPE_INT64", "shape": [8], "values": ["1"] * 8}

    stream = result["stream"]
    # linear.weight: 64,000 float32 values, 256,000 bytes, in chunks of 64 KiB (16,384 values).
    assert stream["chunks"] == 4 and stream["offsets"] == [0, 16384, 32768, 49152]
    assert stream["full_shape"] == [20, 3200]
    assert len(set(stream["versions"])) == 1
    assert stream["equal_to_unary"] is True
    streamed = np.array(stream["values"], dtype=np.float64).astype(np.float32).reshape(20, 3200)
    assert np.array_equal(streamed, client.remote.linear.weight.numpy())
    # The same read through wire.mjs: a Float32Array over the reply's bytes, equal value by value.
    assert result["viewed"] == {"shape": [20, 3200], "equal_to_decoded": True}

    assert result["set"]["written"] == [1.5, -2.25, 3.125]
    assert np.array_equal(client.remote.conv1.weight[0, 0, 0].numpy(), [1.5, -2.25, 3.125])


def test_node_reads_each_error_status_and_reason(address: str) -> None:
    errors = _replay(address)["errors"]
    expected = {
        "unknown_name": ("NOT_FOUND", "UNKNOWN_TENSOR", "did you mean 'conv1.weight'"),
        "past_the_end": ("OUT_OF_RANGE", "INDEX_OUT_OF_RANGE", "index 16 is out of range"),
        "backward_again": ("FAILED_PRECONDITION", "GRAPH_FREED", "call Forward again"),
        "stale_version": ("ABORTED", "VERSION_MISMATCH", "nothing was changed"),
        "another_instance": ("ABORTED", "VERSION_MISMATCH", "a server started since"),
        "bad_shape": ("INVALID_ARGUMENT", "BAD_INPUT_SHAPE", "Simple takes [N, 3, 10, 10]"),
    }
    assert set(errors) == set(expected)
    for case, (code, reason, words) in expected.items():
        error = errors[case]
        assert error is not None, f"{case} succeeded"
        assert (error["code"], error["reason"], error["domain"]) == (code, reason, "gradwire.dev")
        assert words in error["message"], error["message"]


def test_node_makes_calls_on_one_stream(address: str) -> None:
    """Eight CallRequests written at once from the .proto alone: eight answers in order, the
    retried Step applied once, the Backward's error its own, the Step sent to run only
    after its success not run, the stream going on past them."""
    calls = _replay(address)["calls"]
    assert calls["results"] == [
        "forward", "backward", "step", "step", "get_tensor", "error", "error", "list_tensors"
    ]  # fmt: skip
    first, again = calls["steps"]
    assert first == again and first["parameters_updated"] == 3
    assert calls["backward_version"] == calls["forward_version"] + 1 == first["version"] - 1
    assert calls["listed_version"] == first["version"]
    error = calls["error"]
    assert (error["code"], error["reason"], error["domain"]) == (
        "FAILED_PRECONDITION", "GRAPH_FREED", "gradwire.dev"
    )  # fmt: skip
    skipped = calls["skipped"]
    assert (skipped["code"], skipped["reason"]) == ("ABORTED", "PREVIOUS_FAILED")
    assert "Step not run" in skipped["message"]
    assert calls["read"] == calls["read_after"]  # what a unary read saw after the stream


def test_node_makes_the_same_calls_in_one_batch(address: str, client: gradwire.Client) -> None:
    """The same eight CallRequests in one unary Batch call: the same answers in the same
    order, on the state the stream left."""
    done = _replay(address)
    calls, batch = done["calls"], done["batch"]
    assert batch["results"] == calls["results"]
    first, again = batch["steps"]
    assert first == again and first["parameters_updated"] == 3
    assert batch["forward_version"] == calls["listed_version"] + 1
    assert batch["listed_version"] == first["version"] == client.list_tensors().version
    assert batch["read"] == client.read("conv1.weight[0][0][0]").value.tolist()
    assert (batch["error"]["reason"], batch["skipped"]["reason"]) == (
        "GRAPH_FREED",
        "PREVIOUS_FAILED",
    )


def test_node_transcript_reads_as_the_tutorial(address: str) -> None:
    done = _node(address)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert ">>> loss.backward()" in text
    assert "weight after step == weight before - lr * grad, bit for bit: true" in text
    assert "linear.weight in 4 chunks: true" in text
    assert (
        f"# gradwire {gradwire.__version__} with PyTorch {torch.__version__}; values over "
        "67043328 bytes stream; 16 calls at once"
    ) in text
    assert "unknown_name: NOT_FOUND UNKNOWN_TENSOR" in text


def test_wire_mjs_reads_every_encoding_protobuf_allows() -> None:
    done = _run_node("--test", str(EXAMPLE / "wire.test.mjs"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "# pass 10" in done.stdout and "# fail 0" in done.stdout


def test_node_reports_an_unreachable_server() -> None:
    done = _node("127.0.0.1:1")
    assert done.returncode == 1
    assert "UNAVAILABLE" in done.stderr and "127.0.0.1:1" in done.stderr


class EveryDtype(nn.Module):
    """A parameter of each dtype the contract carries, of odd sizes and names of different
    lengths, so that the values field starts at different offsets in the replies."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.f32 = nn.Parameter(torch.randn(5, 7, generator=gen))
        self.float64_weights = nn.Parameter(torch.randn(3, 3, generator=gen, dtype=torch.float64))
        ints = torch.randint(-(2**31), 2**31 - 1, (11,), generator=gen, dtype=torch.int32)
        self.i32 = nn.Parameter(ints, requires_grad=False)
        # Beyond 2**53: exact in JavaScript only as BigInt.
        wide = torch.tensor([-(2**62), 2**53 + 1, -1, 0], dtype=torch.int64)
        self.int64_counts = nn.Parameter(wide, requires_grad=False)
        self.f16 = nn.Parameter(torch.randn(6, generator=gen).half())
        self.bf16 = nn.Parameter(torch.randn(9, generator=gen).bfloat16())
        self.flags = nn.Parameter(torch.tensor([True, False, True]), requires_grad=False)
        self.empty = nn.Parameter(torch.zeros(2, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.f32.sum()


EVERY_DTYPE = ModelSpec("EveryDtype", EveryDtype, sample_shape=(1,), num_classes=1, loss="mse")


def _expected(parameter: torch.Tensor) -> list[Any]:
    """The values as read.mjs prints them: int64 as strings, 16-bit floats as their words."""
    if parameter.dtype in (torch.float16, torch.bfloat16):
        words: list[Any] = parameter.view(torch.int16).numpy().astype(np.uint16).tolist()
        return words
    if parameter.dtype == torch.int64:
        return [str(v) for v in parameter.flatten().tolist()]
    if parameter.dtype == torch.bool:
        return [int(v) for v in parameter.flatten().tolist()]
    values: list[Any] = parameter.detach().flatten().tolist()
    return values


def test_node_views_every_dtype_in_place() -> None:
    dtypes = {
        "f32": "DTYPE_FLOAT32",
        "float64_weights": "DTYPE_FLOAT64",
        "i32": "DTYPE_INT32",
        "int64_counts": "DTYPE_INT64",
        "f16": "DTYPE_FLOAT16",
        "bf16": "DTYPE_BFLOAT16",
        "flags": "DTYPE_BOOL",
        "empty": "DTYPE_FLOAT32",
    }
    with serving(EVERY_DTYPE) as (trainer, client):
        address = client.target
        for name, dtype in dtypes.items():
            done = _run_node(str(EXAMPLE / "read.mjs"), address, name, "--json", timeout=60)
            assert done.returncode == 0, done.stderr
            reply = json.loads(done.stdout)
            parameter = trainer.parameters[name]
            assert reply["name"] == name
            assert reply["full_shape"] == list(parameter.shape)
            tensor = reply["tensor"]
            assert tensor["dtype"] == dtype and tensor["shape"] == list(parameter.shape)
            assert tensor["values"] == _expected(parameter), name


#: A Node.js client that calls, waits for the server to close its connection as idle (its
#: channel going IDLE), and calls again: the next call must reconnect by itself.
IDLE_AND_AGAIN = """
import grpc from '@grpc/grpc-js';
import { CHANNEL_OPTIONS, Trainer } from './contract.mjs';

const trainer = new Trainer(process.argv[1], grpc.credentials.createInsecure(), CHANNEL_OPTIONS);
const list = () => new Promise((resolve, reject) =>
  trainer.ListTensors({}, new grpc.Metadata(), { deadline: Date.now() + 30_000 },
    (error, response) => (error ? reject(error) : resolve(response))));
const first = await list();
const channel = trainer.getChannel();
const deadline = Date.now() + 30_000;
while (channel.getConnectivityState(false) !== grpc.connectivityState.IDLE) {
  if (Date.now() > deadline) throw new Error('the server did not close the idle connection');
  await new Promise((resolve) => setTimeout(resolve, 20));
}
const second = await list();
console.log(JSON.stringify({ first: first.version, second: second.version }));
trainer.close();
"""


def test_node_calls_again_after_the_server_closed_its_idle_connection() -> None:
    """grpc-js takes the server's GOAWAY for an idle connection (--connection-idle) as gRPC's
    Python client does: its next call opens a new connection, with nothing for the service
    to handle."""
    with running_server(connections=ServerConnections(idle_s=0.5)) as running:
        running.trainer.fill_parameters(0.1)
        done = _run_node(
            "--input-type=module",
            "-e",
            IDLE_AND_AGAIN,
            f"127.0.0.1:{running.port}",
            cwd=EXAMPLE,  # where its imports are found
        )
    assert done.returncode == 0, done.stderr
    versions = json.loads(done.stdout)
    assert versions["first"] == versions["second"] != "0"  # int64 as a string


#: A Node.js client that opens a Watch with pings every argv[2] ms and prints how it ended:
#: the first update comes at once, then the connection carries nothing but pings.
PINGING_WATCH = """
import grpc from '@grpc/grpc-js';
import { CHANNEL_OPTIONS, Trainer } from './contract.mjs';

const [address, pingMs, deadlineMs] = process.argv.slice(1);
const options = {
  ...CHANNEL_OPTIONS, 'grpc.keepalive_time_ms': Number(pingMs), 'grpc.keepalive_timeout_ms': 5000,
};
const trainer = new Trainer(address, grpc.credentials.createInsecure(), options);
const watch = trainer.Watch({ items: [{ name: 'conv1.weight' }] }, new grpc.Metadata(),
  { deadline: Date.now() + Number(deadlineMs) });
let updates = 0;
watch.on('data', () => { updates += 1; });
watch.on('error', (error) => {
  const details = error.metadata.get('grpc-status-details-bin').length;
  console.log(JSON.stringify({ updates, code: error.code, details }));
  trainer.close();
});
"""


@pytest.mark.parametrize(
    ("ping_ms", "code"),
    [
        (200, 8),  # RESOURCE_EXHAUSTED: what grpc-js makes of GOAWAY too_many_pings
        (1000, 4),  # the control: pings the server takes; the Watch lasts to its deadline
    ],
)
def test_node_pinging_too_often_is_told_resource_exhausted_without_error_info(
    ping_ms: int, code: int
) -> None:
    """The .proto and README warn that grpc-js ends the calls of a connection closed for too
    many pings RESOURCE_EXHAUSTED, with no ErrorInfo, so that a client does not take it for
    BUSY (a review integrating from Node.js, once checked by hand): a server taking a ping
    every 0.5 s, a client pinging every 0.2 s."""
    with running_server(connections=ServerConnections(min_client_ping_s=0.5)) as running:
        done = _run_node(
            "--input-type=module",
            "-e",
            PINGING_WATCH,
            f"127.0.0.1:{running.port}",
            str(ping_ms),
            "4000",
            cwd=EXAMPLE,
        )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"updates": 1, "code": code, "details": 0}
    assert ("excess pings" in done.stderr) == (code == 8), done.stderr
