# Each target creates/updates .venv and installs what it needs (pinned in pyproject.toml).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export FORGELINE_HOME ?= $(CURDIR)/.forgeline
export DAGSTER_HOME ?= $(FORGELINE_HOME)/dagster_home

.PHONY: demo test ui install clean system-deps test-deploy container-tools gpu-check gpu-check-dry

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

# Real programs the tests start themselves: Debian's redis-server, chromium and Ceph's RADOS
# Gateway (the S3 server: a one-node cluster on 127.0.0.1, tests/rgw.py; moto, from PyPI, stays
# for fault injection only). chromium is optional: without it the browser test skips and says why.
# Without Ceph the S3 tests fail with one line naming these packages.
CEPH_PACKAGES := ceph-mon ceph-osd ceph-common radosgw
system-deps:
	@command -v radosgw >/dev/null && command -v ceph-osd >/dev/null && command -v ceph-mon >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends $(CEPH_PACKAGES) >/dev/null; \
	  else echo "Ceph's RADOS Gateway is missing: sudo apt-get install $(CEPH_PACKAGES)" >&2; exit 1; fi; }
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

## make test-deploy: builds deploy/Dockerfile with podman and runs it for real (code server, model
## server, step pods under `podman kube play`), drives dagster-k8s against a Kubernetes API emulator,
## and runs checkov over deploy/. The base image and the torch/dependency layers stay cached in
## podman's storage between runs on the same machine. Needs root and Debian's podman (installed here).
TEST_IMAGE ?= localhost/forgeline:test
BASE_IMAGE ?= localhost/forgeline-base:bookworm
CHECKOV_VERSION := 3.3.30
# checkov pins (tabulate<0.10) conflict with constraints.txt: it gets a venv of its own.
CHECKOV := .venv-tools/checkov/bin/checkov
test-deploy: export CONTAINERS_CONF := $(CURDIR)/deploy/test/containers.conf
test-deploy: $(STAMP) container-tools $(CHECKOV)
	@start=$$(date +%s); \
	deploy/test/base-image.sh $(BASE_IMAGE) && \
	deploy/test/build-image.sh $(TEST_IMAGE) $(BASE_IMAGE) && \
	echo "image built in $$(( $$(date +%s) - start ))s" && \
	FORGELINE_TEST_IMAGE=$(TEST_IMAGE) $(BIN)/python -m pytest -p no:cacheprovider tests/test_image.py $(PYTEST_ARGS) && \
	$(CHECKOV) --config-file deploy/checkov.yaml -d deploy && \
	echo "test-deploy passed in $$(( $$(date +%s) - start ))s"

$(CHECKOV):
	@test -x .venv-tools/checkov/bin/python || $(PY) -m venv .venv-tools/checkov
	.venv-tools/checkov/bin/python -m pip install -q "checkov==$(CHECKOV_VERSION)"

# podman (runc, not crun: this kernel's cgroups are hybrid), buildah and debootstrap from Debian.
container-tools:
	@if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    { apt-get update -qq && apt-get install -y -qq podman buildah runc debootstrap uidmap >/dev/null; } || true; \
	  fi; \
	fi; \
	command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null || \
	  { echo "test-deploy: podman, runc and debootstrap are needed and could not be installed (needs root on Debian: apt-get install podman buildah runc debootstrap)" >&2; exit 1; }; \
	[ "$$(id -u)" = 0 ] || { echo "test-deploy: needs root (debootstrap builds the base image; podman runs rootful here)" >&2; exit 1; }; \
	CONTAINERS_CONF=$(CURDIR)/deploy/test/containers.conf podman info >/dev/null 2>&1 || \
	  { echo "test-deploy: podman is installed but cannot run containers on this machine: $$(CONTAINERS_CONF=$(CURDIR)/deploy/test/containers.conf podman info 2>&1 | tail -1)" >&2; exit 1; }

## make gpu-check: on a GPU machine, everything CUDA in one call (bench/gpu/check.sh; docs/gpu-check.md).
## The device call runs `bash bench/gpu/check.sh` itself (with .gpu-wheels carried, from bench/gpu/prepare.sh).
gpu-check:
	bash bench/gpu/check.sh

## make gpu-check-dry: the same script here, on CPU, tiny sizes, CUDA-only parts skipped with the reason
gpu-check-dry: $(STAMP)
	PYTHON=$(BIN)/python bash bench/gpu/check.sh --dry
