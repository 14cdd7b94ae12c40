# Two commands on a fresh machine: `make run` (the main job) and `make test` (the suite).
# Both create .venv on first use and install torch first (TORCH_SPEC: override it for another
# CUDA build, e.g. make run TORCH_SPEC="torch==2.14.1 torchvision==0.29.1 --index-url ..."), then
# every pinned package of requirements.lock, then the project itself (--no-deps).
# `make test` also installs what the suite needs beyond pip (scripts/system-deps.sh), or stops
# first naming it. `make lock` regenerates requirements.lock (pip-tools, scripts/lock.sh).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
LINREP := $(VENV)/bin/linrep
STAMP := $(VENV)/.linrep-installed
LOCK := requirements.lock
PYTEST_ARGS ?=

.PHONY: install lock system-deps run test test-fast ui bench gpu-check clean

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || bash scripts/disk-room.sh $(VENV)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

## regenerate requirements.lock from pyproject.toml ([test,bench] extras) and TORCH_SPEC's pins
lock:
	TORCH_SPEC="$(TORCH_SPEC)" PYTHON="$(PYTHON)" bash scripts/lock.sh

## what the suite needs beyond pip (Chromium + ChromeDriver): installed with apt-get when root
system-deps:
	@bash scripts/system-deps.sh

## the main job: the paper's supervised headline experiment (local Ray, sqlite MLflow in ./mlruns)
run: install
	$(LINREP) train synthetic-supervised

## the whole suite, the paper's headline checks included
test: system-deps install
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

## the inner loop: skips the slow headline checks
test-fast: system-deps install
	$(PY) -m pytest -q -ra -m "not slow" $(PYTEST_ARGS)

## the MLflow UI on 127.0.0.1:5000
ui: install
	$(LINREP) ui

## every benchmark, results as JSON under results/bench and a table in the README
bench: install
	$(LINREP) bench

## on a machine with one CUDA GPU: DeepSpeed bf16 + ZeRO-2 on timm ResNet-50 / ViT-B/16, a synthetic run on the GPU
gpu-check: install
	$(PY) -m linrep.bench.gpu_check

clean:
	rm -rf mlruns ray_results results
