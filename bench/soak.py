"""A soak on loopback: one writer looping training steps and 16 readers, for a bounded time.

`python -m bench.soak --seconds 120` starts a server process (bench/server.py), drives it,
and reports requests served, status counts, p50/p99 latency per kind and the server's memory
growth. Bounded in time and count; loopback only.

`--sessions K` adds K writers that each loop training steps in a session of their own, beside
the default session's writer and the readers, and reports per session that its version is
exactly its acknowledged steps' (nothing lost, doubled, or counted in another session), and
that a session nobody writes to was left as it was opened.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import threading
import time
from typing import Any

import numpy as np

import gradwire
from bench.bench import Served, serve
from gradwire.errors import RemoteError
from gradwire.fill import Fill
from gradwire_server.sessions import DEFAULT_MAX_SESSIONS

#: Versions one TrainStep with zero_grad adds: ZeroGrad, Forward, Backward, Step.
VERSIONS_PER_STEP = 4


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise KeyError("VmRSS")


def soak(served: Served, seconds: float, readers: int, sessions: int = 0) -> dict[str, object]:
    deadline = time.monotonic() + seconds
    latencies: dict[str, list[float]] = collections.defaultdict(list)
    statuses: collections.Counter[str] = collections.Counter()
    acknowledged: collections.Counter[str] = collections.Counter()  # OK TrainSteps per writer
    control_reads = [0, 0]  # reads of the unwritten session: all, and those at a version > 0
    lock = threading.Lock()
    # One client (channel) per writer. Sessions are opened, and optimizers set, before the
    # load starts (so that no BUSY answer can refuse them), and read after it ends. One more
    # session is opened and never written: readers read it too, and it must not move.
    owners = [gradwire.connect(served.address, timeout=30) for _ in range(1 + sessions)]
    writers = {"default": owners[0]}
    writers.update({f"session {i}": c.open_session(seed=i) for i, c in enumerate(owners) if i})
    for client in writers.values():
        client.set_optimizer("sgd", lr=0.01)
    control = owners[0].open_session(seed=0) if sessions else None
    control_weights: Any = None if control is None else control.read("conv1.weight").value

    def record(kind: str, started: float, status: str) -> None:
        with lock:
            latencies[kind].append(time.perf_counter() - started)
            statuses[f"{kind} {status}"] += 1

    def writer(label: str) -> None:
        x, y = Fill.uniform(32, 3, 10, 10, seed=1), Fill.randint(0, 20, 32, seed=2)
        client = writers[label]
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                client.train_step(x, y, zero_grad=True)
                record("TrainStep", started, "OK")
                with lock:
                    acknowledged[label] += 1
            except RemoteError as err:
                record("TrainStep", started, err.code.name)

    def reader(i: int) -> None:
        selectors = ["conv1.weight.grad[0][0][0]", "linear.weight", "loss", "conv2.weight[3]"]
        with gradwire.connect(served.address, timeout=30) as client:
            n = 0
            while time.monotonic() < deadline:
                selector = selectors[(i + n) % len(selectors)]
                # With sessions, every fourth read is of the unwritten session (which keeps
                # it from expiring, however long the soak).
                client.session = control.session if control and n % 4 == 3 else None
                n += 1
                started = time.perf_counter()
                try:
                    read = client.read(selector)
                    record("GetTensor", started, "OK")
                    if client.session:
                        with lock:
                            control_reads[0] += 1
                            control_reads[1] += read.version != 0
                except RemoteError as err:
                    record("GetTensor", started, err.code.name)
            client.session = None

    start_rss = rss(served.pid)
    threads = [threading.Thread(target=writer, args=(label,)) for label in writers] + [
        threading.Thread(target=reader, args=(i,)) for i in range(readers)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 120)
    hung = sum(t.is_alive() for t in threads)
    end_rss = rss(served.pid)
    versions = {label: client.list_tensors().version for label, client in writers.items()}
    checks: dict[str, object] = {}
    for label, version in versions.items():
        # The writer's SetOptimizer, then each acknowledged step's mutations, and no others.
        expected = 1 + VERSIONS_PER_STEP * acknowledged[label]
        verdict = "as expected" if version == expected else f"MISMATCH: expected {expected}"
        checks[f"{label}: steps / version"] = f"{acknowledged[label]} / {version} ({verdict})"
    if control is not None:
        checks["unwritten session: final version"] = control.list_tensors().version
        weights = control.read("conv1.weight").value
        checks["unwritten session: weights as opened"] = np.array_equal(weights, control_weights)
        checks["unwritten session: reads / at a version > 0"] = "{} / {}".format(*control_reads)
        control.close()
    for client in reversed(writers.values()):
        client.close()  # a session client closes its session; the default's, its channel
    for owner in owners[1:]:
        owner.close()
    report: dict[str, object] = {
        "seconds": seconds,
        "clients": len(writers) + readers,
        "requests": sum(len(v) for v in latencies.values()),
        "statuses": dict(statuses),
        "hung clients": hung,
        "final version": versions["default"],
        **checks,
        "server RSS start (MiB)": round(start_rss / 2**20, 1),
        "server RSS end (MiB)": round(end_rss / 2**20, 1),
    }
    for kind, values in sorted(latencies.items()):
        values.sort()
        report[f"{kind} count"] = len(values)
        report[f"{kind} p50 (ms)"] = round(statistics.median(values) * 1e3, 2)
        report[f"{kind} p99 (ms)"] = round(values[int(len(values) * 0.99) - 1] * 1e3, 2)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--readers", type=int, default=16)
    parser.add_argument(
        "--sessions",
        type=int,
        default=0,
        help="writers with a session each, beside the default session's (at most "
        f"{DEFAULT_MAX_SESSIONS - 1}: one more session is opened and left unwritten)",
    )
    args = parser.parse_args()
    if not 0 <= args.sessions < DEFAULT_MAX_SESSIONS:
        parser.error(f"--sessions takes 0 to {DEFAULT_MAX_SESSIONS - 1}")
    with serve("simple", "cpu") as served:
        report = soak(served, args.seconds, args.readers, args.sessions)
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
