"""Commands on the server's state rather than a tensor: the model's listing, reset, the
optimizer, checkpoints, sessions, the server's info and health.
"""

from __future__ import annotations

import argparse
import math
import re
import textwrap
import time
from typing import Literal, TextIO, cast

from gradwire.cli.connection import SESSION_ENV
from gradwire.cli.errors import CommandError, UsageError, predates
from gradwire.cli.output import emit, json_line
from gradwire.client import Client, check_session, fields_known
from gradwire.display import format_size
from gradwire.errors import (
    Unimplemented,
)
from gradwire.progress import (
    format_duration,
)
from gradwire.results import OptimizerConfig, ServerInfo, TensorInfo


def cmd_list(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    listing = client.list_tensors()
    if args.json:
        out.write(
            json_line(
                {
                    "version": listing.version,
                    "model": listing.model,
                    "device": listing.device,
                    "optimizer": vars(listing.optimizer),
                    # What the model takes and gives, for building --input and --targets.
                    "sample_shape": list(listing.sample_shape),
                    "input_dtype": listing.input_dtype,
                    "outputs": listing.outputs,
                    "loss": listing.loss,
                    "tensors": [{**vars(t), "shape": list(t.shape)} for t in listing.tensors],
                }
            )
        )
        return
    out.write(
        f"model {listing.model} on {listing.device}, optimizer "
        f"{_describe_optimizer(listing.optimizer, brief=True)}, version {listing.version}\n"
    )
    if listing.outputs:  # what the model takes: for --input and --targets (0: not said)
        sample = ", ".join(["N", *(str(d) for d in listing.sample_shape)])
        targets = (
            f"class indices in [0, {listing.outputs})"
            if listing.loss == "cross_entropy"
            else f"floats [N, {listing.outputs}]"
        )
        out.write(
            f"input {listing.input_dtype} [{sample}] -> output [N, {listing.outputs}]; loss "
            f"{listing.loss}, targets {targets}\n"
        )
    # Columns as wide as their widest entry: "activation" and "optimizer_state" included.
    kinds = [_kind_shown(t) for t in listing.tensors]
    name_w = max(len(t.name) for t in listing.tensors)
    kind_w = max(len(kind) for kind in kinds)
    dtype_w = max(len(t.dtype) for t in listing.tensors)
    for t, kind in zip(listing.tensors, kinds, strict=True):
        shape = format_size(t.shape) if t.present else "None"
        out.write(f"  {t.name:<{name_w}}  {kind:<{kind_w}}  {t.dtype:<{dtype_w}}  {shape}\n")


def _kind_shown(t: TensorInfo) -> str:
    """A tensor's kind as `list` shows it: a frozen parameter's says so, for its gradient
    stays absent and a Step leaves its values as they are (a fine-tuned model's base)."""
    return "parameter (frozen)" if t.kind == "parameter" and t.requires_grad is False else t.kind


def _describe_optimizer(config: OptimizerConfig, *, brief: bool = False) -> str:
    """'sgd lr=0.01 momentum=0.9 weight_decay=0.0 nesterov=False': the kind and every setting
    the server reports; `brief` leaves out those that are off (0 or False)."""
    settings = (
        f"{k}={v}"
        for k, v in vars(config).items()
        if k != "kind" and v is not None and not (brief and k != "lr" and not v)
    )
    return " ".join((config.kind, *settings))


def cmd_reset(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    version = client.reset(args.seed)
    seeded = "unseeded" if args.seed is None else f"seed {args.seed}"
    # The JSON says what the text says: the seed too (found by a review of the CLI).
    said = {"version": version, "seed": args.seed}
    emit(out, args, said, f"model re-initialised, {seeded} (version {version})")


#: A checkpoint's file's suffix, which its name leaves out.
_SUFFIX = ".safetensors"


def _checkpoint(name: str | None, optional: bool = True, saving: bool = False) -> str:
    """The checkpoint `name` names; "" for none given ('state'), where that is `optional`.
    An empty name given (a script's empty variable) saved over 'state', the one the server
    restores at start, and 'x.safetensors' was saved as x.safetensors.safetensors (found by
    a review of the CLI)."""
    if name is None:
        return ""
    if not name:
        state = "leave it out for 'state'," if optional else "give 'state' for"
        raise UsageError(
            "the checkpoint's name is empty: give one of 1 to 100 ASCII letters, digits, '.', '-' "
            f"or '_', or {state} the checkpoint the server restores at start"
        )
    if saving and name.endswith(_SUFFIX):  # one an older CLI saved so still loads
        raise UsageError(
            f"give the checkpoint's name without its file's suffix: "
            f"{name.removesuffix(_SUFFIX)!r}, not {name!r}"
        )
    return name


def cmd_save(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    name = _checkpoint(args.name, saving=True)
    try:
        saved = client.save_checkpoint(name)
    except Unimplemented:  # "UNIMPLEMENTED: Method not found!" alone (a review of versions)
        raise predates(client, "SaveCheckpoint", "save checkpoints") from None
    emit(
        out,
        args,
        {"name": saved.name, "version": saved.version, "bytes": saved.bytes},
        f"saved state version {saved.version} as checkpoint {saved.name!r} "
        f"({_bytes(saved.bytes)}) in the server's state directory",
    )


def cmd_load(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    name = _checkpoint(args.name)
    try:
        loaded = client.load_checkpoint(name)
    except Unimplemented:  # as save's
        raise predates(client, "LoadCheckpoint", "load checkpoints") from None
    name = name or "state"
    emit(
        out,
        args,
        {"name": name, "version": loaded.version, "saved_version": loaded.saved_version},
        f"loaded checkpoint {name!r}, saved at version {loaded.saved_version} "
        f"(version {loaded.version})",
    )


def cmd_open_session(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    client.session = None  # opened beside the default session, whatever --session says
    session = client.open_session(args.seed)
    ident, idle = session.detach(), session.session_idle_s
    lasts = (
        "it stays open until closed"
        if idle is None or math.isinf(idle)
        else f"the server closes it after {_seconds_text(idle)} without calls"
    )
    emit(
        out,
        args,
        {"session": ident, "idle_timeout_s": idle},
        f"session {ident} opened; {lasts}\n"
        f"act on it with --session {ident}, or: export {SESSION_ENV}={ident}\n"
        f"close it with: gradwire close-session {ident}",
    )


def cmd_close_session(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    ident = args.id or args.session
    if args.id and "session" in args.given and args.session != args.id:
        # Two sessions named: it closed the ID's and said nothing of --session's, which
        # stayed open (found by a review of the CLI as a researcher, from its --help).
        raise UsageError(
            f"close-session {args.id} and --session {args.session} name two sessions: give "
            "one of them"
        )
    if not ident:
        raise UsageError(
            f"name the session to close: gradwire close-session ID (or --session ID, or "
            f"${SESSION_ENV})"
        )
    try:
        client.session = check_session(ident, "ID" if args.id else "--session")
    except ValueError as e:
        raise UsageError(str(e)) from None
    client.close_session()
    emit(out, args, {"session": ident, "closed": True}, f"session {ident} closed")


def cmd_sessions(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    try:
        listing = client.list_sessions()
    except Unimplemented:
        raise predates(client, "ListSessions", "list its sessions") from None
    timeout = listing.idle_timeout_s
    if args.json:
        data = {
            "sessions": [vars(s) for s in listing.sessions],
            "opening": listing.opening,
            "max_sessions": listing.max_sessions,
            "idle_timeout_s": timeout,
        }
        out.write(json_line(data))
        return
    closing = (
        "none is closed for want of calls"
        if math.isinf(timeout)
        else f"each is closed after {format_duration(timeout)} without calls"
    )
    opening = f" ({listing.opening} more opening)" if listing.opening else ""
    out.write(
        f"{len(listing.sessions)} of {listing.max_sessions} sessions open beside the default "
        f"one{opening}; {closing}\n"
    )
    if not listing.sessions:
        return
    # "running": calls in progress now, not calls made (it read "calls", and a newcomer took
    # it for a count of them).
    out.write(f"{'session':<32}  {'version':>8}  {'open':>7}  {'idle':>7}  running  closes in\n")
    for s in listing.sessions:
        idle = "-" if s.calls_in_progress else format_duration(s.idle_s)
        if math.isinf(timeout):
            closes = "never"
        elif s.calls_in_progress:  # a call in progress keeps it open however long it lasts
            closes = "after its calls"
        else:
            closes = format_duration(max(0.0, timeout - s.idle_s))
        out.write(
            f"{s.session:<32}  {s.version:>8}  {format_duration(s.open_s):>7}  {idle:>7}  "
            f"{s.calls_in_progress:>7}  {closes}\n"
        )


def cmd_delete_checkpoint(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    try:
        freed = client.delete_checkpoint(_checkpoint(args.name, optional=False))
    except Unimplemented:  # it said "UNIMPLEMENTED: Method not found!" alone (a review)
        raise predates(
            client,
            "DeleteCheckpoint",
            "remove checkpoints",
            f", or remove {args.name}.safetensors from its --state-dir on its machine",
        ) from None
    emit(
        out,
        args,
        {"name": args.name, "bytes": freed},
        f"removed checkpoint {args.name!r} ({_bytes(freed)}) from the server's state directory",
    )


def cmd_checkpoints(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    try:
        found = client.list_checkpoints()
    except Unimplemented:
        raise predates(
            client,
            "ListCheckpoints",
            "list its checkpoints",
            # A server older than LoadCheckpoint too (before 2026-12-03) keeps none, and
            # its load says it predates LoadCheckpoint (a review of versions).
            " (one of 2026-12-03 or later, which has LoadCheckpoint: gradwire load of a name "
            "it does not hold names those it does)",
        ) from None
    if args.json:
        out.write(json_line({"checkpoints": [vars(c) for c in found]}))
        return
    out.write(f"{len(found)} checkpoint{'' if len(found) == 1 else 's'} in the server's state "
              f"directory{':' if found else ' (gradwire save NAME writes one)'}\n")  # fmt: skip
    if not found:
        return
    width = max(len("name"), *(len(c.name) for c in found))
    out.write(
        f"{'name':<{width}}  {'version':>8}  {'size':>10}  {'saved (local time)':<19}  model\n"
    )
    for c in found:
        version = "-" if c.saved_version < 0 else str(c.saved_version)
        saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c.saved_unix_s))
        # What a load would refuse it for, in place of its model's name.
        held = f"cannot be loaded: {c.problem}" if c.problem else c.model
        out.write(f"{c.name:<{width}}  {version:>8}  {_size(c.bytes):>10}  {saved:<19}  {held}\n")


def _size(count: int) -> str:
    """`812 B`, `1.3 MiB`, `2.0 GiB`: a file's size, short, for a table."""
    if count < 1024:
        return f"{count} B"
    for unit, power in (("KiB", 1), ("MiB", 2), ("GiB", 3)):
        if count < 1024 ** (power + 1) or unit == "GiB":
            return f"{count / 1024**power:.1f} {unit}"
    raise AssertionError("unreachable")


def _seconds_text(seconds: float) -> str:
    """`42.5 s`, `1,234,567 s`, `0.0004 s`: as given, never in exponent form past a second."""
    if seconds >= 1:
        return f"{seconds:,.3f}".rstrip("0").rstrip(".") + " s"
    return f"{seconds:g} s"


def _bytes(count: int) -> str:
    """`67,108,864 bytes (64.0 MiB)`: exact, and readable."""
    return f"{count:,} bytes ({count / 2**20:.1f} MiB)"


def _contract(info: ServerInfo) -> str:
    """`gradwire info`'s contract row: the fields the server lists, or, where it lists none,
    what the client sends it for that (fields_known, from its limits' age)."""
    if info.known_fields:
        return f"{len(info.known_fields)} fields of the .proto known (info --json lists them)"
    unlisted = "the fields of the .proto it knows unlisted: a server older than the list, "
    if fields_known(info):
        return unlisted + (
            "and its limits show it is of 2026-12-05 or later (the client sends it forward "
            "--eval and optimizer --keep-state)"
        )
    return unlisted + (
        "its limits older than 2026-12-05 too (the client refuses it forward --eval and "
        "optimizer --keep-state, which it may predate)"
    )


def cmd_info(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    try:
        info = client.server_info()
    except Unimplemented:
        raise predates(
            client,
            "GetServerInfo",
            "describe itself",
            " (gradwire list shows its model and device)",
        ) from None
    if args.json:
        out.write(json_line({**vars(info), "limits": vars(info.limits)}))
        return
    lim = info.limits
    idle = lim.session_idle_timeout_s
    closing = (
        "none is closed for want of calls"
        if math.isinf(idle)
        else f"each closed after {_seconds_text(idle)} without calls"
    )
    pings = (
        f"a ping after {_seconds_text(lim.keepalive_s)} of silence, the connection closed when "
        f"it goes unanswered for {_seconds_text(lim.keepalive_timeout_s)}"
        if lim.keepalive_s
        else "no pings from the server"
    )
    connections = (
        f"one without calls closed after {_seconds_text(lim.connection_idle_s)} (a client "
        "reconnects at its next call; an open watch or stream is a call)"
        if lim.connection_idle_s
        else "one without calls stays open"
    )
    if lim.max_connections:  # 0: no limit, or a server from before it was reported
        connections += (
            f"; at most {lim.max_connections:,} open at once, one more closed as it opens "
            "(UNAVAILABLE)"
        )
    ids = f"at most {lim.max_request_id_chars} characters"
    if lim.last_request_ids_kept:  # 0: a server from before it was reported
        ids += (
            f"; a retry is matched to its first attempt while its id is kept: "
            f"{_seconds_text(lim.request_id_kept_s)} after its last use, or while among the "
            f"last {lim.last_request_ids_kept:,} ({lim.max_request_ids_kept:,} ids at most)"
        )
    rows = [
        ("message size", f"at most {_bytes(lim.max_message_bytes)} each way"),
        (
            "tensor values",
            f"at most {_bytes(lim.max_value_bytes)} in one message; larger ones stream, "
            f"{_bytes(lim.default_chunk_bytes)} a chunk by default",
        ),
        ("elements", f"at most {lim.max_elements:,} in a tensor sent or made"),
        ("dimensions", f"at most {lim.max_dims}"),
        ("names", f"at most {lim.max_name_chars} characters"),
        ("histogram bins", f"at most {lim.max_histogram_bins:,}"),
        ("steps per Train", f"at most {lim.max_train_steps:,}"),
        ("request ids", ids),
        (
            "retry answers",
            f"the latest {_bytes(lim.answer_bytes_kept)} kept; a retry whose answer was let "
            "go is refused (ANSWER_NOT_KEPT), not applied again",
        ),
        ("calls at once", f"{lim.max_concurrent} (an open watch or stream holds one)"),
        ("batches", f"at most {lim.max_batch_calls:,} calls in one Batch"),
        ("selectors", f"at most {lim.max_selectors:,} in one watch or one step's fetch"),
        (
            "index chains",
            f"at most {lim.max_index_chain} indexes in one selector, x[0][1]..., one a bracket",
        ),
        (
            "health watches",
            f"at most {lim.max_health_watches} open at once; past that, poll (gradwire health)",
        ),
        (
            "reflection",
            f"at most {lim.max_reflection_streams} streams open at once (grpcurl, an IDE); "
            "one more is refused",
        ),
        ("sessions", f"{lim.max_sessions} beside the default one; {closing}"),
        (
            "keepalive",
            f"{pings}; a client may ping a quiet connection every "
            f"{_seconds_text(lim.min_client_ping_s)} at most, or it is closed",
        ),
        ("connections", connections),
        ("contract", _contract(info)),
    ]
    # A server from before these limits were reported answers 0 for them: left out.
    unreported = {
        "retry answers": not lim.answer_bytes_kept,
        "health watches": not lim.max_health_watches,
        "reflection": not lim.max_reflection_streams,
        "batches": not lim.max_batch_calls,
        "selectors": not lim.max_selectors,
        "index chains": not lim.max_index_chain,
    }
    rows = [(name, text) for name, text in rows if not unreported.get(name)]
    # The instance: which server counted the state versions shown (one started again
    # counts afresh); none from a server older than it.
    instance = f", instance {info.instance_id}" if info.instance_id else ""
    out.write(
        f"gradwire {info.version} with PyTorch {info.torch_version}, models on {info.device}"
        f"{instance}\n"
    )
    width = max(len(name) for name, _ in rows)
    for name, text in rows:
        # Wrapped to INFO_COLUMNS, the text's column kept (one row ran to 168 characters),
        # and never between a number and its unit.
        kept = _NUMBER_AND_UNIT.sub("\\1\xa0\\2", text)
        lines = textwrap.wrap(kept, INFO_COLUMNS - width - 2, break_on_hyphens=False)
        for i, line in enumerate(lines):
            out.write(f"{'' if i else name:<{width}}  {line}\n".replace("\xa0", " "))


#: The width `gradwire info` wraps its rows to.
INFO_COLUMNS = 100
_NUMBER_AND_UNIT = re.compile(r"(\d) (s|bytes|MiB)\b")


def cmd_optimizer(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    names = ("lr", "momentum", "weight_decay", "beta1", "beta2", "eps", "nesterov")
    given = {n: getattr(args, n) for n in names}
    _refuse_settings_of_two_kinds(args.kind, given)
    if args.kind is None and all(v is None for v in given.values()):
        # Asked for nothing: the optimizer in place, unchanged. It replaced it with SGD at
        # lr 1.0, losing an Adam and its state to a look (found by a review of the CLI).
        listing = client.list_tensors()
        version, config, said = (
            listing.version,
            listing.optimizer,
            "; --keep-state changes the settings given: give one"
            if args.keep_state
            else "; --kind or a setting replaces it",
        )
    elif args.keep_state:  # the kind in place unless --kind says; the server checks it
        version, config = client._set_optimizer(args.kind, given, keep_state=True)
        said = ", its state kept"
    else:
        version, config = client._set_optimizer(_optimizer_kind(args, given, client), given)
        said = ""
    # Every setting of either kind, null where this kind has none: the shape of list
    # --json's "optimizer", which this had only the kind's of (found by a review of the CLI
    # as a researcher).
    emit(
        out,
        args,
        {"version": version, **vars(config)},
        f"{_describe_optimizer(config)} (version {version}{said})",
    )


#: The settings one kind of optimizer has and the other has not; lr and weight_decay are both's.
_SETTINGS_OF = {"sgd": ("momentum", "nesterov"), "adam": ("beta1", "beta2", "eps")}
_KIND_NAMES = {"sgd": "SGD", "adam": "Adam"}


def _refuse_settings_of_two_kinds(kind: str | None, given: dict[str, object]) -> None:
    """A usage error (exit 2) where the arguments alone say a setting belongs to the other
    kind: `--kind adam --momentum 0.9`, or `--beta1 0.5 --momentum 0.9` without --kind. The
    server refused them, exit 1, in its API's words ("ask for SGD"), and the second as "a
    setting of SGD, not of Adam" to a user who had not asked for Adam (found by a review of
    the CLI from its --help, seventy-fourth session). Under --keep-state without --kind the
    kind in place decides, which the server knows."""
    flags = {
        k: [
            "--no-nesterov" if given[n] is False else f"--{n.replace('_', '-')}"
            for n in names
            if given[n] is not None
        ]
        for k, names in _SETTINGS_OF.items()
    }
    if kind is not None:
        other = "adam" if kind == "sgd" else "sgd"
        if flags[other]:
            raise UsageError(
                f"{', '.join(flags[other])}: {_KIND_NAMES[other]}'s, not {_KIND_NAMES[kind]}'s "
                f"(--kind {kind}): leave {'them' if len(flags[other]) > 1 else 'it'} out, or "
                f"give --kind {other}"
            )
    elif flags["sgd"] and flags["adam"]:
        raise UsageError(
            f"{', '.join(flags['adam'])} {'are' if len(flags['adam']) > 1 else 'is'} Adam's and "
            f"{', '.join(flags['sgd'])} SGD's: give the settings of one kind"
        )


def _optimizer_kind(
    args: argparse.Namespace, given: dict[str, object], client: Client
) -> Literal["sgd", "adam"]:
    """The kind `optimizer` replaces the optimizer with: --kind; else the kind the settings
    given belong to (Adam's betas and eps, SGD's momentum and nesterov); else the kind in
    place. It was SGD whatever was in place: `--lr 0.01` turned an Adam into an SGD, and
    `--beta1 0.5` under Adam was refused as "a setting of Adam, not of SGD" (found by a
    review of the CLI)."""
    if args.kind is not None:
        return cast(Literal["sgd", "adam"], args.kind)  # argparse's choices
    if any(given[n] is not None for n in ("beta1", "beta2", "eps")):
        return "adam"
    if any(given[n] is not None for n in ("momentum", "nesterov")):
        return "sgd"
    return "adam" if client.list_tensors().optimizer.kind == "adam" else "sgd"


def cmd_health(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    status = client.health(args.service)
    emit(out, args, {"status": status}, status)
    if status != "SERVING":
        raise CommandError(f"the server at {args.target} is {status}")
