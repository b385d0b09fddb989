# Two commands bring a fresh machine from nothing to done: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?= --durations=10

.PHONY: install demo test lint bench clean

# (Re)install when pyproject.toml changes; the CPU TensorFlow build and the dev tools.
$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "dermray needs Python >= 3.11"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[cpu,dev]'
	touch $(STAMP)

install: $(STAMP)

# The whole pipeline on synthetic data, on a local Ray, offline.
demo: $(STAMP)
	$(BIN)/dermray run --config ray_jobs/configs/demo.yaml --out out/demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check dermray ray_jobs tests benchmarks

clean:
	rm -rf out .pytest_cache
