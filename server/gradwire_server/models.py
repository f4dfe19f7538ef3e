"""The models the server can own, and what their inputs, outputs and loss look like.

The tutorial's `Simple` is the default; `gradwire serve --model package.module:attr` serves
any other nn.Module described by a ModelSpec (see `load_spec`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Literal, get_args

import torch
from torch import nn

from gradwire import codec
from gradwire_server.errors import InvalidInput, ModelFault
from gradwire_server.fills import dtype_name, int_range


class Simple(nn.Module):
    """The tutorial's network: two 3x3 convolutions and a linear layer, no biases."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, padding=1, bias=False)
        self.conv2 = nn.Conv2d(16, 32, 3, 1, padding=1, bias=False)
        self.linear = nn.Linear(32 * 10 * 10, 20, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.conv2(x)
        out: torch.Tensor = self.linear(x.view(x.size(0), -1))
        return out


Loss = Literal["cross_entropy", "mse"]
LOSSES: tuple[str, ...] = get_args(Loss)


@dataclass(frozen=True)
class ModelSpec:
    """A model and what its inputs, outputs and loss look like, so bad input is refused
    before it runs.

    The model takes [N, *sample_shape] inputs of `input_dtype` and returns [N, num_classes].
    `loss` is "cross_entropy" (targets: int64 class indices [N], or float class
    probabilities [N, num_classes]) or "mse" (targets: floats of the output's shape).
    `factory` is called with no arguments, under the server's seed, to build the model (at
    start and at every Reset). Its parameters (`named_parameters()`) are listed, read,
    written and checkpointed; its buffers (`named_buffers()`, BatchNorm's running
    statistics) listed and read but not written, and checkpointed as a state_dict keeps
    them.
    """

    name: str
    factory: Callable[[], nn.Module]
    sample_shape: tuple[int, ...]  # one input sample's shape; the batch dimension comes first
    num_classes: int  # width of the output: the number of classes, or of regression targets
    loss: Loss = "cross_entropy"
    input_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"ModelSpec name must be a non-empty string, got {self.name!r}")
        if isinstance(self.factory, nn.Module):
            # A model is callable (its forward): it passed, and failed at the first build
            # as "forward() missing 1 required positional argument" (a review).
            raise TypeError(
                f"ModelSpec {self.name}: factory is a model ({type(self.factory).__name__}), "
                "where it is to build one at each call (every session and Reset gets its "
                f"own): pass its class, or a function returning a new one, e.g. "
                f"lambda: {type(self.factory).__name__}(...)"
            )
        if not callable(self.factory):
            raise TypeError(
                f"ModelSpec {self.name}: factory must be callable returning an nn.Module"
            )
        if isinstance(self.sample_shape, int):
            # sample_shape=(16) is the number 16: it failed as "'int' object is not
            # iterable", raised while the module was imported (found by a walkthrough).
            raise ValueError(
                f"ModelSpec {self.name}: sample_shape must be a tuple of whole numbers, got the "
                f"number {self.sample_shape!r}: write ({self.sample_shape},) for one dimension, "
                "with the comma"
            )
        shape = tuple(self.sample_shape)
        if not all(isinstance(d, int) and d > 0 for d in shape):
            raise ValueError(
                f"ModelSpec {self.name}: sample_shape must be positive whole numbers, got {shape}"
            )
        object.__setattr__(self, "sample_shape", shape)
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(
                f"ModelSpec {self.name}: num_classes (the output's width) must be a whole "
                f"number >= 1, got {self.num_classes!r}"
            )
        if self.loss not in LOSSES:
            raise ValueError(
                f"ModelSpec {self.name}: loss must be one of {', '.join(LOSSES)}, got {self.loss!r}"
            )
        if not isinstance(self.input_dtype, torch.dtype):
            raise TypeError(
                f"ModelSpec {self.name}: input_dtype must be a torch.dtype such as "
                f"torch.float32, got {self.input_dtype!r}"
            )

    def check_input_shape(self, shape: tuple[int, ...]) -> None:
        """InvalidInput (BAD_INPUT_SHAPE) unless `shape` is [N, *sample_shape], N >= 1."""
        sample = self.sample_shape
        if len(shape) != len(sample) + 1 or tuple(shape[1:]) != sample or shape[0] < 1:
            raise InvalidInput(
                f"input has shape {list(shape)}; {self.name} takes ["
                + ", ".join(["N", *map(str, sample)])
                + "] with N >= 1",
                reason="BAD_INPUT_SHAPE",
            )

    def check_input_dtype(self, dtype: torch.dtype) -> None:
        """InvalidInput (BAD_INPUT_DTYPE) unless `dtype` is `input_dtype`, or the dtype the
        wire carries it as (int32 for uint8, int8, int16 and uint16; int64 for uint32):
        such an input is narrowed to `input_dtype` (Trainer._inputs). A model taking uint8
        images was fed by no client: each sent int32, which was refused."""
        want, sent = self.input_dtype, self.input_sent_as
        if dtype != want and dtype != sent:
            takes = "the model computes in" if want.is_floating_point else f"{self.name} takes"
            # The dtype to send, where the wire has not the model's: "Pixels takes uint8"
            # alone sent a client in another language, or the CLI's fills, to a dtype no
            # message carries (found by a review of the error catalogue).
            travels = ""
            if sent != want:
                low, high = int_range(want)
                travels = (
                    f", which travels as {dtype_name(sent)} (the wire has no "
                    f"{dtype_name(want)}): send {dtype_name(sent)} values from {low} to {high}"
                )
            raise InvalidInput(
                f"input has dtype {dtype_name(dtype)}; {takes} {dtype_name(want)}{travels}",
                reason="BAD_INPUT_DTYPE",
            )

    @property
    def input_sent_as(self) -> torch.dtype:
        """The dtype `input_dtype` travels as on the wire: its own, or the one it is widened
        to (int32 for uint8, int8, int16 and uint16; int64 for uint32)."""
        name = codec.sent_as(dtype_name(self.input_dtype))
        sent = getattr(torch, name, None) if name is not None else None
        return sent if isinstance(sent, torch.dtype) else self.input_dtype

    def check_target(self, y: torch.Tensor, batch: int) -> None:
        """InvalidInput (BAD_TARGET_DTYPE, BAD_TARGET_SHAPE, BAD_TARGET_CLASS) unless `y` is a
        target `loss` takes for a batch of `batch`: class indices [batch] in range, or floats
        of the output's shape [batch, num_classes]."""
        classes = self.num_classes
        if self.loss == "mse":
            if not y.dtype.is_floating_point:
                raise InvalidInput(
                    f"target has dtype {dtype_name(y.dtype)}; {self.name} "
                    f"is trained with a mean squared error: send floats of shape [{batch}, "
                    f"{classes}], the output's shape",
                    reason="BAD_TARGET_DTYPE",
                )
            if tuple(y.shape) != (batch, classes):
                raise InvalidInput(
                    f"target has shape {list(y.shape)}; a mean squared error target must have "
                    f"the output's shape [{batch}, {classes}]",
                    reason="BAD_TARGET_SHAPE",
                )
        elif y.dtype == torch.int64:
            if tuple(y.shape) != (batch,):
                raise InvalidInput(
                    f"target has shape {list(y.shape)}; class indices must have shape [{batch}] "
                    "to match the input's batch",
                    reason="BAD_TARGET_SHAPE",
                )
            # Checked on the host: an out-of-range label on a GPU is a device-side assert
            # that poisons the CUDA context for every later call.
            labels = y.cpu()
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
                bad = labels[(labels < 0) | (labels >= classes)][0].item()
                raise InvalidInput(
                    f"target holds class {bad}; classes run from 0 to {classes - 1}",
                    reason="BAD_TARGET_CLASS",
                )
        elif y.dtype.is_floating_point:
            if tuple(y.shape) != (batch, classes):
                raise InvalidInput(
                    f"target has shape {list(y.shape)}; class probabilities must have shape "
                    f"[{batch}, {classes}]",
                    reason="BAD_TARGET_SHAPE",
                )
        else:
            raise InvalidInput(
                f"target has dtype {dtype_name(y.dtype)}; use int64 class indices "
                "or floating-point class probabilities",
                reason="BAD_TARGET_DTYPE",
            )

    def check_output(self, output: object, batch: int) -> None:
        """ModelFault (BAD_MODEL_OUTPUT) unless `output`, the model's for an input of `batch`
        samples, is what the loss and every read take: a floating-point tensor of shape
        [batch, num_classes]. A tuple (a model returning its attention in evaluation mode)
        was kept as the output and failed every later Forward, TrainStep and listing
        INTERNAL until a Reset; a [3] output for a batch of 1 (`squeeze()`) was taken by a
        Forward and failed the loss of a TrainStep INTERNAL (found by a review of served
        models)."""
        want = f"a floating-point tensor [{batch}, {self.num_classes}]"
        if not isinstance(output, torch.Tensor):
            got = f"a {type(output).__name__}"
        elif tuple(output.shape) != (batch, self.num_classes):
            got = f"shape {list(output.shape)}"
        elif not output.dtype.is_floating_point:
            got = f"dtype {dtype_name(output.dtype)}"
        else:
            return
        raise ModelFault(
            f"{self.name} returned {got} for an input of {batch} sample"
            f"{'' if batch == 1 else 's'}, where its ModelSpec makes it {want}: the model's "
            "forward must change (the server's to fix, not the caller's); the call changed "
            "nothing but letting go of the last pass's activations"
        )

    def criterion(self) -> nn.Module:
        """A fresh loss module: nn.CrossEntropyLoss or nn.MSELoss, with PyTorch's defaults."""
        return nn.MSELoss() if self.loss == "mse" else nn.CrossEntropyLoss()


