# connector-credential-operator — run `make help` for the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
IMAGE ?= connector-credential-operator:dev

.DEFAULT_GOAL := help

help: ## List the targets
	@grep -hE '^[a-z][a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-13s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml client/pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24.3"
	$(PIP) install --quiet -c constraints.txt -e ./client -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP) ## Create the virtual environment and install everything (pinned)

controlplane: ## Build kube-apiserver and etcd from pinned Go modules into ~/.cache (once; minutes)
	bash tests/controlplane/build.sh

demo: $(STAMP) ## The operator against a local kube-apiserver and moto (ARGS=--keep to explore; KUBECONFIG=... for a cluster of yours)
	$(PY) -m tests.support.demo $(if $(filter command line,$(origin KUBECONFIG)),--kubeconfig $(KUBECONFIG)) $(ARGS)

test: $(STAMP) lint typecheck controlplane dist ## Lint, type-check, build both wheels, and run the unit and integration tests (real API server)
	$(PY) -m pytest tests/unit tests/integration tests/e2e

dist: $(STAMP) ## Build both distributions (operator and client: sdist and wheel) into dist/ and twine-check them
	rm -rf dist
	$(PY) -m build --outdir dist .
	$(PY) -m build --outdir dist client
	$(VENV)/bin/twine check --strict dist/*

unit: $(STAMP) ## Unit tests only
	$(PY) -m pytest tests/unit

lint: $(STAMP) ## ruff (lint and format check) and the import contracts (.importlinter)
	$(VENV)/bin/ruff check operator client tests bench
	$(VENV)/bin/ruff format --check operator client tests bench
	PYTHONPATH=.:operator:client/src $(VENV)/bin/lint-imports --no-cache

typecheck: $(STAMP) ## mypy --strict on the package
	$(VENV)/bin/mypy

bench: $(STAMP) controlplane ## Benchmarks: socket vs bare aiohttp (asyncio and uvloop), log filter cost, healthz under 1,000 idle connections, scale (100 and 1,000 credentials), rotation (events vs polling)
	$(PY) bench/socket_bench.py
	$(PY) bench/redact_bench.py
	$(PY) bench/socket_hostile_bench.py
	$(PY) bench/scale.py
	$(PY) bench/rotation.py

cluster: $(STAMP) ## Start a real single-node cluster here (root; no Docker): prints export KUBECONFIG=... AWS_ENDPOINT_URL=...
	@$(PY) -m tests.localnode up

cluster-down: $(STAMP) ## Stop the local cluster and undo every change it made to this machine
	@$(PY) -m tests.localnode down

e2e: $(STAMP) ## End-to-end in real pods on the local cluster (started and stopped unless one runs; E2E_CLUSTER=kind for kind)
	bash tests/e2e/run.sh

demo-cluster: $(STAMP) ## The demo's story in real pods on the local cluster (ARGS=--keep leaves them for a look)
	$(PY) -m tests.localnode.demo $(ARGS)

image: ## Build the container image with Docker (without Docker: tests/localnode/images.sh build, with podman)
	docker build -t $(IMAGE) .

lock: ## Re-pin constraints.txt from a fresh resolve
	rm -rf .lockenv && python3 -m venv .lockenv && .lockenv/bin/pip install -q --upgrade pip \
	  && .lockenv/bin/pip install -q -e ./client -e '.[test]' \
	  && .lockenv/bin/pip freeze --exclude-editable | grep -v '^connector-credential' > constraints.txt \
	  && rm -rf .lockenv

clean: ## Remove the virtual environment and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build dist *.egg-info operator/*.egg-info client/build client/src/*.egg-info

.PHONY: help venv controlplane demo test dist unit lint typecheck bench cluster cluster-down e2e demo-cluster image lock clean
