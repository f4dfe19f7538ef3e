"""What the client's unary calls return: frozen dataclasses of plain values, the same from a
`Client` method, a pipeline's `Pending.result()` and a batch's. The streams' items (Watch,
Train) and statistics are in updates.py."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic

if TYPE_CHECKING:
    from typing_extensions import TypeVar

    #: What a read's `value` is: read() gives TensorRead[np.ndarray | None], with
    #: as_torch=True TensorRead[torch.Tensor | None] (None: absent, or values=False). A
    #: TensorRead written bare is TensorRead[Any], as `value` was typed before it was
    #: generic, so that a type-checked caller's annotations stay as they were (found by a
    #: review of the client as an IDE and a type checker show it).
    Value = TypeVar("Value", default=Any)
else:
    from typing import TypeVar

    Value = TypeVar("Value")  # typing's takes a default from Python 3.13 only

__all__ = [
    "CheckpointInfo",
    "ForwardResult",
    "Listing",
    "LoadedCheckpoint",
    "OptimizerConfig",
    "SavedCheckpoint",
    "ServerInfo",
    "ServerLimits",
    "SessionInfo",
    "SessionListing",
    "StepResult",
    "TensorInfo",
    "TensorRead",
    "TrainStepResult",
]


@dataclass(frozen=True)
class ForwardResult:
    """What a Forward did (`Client.forward`): the state version, the output's shape and
    the loss, when a target was given."""

    version: int  # state version after the Forward
    output_shape: tuple[int, ...]  # e.g. (8, 20)
    loss: float | None  # None when no target was given
    nonfinite_inputs: int = 0  # NaN or infinite input values (allowed; worth a look)


@dataclass(frozen=True)
class StepResult:
    """What a Step did (`Client.step`): the state version and the parameters it updated."""

    version: int  # state version after the Step
    parameters_updated: int  # parameters that had a gradient


@dataclass(frozen=True)
class TensorRead(Generic[Value]):
    """One GetTensor: the values (None when the tensor is absent, or read with values=False)
    and what the server saw."""

    name: str
    version: int
    value: Value  # numpy array, torch tensor when asked; None when absent or values=False
    shape: tuple[int, ...] | None  # shape of the selected part; None when absent
    full_shape: tuple[int, ...] | None  # shape of the whole tensor; None when absent
    dtype: str | None  # "float32", ...; None when absent
    # What PyTorch's print of the selection on the server shows besides its values (all
    # unset when absent, and from a server older than these fields): whether it requires
    # grad, the node that made it ("SelectBackward0" for conv1.weight[0][0][0]; "" for a
    # leaf), whether it is a whole parameter, printed "Parameter containing:", and its
    # device ("cuda:0"; "" on the CPU). display.format_read prints the read as PyTorch
    # prints the tensor.
    requires_grad: bool = False
    grad_fn: str = ""
    whole_parameter: bool = False
    device: str = ""

    @property
    def present(self) -> bool:
        return self.shape is not None


@dataclass(frozen=True)
class TrainStepResult(Generic[Value]):
    """One TrainStep (`Client.train_step`): the loss, the state version after the step,
    and what `fetch` named, read after it, in its order."""

    version: int  # state version after the step
    loss: float  # the loss the step minimised
    output_shape: tuple[int, ...]
    parameters_updated: int
    fetched: tuple[TensorRead[Value], ...]  # one per selector in `fetch`, read after the step
    nonfinite_inputs: int = 0  # NaN or infinite input values (allowed; worth a look)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor the server names (`Client.list_tensors`): its kind, dtype and shape, and
    whether it is present now."""

    name: str
    kind: str  # "parameter", "gradient", "input", "target", "output", "loss", "activation",
    # "optimizer_state", "delta" or "buffer" ("unknown": a kind newer than this client)
    dtype: str  # what it holds, or will hold once present
    shape: tuple[int, ...]  # () when absent, as a scalar's: `present` tells them apart
    present: bool
    # Takes part in autograd now (False while absent): a frozen parameter's is False, and
    # its gradient stays absent. None from a server older than the field.
    requires_grad: bool | None = None


@dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer a session trains with (`Client.set_optimizer`, `list_tensors`): its
    kind and settings, None for one the server did not send (a setting of the other kind)."""

    kind: str  # "sgd" or "adam"
    lr: float
    momentum: float | None = None
    weight_decay: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    eps: float | None = None
    nesterov: bool | None = None


@dataclass(frozen=True)
class Listing:
    """What the server serves (`Client.list_tensors`): the model, its device and optimizer,
    the inputs and outputs it takes, and every tensor it names; `names()` lists those."""

    version: int
    model: str
    device: str
    optimizer: OptimizerConfig
    tensors: tuple[TensorInfo, ...]
    sample_shape: tuple[int, ...] = ()  # one input sample's shape: inputs are [N, *sample_shape]
    input_dtype: str = "float32"
    outputs: int = 0  # the output's width: the number of classes, or of regression targets
    loss: str = "cross_entropy"  # or "mse"

    def names(self) -> list[str]:
        return [t.name for t in self.tensors]


@dataclass(frozen=True)
class SessionInfo:
    """A session open on the server beside the default one (`Client.list_sessions`)."""

    session: str  # its id: Client(target, session=...) joins it, close-session closes it
    version: int  # its state version
    open_s: float  # seconds since it was opened
    idle_s: float  # seconds since its last call ended; 0 while a call is in progress
    calls_in_progress: int  # an open Watch or Train counts until it ends


@dataclass(frozen=True)
class SavedCheckpoint:
    """A checkpoint written (`Client.save_checkpoint`): its name, the state version saved and
    the file's size."""

    name: str  # as written in the server's state directory, <name>.safetensors
    version: int  # the state version saved
    bytes: int  # the file's size


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint in the server's state directory (`Client.list_checkpoints`), as its file
    and header tell: its tensors are not read until a load."""

    name: str  # what load_checkpoint() takes
    bytes: int  # the file's size
    saved_unix_s: float  # when it was written (the file's time), seconds since 1970, UTC
    saved_version: int  # the state version it was saved at; -1 when its header does not say
    model: str  # the model it holds; "" when its header does not say
    problem: str  # "" when its header is one of the server's model; else why a load would fail


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint loaded (`Client.load_checkpoint`): the state version it was saved at, and
    the session's after the load."""

    version: int  # the state version after the load: one more than before it
    saved_version: int  # the version the checkpoint was saved at


