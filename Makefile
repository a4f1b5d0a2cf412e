# `make demo` and `make test` set up everything they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint bench stages-doc clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build; an unpinned torch pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,models]'
	touch $(STAMP)

# Randomly initialised stand-ins for CLIP and the aesthetic head (no real weights can be
# downloaded offline); configs/demo.yaml labels them, and runs print the label.
MODELS := examples/models/.built
$(MODELS): $(STAMP) curate/models/tiny.py
	$(PY) -m curate.models.tiny examples/models
	touch $(MODELS)

demo: $(STAMP) $(MODELS)
	$(VENV)/bin/curate run configs/demo.yaml

test: $(STAMP) $(MODELS)
	$(PY) -m pytest -q

test-all: $(STAMP) $(MODELS)
	$(PY) -m pytest -q -m 'not gpu'

lint: $(STAMP)
	$(VENV)/bin/ruff check curate tests benchmarks pipelines examples

bench: $(STAMP)
	$(PY) benchmarks/ingest_filter_dedup.py --images 5000

stages-doc: $(STAMP)
	$(PY) -m curate.docs README.md

clean:
	rm -rf curate_data .pytest_cache
