# vmbuild: `make image` builds the example image, `make test` runs every test.
# Both install what is missing first (Debian packages, a venv).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RECIPE ?= examples/nginx/recipe.yaml

.PHONY: setup host-deps venv image test test-arm64 unit vm lint format bench clean

setup: host-deps venv

host-deps:
	@./scripts/install-host-deps

venv: $(BIN)/.installed
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

image: setup
	$(BIN)/vmbuild build $(RECIPE)

# Parallel test workers. A test VM under TCG keeps about one core busy (the
# checkpoints test alone: 115 % CPU of 2 cores), so one worker per core, at
# most 4: each worker's VMs take ~3 GiB, and the tests that share one guest run
# in one worker, in order (~25 min under TCG on 2 cores), which bounds the run.
TEST_WORKERS ?= $(shell n=$$(nproc); [ $$n -gt 4 ] && n=4; echo $$n)

# The whole suite: lint, then every test, unit and real VM/AWS ones (TCG when
# KVM is unusable; they never skip), spread over $(TEST_WORKERS) workers. Tests
# that change a shared guest or libvirtd run in one worker (tests/conftest.py).
test: setup lint
	$(BIN)/pytest tests -v --durations=40 -m "not arm64_base" -n $(TEST_WORKERS) --dist loadgroup

# The arm64 image end to end: its base takes ~22 min to build under qemu-user here.
test-arm64: setup
	$(BIN)/pytest tests -v -m arm64_base -o timeout=3600

unit: setup
	$(BIN)/pytest tests/unit -q

lint: venv
	$(BIN)/ruff check vmbuild tests bench
	$(BIN)/ruff format --check vmbuild tests bench
	$(BIN)/mypy

format: venv
	$(BIN)/ruff format vmbuild tests bench
	$(BIN)/ruff check --fix vmbuild tests bench

bench: setup
	$(BIN)/python bench/bench_build.py --rounds 2
	$(BIN)/python bench/bench_rebuild.py
	@if [ -f bench/bench_publish.py ]; then $(BIN)/python bench/bench_publish.py; fi
	$(BIN)/python bench/bench_scaleout.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
