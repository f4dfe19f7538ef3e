#!/usr/bin/env bash
# Every GPU check in one run, for a CUDA machine that has PyTorch but no network (the device
# machines of our workplace): the CUDA tests, the tutorial replayed on the GPU, and the
# benchmark's table on the GPU, each written to $OUT (./out when OUT is unset).
#
# Before, on a machine with the package registries: `make gpu-wheels` puts the gRPC and
# protobuf wheels the project needs, for the GPU machine's Python, into .whl/. Then run this
# there from the repository's root with .whl/ beside it (the device tool: carry ".whl").
# Without .whl/ it uses the Python environment it finds (a GPU machine set up with `make
# setup`). DEVICE=cpu and BENCH_ARGS="--only small" try the script's wiring on a CPU;
# WHEELS names another folder of wheels than .whl/. Each step has a time limit (seconds,
# LIMIT_TESTS, LIMIT_REPLAY, LIMIT_BENCH; all of them together under a device call's 10
# minutes) so that one that hangs costs its own output only. On an H200 the whole script
# took under 280 seconds (run G8 of docs/performance-history.md), its 35 CUDA tests 23 of
# them; the 56 cuda-marked tests of the sixty-first session have not run on a GPU yet (its
# one call found the machine gone), hence 180 s for the tests.
set -uo pipefail

out="${OUT:-out}"
py="${PYTHON:-python3}"
device="${DEVICE:-cuda}"
wheels="${WHEELS:-.whl}"
mkdir -p "$out"
roots="$PWD/client:$PWD/server:$PWD"
if compgen -G "$wheels/*.whl" >/dev/null; then
    site=/tmp/gradwire-site
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$wheels"/*.whl || exit 1
    roots="$site:$roots"
fi
export PYTHONPATH="$roots${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

failed=()
step() {  # step NAME SECONDS COMMAND...: runs it, its output to $out/NAME.txt, then shown
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    # Into a file, not a pipe: a child left behind by a step stopped at its limit (the
    # demo's server) cannot hold the step open. Killed 10 s after its SIGTERM if need be.
    if ! timeout -k 10 "$limit" "$@" >"$out/$name.txt" 2>&1; then
        failed+=("$name")
    fi
    cat "$out/$name.txt"
}

step machine 30 "$py" -c "
import platform, grpc, numpy, torch, google.protobuf as protobuf
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device'
print(f'Python {platform.python_version()}, torch {torch.__version__}, {gpu}, '
      f'grpcio {grpc.__version__}, protobuf {protobuf.__version__}, numpy {numpy.__version__}')
"
if [ "$device" = cuda ]; then
    step nvidia-smi 20 nvidia-smi
    # Without it every CUDA test skips and pytest passes: fail here instead.
    step cuda-visible 30 "$py" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'"
    # Every test marked cuda, wherever it is: a test of served behaviour runs on each device
    # (tests/serve_in_process.py's DEVICES), test_gpu.py's on the GPU alone.
    step tests "${LIMIT_TESTS:-180}" "$py" -m pytest -q -p no:cacheprovider -m cuda tests
fi
step replay "${LIMIT_REPLAY:-60}" "$py" scripts/demo.py --port 0 --device "$device"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
step bench "${LIMIT_BENCH:-300}" "$py" -m bench.bench --device "$device" ${BENCH_ARGS:-} --markdown "$out/bench.md"

if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]}"
    exit 1
fi
echo "all GPU checks ran; tables and logs in $out/"
