"""The `gradwire` command's entry point, outside the `gradwire` package on purpose.

gRPC's C core reads GRPC_VERBOSITY once, when grpc is first imported, and importing
anything from `gradwire` imports grpc. Left unset, the core logs lines of its own to
stderr (a failed TLS handshake: "I1130 ... ssl_transport_security.cc ... Handshake
failed ..."), above the command's error and hint, which say the same in words a person can
act on. So the command sets it to ERROR here, first, unless its caller set it: run with
GRPC_VERBOSITY=INFO to see gRPC's own lines again. Library users' processes are left as
they are.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    try:
        from gradwire.cli import main_entry
    except KeyboardInterrupt:  # Ctrl-C while grpc and numpy load, in the first half second
        sys.stderr.write("interrupted\n")  # as later: a traceback through the imports was
        sys.exit(130)  # all a review of the CLI got

    main_entry()
