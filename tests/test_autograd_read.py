"""A read says what PyTorch's print of the selection on the server shows of autograd, and the
client prints it as PyTorch does: `grad_fn=<SelectBackward0>` after a slice of a parameter,
"Parameter containing:" above a whole one, nothing after a gradient. Checked against the
same model run locally, each selector printed by `print()` in PyTorch, on every path a read
takes (GetTensor, GetTensorStream, a TrainStep's fetch, a Batch, the remote model, the
command line, the raw message).
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from torch import nn

import gradwire
from gradwire import Fill, unary
from gradwire._pb import trainer_pb2 as pb
from gradwire._pb import trainer_pb2_grpc as pb_grpc
from gradwire.cli import state as cli_state
from gradwire.display import format_read
from gradwire_server import convert
from gradwire_server.errors import OverLimit
from gradwire_server.indexing import MAX_GRAD_FN_BYTES
from gradwire_server.models import ModelSpec
from gradwire_server.trainer import Trainer
from tests.cli_run import Run, run_main
from tests.reference import Simple
from tests.serve_in_process import serving

Local = dict[str, Any]

# (selector, the same selection as a script writes it on the local model's state)
BEFORE_BACKWARD: list[tuple[str, Callable[[Local], Any]]] = [
    ("conv1.weight", lambda s: s["model"].conv1.weight),
    ("conv1.weight[0][0][0]", lambda s: s["model"].conv1.weight[0][0][0]),
    ("conv1.weight[:2, :1]", lambda s: s["model"].conv1.weight[:2, :1]),
    # torch skips a full slice inside a tuple but not alone: SelectBackward0, SliceBackward0
    ("conv1.weight[0, :]", lambda s: s["model"].conv1.weight[0, :]),
    ("conv1.weight[:]", lambda s: s["model"].conv1.weight[:]),
    ("conv1.weight[...]", lambda s: s["model"].conv1.weight[...]),
    ("conv1.weight[None, 0, 0, 0]", lambda s: s["model"].conv1.weight[None, 0, 0, 0]),
    ("linear.weight[0, ::640]", lambda s: s["model"].linear.weight[0, ::640]),
    # The largest step and bound indexed as written: a full span of a dimension in a tuple
    # would name AliasBackward0 where PyTorch's print names SliceBackward0.
    ("conv1.weight[:1][::1024]", lambda s: s["model"].conv1.weight[:1][::1024]),
    (
        "conv1.weight[:4611686018427387904]",
        lambda s: s["model"].conv1.weight[:4611686018427387904],
    ),
    # Past them, brought within them selecting the same: named as written still (a stop
    # of int64's most and a step past a dimension of one were AliasBackward0).
    (
        "conv1.weight[:9223372036854775807]",
        lambda s: s["model"].conv1.weight[:9223372036854775807],
    ),
    ("conv1.weight[:1][::2000]", lambda s: s["model"].conv1.weight[:1][::2000]),
    ("conv1.weight[0, :1, ::5000]", lambda s: s["model"].conv1.weight[0, :1, ::5000]),
    ("conv1.weight[..., 1:, ::5000]", lambda s: s["model"].conv1.weight[..., 1:, ::5000]),
    # A step past a dimension of one is brought to 2, not 1: a step of 1 made the tuple a
    # full span, AliasBackward0.
    ("conv1.weight[:, :1][:, ::5000]", lambda s: s["model"].conv1.weight[:, :1][:, ::5000]),
    # A step after an ellipsis is brought to its own dimension's size (3), which torch cannot
    # index as written ("Negative strides"): the dimension counted past the ellipsis's span.
    (
        "conv1.weight[..., ::4611686018427387904, :]",
        lambda s: s["model"].conv1.weight[..., ::3, :],
    ),
    ("output", lambda s: s["output"]),
    ("output[0, :4]", lambda s: s["output"][0, :4]),
    ("loss", lambda s: s["loss"]),
    ("conv1.output[0, 0, 0]", lambda s: s["outputs"]["conv1"][0, 0, 0]),
    ("linear.output[:2]", lambda s: s["outputs"]["linear"][:2]),
    ("input[0, 0, 0]", lambda s: s["input"][0, 0, 0]),
    ("target", lambda s: s["target"]),
]
AFTER_BACKWARD: list[tuple[str, Callable[[Local], Any]]] = [
    ("conv1.weight.grad[0][0][0]", lambda s: s["model"].conv1.weight.grad[0][0][0]),
    ("linear.weight.grad[:2, :3]", lambda s: s["model"].linear.weight.grad[:2, :3]),
    ("conv1.weight[0][0][0]", lambda s: s["model"].conv1.weight[0][0][0]),
    ("loss", lambda s: s["loss"]),  # its graph freed, its node still named
]


def _local_forward() -> Local:
    """The tutorial's model filled with 0.1 and run on ones, in plain PyTorch, its modules'
    outputs kept by forward hooks as a script keeps them."""
    model = Simple()
    for p in model.parameters():
        p.data.fill_(0.1)
    outputs: dict[str, torch.Tensor] = {}
    for name, module in model.named_children():
        module.register_forward_hook(
            lambda m, a, out, name=name: outputs.__setitem__(name, out)  # type: ignore[misc]
        )
    x, y = torch.ones(8, 3, 10, 10), torch.ones(8, dtype=torch.long)
    output = model(x)
    loss = nn.CrossEntropyLoss()(output, y)
    return {"model": model, "output": output, "loss": loss, "outputs": outputs, "input": x,
            "target": y}  # fmt: skip


def _remote_forward(client: gradwire.Client) -> None:
    client.fill_parameters(0.1)
    client.forward(Fill.ones(8, 3, 10, 10), Fill.ones(8, dtype="int64"))


def test_every_read_prints_as_pytorch_prints_it(client: gradwire.Client) -> None:
    local = _local_forward()
    _remote_forward(client)
    for selector, select in BEFORE_BACKWARD:
        assert format_read(client.read(selector)) == str(select(local)), selector
    client.backward()
    local["loss"].backward()
    for selector, select in AFTER_BACKWARD:
        assert format_read(client.read(selector)) == str(select(local)), selector


def test_what_a_read_says_of_autograd(client: gradwire.Client) -> None:
    _remote_forward(client)
    selectors = ["conv1.weight", "conv1.weight[0]", "output", "loss", "conv2.output", "input"]
    said = {
        selector: (read.requires_grad, read.grad_fn, read.whole_parameter)
        for selector in [*selectors, "target", "conv1.weight.grad"]
        for read in [client.read(selector)]
    }
    assert said == {
        "conv1.weight": (True, "", True),
        "conv1.weight[0]": (True, "SelectBackward0", False),
        "output": (True, "MmBackward0", False),
        "loss": (True, "NllLossBackward0", False),
        "conv2.output": (True, "ConvolutionBackward0", False),
        "input": (False, "", False),
        "target": (False, "", False),
        "conv1.weight.grad": (False, "", False),  # absent before Backward
    }
    assert not client.read("conv1.weight.grad").present
    # On the CPU no device is named: PyTorch's print names none there.
    assert all(client.read(selector).device == "" for selector in selectors)
    # A read with values=False says it too; a negative step, which PyTorch refuses and
    # gradwire reads by flipping, names the flip that made it.
    shape_only = client.read("conv1.weight[1]", values=False)
    assert (shape_only.requires_grad, shape_only.grad_fn) == (True, "SelectBackward0")
    assert client.read("conv1.weight[::-1]").grad_fn == "FlipBackward0"
    # So does a module output's, kept detached once its pass is over.
    assert client.read("conv2.output[::-1]").grad_fn == "FlipBackward0"
    assert client.read("conv2.output[0, ::-2]").grad_fn == "FlipBackward0"


def test_as_torch_prints_the_same(client: gradwire.Client) -> None:
    local = _local_forward()
    _remote_forward(client)
    read = client.read("conv1.weight[0][0][0]", as_torch=True)
    assert isinstance(read.value, torch.Tensor) and read.value.grad_fn is None
    assert format_read(read) == str(local["model"].conv1.weight[0][0][0])


def test_the_streamed_read_the_fetch_and_the_batch_say_it(client: gradwire.Client) -> None:
    local = _local_forward()
    _remote_forward(client)
    streamed = client._read_stream(
        pb.GetTensorRequest(name="conv1.weight", chunk_bytes=64), as_torch=False
    )
    assert format_read(streamed) == str(local["model"].conv1.weight)
    streamed_slice = client._read_stream(
        pb.GetTensorRequest.FromString(
            unary.read_request_bytes("conv1.weight[0][0][0]", None, True)
        ),
        as_torch=False,
    )
    assert streamed_slice.grad_fn == "SelectBackward0" and streamed_slice.requires_grad
    with client.batch() as b:
        in_batch = b.read("conv1.weight[0][0][0]")
        output = b.read("output[0, :4]")
    assert format_read(in_batch.result()) == str(local["model"].conv1.weight[0][0][0])
    assert format_read(output.result()) == str(local["output"][0, :4])
    step = client.train_step(
        Fill.ones(8, 3, 10, 10),
        Fill.ones(8, dtype="int64"),
        fetch=["conv1.weight[0][0][0]", "conv1.weight.grad[0][0][0]", "loss", "conv1.weight"],
    )
    assert [(r.requires_grad, r.grad_fn, r.whole_parameter) for r in step.fetched] == [
        (True, "SelectBackward0", False),
        (False, "", False),
        (True, "NllLossBackward0", False),
        (True, "", True),
    ]


def test_the_raw_message_carries_it(address: str, client: gradwire.Client) -> None:
    """What a client in another language reads: the three fields of GetTensorResponse."""
    _remote_forward(client)
    with grpc.insecure_channel(address) as channel:
        _raw_reads(pb_grpc.TrainerStub(channel))


def _raw_reads(raw: Any) -> None:
    index = [pb.Index(items=[pb.IndexItem(at=0)])] * 3
    sliced = raw.GetTensor(pb.GetTensorRequest(name="conv1.weight", index=index))
    assert (sliced.requires_grad, sliced.grad_fn, sliced.whole_parameter) == (
        True,
        "SelectBackward0",
        False,
    )
    whole = raw.GetTensor(pb.GetTensorRequest(name="conv1.weight", omit_values=True))
    assert (whole.requires_grad, whole.grad_fn, whole.whole_parameter) == (True, "", True)
    assert list(whole.tensor.shape) == [16, 3, 3, 3] and not whole.tensor.float_values
    target = raw.GetTensor(pb.GetTensorRequest(name="target"))
    assert not target.HasField("tensor") or not (target.requires_grad or target.grad_fn)
    chunks = list(raw.GetTensorStream(pb.GetTensorRequest(name="loss")))
    assert (chunks[0].requires_grad, chunks[0].grad_fn) == (True, "NllLossBackward0")


def test_the_remote_model_and_the_command_line_print_it(client: gradwire.Client, cli: Run) -> None:
    local = _local_forward()
    _remote_forward(client)
    remote = client.remote
    assert repr(remote.conv1.weight[0][0][0]) == str(local["model"].conv1.weight[0][0][0])
    assert repr(remote.loss) == str(local["loss"])
    printed = cli("get", "conv1.weight[0][0][0]")
    assert printed.code == 0 and printed.out == f"{local['model'].conv1.weight[0][0][0]}\n"
    assert cli("get", "conv1.weight").out == f"{local['model'].conv1.weight}\n"
    data = cli("get", "output", "--json").json()
    assert (data["requires_grad"], data["grad_fn"], data["whole_parameter"]) == (
        True,
        "MmBackward0",
        False,
    )
    data = cli("get", "input[0, 0, 0]", "--json").json()
    assert (data["requires_grad"], data["grad_fn"], data["whole_parameter"]) == (False, None, False)
    assert data["device"] is None  # the CPU


class _Frozen(nn.Module):
    """A layer frozen (requires_grad=False) before a trained one, as in fine-tuning."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        self.base.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.base(x))  # type: ignore[no-any-return]


