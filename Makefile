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

.PHONY: setup test unit nbval run-all bench bench-gpu bases-gpu sync lab clean docs docs-check
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

# the CIFAR-10 and Tiny ImageNet base models on a GPU, from scratch: the committed bases' UNet (2.7 M parameters,
# so the weights stay small enough for the repository) at batch 256 under bfloat16 autocast, exported with a
# K=4 posterior; then `python -m vdu card` on each (README, "Base models"). BASE_ARGS adds pretrain options.
BASES ?= cifar10 tinyimagenet
BASE_STEPS ?= 4000
BASE_OUT ?= runs/gpu
SMALL_UNET := {"block_out_channels": [32, 64, 128], "layers_per_block": 1, "norm_num_groups": 8, \
  "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]}
bases-gpu: setup
	set -e; for d in $(BASES); do \
	  $(PY) -m vdu pretrain --dataset $$d --steps $(BASE_STEPS) --batch-size 256 --lr 0.0006 --warmup $$(( $(BASE_STEPS) / 20 )) \
	    --lr-final-frac 0.05 --mixed-precision bf16 --checkpoint-every 500 --k-snapshots 4 \
	    --snapshot-every $$(( $(BASE_STEPS) / 16 )) --model-overrides '$(SMALL_UNET)' $(BASE_ARGS) \
	    --out $(BASE_OUT)/$$d --export $(BASE_OUT)/$$d/model; \
	  $(PY) -m vdu posterior $(BASE_OUT)/$$d/model --run-dir $(BASE_OUT)/$$d --k 4 --codec int4-var; \
	done

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
