# samout-edge: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv on first use. torch is pinned to the CPU build for this
# machine; the package itself accepts torch>=2.11.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= out
STAMP  := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test device-test lint clean

# The workstation side and every test tool. tensorrt-stubs goes in without its
# dependencies: they are download stubs for a host this network cannot reach.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[export,tensorrt,plot,dev]'
	$(BIN)/pip install -q 'triton>=3.3' openvino
	$(BIN)/pip install -q --no-deps tensorrt-stubs==10.13.0.35.1
	touch $(STAMP)

install: $(STAMP)

# Export the seed-size model (hidden 512, 8 heads, 6 layers, vocab 10000) as
# SamOut and as the softmax baseline, verify both against PyTorch, summarise,
# then a short bench of the two exports.
demo: install
	$(BIN)/samout-edge doctor
	$(BIN)/samout-edge init --preset seed -o $(OUT)/seed-checkpoint --force
	$(BIN)/samout-edge export $(OUT)/seed-checkpoint -o $(OUT)/seed-cummax --arch cummax --max-seq 4096
	$(BIN)/samout-edge export $(OUT)/seed-checkpoint -o $(OUT)/seed-softmax --arch softmax --max-seq 4096
	$(BIN)/samout-edge verify $(OUT)/seed-cummax --lengths 1,1000,4096
	$(BIN)/samout-edge inspect $(OUT)/seed-cummax
	$(BIN)/samout-edge bench $(OUT)/seed-cummax $(OUT)/seed-softmax --seq 256,1024 --context 256,1024 \
		--budget 1 --json $(OUT)/bench.json --plot $(OUT)/bench.png

test: install
	$(BIN)/python -m pytest -q

# The device side: Python 3.10 (JetPack 6's), core install, no torch (.ci/device-side).
device-test: install
	.ci/device-side

lint: install
	$(BIN)/ruff check src tests

clean:
	rm -rf $(OUT) .pytest_cache .venv-device