@pytest.fixture
def frozen() -> Iterator[gradwire.Client]:
    with serving(ModelSpec("Frozen", _Frozen, sample_shape=(4,), num_classes=2), seed=0) as (
        _,
        client,
    ):
        yield client


def test_a_frozen_parameter_prints_as_pytorch_prints_it(frozen: gradwire.Client) -> None:
    torch.manual_seed(0)
    model = _Frozen()
    frozen.forward(Fill.ones(3, 4), Fill.ones(3, dtype="int64"))
    x = torch.ones(3, 4)
    for selector, local in [
        ("base.weight", model.base.weight),  # "Parameter containing:", no requires_grad
        ("base.weight[0]", model.base.weight[0]),  # a plain tensor
        ("head.weight", model.head.weight),
        ("head.weight[0]", model.head.weight[0]),
        ("base.output", model.base(x)),  # no grad_fn: nothing before it requires grad
        ("output", model(x)),
    ]:
        assert format_read(frozen.read(selector)) == str(local), selector
    whole = frozen.read("base.weight")
    assert (whole.requires_grad, whole.grad_fn, whole.whole_parameter) == (False, "", True)


def test_a_frozen_parameter_s_gradient_is_not_written_and_a_step_leaves_it(
    frozen: gradwire.Client,
) -> None:
    """SetTensor made the gradient of a frozen parameter, and the next Step trained it
    (SGD at lr 1: its weights went to 0), where the .proto says a Step leaves a frozen
    parameter as it is (found by a review of the contract)."""
    frozen.train_step(np.ones((3, 4), np.float32), np.ones(3, np.int64))  # head's gradients
    before = frozen.get("base.weight")
    version = frozen.list_tensors().version
    for value in (np.ones((4, 4), np.float32), Fill.constant(1.0, 4, 4)):
        with pytest.raises(gradwire.errors.InvalidArgument) as caught:
            frozen.set("base.weight.grad", value)
        assert caught.value.reason == "READ_ONLY"
        assert caught.value.message == (
            "'base.weight.grad' is the gradient of base.weight, which is frozen "
            "(requires_grad=False): a Step leaves a frozen parameter as it is, so no gradient "
            "of it is written; write base.weight itself, or unfreeze it in the model to train "
            "it"
        )
    assert frozen.list_tensors().version == version
    frozen.step()
    assert frozen.get("base.weight.grad") is None
    np.testing.assert_array_equal(frozen.get("base.weight"), before)
    frozen.set("head.weight.grad", np.ones((2, 4), np.float32))  # a trained one's is written


