"""The factors of server/gradwire_server/pass_memory.py, measured again: what a CPU pass of
each of the project's models takes at its peak, against the bytes its forward pass's
operations make on meta tensors (the estimate the server checks before a pass).

    python -m bench.pass_memory            # a table, in Markdown

Each pass runs in a process of its own, with the server's malloc settings (allocator.py),
and its peak is the growth of the process's highest resident memory (ru_maxrss) across the
call, its input made before. Not part of `make bench`: it takes a few GiB and about a
minute, and it measures memory, not time.
"""

from __future__ import annotations

import json
import subprocess
import sys

#: (model, samples): large enough that what the allocator keeps aside (its 64 MiB top pad)
#: is a small part of the peak.
CASES = (
    ("", 20_000),  # the tutorial's Simple
    ("gradwire_server.models:TINY_MLP", 2_000_000),
    ("gradwire_server.models:TINY_REGRESSOR", 2_000_000),
)
PASSES = ("forward", "forward with a target", "training step")


def measure(model: str, samples: int, kind: str) -> dict[str, float]:
    """One pass, in this process: what its operations made on meta tensors and how far it
    took the peak resident memory."""
    import resource

    import torch

    from gradwire_server import allocator
    from gradwire_server.models import SIMPLE, load_spec
    from gradwire_server.trainer import Trainer

    allocator.keep_freed_memory()
    trainer = Trainer(load_spec(model) if model else SIMPLE, seed=0)
    spec = trainer.spec
    shape = (samples, *spec.sample_shape)
    run = trainer._meta_run(shape, torch.float32)
    assert run is not None, "the model does not run on meta tensors"
    x = torch.randn(shape)
    y = (
        torch.randn(samples, spec.num_classes)
        if spec.loss == "mse"
        else torch.randint(0, spec.num_classes, (samples,))
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if kind == "forward":
        trainer.forward(x)
    elif kind == "forward with a target":
        trainer.forward(x, y)
    else:
        trainer.train_step(x, y, use=lambda selection: None)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    return {"made": run.made_bytes, "peak": grown}


def main() -> None:
    if len(sys.argv) == 4:  # one pass, in a process of its own
        model, samples, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
        print(json.dumps(measure(model, samples, kind)))
        return
    print("| model | samples | pass | made on meta tensors | peak growth | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for model, samples in CASES:
        for kind in PASSES:
            out = subprocess.run(
                [sys.executable, "-m", "bench.pass_memory", model, str(samples), kind],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            got = json.loads(out.strip().splitlines()[-1])
            name = model.rpartition(":")[2] or "SIMPLE"
            print(
                f"| {name} | {samples:,} | {kind} | {got['made'] / 2**20:,.0f} MiB "
                f"| {got['peak'] / 2**20:,.0f} MiB | {got['peak'] / got['made']:.2f}x |"
            )


if __name__ == "__main__":
    main()
