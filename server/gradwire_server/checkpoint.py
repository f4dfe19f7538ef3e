"""Checkpoints of a Trainer's state in safetensors: tensors and plain-text metadata, no pickle.

One file holds the parameters, the gradients that exist, the model's buffers that PyTorch
keeps in a state_dict (BatchNorm's running statistics; checkpoints before the forty-fifth
session hold none), the optimizer's tensor state (momentum buffers, Adam's moments and step
counts), the state of the model's random stream (random_stream.py; from the forty-eighth
session) and, as metadata, the state version, the model's name and the optimizer's settings,
and a SHA-256 of all of it (CHECKSUM; from the fifty-third session), which a load checks.
It is written to a temporary file and renamed, so a crash mid-write leaves the previous
checkpoint whole. `optimizer_settings` and `unfit` say what of a loaded file a model and
its optimizer cannot take, for the trainer to refuse it (Trainer._load).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from stat import S_ISREG
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from gradwire_server.errors import out_of_memory
from gradwire_server.fills import dtype_name
from gradwire_server.optimizers import STATE_KEYS, OptimizerSettings

FILE_NAME = "state.safetensors"

FORMAT = "gradwire-checkpoint-1"
#: The checkpoint `gradwire serve --state-dir` restores at start and writes at a graceful
#: stop, by the name SaveCheckpoint and LoadCheckpoint give it.
DEFAULT_NAME = FILE_NAME.removesuffix(".safetensors")
SUFFIX = ".safetensors"
#: How the advice in a refusal of a checkpoint at a server's start ends, where moving the
#: file away starts the server afresh; and what `at_runtime` puts instead for a load asked
#: of a running server (LoadCheckpoint), which changed nothing.
AT_START = ", or move it away to start from fresh weights"
#: The advice for a checkpoint of another model, at a server's start.
OTHER_MODEL = f"serve the model it holds (--model), give another --state-dir{AT_START}"


#: The advice for a checkpoint the host has not the memory left to read, at a server's start
#: (no session there yet to close).
NO_MEMORY = f"free memory on the host (its other processes){AT_START}"


def at_runtime(message: str) -> str:
    """A refusal's `message`, worded for a load asked of a running server: its start-up
    advice (another --state-dir, fresh weights) does not apply there."""
    message = message.replace(
        OTHER_MODEL, "serve the model it holds (--model), or load a checkpoint of this one"
    ).replace(NO_MEMORY, "free memory on the host (its other processes, this server's sessions)")
    return message.replace(AT_START, "") + "; nothing was changed"


#: The metadata key of a checkpoint's checksum: the SHA-256 (`checksum`) of every tensor's name,
#: dtype, shape and bytes and of the rest of its metadata. A checkpoint with a bit flipped on
#: disk or in a copy loaded as a changed weight, unsaid (found by a review of the state's
#: handling). A load refuses one that does not match; one without it (saved before the
#: fifty-third session, or by other tools) loads unchecked, as it did.
CHECKSUM = "sha256"


def checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """The hex SHA-256 of a checkpoint's contiguous CPU `tensors` and `metadata` (its CHECKSUM
    key left out), each entry's name, dtype and shape fed as a JSON list before its bytes,
    so that no two different contents feed it the same bytes."""
    digest = _Digest(metadata)
    for key in sorted(tensors):
        digest.add(key, tensors[key])
    return digest.hexdigest()


class _Digest:
    """`checksum`, fed one tensor at a time, in the order of their sorted names: for a load,
    which reads a checkpoint a tensor at a time and keeps only some of them."""

    def __init__(self, metadata: dict[str, str]) -> None:
        self._sha = hashlib.sha256()
        for key in sorted(metadata):
            if key != CHECKSUM:
                self._sha.update(json.dumps([key, metadata[key]]).encode())

    def add(self, key: str, tensor: torch.Tensor) -> None:
        self._sha.update(json.dumps([key, str(tensor.dtype), list(tensor.shape)]).encode())
        # Bytes as they lie, without a copy: a bfloat16 has no numpy dtype, a uint8 view does.
        self._sha.update(_bytes(tensor))

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def _bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU `tensor`, without a copy."""
    flat = tensor.reshape(-1)
    if flat.numel() == 1 and flat.stride() != (1,):
        # One value seen through a stride of 0 (a 0-d buffer expanded to [1]) is contiguous
        # to torch, but its view as bytes was refused, and with it the whole save.
        flat = flat.as_strided((1,), (1,))
    return flat.view(torch.uint8).numpy().data