class _Unfrozen(_Frozen):
    def __init__(self) -> None:
        super().__init__()
        self.base.requires_grad_(True)


def test_a_checkpoint_s_gradient_of_a_parameter_frozen_here_is_not_loaded(
    tmp_path: Path,
) -> None:
    """A checkpoint of the model trained whole, loaded into one frozen for fine-tuning: its
    base's gradient was loaded, and the next Step trained the frozen base."""
    x, y = torch.ones(3, 4), torch.ones(3, dtype=torch.int64)
    whole = Trainer(ModelSpec("Frozen", _Unfrozen, sample_shape=(4,), num_classes=2), seed=0)
    whole.forward(x, y)
    whole.backward()  # gradients kept for the save, the base's among them
    whole.save(tmp_path / "state.safetensors")
    tuned = Trainer(ModelSpec("Frozen", _Frozen, sample_shape=(4,), num_classes=2), seed=1)
    tuned.load(tmp_path / "state.safetensors")
    assert tuned.parameters["base.weight"].grad is None
    assert tuned.parameters["head.weight"].grad is not None
    base = tuned.parameters["base.weight"].detach().clone()
    tuned.step()
    assert torch.equal(tuned.parameters["base.weight"].detach(), base)


def test_a_tensor_off_the_cpu_names_its_device(trainer: Trainer) -> None:
    """A read of a tensor that lives off the CPU says where, as PyTorch names the device.
    A tensor on the meta device stands in here for one on a GPU, which this machine lacks
    (tests/test_gpu.py checks the print of one on CUDA)."""
    elsewhere = torch.empty(2, 3, device="meta", requires_grad=True)
    selection = trainer._use("conv1.weight", "parameter", elsewhere, ((0,),), lambda s: s)
    assert selection.device == "meta"
    header = b"".join(bytes(p) for p in convert.get_response_pieces(selection, values=False))
    response = pb.GetTensorResponse.FromString(header)
    assert (response.device, response.grad_fn, response.requires_grad) == (
        "meta",
        "SelectBackward0",
        True,
    )
    on_cpu = trainer._use("conv1.weight", "parameter", torch.ones(2, 3), (), lambda s: s)
    assert on_cpu.device == ""


