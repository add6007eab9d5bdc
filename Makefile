# Two commands do all the set-up on a bare clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines get the local CPU build of torch first; a GPU user may override, e.g.
#   make TORCH_SPEC='torch>=2.6' test
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# make test runs the suite in this many pytest-xdist workers (auto: one per core; 0: in this process),
# each with its share of the cores as torch threads, and the CUDA tests all in one of them (tests/conftest.py)
TEST_WORKERS ?= auto

.PHONY: venv demo test test-fast bench bench-quick clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test,plot]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/posbias extrapolate --preset demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/bench_attention.py

bench-quick: $(STAMP)
	$(PY) benchmarks/bench_attention.py --quick

clean:
	rm -rf $(VENV) runs .pytest_cache