SIMPLE = ModelSpec("Simple", Simple, sample_shape=(3, 10, 10), num_classes=20)


class TinyMLP(nn.Module):
    """An example of your own model: biases, BatchNorm (which has buffers) and a ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.norm = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(torch.relu(self.norm(self.fc1(x))))
        return out


#: `gradwire serve --model gradwire_server.models:TINY_MLP`: 16 features in, 4 classes out.
TINY_MLP = ModelSpec("TinyMLP", TinyMLP, sample_shape=(16,), num_classes=4)


class TinyRegressor(nn.Module):
    """An example regression model: LayerNorm and tanh, trained with a mean squared error."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(torch.tanh(self.norm(self.fc1(x))))
        return out


#: `gradwire serve --model gradwire_server.models:TINY_REGRESSOR`: 8 features in, 2 values out.
TINY_REGRESSOR = ModelSpec(
    "TinyRegressor", TinyRegressor, sample_shape=(8,), num_classes=2, loss="mse"
)

MODEL_HELP = "package.module:attr, e.g. gradwire_server.models:TINY_MLP"


def load_spec(text: str, folder: Path | None = None) -> ModelSpec:
    """The ModelSpec that "package.module:attr" names, checked by building the model once.

    The attribute is a ModelSpec, or a callable taking no arguments that returns one (not an
    nn.Module: the server must also know the input's shape, the output's width and the loss).
    For example, in mymodels.py::

        from torch import nn
        from gradwire_server.models import ModelSpec

        def mlp() -> nn.Module:
            return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

        SPEC = ModelSpec("MyMLP", mlp, sample_shape=(16,), num_classes=4)

    and then ``gradwire serve --model mymodels:SPEC``. The model is built once here, on the
    CPU, and run on zeros of [2, *sample_shape]: its output must be [2, num_classes].
    Every problem is an InvalidInput that says what to fix, a sys.exit() in the model's own
    code included (SystemExit is no Exception: it used to end `gradwire serve` with exit code
    0 and no message). KeyboardInterrupt goes through.

    `folder` (the serving folder, for `gradwire serve`) is importable while the spec loads
    (`_importable`): its module, what that imports, and what its model's build imports.
    """
    with _importable(folder):
        return _load_spec(text)


