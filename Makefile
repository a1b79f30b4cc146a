# Two commands set everything up on a fresh machine:
#   make run    the gateway in front of its default CPU engine (a tiny local model, no GPU, no network)
#   make test   ruff, ruff format --check, mypy --strict, the test suite, real vLLM (what CI runs: scripts/test.sh)
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
DEMO_MODEL := .cache/models/tiny-chat
DEMO_VL_MODEL := .cache/models/tiny-vl

.PHONY: run test lint bench bench-vllm clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[cpu,dev]'
	touch $@

$(DEMO_MODEL)/config.json $(DEMO_VL_MODEL)/config.json: $(BIN)/.installed
	$(BIN)/gateway demo-model --path $(DEMO_MODEL) --vl-path $(DEMO_VL_MODEL)

run: $(BIN)/.installed $(DEMO_MODEL)/config.json
	$(BIN)/gateway serve --config deploy/examples/cpu.yaml

test: $(BIN)/.installed
	BIN=$(BIN) scripts/test.sh

bench: $(BIN)/.installed
	$(BIN)/python tests/bench/run.py

bench-vllm: $(BIN)/.installed  # vllm bench serve against real vLLM, direct and through the gateway (~5 min)
	$(BIN)/python tests/bench/vllm_serve.py

.PHONY: bench-swap
bench-swap: $(BIN)/.installed  # two recorded-style traces replayed per swap policy, stand-in engines (~9 min)
	$(BIN)/python tests/bench/swap_trace.py

.PHONY: bench-affinity
bench-affinity: $(BIN)/.installed  # conversation affinity across 2 real vLLM replicas, prefix-cache hit rates (~3 min)
	$(BIN)/python tests/bench/affinity_vllm.py

clean:
	rm -rf $(VENV) .cache
