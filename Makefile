# The README's two commands: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ROOT ?= demo-root
PYTEST_ARGS ?=
# Test files run on this many pytest-xdist workers, a whole file per worker (module fixtures such as a Prefect
# server are set up once); tests/conftest.py hands out the files with the most slow tests first. Three on two
# cores: much of the suite waits on servers and process starts, and a third worker fills those waits
# (`make test` on the 2-core VM, back to back: 3 workers 9 min 24 s, 2 workers 10 min 00 s).
TEST_WORKERS ?= 3
XDIST := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

.PHONY: install demo test test-fast lint bench serve stop clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"

# Reinstall only when the dependency list changes; constraints.txt pins the versions known to work.
$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/dumo demo --root $(ROOT)

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

# The inner loop: everything but the tests marked slow (over ~20 s each).
test-fast: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: install
	$(PY) bench/step_cost.py

# Local Prefect server + process work pool + deployments + one worker (see README).
serve: install
	$(PY) -m tasks.local_server start

stop:
	$(PY) -m tasks.local_server stop

clean:
	rm -rf $(ROOT) .pytest_cache .ruff_cache
