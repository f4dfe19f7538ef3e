"""A CPU pass the host has not the memory for is refused before it runs (pass_memory.py),
where running it left the server to the kernel's out-of-memory killer; what the host has
left is read from /proc and the process's control groups (host_memory.py)."""

from __future__ import annotations

import resource
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradwire
from gradwire import errors
from gradwire.fill import Fill
from gradwire_server import host_memory, pass_memory
from gradwire_server.app import start
from gradwire_server.errors import InvalidInput, OverLimit
from gradwire_server.fills import FillSpec
from gradwire_server.models import TINY_MLP, ModelSpec
from gradwire_server.optimizers import OptimizerSettings
from gradwire_server.sessions import Sessions
from gradwire_server.trainer import Trainer

# --- what the host has left ---------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


MEMINFO = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n"


def test_without_groups_the_host_has_what_meminfo_calls_available(tmp_path: Path) -> None:
    root = _write(tmp_path, {"proc/meminfo": MEMINFO})
    assert host_memory.available_bytes(root) == 20_000_000 * 1024


def test_nothing_readable_is_nothing_known(tmp_path: Path) -> None:
    assert host_memory.available_bytes(tmp_path) is None


def test_a_cgroup_v2_limit_counts_its_room_less_usage_with_inactive_cache_given_back(
    tmp_path: Path,
) -> None:
    # A container of 4 GiB using 3 GiB, 1 GiB of it page cache the kernel takes back first.
    root = _write(
        tmp_path,
        {
            "proc/meminfo": MEMINFO,
            "proc/self/cgroup": "0::/\n",
            "sys/fs/cgroup/memory.max": f"{4 << 30}\n",
            "sys/fs/cgroup/memory.current": f"{3 << 30}\n",
            "sys/fs/cgroup/memory.stat": f"anon 123\ninactive_file {1 << 30}\nactive_file 5\n",
        },
    )
    assert host_memory.available_bytes(root) == 2 << 30


def test_an_ancestor_group_s_smaller_room_is_the_one_that_counts(tmp_path: Path) -> None:
    # A systemd unit without a limit of its own, inside a slice of 1 GiB half used.
    root = _write(
        tmp_path,
        {
            "proc/meminfo": MEMINFO,
            "proc/self/cgroup": "0::/work.slice/gradwire.service\n",
            "sys/fs/cgroup/work.slice/memory.max": f"{1 << 30}\n",
            "sys/fs/cgroup/work.slice/memory.current": f"{512 << 20}\n",
            "sys/fs/cgroup/work.slice/gradwire.service/memory.max": "max\n",
            "sys/fs/cgroup/work.slice/gradwire.service/memory.current": "7\n",
        },
    )
    assert host_memory.available_bytes(root) == 512 << 20


def test_a_cgroup_v1_limit_without_its_host_path_is_the_mount_s(tmp_path: Path) -> None:
    # A container without a cgroup namespace: /proc/self/cgroup names the group as the host
    # sees it, and the container's /sys/fs/cgroup/memory is that group. "No limit" is 2**63
    # less a page in v1; total_inactive_file, the hierarchy's, is the one counted.
    root = _write(
        tmp_path,
        {
            "proc/meminfo": MEMINFO,
            "proc/self/cgroup": "5:memory:/docker/abc\n0::/\n",
            "sys/fs/cgroup/memory/memory.limit_in_bytes": f"{2 << 30}\n",
            "sys/fs/cgroup/memory/memory.usage_in_bytes": f"{1 << 30}\n",
            "sys/fs/cgroup/memory/memory.stat": (
                f"inactive_file 1\ntotal_inactive_file {256 << 20}\n"
            ),
        },
    )
    assert host_memory.available_bytes(root) == (1 << 30) + (256 << 20)
    _write(root, {"sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n"})
    assert host_memory.available_bytes(root) == 20_000_000 * 1024


def test_meminfo_s_unit_is_kept_and_a_line_it_cannot_read_is_nothing_known(
    tmp_path: Path,
) -> None:
    root = _write(tmp_path, {"proc/meminfo": "MemAvailable: 4096\n"})  # no "kB": bytes
    assert host_memory.available_bytes(root) == 4096
    _write(root, {"proc/meminfo": "MemAvailable: lots kB\n"})
    assert host_memory.available_bytes(root) is None


