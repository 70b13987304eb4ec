# ClaudeFS make targets. `make run` and `make test` are the README quick start;
# both call `make setup` first, which is a no-op once everything is in place.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# docker-compose (1.29, Python): `docker-compose config` validates deploy/compose in the
# tests; without recommends it is 16 small Python packages, not a docker engine.
DEBIAN_PKGS := fuse3 libfuse3-dev pkg-config docker-compose nftables strace
PYTEST_ARGS ?=
TEST_WORKERS ?= 2

.PHONY: setup system-deps run test test-slow test-all lint fmt asyncapi bench dr-report chaos clean

setup: system-deps $(STAMP)

# pyfuse3 compiles against libfuse3; install the Debian packages when missing
# (never their recommends: docker-compose would bring a docker engine).
system-deps:
	@missing=""; for p in $(DEBIAN_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q --no-install-recommends $$missing >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $$missing >/dev/null; } \
	      || { echo "error: could not install$$missing with apt-get" >&2; exit 1; }; \
	  else \
	    echo "error: missing Debian packages:$$missing -- run: sudo apt-get install --no-install-recommends$$missing" >&2; exit 1; \
	  fi; \
	fi

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $(STAMP)

run: setup
	$(BIN)/cfs dev run

# Test files run on TEST_WORKERS pytest-xdist workers, each file whole on one worker
# (module fixtures are shared within a file); TEST_WORKERS=0 runs them in this process.
test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25 $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest -q -m '' $(PYTEST_ARGS)

# The guide's RTO/RPO tables against the scenarios' measurements (slow ones included):
# prints the table, writes it as Markdown and JSON; non-zero on any row not measured or
# not within the guide. DR_SCENARIOS narrows the run (rows of the others: not measured).
DR_DIR := build/dr-report
DR_SCENARIOS ?= tests/scenarios
dr-report: setup
	@rm -rf $(DR_DIR) && mkdir -p $(DR_DIR)/measured
	CFS_DR_RESULTS=$(abspath $(DR_DIR))/measured $(BIN)/python -m pytest -q -m '' -p no:cacheprovider $(DR_SCENARIOS) $(PYTEST_ARGS); \
	  rc=$$?; $(BIN)/python -m tests.scenarios.drreport $(DR_DIR)/measured --pytest-rc $$rc \
	    --markdown $(DR_DIR)/dr-report.md --json $(DR_DIR)/dr-report.json

# Seeded fault schedules under a mixed workload (tests/chaos): a table of every seed,
# non-zero on anything acknowledged lost. CHAOS_SEEDS / CHAOS_SCHEDULES / CHAOS_NODES
# choose (a failing seed prints the line that replays it).
CHAOS_DIR := build/chaos
chaos: setup
	@rm -rf $(CHAOS_DIR) && mkdir -p $(CHAOS_DIR)
	CFS_CHAOS_RESULTS=$(abspath $(CHAOS_DIR)) CHAOS_SEEDS="$(CHAOS_SEEDS)" CHAOS_SCHEDULES="$(CHAOS_SCHEDULES)" \
	  CHAOS_NODES="$(CHAOS_NODES)" $(BIN)/python -m pytest -q -m '' -p no:cacheprovider tests/chaos/test_chaos.py $(PYTEST_ARGS); \
	  rc=$$?; $(BIN)/python -m tests.chaos.summary $(CHAOS_DIR) && exit $$rc

lint: setup
	$(BIN)/ruff check contracts libs services tests bench
	$(BIN)/ruff format --check contracts libs services tests bench
	$(BIN)/mypy contracts/cfs_contracts libs/cfs services

fmt: setup
	$(BIN)/ruff format contracts libs services tests bench
	$(BIN)/ruff check --fix contracts libs services tests bench

# AsyncAPI document generated from the contracts (faststream).
asyncapi: setup
	$(BIN)/python -m cfs_contracts.asyncapi --output contracts/cfs_contracts/asyncapi.json

bench: setup
	$(BIN)/python bench/bus.py --json bench/results/bus.json
	$(BIN)/python bench/consumer.py --json bench/results/consumer.json
	$(BIN)/python bench/metadata.py --json bench/results/metadata.json
	$(BIN)/python bench/fragment_store.py --json bench/results/fragment_store.json
	$(BIN)/python bench/datapath.py --json bench/results/datapath.json
	$(BIN)/python bench/backup.py --json bench/results/backup.json
	$(BIN)/python bench/tier.py --json bench/results/tier.json
	$(BIN)/python bench/geo.py --json bench/results/geo.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
