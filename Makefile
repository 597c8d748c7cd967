# Set-up-included commands for a fresh machine: `make demo` (the main job) and `make test`;
# `make bench` times the loss kernels.
# Each creates .venv when missing, installs torch==2.13.0 there when absent (a plain `torch`
# would pull a multi-GB CUDA build), the test/bench dependencies, and hsd itself (building the
# compiled kernels; CMake compiles the CUDA sources too when nvcc is found).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEPS := numpy tqdm pytest scikit-build-core cmake ninja triton transformers tokenizers datasets pyarrow peft matplotlib accelerate pyyaml
export PATH := $(PATH):/usr/local/cuda/bin:/usr/local/cuda-13.0/bin

.PHONY: demo test bench install deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: $(BIN)/python Makefile
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install torch==2.13.0
	$(BIN)/pip install $(DEPS)
	touch $@

deps: $(VENV)/.deps

install: deps
	HSD_STRICT_BUILD=1 $(BIN)/pip install --no-build-isolation --no-deps -e .

demo: install
	$(BIN)/hsd demo

test: install
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python bench/bench_loss.py --n 4096 --h 1024 --v 151936 --dtype fp32 --mode full --alpha 1

clean:
	rm -rf build dist $(VENV)