#: What a checkpoint's name may be: a plain file name in the state directory, never a path.
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")


def path_for(state_dir: Path, name: str) -> Path:
    """Where the checkpoint `name` ("" for the default) lies in `state_dir`; ValueError,
    saying what a name may be, for one that is not a plain name."""
    name = name or DEFAULT_NAME
    if not _NAME.fullmatch(name):
        shown = name if len(name) <= 120 else name[:100] + "..."
        raise ValueError(
            f"checkpoint name {shown!r}: give 1 to 100 ASCII letters, digits, '.', '_' or '-', "
            "not beginning with '.' (a name, not a path: checkpoints lie in the server's "
            "state directory)"
        )
    return state_dir / (name + SUFFIX)


def name_of(path: Path) -> str:
    """The name SaveCheckpoint and LoadCheckpoint give the checkpoint at `path`."""
    return path.name.removesuffix(SUFFIX)


def saved_names(state_dir: Path) -> list[str]:
    """The names of the checkpoints in `state_dir`, sorted."""
    try:
        found = [p.name for p in state_dir.iterdir() if p.is_file()]
    except OSError:
        return []
    stems = [n.removesuffix(SUFFIX) for n in found if n.endswith(SUFFIX)]
    return sorted(n for n in stems if _NAME.fullmatch(n))


#: The folder of a state dir that a checkpoint is written in before it is renamed into
#: place. safetensors writes a temporary file of its own beside the file it is given, and
#: renames that: a save killed midway left it in the state dir, a whole checkpoint's size,
#: each kill another (found by a review of the state's handling). In here, the server
#: clears what a save cut short left (clear_unfinished) when it starts.
SAVING = ".saving"


class StateDirChanged(OSError):
    """The state dir, or a file the server keeps in it, is not as the server made it; its
    strerror says what, and what to do."""


#: What keeps each state dir a server holds its own (app.hold_state_dir), by state dir:
#: called before each save there.
_HELD: dict[Path, Callable[[], None]] = {}
_HELD_LOCK = threading.Lock()


@contextlib.contextmanager
def held_by(state_dir: Path, keep: Callable[[], None]) -> Iterator[None]:
    """Within the block, each save in `state_dir` first calls `keep`, which makes the
    folder again if it was removed and takes the server's lock again where it no longer
    holds the folder's (raising where another server does)."""
    with _HELD_LOCK:
        _HELD[state_dir] = keep
    try:
        yield
    finally:
        with _HELD_LOCK:
            _HELD.pop(state_dir, None)


def saving_folder(state_dir: Path) -> Path:
    """`state_dir`'s SAVING folder, made when missing, and the state dir too (held_by: its
    lock taken again); OSError, saying why in its strerror, when SAVING is not a folder of
    its own, or when another server holds a state dir made again in place of this one's.
    A link there was followed: the server emptied the folder it pointed to at start and
    wrote its unfinished files there; a file there passed the start's check, and every
    save, the stop's too, failed "File exists"; a state dir removed while the server ran
    was made again by the next save, without the lock that keeps a second server out of it
    (found by a review of checkpoints). Refusing that save lost the run at the stop (a
    review of the fix)."""
    folder = state_dir / SAVING
    with _HELD_LOCK:
        keep = _HELD.get(state_dir)
    if keep is None:
        state_dir.mkdir(parents=True, exist_ok=True)
    else:
        try:
            keep()
        except Exception as err:  # InvalidInput, BAD_STATE_DIR: said as the save's failure
            raise StateDirChanged(
                errno.EBUSY,
                "the state directory was removed while the server ran, and the one in its "
                f"place could not be held ({getattr(err, 'message', err)})",
                str(state_dir),
            ) from err
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise StateDirChanged(
            errno.ENOTDIR,
            f"{SAVING} in the state directory, where saves write before renaming, is "
            f"{'a link' if folder.is_symlink() else 'a file'}, not a folder of its own: "
            "remove it",
            str(folder),
        )
    folder.mkdir(exist_ok=True)
    return folder


def clear_unfinished(state_dir: Path) -> tuple[int, int]:
    """Removes what saves cut short (a kill, a power cut) left in `state_dir`: everything in
    its SAVING folder, and the ".NAME.safetensors.*.partial" files saves wrote beside their
    checkpoints before it. For a server that holds the state dir (no save of another's under
    way). Returns (files removed, their bytes); what cannot be removed stays, unsaid. A
    SAVING that is a link is not followed (saving_folder refuses it at start)."""
    saving = state_dir / SAVING
    left = ([] if saving.is_symlink() else list(saving.glob("*"))) + [
        p for p in state_dir.glob(f".*{SUFFIX}.*.partial") if p.is_file()
    ]
    removed = size = 0
    for path in left:
        try:
            bytes_ = path.stat().st_size
            path.unlink()
        except OSError:
            continue
        removed, size = removed + 1, size + bytes_
    return removed, size


