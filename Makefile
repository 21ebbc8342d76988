# plait: the README's two commands are `make demo` and `make test`.
# TORCH_SPEC pins the CPU wheel; GPU users: make install TORCH_SPEC="torch==2.13.0 --index-url ..."
# Installs take the exact versions in requirements-lock.txt (the ones the suite last passed with), so a fresh
# clone gets what CI tested; `make lock` re-resolves the newest versions pyproject.toml allows (then run the
# suite and commit the file). LOCK= (empty) installs from pyproject's ranges alone.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
LOCK ?= requirements-lock.txt
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONSTRAINTS := $(if $(LOCK),-c $(LOCK))

.PHONY: install demo test test-fast lint bench lock clean

$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(CONSTRAINTS) $(TORCH_SPEC)
	$(PY) -m pip install -q $(CONSTRAINTS) -e ".[dev,bench]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/plait run configs/quickstart.yaml

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

# A throw-away venv resolves the newest allowed versions; torch stays pinned by TORCH_SPEC (not in the lock, so
# GPU builds of torch install against it). Then: make test, and commit requirements-lock.txt.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q --upgrade pip
	.lock-venv/bin/python -m pip install -q $(TORCH_SPEC)
	.lock-venv/bin/python -m pip install -q -e ".[dev,bench]"
	( echo "# Exact versions the test suite passed with; installs use it as pip constraints (-c)."; \
	  echo "# Refresh with 'make lock', run 'make test', commit. torch is pinned by TORCH_SPEC in the Makefile."; \
	  .lock-venv/bin/python -m pip freeze --exclude-editable | grep -v -i '^torch==' ) > requirements-lock.txt
	rm -rf .lock-venv
	rm -f $(STAMP)

clean:
	rm -rf $(VENV) .lock-venv runs build *.egg-info
