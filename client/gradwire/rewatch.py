"""A watch that outlives its server's restarts: `Client.watch(reconnect=True)`.

A researcher's watch ended with UNAVAILABLE when the server it watched was restarted (a
deploy, a crash and a supervisor's restart, the network down a while), and had to be opened
again by hand. Here a watch whose server answered and then went away is opened again every
RETRY_S seconds until the server is back, and goes on from there. What cannot be waited out
is raised as before: a server that never answered (a wrong target: nothing will come back),
a session the restart lost (NOT_FOUND), the client closed, any other status. A server
back but busy (BUSY: every place for calls taken) is tried again too, as one away.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Generator

from gradwire import limits
from gradwire.errors import DeadlineExceeded, NotFound, ResourceExhausted, Unavailable
from gradwire.updates import WatchUpdate

#: Seconds between two tries to open a watch again while its server is away (its channel
#: tries to connect again at least every limits.MAX_RECONNECT_WAIT_S).
RETRY_S = 1.0

Opened = Callable[[float | None], Generator[WatchUpdate, None, None]]


def reconnecting(
    open_watch: Opened,
    timeout: float | None,
    on_lost: Callable[[Unavailable], object] | None = None,
    answered: Callable[[], bool] = lambda: False,
) -> Generator[WatchUpdate, None, None]:
    """The updates of `open_watch(seconds_left)`, opened again each time its server goes
    away (UNAVAILABLE) after it answered, until `timeout` seconds pass (None: no end),
    counted from the first update asked for, across the openings. The server answered once
    the watch had an update, or where `answered()` says so as it starts (its client's
    earlier calls: a notebook's watch opened while the server it used restarts waits for
    it). `on_lost(error)` is called once for each time the server went away, when it went,
    with an UNAVAILABLE that says what happened and that the watch goes on (the call's own
    error, which says what to do once it ends, is its `__cause__`). The first update once
    the server is back is, as for any watch opened, the state then (`cause` "Watch").

    The timeout passed while the server is away raises DeadlineExceeded, as it does in an
    update's place, its `__cause__` the UNAVAILABLE the server went with. A session the
    server came back without raises NotFound saying so. Anything else raises at once."""
    deadline = None if timeout is None else time.monotonic() + timeout
    reached = answered()  # whether its server answered: else nothing is waited for
    away: Unavailable | None = None  # the error the server went away with, while away
    stream = open_watch(timeout)
    try:
        while True:
            try:
                for update in stream:
                    reached, away = True, None
                    yield update
                return
            except NotFound as error:
                if away is None or error.reason != "UNKNOWN_SESSION":
                    raise
                raise NotFound(
                    "the server came back without this watch's session (a session lives in "
                    f"its server's memory: a restart loses it): {error.message}",
                    reason=error.reason,
                    metadata=error.metadata,
                ) from error
            except Unavailable as error:
                if not reached:
                    raise
                stream.close()
                if away is None:
                    away = error
                    if on_lost is not None:
                        on_lost(_going_on(error))
            except ResourceExhausted as error:
                # Opened again on a server whose places are all taken (a watch the server
                # ended for another call, its updates left unread, comes back to find that
                # call holding the place): tried again until one frees, where it ended the
                # watch BUSY, a transient refusal (found by a review of this session's new
                # features). The watch's first opening refused BUSY is raised, as before.
                if away is None or error.reason != "BUSY":
                    raise
                stream.close()
            # Waited for out of the handler: Ctrl-C in the wait was raised "during handling
            # of" the last try's error, whose traceback a notebook printed first, as if the
            # watch had failed (found by a review of the client as a researcher uses it in a
            # notebook).
            wait = RETRY_S if deadline is None else min(RETRY_S, deadline - time.monotonic())
            if wait > 0:
                time.sleep(wait)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise DeadlineExceeded(
                    f"the watch's timeout ({timeout:g} s) passed while its server was "
                    f"away ({gist(away.message)})"
                ) from away
            stream = open_watch(left)
    finally:
        stream.close()


def gist(message: str) -> str:
    """A status message's first clause, what happened, without what to do about it: "the
    server is stopping" of "the server is stopping: this watch ends here; watch again once
    it is back"."""
    return re.split(r": |; ", message, maxsplit=1)[0]


def ended_unread(error: Unavailable) -> bool:
    """Whether the server ended the watch for a call that found every place taken, its client
    having left an update unread (a process suspended, a debugger's breakpoint): the server
    did not go away, and the watch is opened again at once."""
    return limits.ENDED_UNREAD in error.message


def _going_on(error: Unavailable) -> Unavailable:
    """`error` (the call's, which ended) as on_lost is told of it: the watch goes on."""
    then = "watching again" if ended_unread(error) else "watching again once the server is back"
    going_on = Unavailable(
        f"{gist(error.message)}: {then}",
        reason=error.reason,
        metadata=error.metadata,
    )
    going_on.__cause__ = error
    return going_on
