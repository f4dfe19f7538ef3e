"""The tutorial's five calls over a slow network: what a batch or a pipeline saves.

`python -m bench.latency --delay-ms 0 2.5 10` starts a server process (bench/server.py) and a
relay on loopback that holds every byte `delay` ms each way before passing it on (a round
trip of twice that), and times the tutorial's Forward, Backward, Step, ZeroGrad and read
through it: in one Batch, written at once in a pipeline, one at a time on the client's
Calls stream, and as calls of their own; and, as the floor of the pipeline, the same five
CallRequests written at once on a bare Calls stream, with none of the client's code.
Medians of `--repeats`
rounds, in turn. The relay is Python (asyncio) and costs time of its own: the 0 ms row
says how much. A benchmark for the README's claim, not part of `make bench`, whose figures
are all on bare loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import queue
import statistics
import time
from collections.abc import Callable
from typing import Any

import grpc

import gradwire
from bench.bench import serve, tutorial_batch, tutorial_calls, tutorial_pipeline
from gradwire import calls, wire
from gradwire.call_stream import CallStream


class DelayRelay:
    """Relays connections on loopback to `target_port`, each chunk held `delay` seconds in
    each direction, in order: a network with a round trip of 2 * delay, and no loss. Runs
    in a process of its own (`start`), so as not to share the client's GIL."""

    def __init__(self, target_port: int, delay: float) -> None:
        self._target_port = target_port
        self._delay = delay

    @classmethod
    def start(cls, target_port: int, delay: float) -> tuple[int, multiprocessing.Process]:
        """A relay process, and the port it listens on; terminate the process to end it."""
        context = multiprocessing.get_context("spawn")  # no fork of a process using gRPC
        ports: Any = context.SimpleQueue()
        process = context.Process(target=_relay_process, args=(target_port, delay, ports))
        process.daemon = True
        process.start()
        return ports.get(), process

    async def serve(self, started: Any) -> None:
        server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        started.put(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        there_reader, there_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
        await asyncio.gather(
            self._one_way(reader, there_writer),
            self._one_way(there_reader, writer),
            return_exceptions=True,
        )

    async def _one_way(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def release() -> None:
            while True:
                due, data = await held.get()
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                if not data:
                    writer.close()
                    return
                writer.write(data)
                await writer.drain()

        releasing = asyncio.create_task(release())
        while True:
            data = await reader.read(1 << 16)
            await held.put((loop.time() + self._delay, data))
            if not data:
                break
        await releasing


def _relay_process(target_port: int, delay: float, ports: Any) -> None:
    asyncio.run(DelayRelay(target_port, delay).serve(ports))


class BareStream:
    """The tutorial's five CallRequests, as the client writes them (fresh request ids each
    time), written at once on a Calls stream of its own: no client code around them."""

    def __init__(self, channel: grpc.Channel, client: gradwire.Client) -> None:
        self._calls = self._captured(client)
        self._requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        calls_method = channel.stream_stream("/gradwire.v1.Trainer/Calls")
        self._answers = calls_method(iter(self._requests.get, None))

    @staticmethod
    def _captured(client: gradwire.Client) -> list[tuple[str, list[Any], bool]]:
        captured: list[tuple[str, list[Any], bool]] = []
        send = CallStream.send

        def recorded(stream: CallStream, method: str, request: Any, request_id: Any,
                     *args: Any, **kwargs: Any) -> None:  # fmt: skip
            captured.append((method, list(request), request_id is not None))
            send(stream, method, request, request_id, *args, **kwargs)

        CallStream.send = recorded  # type: ignore[method-assign]
        try:
            tutorial_pipeline(client)
        finally:
            CallStream.send = send  # type: ignore[method-assign]
        return captured

    def __call__(self) -> None:
        for method, pieces, takes_id in self._calls:
            request_id = os.urandom(16).hex() if takes_id else None
            self._requests.put(wire.join(calls.request_pieces(method, pieces, request_id, None, 0)))
        for _ in self._calls:
            next(self._answers)

    def close(self) -> None:
        self._requests.put(None)


def measure(address: str, delay: float, repeats: int) -> dict[str, float]:
    port = int(address.rsplit(":", 1)[1])
    relay_port, relay = DelayRelay.start(port, delay)
    target = f"127.0.0.1:{relay_port}"
    try:
        return _measure(target, repeats)
    finally:
        relay.terminate()
        relay.join(10)


def _measure(target: str, repeats: int) -> dict[str, float]:
    with (
        gradwire.connect(target, stream_calls=True) as streamed,
        gradwire.connect(target) as unary,
        grpc.insecure_channel(target) as channel,
    ):
        bare = BareStream(channel, streamed)
        ways: dict[str, Callable[[], object]] = {
            "batch": lambda: tutorial_batch(unary),
            "pipeline": lambda: tutorial_pipeline(streamed),
            "one at a time on the stream": lambda: tutorial_calls(streamed),
            "calls of their own": lambda: tutorial_calls(unary),
            "(floor) bare stream, written at once": bare,
        }
        for way in ways.values():  # connections made, streams opened, caches warm
            way()
            way()
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(repeats):
            for name, way in ways.items():
                start = time.perf_counter()
                way()
                times[name].append(time.perf_counter() - start)
        bare.close()
    return {name: statistics.median(kept) for name, kept in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--delay-ms", type=float, nargs="+", default=[0.0, 2.5, 10.0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print("| one-way delay (round trip) | " + " | ".join(
        ["batch", "pipeline", "one at a time on the stream", "calls of their own",
         "(floor) bare stream"]
    ) + " |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")
    with serve("simple", "cpu") as served:
        for delay_ms in args.delay_ms:
            medians = measure(served.address, delay_ms / 1000, args.repeats)
            cells = " | ".join(f"{seconds * 1e3:.1f} ms" for seconds in medians.values())
            print(f"| {delay_ms:g} ms ({2 * delay_ms:g} ms) | {cells} |", flush=True)


if __name__ == "__main__":
    main()
