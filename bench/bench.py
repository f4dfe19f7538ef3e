"""`make bench`: every performance target of gradwire beside its floor, measured in one run.

Each figure is a median over repeated calls, interleaved with its floor (a bare gRPC call
carrying the same bytes on the same channel, or the same step run in-process), so that the
noise of a shared machine lands on both. The result is one table: figure, ours, floor,
ratio, target. This is a benchmark, not a test: it asserts nothing and never fails a build.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from torch import nn

import gradwire
from bench import load
from bench.ceiling import READ, CeilingClient, batch
from bench.floor import FloorClient
from bench.server import MIB
from gradwire import limits
from gradwire.fill import Fill
from gradwire_server.allocator import keep_freed_memory, limit_onednn_cache
from gradwire_server.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
#: The pause before each call of the "after idle" figure.
IDLE_S = 0.02


@dataclass
class Row:
    figure: str
    ours: float  # seconds (or a rate: see `unit`)
    floor: float
    ratio: float  # how ours compares, in the direction the target is written
    target: str
    met: bool
    unit: str = "ms"

    def cells(self) -> list[str]:
        scale = 1e3 if self.unit == "ms" else 1.0
        return [
            self.figure,
            f"{self.ours * scale:.3f}",
            f"{self.floor * scale:.3f}",
            f"{self.ratio:.2f}",
            self.target,
            "-" if self.target == "(report)" else "yes" if self.met else "NO",
        ]


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def paired(
    ours: Callable[[], object], floor: Callable[[], object], repeats: int
) -> tuple[float, float]:
    """Medians of `repeats` calls of each, alternating, after one warm-up call of each."""
    ours()
    floor()
    a, b = [], []
    for _ in range(repeats):
        a.append(timed(ours))
        b.append(timed(floor))
    return statistics.median(a), statistics.median(b)


def looped(
    calls: Sequence[Callable[[], object]], rounds: int, warm_s: float = 0.1, timed_s: float = 0.3
) -> list[float]:
    """The median time of each of `calls` in a loop of its own: in each round, each call runs
    back to back for `warm_s` untimed, then `timed_s` timed, in turn, the order rotated from
    round to round: each call's own steady state, what a loop of it gets, with the drift
    of a shared machine spread over all. Calls taken in turn one by one (`paired`) change
    each other: torch's OpenMP workers spin for about 10 ms after their last op, the
    client's after an in-process step as the server's after a remote one, taking one of 2
    cores from whatever runs next, or keeping the second vCPU awake for it. Before run 26
    each remote step ran right after the in-process one, in blocks of 6 with one call
    untimed, and read 0.3-0.9 ms slower at batch 8 for that alone; an echo alternated with
    a Step reads 0.1 ms faster than in a loop of echoes."""
    times: list[list[float]] = [[] for _ in calls]
    for round_ in range(rounds):
        turn = round_ % len(calls)
        for i in [*range(turn, len(calls)), *range(turn)]:
            start = time.perf_counter()
            while time.perf_counter() - start < warm_s:
                calls[i]()
            start = time.perf_counter()
            while time.perf_counter() - start < timed_s:
                times[i].append(timed(calls[i]))
    return [statistics.median(kept) for kept in times]


def rounds_for(repeats: int) -> int:
    """`looped`'s rounds for `--repeats`: 5 at the default 31, at least 1."""
    return max(1, (repeats + 3) // 6)


def step_rounds(repeats: int) -> int:
    """`looped`'s rounds for the step figures: 16 at the default 31, at least 1. A round's
    ratio swings by a tenth either way on this VM as its step time drifts (14-19.5 ms at
    batch 256 from one round to the next): in one script, TrainStep at batch 256 read
    0.79-0.99x in ten runs of 5 rounds and 0.86-0.92x in seven of 16. The drift over
    minutes stays (docs/performance-history.md, thirty-second session)."""
    return max(1, (repeats + 1) // 2)


@dataclass(frozen=True)
class Served:
    address: str
    pid: int


@contextmanager
def serve(model: str, device: str, flags: Sequence[str] = ()) -> Iterator[Served]:
    """A benchmark server process (bench/server.py), ready for calls; `flags` as
    `gradwire serve` takes them (--return-freed-memory, --one-thread-for-small-work)."""
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.server", "--model", model, "--device", device,
             "--port-file", str(port_file), *flags],
            cwd=ROOT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 300
            while not port_file.exists() or not port_file.read_text().strip():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"bench server ({model}) did not start")
                time.sleep(0.05)  # a start-up wait in a benchmark, not in a test
            yield Served(f"127.0.0.1:{port_file.read_text().strip()}", process.pid)
        finally:
            process.terminate()
            process.wait(timeout=60)


