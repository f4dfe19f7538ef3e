"""Commands that run gradwire locally: serve (a server in this process) and replay (the
tutorial over gRPC, against a server or one started here).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO, TypeVar

import gradwire_cli
from gradwire.cli.connection import COMMON
from gradwire.cli.errors import CommandError, UsageError
from gradwire.cli.output import json_line, jsonable
from gradwire.client import Client
from gradwire.credentials import load_token
from gradwire.limits import ServerConnections

#: How to get the server side: gradwire is not on PyPI, so from a checkout, or its wheel
#: installed (where '.[server]' does nothing: a review of installing).
SERVER_EXTRA = (
    "install gradwire's server extra (pip install 'gradwire[server]' where gradwire is "
    "installed; in a checkout: pip install '.[server]')"
)


def _missing(err: ImportError) -> str:
    """The module an ImportError found missing, for the hint: "torch" was said of any
    (safetensors, prometheus_client), though torch was installed (a review of installing)."""
    return err.name.partition(".")[0] if err.name else "a module of it"


def cmd_replay(args: argparse.Namespace, client: Client | None, out: TextIO) -> None:
    from gradwire.replay import SessionInUse, WrongModel, replay

    if args.seed is not None and args.init != "random":  # dropped without a word (a review)
        raise UsageError(
            "--seed seeds --init random; --init fill sets every parameter to 0.1 and draws "
            "nothing: add --init random, or leave --seed out"
        )
    seed = 0 if args.seed is None else args.seed

    def run(c: Client) -> None:
        lines: list[str] = []

        def write(line: str) -> None:
            if args.json:
                lines.append(line)
            else:
                out.write(line + "\n")

        # The tutorial's calls go in one Batch (replay()): no Calls stream besides, which
        # held a second of the server's places while the Batch ran, so that a server started
        # with --max-concurrent 1 refused the replay as busy (a review of the replay).
        try:
            result = replay(c, init=args.init, seed=seed, write=write)
        except (WrongModel, SessionInUse) as e:
            raise CommandError(str(e)) from None
        if args.json:
            out.write(
                json_line(
                    {
                        "init": result.init,
                        "seed": seed if result.init == "random" else None,
                        "output_shape": list(result.output_shape),
                        "loss": result.loss,
                        "grad_before_backward": jsonable(result.grad_before_backward),
                        "grad_slice": jsonable(result.grad_slice),
                        "weight_slice_before": jsonable(result.weight_slice_before),
                        "weight_slice_after": jsonable(result.weight_slice_after),
                        "grad_after_zero": jsonable(result.grad_after_zero),
                        # printed in the transcript (of --init fill), and left out here until
                        # a review of the replay
                        "linear_grad_rows": jsonable(result.linear_grad_rows),
                        "identity_holds": result.identity_holds,
                        "transcript": lines,
                    }
                )
            )

    if client is not None:
        if args.device is not None:  # it was ignored: the replay ran on the server's device
            raise UsageError(
                "--device chooses the device of the server --embedded starts; a server "
                f"replayed against ({args.target}) keeps its own (gradwire serve --device)"
            )
        run(client)
        return
    # --embedded: a server in this process on a free port, for trying gradwire with one command.
    # Each would be ignored: the replay runs against a server of its own, in this process,
    # which cannot vanish beneath it as --keepalive's pings are there to notice (it was
    # dropped without a word: a review of the tutorial's replay).
    ignored = [name for name in COMMON if name in args.given]
    if args.keepalive is not None:  # not in args.given: it is no COMMON option
        ignored.append("keepalive")
    if ignored:
        options = ", ".join("--" + name.replace("_", "-") for name in ignored)
        raise UsageError(
            f"--embedded replays against a server of its own, in this process: leave out "
            f"{options}, or leave out --embedded to replay against a server you name"
        )
    try:
        from gradwire_server.app import start
        from gradwire_server.devices import resolve_device
        from gradwire_server.errors import InvalidInput
        from gradwire_server.trainer import Trainer
    except ImportError as err:
        raise UsageError(
            f"--embedded needs the server side, which lacks {_missing(err)}: {SERVER_EXTRA} ({err})"
        ) from None
    try:
        device = resolve_device(args.device or "auto")
    except InvalidInput as e:
        raise UsageError(e.message) from None
    running = start(Trainer(device=device), "127.0.0.1", 0)
    try:
        with Client(f"127.0.0.1:{running.port}", timeout=args.timeout) as embedded:
            run(embedded)
    finally:
        running.stop(grace=None)


def asks_json_log(words: Sequence[str]) -> bool:
    """Whether a command line says `--log-format json` (or `--log-format=json`, or an
    abbreviation argparse takes for it: `--log-f json`)."""

    def log_format(option: str) -> bool:
        return len(option) >= len("--log-f") and "--log-format".startswith(option)

    pairs = zip(words, [*words[1:], ""], strict=True)
    return any(
        (log_format(w) and n == "json") or (log_format(w.partition("=")[0]) and w.endswith("=json"))
        for w, n in pairs
    )


def usage_error_logged(said: str, err: TextIO) -> None:
    """What argparse `said` refusing `serve --log-format json`'s options, as one JSON log line
    at CRITICAL (its last line: "gradwire serve: error: argument --port: ..."); as argparse
    said it where the server side, whose log format that is, is not installed."""
    lines = [line for line in said.splitlines() if line.strip()]
    try:
        from gradwire_server.logs import JsonFormatter
    except ImportError:
        err.write(said)
        return
    if not lines:
        return
    record = logging.LogRecord("gradwire.cli", logging.CRITICAL, __file__, 0, lines[-1], (), None)
    err.write(JsonFormatter().format(record) + "\n")


E = TypeVar("E", UsageError, CommandError)


def _with_reason(error: E, reason: str) -> E:
    """`error`, carrying the server's `reason` for the JSON log's line."""
    error.reason = reason
    return error


@contextlib.contextmanager
def errors_logged(json_log: bool) -> Iterator[None]:
    """With `json_log`, a usage or command error is logged as the log's last line (one JSON
    object, with the server's "reason" where it gave one: BAD_STATE_DIR, BAD_METRICS_PORT;
    docs/RELIABILITY.md names the refusals by them, and no line carried them: found by an
    audit of its claims), and marked said, for main to add none in plain text."""
    try:
        yield
    except (UsageError, CommandError) as e:
        if json_log:
            extra = {"reason": e.reason} if e.reason else {}
            logging.getLogger("gradwire.cli").critical("gradwire serve: error: %s", e, extra=extra)
            e.logged = True
        raise


@contextlib.contextmanager
def _stop_signals_kept() -> Iterator[list[int]]:
    """The stop signals received while serve's imports run (torch's, seconds), kept for the
    server to say and take once its log is set up; the handlers found given back at the end.
    Left to their default there, such a signal ended the process without a word, and the
    first process of a container (PID 1), sent no signal left to its default, went on to
    listen and serve (found by a review of restarts)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # no handler can be set
        yield received
        return
    found = {
        s: signal.signal(s, lambda signum, _: received.append(signum))
        for s in gradwire_cli.starting_signals()
    }
    early: list[int] = []
    for s, handler in list(found.items()):
        # The command's entry point kept them while grpc and numpy were imported (one list
        # for both): what it received comes first, and the handler it stood in for is the
        # one given back.
        if isinstance(handler, gradwire_cli.KeptSignals):
            early = handler.received
            found[s] = handler.original
    received[:0] = early
    try:
        yield received
    finally:
        for s, handler in found.items():
            signal.signal(s, handler)


