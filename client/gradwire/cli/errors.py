"""How a command fails, by exit code: a usage error (2), a failure outside the arguments (1),
a stop by Ctrl-C after the command said where it stopped (130).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gradwire.client import Client


class UsageError(Exception):
    """Arguments that parse but make no sense; exit code 2."""

    #: Said already, in the server's JSON log (`serve --log-format json`): main adds no line.
    logged = False
    #: The server's reason for refusing serve's start (BAD_STATE_DIR...), for its JSON log.
    reason = ""


class CommandError(Exception):
    """A local command that failed for a reason outside the arguments; exit code 1."""

    #: Said already, in the server's JSON log (`serve --log-format json`): main adds no line.
    logged = False
    #: The server's reason for refusing serve's start (DISK_FULL...), for its JSON log.
    reason = ""


class Interrupted(Exception):
    """A command that Ctrl-C stopped after it said where it stopped (a train's summary, a
    watch's last update); exit code 130, as for any command Ctrl-C ends, so that a script's
    next command does not run as if it had finished (`gradwire train ... && next` ran next:
    found by a review of the CLI)."""


def predates(client: Client, rpc: str, cannot: str, instead: str = "") -> CommandError:
    """The error of a command whose call the server answered UNIMPLEMENTED: a server from
    before `rpc`, which cannot do what the command asks; `instead`: what else to do."""
    return CommandError(
        f"the server at {client.target} predates {rpc} and cannot {cannot}: a newer gradwire "
        f"serve can{instead}"
    )
