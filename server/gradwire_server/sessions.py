"""Sessions: models of the callers' own, so that two services never share gradients by accident.

The default session (no id) is the server's own trainer, for the tutorial's simple flow. Other
sessions are opened by id, limited in number, and closed after a time without calls: a call
in progress (an open Watch, a long Train) is use, however long it lasts.
"""

from __future__ import annotations

import gc
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from gradwire_server.errors import InvalidInput, OverLimit, UnknownTensor, shown
from gradwire_server.trainer import OptimizerSettings, Trainer

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
        self.default = default
        self.max_sessions = max_sessions
        self.idle_s = idle_s
        self._clock = clock
        # Reentrant: a call's hold is let go (`leave`) when its handler ends, which for a
        # stream may be when the collector finalizes its generator, at any allocation, this
        # lock held or not.
        self._lock = threading.RLock()
        self._open: dict[str, _Session] = {}

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
                    f"no session {shown(session)}: it was never opened, was closed, or expired "
                    f"after {self.idle_s:g} s without calls; open one with OpenSession",
                    metadata={"session": session[:64]},
                )
            found.last_used = self._clock()
            found.held += hold
            return found.trainer

    def leave(self, session: str) -> None:
        """A call that held `session` has ended: its idle time starts now."""
        with self._lock:
            found = self._open.get(session)  # None when closed meanwhile (CloseSession)
            if found is not None:
                found.held -= 1
                found.last_used = self._clock()

    def open(self, seed: int | None, settings: OptimizerSettings | None) -> str:
        self._close_idle()
        with self._lock:
            if len(self._open) >= self.max_sessions:
                raise OverLimit(
                    f"{len(self._open)} sessions are open, this server's limit; close one "
                    "(CloseSession) or wait for an idle one to expire",
                    reason="TOO_MANY_SESSIONS",
                )
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
            self._open[session] = _Session(trainer, self._clock())
        return session

    def close(self, session: str) -> None:
        if not session:
            raise InvalidInput("the default session cannot be closed", reason="BAD_SESSION")
        with self._lock:
            closing = [self._open.pop(session)] if session in self._open else []
        if not closing:
            raise UnknownSession(
                f"no session {shown(session)} to close", metadata={"session": session[:64]}
            )
        _free(closing)

    @property
    def open_count(self) -> int:
        """Sessions open beside the default one (expired ones may count until next used)."""
        return len(self._open)

    def close_all(self) -> None:
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
            _free(closed)


def _collects(trainer: Trainer) -> bool:
    """Whether closing `trainer` is worth a full collection: on a GPU, where memory is scarce."""
    return trainer.device.type != "cpu"


def _free(sessions: list[_Session]) -> None:
    """Closes the sessions' trainers; on a GPU, frees their memory now. A model, its
    optimizer and hooks hold one another in reference cycles, which only Python's cycle
    collector frees: left to it, a closed session's parameters, gradients and activations
    (device memory a new session may need) could stay until its next full collection. One
    costs about 0.1 s on the 2-core VM of docs/PERFORMANCE.md, paid by the call that closes
    the session, or by the call on any session that finds it expired.
    CPU sessions are left to the collector's own schedule: a collection per close made the
    model-based test, which opens and closes thousands of sessions, crawl."""
    collect = any(_collects(s.trainer) for s in sessions)
    while sessions:  # popped: the callers keep no other reference
        sessions.pop().trainer.close()
    if collect:
        gc.collect()
