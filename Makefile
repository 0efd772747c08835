# Set-up is part of every target: a fresh machine needs nothing but python3.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test lint format bench bench-datamerge clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned request would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[test,ray]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/splice demo

CODE := splice tests examples benchmarks

# The habits CI enforces, before the tests: the layer contracts, ruff's lint and format, mypy over splice/.
test: lint
	$(PY) -m pytest -q -p no:cacheprovider

lint: $(VENV)/.installed
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/ruff check $(CODE)
	$(VENV)/bin/ruff format --check $(CODE)
	$(VENV)/bin/mypy

format: $(VENV)/.installed
	$(VENV)/bin/ruff format $(CODE)

bench: $(VENV)/.installed
	$(PY) benchmarks/merge_vs_mergekit.py

# RegMean and Fisher next to FusionBench: its package is a benchmark-only extra, installed here, not for the tests.
bench-datamerge: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/datamerge_bench.py

clean:
	rm -rf $(VENV) build *.egg-info