def save(
    path: Path,
    *,
    version: int,
    model: str,
    optimizer: Any,
    settings: Any,
    parameters: dict[str, torch.nn.Parameter],
    buffers: dict[str, torch.Tensor],
    random: tuple[str, torch.Tensor] | None = None,
    keep_free: bool = False,
    steps: int | None = None,
) -> int:
    """Writes the state to `path` atomically; returns the bytes written. `random`: the
    model's random stream, as the type of device whose generator it is ("cpu":
    random_stream.py) and that generator's state. `steps`: the Steps applied to the model,
    which a watch's updates count (None: not written). With `keep_free` (a caller's save, not
    the server's own at a stop), refused, OSError ENOSPC, when it would leave less than
    `reserve()` free on the disk (`check_room`)."""
    tensors: dict[str, torch.Tensor] = {}
    if random is not None:
        device_type, state = random
        tensors[f"random/{device_type}"] = state.detach().to("cpu", copy=True).contiguous()
    names = {id(p): name for name, p in parameters.items()}
    for name, p in parameters.items():
        tensors[f"param/{name}"] = p.detach().to("cpu").contiguous()
        if p.grad is not None:
            tensors[f"grad/{name}"] = p.grad.detach().to("cpu").contiguous()
    for name, b in buffers.items():
        # A copy: safetensors refuses tensors that share memory, and a buffer may view
        # another (or a parameter).
        tensors[f"buffer/{name}"] = b.detach().to("cpu", copy=True).contiguous()
    scalars: dict[str, dict[str, Any]] = {}
    for p, state in optimizer.state.items():
        name = names[id(p)]
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{name}/{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(name, {})[key] = value
    metadata = {
        "format": FORMAT,
        "version": str(version),
        "model": model,
        "optimizer": json.dumps(dataclasses.asdict(settings)),
        "optimizer_scalars": json.dumps(scalars),
    }
    if steps is not None:
        metadata["steps"] = str(steps)
    metadata[CHECKSUM] = checksum(tensors, metadata)
    folder = saving_folder(path.parent)  # where safetensors' own temporary file lands too
    if keep_free:
        need = sum(t.numel() * t.element_size() for t in tensors.values())
        check_room(folder, need, _replaced(path))
    # A name of its own: two sessions saving one name at once (on a GPU each has a thread)
    # wrote one ".partial", and the loser's rename found it gone (found by a review). Made
    # as a plain open makes a file, for the mode the umask gives it, which the checkpoint
    # is given: safetensors writes through a temporary file of its own, made 0600, and
    # every checkpoint was unreadable to the server's group (found by a review).
    partial = folder / f"{path.name}.{secrets.token_hex(8)}.partial"
    made = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    mode = os.fstat(made).st_mode & 0o777
    os.close(made)
    try:
        try:
            save_file(tensors, str(partial), metadata=metadata)
        except SafetensorError as err:  # its I/O errors, as the OSError they are
            raise _os_error(err) from err
        os.chmod(partial, mode)
        # On disk before the rename, and the rename too: after a power cut the file was
        # otherwise either the old one or the new one only as far as the page cache had got.
        _sync(partial)
        # Its size before it lands: once there, another client may remove it (a save
        # answered "could not write checkpoint: No such file or directory" of a checkpoint
        # written and deleted since: a review of running the server for others).
        size = partial.stat().st_size
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)  # a disk left full by half a checkpoint helps no one
        raise
    _sync(path.parent)
    return size


