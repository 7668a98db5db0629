# Sluiceway developer entry points. Every target installs what it needs, so a brand-new machine works.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

# The project's local Redis for `make services` and the demo (tests start their own on free ports).
SLUICEWAY_LOCAL_REDIS_PORT ?= 6390
export SLUICEWAY_LOCAL_REDIS_PORT
SLUICEWAY_LOCAL_RABBITMQ_PORT ?= 5690
export SLUICEWAY_LOCAL_RABBITMQ_PORT

.PHONY: help deps venv system-deps services services-down test test-unit lint fmt bench demo demo-local clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

system-deps: ## Install Debian packages the tests and demo use (redis-server, rabbitmq-server, a JRE, ...)
	@bash scripts/system-deps.sh

$(VENV)/.installed: pyproject.toml
	@echo "Installing the Python packages into $(VENV) (pip, quiet: about 30 s the first time)..."
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check -U pip
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

venv: $(VENV)/.installed ## Create .venv with the package and dev tools

deps: system-deps venv ## Everything a fresh machine needs for tests and the demo

services: deps ## Start the local Redis (127.0.0.1:$(SLUICEWAY_LOCAL_REDIS_PORT)) and RabbitMQ (:$(SLUICEWAY_LOCAL_RABBITMQ_PORT)) (idempotent)
	@bash scripts/services.sh up

services-down: ## Stop the local services started by `make services`
	@bash scripts/services.sh down

TEST_WORKERS ?= 2
export TEST_WORKERS
test: deps ## Run every test (phases: scripts/test.sh; TEST_WORKERS=0 for one serial session); starts the real services it needs
	@PY=$(PY) bash scripts/test.sh $(PYTEST_ARGS)

test-unit: venv ## Fast tests only: no Redis, no RabbitMQ, no cluster
	@$(PY) -m pytest -m "not redis and not rabbitmq and not cluster" $(PYTEST_ARGS)

lint: venv ## ruff, mypy --strict, and the import layers (import-linter)
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check .
	@$(VENV)/bin/mypy worker-image/sluiceway operator/sluiceway_operator
	@$(VENV)/bin/lint-imports --no-cache

fmt: venv ## Format the code
	@$(VENV)/bin/ruff format .
	@$(VENV)/bin/ruff check --fix .

bench: deps ## Run the benchmarks (figures go in docs/benchmarks.md)
	@$(PY) -m bench $(BENCH_ARGS)

demo: deps cluster-bins ## The whole system on a local cluster: apply a TaskQueue, watch a burst drain and scale to zero (BROKER=rabbitmq|kafka: the messages on that broker)
	@PYTHONPATH=e2e $(PY) -m clusterdemo $(if $(BROKER),--broker $(BROKER)) $(DEMO_ARGS)

demo-local: services ## A local fleet of worker processes under a QPS limit (no Kubernetes)
	@$(PY) -m sluiceway.demo

kafka-jars: ## Resolve (or find cached) the Kafka test broker's jars from Maven Central
	@$(PY) -m tests.support.kafka_server resolve

clean: services-down ## Remove local state
	rm -rf .run

include e2e/cluster.mk
