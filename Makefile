# make run   - create .venv, install taskd, run the daemon on config/taskd.toml (Ctrl-C stops it)
# make test  - create .venv with the test extras, run the whole suite
# make lint  - ruff and mypy --strict on taskd/

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	mkdir -p var
	$(BIN)/taskd run --config config/taskd.toml

check: $(VENV)/.installed
	$(BIN)/taskd check --config config/taskd.toml

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-test
	$(BIN)/ruff check taskd tests plugins bench
	$(BIN)/ruff format --check taskd tests plugins bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) var build *.egg-info