class _OffTheCpu(nn.Module):
    """Keeps, beside its output, a module output on the meta device: one that lives off the
    CPU, served without a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.probe = _ToMeta()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.probe(x)
        return self.fc(x)  # type: ignore[no-any-return]


class _ToMeta(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach().to("meta")


def test_a_read_through_the_client_names_the_device_the_server_said() -> None:
    """The client's read carries the device of the server's answer (a GPU's is checked in
    tests/test_gpu.py, which this machine does not run): one on the CPU names none."""
    with serving(ModelSpec("OffTheCpu", _OffTheCpu, (4,), 2), seed=0) as (_, client):
        client.forward(Fill.ones(3, 4))
        assert client.read("probe.output", values=False).device == "meta"
        assert client.read("fc.weight").device == ""


def test_the_listing_says_which_parameters_are_frozen(frozen: gradwire.Client) -> None:
    listing = frozen.list_tensors()
    said = {t.name: t.requires_grad for t in listing.tensors if t.kind == "parameter"}
    assert said == {
        "base.weight": False,
        "base.bias": False,
        "head.weight": True,
        "head.bias": True,
    }
    frozen.forward(Fill.ones(3, 4), Fill.ones(3, dtype="int64"))
    frozen.backward()
    after = {t.name: (t.requires_grad, t.present) for t in frozen.list_tensors().tensors}
    assert after["output"] == (True, True) and after["input"] == (False, True)
    # A frozen parameter's gradient stays absent; the trained one's is there.
    assert after["base.weight.grad"] == (False, False)
    assert after["head.weight.grad"] == (False, True)
    shown = run_main("list", "--target", frozen.target)
    assert shown.code == 0
    rows = {line.split()[0]: line for line in shown.out.splitlines() if line.startswith("  ")}
    assert "parameter (frozen)" in rows["base.weight"]
    assert "frozen" not in rows["head.weight"] and " parameter " in rows["head.weight"]
    # The kind column is as wide as "parameter (frozen)": the dtypes line up after it.
    dtypes = {rows[t.name].index(f"  {t.dtype}  ", len(t.name)) for t in listing.tensors}
    assert len(dtypes) == 1, shown.out
    data = run_main("list", "--target", frozen.target, "--json").json()
    assert {t["name"]: t["requires_grad"] for t in data["tensors"]}["base.bias"] is False


def test_a_listing_from_an_older_server_calls_nothing_frozen() -> None:
    """A server from before the field leaves it unset: not frozen, not known."""
    old = pb.ListTensorsResponse(
        tensors=[pb.TensorInfo(name="w", kind=pb.TENSOR_KIND_PARAMETER, present=True)]
    )
    (info,) = unary._listing(old).tensors
    assert info.requires_grad is None
    assert cli_state._kind_shown(info) == "parameter"


# --- found by the review of the change -------------------------------------------------------


class _NoGradView(nn.Module):
    """Returns a view made without grad and changed in place: PyTorch refuses to index it in
    grad mode, and its print names its node `Invalid`."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            v = h[:, :2]
            v.mul_(2)
        return v


