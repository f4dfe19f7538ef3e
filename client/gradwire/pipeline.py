"""Calls written without waiting for their answers: `with client.pipeline() as p:`.

Each call made on a pipeline is written to the server at once, on a Calls stream, and
returns a Pending; its answer is read when asked for (`Pending.result()`) or when the block
ends. The server runs the calls one after another in the order they were made, each
through its unary call's own path, as if made one by one: the client waits for their
answers once instead of once each. Over a network with a round trip of R, n calls take
about one R instead of n; on loopback the tutorial's five calls take about 1 ms less.

By default a pipeline stops at the first call the server fails, as a script would: each
call after the first is sent to run only if the one before it succeeded (CallRequest
.if_previous_succeeded), and otherwise fails with errors.Aborted (reason PREVIOUS_FAILED),
not run. The block raises the first failure whose result was not asked for (not a call
skipped for it).
"""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, cast, overload

import grpc
import numpy as np

from gradwire import calls, codec, unary, wire
from gradwire.call_stream import (
    CallStream,
    MessageError,
    Spent,
    _deadline_timeout,
    garbled_answer,
    unknown_on_stream,
)
from gradwire.errors import (
    Aborted,
    Cancelled,
    ClientClosed,
    GradwireError,
    InvalidArgument,
    RemoteError,
    Unimplemented,
)
from gradwire.failures import closed_channel
from gradwire.limits import MAX_VALUE_BYTES, Real, Whole

if TYPE_CHECKING:
    import torch
    from typing_extensions import Unpack

    from gradwire.client import Client
    from gradwire.results import (
        ForwardResult,
        Listing,
        LoadedCheckpoint,
        OptimizerConfig,
        SavedCheckpoint,
        StepResult,
        TensorRead,
        TrainStepResult,
    )
    from gradwire.updates import TensorStats

__all__ = ["Batch", "Pending", "Pipeline"]

T = TypeVar("T")
_PREVIOUS_FAILED = "PREVIOUS_FAILED"


class Pending(Generic[T]):
    """The answer to a call made on a pipeline, to come: `result()`."""

    def __init__(self, pipeline: Pipeline, encoded: unary.Encoded[T]) -> None:
        self._pipeline = pipeline
        self._encoded = encoded
        self._done = False
        self._value: Any = None
        self._error: BaseException | None = None
        self._seen = False  # whether its caller asked for its result or error

    @property
    def method(self) -> str:
        """The RPC this call is: "Forward", "Step", "GetTensor", ..."""
        return self._encoded.method

    def done(self) -> bool:
        """Whether the answer is here: `result()` will not wait."""
        return self._done

    def result(self) -> T:
        """The call's result, as the client's method of the same name returns it, waiting
        for the answers before it and its own; or the exception that method would have
        raised."""
        error = self.exception()
        if error is not None:
            try:
                raise error
            finally:
                # The traceback holds this frame: no cycle through the local, which would
                # keep the frames above alive until the cyclic collector ran (as
                # concurrent.futures does; see Client._call).
                del error
        return cast(T, self._value)

    def exception(self) -> BaseException | None:
        """The call's exception, waiting for it as `result()` does; None if it succeeded."""
        if not self._done:
            self._pipeline._receive_through(self)
        self._seen = True
        return self._error

    def _succeed(self, value: Any) -> None:
        self._value, self._done = value, True

    def _fail(self, error: BaseException) -> None:
        self._error, self._done = error, True

    def __repr__(self) -> str:
        state = "pending" if not self._done else "failed" if self._error else "done"
        return f"<Pending {self.method} {state}>"


