"""The `gradwire` command's entry point, outside the `gradwire` package on purpose.

gRPC's C core reads GRPC_VERBOSITY once, when grpc is first imported, and importing
anything from `gradwire` imports grpc. Left unset, the core logs lines of its own to
stderr (a failed TLS handshake: "I1130 ... ssl_transport_security.cc ... Handshake
failed ..."), above the command's error and hint, which say the same in words a person can
act on. So the command sets it to ERROR here, first, unless its caller set it: run with
GRPC_VERBOSITY=INFO to see gRPC's own lines again. Library users' processes are left as
they are.

`gradwire serve` keeps the stop signals (SIGTERM, SIGHUP) that come while those imports run
(a third of a second), for the server to say and take once its log is set up
(`KeptSignals`, which gradwire.cli.serving takes over).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any


class KeptSignals:
    """A stop signal's handler, while the command's first imports run: keeps the signal in
    `received` (shared by the signals kept), `original` the handler it stands in for. Left to
    its default, a SIGTERM there ended `gradwire serve` without a word, and the first process
    of a container (PID 1), to which the kernel sends no signal left to its default, dropped
    it and went on to listen and serve until `docker stop` killed it (a review of restarts)."""

    def __init__(self, received: list[int], original: Any) -> None:
        self.received = received
        self.original = original

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)


def starting_signals() -> list[signal.Signals]:
    """SIGTERM, and SIGHUP unless it is ignored (nohup): the stop signals serve takes but
    Ctrl-C, which stays Python's KeyboardInterrupt. The server's app.starting_signals()
    says the same, but is read only once app.py, and torch with it, is imported."""
    stops = [signal.SIGTERM]
    hangup = getattr(signal, "SIGHUP", None)
    if hangup is not None and signal.getsignal(hangup) != signal.SIG_IGN:
        stops.append(hangup)
    return stops


def _keep_stop_signals() -> None:
    """For `gradwire serve` (its one form: `gradwire serve ...`, the command having no
    options before its name but --version and --help), the `starting_signals` are kept from
    here, where Python has only started, by `KeptSignals`."""
    if sys.argv[1:2] != ["serve"] or threading.current_thread() is not threading.main_thread():
        return
    received: list[int] = []
    for s in starting_signals():
        signal.signal(s, KeptSignals(received, signal.getsignal(s)))


def main() -> None:
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    _keep_stop_signals()
    try:
        from gradwire.cli import main_entry
    except KeyboardInterrupt:  # Ctrl-C while grpc and numpy load, in the first half second
        sys.stderr.write("interrupted\n")  # as later: a traceback through the imports was
        sys.exit(130)  # all a review of the CLI got

    main_entry()
