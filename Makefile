# Two commands on a fresh clone: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONUNBUFFERED := 1
PYTEST_ARGS ?=

.PHONY: install install-dev demo test test-fast lint format bench airflow clean-demo

install:
	infra/install.sh

install-dev:
	infra/install.sh --dev

## Install everything, then turn the improvement loop twice on the shipped data and models.
demo: install
	flywheel demo

## Install the dev dependencies, lint, and run the whole test suite (slow tests included).
test: install-dev lint
	python -m pytest $(PYTEST_ARGS)

## ruff: lint and formatting check (configured in pyproject.toml); `make format` rewrites.
lint: install-dev
	ruff check .
	ruff format --check .

format: install-dev
	ruff format .
	ruff check --fix .

## Unit and data tests only (seconds).
test-fast: install-dev
	python -m pytest -m "not slow and not e2e" $(PYTEST_ARGS)

bench: install-dev
	python benchmarks/bench_ingest.py
	python benchmarks/bench_validate.py

## Airflow standalone on dags/ (SQLite under .airflow; AIRFLOW__API__PORT sets the port). README "Airflow".
airflow: install
	scripts/airflow.sh
