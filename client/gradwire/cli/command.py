"""Running one command: parse the arguments, call the command, turn its errors into an exit
code and a line on stderr, with a hint where one helps.

Exit codes: 0 success, 1 the server (or the channel) answered an error, 2 a usage error,
130 stopped by Ctrl-C, 141 a reader that went away (README.md, "The command line").
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import TextIO, cast

from gradwire import codec, rewatch
from gradwire.cli.connection import (
    SESSION_ENV,
    TARGET_ENV,
    connect,
    connection_hint,
    from_environment,
    session_option,
)
from gradwire.cli.errors import CommandError, Interrupted, UsageError
from gradwire.cli.output import Output
from gradwire.cli.parser import build_parser
from gradwire.cli.serving import asks_json_log, usage_error_logged
from gradwire.credentials import TOKEN_ENV
from gradwire.errors import (
    GradwireWarning,
    RemoteError,
    Unavailable,
)
from gradwire.selector import SelectorError


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Runs one command; returns the exit code (0 ok, 1 remote error, 2 usage error)."""
    err = err or sys.stderr
    if out is None:
        if sys.stdout is None:  # `gradwire info >&-`: Python found no descriptor 1
            err.write("gradwire: error: the standard output is closed; send it somewhere "
                      "(> /dev/null to drop it)\n")  # fmt: skip
            return 1
        out = cast(TextIO, Output(sys.stdout))
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    option = words[0].split("=", 1)[0] if words else ""
    if option in _AFTER_THE_COMMAND:
        # argparse took the option's value for the command: "invalid choice: 'gpu-box:50051'".
        err.write(
            f"gradwire: error: {option} goes after the command: gradwire COMMAND {option} ... "
            "(such as gradwire list --target HOST:PORT); gradwire -h lists the commands\n"
        )
        return 2
    # `serve --log-format json`: argparse's refusal of an option is the log's last line too,
    # as any other failed start's is (errors_logged), not a usage in plain text after it.
    json_log = bool(words) and words[0] == "serve" and asks_json_log(words)
    aside = io.StringIO()
    said: TextIO = aside if json_log else err
    try:
        # argparse prints usage, errors and --help itself: to this call's streams.
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(said):
            args, extra = parser.parse_known_args(argv)
            if extra:
                # Refused by the command's parser, not the top one: its usage, its name
                # ("gradwire get: error: unrecognized arguments: --dtype float16"), where
                # argparse's own gave gradwire's usage (a newcomer's walkthrough).
                args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except CommandError as e:
        # --help and --version, printed while argparse parses, to a full disk: a traceback
        # (found by a review of the CLI as a researcher, from its --help).
        err.write(f"gradwire: error: {e}\n")
        return 1
    except SystemExit as exit:
        if json_log:
            usage_error_logged(aside.getvalue(), err)
        elif exit.code == 2 and (dashed := _name_taken_for_an_option(words)) is not None:
            err.write(
                f"gradwire {words[0]}: a checkpoint name that begins with '-' goes after '--': "
                f"gradwire {words[0]} -- {dashed}\n"
            )
        return int(exit.code or 0)
    if json_log:
        err.write(aside.getvalue())
    undecodable = _not_text(args)
    if undecodable is not None:
        err.write(f"gradwire {args.command}: error: {undecodable}\n")
        return 2
    if args.remote:
        from_environment(args)
    with warnings_shown(args.command, err):
        return _run(args, out, err)


@contextlib.contextmanager
def warnings_shown(command: str, err: TextIO) -> Iterator[None]:
    """gradwire's own warnings (errors.GradwireWarning) given while `command` runs, one line
    each on `err`: "gradwire list: warning: ...". Python's own way took two lines, naming the
    file and line of gradwire's code that warned, which say nothing to a user of the
    command. `serve`'s go to its log, whose JSON a line of plain text would break, and so do
    other warnings given while it runs (torch's, the model's), with their file and line, as
    logging.captureWarnings logs them (but for the source line that warned, a line of its
    own): an nn.TransformerEncoder's, as the model was built,
    put two lines of plain text in a JSON log (a review of running the server, as an
    operator). Other commands show them as Python shows them."""
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(
            message: Warning | str,
            category: type[Warning],
            filename: str,
            lineno: int,
            file: TextIO | None = None,
            line: str | None = None,
        ) -> None:
            if command == "serve" and issubclass(category, GradwireWarning):
                logging.getLogger("gradwire.cli").warning("%s", message)
            elif command == "serve":
                # Without the source line that warned, which Python adds on a line of its
                # own: in a text log it was a line out of the log's layout, no time, no level.
                said = warnings.formatwarning(message, category, filename, lineno, "")
                logging.getLogger("py.warnings").warning("%s", said.rstrip("\n"))
            elif not issubclass(category, GradwireWarning):
                shown(message, category, filename, lineno, file, line)
            else:
                err.write(f"gradwire {command}: warning: {message}\n")

        warnings.showwarning = show
        yield


