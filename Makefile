# bnserve: the entry point for people. `make run` and `make test` work on a fresh Debian + Python 3.11 machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
ARTIFACT ?= artifacts/mnist-bn
HOST ?= 127.0.0.1
PORT ?= 8000
# Packages from Debian that tests need (a real Prometheus server and promtool; wrk for the benchmark).
APT_PACKAGES ?= prometheus wrk

.PHONY: help venv data train run test test-fast lint typecheck bench bench-replica bench-soak drift-eval system-deps docker-standins docker-build docker-e2e clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch==2.13.0 is pinned in pyproject.toml: it is the CPU wheel on these machines (see the comment there).
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

venv: $(VENV)/.installed  ## create .venv with the pinned dependencies

data: venv  ## fetch and cache MNIST (offline sources first; see training/data.py)
	$(PY) -c 'from training.data import load_mnist, default_cache_dir; s = load_mnist(default_cache_dir()); print("MNIST from", s.source)'

$(ARTIFACT)/model.json: | venv
	$(PY) -m training --out $(ARTIFACT)

train: venv  ## train the default model (always retrains)
	$(PY) -m training --out $(ARTIFACT)

run: venv data $(ARTIFACT)/model.json  ## set up, get data, train if no model, serve on 127.0.0.1:8000
	@echo
	@echo "Serving $(ARTIFACT) on http://$(HOST):$(PORT)  (docs: http://$(HOST):$(PORT)/docs). Try, from another shell:"
	@echo "  curl -s http://$(HOST):$(PORT)/v1/predict -H 'Content-Type: application/json' \\"
	@echo "       -d @examples/seven.json | python3 -m json.tool | head -20"
	@echo
	BNSERVE_ARTIFACT_DIR=$(ARTIFACT) BNSERVE_HOST=$(HOST) BNSERVE_PORT=$(PORT) $(PY) -m service

system-deps:  ## install Debian packages the tests need (root or sudo)
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

lint: venv  ## ruff lint + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv  ## mypy (strict) on model/, training/, service/
	$(VENV)/bin/mypy

test: venv data system-deps lint typecheck  ## ruff, mypy and the whole pytest suite
	$(PY) -m pytest -q --durations=15

test-fast: venv  ## quick inner loop: unit tests only (no servers, no slow tests)
	$(PY) -m pytest -q -m "not integration and not e2e and not slow" -x

bench: venv system-deps $(ARTIFACT)/model.json  ## serving benchmark: bnserve vs naive vs HTTP ceiling
	$(PY) -m bench.serve_bench --artifact $(ARTIFACT)

bench-replica: venv $(ARTIFACT)/model.json  ## one replica's RSS per process and time to ready
	$(PY) -m bench.replica --artifact $(ARTIFACT)

bench-soak: venv $(ARTIFACT)/model.json  ## 100k mixed requests, RSS over time
	$(PY) -m bench.soak --artifact $(ARTIFACT)

drift-eval: venv $(ARTIFACT)/model.json  ## drift-detection power vs BBSD (Failing Loudly protocol)
	$(PY) -m bench.drift_eval --artifact $(ARTIFACT)

docker-standins:  ## (root) install docker.io, start dockerd, build local python/prometheus stand-in images
	deploy/docker/build-standins.sh

docker-build:  ## build bnserve:latest with this host's pip settings and local torch wheel
	deploy/docker/build-image.sh bnserve:latest

docker-e2e: venv  ## build stand-in base images, the project image, and run the compose stack end to end
	$(PY) -m pytest -q tests/e2e/test_compose.py

clean:  ## remove caches (keeps .venv, data and artifacts)
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis
