# semwatch — the two commands a user needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.*
STAMP  := $(VENV)/.installed

.PHONY: install test lint imports typecheck pytest demo bench clean

install: $(STAMP)

# Torch first: `torch==2.13.*` resolves to the local CPU wheel on these machines; on a GPU
# workstation set TORCH_SPEC (or pre-install the CUDA build, see README). Then the package, whose
# torch requirement admits the installed build so pip never replaces it, with the optional Ray
# engine so that its tests run (a user who does not need it installs plain `semwatch`).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev,ray]"
	touch $(STAMP)

lint: install
	$(BIN)/ruff check $(wildcard daemon tests benchmarks)

# The layering contract in pyproject.toml ([tool.importlinter]): layers, no cycles, argparse in cli only.
imports: install
	$(BIN)/lint-imports --no-cache

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/pytest -q

test: lint imports typecheck pytest

demo: install
	$(BIN)/semwatch demo

# Full-size training + accuracy/speed figures, then the daemon's figures (tens of minutes on a CPU).
bench: install
	$(BIN)/python -m pip install -q -e ".[dev,bench]"
	$(BIN)/python benchmarks/train_full.py --reuse --out models/ncm
	$(BIN)/python benchmarks/daemon_bench.py --model models/ncm

clean:
	rm -rf $(VENV) build *.egg-info daemon/*.egg-info .pytest_cache .mypy_cache .ruff_cache
