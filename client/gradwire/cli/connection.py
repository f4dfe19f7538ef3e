"""Reaching a server: the Client made from the common options and the environment
($GRADWIRE_TARGET, $GRADWIRE_SESSION), and the hint for a call that never reached a server
(or stopped being answered), in words a person can act on.
"""

from __future__ import annotations

import argparse
import os

from gradwire import rewatch
from gradwire.cli.arguments import names_a_source
from gradwire.cli.errors import UsageError
from gradwire.client import Client, check_session
from gradwire.credentials import load_token, read_optional
from gradwire.errors import (
    Cancelled,
    DeadlineExceeded,
    RemoteError,
    Unavailable,
)
from gradwire.failures import UNRESOLVED, never_reached, under_way
from gradwire.limits import CLIENT_KEEPALIVE_S
from gradwire.targets import DEFAULT_TARGET

#: The environment variable naming the session commands act on (--session).
SESSION_ENV = "GRADWIRE_SESSION"
#: The environment variable naming the server every command calls unless --target says.
TARGET_ENV = "GRADWIRE_TARGET"


def connect(args: argparse.Namespace) -> Client:
    """A Client for the common options: target, timeout, token and TLS."""
    if bool(args.tls_cert) != bool(args.tls_key):  # gRPC's C core aborts on half a pair
        given = "--tls-cert" if args.tls_cert else "--tls-key"
        missing = "--tls-key" if args.tls_cert else "--tls-cert"
        raise UsageError(
            f"{given} without {missing}: mutual TLS needs the client's certificate "
            "(--tls-cert) and its private key (--tls-key); give both, or neither"
        )
    if args.command == "forward" and "target" in args.given and names_a_source(args.target):
        # --targets without its s (the tensor is named `target`) went to gRPC's resolver as
        # a host: UNAVAILABLE, exit 1, a hint to check the host name (found by a review of
        # the CLI as a researcher, from its --help).
        raise UsageError(
            f"--target {args.target} names the server to call (host:port), and this is a "
            f"source: the loss's targets are --targets {args.target}"
        )
    try:
        check_session(args.session, "--session")  # in the words of the command line
        client = Client(
            args.target,
            timeout=args.timeout,
            token=load_token(args.token_file),
            tls=args.tls,
            ca=read_optional(args.tls_ca, "certificate", "--tls-ca"),
            cert=read_optional(args.tls_cert, "certificate", "--tls-cert"),
            key=read_optional(args.tls_key, "private key", "--tls-key"),
            session=args.session,
            # Not given (None): the client's default; 0: no pings, as Client's None.
            keepalive=CLIENT_KEEPALIVE_S if args.keepalive is None else args.keepalive or None,
        )
    except (OSError, ValueError) as e:
        said = str(e)
        if getattr(args, "target_from_environment", False) and "target" in said:
            said += f" (the target came from ${TARGET_ENV})"
        if getattr(args, "session_from_environment", False) and "session" in said:
            said += f" (the session came from ${SESSION_ENV})"
        raise UsageError(said) from None
    if args.command != "replay":
        # No other command makes a conditional mutation (Client.expecting), which the
        # server's instance is read for before a client's first call: each would make one
        # call more, and the server log and count a GetServerInfo per command.
        client._instance = ""
    return client


def _unreachable(error: RemoteError) -> bool:
    """Whether a call failed before reaching a server: nothing listening, or a plaintext call
    to a TLS port (gRPC's own words, as grpcio 1.85 has them)."""
    return isinstance(error, Unavailable) and never_reached(error.message)


#: Seconds a failed command waits to learn whether its channel ever connected: a connected
#: one says so at once.
READY_CHECK_S = 0.5


def _connected(client: Client) -> bool:
    """Whether the client's channel is connected: a server answered gRPC on it."""
    try:
        client.wait_ready(READY_CHECK_S)
    except Unavailable:
        return False
    return True


#: What a command on the server's files (not its state) that failed once its server had it
#: may have done all the same, for connection_hint.
_ON_FILES = {
    "save": "; the checkpoint may have been written all the same (saving again replaces it)",
    "delete-checkpoint": "; the checkpoint may have been removed all the same (gradwire "
    "checkpoints shows whether it is there)",
}

#: How long a large value takes over a slow link, for a --timeout that ran out mid-transfer.
SLOW_LINK_EXAMPLE = "at 10 Mbit/s, 60 s carries about 70 MiB"