def rss_peak_reset(pid: int) -> int:
    """Resets the process's peak RSS (VmHWM) and returns its current RSS, in bytes."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _status(pid, "VmRSS")


def rss_peak(pid: int) -> int:
    return _status(pid, "VmHWM")


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=limits.channel_options())


# --- the figures -----------------------------------------------------------------------------

TYPED = [
    ("f32", "float32"),
    ("f64", "float64"),
    ("i32", "int32"),
    ("i64", "int64"),
    ("f16", "float16 (raw)"),
    ("bf16", "bfloat16 (raw, as torch)"),
]


def at_most(figure: str, ours: float, floor: float, limit: float) -> Row:
    """A time that must stay within `limit` times its floor."""
    return Row(figure, ours, floor, ours / floor, f"<= {limit}x", ours / floor <= limit)


def rate_at_least(figure: str, ours: float, floor: float, limit: float) -> Row:
    """A rate (the inverse of a time) that must reach `limit` times its floor's."""
    ratio = floor / ours
    return Row(f"{figure}, rate", ours, floor, ratio, f">= {limit}x", ratio >= limit)


def report(row: Row) -> Row:
    """The row as a figure to read beside the others, with no target of its own."""
    return dataclasses.replace(row, target="(report)", met=True)


def typed_reads(served: Served, repeats: int) -> list[Row]:
    rows = []
    size = 16 * MIB
    with channel(served.address) as ch:
        client = gradwire.Client(served.address, channel=ch)
        floor = FloorClient(ch)
        for name, label in TYPED:
            # bfloat16 has no numpy dtype: its exact form is a torch tensor (as_torch=True).
            exact = name == "bf16"
            value = client.get(name, as_torch=exact)
            assert (
                value is not None and value.numel() * 2 == size if exact else value.nbytes == size
            )
            ours, bare = paired(
                lambda n=name, t=exact: client.get(n, as_torch=t), lambda: floor.get(size), repeats
            )
            rows.append(at_most(f"GetTensor 16 MiB {label}", ours, bare, 1.5))
        # The same bfloat16 read widened to float32 numpy: into a new array (the client
        # reuses the 32 MiB of the last one, dropped before each read; memory.py), and into
        # one the caller keeps (out=).
        ours, bare = paired(lambda: client.get("bf16"), lambda: floor.get(size), repeats)
        rows.append(at_most("GetTensor 16 MiB bfloat16 as float32 numpy", ours, bare, 1.5))
        # A caller that holds on to every array, or turns keep_memory off, gets fresh memory
        # each time: 32 MiB that the kernel maps and zeroes.
        client.keep_memory = False
        ours, bare = paired(lambda: client.get("bf16"), lambda: floor.get(size), repeats)
        rows.append(report(at_most("  the same, fresh memory each time", ours, bare, 1.5)))
        client.keep_memory = True
        out = np.empty(size // 2, dtype=np.float32)
        ours, bare = paired(lambda: client.get("bf16", out=out), lambda: floor.get(size), repeats)
        rows.append(at_most("GetTensor 16 MiB bfloat16 into float32 out=", ours, bare, 1.5))
    return rows


NODE_EXAMPLE = ROOT / "examples" / "node"


def node_reads(served: Served, repeats: int) -> list[Row]:
    """Target 1 as a client in another language meets it: examples/node/bench.mjs reads the
    same 16 MiB tensors from Node.js, each beside a bare gRPC read of 16 MiB in Node on the
    same channel. Its values as typed arrays (examples/node/wire.mjs), and for float32 also
    decoded by @grpc/proto-loader value by value, the way a generic client reads them. Left
    out, with a line saying so, without Node.js or the example's packages (`make setup`
    installs them where npm is)."""
    node = shutil.which("node")
    if node is None or not (NODE_EXAMPLE / "node_modules").is_dir():
        print("no Node.js or no examples/node/node_modules: Node.js rows left out", file=sys.stderr)
        return []
    done = subprocess.run(
        [node, str(NODE_EXAMPLE / "bench.mjs"), served.address, "--repeats", str(repeats)],
        capture_output=True, text=True, check=True, timeout=900,
    )  # fmt: skip
    result = json.loads(done.stdout)
    rows = [
        at_most(
            f"Node.js: GetTensor 16 MiB {label}, typed array",
            r["ours"] / 1e3,
            r["floor"] / 1e3,
            1.5,
        )
        for label, r in result["viewed"].items()
    ]
    decoded = result["decoded"]["float32"]
    rows.append(
        report(
            at_most(
                "  float32 decoded by proto-loader",
                decoded["ours"] / 1e3,
                decoded["floor"] / 1e3,
                1.5,
            )
        )
    )
    return rows


def small_calls(served: Served, repeats: int) -> list[Row]:
    rows = []
    with channel(served.address) as ch:
        client = gradwire.Client(served.address, channel=ch)
        streamed = gradwire.Client(served.address, channel=ch, stream_calls=True)
        floor = FloorClient(ch)
        bare = CeilingClient(ch)
        client.forward(Fill.ones(8, 3, 10, 10), Fill.ones(8, dtype="int64"))
        client.backward()
        # Each beside its ceiling: the same work in a bare call, against the echo too.
        calls: list[tuple[str, Callable[[gradwire.Client], object], Callable[[], object]]] = [
            (
                "GetTensor of 3 elements",
                lambda c: c.get("conv1.weight.grad[0][0][0]"),
                lambda: bare.read("conv1.weight.grad"),
            ),
            ("Step", lambda c: c.step(), bare.step),  # the gradients stay: every Step applies them
            # Zeros in place: 3 fills, one of them parallel (linear.weight's 64,000 values).
            (
                "ZeroGrad to zeros",
                lambda c: c.zero_grad(set_to_none=False),
                lambda: bare.zero_grad(set_to_none=False),
            ),
            # To None, as the tutorial's optimizer.zero_grad() does since PyTorch 2.0; last,
            # as it leaves no gradients.
            ("ZeroGrad to None (the tutorial's)", lambda c: c.zero_grad(), bare.zero_grad),
        ]

        for label, call, ceiling in calls:
            # The target's figure as it has always been measured: alternated call by call
            # with the echo, both in the state the call leaves the machine in.
            ours, bare_echo = paired(lambda call=call: call(client), floor.small_echo, repeats * 10)
            rows.append(at_most(f"{label} vs echo", ours, bare_echo, 1.5))
            # And each in a loop of its own, with its ceiling: alternated, the echo reads
            # 0.1 ms faster after a Step than in a loop of echoes (Step's parallel update
            # keeps the second vCPU awake; docs/performance-history.md, eighteenth session). The
            # same call on a Calls stream beside them.
            ours, on_stream, work, bare_echo = looped(
                [
                    lambda call=call: call(client),
                    lambda call=call: call(streamed),
                    ceiling,
                    floor.small_echo,
                ],
                rounds_for(repeats),
            )
            figure = "  the same, each in a loop of its own (call, ceiling, echo)"
            rows.append(report(at_most(figure, ours, bare_echo, 1.5)))
            figure = "  the same on a Calls stream, in loops, vs echo"
            rows.append(report(at_most(figure, on_stream, bare_echo, 1.5)))
            figure = "  (ceiling) the same work in a bare gRPC call, in loops, vs echo"
            rows.append(report(at_most(figure, work, bare_echo, 1.5)))
        streamed.close()
    return rows


def big_transfers(served: Served, repeats: int) -> list[Row]:
    rows = []
    size = 512 * MIB
    chunk = limits.CHUNK_BYTES
    with channel(served.address) as ch:
        client = gradwire.Client(served.address, channel=ch, timeout=600)
        floor = FloorClient(ch)

        def get() -> object:
            return client.get("big")

        def put() -> object:
            return client.set("big", value)

        # Memory first: the server's first 512 MiB stream's growth (after the 16 MiB reads on
        # the same server, unless --only big), then what stays.
        start = rss_peak_reset(served.pid)
        value = client.get("big")
        assert value is not None and value.nbytes == size
        first_get = (rss_peak(served.pid) - start) / size
        base = rss_peak_reset(served.pid)
        put()
        first_put = (rss_peak(served.pid) - base) / size
        kept = (rss_peak_reset(served.pid) - start) / size
        for label, growth in [("GetTensor", first_get), ("SetTensor", first_put)]:
            figure = f"{label} 512 MiB, first time: server peak memory growth / size"
            rows.append(Row(figure, growth, 1.0, growth, "<= 1.5x", growth <= 1.5, unit="x"))
        figure = "memory the server keeps for the next stream / size"
        rows.append(Row(figure, kept, 1.0, kept, "(report)", True, unit="x"))

        # Read into the caller's array (out=), as a watcher re-reading a tensor does: the
        # floor, too, keeps what it receives in memory that is already mapped.
        out = np.empty_like(value)
        ours, bare = paired(
            lambda: client.get("big", out=out), lambda: floor.get_stream(size, chunk), repeats
        )
        rows.append(rate_at_least("GetTensor 512 MiB float32 (streamed, out=)", ours, bare, 0.7))
        # Into a new array each time, the last one dropped first: the client reuses its
        # memory (memory.py).
        ours, bare = paired(get, lambda: floor.get_stream(size, chunk), repeats)
        rows.append(
            rate_at_least("GetTensor 512 MiB float32 (streamed, new array)", ours, bare, 0.7)
        )
        # Fresh memory each time costs page faults on this VM: 0.2 to 1.6 s seen for the
        # same read.
        client.keep_memory = False
        ours, bare = paired(get, lambda: floor.get_stream(size, chunk), repeats)
        rows.append(report(rate_at_least("  the same, fresh memory each time", ours, bare, 0.7)))
        client.keep_memory = True
        ours, bare = paired(put, lambda: floor.put_stream(size, chunk), repeats)
        rows.append(rate_at_least("SetTensor 512 MiB float32 (streamed)", ours, bare, 0.7))
    return rows


#: The tutorial's five calls' data: a batch of 8 and the slice its read fetches.
TUTORIAL_INPUT, TUTORIAL_TARGET = Fill.ones(8, 3, 10, 10), Fill.ones(8, dtype="int64")
TUTORIAL_READ = "conv1.weight[0][0][0]"


def tutorial_calls(client: gradwire.Client) -> None:
    """The tutorial's five calls, one after another."""
    client.forward(TUTORIAL_INPUT, TUTORIAL_TARGET)
    client.backward()
    client.step()
    client.zero_grad()
    client.get(TUTORIAL_READ)


def _tutorial_at_once(block: gradwire.Pipeline) -> gradwire.Pending[Any]:
    """The five calls made on a pipeline or batch; the read's Pending."""
    block.forward(TUTORIAL_INPUT, TUTORIAL_TARGET)
    block.backward()
    block.step()
    block.zero_grad()
    return block.get(TUTORIAL_READ)


def tutorial_batch(client: gradwire.Client) -> None:
    """The same five calls in one Batch call: one message each way."""
    with client.batch() as b:
        read = _tutorial_at_once(b)
    read.result()


def tutorial_pipeline(client: gradwire.Client) -> None:
    """The same five calls written at once, answered in order: the client waits once."""
    with client.pipeline() as p:
        read = _tutorial_at_once(p)
    read.result()


def plain_step(local: Trainer, size: int) -> Callable[[], None]:
    """The tutorial's step as a PyTorch loop writes it, with none of gradwire's Trainer
    around it (no lock, version, kept activations, non-finite count, transactional
    backward or kept deltas): the same model, loss, optimizer and data made each step as
    a Fill makes it, on the trainer's thread through the same hand-off. A floor under the
    in-process floor, to show what the Trainer's own work costs (a review of the benchmark
    asked for it: "the same step in-process" may be read as this)."""

    def make() -> tuple[nn.Module, torch.optim.Optimizer, nn.Module]:
        torch.manual_seed(0)
        model = local.spec.factory().to(local.device)
        return model, torch.optim.SGD(model.parameters(), lr=1.0), local.spec.criterion()

    model, optimizer, criterion = local._torch.run(make)

    def step() -> None:
        x = torch.ones(size, 3, 10, 10, device=local.device)
        y = torch.ones(size, dtype=torch.int64, device=local.device)
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        loss.item()

    return lambda: local._torch.run(step)


def steps(served: Served, repeats: int, device: str, one_thread: bool) -> list[Row]:
    rows = []
    # The in-process floor, on the server's device, using threads as the server does.
    local = Trainer(device=device, seed=0, one_thread_for_small_work=one_thread)

    def identity(selection: object) -> object:
        return selection

    rounds = step_rounds(repeats)
    with channel(served.address) as ch:
        client = gradwire.Client(served.address, channel=ch)
        # The targets' figures are taken on a Calls stream (`stream_calls=True`): gradwire's
        # own way of making calls one after another; the tutorial's five calls in one
        # Batch, as a script that needs no answer before its next call makes them (and as
        # `gradwire replay` makes them). In a pipeline on the stream, one at a time on it,
        # and as calls of their own, they are reported beside.
        streamed = gradwire.Client(served.address, channel=ch, stream_calls=True)
        floor = FloorClient(ch)
        bare = CeilingClient(ch)
        for size, target in [(256, 0.9), (8, 0.5)]:
            x, y = batch(size)
            xr, yr = Fill.ones(size, 3, 10, 10), Fill.ones(size, dtype="int64")
            # In-process: handed to the trainer's own thread, as the servicer does. The
            # ceiling beside them: the same step in a bare gRPC call.
            on_stream, ours, ceiling, inproc, plain = looped(
                [
                    lambda xr=xr, yr=yr: streamed.train_step(xr, yr, zero_grad=True),
                    lambda xr=xr, yr=yr: client.train_step(xr, yr, zero_grad=True),
                    lambda size=size: bare.train_step(size),
                    lambda x=x, y=y: local._run(
                        local.train_step, x, y, zero_grad=True, use=identity
                    ),
                    plain_step(local, size),
                ],
                rounds,
            )
            figure = f"TrainStep batch {size} on a Calls stream vs in-process"
            rows.append(rate_at_least(figure, on_stream, inproc, target))
            figure = "  the same, a call of its own each, vs in-process"
            rows.append(report(rate_at_least(figure, ours, inproc, target)))
            figure = "  (ceiling) the same step in a bare gRPC call, vs in-process"
            rows.append(report(rate_at_least(figure, ceiling, inproc, target)))
            figure = "  the same on a Calls stream, vs a plain PyTorch loop in-process"
            rows.append(report(rate_at_least(figure, on_stream, plain, target)))
            figure = "  in-process: gradwire's Trainer vs a plain PyTorch loop"
            rows.append(report(rate_at_least(figure, inproc, plain, 1.0)))
        rows.extend(steps_without_a_call_each(client, local, identity))

        # The tutorial's separate calls against in-process time plus 6 bare echoes.
        def local_calls() -> None:
            local.forward(*batch(8))
            local.backward()
            local.step()
            local.zero_grad()
            local.read(*READ)

        ours, piped, one_by_one, unary, ceiling, inproc, bare_echo = looped(
            [
                lambda: tutorial_batch(client),
                lambda: tutorial_pipeline(streamed),
                lambda: tutorial_calls(streamed),
                lambda: tutorial_calls(client),
                bare.tutorial,
                lambda: local._run(local_calls),
                floor.small_echo,
            ],
            rounds,
        )
        budget = inproc + 6 * bare_echo
        figure = "Tutorial's 5 calls in one Batch vs in-process + 6 echoes"
        rows.append(at_most(figure, ours, budget, 1.0))
        figure = "  the same, in a pipeline on a Calls stream, vs in-process + 6 echoes"
        rows.append(report(at_most(figure, piped, budget, 1.0)))
        figure = "  the same, one at a time on a Calls stream, vs in-process + 6 echoes"
        rows.append(report(at_most(figure, one_by_one, budget, 1.0)))
        figure = "  the same, a call of its own each, vs in-process + 6 echoes"
        rows.append(report(at_most(figure, unary, budget, 1.0)))
        figure = "  (ceiling) the same 5 calls, bare gRPC, vs in-process + 6 echoes"
        rows.append(report(at_most(figure, ceiling, budget, 1.0)))
        # A person stepping by hand, or a script doing other work between steps: what a pause
        # costs the calls after it (torch's OpenMP worker asleep; docs/performance-history.md,
        # "After idle").
        after_idle = []
        for _ in range(repeats):
            time.sleep(IDLE_S)  # the pause is the figure's premise, not a wait for a result
            after_idle.append(timed(lambda: tutorial_calls(client)))  # calls of their own
        idle = statistics.median(after_idle)
        figure = f"Tutorial's 5 calls after {IDLE_S * 1e3:.0f} ms idle vs back to back"
        rows.append(Row(figure, idle, unary, idle / unary, "(report)", True))
        rows.append(beside_a_session(client, repeats))
        streamed.close()
    return rows


#: Steps in one round of `steps_without_a_call_each`, and rounds per figure.
ROUND_STEPS, ROUNDS = 16, 5


def steps_without_a_call_each(
    client: gradwire.Client, local: Trainer, identity: Callable[[object], object]
) -> list[Row]:
    """The ways past a call's fixed cost, at batch 256, against the same steps in-process,
    per step, in alternating rounds: the `Train` RPC (the steps in a loop on the server, one
    call for all), TrainSteps kept two in flight from two threads (which overlap one call's
    legs with the other's step where the step is not CPU work: a GPU's), and TrainSteps
    written at once in a pipeline, each answered. Reported, with no target of their own."""
    n = ROUND_STEPS
    xr, yr = Fill.ones(256, 3, 10, 10), Fill.ones(256, dtype="int64")
    x, y = batch(256)

    def in_process() -> None:
        for _ in range(n):
            local._run(local.train_step, x, y, zero_grad=True, use=identity)

    def train_rpc() -> None:
        for _ in client.train(xr, yr, n, every=n):
            pass

    def two_in_flight() -> None:
        def half() -> None:
            for _ in range(n // 2):
                client.train_step(xr, yr, zero_grad=True)

        with ThreadPoolExecutor(2) as pool:
            for done in [pool.submit(half), pool.submit(half)]:
                done.result()

    def pipelined() -> None:
        with client.pipeline() as p:
            for _ in range(n):
                p.train_step(xr, yr, zero_grad=True)

    rows = []
    for figure, ours in [
        ("Train RPC batch 256 (steps looped on the server) vs in-process", train_rpc),
        ("TrainStep batch 256, two in flight, vs in-process", two_in_flight),
        (f"TrainStep batch 256, {n} in a pipeline, vs in-process", pipelined),
    ]:
        remote, inproc = paired(ours, in_process, ROUNDS)
        rows.append(report(rate_at_least(figure, remote / n, inproc / n, 0.9)))
    return rows


def beside_a_session(client: gradwire.Client, repeats: int) -> Row:
    """TrainStep at batch 8 with another session open beside, idle after one step of its own,
    against none, in alternating rounds. When each session had a torch thread of its own, its
    OpenMP team slowed every team in the server while it lived (torch_thread.py)."""
    x, y = Fill.ones(8, 3, 10, 10), Fill.ones(8, dtype="int64")

    def step() -> None:
        client.train_step(x, y, zero_grad=True)

    alone: list[float] = []
    beside: list[float] = []
    for _ in range(3):
        step()
        alone.extend(timed(step) for _ in range(repeats))
        with client.open_session(seed=0) as other:
            other.train_step(x, y, zero_grad=True)
            step()
            beside.extend(timed(step) for _ in range(repeats))
    ours, floor = statistics.median(beside), statistics.median(alone)
    figure = "TrainStep batch 8 beside an idle session, vs alone, rate"
    return Row(figure, ours, floor, floor / ours, "(report)", True)


def watchers(served: Served, repeats: int) -> list[Row]:
    """TrainStep at batch 8 with watchers subscribed, against none. Training never waits for
    a watcher, but each update costs the server its reads, copies and sends: without a limit
    until the watcher's transport window is full, however slowly it reads; with
    `min_interval` (what `gradwire watch` uses, 0.1 s) at most that often."""
    rows = []
    x, y = Fill.ones(8, 3, 10, 10), Fill.ones(8, dtype="int64")
    params = ["conv1.weight", "conv2.weight", "linear.weight"]
    with channel(served.address) as ch:
        client = gradwire.Client(served.address, channel=ch)
        client.set_optimizer("sgd", lr=0.001)

        def step() -> None:
            client.train_step(x, y, zero_grad=True)

        def rounds(setup: Callable[[], Callable[[], None]]) -> tuple[float, float]:
            """Medians without and with the watchers `setup` starts, in alternating blocks."""
            alone: list[float] = []
            watched: list[float] = []
            for _ in range(3):
                step()
                alone.extend(timed(step) for _ in range(repeats))
                stop = setup()
                step()
                watched.extend(timed(step) for _ in range(repeats))
                stop()
            return statistics.median(watched), statistics.median(alone)

        def stalled(interval: float) -> Callable[[], Callable[[], None]]:
            def setup() -> Callable[[], None]:
                # Not read as they come (latest=False): a watcher that stops reading, as a
                # client in any language can, whose updates back up in gRPC's buffers.
                streams = [
                    client.watch(["conv2.output"], values=True, min_interval=interval, latest=False)
                    for _ in range(4)
                ]
                for stream in streams:
                    next(stream)  # subscribed; never read again

                def stop() -> None:
                    for stream in streams:
                        stream.close()

                return stop

            return setup

        def reading(interval: float) -> Callable[[], Callable[[], None]]:
            def setup() -> Callable[[], None]:
                done = threading.Event()

                def read() -> None:
                    for _ in client.watch(params, stats=True, bins=32, min_interval=interval):
                        if done.is_set():
                            break

                threads = [threading.Thread(target=read, daemon=True) for _ in range(2)]
                for thread in threads:
                    thread.start()
                time.sleep(0.2)  # subscribed (a benchmark may wait; a test may not)

                def stop() -> None:
                    done.set()
                    time.sleep(interval)
                    step()  # one more update wakes each reader to see `done`
                    for thread in threads:
                        thread.join(10)

                return stop

            return setup

        for name, setup, target in [
            ("4 stalled watchers of 100 KB, no interval", stalled(0.0), None),
            ("4 stalled watchers of 100 KB, 0.1 s interval", stalled(0.1), 0.9),
            ("2 watchers of statistics, no interval", reading(0.0), None),
            # Readers in this process: their decoding shares the timed client's GIL.
            ("2 watchers of statistics, 0.1 s interval", reading(0.1), None),
        ]:
            ours, alone = rounds(setup)
            row = rate_at_least(f"TrainStep batch 8, {name}, vs none", ours, alone, target or 0)
            if target is None:
                row = report(row)
            rows.append(row)
    return rows


PARTS = ("small", "steps", "watch", "typed", "big")


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, grpcio {grpc.__version__}, numpy {np.__version__}"
    )


def table(rows: list[Row]) -> str:
    head = ["figure", "ours (ms or x)", "floor (ms or x)", "ratio", "target", "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu", help="where the servers keep their model")
    parser.add_argument(
        "--repeats",
        type=int,
        default=31,
        help="calls per figure (median; small calls 10 times as many); the steps run loops "
        "of 0.4 s instead, one round per 2 repeats, and the small calls' loop rows one round "
        "per 6",
    )
    parser.add_argument("--big-repeats", type=int, default=5, help="512 MiB transfers per figure")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--only", nargs="+", choices=PARTS, help="measure only these parts")
    parser.add_argument(
        "--return-freed-memory",
        action="store_true",
        help="glibc's default malloc settings in the server and the in-process floors alike "
        "(`gradwire serve --return-freed-memory`)",
    )
    parser.add_argument(
        "--one-thread-for-small-work",
        action="store_true",
        help="small steps on one thread in the server and the in-process floors alike "
        "(`gradwire serve --one-thread-for-small-work`)",
    )
    args = parser.parse_args()
    keep_freed = not args.return_freed_memory
    one_thread = args.one_thread_for_small_work
    flags = [flag for flag, on in [("--return-freed-memory", not keep_freed),
                                   ("--one-thread-for-small-work", one_thread)] if on]  # fmt: skip
    parts = set(args.only or PARTS)
    sys.stderr.write(load.busy_before())  # a word while the run can still be stopped
    started = load.snapshot()
    # The reads first, while this process has glibc's malloc defaults, as a client's process
    # has: kept freed memory would hand a new 32 MiB array (bfloat16 widened) pages already
    # touched, when the top of the heap has room, which a client's malloc never does.
    # And on a thread that ends before the floors run: widening bfloat16, torch makes an
    # OpenMP team on the reading thread, and a team that outlives its use slows every other
    # team in the process, the floors' included (torch_thread.py): batch 256 in-process took
    # 10.0-10.4 ms after the reads on this thread against 7.9 ms without them.
    reads: list[Row] = []

    def measure_reads() -> None:
        with serve("blobs", args.device, flags) as served:
            if "typed" in parts:
                reads.extend(typed_reads(served, args.repeats))
                # Half as many: each Node.js call moves 16 MiB through JavaScript.
                reads.extend(node_reads(served, max(5, args.repeats // 2)))
            if "big" in parts:
                reads.extend(big_transfers(served, args.big_repeats))

    if parts & {"typed", "big"}:
        with ThreadPoolExecutor(max_workers=1) as pool:
            pool.submit(measure_reads).result()
    limit_onednn_cache()  # the in-process floors run as the server does
    if keep_freed:
        keep_freed_memory()
    rows: list[Row] = []
    if parts & {"small", "steps", "watch"}:
        with serve("simple", args.device, flags) as served:
            if "small" in parts:
                rows += small_calls(served, args.repeats)
            if "steps" in parts:
                rows += steps(served, args.repeats, args.device, one_thread)
            if "watch" in parts:
                rows += watchers(served, args.repeats)
    rows += reads
    memory = "kept for the next step" if keep_freed else "given back (--return-freed-memory)"
    threads = "one thread (--one-thread-for-small-work)" if one_thread else "torch's threads"
    header = [
        f"Machine: {machine()}",
        f"Freed memory (server, in-process floors): {memory}",
        f"Small steps: {threads}",
    ]
    cpu = load.summary(started, load.snapshot())  # the run's other load, if any
    text = "\n".join([*header, *([cpu] if cpu else [])]) + f"\n\n{table(rows)}\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    missed = [r.figure for r in rows if not r.met]
    print("every target met" if not missed else f"targets missed: {len(missed)}: {missed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
