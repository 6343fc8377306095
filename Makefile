# The two set-up commands of the README:
#   make generate PROMPT="a red circle"   -> installs noisecraft and generates an image
#   make test                             -> installs noisecraft with its test dependencies and runs the tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt
PROMPT ?= a small red circle at the top left on a blue background
OUT ?= out/image.png

.PHONY: install install-test generate test lint sysdeps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(PIP) torch==2.13.0
	$(PIP) -e .

install-test: $(BIN)/python
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'

generate: install
	$(BIN)/noisecraft generate "$(PROMPT)" -o $(OUT)

lint: install-test
	$(BIN)/ruff check noisecraft tests benchmarks

# System packages some tests need (Debian's chromium for the web UI, redis-server for the
# scale-out queue); idempotent, installs only what is missing.
sysdeps:
	bash scripts/ci_deps.sh

test: lint sysdeps
	$(BIN)/pytest -q $(PYTEST_ARGS)
