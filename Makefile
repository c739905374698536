# Each target creates/updates .venv and installs what it needs (pinned in pyproject.toml).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export FORGELINE_HOME ?= $(CURDIR)/.forgeline
export DAGSTER_HOME ?= $(FORGELINE_HOME)/dagster_home

.PHONY: demo test ui install clean system-deps

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]" -c constraints.txt
	@touch $(STAMP)

install: $(STAMP)

## make demo: the whole lifecycle on the embedded defaults (SQLite instance, local disk, CPU)
demo: $(STAMP)
	$(BIN)/forgeline demo

## make test: the test suite (starts its own S3-compatible and Redis servers)
test: $(STAMP) system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Real programs the tests start themselves: Debian's redis-server and chromium (the S3 server is
# moto, from PyPI). chromium is optional: without it the browser test skips and says why.
system-deps:
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; \
	  else echo "redis-server is missing: sudo apt-get install redis-server" >&2; exit 1; fi; }
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
	    || echo "chromium could not be installed: the browser test will skip" >&2; \
	  else echo "chromium is missing (sudo apt-get install chromium): the browser test will skip" >&2; fi; }

## make ui: the Dagster UI on the same instance as `make demo`
ui: $(STAMP)
	$(BIN)/forgeline ui

clean:
	rm -rf $(VENV) .forgeline .pytest_cache
