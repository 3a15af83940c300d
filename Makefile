# vdu — `make setup` once (idempotent), then `make test` / `make run-all` / `make bench`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PAPERMILL := $(PY) -m papermill --cwd notebooks --progress-bar

# notebooks run per dataset by `make run-all` (each with notebooks/params/<notebook>-full.yaml); the executed
# notebooks land in docs/executed/ (what the site shows; the paired notebooks/*.ipynb keep smoke outputs)
DATASETS ?= mnist gmm
NB_mnist        := pretrain vdu_unlearning benchmark constrained_unlearning data_unlearning evaluation
NB_cifar10      := pretrain
NB_tinyimagenet := pretrain
NB_gmm          := duality

.PHONY: setup test unit nbval run-all bench sync lab clean docs docs-check
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
	@mkdir -p docs/executed
	$(foreach ds,$(DATASETS),$(if $(NB_$(ds)),,$(error unknown dataset '$(ds)'; known: mnist cifar10 tinyimagenet gmm)))
	$(foreach ds,$(DATASETS),$(foreach nb,$(NB_$(ds)),$(PAPERMILL) notebooks/$(nb).ipynb docs/executed/$(nb)-$(ds).ipynb -f notebooks/params/$(nb)-full.yaml -p dataset $(ds) && )) true

bench: setup
	$(PY) -m vdu.bench

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
