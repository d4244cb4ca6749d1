# dynvit: `make demo` sets up and runs the embedded experiment; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
UV     := $(VENV)/bin/uv
STAMP  := $(VENV)/.installed

.PHONY: install test lint format demo clean

install: $(STAMP)

# uv installs the torch/timm stack in seconds and hard-links from its cache on re-creation. It writes no
# bytecode unless asked: without it every interpreter compiles torch's sources again where Python may not
# cache them (PYTHONDONTWRITEBYTECODE, a read-only venv), about half of `import dynvit`'s time.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	test -x $(UV) || $(PY) -m pip install -q uv
	$(UV) pip install -q --compile-bytecode --python $(PY) -e ".[dev]"
	touch $(STAMP)

# One test process per core, each test file whole in one process (its module fixtures built once), each
# process with one torch thread (tests/conftest.py): two 2-thread processes on 2 cores ran slower than one.
# At most 4: each holds torch and its models (~1-2 GB), and the longest files bound the time beyond that.
test: install
	$(PY) -m pytest tests -n auto --maxprocesses 4 --dist loadfile

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

demo: install
	$(PY) -m dynvit.run.demo

clean:
	rm -rf $(VENV) .pytest_cache
