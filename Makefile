# samout-edge: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv on first use. torch is pinned to the CPU build for this
# machine; the package itself accepts torch>=2.11.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= out
STAMP  := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test device-test device-test-arm lint clean

# The workstation side and every test tool. tensorrt-stubs goes in without its
# dependencies: they are download stubs for a host this network cannot reach.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[export,tensorrt,plot,serve,dev]'
	$(BIN)/pip install -q 'triton>=3.3' openvino
	$(BIN)/pip install -q --no-deps tensorrt-stubs==10.13.0.35.1
	touch $(STAMP)

install: $(STAMP)

TRAINED := benchmarks/trained
PAIR_MAX_SEQ := 1024

# 1. The trained set (benchmarks/trained: cummax, softmax, hybrid, hybrid-w64,
#    softmax-w64 and linear of one size, byte-level, trained alike on the standard library):
#    SamOut and softmax exported at fp32, fp16, INT8 and INT4 (the fp16 islands and
#    the GPTQ rounding calibrated on training text), each verified, one
#    table of quality (held-out bits per byte, its cost and KL against PyTorch fp32,
#    agreement), kept in each export (eval --record); then the six archs side by
#    side (benchmarks/arch_table.py: quality by position, decode and prefill time,
#    state, weights, the hybrids' learned alpha); readable text from the INT4
#    windowed hybrid; a served session that survives a kill -9 of the server.
# 2. The seed-size model (hidden 512, 8 heads, 6 layers, vocab 10000) as SamOut and as
#    the softmax baseline, verified against PyTorch, summarised, then a short bench.
demo: install
	$(BIN)/samout-edge doctor
	$(BIN)/python benchmarks/train_set.py --write-heldout $(OUT)/heldout.txt --max-bytes 65536
	$(BIN)/python benchmarks/train_set.py --write-training-sample $(OUT)/calibration.txt --max-bytes 32768
	for arch in cummax softmax; do \
	  for w in fp32:--weights=fp fp16:--dtype=fp16,--calibration-text=$(OUT)/calibration.txt \
	           int8:--weights=int8,--calibration-text=$(OUT)/calibration.txt \
	           int4:--weights=int4,--calibration-text=$(OUT)/calibration.txt; do \
	    $(BIN)/samout-edge export $(TRAINED)/$$arch --arch $$arch --logits all --max-seq $(PAIR_MAX_SEQ) \
	      --vocab bytes $$(echo $${w#*:} | tr , ' ') -o $(OUT)/pair-$$arch-$${w%%:*} > /dev/null || exit 1; \
	  done; \
	done
	$(BIN)/samout-edge inspect $(OUT)/pair-cummax-fp16 | grep -E "^fp16|^needs|^check with" || true
	$(BIN)/samout-edge eval $(OUT)/pair-cummax-fp32 $(OUT)/pair-softmax-fp32 $(OUT)/pair-cummax-fp16 \
	  $(OUT)/pair-softmax-fp16 $(OUT)/pair-cummax-int8 $(OUT)/pair-softmax-int8 $(OUT)/pair-cummax-int4 \
	  $(OUT)/pair-softmax-int4 --text $(OUT)/heldout.txt --window 256 --record
	$(BIN)/python benchmarks/arch_table.py --text $(OUT)/heldout.txt --work $(OUT)/archs --contexts 1024,8192 \
	  --prefill 4096 --archs cummax,softmax,hybrid,hybrid-w64,softmax-w64,linear \
	  --markdown $(OUT)/archs.md --json $(OUT)/archs.json
	$(BIN)/samout-edge generate $(OUT)/archs/hybrid-w64-int4 --prompt 'class Foo:\n    def __init__(self' \
	  --max-new-tokens 160 --temperature 0.7 --top-k 20
	$(BIN)/python benchmarks/serve_session.py $(OUT)/pair-cummax-int4
	$(BIN)/samout-edge init --preset seed -o $(OUT)/seed-checkpoint --force
	$(BIN)/samout-edge export $(OUT)/seed-checkpoint -o $(OUT)/seed-cummax --arch cummax --max-seq 4096
	$(BIN)/samout-edge export $(OUT)/seed-checkpoint -o $(OUT)/seed-softmax --arch softmax --max-seq 4096
	$(BIN)/samout-edge verify $(OUT)/seed-cummax --lengths 1,1000,4096
	$(BIN)/samout-edge inspect $(OUT)/seed-cummax
	$(BIN)/samout-edge bench $(OUT)/seed-cummax $(OUT)/seed-softmax --seq 256,1024 --context 256,1024 \
		--budget 1 --json $(OUT)/bench.json --plot $(OUT)/bench.png

# Two workers (pytest-xdist), a test file each at a time: the module-scoped exports stay in one
# process, and a 2-core machine is busy while one worker waits on ONNX Runtime or torch.export.
test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# The device side: Python 3.10 (JetPack 6's), core install, no torch (.ci/device-side).
device-test: install
	.ci/device-side

# The device side on aarch64 under qemu-user: a Jetson's CPU (cortex-a76 as Orin's,
# then ARMv8.0 cortex-a57), Debian's Python 3.11, PyPI's aarch64 wheels, no torch
# (.ci/device-side-arm; needs root: apt-get, debootstrap).
device-test-arm: install
	.ci/device-side-arm

lint: install
	$(BIN)/ruff check src tests

clean:
	rm -rf $(OUT) .pytest_cache .venv-device .arm