def test_a_group_over_its_limit_has_no_room_and_cache_beyond_usage_gives_none(
    tmp_path: Path,
) -> None:
    root = _write(
        tmp_path,
        {
            "proc/meminfo": MEMINFO,
            "proc/self/cgroup": "garbage line\n0:\n0::/\n",  # lines it cannot read: skipped
            "sys/fs/cgroup/memory.max": f"{1 << 30}\n",
            "sys/fs/cgroup/memory.current": f"{(1 << 30) + 4096}\n",
        },
    )
    assert host_memory.available_bytes(root) == 0
    # memory.stat read after memory.current can count more inactive cache than the usage:
    # the room is then the whole limit, never more.
    _write(
        root,
        {
            "sys/fs/cgroup/memory.current": f"{1 << 20}\n",
            "sys/fs/cgroup/memory.stat": f"inactive_file {2 << 20}\n",
        },
    )
    assert host_memory.available_bytes(root) == 1 << 30
    # A limit whose usage cannot be read says nothing: MemAvailable counts alone.
    (root / "sys/fs/cgroup/memory.current").unlink()
    assert host_memory.available_bytes(root) == 20_000_000 * 1024


def test_a_line_of_proc_self_cgroup_it_cannot_read_names_no_group(tmp_path: Path) -> None:
    # It was read as cgroup v2's root group, whose limit then counted: a file of
    # garbage said the host had 1 GiB.
    root = _write(
        tmp_path,
        {
            "proc/meminfo": MEMINFO,
            "proc/self/cgroup": "garbage line\n0:\n",
            "sys/fs/cgroup/memory.max": f"{1 << 30}\n",
            "sys/fs/cgroup/memory.current": "0\n",
        },
    )
    assert host_memory.available_bytes(root) == 20_000_000 * 1024


def test_a_cgroup_v1_file_of_many_hierarchies_finds_the_memory_one(tmp_path: Path) -> None:
    # /proc/self/cgroup on a v1 host lists every hierarchy, the memory one among them,
    # sometimes mounted with another controller.
    hierarchies = (
        "12:cpu,cpuacct:/docker/abc\n11:pids:/docker/abc\n{}:/docker/abc\n1:name=systemd:/\n"
    )
    files = {
        "proc/meminfo": MEMINFO,
        "sys/fs/cgroup/memory/memory.limit_in_bytes": f"{2 << 30}\n",
        "sys/fs/cgroup/memory/memory.usage_in_bytes": f"{1 << 30}\n",
    }
    for memory in ("7:memory", "7:hugetlb,memory"):
        root = _write(tmp_path / memory, {**files, "proc/self/cgroup": hierarchies.format(memory)})
        assert host_memory.available_bytes(root) == 1 << 30, memory


def test_v1_s_no_limit_is_no_limit_where_meminfo_says_nothing(tmp_path: Path) -> None:
    # 2**63 less a page: not 8 EiB of room, but nothing known.
    root = _write(
        tmp_path,
        {
            "proc/self/cgroup": "5:memory:/\n",
            "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
            "sys/fs/cgroup/memory/memory.usage_in_bytes": f"{1 << 30}\n",
        },
    )
    assert host_memory.available_bytes(root) is None
    # The line drawn: a limit of 2**60 bytes (an exbibyte) is none either.
    _write(root, {"sys/fs/cgroup/memory/memory.limit_in_bytes": f"{1 << 60}\n"})
    assert host_memory.available_bytes(root) is None
    _write(root, {"sys/fs/cgroup/memory/memory.limit_in_bytes": f"{(1 << 60) - 1}\n"})
    assert host_memory.available_bytes(root) == (1 << 60) - 1 - (1 << 30)


@pytest.mark.parametrize(
    "odd",
    ["proc/meminfo", "proc/self/cgroup", "sys/fs/cgroup/memory.max", "sys/fs/cgroup/memory.stat"],
)
def test_a_file_not_in_ascii_is_nothing_known_not_an_error(tmp_path: Path, odd: str) -> None:
    files = {
        "proc/meminfo": MEMINFO,
        "proc/self/cgroup": "0::/\n",
        "sys/fs/cgroup/memory.max": f"{4 << 30}\n",
        "sys/fs/cgroup/memory.current": f"{1 << 30}\n",
        "sys/fs/cgroup/memory.stat": f"inactive_file {1 << 30}\n",
    }
    root = _write(tmp_path, files)
    (root / odd).write_bytes("\u00e9t\u00e9 0\n".encode())  # not ASCII: UnicodeDecodeError
    expected = {  # what is left known without it
        "proc/meminfo": 4 << 30,
        "proc/self/cgroup": 20_000_000 * 1024,
        "sys/fs/cgroup/memory.max": 20_000_000 * 1024,
        "sys/fs/cgroup/memory.stat": 3 << 30,
    }
    assert host_memory.available_bytes(root) == expected[odd]


