# The two commands of the README: `make demo` and `make test`. Both set everything up on a fresh clone.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pip's notes about the local package mirrors are noise here
QUIET_PIP := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: setup demo test lint unit fast e2e protos down

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]' 2>&1 | $(QUIET_PIP)
	$(BIN)/python -c "import torch, tritonclient, faststream; print('installed: torch', torch.__version__)"
	touch $(STAMP)

setup: $(STAMP)

# kubectl (kustomize) renders deploy/k8s in the tests
$(BIN)/kubectl: deploy/tools/install-kubectl.sh | $(STAMP)
	deploy/tools/install-kubectl.sh $(BIN)

demo: setup
	$(BIN)/llmesh up
	$(BIN)/llmesh generate "Return the number of items" --max-tokens 48 --seed 7
	$(BIN)/llmesh generate "This module provides" --max-tokens 48 --seed 7 --stream
	@command -v curl >/dev/null && curl -s http://127.0.0.1:8080/v1/chat/completions -H 'content-type: application/json' \
	  -d '{"model": "chat", "messages": [{"role": "user", "content": "Return the number of"}], "max_tokens": 24, "seed": 7}' && echo || true
	$(BIN)/llmesh models
	$(BIN)/llmesh status

down: setup
	$(BIN)/llmesh down

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

protos: setup
	$(BIN)/python scripts/gen_protos.py

unit: setup
	$(BIN)/pytest tests/unit -q

# while iterating: everything that starts no process (CI runs everything)
fast: setup
	$(BIN)/pytest -q -m "not slow and not container"

# promtool unit-tests the alert rules (deploy/prometheus)
$(BIN)/promtool: deploy/tools/install-promtool.sh | $(STAMP)
	deploy/tools/install-promtool.sh $(BIN)

# the container tests (tests/container) need a Docker engine: this starts one where it can
test: lint $(BIN)/kubectl $(BIN)/promtool
	deploy/tools/docker-engine.sh
	$(BIN)/pytest -q -rs --durations=10
