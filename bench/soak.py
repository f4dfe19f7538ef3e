"""A soak on loopback: one writer looping training steps and 16 readers, for a bounded time.

`python -m bench.soak --seconds 120` starts a server process (bench/server.py), drives it,
and reports requests served, status counts, p50/p99 latency per kind and the server's memory
growth. Bounded in time and count; loopback only.

`--sessions K` adds K writers that each loop training steps in a session of their own, beside
the default session's writer and the readers, and reports per session that its version is
exactly its acknowledged steps' (nothing lost, doubled, or counted in another session), and
that a session nobody writes to was left as it was opened.

`--churn` adds a client that opens and closes, one cycle after another, what clients come
and go with: a channel with a Calls stream, a session with two steps in it, and a Watch of that
session; it reports the cycles and that the server holds no more sessions at the end than
at the start. The server's memory is sampled every `--sample-seconds` all along, so that a
long run tells growth from a plateau (the request ids that make retries safe are kept 10
minutes: a run shorter than that sees their store still filling).
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


def soak(
    served: Served,
    seconds: float,
    readers: int,
    sessions: int = 0,
    watchers: int = 0,
    churn: bool = False,
    sample_seconds: float = 60.0,
) -> dict[str, object]:
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
    # Watchers of the default session, subscribed before the load: half read every update
    # (values and statistics, checked against each other), half never read after the first.
    watching = [gradwire.connect(served.address, timeout=None) for _ in range(watchers)]
    streams = [c.watch(["conv1.weight[0]", "loss"], values=True, stats=True) for c in watching]
    for stream in streams:
        next(stream)  # subscribed
    readers_of_updates = streams[: (watchers + 1) // 2]
    final_version = threading.Event()
    final: list[int] = []
    watched = collections.Counter[str]()

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

    def churner() -> None:
        """Opens and closes a channel (with its Calls stream), a session and a Watch of it,
        cycle after cycle. A cycle refused BUSY is counted and tried again."""
        x, y = Fill.uniform(8, 3, 10, 10, seed=3), Fill.randint(0, 20, 8, seed=4)
        cycle = 0
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                with gradwire.connect(served.address, timeout=30, stream_calls=True) as client:
                    session = client.open_session(seed=cycle)
                    try:
                        session.train_step(x, y, zero_grad=True)
                        updates = session.watch(["loss", "conv1.weight[0]"], values=True)
                        next(updates)  # subscribed: the state now
                        session.train_step(x, y, zero_grad=True)
                        next(updates)  # the step's update
                        updates.close()
                    finally:
                        _close_session(session)
                record("churn cycle", started, "OK")
            except RemoteError as err:
                record("churn cycle", started, err.code.name)
            cycle += 1

    def sampler() -> None:
        while not stop_sampling.wait(sample_seconds):
            samples.append(round(rss(served.pid) / 2**20, 1))

    def watcher(stream: Any) -> None:
        """Reads every update until it has seen the default session's final version."""
        last = 0
        for update in stream:
            value, stats = update["conv1.weight"].value, update["conv1.weight"].stats
            with lock:
                watched["updates"] += 1
                watched["accounted for"] += update.skipped + 1
                watched["versions out of order"] += update.version < last
                finite = np.asarray(value, dtype=np.float64)
                watched["values disagreeing with their statistics"] += not (
                    stats is not None
                    and abs(finite.mean() - stats.mean) <= 1e-9 * (1 + abs(stats.mean))
                )
            last = update.version
            if final_version.is_set() and last >= final[0]:
                break

    sessions_before = len(owners[0].list_sessions().sessions)
    start_rss = rss(served.pid)
    samples = [round(start_rss / 2**20, 1)]
    stop_sampling = threading.Event()
    sampling = threading.Thread(target=sampler)
    sampling.start()
    threads = [threading.Thread(target=writer, args=(label,)) for label in writers] + [
        threading.Thread(target=reader, args=(i,)) for i in range(readers)
    ]
    if churn:
        threads.append(threading.Thread(target=churner))
    watcher_threads = [threading.Thread(target=watcher, args=(s,)) for s in readers_of_updates]
    for t in threads + watcher_threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 120)
    if watchers:
        # One more step, announced after the final version is known: a watcher that had
        # already seen the last version of the load sees this one, and ends.
        final.append(owners[0].list_tensors().version + VERSIONS_PER_STEP)
        final_version.set()
        owners[0].train_step(Fill.ones(8, 3, 10, 10), Fill.ones(8, dtype="int64"))
        acknowledged["default"] += 1
    for t in watcher_threads:
        t.join(timeout=60)
    hung = sum(t.is_alive() for t in threads + watcher_threads)
    checks: dict[str, object] = {}
    for stream in streams:
        stream.close()
    for c in watching:
        c.close()
    stop_sampling.set()
    sampling.join()
    end_rss = rss(served.pid)
    if churn:
        after = len(owners[0].list_sessions().sessions)
        checks["sessions open before / after the load"] = (
            f"{sessions_before} / {after} "
            f"({'as expected' if after == sessions_before else 'MISMATCH: sessions left open'})"
        )
    versions = {label: client.list_tensors().version for label, client in writers.items()}
    for label, version in versions.items():
        # The writer's SetOptimizer, then each acknowledged step's mutations, and no others.
        expected = 1 + VERSIONS_PER_STEP * acknowledged[label]
        verdict = "as expected" if version == expected else f"MISMATCH: expected {expected}"
        checks[f"{label}: steps / version"] = f"{acknowledged[label]} / {version} ({verdict})"
    if watchers:
        # Every TrainStep of the default session is one update due to each reading watcher:
        # received, or counted in a later update's `skipped`.
        expected = len(readers_of_updates) * acknowledged["default"]
        checks["watchers reading / stalled"] = (
            f"{len(readers_of_updates)} / {watchers - len(readers_of_updates)}"
        )
        checks["watch updates received"] = watched["updates"]
        checks["watch updates accounted for (received + skipped)"] = (
            f"{watched['accounted for']} (expected {expected}: "
            f"{'as expected' if watched['accounted for'] == expected else 'MISMATCH'})"
        )
        checks["watch updates out of order"] = watched["versions out of order"]
        checks["watch updates whose values disagree with their statistics"] = watched[
            "values disagreeing with their statistics"
        ]
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
        "clients": len(writers) + readers + watchers,
        "requests": sum(len(v) for v in latencies.values()),
        "statuses": dict(statuses),
        "hung clients": hung,
        "final version": versions["default"],
        **checks,
        "server RSS start (MiB)": round(start_rss / 2**20, 1),
        "server RSS end (MiB)": round(end_rss / 2**20, 1),
        f"server RSS every {sample_seconds:g} s (MiB)": samples,
    }
    for kind, values in sorted(latencies.items()):
        values.sort()
        report[f"{kind} count"] = len(values)
        report[f"{kind} p50 (ms)"] = round(statistics.median(values) * 1e3, 2)
        report[f"{kind} p99 (ms)"] = round(values[int(len(values) * 0.99) - 1] * 1e3, 2)
    return report


def _close_session(session: gradwire.Client) -> None:
    """Closes a session, retrying while the server answers BUSY, so that a refused close
    does not leave it open until it expires (which the check at the end would count)."""
    for _ in range(100):
        try:
            session.close()
            return
        except RemoteError as err:
            if err.reason != "BUSY":
                raise
            time.sleep(0.05)
    raise RuntimeError("the server refused to close a session 100 times: BUSY")


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
    parser.add_argument(
        "--watchers",
        type=int,
        default=0,
        help="Watch streams of the default session: half read every update, half never do",
    )
    parser.add_argument(
        "--churn",
        action="store_true",
        help="a client that opens and closes a channel, a session and a Watch, cycle after cycle",
    )
    parser.add_argument(
        "--sample-seconds",
        type=float,
        default=60.0,
        help="how often the server's memory is sampled",
    )
    args = parser.parse_args()
    if not 0 <= args.sessions < DEFAULT_MAX_SESSIONS:
        parser.error(f"--sessions takes 0 to {DEFAULT_MAX_SESSIONS - 1}")
    with serve("simple", "cpu") as served:
        report = soak(
            served,
            args.seconds,
            args.readers,
            args.sessions,
            args.watchers,
            args.churn,
            args.sample_seconds,
        )
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