def test_a_meminfo_line_without_a_number_is_nothing_known(tmp_path: Path) -> None:
    root = _write(tmp_path, {"proc/meminfo": "MemTotal: 8 kB\nMemAvailable:\n"})
    assert host_memory.available_bytes(root) is None


def test_this_machine_reports_what_it_has() -> None:
    available = host_memory.available_bytes()
    if available is None:
        pytest.skip("no /proc/meminfo here")
    total = next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    assert 0 < available <= total


# --- what a pass makes ----------------------------------------------------------------


def test_made_bytes_counts_new_tensors_not_views_or_in_place_results() -> None:
    with pass_memory.MadeBytes() as made:
        x = torch.empty(8, 4, device="meta")  # 128 bytes
        y = x.view(4, 8).t()  # views: nothing new
        z = torch.relu(y)  # 128 bytes
        z.relu_()  # in place: nothing new
        torch.split(z, 2)  # views, a list of them
        torch.cat([z, z])  # 256 bytes
        assert x.is_same_size(y)  # a bool, no tensor: nothing
    assert made.total == 128 + 128 + 256


def test_the_estimate_covers_what_autograd_keeps_of_a_real_pass() -> None:
    # The memory a real forward pass of the tutorial's model keeps for its backward pass,
    # and its output, are no more than its operations make on meta tensors: the factors of
    # pass_memory.py then stand on top of all of it.
    trainer = Trainer(seed=0)
    try:
        run = trainer._meta_run((64, 3, 10, 10), torch.float32)
        assert run is not None
        saved: dict[int, int] = {}
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, 1, padding=1, bias=False),
            nn.Conv2d(16, 32, 3, 1, padding=1, bias=False),
            nn.Flatten(),
            nn.Linear(3200, 20, bias=False),
        )
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()  # a view saved is its tensor's memory, once
            if storage.data_ptr() not in params:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        x = torch.randn(64, 3, 10, 10)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
        kept = sum(saved.values()) + out.numel() * out.element_size()
        assert kept <= run.made_bytes
        assert run.made_bytes == 64 * 4 * (300 + 1600 + 3200 + 20)  # input, convs, linear
    finally:
        trainer.close()


def test_check_weighs_a_pass_by_its_factor_against_what_the_host_has() -> None:
    asked: list[int] = []

    def available() -> int:
        asked.append(1)
        return 1 << 30

    made = 400 << 20  # 400 MiB made: a forward pass 800 MiB, a training one 1,200 MiB
    pass_memory.check("a pass", made, 1000, pass_memory.FORWARD, available)
    with pytest.raises(OverLimit, match=r"about 800\.0 MiB"):  # twice what it makes
        pass_memory.check("a pass", made, 1000, pass_memory.FORWARD, lambda: 700 << 20)
    with pytest.raises(OverLimit) as refused:
        pass_memory.check("a pass", made, 1000, pass_memory.TRAINING, available)
    err = refused.value
    assert err.reason == "OUT_OF_MEMORY"
    assert err.metadata == {"bytes": str(3 * made), "limit": str(1 << 30), "samples": "853"}
    assert str(err) == (
        "a pass of 1,000 samples would take about 1.2 GiB of the server's memory, and the "
        "host has 1.0 GiB left: send at most 853 samples a call"
    )
    assert len(asked) == 2
    # What the host has left is enough: taken, to the byte; a pass of exactly the size
    # checked from is checked.
    pass_memory.check("a pass", made, 1000, pass_memory.FORWARD, lambda: 2 * made)
    edge = pass_memory.CHECKED_FROM_BYTES
    with pytest.raises(OverLimit, match=r"about 64\.0 MiB"):
        pass_memory.check("a pass", edge, 1000, 1, lambda: edge - 1)
    # What a step holds for the parameters alone over the host's room: no batch fits.
    with pytest.raises(OverLimit, match="no batch of this model fits now"):
        pass_memory.check("a step", 0, 10, pass_memory.TRAINING, lambda: 1 << 20, fixed=edge)
    # And with a batch beside it: none fits (not "at most -1 samples"), and the room left,
    # under a KiB, is said in bytes.
    with pytest.raises(OverLimit) as refused:
        pass_memory.check("a step", edge, 10, 1, lambda: 512, fixed=1 << 20)
    assert str(refused.value).endswith(
        "the host has 512 bytes left: no batch of this model fits now"
    )
    assert refused.value.metadata["samples"] == "0"
    # Room past what the step holds: the samples that fit are those the rest has room for.
    with pytest.raises(OverLimit, match="send at most 50 samples a call") as refused:
        pass_memory.check("a step", 100 << 20, 100, 1, lambda: 150 << 20, fixed=100 << 20)
    assert refused.value.metadata["samples"] == "50"
    # Sizes under a MiB are said in KiB.
    with pytest.raises(OverLimit) as refused:
        pass_memory.check_model("a model", 4096, "use a smaller one", lambda: 1536)
    assert str(refused.value) == (
        "a model would take about 4.0 KiB of the server's memory, and the host has 1.5 KiB "
        "left: use a smaller one"
    )
    # A small pass reads nothing: the host's files cost a small step 0.3 ms.
    pass_memory.check("a pass", 1 << 20, 1000, pass_memory.TRAINING, lambda: 0)
    # Nothing known: nothing refused.
    pass_memory.check("a pass", 1 << 40, 1000, pass_memory.TRAINING, lambda: None)
    with pytest.raises(OverLimit, match="no batch of this model fits now"):
        pass_memory.check("a pass", 1 << 40, 1, pass_memory.FORWARD, lambda: 1 << 30)


