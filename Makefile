# The few commands a contributor needs. `make up` and `make test` are the README's two commands.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
# torch 2.13.0 is the CPU build this project tests with (kept pinned so that pip does not
# pull a multi-GB CUDA build on machines without a GPU).
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: help install install-test up test test-all lint typecheck bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python  ## create .venv and install gpuvisor (with the Triton client for the examples)
	$(PIP) -e ".[client]"

install-test: $(BIN)/python  ## install gpuvisor with the test and torch extras
	$(PIP) "$(TORCH)"
	$(PIP) -e ".[test,torch]"

up: install  ## install, then start the demo node on 127.0.0.1:8700 (Ctrl-C stops it)
	$(BIN)/gpuvisor up

test: install-test  ## install the test dependencies and run the default test suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: install-test  ## also the suites marked slow (none today)
	$(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS)

lint:  ## ruff lint and format check
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

typecheck:  ## mypy --strict on the package
	$(BIN)/mypy

bench:  ## run the benchmarks (figures go to bench-results/)
	$(BIN)/gpuvisor bench overhead
	$(BIN)/gpuvisor bench isolation
	$(BIN)/gpuvisor bench fairness
	$(BIN)/gpuvisor bench batching
	$(BIN)/gpuvisor bench decisions

clean:  ## remove build and test leftovers (not .venv, not bench-results)
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