#: The commands about the server as a whole, which act on no session: a --session given
#: them was dropped without a word, a mistyped id too, and what they printed could be taken
#: for the session's (found by a review of the CLI as a researcher uses it, from its
#: --help). One from $GRADWIRE_SESSION is not given them: it is there for every command.
_SERVER_WIDE = {
    "info": "says what the server runs and keeps",
    "health": "asks the server's health",
    "sessions": "lists every session",
    "checkpoints": "lists the server's checkpoints, which any session may load",
    "open-session": "opens a new session beside the default one",
}


def _run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Runs the parsed command; its exit code, what went wrong said on `err`."""
    hint = None  # for a remote error: what to do about it, when the CLI can tell
    try:
        about = _SERVER_WIDE.get(args.command)
        if about is not None and "session" in args.given:
            raise UsageError(f"{args.command} {about}, on no session: leave out --session")
        if not args.remote or (args.command == "replay" and args.embedded):
            args.func(args, None, out)
        else:
            args.err = err  # for a command's word beside its output (_note_absent)
            with connect(args) as client:
                try:
                    args.func(args, client, out)
                except RemoteError as e:
                    hint = connection_hint(args, client, e)  # before the channel closes
                    if args.command == "watch" and not args.reconnect and client.answered:
                        hint = _or_reconnect(args, e, hint)
                    raise
    except (UsageError, SelectorError, codec.CodecError) as e:
        if not getattr(e, "logged", False):
            err.write(f"gradwire {args.command}: error: {e}\n")
        return 2
    except RemoteError as e:
        err.write(f"error: {e}\n")
        stale = getattr(args, "session_from_environment", False)  # a command that calls
        if hint is None and e.reason == "UNKNOWN_SESSION" and stale:
            # A stale export in the shell: nothing said where the id came from (a review).
            hint = (
                f"the session came from ${SESSION_ENV}, which names one closed, never "
                f"opened, or lost to a restart of the server: unset it (unset {SESSION_ENV}), "
                "or export the id of one open now (gradwire sessions lists them)"
            )
        # Which server was reached matters to a hint about reaching it, a token or a
        # session, not to one about the order of calls (a newcomer's walkthrough found
        # "gradwire backward first ... (the target came from $GRADWIRE_TARGET)").
        about_the_server = True
        # A server that takes no sessions has none to list or close.
        no_sessions = e.reason == "TOO_MANY_SESSIONS" and e.metadata.get("max_sessions") == "0"
        if hint is None and not no_sessions:  # the server's words name RPCs; say the commands
            hint = _COMMAND_HINTS.get(e.reason)
            about_the_server = hint is None
            if hint is not None:
                hint = hint.format(on=session_option(args.session))
        if (
            hint is None
            and e.reason == "BAD_TOKEN"
            and getattr(args, "token_file", None) is None
            and os.environ.get(TOKEN_ENV, "").strip()
        ):  # the error did not say where the wrong token came from (a review of the CLI)
            hint = (
                f"the token came from ${TOKEN_ENV}, which holds another server's or an old "
                f"one: export this server's (its --token-file), or give --token-file FILE"
            )
        if (
            hint is not None
            and about_the_server
            and getattr(args, "target_from_environment", False)
        ):
            hint += f" (the target came from ${TARGET_ENV})"
        if hint is not None:
            err.write(f"hint: {hint}\n")
        return 1
    except CommandError as e:
        if not e.logged:
            err.write(f"gradwire {args.command}: error: {e}\n")
        return 1
    except KeyboardInterrupt:
        err.write("interrupted\n")
        return 130
    except Interrupted:
        return 130  # stopped as asked, and the command has said where
    except BrokenPipeError:
        return BROKEN_PIPE  # the reader went away (`gradwire list | head -1`): nothing to say
    return 0


#: The commands that take a checkpoint's name, which may begin with '-' (the server takes
#: such names, and lists them).
_NAMING_A_CHECKPOINT = frozenset({"save", "load", "delete-checkpoint"})


def _name_taken_for_an_option(words: Sequence[str]) -> str | None:
    """The word of a checkpoint command refused as an unknown option that would be a
    checkpoint's name ('-old', not '--target'), before any '--': argparse said
    "unrecognized arguments: -old", or that the name was missing, and nothing said that
    `-- -old` names it (found by a review of checkpoints and sessions)."""
    if not words or words[0] not in _NAMING_A_CHECKPOINT:
        return None
    for word in words[1:]:
        if word == "--":
            return None
        if word.startswith("-") and not word.startswith("--") and word != "-h":
            return word
    return None


def _or_reconnect(args: argparse.Namespace, error: RemoteError, hint: str | None) -> str | None:
    """`hint`, and for a watch whose server went away after it answered, the option that
    waits for it: the error said "watch again once it is back", and nothing said that
    --reconnect does (found by a review of watching training remotely). A session's watch
    names it (so copied, the command watched the default session, another user's model)
    and says that a restart closes it (a review of two researchers sharing one server)."""
    if not isinstance(error, Unavailable):
        return hint
    on = session_option(args.session)
    reconnect = f"gradwire watch{on} --reconnect watches again by itself"
    if not rewatch.ended_unread(error):  # a server gone, not one that ended it for a call
        reconnect += " once the server is back"
        if on:
            reconnect += ", if it kept the session (a restart closes it: open another)"
    return reconnect if hint is None else f"{hint}; {reconnect}"


def _not_text(args: argparse.Namespace) -> str | None:
    """What to say of an argument holding bytes that are not UTF-8 (a name typed in another
    encoding): names, values and a plot's title go to the server, or to matplotlib, as
    UTF-8 text, and such a one ended the command with a traceback, UnicodeEncodeError (found
    by a review of the CLI). Paths are left alone, a file's name may be any bytes: options
    of files (Path), and values given as .npy files (set's value, --input, --target)."""
    for dest, value in vars(args).items():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and not text.isascii() and not text.endswith(".npy"):
                try:
                    text.encode()
                except UnicodeEncodeError:
                    shown = repr(text.encode(errors="surrogateescape"))[2:-1]  # conv1\xff
                    what = "an argument" if dest.startswith("_") else dest.replace("_", " ")
                    return (
                        f"{what} '{shown}' holds bytes that are not UTF-8 text; give it in "
                        "UTF-8 (names and values travel as UTF-8)"
                    )
    return None


#: For errors whose message names the RPC or its argument to use ("pass retain_graph to
#: Backward", "close one (CloseSession)"), the command and option that do it (found by a
#: review of the CLI). `{on}`: the session the command acted on, ` --session ID`, where it
#: had one: without it the commands, copied, acted on the default session, another user's
#: (a review of two researchers sharing one server).
_COMMAND_HINTS = {
    "GRAPH_FREED": "gradwire forward{on} again, or keep the graph with gradwire backward{on} "
    "--retain-graph",
    # "call Forward first", "call Forward with a target", "call Forward again": after
    # `forward --no-targets` nothing said to leave that out (found by a review of the CLI as
    # a researcher, from its --help).
    "NO_LOSS": "gradwire forward{on} first, without --no-targets: backward needs its loss",
    "GRAPH_STALE": "gradwire forward{on} again: a step, set or fill since the last forward "
    "changed the parameters its graph was made from",
    "NO_GRADIENTS": "gradwire backward{on} first; gradwire zero-grad{on} removes the "
    "gradients, and zero-grad --zeros keeps them as zeros",
    "TOO_MANY_SESSIONS": "gradwire sessions lists them; gradwire close-session ID closes one",
    "NOT_A_PARAMETER": "gradwire fill{on} fills parameters; gradwire set{on} NAME.grad VALUE "
    "writes a gradient",
}


#: Options of the commands, not of `gradwire` itself: written before the command, they are
#: refused saying where they go. Others (an abbreviated --help, a typo) are argparse's.
_AFTER_THE_COMMAND = frozenset(
    {
        "--target", "--timeout", "--json", "--keepalive", "--session", "--token-file", "--tls",
        "--tls-ca", "--tls-cert", "--tls-key", "--port", "--host", "--device", "--seed",
    }
)  # fmt: skip


#: The exit code of a command whose output's reader went away: 128 + SIGPIPE, as the shell
#: reports a program that SIGPIPE ended.
BROKEN_PIPE = 141


def main_entry() -> None:
    code = main()
    unwritten = False  # output left that Python would try again to write at exit
    try:
        if sys.stdout is not None:
            sys.stdout.flush()  # here, not at exit, where a closed pipe prints a traceback
    except BrokenPipeError:
        code, unwritten = BROKEN_PIPE, True
    except OSError as e:  # the last of the output, to a full disk
        sys.stderr.write(f"gradwire: error: cannot write the output: {e.strerror or e}\n")
        code, unwritten = max(code, 1), True
    if code == BROKEN_PIPE or unwritten:
        # Python flushes stdout again at exit: send what is left nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if "torch" in sys.modules:
        # torch's teardown at the interpreter's exit (every operator it registered from
        # Python deregistered one by one, and collections over its objects) took 0.7-0.85 s
        # after `serve` logged "stopped", and gives back nothing that the exit does not. By
        # now the state is saved and synced, files are closed and stdout is flushed; the log
        # and stderr are flushed here. Then the process ends without that teardown.
        logging.shutdown()
        with contextlib.suppress(OSError):
            sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