def reserve(total: int) -> int:
    """What a caller's save leaves free on a disk of `total` bytes: 5% of it (what ext4
    keeps for root by default, which a server running as root, as in a container, may
    take), at most 1 GiB."""
    return min(1 << 30, total // 20)


def check_room(folder: Path, need: int, replaced: int = 0) -> None:
    """Raises OSError ENOSPC when writing `need` bytes in `folder`, and letting go of the
    `replaced` bytes of the file they take the place of, would leave less than `reserve()`
    free on its disk. Checkpoints are saved under any name a caller gives: without it,
    saves filled the disk, and with it every other process's writes on the host (its logs,
    its package manager), before the first save failed. A disk whose room cannot be asked
    (a file system without statfs) is not checked: its save was refused as a state
    directory the server cannot write."""
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return
    kept = reserve(usage.total)
    # A save under a name it had saved before (a script's "latest" each epoch) was refused
    # for the whole file, where the disk ended as full as it was.
    left = usage.free - need + replaced
    if left < kept:
        raise OSError(
            errno.ENOSPC,
            f"its {_mib(need)} would leave {_mib(max(0, left))} free on the disk, under the "
            f"{_mib(kept)} a save leaves for the rest of the host",
        )


def _replaced(path: Path) -> int:
    """The bytes a save to `path` lets go of: the file there, where it is the disk's only
    name for them (a link is replaced, not its target; a file linked elsewhere stays)."""
    try:
        found = path.lstat()
    except OSError:
        return 0
    return found.st_size if S_ISREG(found.st_mode) and found.st_nlink == 1 else 0


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def _os_error(err: SafetensorError) -> OSError:
    """safetensors' "I/O error: No space left on device (os error 28)" as an OSError with
    that errno, for callers to tell a full disk from the rest."""
    found = re.search(r"I/O error: (.*?) \(os error (\d+)\)", str(err))
    if found is None:
        return OSError(str(err))
    return OSError(int(found.group(2)), found.group(1))


def _sync(path: Path) -> None:
    """fsync a file or folder (a folder's fsync makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Saved(NamedTuple):
    """What a save wrote: the state version and the file's size."""

    version: int
    bytes: int


@dataclasses.dataclass
class Loaded:
    """A checkpoint as `load` read it. Every tensor here is one of its own, in the host's
    memory: none views the file, which is neither mapped nor open once `close` is called.
    safetensors' `load_file` mapped the file, and on the CPU the gradients, optimizer moments
    and random state the trainer kept were views of that mapping: it stayed for as long as
    the server ran, the file's size resident, a deleted checkpoint's disk space taken, the
    first step after a load slowed by page faults (found by a review, serving a 1.4 GB model).
    The parameters, which a load copies into the model's own tensors, are not held: in
    `parameters` as their names, dtypes and shapes ("meta" tensors, no values), their values
    read one at a time from the file, kept open until `close`, by `parameter`."""

    version: int
    model: str
    settings: dict[str, Any]
    #: on the "meta" device: dtype and shape alone (`parameter` reads the values)
    parameters: dict[str, torch.Tensor]
    gradients: dict[str, torch.Tensor]
    optimizer_state: dict[str, dict[str, Any]]
    buffers: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    #: the model's random stream, by the type of device whose generator's state it is (none
    #: in a checkpoint written before the forty-eighth session)
    random: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    #: the Steps applied to the model when it was saved (None in a checkpoint written before
    #: the seventy-first session)
    steps: int | None = None
    #: the file, open for `parameter`, and the CRC-32 of each parameter's bytes as the load
    #: read them and took its checksum
    _file: Any = dataclasses.field(default=None, repr=False)
    _sums: dict[str, int] = dataclasses.field(default_factory=dict, repr=False)

    def parameter(self, name: str) -> torch.Tensor:
        """Parameter `name`'s values, read from the file now: a tensor of its own. Unfit when
        they are not the bytes the load read and checked (the file was written in place
        since: the server's own saves replace a file whole, which leaves this one's open
        file as it was); MemoryError when the host has not the room for them."""
        if self._file is None:  # a caller's slip, not the file's: no Unfit
            raise RuntimeError(f"parameter {name} read after the checkpoint was closed")
        with _memory_error():
            try:
                tensor: torch.Tensor = self._file.get_tensor(f"param/{name}")
            except SafetensorError as err:  # its bytes cut short since
                raise damaged(f"its parameter {name} could not be read again ({err})") from err
        if zlib.crc32(_bytes(tensor)) != self._sums[name]:
            raise damaged(f"its parameter {name} changed on disk while it was loaded")
        return tensor

    def close(self) -> None:
        """Closes the file (`parameter` reads no more); closing twice is harmless."""
        if self._file is not None:
            self._file.__exit__(None, None, None)
            self._file = None

    def __enter__(self) -> Loaded:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def _memory_error() -> Iterator[None]:
    """Raises torch's "can't allocate memory" RuntimeError as the MemoryError it is."""
    try:
        yield
    except RuntimeError as err:
        if out_of_memory(err):
            raise MemoryError(str(err)) from err
        raise


class Unfit(ValueError):
    """A file `load` refuses: its message says why and what to do, `what` why in a few words
    (ListCheckpoints' `problem`)."""

    def __init__(self, message: str, what: str) -> None:
        super().__init__(message)
        self.what = what


def load(path: Path) -> Loaded:
    """Reads a checkpoint written by `save`; ValueError (Unfit) when it is not one, or is one
    whose checksum or metadata is damaged (a key missing, one that is not what `save`
    writes), or that cannot be read; MemoryError when it does not fit in memory. The file is
    read, never mapped, one tensor at a time, in the order `checksum` takes them: each
    parameter's bytes go into the checksum and are let go (`Loaded.parameter` reads them
    again), the rest are kept. So the checksum is checked before anything is returned, and
    the host holds the checkpoint less its parameters, not the whole file, at once. The
    caller closes what it returns (`Loaded.close`, or a `with` block)."""
    metadata = _header(path)
    try:
        file = safe_open(str(path), framework="pt", backend="pread")
    except SafetensorError as err:
        raise _not_safetensors(path, err) from err
    loaded = Loaded(0, "", {}, {}, {}, {}, _file=file)
    try:
        sums = _read(path, loaded, metadata)
        version, model, settings, state, loaded.steps = _checked_metadata(metadata)
    except BaseException:
        loaded.close()
        raise
    for name, values in loaded.optimizer_state.items():  # beside the scalars, as saved
        state.setdefault(name, {}).update(values)
    loaded.version, loaded.model, loaded.settings = version, model, settings
    loaded.optimizer_state, loaded._sums = state, sums
    return loaded


def _read(path: Path, loaded: Loaded, metadata: dict[str, str]) -> dict[str, int]:
    """Reads the tensors of the checkpoint `loaded._file` into `loaded`, parameters as their
    dtypes and shapes alone, checking its checksum (`_check_sum`); the CRC-32 of each
    parameter's bytes, by name."""
    digest = _Digest(metadata) if CHECKSUM in metadata else None
    sums: dict[str, int] = {}
    for key in sorted(loaded._file.keys()):
        with _memory_error():
            try:
                tensor = loaded._file.get_tensor(key)
            except SafetensorError as err:
                raise _not_safetensors(path, err) from err
        if digest is not None:
            digest.add(key, tensor)
        kind, _, rest = key.partition("/")
        if kind == "param":
            sums[rest] = zlib.crc32(_bytes(tensor))
            loaded.parameters[rest] = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
        elif kind == "grad":
            loaded.gradients[rest] = tensor
        elif kind == "buffer":
            loaded.buffers[rest] = tensor
        elif kind == "random":
            loaded.random[rest] = tensor
        elif kind == "optim":
            name, _, field = rest.rpartition("/")
            loaded.optimizer_state.setdefault(name, {})[field] = tensor
        del tensor  # a parameter's bytes: let go before the next is read
    if digest is not None:
        _check_sum(digest.hexdigest(), metadata)  # first: what a changed bit did is moot
    return sums


def _check_sum(found: str, metadata: dict[str, str]) -> None:
    """Refuses, as damaged, a checkpoint whose contents' checksum, `found`, is not the one
    saved with them; one without a checksum passes."""
    saved = metadata.get(CHECKSUM)
    if saved is not None and found != saved:
        raise damaged(
            "its contents are not what was saved (their SHA-256 differs from the one saved "
            "with them: a bit changed on disk or in a copy, or the file was edited)"
        )


def _not_safetensors(path: Path, err: SafetensorError) -> Unfit:
    """The refusal of a file safetensors could not read, its header or its tensors: one cut
    short is damaged, not "not a safetensors file", which a truncated copy was called, with
    nothing before the advice's "or" (found by a review of the CLI)."""
    held, said = _sizes(path)
    if said is not None and held != said:
        what = (
            f"cut short: it ends at byte {held:,}, before the {said:,} its safetensors header needs"
            if held < said
            else f"longer ({held:,} bytes) than the {said:,} its safetensors header accounts for"
        )
        return Unfit(
            f"it is {what} ({err}): restore it from a copy{AT_START}",
            "damaged: cut short" if held < said else "damaged: bytes past its tensors",
        )
    return Unfit(
        f"it is not a safetensors file ({err}): put a gradwire checkpoint there{AT_START}",
        "not a safetensors file",
    )


def _sizes(path: Path) -> tuple[int, int | None]:
    """The bytes `path` holds, and those its safetensors header says it holds (the header's
    length, the header, and the end of its last tensor's data); None for the second when it
    does not begin as a safetensors file does. safetensors says "file not fully covered" of
    a file both shorter and longer than that (found by a review)."""
    try:
        with path.open("rb") as f:
            start = f.read(8)
            held = os.fstat(f.fileno()).st_size
            length = int.from_bytes(start, "little") if len(start) == 8 else 0
            # Too short for its header (the 8 bytes of its length, then the header): cut
            # within it, or none. Compared with the header's length alone, a file cut within
            # the header's last 8 bytes was "not a safetensors file" (its JSON cut short).
            if not 2 <= length <= held - 8:
                first = f.read(1)
                return held, (8 + length if first == b"{" and 8 + length > held else None)
            header = json.loads(f.read(length))
    except (OSError, ValueError):  # a header that is no JSON: not one
        return 0, None
    try:
        ends = [
            int(entry["data_offsets"][1])
            for key, entry in header.items()
            if key != "__metadata__" and "data_offsets" in entry
        ]
    except (AttributeError, TypeError, ValueError, IndexError, KeyError):  # no safetensors'
        return held, None
    return held, 8 + length + max(ends, default=0)


def _header(path: Path) -> dict[str, str]:
    """The metadata of the gradwire checkpoint at `path`, read from its header alone; Unfit
    for a file that is not one of this format, or cannot be read."""
    # Not a file (a folder, a FIFO, a device): the server waited for ever at start opening a
    # FIFO, and a folder was said to need read access (found by a review of the state's
    # handling). A link to a file is a file.
    if path.exists() and not path.is_file():
        raise Unfit(
            f"it is a folder or a special file, not a checkpoint: put the checkpoint's file "
            f"there{AT_START}",
            "not a file",
        )
    try:
        # Opened here first: safetensors says "No such file or directory" of a file it may not
        # read, and "No such device" of a folder (found by a review of deployment).
        path.open("rb").close()
    except OSError as err:
        why = (err.strerror or str(err)).lower()
        raise Unfit(
            f"it cannot be read ({why}): give the server's user read access to it{AT_START}",
            f"cannot be read ({why})",
        ) from None
    try:
        with safe_open(str(path), framework="pt", backend="pread") as f:  # not mapped
            metadata = f.metadata() or {}
    except SafetensorError as err:
        raise _not_safetensors(path, err) from err
    except OSError as err:  # removed since the open above (a DeleteCheckpoint: a review)
        why = (err.strerror or str(err)).lower()
        raise Unfit(
            f"it cannot be read ({why}): give the server's user read access to it{AT_START}",
            f"cannot be read ({why})",
        ) from None
    found = metadata.get("format", "")
    if found.startswith("gradwire-checkpoint-") and found != FORMAT:
        raise Unfit(
            f"it is a gradwire checkpoint of another format ({found!r}; this gradwire "
            f"reads {FORMAT!r}): load it with the gradwire version that wrote it{AT_START}",
            f"a gradwire checkpoint of another format, {found!r}",
        )
    if found != FORMAT:
        raise Unfit(
            f"it is not a gradwire checkpoint (its metadata lacks format {FORMAT!r}): "
            f"give one that SaveCheckpoint or a server's --state-dir wrote{AT_START}",
            "not a gradwire checkpoint",
        )
    return metadata


@dataclasses.dataclass(frozen=True)
class Described:
    """A checkpoint in a state directory, as its file and header describe it
    (ListCheckpoints' CheckpointInfo)."""

    name: str
    bytes: int
    saved_unix_s: float  # the file's modification time
    saved_version: int  # -1: the header does not say
    model: str  # "": the header does not say
    problem: str  # "": a checkpoint of the model asked about, as far as its header tells


def described(state_dir: Path, model: str) -> list[Described]:
    """The checkpoints in `state_dir`, sorted by name, each with what would stop a server of
    `model` loading it, as far as its header tells (its tensors are not read). One removed
    while they are listed is left out."""
    found = []
    for name in saved_names(state_dir):
        path = state_dir / (name + SUFFIX)
        try:
            stat = path.stat()
        except OSError:
            continue
        version, held, problem = -1, "", ""
        try:
            metadata = _header(path)
            held = metadata.get("model", "")
            version, held, _, _, _ = _checked_metadata(metadata)
        except Unfit as err:
            if not path.exists():  # removed since it was listed: left out
                continue
            problem = err.what
        else:
            if held != model:
                problem = f"another model, {held!r}"
        found.append(Described(name, stat.st_size, stat.st_mtime, version, held, problem))
    return found


def other_model(
    path: Path, held: str, theirs: dict[str, torch.Tensor], served: str, mine: dict[str, Any]
) -> str:
    """Why the checkpoint at `path`, of a model `held` with parameters `theirs`, is another
    model's than the `served` one's, whose are `mine` (a ValueError's words, OTHER_MODEL's
    advice after them): the parameters that differ, by name, dtype or shape, the first
    `_SHOWN` of them; "" where it is the same model's. A parameter of another dtype was
    told the checkpoint was damaged, to be restored from a copy (a review of serving one's
    own model); both models' every parameter, a page for a large model, hid the one that
    differed."""

    def what(t: Any) -> str:
        return f"{dtype_name(t.dtype)} {list(t.shape)}"

    differ = [
        f"{name} {what(theirs[name])} in it, {what(mine[name])} served"
        if name in theirs and name in mine
        else f"{name} in it alone"
        if name in theirs
        else f"{name} not in it"
        for name in [*mine, *(n for n in theirs if n not in mine)]  # in the model's order
        if name not in theirs or name not in mine or what(theirs[name]) != what(mine[name])
    ]
    shown = "; ".join(differ[:_SHOWN]) + (
        f"; and {len(differ) - _SHOWN} more" if len(differ) > _SHOWN else ""
    )
    if held != served:
        named = f"{path} holds a {held}, where this server serves {served}"
        return f"{named} (parameters that differ: {shown}): " if differ else f"{named}: "
    return (
        f"{path} holds a {held} whose parameters are not this server's: {shown}: " if differ else ""
    )


#: How many differing parameters a refusal of another model's checkpoint names.
_SHOWN = 8


def damaged(what: str) -> Unfit:
    """The error for a gradwire checkpoint whose metadata is not what `save` writes (its
    path is named by the message it is given in: "cannot load PATH: ...")."""
    return Unfit(
        f"it is a damaged gradwire checkpoint: {what}; restore it from a copy{AT_START}",
        f"damaged: {what}",
    )


#: The largest state version a checkpoint may hold: 2^62, far past any run's, leaving room
#: to count on in the .proto's int64. One at int64's end (2^63 - 1) loaded, then its next
#: mutation was applied and answered INTERNAL, and every read after (found by a review).
MAX_VERSION = 2**62


def _checked_metadata(
    metadata: dict[str, str],
) -> tuple[int, str, dict[str, Any], dict[str, dict[str, Any]], int | None]:
    """The version, model name, optimizer settings, optimizer scalars and count of Steps
    `save` wrote, each checked for the form `save` gives it (the count None where it wrote
    none: an older checkpoint). A missing or altered key used to escape as a KeyError or
    TypeError traceback where other bad files are refused with a message."""
    missing = [
        k for k in ("version", "model", "optimizer", "optimizer_scalars") if k not in metadata
    ]
    if missing:
        raise damaged(f"its metadata lacks {', '.join(repr(k) for k in missing)}")
    text = metadata["version"]
    if not _whole(text):
        raise damaged(f"its version {text!r} is not a whole number from 0 to {MAX_VERSION}")
    model = metadata["model"]
    if not model:
        raise damaged("its model name is empty")
    parsed: dict[str, Any] = {}
    for key in ("optimizer", "optimizer_scalars"):
        try:
            parsed[key] = json.loads(metadata[key])
        except ValueError as err:
            raise damaged(f"its {key!r} metadata is not JSON ({err})") from None
        if not isinstance(parsed[key], dict):
            raise damaged(f"its {key!r} metadata is not a JSON object")
    settings: dict[str, Any] = parsed["optimizer"]
    scalars: dict[str, Any] = parsed["optimizer_scalars"]
    for name, values in scalars.items():
        if not isinstance(values, dict) or not all(
            value is None or isinstance(value, (bool, int, float)) for value in values.values()
        ):
            raise damaged(f"its optimizer state for {name!r} is not an object of numbers")
    # A step moves the version by one: no count of steps is larger than a version may be.
    steps = metadata.get("steps")
    if steps is not None and not _whole(steps):
        raise damaged(f"its count of steps {steps!r} is not a whole number from 0 to {MAX_VERSION}")
    return int(text), model, settings, scalars, None if steps is None else int(steps)


def _whole(text: str) -> bool:
    """Whether `text` is a whole number from 0 to MAX_VERSION, in ASCII digits."""
    return text.isascii() and text.isdigit() and int(text) <= MAX_VERSION


def optimizer_settings(saved: dict[str, Any]) -> OptimizerSettings:
    """The optimizer settings a checkpoint holds, as `save` writes them: every field of
    OptimizerSettings and no other, each of its type; ValueError otherwise (a field
    unknown here was a TypeError traceback, an unknown kind loaded as Adam)."""
    fields = [f.name for f in dataclasses.fields(OptimizerSettings)]
    unknown = [repr(name) for name in saved if name not in fields]
    if unknown:
        raise damaged(f"its optimizer settings hold fields unknown here: {', '.join(unknown)}")
    missing = [repr(name) for name in fields if name not in saved]
    if missing:
        raise damaged(f"its optimizer settings lack {', '.join(missing)}")
    if saved["kind"] not in ("sgd", "adam"):
        raise damaged(f"its optimizer {saved['kind']!r} is not 'sgd' or 'adam'")
    for name in fields:
        value = saved[name]
        if name == "kind" or value is None:
            continue
        if name == "nesterov" and not isinstance(value, bool):
            raise damaged(f"its optimizer setting nesterov is {value!r}, not true or false")
        if name != "nesterov" and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise damaged(f"its optimizer setting {name} is {value!r}, not a number")
        if name != "nesterov" and not math.isfinite(value):
            # Refused by SetOptimizer, but loaded from a checkpoint: the next Step made
            # every parameter NaN (found by a review of the state's handling).
            raise damaged(f"its optimizer setting {name} is {value!r}, not a finite number")
    return OptimizerSettings(**saved).resolved()


def _a_count(value: float) -> bool:
    return math.isfinite(value) and value >= 0 and value.is_integer()


def _negative(value: torch.Tensor) -> bool:
    """Whether `value` holds a value under 0: one reduction, no mask (a NaN minimum, which
    a run that diverged keeps, is not under 0)."""
    return value.is_floating_point() and value.numel() > 0 and bool(value.amin() < 0)


def unfit(loaded: Loaded, params: dict[str, nn.Parameter], kind: str) -> list[str]:
    """What of a checkpoint's tensors this model and optimizer could not use, said as
    "X as Y, where Z". Such a file used to load: a gradient of another dtype then stopped
    `gradwire serve` with a traceback, its parameters already copied in; optimizer state
    of other keys or shapes failed every later Step, INTERNAL (found by a review)."""

    def described(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            return f"{dtype_name(value.dtype)} {list(value.shape)}"
        return type(value).__name__

    found = []  # parameters of another dtype: another model's (other_model), checked first
    for name, tensor in loaded.gradients.items():
        if tensor.dtype != params[name].dtype:
            found.append(
                f"gradient {name} as {described(tensor)}, where {name} is {described(params[name])}"
            )
    keys = frozenset(STATE_KEYS[kind])
    for name, values in loaded.optimizer_state.items():
        p = params[name]
        if not set(values) <= keys or (kind == "adam" and set(values) != keys):
            found.append(
                f"{kind} state {sorted(values)} for {name}, where {kind} keeps {sorted(keys)}"
            )
            continue
        for key, value in values.items():
            if key == "step":  # a 0-dim float tensor, as torch's Adam keeps it
                fits = isinstance(value, torch.Tensor) and value.dim() == 0
                fits = fits and value.is_floating_point()
                wanted = "a float of no dimension"
                if fits and not _a_count(float(value)):
                    # -1 failed every later step INTERNAL (ZeroDivisionError in torch's
                    # bias correction), NaN made every weight NaN (a review of checkpoints).
                    found.append(
                        f"{kind} state step of {name} as {float(value)}, where it is a count "
                        "of steps taken: a whole number, 0 or more"
                    )
                    continue
            elif key == "exp_avg_sq" and isinstance(value, torch.Tensor) and _negative(value):
                # A mean of squares, which no step makes negative: its square root made
                # every weight NaN at the next step (a review of checkpoints). NaN, which a
                # run that diverged keeps, is loaded, as its NaN weights are.
                found.append(
                    f"{kind} state exp_avg_sq of {name} holds negative values, where it is a "
                    "running mean of squared gradients: 0 or more"
                )
                continue
            else:
                fits = (value is None and key == "momentum_buffer") or (
                    isinstance(value, torch.Tensor)
                    and value.shape == p.shape
                    and value.dtype == p.dtype
                )
                wanted = described(p)
            if not fits:
                found.append(
                    f"{kind} state {key} of {name} as {described(value)}, where it is {wanted}"
                )
    return found
