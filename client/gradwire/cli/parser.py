"""The command line: every command, its options and its help, in one argparse parser."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import Any, TextIO

from gradwire import __version__, codec, limits
from gradwire.cli.arguments import (
    SOURCE_HELP,
    at_least,
    client_keepalive,
    duration,
    file_path,
    fill_value,
    port_number,
    positive_duration,
    positive_duration_or_forever,
    seed_value,
    shape_option,
)
from gradwire.cli.connection import SESSION_ENV, TARGET_ENV
from gradwire.cli.serving import cmd_replay, cmd_serve
from gradwire.cli.state import (
    cmd_checkpoints,
    cmd_close_session,
    cmd_delete_checkpoint,
    cmd_health,
    cmd_info,
    cmd_list,
    cmd_load,
    cmd_open_session,
    cmd_optimizer,
    cmd_reset,
    cmd_save,
    cmd_sessions,
)
from gradwire.cli.tensors import (
    cmd_backward,
    cmd_fill,
    cmd_forward,
    cmd_get,
    cmd_plot,
    cmd_set,
    cmd_stats,
    cmd_step,
    cmd_zero_grad,
)
from gradwire.cli.training import cmd_train, cmd_watch
from gradwire.credentials import TOKEN_ENV
from gradwire.plot import (
    DEFAULT_BINS,
    DEFAULT_DPI,
    FIGSIZE,
    KINDS,
    MAX_KERNEL_IN,
    MAX_KERNEL_OUT,
)
from gradwire.targets import DEFAULT_TARGET

# Remote commands get a Client; local ones (serve, replay --embedded) get None.
Command = Callable[[argparse.Namespace, Any, TextIO], None]


#: A word argparse should take for a negative number, not an option: its own pattern takes
#: -3 and -0.5 alone, so `--low -1e-3`, `fill -1e-3` and `set W -inf` failed with "expected
#: one argument" or "the following arguments are required" (found by a review).
_NEGATIVE_NUMBER = re.compile(
    r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE
)


class _Parser(argparse.ArgumentParser):
    """argparse's parser, taking -1e-3, -inf and -nan for values (`_NEGATIVE_NUMBER`); the
    commands' parsers are made of this class too (add_subparsers makes its parent's)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER


def progress_option(p: argparse.ArgumentParser, moves: str) -> None:
    """--progress and --no-progress, for a command whose value may take a while to cross."""
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"show on stderr the bytes {moves} as they cross (done / total, percent, MiB/s), "
        f"for a value of more than one {round(limits.CHUNK_BYTES / 2**20)} MiB chunk: by default "
        "only when stderr is a terminal, as one line rewritten in place; --progress into a "
        "file or pipe too, a line each tenth of the way (at most one a second) for logs and "
        "CI; --no-progress never",
    )