@dataclass(frozen=True)
class SessionListing:
    """The sessions open on the server (`Client.list_sessions`), and the most it keeps."""

    sessions: tuple[SessionInfo, ...]  # oldest first
    max_sessions: int  # the most the server keeps open at once
    idle_timeout_s: float  # a session is closed after this long without calls; inf: never
    opening: int = 0  # sessions being opened: they hold places too, listed once open


@dataclass(frozen=True)
class ServerLimits:
    """The limits a server keeps (`Client.server_info`), each named with what it answers
    past it; the .proto's ServerLimits says more of each."""

    max_message_bytes: int  # the largest message either way
    max_value_bytes: int  # tensor values in one reply; more stream (USE_STREAM)
    default_chunk_bytes: int  # values per chunk of a streamed read that asks for none
    max_elements: int  # in a tensor a call sends or makes (TOO_MANY_ELEMENTS)
    max_dims: int  # of a tensor sent, a fill or a selection
    max_name_chars: int  # of a tensor name (BAD_NAME)
    max_histogram_bins: int  # GetStats and Watch histograms (BAD_BINS)
    max_train_steps: int  # steps one Train may run
    max_request_id_chars: int  # the request id metadata (BAD_METADATA)
    max_concurrent: int  # calls served at once, open streams included (BUSY); info one more
    max_sessions: int  # open at once beside the default one (TOO_MANY_SESSIONS)
    session_idle_timeout_s: float  # a session is closed after this long without calls; inf: never
    keepalive_s: float  # the server pings a connection silent this long; 0: never
    keepalive_timeout_s: float  # and closes it when a ping goes unanswered this long
    min_client_ping_s: float  # pings closer than this on a quiet connection get it closed
    # These six are 0 from a server that predates them: not reported, not "none" (and 0 by
    # default, so that code that made a ServerLimits before them still does).
    max_health_watches: int = 0  # health Watches open at once (TOO_MANY_WATCHES); poll Check
    max_reflection_streams: int = 0  # reflection streams open at once (TOO_MANY_REFLECTION_...)
    # Request ids kept for retries: each this long after its last use, then while among the
    # last last_request_ids_kept, max_request_ids_kept at most; a retry of one forgotten is
    # applied again.
    request_id_kept_s: float = 0.0
    last_request_ids_kept: int = 0
    max_request_ids_kept: int = 0
    answer_bytes_kept: int = 0  # the latest answers that fit; one let go: ANSWER_NOT_KEPT
    # Calls in one Batch (BATCH_TOO_LONG); 0 from a server without Batch (Client.batch then
    # makes its calls in a pipeline).
    max_batch_calls: int = 0
    # Items in one Watch, selectors in one train_step's fetch (TOO_MANY_SELECTORS); 0 from a
    # server that predates the limit.
    max_selectors: int = 0
    # A connection with no call in progress for this long is closed (the client reconnects
    # at its next call); 0: never, as from a server that predates it.
    connection_idle_s: float = 0.0
    # Connections the server keeps open at once, one more closed as it opens (UNAVAILABLE);
    # 0: no limit, as from a server that predates it.
    max_connections: int = 0
    # Indexes in one selector's chain, x[0][1]... (BAD_INDEX); 0 from a server that predates
    # the limit.
    max_index_chain: int = 0


@dataclass(frozen=True)
class ServerInfo:
    """What a server runs and the limits it keeps (`Client.server_info`)."""

    version: str  # gradwire's version on the server
    torch_version: str  # PyTorch's: what to compare a local run with
    device: str  # where every session's model lives: "cuda", "cuda:1", "cpu"
    limits: ServerLimits
    # Every field of the contract the server knows, "ForwardRequest.eval_mode": a request
    # field it does not list, it would ignore; () from a server older than the list.
    known_fields: tuple[str, ...] = ()
    # 16 hex digits the server drew as it started: the state versions it answers are of
    # this instance (a server started again counts afresh). "" from a server older than it.
    instance_id: str = ""

    def __repr__(self) -> str:
        """The fields as a dataclass prints them, but the contract's field names as their
        count: some 300 of them (12,000 characters) buried the versions, the device and
        the limits in a notebook (found by a review of the client as a researcher uses it
        in a notebook). `"X.y" in info.known_fields` asks for one."""
        shown = [
            f"{f.name}=<{len(self.known_fields)} names>"
            if f.name == "known_fields" and self.known_fields
            else f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
        ]
        return f"ServerInfo({', '.join(shown)})"
