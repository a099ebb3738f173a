# Two commands on a fresh machine: `make quickstart` and `make test`.
# Each creates .venv if needed and installs torch first (so no other
# requirement pulls a multi-GB CUDA build), then the project.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# Extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url <PyTorch CPU wheel index>".
TORCH_PIP_ARGS ?=
OUTPUT ?= l2t_quickstart
PYTEST_ARGS ?=

.PHONY: install quickstart lint test test-fast test-ray bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS)
	$(PIP) install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

quickstart: $(VENV)/.installed
	$(VENV)/bin/l2t quickstart --output $(OUTPUT)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not ray" $(PYTEST_ARGS)

test-ray: $(VENV)/.installed
	$(PY) -m pytest -m ray $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(PY) benchmarks/masking.py

clean:
	rm -rf $(VENV) l2t_quickstart .pytest_cache
