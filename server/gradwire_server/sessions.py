"""Sessions: models of the callers' own, so that two services never share gradients by accident.

The default session (no id) is the server's own trainer, for the tutorial's simple flow. Other
sessions are opened by id, limited in number, and closed after a time without calls: a call
in progress (an open Watch, a long Train) is use, however long it lasts.
"""

from __future__ import annotations

import gc
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from gradwire_server import host_memory, pass_memory
from gradwire_server.errors import InvalidInput, OverLimit, Stopping, UnknownTensor, shown
from gradwire_server.logs import CURRENT_CALL
from gradwire_server.optimizers import OptimizerSettings
from gradwire_server.trainer import Trainer

log = logging.getLogger(__name__)

DEFAULT_MAX_SESSIONS = 8
DEFAULT_IDLE_S = 600.0


class UnknownSession(UnknownTensor):
    """No session of that id (never opened, closed, or expired): NOT_FOUND."""

    reason = "UNKNOWN_SESSION"


@dataclass
class _Session:
    trainer: Trainer
    last_used: float
    #: Calls in progress on the session (`get(..., hold=True)` until `leave`).
    held: int = 0
    opened: float = 0.0


@dataclass(frozen=True)
class SessionView:
    """One open session, as ListSessions shows it."""

    session: str
    version: int
    open_s: float
    idle_s: float  # 0 while a call is in progress
    calls_in_progress: int


