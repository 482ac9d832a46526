# One command each: `make demo` sets up a virtual environment and runs the demo; `make test` sets up and runs
# the tests. Override PYTHON, VENV or TORCH (e.g. TORCH=torch for your platform's default build) as needed.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test test-all clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(VENV)/bin/python -m pip install --quiet -e ".[test,ray]"
	touch $@

demo: setup
	$(VENV)/bin/fl-coordinator demo

test: setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# Includes the long experiments and full fuzz campaigns (`-m slow`); hours, not minutes.
test-all: setup
	$(VENV)/bin/python -m pytest -m "slow or not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
