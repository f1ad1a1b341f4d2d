# Two entry points (README): `make demo` and `make test`. Both create or reuse .venv and install what they need:
# `make demo` the package with its demo extra (plots, digits data), `make test` with the test extra (which has it).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
BASE := $(VENV)/.base

.PHONY: demo test bench clean

$(BASE):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU build first: an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	touch $(BASE)

$(VENV)/.installed-%: pyproject.toml setup.py $(BASE)
	$(BIN)/python -m pip install -q -e '.[$*]'
	touch $@

demo: $(VENV)/.installed-demo
	$(BIN)/structfx demo

# two pytest workers (pytest-xdist): most of the suite is single-threaded TVM builds, so CI's 2 cores both work
test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist worksteal

bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/bench_layers.py

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
