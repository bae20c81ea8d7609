# Every tool runs through here. `make demo` and `make test` install what they need first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch: the CPU build (on this kind of machine it lies on disk); a range that it satisfies
# installs nothing more. On a GPU machine install the CUDA build of torch first.
TORCH ?= torch==2.13.0
# pytest-xdist workers for `make test`: the suite is mostly single-threaded torch and waiting on
# servers it starts, so two workers on two cores take ~0.55x the serial time (591 s against
# 1056 s measured on 2026-12-04). Each test file stays on one worker (--dist loadfile): the
# end-to-end files start servers and workers of their own, and those on one worker share a Redis
# database number. Files are handed out as collected, the long end-to-end ones first
# (tests/conftest.py), so no long file is left to run alone at the end.
TEST_WORKERS ?= 2
# The slowest tests are listed at the end of every run (CI's log included): the suite's goal is
# well under 15 minutes on 2 cores, and this list is where time to win back is found.
TEST_DURATIONS ?= --durations=40 --durations-min=8
# The project's own modules compiled once before the suite: where PYTHONDONTWRITEBYTECODE is set
# (this machine's environment sets it) every process the suite starts (servers, workers, each CLI
# command; hundreds a run) compiled every module it imports again, ~0.1 s of CPU for `users
# create`, more for a server (measured 2026-12-07: 1.05-1.08 s user CPU with the .pyc files
# against 1.18-1.20 s without). Python still reads .pyc files with that variable set.
# The tests' files (every tmp_path: SQLite databases, blobs, the HOMEs of the servers they start)
# on tmpfs where the machine has one: the service fsyncs every commit and blob as it must, ~66
# times a test (4921 in test_api.py and test_generation_gallery.py's 74 tests), and an fsync
# waited 2.8 ms for this machine's disk under the suite's load against 0.005 ms on /dev/shm.
# Only the failed tests' folders are kept (pyproject's tmp_path_retention_policy), so a run holds
# little of it in memory. `make test TEST_TMPDIR=` keeps them on the disk. Only a /dev/shm with
# 2 GiB free or more: a container's is often 64 MiB, where tests would meet a full disk.
TEST_TMPDIR ?= $(shell test -d /dev/shm -a -w /dev/shm && \
	test "$$(df -Pk /dev/shm | awk 'NR==2 {print $$4}')" -ge 2097152 2>/dev/null && echo /dev/shm)

.PHONY: install demo test test-fast lint typecheck fmt clean screenshots vendor-web

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
	$(BIN)/lint-imports
	$(BIN)/python -m compileall -q src tests >/dev/null || echo "compileall failed (a read-only tree?): the suite runs, compiling as it goes"
	$(if $(TEST_TMPDIR),TMPDIR=$(TEST_TMPDIR) )OMP_NUM_THREADS=1 $(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile $(TEST_DURATIONS)

# The edit-test loop: no torch or server tests, fewer Hypothesis examples, both cores.
test-fast: $(STAMP)
	HYPOTHESIS_PROFILE=fast OMP_NUM_THREADS=1 $(BIN)/pytest -q -m "not slow" -n 2

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff check --fix src tests

clean:
	rm -rf $(VENV) .selfie-lora demo-output .pytest_cache .mypy_cache .ruff_cache
	find src tests bench -name __pycache__ -type d -prune -exec rm -rf {} +

# The README's screenshots, taken by the browser test (needs Chromium: apt-get install chromium).
screenshots: $(STAMP)
	SELFIE_LORA_SCREENSHOTS=docs/screenshots OMP_NUM_THREADS=1 $(BIN)/pytest -q tests/browser -k whole

# The front-end files the web app serves, from the npm registry (pinned; licence beside them).
HTMX_VERSION := 2.0.11
vendor-web:
	rm -rf .vendor-web && mkdir -p .vendor-web
	cd .vendor-web && npm pack --silent htmx.org@$(HTMX_VERSION) && tar xzf htmx.org-$(HTMX_VERSION).tgz
	mkdir -p src/selfie_lora/web/static/vendor/htmx-$(HTMX_VERSION)
	cp .vendor-web/package/dist/htmx.min.js .vendor-web/package/LICENSE src/selfie_lora/web/static/vendor/htmx-$(HTMX_VERSION)/
	rm -rf .vendor-web