class Pipeline:
    """Calls on one session (the client's), written without waiting for their answers; see
    the module's docstring. Made by `Client.pipeline()`; use it in a `with` block, from one
    thread. At the block's end every answer has been read. Calls made on the client itself
    inside the block go as calls of their own, at once, not in the pipeline's order.

    It carries every call on a session that the Calls stream carries: forward, train_step,
    backward, step, zero_grad, read, get, set, stats, fill_parameters, list_tensors, reset,
    set_optimizer, save_checkpoint, load_checkpoint and delete_checkpoint, with the client's
    arguments; each returns a Pending of what the client's method returns. A forward's
    input or a set's value larger than the client's `stream_above_bytes` is refused
    (ValueError): it goes in chunks, as a call of its own;
    a read of a tensor too large for one message fails ResourceExhausted (USE_STREAM): read
    it with the client. Calls on a pipeline's stream are not retried: a stream lost under
    way fails each call not yet answered (a change among them may have been applied:
    `changes_state`), and so does an interrupt (KeyboardInterrupt) while waiting, which
    cancels the stream. The calls stop at the first the server fails; a failure in reading
    an answer (an `out=` array of the wrong shape) comes after the calls behind it were
    sent, and stops none of them. A server without the Calls RPC gets each call as a call
    of its own, at once, retried as the client's calls are.
    """

    def __init__(self, client: Client, *, stop_at_error: bool = True) -> None:
        self._client = client
        self._stop_at_error = unary.flag(stop_at_error, "stop_at_error")
        self._stream: CallStream | None = None
        self._own = False  # a stream opened for this pipeline alone, ended with it
        self._state = "new"  # then "open", then "ended"
        self._made: list[Pending[Any]] = []
        self._unanswered: collections.deque[Pending[Any]] = collections.deque()
        self._sent = 0
        #: Once the stream has ended under the pipeline: the error of each call unanswered,
        #: by its RPC's name.
        self._broken: Callable[[str], RemoteError | ClientClosed] | None = None
        self._failed: str | None = None  # a call run unary that failed: the RPC's name

    def __enter__(self) -> Pipeline:
        if self._state != "new":
            raise RuntimeError("a pipeline is used once, in one with block")
        client = self._client
        if client._instance is None:  # before the calls that read the versions expected
            client._know_instance("Calls", None)
        # The client's Calls stream (opened now if it has none, and kept), unless another
        # thread's call is on it: then one for this block alone. Opening a stream costs
        # 3-4 ms on a 2-vCPU loopback (the tutorial's five calls take about 7).
        shared = client._call_stream()
        if shared is not None:
            if shared.lock.acquire(blocking=False):
                self._stream = shared
            else:
                self._stream, self._own = client._open_call_stream(), True
        self._state = "open"
        return self

    def __exit__(self, kind: object, error: object, traceback: object) -> None:
        interrupted = isinstance(kind, type) and not issubclass(kind, Exception)
        try:
            # The answers are read, in order, even after an exception in the block, so that
            # the stream stays usable; not after an interrupt (KeyboardInterrupt, ...),
            # which should not wait: the stream is cancelled instead.
            while self._unanswered and not interrupted:
                self._receive_next()
        finally:
            self._end(in_order=not self._unanswered and self._broken is None)
        if kind is None:
            self._raise_first_unseen_failure()

    def _raise_first_unseen_failure(self) -> None:
        """Raises `_first_unseen_failure`, if there is one."""
        failure = self._first_unseen_failure()
        if failure is not None:
            try:
                raise failure
            finally:
                del failure  # no cycle through this frame (see Pending.result)

    def _first_unseen_failure(self) -> BaseException | None:
        """The first call's failure its caller has not looked at, now seen; calls skipped
        for a failure before them aside."""
        for pending in self._made:
            failure = pending._error
            if failure is not None and not pending._seen and not _skipped(failure):
                pending._seen = True
                return failure
        return None

    def _end(self, in_order: bool) -> None:
        self._state = "ended"
        stream, self._stream = self._stream, None
        if stream is None:
            return
        if not in_order:  # answers left unread, or a wait interrupted: its order is lost
            stream.cancel()
            interrupted = _interrupted("the pipeline ended with answers unread")
            while self._unanswered:
                pending = self._unanswered.popleft()
                pending._fail(interrupted(pending.method))
        if self._own:  # every answer read (or the stream cancelled): no wait for its end
            stream.close(wait=None)
        else:
            stream.lock.release()

    # --- the calls ----------------------------------------------------------------------

    def forward(
        self, input: Any, target: Any = None, *, eval_mode: bool = False
    ) -> Pending[ForwardResult]:
        """As Client.forward."""
        self._fits(input, "forward's input")
        return self._add(self._client._forward(input, target, eval_mode))

    # What it fetches follows as_torch, as in Client.train_step.
    @overload
    def train_step(
        self,
        input: Any,
        target: Any,
        *,
        zero_grad: bool = True,
        fetch: Iterable[str] = (),
        as_torch: Literal[False] = False,
    ) -> Pending[TrainStepResult[np.ndarray[Any, Any] | None]]: ...

    @overload
    def train_step(
        self,
        input: Any,
        target: Any,
        *,
        zero_grad: bool = True,
        fetch: Iterable[str] = (),
        as_torch: Literal[True],
    ) -> Pending[TrainStepResult[torch.Tensor | None]]: ...

    @overload
    def train_step(
        self,
        input: Any,
        target: Any,
        *,
        zero_grad: bool = True,
        fetch: Iterable[str] = (),
        as_torch: bool,
    ) -> Pending[TrainStepResult[np.ndarray[Any, Any] | torch.Tensor | None]]: ...

    def train_step(
        self,
        input: Any,
        target: Any,
        *,
        zero_grad: bool = True,
        fetch: Iterable[str] = (),
        as_torch: bool = False,
    ) -> Pending[TrainStepResult[Any]]:
        """As Client.train_step: in one message, whatever `stream_above_bytes` says (a
        TrainStep has no streamed form), and refused past one, as the client refuses it.
        It was refused past stream_above_bytes, said to go in chunks, which it does not on
        the client either (found by a review of the client's API as a researcher uses it)."""
        encoded = self._client._train_step(input, target, zero_grad, fetch, as_torch)
        assert isinstance(encoded.request, list)  # its input's values spliced in
        unary.fits_one_message("TrainStep", encoded.request)
        return self._add(encoded)

    def backward(self, *, retain_graph: bool = False) -> Pending[int]:
        """As Client.backward."""
        return self._add(unary.backward(retain_graph))

    def step(self) -> Pending[StepResult]:
        """As Client.step."""
        return self._add(unary.STEP)

    def zero_grad(self, *, set_to_none: bool = True) -> Pending[int]:
        """As Client.zero_grad."""
        return self._add(unary.zero_grad(set_to_none))

    # A read's value follows as_torch, as in Client.read.
    @overload
    def read(
        self,
        selector: str,
        index: codec.IndexKey | None = None,
        *,
        as_torch: Literal[False] = False,
        values: bool = True,
        out: np.ndarray[Any, Any] | None = None,
    ) -> Pending[TensorRead[np.ndarray[Any, Any] | None]]: ...

    @overload
    def read(
        self,
        selector: str,
        index: codec.IndexKey | None = None,
        *,
        as_torch: Literal[True],
        values: bool = True,
        out: np.ndarray[Any, Any] | None = None,
    ) -> Pending[TensorRead[torch.Tensor | None]]: ...

    @overload
    def read(
        self,
        selector: str,
        index: codec.IndexKey | None = None,
        *,
        as_torch: bool,
        values: bool = True,
        out: np.ndarray[Any, Any] | None = None,
    ) -> Pending[TensorRead[np.ndarray[Any, Any] | torch.Tensor | None]]: ...

    def read(
        self,
        selector: str,
        index: codec.IndexKey | None = None,
        *,
        as_torch: bool = False,
        values: bool = True,
        out: np.ndarray[Any, Any] | None = None,
    ) -> Pending[TensorRead[Any]]:
        """As Client.read, without `progress` (a value in one message has no way to go to
        report); `out` is written when the answer is read."""
        request = unary.read_request_bytes(selector, index, values)
        return self._add(self._client._get_tensor(request, as_torch, values, out))

    @overload
    def get(
        self,
        selector: str,
        index: codec.IndexKey | None = None,
        *,
        as_torch: Literal[False] = False,
        out: np.ndarray[Any, Any] | None = None,
    ) -> Pending[np.ndarray[Any, Any] | None]: ...

    @overload
    def get(
        self,
        selector: str,
        index: codec.IndexKey | None = None,
        *,
        as_torch: Literal[True],
        out: np.ndarray[Any, Any] | None = None,
    ) -> Pending[torch.Tensor | None]: ...

    @overload
    def get(
        self,
        selector: str,
        index: codec.IndexKey | None = None,
        *,
        as_torch: bool,
        out: np.ndarray[Any, Any] | None = None,
    ) -> Pending[np.ndarray[Any, Any] | torch.Tensor | None]: ...

    def get(
        self,
        selector: str,
        index: codec.IndexKey | None = None,
        *,
        as_torch: bool = False,
        out: np.ndarray[Any, Any] | None = None,
    ) -> Pending[Any]:  # Pending is invariant: each overload's type is this one's
        """As Client.get, without `progress`: an array, or with as_torch=True a tensor (None
        when absent)."""
        request = unary.read_request_bytes(selector, index, True)
        read = self._client._get_tensor(request, as_torch, True, out).result
        value: Callable[[Any], Any] = lambda data: read(data).value  # noqa: E731
        return self._add(unary.Encoded("GetTensor", request, value))

    def set(self, selector: str, value: Any, index: codec.IndexKey | None = None) -> Pending[int]:
        """As Client.set, without `progress`."""
        self._fits(value, "set's value")
        return self._add(unary.set_tensor(*unary.set_target(selector, index), value))

    def stats(
        self,
        selector: str,
        *,
        bins: Whole = 0,
        low: Real | None = None,
        high: Real | None = None,
    ) -> Pending[TensorStats]:
        """As Client.stats."""
        return self._add(unary.get_stats(selector, bins, low, high))

    def fill_parameters(self, value: Real, names: Iterable[str] = ()) -> Pending[int]:
        """As Client.fill_parameters."""
        return self._add(unary.fill_parameters(value, names))

    def list_tensors(self) -> Pending[Listing]:
        """As Client.list_tensors."""
        return self._add(unary.LIST_TENSORS)

    def reset(self, seed: Whole | None = None) -> Pending[int]:
        """As Client.reset."""
        return self._add(unary.reset(seed))

    def set_optimizer(
        self,
        kind: Literal["sgd", "adam"] | None = None,
        *,
        keep_state: bool = False,
        **settings: Unpack[unary.OptimizerSettings],
    ) -> Pending[OptimizerConfig]:
        """As Client.set_optimizer (the same keyword settings: lr, momentum, ...)."""
        encoded = unary.set_optimizer(kind, settings, keep_state)
        self._client._needs_keep_state(keep_state)
        made = encoded.result
        return self._add(unary.Encoded("SetOptimizer", encoded.request, lambda r: made(r)[1]))

    def save_checkpoint(self, name: str = "") -> Pending[SavedCheckpoint]:
        """As Client.save_checkpoint."""
        return self._add(unary.save_checkpoint(name))

    def load_checkpoint(self, name: str = "") -> Pending[LoadedCheckpoint]:
        """As Client.load_checkpoint."""
        return self._add(unary.load_checkpoint(name))

    def delete_checkpoint(self, name: str) -> Pending[int]:
        """As Client.delete_checkpoint. A server older than DeleteCheckpoint's place on the
        Calls stream and in a Batch (one of 2026-12-01 to 12-04) fails it, not run:
        errors.Unimplemented, reason CALL_NOT_KNOWN (metadata "call")."""
        return self._add(unary.delete_checkpoint(name))

    # --- plumbing -----------------------------------------------------------------------

    #: What the error messages call it, and the client's method that makes one.
    _KIND = "pipeline"

    def _fits(self, value: Any, what: str) -> None:
        limit = self._client.stream_above_bytes
        if unary.nbytes(value) > limit:
            raise ValueError(
                f"{what} is {unary.nbytes(value):,} bytes, more than stream_above_bytes "
                f"({limit:,}): it goes in chunks, as a stream of its own, which a {self._KIND} "
                f"does not carry; make that call on the client, outside the {self._KIND}"
            )

    def _open(self, encoded: unary.Encoded[T]) -> Pending[T]:
        """A Pending for a call made in the block, kept among the calls made; RuntimeError
        outside the block."""
        if self._state != "open":
            raise RuntimeError(
                f"a {self._KIND} takes calls inside its with block: "
                f"`with client.{self._KIND}() as p: p.step()`"
            )
        pending = Pending(self, encoded)
        self._made.append(pending)
        return pending

    def _add(self, encoded: unary.Encoded[T]) -> Pending[T]:
        """Sends a call (or, on a server without Calls, makes it now)."""
        pending = self._open(encoded)
        if self._stream is None:
            self._run_now(pending)
            return pending
        method = encoded.method
        request_id, expected = self._client._once(method)
        request = encoded.request
        pieces = request if isinstance(request, list) else [unary.serialize(request)]
        after = self._stop_at_error and self._sent > 0
        try:
            self._stream.send(
                method,
                pieces,
                request_id,
                expected,
                self._client.timeout,
                if_previous_succeeded=after,
            )
        except Spent:
            pending._fail(self._unsent(method))
            return pending
        self._sent += 1
        self._unanswered.append(pending)
        return pending

    def _unsent(self, method: str) -> GradwireError:
        """The error of a call not sent because the stream had ended: the error that ended
        it, or the client's closing; the call was not applied."""
        if self._broken is None:
            return ClientClosed(f"{method} not sent: the client closed the pipeline's stream")
        error = self._broken(method)
        if isinstance(error, RemoteError):
            error.message = f"{method} not sent, the stream having ended: {error.message}"
            error.args = (error.message,)
        error.changes_state = False
        return error

    def _run_now(self, pending: Pending[Any]) -> None:
        """A call made as a call of its own (the server has no Calls), stopping after a
        failure as the server would."""
        method = pending.method
        if self._stop_at_error and self._failed is not None:
            pending._fail(_not_run(method, self._failed, self._KIND))
            self._failed = method
            return
        try:
            pending._succeed(self._client._run(pending._encoded))
        except (GradwireError, ValueError) as err:
            pending._fail(err)
            self._note_failure(method, err)
        else:
            self._failed = None

    def _note_failure(self, method: str, error: BaseException) -> None:
        """Notes that `method` failed with `error` where the client, not the server, decides
        what runs after it (calls of their own; a batch run as a pipeline): that stops the
        calls after it only if the server refused it. As on a stream, where the server knows
        only of its own failures, one in reading its answer (an out= of the wrong shape)
        stops nothing."""
        self._failed = method if isinstance(error, RemoteError) else None

    def _receive_through(self, pending: Pending[Any]) -> None:
        while not pending._done:
            if not self._unanswered:  # pragma: no cover - every pending is queued or done
                raise AssertionError(f"{pending!r} is neither answered nor waited for")
            self._receive_next()

    def _receive_next(self) -> None:
        """Reads the answer to the oldest call unanswered."""
        pending = self._unanswered.popleft()
        method = pending.method
        stream = self._stream
        assert stream is not None  # calls wait for answers only on a stream
        if self._broken is not None:
            pending._fail(self._broken(method))
            return
        try:
            payload = stream.receive(method, self._client.timeout)
        except grpc.RpcError as err:
            if stream.refused(err):
                self._without_calls(pending)  # the server has no Calls: nothing ran
                return
            if stream.spent:  # the stream itself ended: every call after this one too
                self._broken = functools.partial(self._error, err)
            self._failed_with(pending, err)
            return
        except BaseException:  # interrupted while waiting: the stream is cancelled (receive)
            self._broken = _interrupted("the wait for its answer or an earlier one was interrupted")
            pending._fail(self._broken(method))
            raise
        self._client.answered = self._client.reached = True
        try:
            value = unary.decoded(method, payload)
        except ValueError as err:  # as a garbled answer (receive): the stream is not trusted
            stream.cancel()
            garbled = garbled_answer(err)
            self._broken = functools.partial(self._error, garbled)
            self._failed_with(pending, garbled)
            return
        self._answered(pending, value)

    def _failed_with(self, pending: Pending[Any], err: grpc.RpcError) -> None:
        """Fails `pending` with what its call's `err` is to the client, which an
        INVALID_ARGUMENT's call may add to (the dtype a value was widened from)."""
        if unknown_on_stream(err):
            pending._fail(self._unknown_call(pending.method))
            return
        pending._fail(self._error(err, pending.method))
        if isinstance(pending._error, InvalidArgument) and pending._encoded.on_invalid:
            pending._encoded.on_invalid(pending._error)

    def _unknown_call(self, method: str) -> Unimplemented:
        """The error of a call that a server older than its place on the Calls stream and in
        a Batch refused there, not run: INVALID_ARGUMENT "the CallRequest names no call this
        server knows: set one of its call fields", of a call that had set one (a pipeline's
        DeleteCheckpoint on a server of 2026-12-03: a review of clients and servers of
        different versions). The client's own method sends it as a call of its own."""
        _, call = calls.METHODS[method]  # the CallRequest field, named as the client's method
        return Unimplemented(
            f"the server at {self._client.target} predates {method} in a {self._KIND} (on its "
            f"Calls stream and in a Batch), and did not run it: make it as a call of its own, "
            f"client.{call}(...), outside the {self._KIND}; a server that has the {method} "
            f"RPC runs it, an older one answers UNIMPLEMENTED",
            reason="CALL_NOT_KNOWN",
            metadata={"call": method},
        )

    def _answered(self, pending: Pending[Any], value: Any) -> None:
        """Settles `pending` with its call's response (`client.decoded`), as the client's
        method reads it; or with the error of an answer this client cannot read."""
        try:
            pending._succeed(pending._encoded.result(value))
        except (GradwireError, ValueError) as err:
            pending._fail(err)

    def _error(
        self, err: grpc.RpcError, method: str, timeout: float | None = -1.0
    ) -> RemoteError | ClientClosed:
        """The exception for a call sent that failed with `err`, as the client raises it.
        `timeout`: the deadline it had, named by a DEADLINE_EXCEEDED of gRPC's words alone
        (the client's timeout unless given): a large read in a pipeline over a slow link
        said "Deadline Exceeded" alone (found by a review of a researcher on a slow,
        distant link)."""
        if timeout is not None and timeout < 0:
            timeout = _deadline_timeout(self._client.timeout)
        return self._client._error_of(err, method, method in unary.MAY_LAND, timeout)

    def _without_calls(self, first: Pending[Any]) -> None:
        """The server refused the Calls stream before running anything: its calls, and the
        rest, go as calls of their own."""
        self._client._no_calls = True
        stream, self._stream = self._stream, None
        assert stream is not None
        if self._own:
            stream.close(wait=None)
        else:
            stream.lock.release()
        self._own = False
        waiting = [first, *self._unanswered]
        self._unanswered.clear()
        for pending in waiting:
            self._run_now(pending)