def cmd_serve(args: argparse.Namespace, client: Client | None, out: TextIO) -> None:
    with _stop_signals_kept() as received:
        _serve(args, received)


def _serve(args: argparse.Namespace, received: list[int]) -> None:
    try:
        from gradwire_server.app import (
            DeviceLost,
            ServingLost,
            exit_said_while_starting,
            serve,
            starting_signals,
        )
        from gradwire_server.auth import TlsFiles
        from gradwire_server.errors import InvalidInput, ModelFault, OverLimit
        from gradwire_server.logs import log_handler
    except ImportError as err:
        raise UsageError(
            f"serve needs the server side, which lacks {_missing(err)}: {SERVER_EXTRA} ({err})"
        ) from None
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()), handlers=[log_handler(args.log_format)]
    )
    if threading.current_thread() is threading.main_thread():
        for s in starting_signals():  # from here on, as serve takes them until it listens
            signal.signal(s, exit_said_while_starting)
    if received:
        exit_said_while_starting(received[0], None)
    # A start that fails says so in the log's format: with --log-format json, a collector of
    # JSON lines read the two lines before it and not the one that mattered (an operator's
    # walkthrough).
    with errors_logged(args.log_format == "json"):
        try:
            token = load_token(args.token_file)
        except (OSError, ValueError) as e:
            raise UsageError(str(e)) from None
        tls = None
        if args.tls_cert or args.tls_key:
            if not (args.tls_cert and args.tls_key):
                raise UsageError("TLS needs both --tls-cert and --tls-key")
            tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca)
        elif args.tls_client_ca:
            raise UsageError("--tls-client-ca needs --tls-cert and --tls-key")
        if args.keepalive and not args.keepalive_timeout:
            raise UsageError(
                "--keepalive-timeout must be more than 0 (--keepalive 0 turns pings off)"
            )
        try:
            serve(
                host=args.host,
                port=args.port,
                device=args.device,
                seed=args.seed,
                max_concurrent=args.max_concurrent,
                port_file=args.port_file,
                grace=args.grace,
                token=token,
                tls=tls,
                state_dir=args.state_dir,
                max_sessions=args.max_sessions,
                session_idle_s=args.session_idle,
                model=args.model,
                # A module beside the user (mymodels.py) can be named by --model even when
                # gradwire runs as an installed script: importable while it loads, looked in
                # last (models.load_spec).
                model_folder=Path.cwd() if "" not in sys.path else None,
                metrics_port=args.metrics_port,
                keep_freed=not args.return_freed_memory,
                one_thread_for_small_work=args.one_thread_for_small_work,
                connections=ServerConnections(
                    keepalive_s=args.keepalive,
                    keepalive_timeout_s=args.keepalive_timeout,
                    idle_s=args.connection_idle,
                    max_connections=args.max_connections,
                ),
            )
        except (InvalidInput, ModelFault) as e:  # ModelFault: a factory's shared model
            raise _with_reason(UsageError(e.message), e.reason) from None
        except OverLimit as e:  # a checkpoint that does not fit: nothing was served
            raise _with_reason(CommandError(e.message), e.reason) from None
        except (OSError, DeviceLost, ServingLost) as e:  # a failed exit: a supervisor restarts it
            raise CommandError(str(e)) from None
