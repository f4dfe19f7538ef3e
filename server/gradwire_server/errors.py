"""Domain errors of the trainer; the servicer maps each class to one gRPC status code.

Each carries a stable `reason` (sent in google.rpc.ErrorInfo) and a message that tells a
person what to do next.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch


class DomainError(Exception):
    """Base of the errors the trainer raises on purpose."""

    reason = "ERROR"

    def __init__(
        self, message: str, *, reason: str | None = None, metadata: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidInput(DomainError):
    """Malformed tensor, bad dtype or shape, bad fill spec, bad index or setting."""

    reason = "INVALID_INPUT"


class UnknownTensor(DomainError):
    """No tensor of that name; the message names the closest ones."""

    reason = "UNKNOWN_TENSOR"


class IndexOutOfRange(DomainError):
    """An integer index past the end of a dimension."""

    reason = "INDEX_OUT_OF_RANGE"


class WrongOrder(DomainError):
    """A call that needs an earlier one first: Backward before Forward, Step before Backward."""

    reason = "WRONG_ORDER"


class ModelFault(DomainError):
    """The served model did what its ModelSpec does not allow: returned a tuple, or an
    output of the wrong shape or dtype (BAD_MODEL_OUTPUT), or its factory returned a model
    it had returned before (SHARED_MODEL). Its code is the server operator's to fix; the
    call that met it changed nothing."""

    reason = "BAD_MODEL_OUTPUT"


class ModelCodeError(DomainError):
    """An error the served model's own code raised in a forward or backward pass that is not
    its refusal of an input (MODEL_REFUSED): a fault of the model's, its operator's to
    mend. Answered INTERNAL naming the model, the pass and the error's type, not its text
    (which may hold anything); the servicer logs the traceback. The call changed nothing."""

    reason = "MODEL_ERROR"


class OverLimit(DomainError):
    """A request over a configured limit, or more memory than the device has."""

    reason = "OVER_LIMIT"


def fewer_elements(what: str) -> str:
    """What to do about a tensor over the element limit (TOO_MANY_ELEMENTS), by what it is:
    the refusal named the limit alone (a review of the error catalogue)."""
    if what in ("input", "target"):
        return "send a smaller batch: the samples in parts, a call each"
    return "write it in parts, a slice of the tensor a call (name[a:b])"


class NoSuchCheckpoint(DomainError):
    """A checkpoint asked for by name that the state directory does not hold."""

    reason = "NO_CHECKPOINT"


class NotConfigured(DomainError):
    """A call the server was not started for: a checkpoint's save or load without
    `--state-dir`, or a state directory it cannot write."""

    reason = "NO_STATE_DIR"


class VersionMismatch(DomainError):
    """A conditional mutation whose expected state version is not the server's."""

    reason = "VERSION_MISMATCH"


class AnswerNotKept(DomainError):
    """A retried mutation that was applied before, whose answer the server no longer keeps:
    the retry changes nothing."""

    reason = "ANSWER_NOT_KEPT"


class PreviousFailed(DomainError):
    """A call on a Calls stream sent to run only after the one before it succeeded, which
    failed (or was itself not run): this one was not run, and changed nothing."""

    reason = "PREVIOUS_FAILED"


class DeadlinePassed(DomainError):
    """A call whose deadline passed before it could run; nothing was changed."""

    reason = "DEADLINE_PASSED"


class CallerGone(DomainError):
    """A call whose caller went away (it cancelled, or its deadline passed) before the server
    acted on it. Its answer reaches no one: it is for the server's own metrics."""

    reason = "CALLER_GONE"


class Stopping(DomainError):
    """A stream (Watch, Train, Calls) ended, or a call of a Batch not run, because the server
    is stopping; its client can call again once it is back. (An OpenSession whose model is
    still being built when the sessions close at the end of a stop is refused so too, its
    call cancelled by then: the answer reaches no one.)"""

    reason = "STOPPING"


#: How running out of memory shows in the RuntimeErrors of libraries that report it in words:
#: torch's CPU allocator ("can't allocate memory"), oneDNN when it cannot allocate a
#: convolution's workspace, and safetensors' mapping of a file ("Cannot allocate memory").
_OUT_OF_MEMORY = (
    "can't allocate memory",
    "cannot allocate memory",
    "out of memory",
    "could not create a primitive",
)


@contextmanager
def device_memory(what: str, device: torch.device | str) -> Iterator[None]:
    """Turns running out of memory on `device` (or of pinned host memory for it) into
    OverLimit (RESOURCE_EXHAUSTED, reason OUT_OF_MEMORY): the caller's to retry with less."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as err:
        torch.cuda.empty_cache()
        raise OverLimit(
            f"{what}: out of memory on {device}: {err}".split("\n")[0], reason="OUT_OF_MEMORY"
        ) from err
    except RuntimeError as err:
        if out_of_memory(err):
            raise OverLimit(f"{what}: out of memory on {device}", reason="OUT_OF_MEMORY") from err
        raise


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` says that memory ran out: a MemoryError (Python's, numpy's), or a
    RuntimeError that says so in words."""
    if isinstance(error, MemoryError):
        return True
    text = str(error).lower()
    return any(sign in text for sign in _OUT_OF_MEMORY)


def shown(value: str, limit: int = 64) -> str:
    """`value` as an error message quotes it: repr, cut to `limit` characters. A caller's
    metadata value can be kilobytes long, and an error that echoed it whole would push the
    reply's trailers past gRPC's 8 KiB limit: the caller would get a transport error."""
    return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value)} characters)"


#: CUDA's words for the errors that poison a process's context ("sticky" errors: every later
#: CUDA call fails too), as torch raises them (torch.AcceleratorError, a RuntimeError). Other
#: CUDA errors (an invalid launch configuration, out of memory) leave the device usable.
_DEVICE_LOST = (
    "device-side assert",
    "illegal memory access",
    "unspecified launch failure",
    "illegal instruction",
    "misaligned address",
    "uncorrectable ECC error",
)


#: The exception torch raises for a CUDA error (a RuntimeError; torch 2.8 on), else None.
_ACCELERATOR_ERROR: type[BaseException] | None = getattr(torch, "AcceleratorError", None)


def device_lost(error: BaseException) -> bool:
    """Whether `error` is one the device does not recover from: after a device-side assert or
    an illegal memory access every later CUDA call in the process fails the same way. Said
    in CUDA's words by torch's own error for it, or by any RuntimeError once this process
    has used CUDA (a model's code may wrap torch's): the words alone, raised by a model on a
    CPU server, stopped it, its health NOT_SERVING (a review of the error catalogue)."""
    if not isinstance(error, RuntimeError) or out_of_memory(error):  # OOM passes
        return False
    text = str(error)
    if not any(sign in text for sign in _DEVICE_LOST):
        return False
    torch_s = _ACCELERATOR_ERROR is not None and isinstance(error, _ACCELERATOR_ERROR)
    return torch_s or torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
