# vdu — `make setup` once (idempotent), then `make test` / `make run-all` / `make bench`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PAPERMILL := $(PY) -m papermill --cwd notebooks --progress-bar

# `make run-all` runs the full profile of each notebook of each dataset (the matrix is vdu.notebook.MATRIX;
# NOTEBOOKS="a b" selects, FORCE=1 redoes finished ones, GPU=1 applies the GPU profiles params/<nb>-gpu.yaml);
# the executed notebooks land in docs/executed/ (what the site shows; the paired notebooks/*.ipynb keep smoke
# outputs). An interrupted run-all resumes.
DATASETS ?= mnist gmm
NOTEBOOKS ?=
FORCE ?=
GPU ?=

.PHONY: setup test unit nbval run-all bench bench-gpu sync lab clean docs docs-check
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@# KaTeX (npm registry) for the test that renders every notebook formula; skipped where npm is absent
	if command -v npm >/dev/null; then npm install --no-save --silent --no-audit --no-fund --prefix $(VENV)/node katex@0.16; \
	else echo "npm not found: tests/test_notebook_math.py will be skipped"; fi
	touch $@

test: unit nbval

unit: setup
	$(PY) -m pytest tests

nbval: setup
	cd notebooks && ../$(PY) -m pytest --nbval-lax -p no:cacheprovider *.ipynb

run-all: setup
	$(PY) -m vdu run-all --datasets $(DATASETS) $(if $(NOTEBOOKS),--notebooks $(NOTEBOOKS)) $(if $(filter 1 yes true,$(FORCE)),--force) $(if $(filter 1 yes true,$(GPU)),--gpu)

bench: setup
	$(PY) -m vdu.bench

# the accelerator run: fp32 and bf16 at batches 64 and 512, samplers, ratios to this CPU's bench.json
bench-gpu: setup
	$(PY) -m vdu.bench --device cuda --quality-samples 1000

# the static site of the notebooks (executed full-profile runs of docs/executed/ where committed), offline
docs: setup
	$(PY) docs/site/assemble.py
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --quiet
	@echo "site: build/site/index.html"

# load every page in headless Chromium and check that it renders and its mathematics typesets
docs-check: docs
	$(PY) docs/site/check.py

sync: setup
	$(VENV)/bin/jupytext --sync notebooks/*.py

lab: setup
	$(VENV)/bin/jupyter lab notebooks

clean:
	rm -rf runs results/*/smoke