# --- refused over a real server --------------------------------------------------------


class Blowup(nn.Module):
    """Four features in, each repeated 2**20 times on the way: 16 MiB a sample in the pass,
    from 16 bytes of input."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.repeat(1, 1 << 20).view(x.shape[0], -1, 4)
        out: torch.Tensor = self.lin(wide.mean(1))
        return out


BLOWUP = ModelSpec("Blowup", Blowup, (4,), 3)


@pytest.fixture
def blowup() -> Iterator[tuple[Trainer, gradwire.Client]]:
    trainer = Trainer(BLOWUP, device="cpu", seed=0)
    running = start(trainer, "127.0.0.1", 0)
    try:
        with gradwire.connect(f"127.0.0.1:{running.port}") as client:
            yield trainer, client
    finally:
        running.stop()
        trainer.close()


def _samples_over_the_host() -> int:
    """Samples of Blowup whose forward pass alone would take more than the host has."""
    available = host_memory.available_bytes()
    if available is None:
        pytest.skip("no /proc/meminfo here: nothing is checked")
    return available // (16 << 20) + 1


def test_a_forward_pass_the_host_has_no_memory_for_is_refused_before_it_runs(
    blowup: tuple[Trainer, gradwire.Client],
) -> None:
    _, client = blowup
    before = client.train_step(np.ones((2, 4), np.float32), np.array([0, 1])).version
    samples = _samples_over_the_host()
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    forward, training = "a forward pass of", "a forward pass with its backward pass of"
    for what, call in (
        (forward, lambda: client.forward(Fill.ones(samples, 4))),  # made: refused before
        (forward, lambda: client.forward(np.ones((samples, 4), np.float32))),  # sent
        (training, lambda: client.forward(Fill.ones(samples, 4), Fill.zeros(samples))),
        (training, lambda: client.train_step(Fill.ones(samples, 4), Fill.zeros(samples))),
        (training, lambda: next(iter(client.train(Fill.ones(samples, 4), Fill.zeros(samples), 3)))),
    ):
        with pytest.raises(errors.ResourceExhausted) as refused:
            call()
        err = refused.value
        assert err.reason == "OUT_OF_MEMORY"
        assert f": {what} {samples:,} samples would take about" in str(err)
        need, room, fit = (int(err.metadata[k]) for k in ("bytes", "limit", "samples"))
        assert need > room and 0 < fit < samples
        assert f"send at most {fit:,} samples a call" in str(err)
    # Nothing was made for them (a pass of them would have taken GiBs), nothing changed,
    # and the server goes on.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - grown < 256 << 10  # KiB
    assert client.list_tensors().version == before
    assert client.train_step(np.ones((2, 4), np.float32), np.array([0, 1])).version > before


def test_a_model_that_cannot_run_on_meta_tensors_is_checked_by_its_input_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No estimate: only the input's own bytes are weighed (what the host has left is the
    # check's input, set here), and a pass that fits runs as it did.
    class ReadsAValue(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.lin(x) * float(x.sum() > 0)
            return out

    trainer = Trainer(ModelSpec("ReadsAValue", ReadsAValue, (4,), 3), seed=0)
    try:
        assert trainer._meta_run((2, 4), torch.float32) is None
        assert trainer.forward(torch.ones(2, 4)).output_shape == (2, 3)
        samples = 1 << 24  # 256 MiB of float32 input, made on the server
        monkeypatch.setattr(host_memory, "available_bytes", lambda: 128 << 20)
        with pytest.raises(OverLimit) as refused:
            trainer.forward(FillSpec("ones", (samples, 4)))
        assert refused.value.metadata["bytes"] == str(samples * 4 * 4)
        assert "send at most 8,388,608 samples a call" in refused.value.message
    finally:
        trainer.close()


# --- a new model: a session's, a Reset's --------------------------------------------


@pytest.fixture
def simple() -> Iterator[tuple[Trainer, gradwire.Client]]:
    trainer = Trainer(seed=0)
    running = start(trainer, "127.0.0.1", 0)
    try:
        with gradwire.connect(f"127.0.0.1:{running.port}") as client:
            yield trainer, client
    finally:
        running.stop()
        trainer.close()


def test_a_session_or_a_reset_the_host_has_no_memory_for_is_refused(
    simple: tuple[Trainer, gradwire.Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the host has left is the check's input, set here: a test cannot use up the
    # machine's memory (how it is read is tested above, on files).
    trainer, client = simple
    size = trainer.model_bytes
    assert size == 4 * (16 * 3 * 9 + 32 * 16 * 9 + 20 * 3200)  # the tutorial's three weights
    monkeypatch.setattr(host_memory, "available_bytes", lambda: size - 1)
    with pytest.raises(errors.ResourceExhausted) as refused:
        client.open_session()
    err = refused.value
    assert err.reason == "OUT_OF_MEMORY"
    assert err.metadata == {"bytes": str(size), "limit": str(size - 1)}
    assert "a new session's model would take about" in str(err)
    assert "close a session (CloseSession), or act on the default one" in str(err)
    assert client.list_sessions().sessions == () and client.list_sessions().opening == 0
    version, weight = client.list_tensors().version, client.get("conv1.weight")
    with pytest.raises(errors.ResourceExhausted, match="a Reset's new model, built beside"):
        client.reset(seed=1)
    assert client.list_tensors().version == version
    assert np.array_equal(client.get("conv1.weight"), weight)
    # Room again: both go ahead.
    monkeypatch.setattr(host_memory, "available_bytes", lambda: size)
    assert client.open_session()
    assert client.reset(seed=1) > version


def test_a_model_s_bytes_count_its_buffers_beside_its_parameters() -> None:
    """What building another of it takes: TinyMLP's BatchNorm statistics (two float32 rows
    of 32 and an int64 count) as well as its weights."""
    trainer = Trainer(TINY_MLP, seed=0)
    try:
        parameters = 4 * (16 * 32 + 32 + 32 + 32 + 32 * 4 + 4)
        assert trainer.model_bytes == parameters + 4 * (32 + 32) + 8
    finally:
        trainer.close()


def test_sessions_being_built_count_with_the_one_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two OpenSessions at once each found room for one model, and both were built: the
    # second now counts the first, still being built outside the sessions' lock.
    building, go = threading.Event(), threading.Event()

    class Slow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)
            if built.is_set():  # a session's: held until the test lets it go
                building.set()
                go.wait(30)
            built.set()

    built = threading.Event()
    default = Trainer(ModelSpec("Slow", Slow, (4,), 3), seed=0)
    sessions = Sessions(default)
    size = default.model_bytes
    monkeypatch.setattr(host_memory, "available_bytes", lambda: size * 3 // 2)
    first = threading.Thread(target=sessions.open, args=(None, None))
    first.start()
    try:
        assert building.wait(30)
        with pytest.raises(OverLimit, match="with the 1 being built") as refused:
            sessions.open(None, None)
        assert refused.value.metadata["bytes"] == str(2 * size)
    finally:
        go.set()
        first.join(30)
        sessions.close_all()
        default.close()


def test_a_fill_without_an_estimate_or_a_target_of_the_wrong_shape_is_not_made_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Made, then refused: a fill of 2**28 values of complex128 took 4 GiB, for an input
    # (no run on meta tensors of the float model takes complex values: no estimate) and for
    # a target.
    trainer = Trainer(seed=0)
    made: list[str] = []
    make = trainer._make

    def watched(source: object, dtype: torch.dtype, what: str) -> torch.Tensor:
        made.append(what)
        return make(source, dtype, what)  # type: ignore[arg-type]

    monkeypatch.setattr(trainer, "_make", watched)
    monkeypatch.setattr(host_memory, "available_bytes", lambda: 256 << 20)
    samples = (1 << 28) // 300
    try:
        assert trainer._meta_run((samples, 3, 10, 10), torch.complex128) is None
        with pytest.raises(OverLimit) as refused:
            trainer.forward(FillSpec("ones", (samples, 3, 10, 10), dtype="complex128"))
        assert refused.value.reason == "OUT_OF_MEMORY"
        assert refused.value.metadata["bytes"] == str(samples * 300 * 16)
        assert made == []
        with pytest.raises(InvalidInput) as wrong:
            trainer.forward(
                FillSpec("ones", (2, 3, 10, 10)), FillSpec("ones", (1 << 28,), dtype="complex128")
            )
        assert wrong.value.reason == "BAD_TARGET_SHAPE"
        assert str(wrong.value) == (
            f"target has shape [{1 << 28}]; Simple takes a target of class indices [2] or the "
            "output's shape [2, 20]"
        )
        assert made == ["input"]
        # Inputs and targets that fit are made and used as before.
        assert trainer.forward(FillSpec("ones", (2, 3, 10, 10)), FillSpec("zeros", (2,))).loss
        probabilities = FillSpec("constant", (2, 20), "float32", value=0.05)
        assert trainer.forward(FillSpec("ones", (2, 3, 10, 10)), probabilities).loss
        with pytest.raises(InvalidInput, match="input has dtype complex128"):
            trainer.forward(FillSpec("ones", (2, 3, 10, 10), dtype="complex128"))
    finally:
        trainer.close()


def test_odd_group_files_are_nothing_known_not_an_error(tmp_path: Path) -> None:
    # An exception here was a Forward's INTERNAL: odd files count as nothing known.
    root = _write(
        tmp_path,
        {
            "proc/meminfo": MEMINFO,
            "proc/self/cgroup": "0::/\n",
            "sys/fs/cgroup/memory.max": f"{4 << 30}\n",
            "sys/fs/cgroup/memory.current": f"{1 << 30}\n",
            "sys/fs/cgroup/memory.stat": "anon 1\ninactive_file \nodd\n",
        },
    )
    assert host_memory.available_bytes(root) == 3 << 30
    _write(root, {"sys/fs/cgroup/memory.stat": "anon 1\nactive_file 2\n"})  # no inactive
    assert host_memory.available_bytes(root) == 3 << 30
    # A group's name too long for the file system to look it up (ENAMETOOLONG).
    _write(root, {"proc/self/cgroup": "0::/" + "a" * 300 + "\n"})
    assert host_memory.available_bytes(root) == 20_000_000 * 1024


class Wide(nn.Module):
    """32 MiB of weight, and a pass of a few KiB a sample: a step is mostly its gradients
    and optimizer state."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2048, 4096, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(x)[:, :4]
        return out


