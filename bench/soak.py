"""A soak on loopback: one writer looping training steps and 16 readers, for a bounded time.

`python -m bench.soak --seconds 120` starts a server process (bench/server.py), drives it,
and reports requests served, status counts, p50/p99 latency per kind and the server's memory
growth. Bounded in time and count; loopback only.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import threading
import time

import gradwire
from bench.bench import Served, serve
from gradwire.errors import RemoteError
from gradwire.fill import Fill


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise KeyError("VmRSS")


def soak(served: Served, seconds: float, readers: int) -> dict[str, object]:
    deadline = time.monotonic() + seconds
    latencies: dict[str, list[float]] = collections.defaultdict(list)
    statuses: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def record(kind: str, started: float, status: str) -> None:
        with lock:
            latencies[kind].append(time.perf_counter() - started)
            statuses[f"{kind} {status}"] += 1

    def writer() -> None:
        x, y = Fill.uniform(32, 3, 10, 10, seed=1), Fill.randint(0, 20, 32, seed=2)
        with gradwire.connect(served.address, timeout=30) as client:
            client.set_optimizer("sgd", lr=0.01)
            while time.monotonic() < deadline:
                started = time.perf_counter()
                try:
                    client.train_step(x, y, zero_grad=True)
                    record("TrainStep", started, "OK")
                except RemoteError as err:
                    record("TrainStep", started, err.code.name)

    def reader(i: int) -> None:
        selectors = ["conv1.weight.grad[0][0][0]", "linear.weight", "loss", "conv2.weight[3]"]
        with gradwire.connect(served.address, timeout=30) as client:
            n = 0
            while time.monotonic() < deadline:
                selector = selectors[(i + n) % len(selectors)]
                n += 1
                started = time.perf_counter()
                try:
                    client.get(selector)
                    record("GetTensor", started, "OK")
                except RemoteError as err:
                    record("GetTensor", started, err.code.name)

    start_rss = rss(served.pid)
    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=reader, args=(i,)) for i in range(readers)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 120)
    hung = sum(t.is_alive() for t in threads)
    end_rss = rss(served.pid)
    with gradwire.connect(served.address) as client:
        version = client.list_tensors().version
    report: dict[str, object] = {
        "seconds": seconds,
        "clients": 1 + readers,
        "requests": sum(len(v) for v in latencies.values()),
        "statuses": dict(statuses),
        "hung clients": hung,
        "final version": version,
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
    args = parser.parse_args()
    with serve("simple", "cpu") as served:
        report = soak(served, args.seconds, args.readers)
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
