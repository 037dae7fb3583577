# Two commands on a fresh clone: `make demo` and `make test`.
# Each bootstraps .venv idempotently (re-installs only when the build inputs change), then runs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
NATIVE_SRC := $(wildcard csrc/*.cpp csrc/*.h)
EXTRAS ?= test,bench,dask,data,report
PYTEST_ARGS ?= --durations=15

.PHONY: all venv install native test demo bench lint clean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel "pybind11>=2.12"

# Constraints pin torch to the CPU wheel on these machines (see constraints.txt).
$(STAMP): $(PY) setup.py pyproject.toml constraints.txt $(NATIVE_SRC)
	$(PIP) install -q -c constraints.txt --no-build-isolation -e ".[$(EXTRAS)]"
	@touch $(STAMP)

venv install: $(STAMP)

# Rebuild only the C++ extension in place (during development).
native: $(PY)
	$(PY) setup.py -q build_ext --inplace

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/deepssim-fast demo --out demo_out

bench: $(STAMP)
	$(PY) -m bench --quick

lint: $(STAMP)
	$(VENV)/bin/ruff check deepssim_fast kernels bench tests

clean:
	rm -rf build *.egg-info deepssim_fast/_native*.so