@contextlib.contextmanager
def _importable(folder: Path | None) -> Iterator[None]:
    """`folder` at the end of sys.path inside, unless it is on it already. Looked in
    first, for the whole process, files there took the place of installed and standard
    modules (a cryptography.py ran, the --model naming an installed module: a security
    review); looked in last, for the whole process, they stood in for optional modules not
    installed that torch imports when first needed (gmpy2, triton, tabulate: a review of
    that change). So only while the model loads."""
    entry = None if folder is None else str(folder)
    if entry is None or entry in sys.path:
        yield
        return
    sys.path.append(entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)


def _load_spec(text: str) -> ModelSpec:
    module_name, colon, attr = text.partition(":")
    module_name, attr = module_name.strip(), attr.strip()
    if not colon or not module_name or not attr:
        raise InvalidInput(f"--model {text!r}: expected {MODEL_HELP}", reason="BAD_MODEL")
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as err:  # a missing module, or its own code's error or exit
        missing = err.name if isinstance(err, ModuleNotFoundError) else None
        if module_name.endswith(".py"):
            # "mymodels.py:SPEC" named a module "py" in a package "mymodels", and was told to
            # run from the folder it was run from (found by a walkthrough).
            stem = module_name.removesuffix(".py").replace("/", ".").replace("\\", ".")
            why = (
                f"{module_name!r} is a file name, and --model takes a module's: write "
                f"--model {stem.rsplit('.', 1)[-1]}:{attr}, run from the folder that holds "
                "the file (or with that folder on PYTHONPATH)"
            )
        elif missing and (module_name == missing or module_name.startswith(missing + ".")):
            why = (
                f"there is no module {missing!r}: install it, or run from the folder that "
                "holds it (or add that folder to PYTHONPATH)"
            )
        elif isinstance(err, SystemExit):  # e.g. a script's sys.exit(), or argparse's
            why = (
                f"importing it raised {err!r}: the module exits when imported (sys.exit(), or "
                "a command line parsed at import); keep that under "
                '`if __name__ == "__main__":`'
            )
        else:  # the module is there, but its own code failed (e.g. a missing dependency)
            why = f"importing it raised {type(err).__name__}: {err}"
        raise InvalidInput(
            f"--model {text!r}: cannot import module {module_name!r}: {why}", reason="BAD_MODEL"
        ) from err
    try:
        target = functools.reduce(getattr, attr.split("."), module)
    except AttributeError:
        public = sorted(
            n for n, v in vars(module).items() if isinstance(v, ModelSpec) and not n.startswith("_")
        )
        hint = f" (its ModelSpecs: {', '.join(public)})" if public else ""
        raise InvalidInput(
            f"--model {text!r}: module {module_name!r}{_origin(module)} has no attribute "
            f"{attr!r}{hint}{_not_yours(module, module_name, attr)}",
            reason="BAD_MODEL",
        ) from None
    except (Exception, SystemExit) as err:  # a module __getattr__ or a property of its own
        raise InvalidInput(
            f"--model {text!r}: looking up {attr!r} in module {module_name!r} raised "
            f"{_raised(err)}",
            reason="BAD_MODEL",
        ) from err
    spec = _as_spec(text, target)
    _check_builds(text, spec)
    return spec