def test_a_step_s_gradients_and_optimizer_state_not_made_yet_are_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With Adam a first step makes 32 MiB of gradients and 64 MiB of moments, which a
    # pass's estimate (a few KiB) does not see: refused with 64 MiB left, once made not again.
    trainer = Trainer(ModelSpec("Wide", Wide, (2048,), 4), seed=0)
    x, y = torch.ones(1, 2048), torch.zeros(1, dtype=torch.int64)
    try:
        trainer.set_optimizer(OptimizerSettings(kind="adam"))
        monkeypatch.setattr(host_memory, "available_bytes", lambda: 64 << 20)
        with pytest.raises(OverLimit) as refused:
            trainer.train_step(x, y, use=lambda s: s)
        assert refused.value.reason == "OUT_OF_MEMORY"
        assert int(refused.value.metadata["bytes"]) > 96 << 20
        assert str(refused.value).endswith("no batch of this model fits now")
        assert trainer.parameters["lin.weight"].grad is None
        monkeypatch.setattr(host_memory, "available_bytes", lambda: 1 << 30)
        trainer.train_step(x, y, use=lambda s: s)
        # Made: the moments are not counted again, but a step's new gradients beside the
        # ones it keeps (32 MiB) and Adam's two temporaries (64 MiB) are, every step.
        monkeypatch.setattr(host_memory, "available_bytes", lambda: 97 << 20)
        trainer.train_step(x, y, use=lambda s: s)
        # A forward pass alone makes neither.
        trainer.set_optimizer(OptimizerSettings(kind="adam"))
        trainer.forward(x)
    finally:
        trainer.close()


