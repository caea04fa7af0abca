# `make demo` and `make test` work on a fresh machine: both set up .venv first.
VENV := .venv
READY := $(VENV)/.tiermem-ready

.PHONY: setup demo test lint bench

$(READY): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

setup: $(READY)

demo: $(READY)
	$(VENV)/bin/tiermem demo

test: $(READY)
	$(VENV)/bin/python -m pytest

lint: $(READY)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples
	$(VENV)/bin/mypy

bench: $(READY)
	$(VENV)/bin/python benchmarks/suite.py
