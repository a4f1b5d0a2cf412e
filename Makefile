# `make demo` and `make test` set up everything they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint bench stages-doc clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/curate run configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m 'not gpu'

lint: $(STAMP)
	$(VENV)/bin/ruff check curate tests benchmarks pipelines examples

bench: $(STAMP)
	$(PY) benchmarks/ingest_filter_dedup.py --images 5000

stages-doc: $(STAMP)
	$(PY) -m curate.docs README.md

clean:
	rm -rf curate_data .pytest_cache
