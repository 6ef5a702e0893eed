# Two entry points: `make repro` (set up, run the whole pipeline on the built-in corpus,
# push its outputs to the default DVC remote) and `make test` (set up, then run the tests).
# `make pull` fetches the outputs a clone pushed. Each creates .venv from
# requirements.lock on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TEST_WORKERS ?= 2  # `make test TEST_WORKERS=0`: one process
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup repro pull test lint docs bench clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet pip==26.3
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

repro: setup
	$(BIN)/python -m stages.common.harness.specials  # a FIFO or device among the dependencies: refused before DVC hashes it
	$(BIN)/dvc repro
	$(BIN)/dvc push  # to the default remote (.dvc/config: a folder beside this clone)

pull: setup
	$(BIN)/dvc pull

test: setup  # two workers (pytest-xdist), a module's tests in one of them: 1.35 x faster here (docs/BENCHMARKS.md)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

lint: setup  # pyproject.toml's [tool.ruff] rules: CI runs it beside the tests
	$(BIN)/ruff check .

docs: setup  # the documentation site into site/: its generated pages current, every page in the navigation, no broken link
	$(BIN)/python docs/generate.py --check
	mkdir -p -m 700 .cache/tmp  # jieba (the site search's Chinese words) caches under TMPDIR: a private one
	TMPDIR=$(abspath .cache/tmp) NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: setup
	$(BIN)/python -m bench.streaming
	$(BIN)/python -m bench.tokenize_parallel
	$(BIN)/python -m bench.train_grid
	$(BIN)/python -m bench.train_loop
	$(BIN)/python -m bench.quant_kernels
	$(BIN)/python -m bench.compression
	$(BIN)/python -m bench.flow_overhead
	$(BIN)/python -m bench.distributed
	$(BIN)/python -m bench.remote

clean-venv:
	rm -rf $(VENV)
