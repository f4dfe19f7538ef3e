"""The benchmark's server process: gradwire beside the bare-gRPC floor and ceiling, in one process.

`python -m bench.server --model simple|blobs --port-file F` serves until SIGTERM. A process
of its own, as in a deployment: the client's work and the server's never share a GIL, and
its memory can be read from /proc.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

import torch
from torch import nn

from bench import ceiling, floor
from gradwire_server.allocator import keep_freed_memory, limit_onednn_cache
from gradwire_server.app import start
from gradwire_server.models import SIMPLE, ModelSpec
from gradwire_server.trainer import Trainer

MIB = 1024 * 1024
#: The tensors the transfer figures read and write, one parameter per dtype.
BLOB_DTYPES = {
    "f32": torch.float32,
    "f64": torch.float64,
    "i32": torch.int32,
    "i64": torch.int64,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
}


class Blobs(nn.Module):
    """Parameters of every dtype, 16 MiB each, and one of 512 MiB: tensors to move, not a model."""

    def __init__(self, mib: int = 16, big_mib: int = 512) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        for name, dtype in BLOB_DTYPES.items():
            count = mib * MIB // dtype.itemsize
            if dtype.is_floating_point:
                data = torch.randn(count, generator=gen).to(dtype)
            else:
                data = torch.randint(-(2**30), 2**30, (count,), generator=gen, dtype=dtype)
            # Integer parameters cannot have gradients; they are still readable and writable.
            self.register_parameter(name, nn.Parameter(data, requires_grad=dtype.is_floating_point))
        self.big = nn.Parameter(torch.rand(big_mib * MIB // 4, generator=gen))


BLOBS = ModelSpec("Blobs", Blobs, sample_shape=(1,), num_classes=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=["simple", "blobs"], default="simple")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument(
        "--return-freed-memory", action="store_true", help="as `gradwire serve` has it"
    )
    parser.add_argument(
        "--one-thread-for-small-work", action="store_true", help="as `gradwire serve` has it"
    )
    args = parser.parse_args()
    limit_onednn_cache()  # as `gradwire serve` does
    if not args.return_freed_memory:
        keep_freed_memory()
    spec = BLOBS if args.model == "blobs" else SIMPLE
    trainer = Trainer(
        spec, device=args.device, seed=0, one_thread_for_small_work=args.one_thread_for_small_work
    )
    running = start(trainer, extra_handlers=[floor.handler(), ceiling.handler(trainer)])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    args.port_file.write_text(f"{running.port}\n")
    stop.wait()
    running.stop(grace=None)


if __name__ == "__main__":
    main()
