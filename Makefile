# flashlib: `make figures` regenerates every figure and table; `make test` runs the test suite.
# Both create the virtual environment (.venv, Python 3.11) on first use.

PYTHON_BASE ?= python3.11
VENV        := .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
NOTEBOOKS   := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
EXECUTED    := $(patsubst notebooks/%.ipynb,build/notebooks/%.ipynb,$(NOTEBOOKS))
SOURCES     := $(wildcard flashlib/*.py)

.DEFAULT_GOAL := help
.PHONY: help venv test figures bench gpu-bench lab clean clean-flash clean-data

help:  ## show this help
	@echo "flashlib - a reproduction of 'LLM in a flash'"
	@echo
	@echo "  make figures      regenerate every figure and table into figures/ (runs notebooks fully, ~1-1.5 h)"
	@echo "  make test         run the test suite (executes every notebook in smoke mode)"
	@echo "  make bench        the side-by-side benchmarks only (latency breakdown; page cache, accelerate)"
	@echo "  make gpu-bench    the GPU row of Table 3 into build/gpu (skips without CUDA; see flashlib/gpubench.py)"
	@echo "  make lab          open the notebooks in JupyterLab"
	@echo "  make venv         create .venv (done automatically by the targets above)"
	@echo "  make clean        remove build/ (executed notebooks); never figures/ or data/"
	@echo "  make clean-flash  remove the large flash files under data/flash (paper-scale file)"
	@echo "  make clean-data   remove every generated cache under data/ (models are retrained)"

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON_BASE) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

venv: $(STAMP)

test: $(STAMP)  ## the README's test command
	$(PY) -m pytest -q

figures: $(STAMP) $(EXECUTED)  ## the README's figures command
	@echo "figures and tables are in figures/ (executed notebooks in build/notebooks/)"

build/notebooks/%.ipynb: notebooks/%.ipynb $(SOURCES) | $(STAMP)
	$(PY) -m flashlib.nbrun $<

bench: $(STAMP)
	$(PY) -m flashlib bench --baselines

gpu-bench: $(STAMP)
	$(PY) -m flashlib.gpubench --out build/gpu

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf build/ .pytest_cache

clean-flash:
	rm -rf data/flash

clean-data:
	rm -rf data/models data/corpus data/flash data/predictors data/traces