def build_parser() -> argparse.ArgumentParser:
    # The options of every command that calls a server.
    common = _Parser(add_help=False)
    common.add_argument(
        "--target",
        # None: not given; main takes $GRADWIRE_TARGET, else DEFAULT_TARGET (from_environment).
        help=f"server address host:port (default: ${TARGET_ENV} if set, else {DEFAULT_TARGET})",
    )
    common.add_argument(
        "--timeout",
        type=positive_duration,
        default=60.0,
        help="seconds each call may take (default %(default)s); not a limit on watch (see "
        "--count, --duration) or on train's steps",
    )
    common.add_argument(
        "--json",
        action="store_true",
        help="print JSON for scripts: one object, or one per line where there are many "
        "(watch's updates)",
    )
    common.add_argument(
        "--keepalive",
        type=client_keepalive,
        default=None,  # None: not given (replay --embedded refuses one given), the default
        metavar="SECONDS",
        help="during a call, ping a connection silent this long, so that a watch whose server "
        "vanished ends; a gradwire server takes one every 30 s at most; 0: never "
        f"(default {limits.CLIENT_KEEPALIVE_S:g})",
    )
    common.add_argument(
        "--session",
        metavar="ID",  # None: not given; main takes $GRADWIRE_SESSION (from_environment)
        help="act on this session (from gradwire open-session, or Python's "
        "Client.open_session(): its .session) instead of the default one; it stays open "
        f"(default: ${SESSION_ENV} if set)",
    )
    common.add_argument(
        "--token-file",
        type=file_path,
        help=f"file holding the server's bearer token (default: ${TOKEN_ENV} if set)",
    )
    common.add_argument("--tls", action="store_true", help="connect with TLS (system roots)")
    common.add_argument(
        "--tls-ca", type=file_path, help="PEM file of the CA that signed the server"
    )
    common.add_argument(
        "--tls-cert",
        type=file_path,
        help="client certificate (PEM), for mutual TLS, with --tls-key",
    )
    common.add_argument(
        "--tls-key",
        type=file_path,
        help="client private key (PEM), for mutual TLS, with --tls-cert",
    )
    # The same names, for `serve`, from the server's side.
    serving = _Parser(add_help=False)
    serving.add_argument(
        "--token-file",
        type=file_path,
        help="file holding the token every call must carry as 'authorization: Bearer TOKEN' "
        f"(default: ${TOKEN_ENV} if set, else no token is required)",
    )
    serving.add_argument(
        "--tls-cert", type=file_path, help="the server's certificate chain (PEM): serve TLS"
    )
    serving.add_argument(
        "--tls-key", type=file_path, help="the server's private key (PEM), with --tls-cert"
    )

    parser = _Parser(
        prog="gradwire",
        description="Drive a PyTorch model's training step on a (GPU) gradwire server over gRPC.",
    )
    parser.add_argument("--version", action="version", version=f"gradwire {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Command, help: str, remote: bool = True) -> argparse.ArgumentParser:
        parents = [common if remote else serving]
        p = sub.add_parser(name, parents=parents, help=help, description=help)
        p.set_defaults(func=func, remote=remote, command_parser=p)
        return p

    p = add(
        "serve",
        cmd_serve,
        "run a server in the foreground (Ctrl-C or SIGTERM stops it)",
        remote=False,
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind; 0.0.0.0 exposes it to the network (default %(default)s)",
    )
    p.add_argument(
        "--port",
        type=port_number,
        default=50051,
        help="port; 0 picks a free one (default %(default)s)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto (GPU when there is one), cpu, cuda or cuda:N (default %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=seed_value,
        default=None,
        help="seed for the model's initialisation (default: none, other weights each start)",
    )
    p.add_argument(
        "--model",
        metavar="MODULE:ATTR",
        help="serve your own model: a ModelSpec, or a function returning one, e.g. "
        "mymodels:SPEC or gradwire_server.models:TINY_MLP; the current folder is importable "
        "while the model loads, looked in last: a file there named as a standard or "
        "installed module (queue.py) is not the one imported (default: the tutorial's "
        "Simple)",
    )
    p.add_argument(
        "--max-concurrent",
        type=at_least(1, limits.MAX_COUNT),
        default=16,
        help="calls served at once; more are refused at once (RESOURCE_EXHAUSTED) "
        "(default %(default)s)",
    )
    p.add_argument(
        "--port-file",
        type=file_path,
        default=None,
        help="write the bound port here once listening (a file left there by a server "
        "killed is removed at start); removed once the server has stopped",
    )
    p.add_argument(
        "--grace",
        type=duration,
        default=5.0,
        metavar="SECONDS",
        help="seconds in-flight calls get at shutdown (default %(default)s)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="debug adds one line per finished call: method, status, milliseconds (default info)",
    )
    p.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="json: one JSON object per line, with the call's method, request_id, session "
        "and peer when logged during one (default %(default)s)",
    )
    p.add_argument(
        "--metrics-port",
        type=port_number,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics; 0 picks a free port "
        "(default: off)",
    )
    p.add_argument(
        "--max-sessions",
        type=at_least(0, limits.MAX_COUNT),
        default=8,
        help="sessions open at once beside the default one, which calls without a session "
        "use; 0: none (default %(default)s)",
    )
    p.add_argument(
        "--session-idle",
        type=positive_duration_or_forever,
        default=600.0,
        metavar="SECONDS",
        help="seconds without calls before a session is closed, more than 0; inf: never "
        "(default %(default)s)",
    )
    p.add_argument(
        "--keepalive",
        type=duration,
        default=limits.KEEPALIVE_S,
        metavar="SECONDS",
        help="ping a connection silent this long, and drop it when no answer comes within "
        "--keepalive-timeout, ending its calls: a client gone without closing its "
        "connection lets go of its watch, its session and its place; 0: never "
        "(default %(default)s)",
    )
    p.add_argument(
        "--keepalive-timeout",
        type=duration,
        default=limits.KEEPALIVE_TIMEOUT_S,
        metavar="SECONDS",
        help="how long a ping may go unanswered (default %(default)s)",
    )
    p.add_argument(
        "--connection-idle",
        type=duration,
        default=limits.CONNECTION_IDLE_S,
        metavar="SECONDS",
        help="close a connection that has had no call in progress this long, so that "
        "clients that never close theirs do not use up the server's open files; a client "
        "reconnects at its next call, and an open watch or stream is a call; 0: never "
        "(default %(default)s)",
    )
    p.add_argument(
        "--max-connections",
        type=at_least(0, limits.MAX_GRPC_INT),
        default=limits.MAX_CONNECTIONS,
        metavar="N",
        help="connections kept open at once, so that many opened faster than they go idle "
        "cannot take every file the server may open; one more is closed as it opens, its "
        "client told UNAVAILABLE; lowered to fit the limit on open files; 0: no limit "
        "(default %(default)s)",
    )
    p.add_argument(
        "--state-dir",
        type=file_path,
        metavar="DIR",
        help="restore the model and optimizer from here at start, save them here at a "
        "graceful stop (safetensors; default: none, nothing is saved)",
    )
    p.add_argument(
        "--return-freed-memory",
        action="store_true",
        help="give the memory a step frees back to the system at once (the C library's "
        "default): less resident memory between steps, slower CPU steps; by default the "
        "server keeps it for the next step",
    )
    p.add_argument(
        "--one-thread-for-small-work",
        action="store_true",
        help="on the CPU, run steps of under 33.6 MFLOP (the tutorial's) on one thread: on a "
        "small machine, calls after idle time then do not wait milliseconds for OpenMP's "
        "workers to wake; results may differ from torch's defaults in the last bits",
    )
    p.add_argument(
        "--tls-client-ca",
        type=file_path,
        help="with --tls-cert and --tls-key: require client certificates signed by this CA",
    )

    p = add("forward", cmd_forward, "run the model and the loss on an input (Forward)")
    p.add_argument(
        "--input",
        help=f"the input: {SOURCE_HELP} (default: ones for 8 samples of the model's shape, "
        "ones:8,3,10,10 for the tutorial's)",
    )
    p.add_argument(
        "--targets",
        help="class indices for the loss (values, for an mse model), same syntax "
        "(default: one per sample of the input: class 1, or ones of the output's width for "
        "an mse model)",
    )
    p.add_argument("--no-targets", action="store_true", help="run the model only, no loss")
    p.add_argument(
        "--eval",
        action="store_true",
        help="run the model in evaluation mode (model.eval()): BatchNorm uses its running "
        "statistics and keeps them, Dropout passes through",
    )
    p.add_argument(
        "--seed",
        type=seed_value,
        help="seed for uniform, normal and randint sources (default 0); refused without one",
    )

    p = add("backward", cmd_backward, "backpropagate the last loss (Backward)")
    p.add_argument(
        "--retain-graph", action="store_true", help="keep the graph for another Backward"
    )

    add("step", cmd_step, "apply the optimizer (Step)")

    p = add("zero-grad", cmd_zero_grad, "clear gradients (ZeroGrad); to None unless --zeros")
    p.add_argument(
        "--zeros",
        action="store_true",
        help="zero the gradients in place instead of setting them to None (those that are "
        "None stay None, as in PyTorch)",
    )

    p = add(
        "get",
        cmd_get,
        "print a tensor or slice, or save it to a .npy file (--out): "
        "gradwire get 'conv1.weight.grad[0][0][0]'",
    )
    p.add_argument(
        "selector", help="a name and optional numpy basic index: conv1.weight[0, :, 1:3]"
    )
    p.add_argument("--shape-only", action="store_true", help="print the shape, fetch no values")
    p.add_argument(
        "--out",
        type=file_path,
        metavar="FILE.npy",
        help="save the values to this .npy file instead of printing them (dtype and shape "
        "as the Python client reads them; bfloat16 widened exactly to float32), and print "
        "what was written; gradwire set SELECTOR FILE.npy writes them back",
    )
    progress_option(p, "received")

    p = add(
        "plot",
        cmd_plot,
        "draw a tensor or slice into a PNG: gradwire plot conv1.weight --out conv1.png",
    )
    p.epilog = (
        "auto picks by shape: a 4-D conv weight or its gradient ([out, in, kh, kw], named "
        "*.weight or *.weight.grad) -> kernels, a 2-D slice -> heatmap, anything else -> "
        "histogram, binned on the server (GetStats) so that no values cross the wire. "
        "kernels: one tile per (output, input) channel pair, a column per output "
        f"channel (filter) and a row per input channel, at most {MAX_KERNEL_OUT} output x "
        f"{MAX_KERNEL_IN} input channels (the title says when more were left out). Signed "
        "values (weights, gradients) are drawn with a diverging colour map centred on 0: red "
        "positive, blue negative, white 0, one scale for every tile. The PNG is "
        f"{FIGSIZE[0]:g} x {FIGSIZE[1]:g} inches at --dpi "
        f"({FIGSIZE[0] * DEFAULT_DPI:.0f} x {FIGSIZE[1] * DEFAULT_DPI:.0f} pixels by default). "
        "Needs matplotlib: gradwire's plot extra (pip install 'gradwire[plot]' where "
        "gradwire is installed; in a checkout: pip install '.[plot]')."
    )
    p.add_argument(
        "selector", help="a name and optional numpy basic index, as for get: linear.weight[:, :64]"
    )
    p.add_argument(
        "--out", type=file_path, required=True, metavar="FILE.png", help="the PNG file to write"
    )
    p.add_argument(
        "--kind",
        choices=KINDS,
        default="auto",
        help="kernels (4-D), heatmap (2-D), histogram (any), or auto (default %(default)s)",
    )
    p.add_argument(
        "--bins",
        type=int,
        help=f"a histogram's bins over the finite values (default {DEFAULT_BINS})",
    )
    progress_option(p, "of a heatmap's or kernels' values")
    p.add_argument("--title", help="the picture's title (default: the selector and its shape)")
    p.add_argument(
        "--dpi", type=int, default=DEFAULT_DPI, help="pixels per inch (default %(default)s)"
    )

    p = add(
        "stats",
        cmd_stats,
        "statistics of a tensor or slice, computed on the server (std is the population's, "
        "numpy's std(); torch.std() divides by n - 1): "
        "gradwire stats conv1.weight.grad --bins 10",
    )
    p.add_argument("selector", help="a name and optional index, as for get")
    p.add_argument(
        "--bins",
        type=at_least(0, limits.MAX_HISTOGRAM_BINS),
        default=0,
        help="histogram bins (default: none)",
    )
    p.add_argument("--low", type=float, help="histogram's lower edge (default: the minimum)")
    p.add_argument("--high", type=float, help="histogram's upper edge (default: the maximum)")

    p = add(
        "watch",
        cmd_watch,
        "show tensors after every change, live (Ctrl-C stops): "
        "gradwire watch conv1.weight.grad loss --every-steps 10",
    )
    p.add_argument("selectors", nargs="+", help="names with optional indices, as for get")
    p.add_argument("--values", action="store_true", help="show values (default: statistics)")
    p.add_argument("--stats", action="store_true", help="with --values: statistics too")
    p.add_argument(
        "--bins",
        type=at_least(0, limits.MAX_HISTOGRAM_BINS),
        default=0,
        help="histogram bins in the statistics: drawn under each tensor's row, or in each "
        "entry's stats with --json (default: none)",
    )
    p.add_argument(
        "--every-steps",
        type=at_least(0, codec.INT64_MAX),
        default=0,
        help="an update every N optimizer steps; 0: after every change, Steps or not "
        "(default %(default)s)",
    )
    p.add_argument(
        "--interval",
        type=duration,
        default=0.1,
        help="at most one update per this many seconds: one that falls due sooner waits, "
        "then shows the state it finds, counting the updates due meanwhile as skipped "
        "(default %(default)s; 0: every update as it falls due)",
    )
    p.add_argument("--count", type=at_least(1), help="stop after this many updates")
    p.add_argument(
        "--duration", type=positive_duration, help="stop after this many seconds (more than 0)"
    )
    p.add_argument(
        "--reconnect",
        action="store_true",
        help="when the server goes away after its first update (stopped, restarted, the "
        "network down), say so on stderr, wait for it to come back, and watch on; --count "
        "and --duration count across the gap (default: end with the error)",
    )

    p = add(
        "train",
        cmd_train,
        "run training steps with a progress bar, on random data made on the server "
        "(Ctrl-C stops between steps)",
    )
    p.add_argument(
        "--steps",
        type=at_least(1, limits.MAX_TRAIN_STEPS),
        default=100,
        help="steps to run (default %(default)s)",
    )
    p.add_argument(  # no more than a dimension can be: past it, a traceback (a review)
        "--batch",
        type=at_least(1, codec.INT64_MAX),
        default=8,
        help="batch size (default %(default)s)",
    )
    p.add_argument(
        "--every",
        type=at_least(1, codec.INT64_MAX),
        default=1,
        help="show progress every K steps (default %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=seed_value,
        default=0,
        help="seed of step 0's inputs; step k's inputs use seed + k, its targets seed + "
        "1,000,003 + k, modulo 2**64 (default %(default)s)",
    )
    p.add_argument(
        "--input-shape",
        type=shape_option,
        help="one sample's shape, comma-separated (default: what the server's model takes)",
    )
    p.add_argument(
        "--input-high",
        type=at_least(1, codec.INT64_MAX),
        help="for a model of integer inputs (token ids): draw them from 0..N-1 (N: its "
        "vocabulary's size); a float model's inputs are drawn from a normal distribution",
    )
    p.add_argument(
        "--classes",
        type=at_least(1, codec.INT64_MAX),
        help="labels drawn from 0..N-1 (default: the model's output width)",
    )
    p.add_argument(
        "--server-side",
        action="store_true",
        help="one Train call runs every step on the server (default: a TrainStep call per step)",
    )
    p.add_argument(
        "--keep-going",
        action="store_true",
        help="run every step asked for, even past the first loss that is NaN or infinite "
        "(default: stop after that step, training having diverged)",
    )

    p = add(
        "set",
        cmd_set,
        "write a parameter or gradient, or a slice of one; the value broadcasts to the "
        "selection's shape and is cast to its dtype, as numpy's assignment does (the line "
        "written says when it did either)",
    )
    p.add_argument("selector", help="a name and optional index, as for get")
    p.add_argument("value", help=f"a number, a JSON list, {SOURCE_HELP}")
    progress_option(p, "sent")

    p = add("fill", cmd_fill, "fill parameters with one value, as p.data.fill_(value)")
    p.add_argument(
        "value",
        type=fill_value,
        help="a number, nan or inf; a negative one after --, as in: gradwire fill -- -inf",
    )
    # default=[]: without one, Python's argparse (before 3.13) calls a `*` positional required
    # in its error, "the following arguments are required: value, names".
    p.add_argument("names", nargs="*", default=[], help="parameters to fill (default: all)")

    add("list", cmd_list, "list every tensor with its kind, dtype and shape")

    p = add(
        "reset",
        cmd_reset,
        "re-initialise the model's parameters and start the optimizer's state afresh (its "
        "settings stay)",
    )
    p.add_argument(
        "--seed", type=seed_value, default=None, help="torch.manual_seed before initialising"
    )

    checkpoint_name = (
        "the checkpoint's name, a file <name>.safetensors in the server's state directory "
        "(default: state, the one `gradwire serve --state-dir` restores at start and "
        "overwrites at a graceful stop"
    )
    p = add(
        "save",
        cmd_save,
        "save the state (parameters, gradients, buffers, optimizer) as a checkpoint in the "
        "server's --state-dir",
    )
    p.add_argument(
        "name",
        nargs="?",
        default=None,
        help=f"{checkpoint_name}: name one to keep; the default session's, so a --session "
        "saves under a name of its own)",
    )
    p = add(
        "load",
        cmd_load,
        "replace the state with a checkpoint from the server's --state-dir (the version "
        "moves on by one)",
    )
    # Not save's words: a --session "saves under a name of its own", and may load any,
    # state too (found by a review of the CLI as a researcher uses it, from its --help).
    p.add_argument(
        "name",
        nargs="?",
        default=None,
        help=f"{checkpoint_name}; any session may load any checkpoint, state too)",
    )
    add(
        "checkpoints",
        cmd_checkpoints,
        "list the checkpoints in the server's --state-dir: name, the version saved, size, "
        "when, and the model, or why a load would refuse one (--json for a script)",
    )
    p = add(
        "delete-checkpoint",
        cmd_delete_checkpoint,
        "remove a checkpoint from the server's --state-dir, for room (a save refused for a "
        "full disk)",
    )
    p.add_argument(
        "name",
        help="the checkpoint's name, as gradwire checkpoints lists it ('state', the one the "
        "server restores at start, by that name alone)",
    )

    p = add(
        "open-session",
        cmd_open_session,
        "open a session: a model, optimizer and version of its own beside the default one; "
        'prints its id, and how to use it (--json: {"session": ID, ...} for a script)',
    )
    p.add_argument(
        "--seed", type=seed_value, default=None, help="seed for its model's initialisation"
    )

    p = add(
        "close-session",
        cmd_close_session,
        "close a session and free its model (open Watches and Trains on it end)",
    )
    p.add_argument(
        "id", nargs="?", default=None, help=f"the session (default: --session, ${SESSION_ENV})"
    )

    add(
        "sessions",
        cmd_sessions,
        "list the sessions open beside the default one: id, version, age, idle time, calls",
    )

    add(
        "info",
        cmd_info,
        "the server's gradwire and PyTorch versions, its device, and the limits it keeps",
    )

    p = add(
        "optimizer",
        cmd_optimizer,
        "show the optimizer; with --kind or a setting, replace it (by one of the kind in "
        "place, unless --kind or a setting of the other kind says; the settings not given "
        "take their defaults; its state starts afresh); with --keep-state, change the "
        "settings given in place and keep the rest and its state",
    )
    p.add_argument(
        "--keep-state",
        action="store_true",
        help="change the settings given in the optimizer in place, as assigning to torch's "
        "param_groups does: the others keep their values, and its momentum buffers or "
        "Adam's moments stay (a learning rate lowered mid-training)",
    )
    p.add_argument(
        "--kind",
        choices=["sgd", "adam"],
        help="torch.optim.SGD or Adam (default: the kind a setting given belongs to, else the "
        "kind in place)",
    )
    p.add_argument(
        "--lr",
        type=float,
        help="learning rate (default: 1.0 for SGD, as the tutorial; 0.001 for Adam)",
    )
    p.add_argument("--momentum", type=float, help="SGD's momentum (default 0)")
    p.add_argument("--weight-decay", type=float, help="L2 penalty (default 0)")
    p.add_argument("--beta1", type=float, help="Adam's first beta (default 0.9)")
    p.add_argument("--beta2", type=float, help="Adam's second beta (default 0.999)")
    p.add_argument("--eps", type=float, help="Adam's epsilon (default 1e-08)")
    p.add_argument(
        "--nesterov",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="SGD with Nesterov momentum; --no-nesterov turns it off (with --keep-state)",
    )

    p = add("health", cmd_health, "ask the standard gRPC health check; exit 0 when SERVING")
    p.add_argument("--service", default="", help="service to ask about (default: the server)")

    p = add(
        "replay",
        cmd_replay,
        "replay the PyTorch tutorial over gRPC, printing what it computes; as the tutorial, it "
        "makes the model and the optimizer anew, replacing those of the session it acts on "
        "(the default one unless --session)",
    )
    p.add_argument(
        "--init",
        choices=["fill", "random"],
        default="fill",
        help="fill: every parameter 0.1, as the tutorial; "
        "random: PyTorch's default init after torch.manual_seed(--seed)",
    )
    p.add_argument("--seed", type=seed_value, help="with --init random: the seed (default 0)")
    p.add_argument(
        "--embedded",
        action="store_true",
        help="start a server in this process on a free port (no --target)",
    )
    p.add_argument("--device", help="with --embedded: auto (the default), cpu, cuda or cuda:N")
    return parser
