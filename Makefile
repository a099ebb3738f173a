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

LMMS_VENV ?= .venv-lmms

.PHONY: install quickstart lint test test-fast test-ray test-lmms bench clean

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

# lmms-eval (the `lmms` extra) pulls a torchvision that replaces the CPU torch build, so its tests run in an
# overlay venv: it sees .venv's packages (torch, transformers, ray pinned to theirs) and adds lmms-eval's own.
$(LMMS_VENV)/.installed: $(VENV)/.installed
	test -x $(LMMS_VENV)/bin/python || python3 -m venv $(LMMS_VENV)
	echo "import site; site.addsitedir('$(abspath $(VENV))/lib/python3.11/site-packages')" \
		> $(LMMS_VENV)/lib/python3.11/site-packages/zz_l2t_venv.pth
	$(PY) -m pip freeze | grep -iE '^(torch|transformers|ray|numpy|pyarrow)==' > $(LMMS_VENV)/constraints.txt
	$(LMMS_VENV)/bin/python -m pip install --quiet -c $(LMMS_VENV)/constraints.txt "lmms-eval>=0.7.3"
	$(LMMS_VENV)/bin/python -m pip uninstall --quiet -y torchvision
	touch $@

test-lmms: $(LMMS_VENV)/.installed
	$(LMMS_VENV)/bin/python -m pytest tests/test_lmms_eval.py $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(PY) benchmarks/masking.py

clean:
	rm -rf $(VENV) $(LMMS_VENV) l2t_quickstart .pytest_cache