def connection_hint(args: argparse.Namespace, client: Client, error: RemoteError) -> str | None:
    """What to do about a call that never reached a gradwire server, from what the CLI can
    know: gRPC's words for the failure, the TLS options given and whether the channel ever
    connected. None for an error a server answered."""
    target = client.target
    tls = bool(args.tls or args.tls_ca or args.tls_cert)
    text = error.message.lower()
    # What the server may have done with a call that failed once it was reached: a command
    # reported as failed, then run again, would apply its change twice (found by a review).
    applied = (
        "; what this command asked may have been applied all the same (gradwire list shows "
        "the state version)"
        if error.changes_state
        else ""
    )
    if error.changes_state and args.command in _ON_FILES:  # the server's files, not its state
        applied = _ON_FILES[args.command]
    # A server that answered this command's earlier calls, or that its channel reached: gone
    # since, not never there (a stopped server's port refuses the retries that follow). A
    # stopping server cancels the calls it has taken in and not begun (CANCELLED), and cuts
    # its streams (UNAVAILABLE "Cancelling all calls"). Errors without a reason are gRPC's
    # own, not a gradwire server's (whose STOPPING and BUSY say what they are).
    reached = client.answered or client.reached
    if isinstance(error, Unavailable) and rewatch.ended_unread(error):
        # The server, answering on, ended a stream this command left unread: said to have
        # stopped or restarted (found by a review of this session's new features).
        return (
            "the server ended this command's stream, its messages left unread for that long "
            "(a process suspended, Ctrl-Z, or stopped in a debugger) when a call found every "
            "place of the server taken: run it again, and leave it running"
        )
    if reached and isinstance(error, (Unavailable, Cancelled)) and not error.reason:
        seen = "answered earlier in this command" if client.answered else "was reached"
        return (
            f"the server at {target} {seen}, then stopped answering: it was stopped or "
            f"restarted, or the network to it went down (its log says which){applied}; "
            f"gradwire health --target {target} says when it is back"
        )
    if isinstance(error, DeadlineExceeded):
        # A watch's --duration is its call's deadline, and it ends the command with an error
        # only before the first update (cli/training.py): after that time, not --timeout's.
        duration = getattr(args, "duration", None)
        connected = reached or _connected(client)  # once: each wait starts a gRPC thread
        if connected and duration is not None:
            # The first update, the state as it is now, had not come: a large one still
            # crossing a slow link (16 MiB of values: 13 s at 10 Mbit/s). It had no hint,
            # gRPC's words alone (found by a review of a researcher on a slow, distant link).
            return (
                f"--duration {duration:g}s ended the watch before its first update had come "
                "(the state as it is now, sent at once: a large one takes a while over a "
                "slow link): give a longer --duration"
            )
        if connected:  # the call took longer than --timeout
            late = f"no answer within --timeout {args.timeout:g}s"
            if under_way(error):  # a large value over a slow link (a review of one)
                late = (
                    f"--timeout {args.timeout:g}s ran out with the call's messages still "
                    f"crossing the network (a slow link: {SLOW_LINK_EXAMPLE})"
                )
            if not applied:  # a read: nothing done, only the time to give (a review)
                return f"{late}: give this command a longer --timeout"
            look = "" if args.command in _ON_FILES else "look before running it again, and "
            return (
                f"{late}, but the server may have run the call after that{applied}: "
                f"{look}give long calls a longer --timeout"
            )
        return (
            f"{target} did not answer as a gRPC server within "
            f"{args.timeout if duration is None else duration:g}s (the "
            "connection never became ready): check that --target HOST:PORT names a gradwire "
            "server, not another program or a port a firewall drops"
        )
    if not _unreachable(error):
        return None
    if any(words in text for words in UNRESOLVED):
        return (
            f"{target} could not be resolved to an address: check the host name and the "
            "port in --target HOST:PORT (such as localhost:50051 or gpu-box:50051)"
        )
    if "before receiving settings frame" in text:  # taken, and never answered at all
        # Said to be no server at all, where a program took the connection (found by a
        # review of the CLI); a command with a --timeout is told so as a DeadlineExceeded.
        return (
            f"something at {target} took the connection but never answered as a gRPC server "
            "(it sent nothing in 20 s): check that --target HOST:PORT names a gradwire "
            "server, not another program"
        )
    if "parsing http/2" in text:  # a connection made, and answered in something else
        return (
            f"something that is not a gRPC server answers at {target} (a web server?): "
            "check the port in --target HOST:PORT"
        )
    if "certificate_verify_failed" in text and "certificate has expired" in text:
        # It said no server answered, and to start one (found by a review of deployment).
        return (
            f"{target} serves TLS with a certificate that has expired (or this machine's "
            "clock is wrong): the server needs a new one (gradwire serve --tls-cert, --tls-key)"
        )
    if "certificate_verify_failed" in text and (
        "local issuer" in text or "self signed" in text or "self-signed" in text
    ):
        signer = (
            f"the CA in {args.tls_ca}"
            if args.tls_ca
            else "any CA this machine trusts (--tls alone trusts the system's)"
        )
        return (
            f"{target} serves TLS with a certificate not signed by {signer}: pass --tls-ca "
            "with the CA that signed the server's certificate (PEM)"
        )
    if "hostname verification" in text:
        # It said no server answered, and to start one (found by an operator's walkthrough).
        host = target.rpartition(":")[0].strip("[]") or target
        return (
            f"{target} serves TLS with a certificate that does not name {host}: connect by a "
            "name the certificate holds (its subject alternative names), or give the server "
            f"a certificate that names {host}"
        )
    if "wrong_version_number" in text:  # the answer to TLS's first message was not TLS
        return (
            f"{target} does not answer in TLS: for a server without TLS, leave out --tls, "
            "--tls-ca, --tls-cert and --tls-key"
        )
    if args.tls_cert and "failed to create security handshaker" in text:
        # gRPC could not use the client's own pair (its log: "Invalid private key"); the
        # hint said no server answered, and to start one (found by a review of deployment).
        return (
            f"this client's TLS files could not be used together: is --tls-key "
            f"{args.tls_key} the private key that --tls-cert {args.tls_cert} was made with?"
        )
    if tls and "socket closed" in text:
        if args.tls_cert:
            # The server does not say why; an expired certificate was blamed on the CA.
            return (
                f"{target} closed the connection before it was ready: if it requires client "
                f"certificates, it refused {args.tls_cert}: one its client CA did not sign, "
                "or one that has expired or is not valid yet"
            )
        return (
            f"{target} closed the connection before it was ready: if it requires client "
            "certificates (mutual TLS), pass --tls-cert and --tls-key"
        )
    if tls:
        return (
            f"no gradwire server answered at {target}: start one (gradwire serve), or name "
            "yours with --target HOST:PORT"
        )
    if "socket closed" in text:
        # A server is there, and closed the connection as it opened: a TLS server asked
        # without TLS, or one with as many connections open as --max-connections lets it
        # keep. The hint said that no server answered, and to start one.
        return (
            f"{target} closed the connection as it opened: it serves TLS (add --tls, and "
            "--tls-ca for a CA of your own), or it has as many connections open as it keeps "
            "(gradwire serve --max-connections; gradwire info says how many): try again "
            "once some close"
        )
    return (
        f"no gradwire server answered at {target}: start one (gradwire serve), name yours "
        "with --target HOST:PORT, or add --tls if it serves TLS"
    )


