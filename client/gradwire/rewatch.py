"""A watch that outlives its server's restarts: `Client.watch(reconnect=True)`.

A researcher's watch ended with UNAVAILABLE when the server it watched was restarted (a
deploy, a crash and a supervisor's restart, the network down a while), and had to be opened
again by hand. Here a watch whose server answered and then went away is opened again every
RETRY_S seconds until the server is back, and goes on from there. What cannot be waited out
is raised as before: a server that never answered (a wrong target: nothing will come back),
a session the restart lost (NOT_FOUND), the client closed, any other status.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator

from gradwire.errors import DeadlineExceeded, Unavailable
from gradwire.updates import WatchUpdate

#: Seconds between two tries to open a watch again while its server is away (its channel
#: tries to connect again at least every limits.MAX_RECONNECT_WAIT_S).
RETRY_S = 1.0

Opened = Callable[[float | None], Generator[WatchUpdate, None, None]]


def reconnecting(
    open_watch: Opened,
    timeout: float | None,
    on_lost: Callable[[Unavailable], object] | None = None,
) -> Generator[WatchUpdate, None, None]:
    """The updates of `open_watch(seconds_left)`, opened again each time its server goes
    away after an update (UNAVAILABLE), until `timeout` seconds pass (None: no end), counted
    from the first update asked for, across the openings. `on_lost(error)` is called once
    for each time the server went away, when it went. The first update once the server is
    back is, as for any watch opened, the state then (`cause` "Watch").

    The timeout passed while the server is away raises DeadlineExceeded, as it does in an
    update's place, its `__cause__` the UNAVAILABLE the server went with. Anything else
    raises at once."""
    deadline = None if timeout is None else time.monotonic() + timeout
    answered = False  # whether any opening got an update: else nothing is waited for
    away: Unavailable | None = None  # the error the server went away with, while away
    stream = open_watch(timeout)
    try:
        while True:
            try:
                for update in stream:
                    answered, away = True, None
                    yield update
                return
            except Unavailable as error:
                if not answered:
                    raise
                stream.close()
                if away is None:
                    away = error
                    if on_lost is not None:
                        on_lost(error)
                wait = RETRY_S if deadline is None else min(RETRY_S, deadline - time.monotonic())
                if wait > 0:
                    time.sleep(wait)
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise DeadlineExceeded(
                        f"the watch's timeout ({timeout:g} s) passed while its server was "
                        f"away ({away.message})"
                    ) from away
                stream = open_watch(left)
    finally:
        stream.close()