def test_a_read_of_optimizer_state_not_made_yet_leaves_it_counted_for_the_first_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reading Adam's moments before any step (absent) makes none: the first step still
    counts them, 64 MiB of Wide's 160 (gradients 32, moments 64, temporaries 64)."""
    trainer = Trainer(ModelSpec("Wide", Wide, (2048,), 4), seed=0)
    x, y = torch.ones(1, 2048), torch.zeros(1, dtype=torch.int64)
    try:
        trainer.set_optimizer(OptimizerSettings(kind="adam"))
        assert trainer.read("optimizer.lin.weight.exp_avg").value is None
        monkeypatch.setattr(host_memory, "available_bytes", lambda: 64 << 20)
        with pytest.raises(OverLimit) as refused:
            trainer.train_step(x, y, use=lambda s: s)
        assert int(refused.value.metadata["bytes"]) >= 160 << 20
    finally:
        trainer.close()


class Wider(nn.Module):
    """Wide with 64 MiB of weight: a step of plain SGD, its gradients alone, is checked
    (pass_memory.CHECKED_FROM_BYTES)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4096, 4096, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(x)[:, :4]
        return out


_WIDE = 4096 * 4096 * 4  # Wider's weight, in bytes


@pytest.mark.parametrize(
    ("settings", "first", "later"),
    [
        (OptimizerSettings("sgd"), 1, 1),
        (OptimizerSettings("sgd", momentum=0.9), 2, 1),
        (OptimizerSettings("sgd", momentum=0.9, nesterov=True), 3, 2),
        (OptimizerSettings("sgd", weight_decay=0.01), 2, 2),
        (OptimizerSettings("adam"), 5, 3),
        (OptimizerSettings("adam", weight_decay=0.01), 6, 4),
    ],
    ids=["sgd", "momentum", "nesterov", "sgd-decay", "adam", "adam-decay"],
)
def test_every_step_counts_the_gradients_it_makes_beside_those_it_keeps(
    monkeypatch: pytest.MonkeyPatch, settings: OptimizerSettings, first: int, later: int
) -> None:
    """A TrainStep keeps the gradients it began with until it is done (to put them back if it
    fails), while its backward pass makes a new set; and the optimizer's step makes its
    temporaries every time. Counted only where not made yet, a second SGD step of a 1.4 GB
    model was taken with 1 GB left and grew the server 1.4 GB, and a first Adam step with
    3 GB left grew it 6.4 GB (found by a review). In units of Wider's one weight: gradients
    1, SGD's momentum 1, Adam's moments 2, temporaries as many as _step_temporaries says
    (measured, Trainer._update_bytes)."""
    trainer = Trainer(ModelSpec("Wider", Wider, (4096,), 4), seed=0, optimizer=settings)
    x, y = torch.ones(1, 4096), torch.zeros(1, dtype=torch.int64)
    asked: list[int] = []

    def step(room: int) -> None:
        def available() -> int:
            asked.append(room)
            return room

        monkeypatch.setattr(host_memory, "available_bytes", available)
        trainer.train_step(x, y, use=lambda s: s)

    try:
        for need in (first, later, later):
            with pytest.raises(OverLimit) as refused:
                step(need * _WIDE - (1 << 20))
            assert refused.value.reason == "OUT_OF_MEMORY"
            assert need * _WIDE <= int(refused.value.metadata["bytes"]) < need * _WIDE + (1 << 20)
            step(need * _WIDE + (1 << 20))  # what it takes, and a pass's few KiB: taken
        assert len(asked) == 6
        monkeypatch.setattr(host_memory, "available_bytes", lambda: _WIDE - (1 << 20))
        with pytest.raises(OverLimit):  # without ZeroGrad the gradients are kept all the same
            trainer.train_step(x, y, zero_grad=False, use=lambda s: s)
    finally:
        trainer.close()


def test_a_step_whose_update_alone_reaches_the_line_is_checked_at_the_most_it_takes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A first Adam step with weight decay, its one parameter's change recorded, holds 7 times
    that parameter (gradient 1, moments 2, change 1, temporaries 3): the most a step's update
    takes (_UPDATE_MOST), by which a step is told worth checking before its update is
    counted. Here 70 MiB, past the line of 64 MiB, where 6 times (60 MiB) is not."""
    weight = 1280 * 2048 * 4  # 10 MiB
    spec = ModelSpec("Flat", lambda: nn.Linear(1280, 2048, bias=False), (1280,), 2048)
    settings = OptimizerSettings("adam", weight_decay=0.01)
    trainer = Trainer(spec, seed=0, optimizer=settings, track_deltas=True)
    monkeypatch.setattr(host_memory, "available_bytes", lambda: pass_memory.CHECKED_FROM_BYTES)
    try:
        x, y = torch.ones(1, 1280), torch.zeros(1, dtype=torch.int64)
        with pytest.raises(OverLimit) as refused:
            trainer.train_step(x, y, use=lambda s: s)
        assert refused.value.reason == "OUT_OF_MEMORY"
        assert 7 * weight <= int(refused.value.metadata["bytes"]) < 7 * weight + (1 << 20)
    finally:
        trainer.close()


