# make demo   the whole job on a small synthetic set (generate, pack, train on 2 ranks, evaluate, plot)
# make test   the test suite, exactly what CI runs (.ci/run)
# make install  the venv alone (.venv, pip-only MPI: mpi4py + the mpich wheel)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	bash scripts/install-torch-baseline.sh $(PY)
	touch $@

demo: install
	PYTHON=$(PY) bash scripts/demo.sh

test: install
	PYTHON=$(PY) bash scripts/run-tests.sh
