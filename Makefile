# dynvit: `make demo` sets up and runs the embedded experiment; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
UV     := $(VENV)/bin/uv
STAMP  := $(VENV)/.installed

.PHONY: install test lint format demo clean

install: $(STAMP)

# uv installs the torch/timm stack in seconds and hard-links from its cache on re-creation. It writes no
# bytecode, and its --compile-bytecode compiles only the packages it installs that time: a venv made before
# kept importing from source (9 against 5 s for `import dynvit`, 7 against 6 min for the tests), because
# Python may not cache what it compiles (PYTHONDONTWRITEBYTECODE, a read-only venv). So every package is
# compiled here: 20 s the first time, 3 s once up to date. Some packages ship files for other Python
# versions that cannot compile; they are left as they are (-qq, and the status ignored).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	test -x $(UV) || $(PY) -m pip install -q uv
	$(UV) pip install -q --python $(PY) -e ".[dev]"
	$(PY) -m compileall -qq -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || true
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