class _Odd(nn.Module):
    """An odd but legal model: a no-grad view changed in place, a probe whose output nothing
    uses, a module that returns a parameter, and a buffer assigned its output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.clip = _NoGradView()
        self.probe = nn.GELU()
        self.bias = _ReturnsParameter()
        self.register_buffer("last", torch.zeros(3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x) * 1
        self.clip(h * 1)  # a view PyTorch will not index in grad mode, left aside
        self.probe(h.repeat(1, 64))  # its output goes nowhere: Backward never frees its graph
        self.last = h * 3  # type: ignore[assignment]  # a buffer carrying a graph
        return h + self.bias(x)  # type: ignore[no-any-return]


class _InvalidOutput(nn.Module):
    """A model whose output is such a view: it can run, not train."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.clip = _NoGradView()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip(self.fc(x) * 1)  # type: ignore[no-any-return]


class _ReturnsParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b


ODD = ModelSpec("Odd", _Odd, sample_shape=(4,), num_classes=4)


def test_an_odd_model_s_reads_succeed_and_print_as_pytorch_prints_them() -> None:
    """A read of a view PyTorch refuses to index in grad mode answered INTERNAL, a TrainStep
    that fetched one after its step included; a module returning a parameter printed no
    "Parameter containing:"."""
    torch.manual_seed(0)
    model = _Odd()
    seen: dict[str, torch.Tensor] = {}
    for name in ("clip", "probe", "bias"):
        getattr(model, name).register_forward_hook(
            lambda m, a, out, name=name: seen.__setitem__(name, out)  # type: ignore[misc]
        )
    output = model(torch.ones(3, 4))
    with serving(ODD, seed=0) as (_, client):
        client.forward(Fill.ones(3, 4))
        assert format_read(client.read("output")) == str(output)
        assert format_read(client.read("clip.output")) == str(seen["clip"])  # <Invalid>
        assert format_read(client.read("bias.output")) == str(seen["bias"])  # a Parameter
        assert format_read(client.read("probe.output")) == str(seen["probe"])
        # Indexed, PyTorch itself would refuse: the read answers, its node the indexing's.
        first = client.read("clip.output[0]")
        assert first.grad_fn == "SelectBackward0"
        assert np.array_equal(first.value, seen["clip"].detach()[0].numpy())
        step = client.train_step(
            Fill.ones(3, 4), Fill.ones(3, dtype="int64"), fetch=["output[:, 0]", "clip.output[0]"]
        )
        assert [r.grad_fn for r in step.fetched] == ["SelectBackward0", "SelectBackward0"]
    torch.manual_seed(0)
    local = _InvalidOutput()
    invalid = local(torch.ones(3, 4))
    with serving(ModelSpec("Invalid", _InvalidOutput, (4,), 2), seed=0) as (_, client):
        client.forward(Fill.ones(3, 4))
        assert format_read(client.read("output")) == str(invalid)  # grad_fn=<Invalid>
        assert "grad_fn=<Invalid>" in str(invalid)
        assert np.array_equal(client.read("output[:, 1]").value, invalid.detach()[:, 1].numpy())


