# Two entry points, both from a fresh clone: `make demo` and `make test`.
# The environment lives in .venv and is rebuilt when pyproject.toml or constraints.txt change.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pip's index configuration on some machines names folders that do not exist; its warnings are noise.
PIP := $(BIN)/pip install -q --disable-pip-version-check -c constraints.txt

.PHONY: demo test test-dgl test-pyg lint venv venv-nequip clean-venv

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

# The legacy DGL environment (.venv-dgl): DGL 2.1.0 imports only with torch <= 2.2.1, so the
# DGL tests run there (recipe: shared REFERENCE.md section 1). --no-deps keeps pip from adding
# triton and from swapping torch; .ci/constraints-dgl.txt pins torch 2.2.1 and numpy<2 on every step.
VENV_DGL ?= .venv-dgl
BIN_DGL := $(VENV_DGL)/bin
STAMP_DGL := $(VENV_DGL)/.installed
PIP_DGL := $(BIN_DGL)/pip install -q --disable-pip-version-check -c .ci/constraints-dgl.txt
NOISE := 2> >(grep -v 'is ignored' >&2)

$(STAMP_DGL): pyproject.toml .ci/constraints-dgl.txt
	rm -rf $(VENV_DGL)
	$(PYTHON) -m venv $(VENV_DGL)
	$(PIP_DGL) --no-deps torch==2.2.1 nvidia-cuda-nvrtc-cu12==12.1.105 nvidia-cuda-runtime-cu12==12.1.105 \
	  nvidia-cuda-cupti-cu12==12.1.105 nvidia-cudnn-cu12==8.9.2.26 nvidia-cublas-cu12==12.1.3.1 \
	  nvidia-cufft-cu12==11.0.2.54 nvidia-curand-cu12==10.3.2.106 nvidia-cusolver-cu12==11.4.5.107 \
	  nvidia-cusparse-cu12==12.1.0.106 nvidia-nccl-cu12==2.19.3 nvidia-nvtx-cu12==12.1.105 \
	  nvidia-nvjitlink-cu12 $(NOISE)
	$(PIP_DGL) --no-deps dgl==2.1.0 torchdata==0.7.1 pytorch-lightning torchmetrics lightning-utilities \
	  lightning geometric-algebra-attention e3nn==0.6.0 opt-einsum-fx opt-einsum $(NOISE)
	$(PIP_DGL) 'numpy<2' scipy 'networkx>=2.1' requests tqdm psutil pandas pydantic packaging pyyaml \
	  'fsspec[http]' filelock 'typing-extensions>=4.8' sympy jinja2 $(NOISE)
	$(PIP_DGL) vesin==0.4.2 'jsonargparse[signatures]' lmdb ase pymatgen rich pytest pytest-xdist $(NOISE)
	$(PIP_DGL) --no-deps -e . $(NOISE)
	$(BIN_DGL)/python -c "import torch, dgl, numpy; assert torch.__version__.startswith('2.2.1'), torch.__version__"
	$(BIN_DGL)/python -m compileall -q -j 0 $(VENV_DGL)/lib > /dev/null || true
	touch $(STAMP_DGL)

test-dgl: $(STAMP_DGL)
	$(BIN_DGL)/python -m pytest -n 2 -p no:cacheprovider -m requires_dgl tests

# PyG batches (graph_backend="pyg") are tested in their own environment (.venv-pyg): the main one
# must not have torch_geometric, so that reading OC20 files without it stays tested there.
VENV_PYG ?= .venv-pyg
BIN_PYG := $(VENV_PYG)/bin
STAMP_PYG := $(VENV_PYG)/.installed
PIP_PYG := $(BIN_PYG)/pip install -q --disable-pip-version-check -c constraints.txt

$(STAMP_PYG): pyproject.toml constraints.txt
	rm -rf $(VENV_PYG)
	$(PYTHON) -m venv $(VENV_PYG)
	$(PIP_PYG) torch==2.13.0 $(NOISE)
	$(PIP_PYG) -e '.[test,pyg]' $(NOISE)
	$(BIN_PYG)/python -m compileall -q -j 0 $(VENV_PYG)/lib > /dev/null || true
	touch $(STAMP_PYG)

test-pyg: $(STAMP_PYG)
	$(BIN_PYG)/python -m pytest -n 2 -p no:cacheprovider -m requires_pyg tests

# nequip 0.19.1 for experiments/bench_accuracy.py, in its own environment (.venv-nequip): it is a
# peer we measure against, not a dependency, so its packages (hydra, matscipy, ...) stay out of .venv.
VENV_NEQUIP ?= .venv-nequip
BIN_NEQUIP := $(VENV_NEQUIP)/bin
STAMP_NEQUIP := $(VENV_NEQUIP)/.installed

venv-nequip: $(STAMP_NEQUIP)

$(STAMP_NEQUIP): constraints.txt
	rm -rf $(VENV_NEQUIP)
	$(PYTHON) -m venv $(VENV_NEQUIP)
	$(BIN_NEQUIP)/pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0 nequip==0.19.1 $(NOISE)
	$(BIN_NEQUIP)/python -c "import nequip, torch; print(nequip.__version__, torch.__version__)"
	$(BIN_NEQUIP)/python -m compileall -q -j 0 $(VENV_NEQUIP)/lib > /dev/null || true
	touch $(STAMP_NEQUIP)

lint: $(STAMP)
	$(BIN)/pip install -q ruff
	$(BIN)/ruff check matsciml tests experiments
	$(BIN)/ruff format --check matsciml tests experiments

clean-venv:
	rm -rf $(VENV)