def _origin(module: ModuleType) -> str:
    """Where `module` came from, for a message: " (imported from /usr/lib/python3.11/queue.py)",
    " (built into Python)". A user's queue.py holding SPEC was told "module 'queue' has no
    attribute 'SPEC'", which read as their file missing it (a security review, sixty-second
    session): the file imported was Python's."""
    where = getattr(module, "__file__", None)
    if where:
        return f" (imported from {where})"
    return " (built into Python)" if module.__name__ in sys.builtin_module_names else ""


def _not_yours(module: ModuleType, module_name: str, attr: str) -> str:
    """What to do when the serving folder holds a file of `module_name`'s that is not the
    module imported: a module of Python's own, an installed one, or one imported before
    by that name comes first (the folder is the last place looked in); "" otherwise."""
    yours = Path.cwd().joinpath(*module_name.split(".")).with_suffix(".py")
    where = getattr(module, "__file__", None)
    if not yours.is_file() or (where is not None and Path(where).resolve() == yours.resolve()):
        return ""
    return (
        f"; your {yours} is not that module: one of that name, Python's own or installed, is "
        f"found first; rename your file (as mymodels.py, then --model mymodels:{attr})"
    )


def _scripted(module: nn.Module) -> bool:
    """Whether `module` is TorchScript (torch.jit.script's or torch.jit.trace's)."""
    return isinstance(module, torch.jit.ScriptModule)


def _raised(err: BaseException) -> str:
    """What the model's own code raised, for a message: "OSError: weights.bin not found", or
    "SystemExit(3) (it called sys.exit(); raise an exception instead)"."""
    if isinstance(err, SystemExit):
        return f"{err!r} (it called sys.exit(); raise an exception instead)"
    return f"{type(err).__name__}: {err}"