class _FrozenTable(nn.Module):
    """Adds a frozen parameter that a module of its own returns, as a frozen positional
    table does."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.table = _ReturnsParameter()
        self.table.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.table(x)  # type: ignore[no-any-return]


def test_a_module_output_that_is_a_frozen_parameter_prints_as_pytorch_prints_it() -> None:
    """A module's output that is a parameter not requiring grad prints in PyTorch as
    "Parameter containing:", with no requires_grad: kept detached, its read must say so."""
    torch.manual_seed(0)
    model, seen = _FrozenTable(), {}
    model.table.register_forward_hook(lambda m, a, out: seen.__setitem__("table", out))
    model(torch.ones(3, 4))
    assert str(seen["table"]).startswith("Parameter containing:")
    with serving(ModelSpec("FrozenTable", _FrozenTable, (4,), 4), seed=0) as (_, client):
        client.forward(Fill.ones(3, 4))
        read = client.read("table.output")
        assert (read.requires_grad, read.grad_fn, read.whole_parameter) == (False, "", True)
        assert format_read(read) == str(seen["table"])
        assert format_read(client.read("table.output[1:]")) == str(seen["table"][1:])


def test_a_kept_module_output_holds_no_graph_of_its_own() -> None:
    """Module outputs were kept as the hooks saw them, to name their nodes: a probe whose
    output the loss does not use kept its graph (its saved input) until the next pass, for
    Backward never frees it. They are kept detached, their nodes named as the pass ends."""
    with serving(ODD, seed=0) as (trainer, client):
        client.train_step(Fill.ones(3, 4), Fill.ones(3, dtype="int64"))
        kept = trainer._activations["probe.output"]
        assert kept.grad_fn is None and not kept.requires_grad
        read = client.read("probe.output")
        assert (read.requires_grad, read.grad_fn) == (True, "GeluBackward0")


class _ViewedProbe(nn.Module):
    """A probe whose output is a view of a tensor it computed (not of a leaf)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(x).view(-1)