def test_an_operation_that_returns_nothing_leaves_the_run_on_meta_tensors() -> None:
    # torch._assert_async returns None: counted as a sequence it raised, and a model that
    # checks its input so had no run on meta tensors (no estimate, no fetches checked before
    # the pass), where it had one before the bytes were counted.
    class Checked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            torch._assert_async(torch.ones((), dtype=torch.bool, device=x.device))
            out: torch.Tensor = self.lin(x)
            return out

    trainer = Trainer(ModelSpec("Checked", Checked, (4,), 3), seed=0)
    try:
        run = trainer._meta_run((2, 4), torch.float32)
        assert run is not None
        assert run.made_bytes == 2 * 4 * 4 + 1 + 2 * 3 * 4  # input, the flag, the output
    finally:
        trainer.close()


def test_a_pass_with_a_backward_pass_to_follow_is_weighed_as_training(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Forward with a target keeps its graph for a Backward: its estimate is weighed by
    pass_memory.TRAINING, one without by FORWARD, for the same pass on meta tensors."""
    trainer = Trainer(BLOWUP, seed=0)
    monkeypatch.setattr(host_memory, "available_bytes", lambda: 1)
    needs = {}
    try:
        for target in (None, FillSpec("zeros", (8,))):
            with pytest.raises(OverLimit) as refused:
                trainer.forward(FillSpec("ones", (8, 4)), target)
            needs[target is not None] = int(refused.value.metadata["bytes"])
    finally:
        trainer.close()
    made = needs[False] // pass_memory.FORWARD
    assert needs[False] == made * pass_memory.FORWARD
    assert needs[True] >= made * pass_memory.TRAINING


def test_a_step_counts_the_buffers_its_changes_are_recorded_in_until_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With track_deltas a first step also makes a buffer as large as each parameter, for
    its change (conv1.weight.delta): counted then, with the gradients, and not again."""
    trainer = Trainer(ModelSpec("Wider", Wider, (4096,), 4), seed=0, track_deltas=True)
    x, y = torch.ones(1, 4096), torch.zeros(1, dtype=torch.int64)
    try:
        for need in (2, 1):  # gradients and deltas; then the gradients alone
            monkeypatch.setattr(
                host_memory, "available_bytes", lambda n=need: n * _WIDE - (1 << 20)
            )
            with pytest.raises(OverLimit) as refused:
                trainer.train_step(x, y, use=lambda s: s)
            assert need * _WIDE <= int(refused.value.metadata["bytes"]) < need * _WIDE + (1 << 20)
            monkeypatch.setattr(
                host_memory, "available_bytes", lambda n=need: n * _WIDE + (1 << 20)
            )
            trainer.train_step(x, y, use=lambda s: s)
        assert trainer.read("lin.weight.delta").value is not None
    finally:
        trainer.close()


class FrozenWider(nn.Module):
    """Wider's 64 MiB weight frozen, under a small head that trains."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4096, 4096, bias=False).requires_grad_(False)
        self.head = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.lin(x)[:, :4])
        return out


def test_a_frozen_parameter_s_bytes_are_not_counted_for_a_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A frozen parameter gets no gradient nor optimizer state: a step of the head alone is
    taken with 1 MiB left, however large the frozen part."""
    trainer = Trainer(ModelSpec("FrozenWider", FrozenWider, (4096,), 4), seed=0)
    x, y = torch.ones(1, 4096), torch.zeros(1, dtype=torch.int64)
    monkeypatch.setattr(host_memory, "available_bytes", lambda: 1 << 20)
    try:
        trainer.set_optimizer(OptimizerSettings(kind="adam"))
        assert trainer.train_step(x, y, use=lambda s: s).parameters_updated == 2
        assert trainer.parameters["lin.weight"].grad is None
    finally:
        trainer.close()