def from_environment(args: argparse.Namespace) -> None:
    """The target and session a command did not name, from $GRADWIRE_TARGET (else
    DEFAULT_TARGET) and $GRADWIRE_SESSION. `args.given` records which common options were
    given, and `args.target_from_environment` and `args.session_from_environment` where
    the others came from, for messages. Read here, not as argparse defaults, with which
    given and defaulted could not be told apart (an abbreviated --sess was taken for the
    environment's, found by a review)."""
    args.given = {name for name in COMMON if getattr(args, name, None) not in (None, False)}
    target, session = os.environ.get(TARGET_ENV), os.environ.get(SESSION_ENV)
    args.target_from_environment = "target" not in args.given and bool(target)
    # close-session's ID names the session as --session does.
    named = "session" in args.given or getattr(args, "id", None) is not None
    args.session_from_environment = not named and bool(session)
    if "target" not in args.given:
        args.target = target or DEFAULT_TARGET
    if "session" not in args.given:
        args.session = session or None


def session_option(session: str | None) -> str:
    """` --session ID` for the session a command acted on (given, or from $GRADWIRE_SESSION:
    its args.session, its client's .session), to put in the commands a message tells its
    user to run next; "" on the default session. Without it, those commands acted on the
    default session, another user's perhaps (a review of two researchers sharing one
    server)."""
    return f" --session {session}" if session else ""


#: The options every command that calls a server takes (build_parser's `common`) whose
#: absence means something: the environment's, or none.
COMMON = ("target", "session", "token_file", "tls", "tls_ca", "tls_cert", "tls_key")