def _as_spec(text: str, target: object) -> ModelSpec:
    if isinstance(target, ModelSpec):
        return target
    example = "ModelSpec('MyModel', MyModel, sample_shape=(16,), num_classes=4)"
    if isinstance(target, type) and issubclass(target, nn.Module):
        raise InvalidInput(
            f"--model {text!r} is an nn.Module class; name a ModelSpec that wraps it instead, "
            f"e.g. {example}, so the server knows the input's shape and the loss",
            reason="BAD_MODEL",
        )
    if isinstance(target, nn.Module):  # callable, and called, its forward failed (a review)
        raise InvalidInput(
            f"--model {text!r} is a model ({type(target).__name__}); name a ModelSpec whose "
            f"factory builds one instead, e.g. {example}, so the server knows the input's "
            "shape and the loss, and each session and Reset gets a model of its own",
            reason="BAD_MODEL",
        )
    if not callable(target):
        raise InvalidInput(
            f"--model {text!r} is a {type(target).__name__}; expected a ModelSpec, e.g. "
            f"{example}, or a function of no arguments returning one",
            reason="BAD_MODEL",
        )
    try:
        made = target()
    except (Exception, SystemExit) as err:
        raise InvalidInput(
            f"--model {text!r}: calling it (with no arguments) failed: {_raised(err)}",
            reason="BAD_MODEL",
        ) from err
    if not isinstance(made, ModelSpec):
        raise InvalidInput(
            f"--model {text!r} returned a {type(made).__name__}; it must return a ModelSpec, "
            f"e.g. {example}",
            reason="BAD_MODEL",
        )
    return made


#: The models factories have returned: those `load_spec` built to check a spec, and those
#: trainers hold (Trainer._adopt). A factory that returns one of them again returns a model
#: it keeps (one loaded once), which the trainer refuses (SHARED_MODEL).
BUILT: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _check_builds(text: str, spec: ModelSpec) -> None:
    """Builds the model on the CPU and runs it once on zeros: what the server will do."""
    # The private RNG stream leaves the process's generator as it was, as the trainer does.
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        try:
            model = spec.factory()
        except (Exception, SystemExit) as err:
            raise InvalidInput(
                f"--model {text!r}: building {spec.name} failed: {_raised(err)}",
                reason="BAD_MODEL",
            ) from err
        if not isinstance(model, nn.Module):
            raise InvalidInput(
                f"--model {text!r}: {spec.name}'s factory returned a {type(model).__name__}, "
                "not an nn.Module",
                reason="BAD_MODEL",
            )
        BUILT.add(model)
        scripted = [n or "the model" for n, m in model.named_modules() if _scripted(m)]
        if scripted:
            # torch: "register_forward_hook is not supported on ScriptModules", a traceback
            # from `gradwire serve` (found by a review of served models).
            raise InvalidInput(
                f"--model {text!r}: {spec.name} holds TorchScript ({', '.join(scripted[:3])}): "
                "the server keeps each module's output with forward hooks, which TorchScript "
                "modules do not take; serve the nn.Module as it is before torch.jit.script",
                reason="BAD_MODEL",
            )
        if not any(p.requires_grad and p.is_floating_point() for p in model.parameters()):
            frozen = any(p.is_floating_point() for p in model.parameters())
            raise InvalidInput(
                f"--model {text!r}: {spec.name} has no parameters to train: "
                + (
                    "every floating-point one is frozen (requires_grad=False)"
                    if frozen
                    else "none is floating-point"
                    if any(True for _ in model.parameters())
                    else "it has none at all"
                ),
                reason="BAD_MODEL",
            )
        shape = [2, *spec.sample_shape]
        dtype = dtype_name(spec.input_dtype)
        model.train()
        try:
            output = model(torch.zeros(shape, dtype=spec.input_dtype))
        except (Exception, SystemExit) as err:
            raise InvalidInput(
                f"--model {text!r}: {spec.name} failed on zeros of shape {shape} ({dtype}): "
                f"{_raised(err)}; check the spec's sample_shape and input_dtype",
                reason="BAD_MODEL",
            ) from err
    want = [2, spec.num_classes]
    if not isinstance(output, torch.Tensor) or list(output.shape) != want:
        got = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        # Of a tuple, what to do: it said what the spec wants alone, where a call met later
        # says the forward must change (a review of serving real models: an LSTM's output).
        alone = (
            ": its forward must return that tensor alone (of a layer that returns a tuple, "
            "as nn.LSTM and nn.MultiheadAttention do, the part the loss is taken of)"
            if not isinstance(output, torch.Tensor)
            else ""
        )
        raise InvalidInput(
            f"--model {text!r}: {spec.name} returned {got} for an input of shape {shape}; the "
            f"spec says [N, num_classes] = {want}{alone}",
            reason="BAD_MODEL",
        )
    if not output.is_floating_point():
        raise InvalidInput(
            f"--model {text!r}: {spec.name}'s output is {output.dtype}; a loss needs floats",
            reason="BAD_MODEL",
        )