class _ViewsAGraph(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.probe = _ViewedProbe()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h: torch.Tensor = self.fc(x)
        self.probe(h * 2)  # its output goes nowhere: Backward never frees its graph
        return h


def test_a_kept_module_output_that_views_a_computed_tensor_holds_no_graph() -> None:
    """Only a view of a leaf (a parameter) is kept as it is, to name its node when read: a
    view of a tensor the pass computed would hold that pass's graph, here GELU's saved
    input, until the next pass."""
    inputs: list[weakref.ref[torch.Tensor]] = []
    with serving(ModelSpec("ViewsAGraph", _ViewsAGraph, (4,), 4), seed=0) as (trainer, client):
        trainer._model.get_submodule("probe").register_forward_pre_hook(
            lambda module, args: inputs.append(weakref.ref(args[0]))
        )
        client.train_step(Fill.ones(3, 4), Fill.ones(3, dtype="int64"))
        gc.collect()
        assert len(inputs) == 1 and inputs[0]() is None
        read = client.read("probe.output")
        assert (read.requires_grad, read.grad_fn) == (True, "ViewBackward0")


def _keeping_a_node(name: str) -> ModelSpec:
    """A model whose buffer `last` holds its output through a custom autograd Function
    named `name`: a buffer carrying a node of any name."""
    function = type(
        name,
        (torch.autograd.Function,),
        {
            "forward": staticmethod(lambda ctx, a: a * 2),
            "backward": staticmethod(lambda ctx, g: g * 2),
        },
    )

    class Keeps(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)
            self.register_buffer("last", torch.zeros(2, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.fc(x)
            self.last = function.apply(out)
            return out  # type: ignore[no-any-return]

    return ModelSpec("Keeps", Keeps, (4,), 2)


def test_a_fetch_of_a_buffer_with_a_long_node_is_bounded() -> None:
    """A buffer a module assigns its output to carries a node: a custom Function's, of any
    name. The fetch bound counted none for buffers, and 50 such fetches sent 13,049 bytes
    over a bound of 6,200 (found by a review)."""
    trainer = Trainer(_keeping_a_node("Scale" + "X" * 200), device="cpu", seed=0)
    x, y = torch.ones(2, 4), torch.ones(2, dtype=torch.long)
    trainer.train_step(x, y, use=lambda s: None)  # the buffer now carries the node
    fetch = [("last", ())] * 50
    with pytest.raises(OverLimit) as caught:
        trainer._check_fetch(fetch, x, y, 0)
    bound = int(caught.value.metadata["bytes"])
    answer = trainer.train_step(
        x, y, fetch=fetch, use=convert.fetched_pieces, max_fetch_bytes=bound,
        finish=convert.train_step_bytes,
    )  # fmt: skip
    sent = pb.TrainStepResponse.FromString(answer)
    assert sum(f.ByteSize() for f in sent.fetched) <= bound
    assert sent.fetched[0].grad_fn == ("Scale" + "X" * 200)[:MAX_GRAD_FN_BYTES]


def test_a_long_node_name_not_in_ascii_is_cut_on_a_character() -> None:
    """A node's name is cut to MAX_GRAD_FN_BYTES bytes of UTF-8: a cut inside a character
    drops the character, and the name sent stays within the bound."""
    name = "Scale" + "\u00e9" * 100  # 2 bytes each: byte 64 falls inside one
    with serving(_keeping_a_node(name), seed=0) as (_, client):
        client.forward(Fill.ones(2, 4))
        said = client.read("last").grad_fn
    assert said == "Scale" + "\u00e9" * 29
    assert len(said.encode()) == 63 <= MAX_GRAD_FN_BYTES


class _Transposed(nn.Module):
    """Returns a view of its own parameter, as a tied projection does."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.t()


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 3)
        self.proj = _Transposed()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.proj(x).sum()  # type: ignore[no-any-return]


def test_a_module_output_that_views_a_parameter_names_its_node_as_a_print_then_does() -> None:
    """After a Step changes the parameter in place, PyTorch's print of the view a forward
    hook kept names AsStridedBackward0, no longer TBackward0: read once at the pass's end,
    the server said TBackward0 (found by a review)."""
    torch.manual_seed(0)
    model, kept = _Tied(), {}
    model.proj.register_forward_hook(lambda m, a, out: kept.__setitem__("proj", out))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    nn.CrossEntropyLoss()(model(torch.ones(2, 2)), torch.ones(2, dtype=torch.long)).backward()
    optimizer.step()
    with serving(ModelSpec("Tied", _Tied, (2,), 3), seed=0) as (_, client):
        client.set_optimizer("sgd", lr=1.0)
        client.train_step(Fill.ones(2, 2), Fill.ones(2, dtype="int64"))
        read = client.read("proj.output")
        assert format_read(read) == str(kept["proj"])
        assert read.grad_fn == "AsStridedBackward0"
        listed = {t.name: t.requires_grad for t in client.list_tensors().tensors}
        assert listed["proj.output"] is True


def test_the_listing_says_of_module_outputs_what_a_read_says(client: gradwire.Client) -> None:
    """Kept detached, a module output's own requires_grad is False: the listing said so,
    where a read of it said True (found by a review)."""
    _remote_forward(client)
    for info in client.list_tensors().tensors:
        if info.kind == "activation":
            assert info.requires_grad is client.read(info.name).requires_grad is True, info


def test_a_bfloat16_read_as_a_torch_tensor_prints_as_torch_prints_it() -> None:
    """numpy has no bfloat16: a read as torch tensors is printed through float32, which
    holds each value exactly, its dtype named as the read's."""
    value = torch.tensor([0.1, -2.5, 3.0], dtype=torch.bfloat16)
    read = gradwire.results.TensorRead("x", 0, value, (3,), (3,), "bfloat16")
    assert format_read(read) == repr(value)
