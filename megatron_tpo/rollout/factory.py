"""``build_rollout_engine``: the one place that turns a ``RolloutConfig`` into an engine;
``build_policy_engine``: what a trainer rank holds, that engine or a proxy of a pool."""

from megatron_tpo.rollout.config import RolloutConfig
from megatron_tpo.rollout.engine import RolloutEngine


def build_rollout_engine(config: RolloutConfig, model_path: str, tokenizer=None,
                         serves_checkpoint: bool = False) -> RolloutEngine:
    """The configured engine over the HF checkpoint at ``model_path``, in this process
    (``rollout.placement`` is not looked at: ``tpo-engine`` builds its engines here too).
    A policy's vLLM engine waits for the trainer's weights; one that ``serves_checkpoint``
    (a judge model) loads ``model_path``'s. The HF engine always loads them.

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
                                       seed=config.sampling.seed or 0,
                                       serves_checkpoint=serves_checkpoint)
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_tpo.rollout.hf_engine import HFRolloutEngine

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return HFRolloutEngine(model, tokenizer, device=config.device, batch_size=config.batch_size)


def build_policy_engine(config: RolloutConfig, model_path: str, tokenizer=None) -> RolloutEngine:
    """Every trainer rank's policy engine: its own replica (``placement=colocated``), or a
    proxy of the ``tpo-engine`` pool (``separate``: trainer rank 0 waits for the pool)."""
    if config.placement == "separate":
        from megatron_tpo.rollout.pool.proxy import EnginePoolProxy

        config.validate()
        return EnginePoolProxy.connect(config.bridge)
    return build_rollout_engine(config, model_path, tokenizer)


def trainer_ranks_per_engine(config: RolloutConfig, world_size: int) -> int:
    """How many consecutive trainer ranks share one engine in ``generate_on_all_ranks``
    (and so get the same prompts): a vLLM replica's TP block when colocated; the whole
    trainer world when separate, since rank 0 hands all prompts to the pool, which
    spreads them over its own replicas."""
    return world_size if config.placement == "separate" else config.ranks_per_engine