class Sessions:
    """The default trainer and the sessions opened beside it."""

    def __init__(
        self,
        default: Trainer,
        *,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        idle_s: float = DEFAULT_IDLE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not idle_s > 0:  # 0 closed every session as it opened; NaN never compares
            raise ValueError(
                f"a session's idle time must be more than 0 seconds (math.inf: never), "
                f"got {idle_s!r}"
            )
        self.default = default
        self.max_sessions = max_sessions
        self.idle_s = idle_s
        self._clock = clock
        self._started = clock()  # with the server: a restart loses every session (_lost)
        # Reentrant: a call's hold is let go (`leave`) when its handler ends, which for a
        # stream may be when the collector finalizes its generator, at any allocation, this
        # lock held or not.
        self._lock = threading.RLock()
        self._open: dict[str, _Session] = {}
        self._opening = 0  # sessions being built: places taken, not yet in _open
        self._stop_expiry = threading.Event()  # set by close_all: no session opens after it
        #: Called with each session's id once it has closed (CloseSession, or expired), for
        #: what still acts on it between calls (a Calls stream) to end.
        self.on_close: Callable[[str], None] | None = None

    def expire_in_background(self) -> None:
        """Closes idle sessions on a thread of its own, as they expire. Without it only the
        calls that name a session, and OpenSession, look for idle ones: a server whose
        callers all use the default session kept an abandoned session's model (on a GPU,
        its device memory) for as long as it ran. `close_all` stops it."""

        def expire() -> None:
            while not self._stop_expiry.wait(_expiry_interval(self.idle_s)):
                try:
                    self._close_idle()
                except Exception:  # a model whose close fails: the server goes on
                    log.exception("closing an idle session failed")

        threading.Thread(target=expire, name="gradwire-sessions", daemon=True).start()

    def get(self, session: str | None, *, hold: bool = False) -> Trainer:
        """The trainer a call acts on: the default one without an id. With `hold`, the
        session does not expire until `leave(session)`, however long the call lasts."""
        if not session:
            return self.default
        self._close_idle()
        with self._lock:
            found = self._open.get(session)
            if found is None:
                raise UnknownSession(
                    f"no session {shown(session)}: it was never opened{self._or_expired()}; "
                    "open one with OpenSession (gradwire open-session)",
                    metadata={"session": session[:64]},
                )
            found.last_used = self._clock()
            found.held += hold
            return found.trainer

    def _lost(self) -> str:
        """For a session not found: a restart loses every session, and when this server
        started. Its owner's next call after a restart read that the session was never
        opened, closed or expired, none of which had happened (a review of restarts)."""
        return (
            f"or was lost when this server restarted (it started "
            f"{self._clock() - self._started:.0f} s ago; a session lives in its server's memory)"
        )

    def is_open(self, session: str) -> bool:
        """Whether `session` is open (an expired one until it is closed)."""
        with self._lock:
            return session in self._open

    def leave(self, session: str) -> None:
        """A call that held `session` has ended: its idle time starts now."""
        with self._lock:
            found = self._open.get(session)  # None when closed meanwhile (CloseSession)
            if found is not None:
                found.held -= 1
                found.last_used = self._clock()

    def _or_expired(self, already: str = "") -> str:
        """How an unknown session may have ended, after "it was never opened": closed,
        expired where sessions expire, or lost to a restart. A server that closes none for
        want of calls (--session-idle inf) said "or expired after inf s without calls"
        (found by a review of the error catalogue)."""
        expired = (
            "" if math.isinf(self.idle_s) else f" expired after {self.idle_s:g} s without calls,"
        )
        return f", was closed{already},{expired} {self._lost()}"

    def _next_expiry(self) -> str:
        """With the lock held: when the first idle session expires, for a caller refused
        for want of a place (an id lost with a crashed script holds one until then)."""
        if math.isinf(self.idle_s):
            return "this server closes no session for want of calls (its idle time is inf)"
        idle = [s.last_used for s in self._open.values() if not s.held]
        if not idle:
            return "none is idle: each has a call in progress (a Watch, a Train) or is opening"
        left = max(0.0, self.idle_s - (self._clock() - min(idle)))
        return f"the one idle longest expires in {left:.0f} s"

    def open(self, seed: int | None, settings: OptimizerSettings | None) -> str:
        self._close_idle()
        with self._lock:
            self._refuse_if_closed()
            taken = len(self._open) + self._opening
            if not self.max_sessions:
                # Nothing to close or wait for: "0 sessions are open, this server's limit;
                # close one or wait" sent its reader to free a place there is none of (a
                # review of running the server for others).
                raise OverLimit(
                    "this server takes no sessions (it was started with --max-sessions 0): "
                    "act on the default one, without a session, or ask its operator for "
                    "sessions",
                    reason="TOO_MANY_SESSIONS",
                    metadata={"max_sessions": "0"},
                )
            if taken >= self.max_sessions:
                raise OverLimit(
                    f"{taken} session{' is' if taken == 1 else 's are'} open, this server's "
                    "limit; close one "
                    f"(CloseSession) or wait: {self._next_expiry()}",
                    reason="TOO_MANY_SESSIONS",
                    # As at a limit of 0: said with one limit and not the other (a review).
                    metadata={"max_sessions": str(self.max_sessions)},
                )
            # Built, a model the host has not the memory for is the kernel's out-of-memory
            # killer's (pass_memory.py): counted with those being built. On every device:
            # a GPU session's model is built on the host too, then moved (Trainer._build_model).
            building = f", with the {self._opening} being built," if self._opening else ""
            pass_memory.check_model(
                f"a new session's model{building}",
                self.default.model_bytes * (self._opening + 1),
                "close a session (CloseSession), or act on the default one",
                host_memory.available_bytes,
            )
            # The place is taken now, while the model is built outside the lock: checked
            # and filled apart, twelve OpenSessions at once with a limit of two opened three,
            # four, and in one run all twelve.
            self._opening += 1
        try:
            d = self.default
            trainer = Trainer(
                d.spec,
                device=d.device,
                optimizer=settings,
                seed=seed,
                max_elements=d.max_elements,
                one_thread_for_small_work=d.one_thread_for_small_work,
            )
            session = secrets.token_hex(16)
            with self._lock:
                closed = self._stop_expiry.is_set()
                if not closed:
                    now = self._clock()
                    self._open[session] = _Session(trainer, now, opened=now)
            if closed:  # closed while the model was built: it would never be closed
                _free([_Session(trainer, 0.0)])
                self._refuse_if_closed()
        finally:
            with self._lock:
                self._opening -= 1
        return session

    def _refuse_if_closed(self) -> None:
        if self._stop_expiry.is_set():
            raise Stopping(
                "the server is stopping: open a session once it is back", reason="STOPPING"
            )

    def close(self, session: str) -> None:
        if not session:
            # An id left unset is the likely mistake: "the default session cannot be closed"
            # alone did not say what to give (found by a review of the error catalogue).
            raise InvalidInput(
                "CloseSession named no session: an empty id is the default session's, which "
                "cannot be closed; give the id OpenSession returned (ListSessions, gradwire "
                "sessions, lists those open)",
                reason="BAD_SESSION",
            )
        with self._lock:
            closing = [self._open.pop(session)] if session in self._open else []
        if not closing:
            raise UnknownSession(
                f"no session {shown(session)} to close: it was never opened"
                f"{self._or_expired(' already')}",
                metadata={"session": session[:64]},
            )
        self._closed([session])
        _free(closing)

    def describe(self) -> tuple[list[SessionView], int]:
        """The sessions open, oldest first, and how many are being opened; the expired ones
        closed first."""
        self._close_idle()
        with self._lock:
            now = self._clock()  # here: a session opened or left meanwhile read as negative
            views = [
                SessionView(
                    session=key,
                    version=s.trainer.version,
                    open_s=now - s.opened,
                    idle_s=0.0 if s.held else now - s.last_used,
                    calls_in_progress=s.held,
                )
                for key, s in self._open.items()
            ]
            return views, self._opening

    @property
    def open_count(self) -> int:
        """Sessions open beside the default one (an expired one counts until the background
        expiry closes it, a quarter of the idle time later at most, or a call finds it)."""
        return len(self._open)

    def close_all(self) -> None:
        self._stop_expiry.set()
        with self._lock:
            sessions, self._open = list(self._open.values()), {}
        _free(sessions)

    def _close_idle(self) -> None:
        now = self._clock()
        with self._lock:
            idle = [
                k for k, s in self._open.items() if not s.held and now - s.last_used > self.idle_s
            ]
            closed = [self._open.pop(k) for k in idle]
        if closed:
            # Said: a session's model and optimizer go with it, and its user found it gone
            # (NOT_FOUND) while the operator's log had no word of why (a review of running
            # the server for others). Logged as no call's: a call that finds them expired
            # (another client's, on another session) lent the line its request id and
            # session, as if it had closed them (found by a review of a long researcher's
            # session). One line each, its `session` field the one closed: a JSON log
            # filtered on a session's id had its calls and then nothing, the ids being in
            # one line's message only (found by a review of the server's log).
            outside = CURRENT_CALL.set(None)
            try:
                for session in idle:
                    log.info(
                        "closed session %s after %g s without calls (--session-idle), its "
                        "model and optimizer state with it",
                        shown(session),
                        self.idle_s,
                        extra={"session": session},
                    )
            finally:
                CURRENT_CALL.reset(outside)
            self._closed(idle)
            _free(closed)

    def _closed(self, sessions: list[str]) -> None:
        """Tells `on_close` of `sessions`, closed now (out of `_open`)."""
        if self.on_close is None:
            return
        for session in sessions:
            try:
                self.on_close(session)
            except Exception:  # the session is closed all the same
                log.exception("ending what acted on a closed session failed")


def _expiry_interval(idle_s: float) -> float:
    """How often the background expiry looks: a session is closed at most a quarter of its
    idle time late, and never more than 10 s late."""
    return min(max(idle_s / 4, 0.01), 10.0)


def _collects(trainer: Trainer) -> bool:
    """Whether closing `trainer` is worth a full collection: on a GPU, where memory is scarce."""
    return trainer.device.type != "cpu"


def _free(sessions: list[_Session]) -> None:
    """Closes the sessions' trainers; their memory goes as the last reference to each goes
    (the trainer's model holds it only weakly: no cycle to wait for the collector). On a
    GPU, a full collection follows, for cycles of a model's own making: left to the
    collector's schedule, a closed session's parameters, gradients and activations (device
    memory a new session may need) could stay until its next full collection. One costs
    about 0.1 s on the 2-core VM of docs/PERFORMANCE.md, paid by the call that closes the
    session, or by whatever finds it expired. On a CPU, a collection per close made the
    model-based test, which opens and closes thousands of sessions, crawl."""
    collect = any(_collects(s.trainer) for s in sessions)
    while sessions:  # popped: the callers keep no other reference
        trainer = sessions.pop().trainer
        try:
            trainer.close()
        except Exception:  # the others are closed all the same
            log.exception("closing a session's trainer failed")
        del trainer
    if collect:
        gc.collect()
