# Every tool runs through here. `make demo` and `make test` install what they need first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch: the CPU build (on this kind of machine it lies on disk); a range that it satisfies
# installs nothing more. On a GPU machine install the CUDA build of torch first.
TORCH ?= torch==2.13.0

.PHONY: install demo test test-fast lint typecheck fmt clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e '.[all,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/selfie-lora demo

test: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/mypy
	OMP_NUM_THREADS=1 $(BIN)/pytest -q

test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests

typecheck: $(STAMP)
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff check --fix src tests

clean:
	rm -rf $(VENV) .selfie-lora demo-output .pytest_cache .mypy_cache .ruff_cache
