"""`make demo`: start a gradwire server, replay the tutorial against it over gRPC, stop the server.

The server runs as its own process (`gradwire serve`, through the installed command's own
entry point), exactly as a user would start it; the replay talks to it only through gRPC.
Both quiet gRPC's own log lines as the command does (GRPC_VERBOSITY=ERROR unless set).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path


def start_server(port: int, device: str, port_file: Path) -> subprocess.Popen[str]:
    command = [
        sys.executable, "-m", "gradwire_cli", "serve",
        "--host", "127.0.0.1", "--port", str(port), "--device", device,
        "--port-file", str(port_file),
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    assert process.stderr is not None
    for line in process.stderr:  # the server's log, until it listens
        sys.stderr.write(f"[server] {line}")
        if "listening on" in line:
            return process
    raise SystemExit(f"the server exited with code {process.wait()} before listening")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    # Read by gRPC's C core once, when grpc is first imported: before gradwire is.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from gradwire.cli import main as gradwire

    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        server = start_server(args.port, args.device, port_file)
        target = f"127.0.0.1:{port_file.read_text().strip()}"
        try:
            print(f"\n== the tutorial, replayed over gRPC against {target} ==\n", flush=True)
            code = gradwire(["replay", "--target", target])
            if code == 0:
                print("\n== the same lesson with PyTorch's default init (seed 0) ==\n", flush=True)
                code = gradwire(["replay", "--target", target, "--init", "random", "--seed", "0"])
        finally:
            server.send_signal(signal.SIGTERM)
            assert server.stderr is not None
            for line in server.stderr:
                sys.stderr.write(f"[server] {line}")
            server.wait(timeout=30)
    return code


if __name__ == "__main__":
    sys.exit(main())
