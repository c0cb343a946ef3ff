"""``build_rollout_engine``: the one place that turns a ``RolloutConfig`` into an engine."""

from megatron_tpo.rollout.config import RolloutConfig
from megatron_tpo.rollout.engine import RolloutEngine


def build_rollout_engine(config: RolloutConfig, model_path: str, tokenizer=None) -> RolloutEngine:
    """The configured engine over the HF checkpoint at ``model_path``.

    ``hf``: transformers in float32, loaded on the CPU and moved to ``config.device``.
    ``vllm``: one engine per block of ``config.vllm.tensor_parallel_size`` ranks of the
    already initialised torch.distributed world (call it on every rank, after megatron).
    The tokenizer defaults to the checkpoint's.
    """
    config.validate()
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
    if config.engine == "vllm":
        from megatron_tpo.rollout.vllm_engine import VLLMRolloutEngine

        return VLLMRolloutEngine.build(model_path, tokenizer, config.vllm,
                                       seed=config.sampling.seed or 0)
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_tpo.rollout.hf_engine import HFRolloutEngine

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return HFRolloutEngine(model, tokenizer, device=config.device, batch_size=config.batch_size)