class Batch(Pipeline):
    """Calls on one session (the client's) sent together in one unary call, the Batch RPC:
    `with client.batch() as b:`. Made by `Client.batch()`; use it in a `with` block, from
    one thread. It carries the calls a Pipeline carries, with the same methods, each
    returning a Pending; the server runs them one after another, in order, and answers them
    all at once. The calls made so far are sent when the block ends, or when a result is
    asked for inside it (`Pending.result()`, which then waits for them all): the calls made
    after that go in a batch of their own, when it ends or the next result is asked for.
    A block that raises still sends the calls it made, as a pipeline's would have been
    made already, then raises its exception: a batch is no transaction (a Ctrl-C, or
    another interrupt, sends nothing more).

    Where a pipeline writes each call on a Calls stream as it is made, a batch sends its
    calls in one message and gets one back: the server takes and answers one message for
    all, which on a small machine costs less than a message each (the tutorial's five calls
    took about four fifths of a pipeline's time on 2 vCPUs: docs/PERFORMANCE.md), and it
    needs no stream (a proxy that carries unary calls only). A pipeline's calls start while
    the block still makes the next; a batch's wait for the block's end.

    `stop_at_error`, as a pipeline's: a call whose predecessor failed is not run (the first
    of a later batch included), and the block raises the first failure not looked at. At
    most `limits.MAX_BATCH_CALLS` calls go in one batch, and at most one message of
    requests: more are sent in several. A server that takes fewer calls in a batch refuses
    a longer one before running any of it (BATCH_TOO_LONG, naming its limit): its calls are
    then sent again in batches of that many, as are the client's later batches. The answers
    of one batch must fit in one message too: a call whose answer does not is answered
    errors.ResourceExhausted (BATCH_ANSWERS_TOO_LARGE), having run (its `metadata["applied"]`
    is "true" when a change it made stays applied), so read large tensors outside a batch.
    Each call's deadline is the client's timeout, and the batch's the client's timeout
    times its number of calls. A batch is not retried: if its call fails
    as a whole (the server unreachable, its deadline passed), each call in it fails with
    that error, and a change among them may have been applied (`changes_state`); their
    request ids make sending them again safe. A server without the Batch RPC gets a batch's
    calls in a pipeline (and, without the Calls RPC too, each as a call of its own, retried
    as the client's calls are).
    """

    _KIND = "batch"

    def __init__(self, client: Client, *, stop_at_error: bool = True) -> None:
        super().__init__(client, stop_at_error=stop_at_error)
        #: The calls made and not sent yet, each with its CallRequest's pieces, and their bytes.
        self._queued: list[tuple[Pending[Any], list[wire.Piece]]] = []
        self._queued_bytes = 0

    def __enter__(self) -> Batch:
        if self._state != "new":
            raise RuntimeError("a batch is used once, in one with block")
        if self._client._instance is None:  # before the calls that read the versions expected
            self._client._know_instance("Batch", None)
        self._state = "open"
        return self

    def __exit__(self, kind: object, error: object, traceback: object) -> None:
        interrupted = isinstance(kind, type) and not issubclass(kind, Exception)
        try:
            # Sent even after an exception in the block, as a pipeline's calls would have
            # been; not after an interrupt (KeyboardInterrupt, ...), which should not wait.
            if not interrupted:
                self._send()
        finally:
            self._state = "ended"
            for pending, _ in self._queued:
                pending._fail(ClientClosed(f"{pending.method} not sent: the batch was interrupted"))
            self._queued.clear()
        if kind is None:
            self._raise_first_unseen_failure()

    def _add(self, encoded: unary.Encoded[T]) -> Pending[T]:
        """Queues a call."""
        pending = self._open(encoded)
        client = self._client
        request = encoded.request
        body = request if isinstance(request, list) else [unary.serialize(request)]
        # Its CallRequest's bytes, within a little: the header adds at most 64, and the
        # field that holds it in the BatchRequest 16.
        size = wire.size(body) + 80
        if self._queued and (
            len(self._queued) >= client._batch_calls or self._queued_bytes + size > MAX_VALUE_BYTES
        ):
            self._send()  # a full batch goes now; this call begins the next
        method = encoded.method
        request_id, expected = client._once(method)
        timeout = _deadline_timeout(client.timeout)
        pieces = calls.request_pieces(
            method,
            body,
            request_id,
            expected,
            0 if timeout is None else max(math.ceil(timeout * 1000), 1),
            # The first call of a batch has no call before it on the server: one of an
            # earlier batch that failed is seen to here (_send).
            if_previous_succeeded=self._stop_at_error and bool(self._queued),
        )
        self._queued.append((pending, pieces))
        self._queued_bytes += size
        return pending

    def _receive_through(self, pending: Pending[Any]) -> None:
        if not pending._done:
            self._send()
        if not pending._done:  # pragma: no cover - every pending is queued or done
            raise AssertionError(f"{pending!r} is neither answered nor queued")

    def _send(self) -> None:
        """Sends the calls queued, in as many Batch calls as the server's limit asks (one
        unless a server keeps a smaller limit than the client's), and reads their answers.
        The calls not sent yet stay queued, so that an interrupt fails them as not sent."""
        try:
            while self._queued:
                most = self._client._batch_calls
                queued, self._queued = self._queued[:most], self._queued[most:]
                self._send_batch(queued)
        finally:  # what is left after an exception is still counted against one message
            self._queued_bytes = sum(wire.size(pieces) + 16 for _, pieces in self._queued)

    def _send_batch(self, queued: list[tuple[Pending[Any], list[wire.Piece]]]) -> None:
        """Sends `queued` in one Batch call, and reads their answers."""
        if self._stop_at_error and self._failed is not None:
            # The call before this batch's first failed: none of them runs, as on a stream.
            for pending, _ in queued:
                pending._fail(_not_run(pending.method, self._failed, self._KIND))
                self._failed = pending.method
            return
        client = self._client
        if client._no_batch:
            self._in_a_pipeline(queued)
            return
        timeout = _deadline_timeout(client.timeout)
        try:
            metadata = [*client._metadata, *client._session_metadata("Batch")]
        except ClientClosed as err:  # the client's session is closed: nothing is sent
            for pending, _ in queued:
                pending._fail(ClientClosed(f"{pending.method} not sent: {err}"))
            return
        batch_timeout = None if timeout is None else timeout * len(queued)
        try:
            response = client._methods["Batch"](
                wire.join(calls.batch_request_pieces([pieces for _, pieces in queued])),
                timeout=batch_timeout,
                metadata=metadata,
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:  # a server from before Batch
                client._no_batch = True
                self._in_a_pipeline(queued)
                return
            most = _batch_limit(self._error(err, "Batch"), len(queued))
            if most is not None:  # a server that takes fewer: none ran; _send sends them again
                client._batch_calls = min(client._batch_calls, most)
                self._queued[:0] = queued
                return
            for pending, _ in queued:
                pending._fail(self._error(err, pending.method, batch_timeout))
            self._failed = queued[-1][0].method
            return
        except ValueError as err:  # the client's channel is closed: nothing is sent
            for pending, _ in queued:
                pending._fail(closed_channel(err))
            return
        except BaseException:  # interrupted while waiting: whether they ran is not known
            interrupted = _interrupted(
                "the wait for its batch's answers was interrupted", "the batch was abandoned"
            )
            for pending, _ in queued:
                pending._fail(interrupted(pending.method))
            raise
        client.answered = client.reached = True
        try:
            answers = calls.batch_answers(response)
            if len(answers) != len(queued):
                raise ValueError(f"{len(answers)} answers came for {len(queued)} calls")
            # Every answer read before any is taken: with one out of order, or not an answer,
            # none can be trusted (an error answer names no call, so the one before a
            # misplaced answer may be another call's too; read in turn, an answer after it
            # was taken as the next call's success: found by reviews).
            unwrapped = [
                calls.unwrap_response(answer, pending.method)
                for (pending, _), answer in zip(queued, answers, strict=True)
            ]
            values = [
                None if payload is None else unary.decoded(pending.method, payload)
                for (pending, _), (payload, _) in zip(queued, unwrapped, strict=True)
            ]
        except ValueError as err:  # a server bug: which calls ran is not known
            garbled = garbled_answer(err, "Batch answer", "the batch's calls")
            for pending, _ in queued:
                pending._fail(self._error(garbled, pending.method))
            self._failed = queued[-1][0].method
            return
        for (pending, _), (_, status), value in zip(queued, unwrapped, values, strict=True):
            self._answer(pending, value, status)

    def _in_a_pipeline(self, queued: list[tuple[Pending[Any], list[wire.Piece]]]) -> None:
        """The calls of a batch for a server without the Batch RPC (none of them ran): in a
        pipeline on the client's Calls stream, one round trip for all as a batch would be
        (on a server without Calls too, one by one), stopping at a failure as the batch
        would have; their results and errors are the batch's."""
        pipeline = Pipeline(self._client, stop_at_error=self._stop_at_error)
        made: list[Pending[Any]] = []
        try:
            with pipeline:
                for pending, _ in queued:
                    made.append(pipeline._add(pending._encoded))
                    made[-1]._seen = True  # handed on below: the block raises none
        finally:  # an interrupt included: the pipeline has answered or failed what it sent
            for k, (pending, _) in enumerate(queued):
                theirs = made[k] if k < len(made) else None
                if theirs is None or not theirs._done:
                    pending._fail(ClientClosed(f"{pending.method} not sent: interrupted"))
                elif theirs._error is not None:
                    pending._fail(theirs._error)
                    self._note_failure(pending.method, theirs._error)
                else:
                    pending._succeed(theirs._value)
                    self._failed = None

    def _answer(self, pending: Pending[Any], value: Any, status: bytes | None) -> None:
        """Reads one call's answer into its Pending: its error status, or else its response
        (`client.decoded`)."""
        if status is not None:
            self._failed_with(pending, MessageError.from_status(status))
            self._failed = pending.method
            return
        self._failed = None
        self._answered(pending, value)


def _batch_limit(error: BaseException, sent: int) -> int | None:
    """The calls a server takes in one Batch, if `error` is its refusal of `sent` calls as
    too many (BATCH_TOO_LONG, which runs none of them), naming a smaller limit it keeps.
    Anything else a server may say in its place (no limit, one of thousands of digits,
    not smaller) is None: the batch's calls then fail with the refusal."""
    if not isinstance(error, InvalidArgument) or error.reason != "BATCH_TOO_LONG":
        return None
    most = error.metadata.get("limit", "")
    if not (most.isascii() and most.isdigit() and len(most) <= 10):
        return None
    return int(most) if 0 < int(most) < sent else None


def _not_run(method: str, failed: str, kind: str = "pipeline") -> Aborted:
    """A call not run for the failure of the one before it, as the server says it."""
    error = Aborted(
        f"{method} not run: the call before it in this {kind}, {failed}, did not succeed, "
        f"and this one was to run only after a success; nothing was changed",
        reason=_PREVIOUS_FAILED,
        metadata={"previous": failed},
    )
    error.changes_state = method in unary.MAY_LAND  # as RemoteError has it: the kind of call
    return error


def _interrupted(
    why: str, then: str = "the pipeline's stream was cancelled"
) -> Callable[[str], RemoteError]:
    """The error of each call sent whose answer will not be read (`then`: what became of
    its stream or call), so whether it ran is not known."""

    def error(method: str) -> RemoteError:
        cancelled = Cancelled(
            f"{method} not answered: {why}, and {then}; whether the call ran is not known "
            f"(read the state version)"
        )
        cancelled.changes_state = method in unary.MAY_LAND
        return cancelled

    return error


def _skipped(error: BaseException) -> bool:
    """Whether `error` is a call not run because the one before it failed."""
    return isinstance(error, Aborted) and error.reason == _PREVIOUS_FAILED
