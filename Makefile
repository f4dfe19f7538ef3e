# Two commands for a fresh machine with Python 3.11 and pip: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of this torch lies on disk on our machines; other versions download
# several GB. The package itself asks only for a range (pyproject.toml).
TORCH_PIN ?= torch==2.13.0
# 0: any free port, so the demo never collides with a server already running.
PORT ?= 0

.PHONY: setup demo test test-slow coverage lint typecheck protos check-protos contract publish-contract \
	bench gpu-wheels clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)" -c constraints.txt -e ".[server,test,dev,plot]"
	touch $@

# npm's packages for a folder of this project, from its package-lock.json, when npm is on the
# machine and its registry answers; else the tests that need them are skipped and say why,
# and the rest (the demo too) goes on.
define npm_ci
	@if ! command -v npm >/dev/null 2>&1; then \
		echo "npm not found: the tests that need $(1) will be skipped"; \
	elif npm ci --prefix $(1) --no-audit --no-fund --loglevel=error; then \
		touch $(1)/node_modules/.installed; \
	else \
		rm -rf $(1)/node_modules; \
		echo "npm ci failed (above): the tests that need $(1) will be skipped"; \
	fi
endef

# The Node.js client of examples/node, which tests/test_node_client.py runs to prove that the
# .proto alone is enough.
NODE_EXAMPLE := examples/node
$(NODE_EXAMPLE)/node_modules/.installed: $(NODE_EXAMPLE)/package-lock.json
	$(call npm_ci,$(NODE_EXAMPLE))

# buf, which tests/test_contract.py runs to keep proto/ compatible with what gradwire.v1 has
# published (proto/published.txtpb) and linted.
BUF_TOOLS := tools/buf
$(BUF_TOOLS)/node_modules/.installed: $(BUF_TOOLS)/package-lock.json
	$(call npm_ci,$(BUF_TOOLS))

setup: $(BIN)/.installed $(NODE_EXAMPLE)/node_modules/.installed \
	$(BUF_TOOLS)/node_modules/.installed

# Start a server, replay the tutorial over gRPC against it, stop the server.
demo: setup
	$(BIN)/python scripts/demo.py --port $(PORT)

test: setup
	$(BIN)/python -m pytest -q -m "not slow"

# The long campaigns: 10,000 fuzzed messages per RPC, 5,000 model-based call sequences
# (minutes each: an hour each before one is taken for a hang).
test-slow: setup
	GRADWIRE_FUZZ_EXAMPLES=10000 GRADWIRE_MODEL_SEQUENCES=5000 \
		$(BIN)/python -m pytest -q --timeout 3600 tests/test_fuzz.py tests/test_model_based.py

# Which lines `make test`'s tests run, file by file, least covered last (about 20 minutes on
# 2 vCPUs). A report, not a gate: a test is what proves a line right. Fails if a test does.
coverage: setup
	rm -f .coverage .coverage.*
	$(BIN)/python -m coverage run -m pytest -q -m "not slow" -p no:cacheprovider; status=$$?; \
		$(BIN)/python -m coverage combine -q && $(BIN)/python -m coverage report; \
		exit $$status

# Every performance target beside its floor, in one table (a benchmark, never a test).
bench: setup
	$(BIN)/python -m bench.bench $(BENCH_ARGS) --markdown docs/bench-latest.md

# For a GPU machine with PyTorch but no network: the gRPC and protobuf wheels this project
# needs, in the versions installed here, for that machine's Python; scripts/gpu_check.sh
# installs them from .whl/ and runs every GPU check.
GPU_PYTHON ?= 3.12
GPU_WHEELS := grpcio protobuf grpcio-health-checking grpcio-status grpcio-reflection \
	googleapis-common-protos pytest-timeout
gpu-wheels: setup
	rm -rf .whl
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: -d .whl \
		--python-version $(GPU_PYTHON) --implementation cp --platform manylinux_2_28_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		$$($(BIN)/python -c 'import sys, importlib.metadata as m; \
			print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' $(GPU_WHEELS))

lint: setup
	$(BIN)/ruff check client server tests scripts bench
	$(BIN)/ruff format --check client server tests scripts bench

typecheck: setup
	$(BIN)/mypy

protos: setup
	$(BIN)/python scripts/gen_protos.py

check-protos: setup
	$(BIN)/python -m pytest -q tests/test_proto_sync.py

# The contract's checks alone: buf's lint, and nothing gradwire.v1 published changed or gone.
contract: setup
	$(BIN)/python -m pytest -q tests/test_contract.py

# Record what proto/ adds to the contract in proto/published.txtpb, after checking that it
# breaks nothing published: from then on, taking an addition back fails `make test`.
publish-contract: setup
	$(BIN)/python scripts/publish_contract.py

clean:
	rm -rf $(VENV) $(NODE_EXAMPLE)/node_modules $(BUF_TOOLS)/node_modules .whl .pytest_cache .mypy_cache .ruff_cache build *.egg-info client/*.egg-info server/*.egg-info
