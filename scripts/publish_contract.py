"""Record the contract as published in proto/published.txtpb (`make publish-contract`), once
buf has checked that proto/ breaks nothing already published.

gradwire.v1 only grows (trainer.proto's header says so): tests/test_contract.py fails when
proto/ renames, renumbers, retypes or removes anything published.txtpb holds, and when
proto/ holds what published.txtpb does not. Run this after adding to the contract, and
commit published.txtpb with the addition. A change that breaks something published is
refused, and published.txtpb is left as it was.

`--proto DIR` and `--buf PATH` name another contract folder and buf (tests/test_contract.py
publishes a copy).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = "published.txtpb"
HEADER = (
    "# What gradwire.v1 has published: written by `make publish-contract`, never by hand.\n"
    "# tests/test_contract.py fails when proto/ changes or drops any of it (buf breaking, FILE).\n"
)


def publish(proto: Path, buf: Path) -> str | None:
    """Writes `proto`/published.txtpb; the reason it did not, or None."""
    if not buf.is_file():
        return f"{buf} not found: `make setup` installs buf when npm is on the machine"
    published = proto / PUBLISHED
    if published.exists():
        check = subprocess.run(
            [str(buf), "breaking", "--against", PUBLISHED],
            cwd=proto,
            capture_output=True,
            text=True,
            check=False,
        )
        if check.returncode != 0:
            return (
                f"{check.stdout}{check.stderr}".strip()
                + f"\nnot published: the changes above break what {PUBLISHED} holds. Add "
                "instead (a new field, message or RPC), and mark what is no longer used "
                "deprecated."
            )
    image = subprocess.run(
        [str(buf), "build", "--exclude-source-info", "-o", "-#format=txtpb"],
        cwd=proto,
        capture_output=True,
        check=False,
    )
    if image.returncode != 0:
        return image.stderr.decode(errors="replace").strip() or "buf build failed"
    written = published.with_name(PUBLISHED + ".tmp")
    written.write_bytes(HEADER.encode() + image.stdout)
    os.replace(written, published)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proto", type=Path, default=ROOT / "proto")
    parser.add_argument(
        "--buf", type=Path, default=ROOT / "tools" / "buf" / "node_modules" / ".bin" / "buf"
    )
    args = parser.parse_args(argv)
    refused = publish(args.proto, args.buf)
    if refused is not None:
        print(refused, file=sys.stderr)
        return 1
    print(f"published: {args.proto / PUBLISHED}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
