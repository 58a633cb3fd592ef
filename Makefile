# Two entry points, both from a fresh clone: `make demo` and `make test`.
# The environment lives in .venv and is rebuilt when pyproject.toml or constraints.txt change.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pip's index configuration on some machines names folders that do not exist; its warnings are noise.
PIP := $(BIN)/pip install -q --disable-pip-version-check -c constraints.txt

.PHONY: demo test lint venv clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0 2> >(grep -v 'is ignored' >&2)
	$(PIP) -e '.[test]' 2> >(grep -v 'is ignored' >&2)
	@# PYTHONDONTWRITEBYTECODE may be set: precompile so `import lightning` takes seconds, not 15 s.
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/matsciml fit --config configs/devset/s2ef-egnn.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --durations=15

lint: $(STAMP)
	$(BIN)/pip install -q ruff
	$(BIN)/ruff check matsciml tests experiments

clean-venv:
	rm -rf $(VENV)
