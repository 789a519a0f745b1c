# Set-up and entry points. `make pipeline` and `make test` work on a fresh Debian machine
# (as root or with sudo) and are fast on a second run: every step leaves a stamp and is
# skipped while its inputs are unchanged; downloads are cached under $(FLAM_CACHE_DIR).
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
export FLAM_CACHE_DIR ?= $(HOME)/.cache/flam
export UV_CACHE_DIR ?= $(HOME)/.cache/uv
export HF_HUB_OFFLINE := 1
export PATH := $(abspath $(BIN)):$(PATH)
PYTEST_ARGS ?=
IMAGE_REPO ?= ghcr.io/flam-project
IMAGE_TAG ?= $(shell git rev-parse --short HEAD)

.PHONY: help install deps yamnet ds-ops pipeline test test-fast lint format lock clean
.PHONY: images push-images

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install: $(VENV)/.installed deps yamnet ds-ops  ## Python environment (.venv) + Debian tools + cached packages + weights

# Bytecode is compiled at install, as in the images: where PYTHONDONTWRITEBYTECODE is set or
# site-packages is read-only, every process would otherwise compile the modules it imports
# from source (1,200 for `flam detect`, most of them torch's: half of its start-up time;
# BENCHMARKS.md, "Start-up time").
$(VENV)/.installed: requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@test -x $(BIN)/uv || { $(BIN)/python -m pip --version >/dev/null 2>&1 || $(BIN)/python -m ensurepip -q; \
		$(BIN)/python -m pip install -q uv==0.13.9; }
	$(BIN)/uv pip sync --compile-bytecode --python $(BIN)/python requirements.lock
	$(BIN)/uv pip install --python $(BIN)/python --no-deps -e .
	@touch $@

yamnet: $(FLAM_CACHE_DIR)/yamnet/yamnet.pt $(FLAM_CACHE_DIR)/yamnet/yamnet_class_map.csv  ## YAMNet weights converted to PyTorch (no TensorFlow), and its class names

# DeepSpeed compiles a shared-memory comm op at its first start on a CPU machine (~2.5 min);
# build it once here, cached like the rest, so training and tests start at once.
export TORCH_EXTENSIONS_DIR ?= $(FLAM_CACHE_DIR)/torch_extensions
ds-ops: $(TORCH_EXTENSIONS_DIR)/.shm-comm-built  ## DeepSpeed's CPU comm op, compiled once

$(TORCH_EXTENSIONS_DIR)/.shm-comm-built: | $(VENV)/.installed
	DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.accelerator import get_accelerator; \
		get_accelerator().create_op_builder('ShareMemCommBuilder').load()"
	@touch $@

$(FLAM_CACHE_DIR)/yamnet/yamnet.pt $(FLAM_CACHE_DIR)/yamnet/yamnet_class_map.csv: scripts/convert_yamnet.py | $(VENV)/.installed
	$(BIN)/python scripts/convert_yamnet.py

deps: $(FLAM_CACHE_DIR)/.debian-ready  ## Debian tools (fluidsynth, espeak-ng) and sound packages

$(FLAM_CACHE_DIR)/.debian-ready: scripts/install-debian.sh
	bash scripts/install-debian.sh "$(FLAM_CACHE_DIR)/debs"
	@touch $@

pipeline: install  ## Run the whole pipeline (dvc repro) on the default CPU profile
	$(BIN)/dvc repro

test: install lint  ## Lint, then the whole test suite (slow end-to-end tests included)
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast: install  ## Tests without the slow end-to-end ones
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

lint: $(VENV)/.installed  ## ruff lint + format check + the import architecture (.importlinter)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

format: $(VENV)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

lock: $(VENV)/.installed  ## Re-resolve requirements.lock from pyproject.toml
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 -o requirements.lock

clean:  ## Remove pipeline outputs (keeps the environment and caches)
	rm -rf data reports models

images:  ## Build the CPU and CUDA project images (docker; IMAGE_REPO, IMAGE_TAG)
	docker build --platform linux/amd64 -f infra/docker/Dockerfile.cpu -t $(IMAGE_REPO)/flam:$(IMAGE_TAG)-cpu .
	docker build --platform linux/amd64 -f infra/docker/Dockerfile.cuda -t $(IMAGE_REPO)/flam:$(IMAGE_TAG)-cuda .

push-images:  ## Push both project images to IMAGE_REPO
	docker push $(IMAGE_REPO)/flam:$(IMAGE_TAG)-cpu
	docker push $(IMAGE_REPO)/flam:$(IMAGE_TAG)-cuda
