"""Generation backends behind the ``RolloutEngine`` seam."""

from megatron_tpo.rollout.config import RolloutConfig, load_rollout_config
from megatron_tpo.rollout.engine import GenerationOutput, RolloutEngine, SamplingParams
from megatron_tpo.rollout.hf_engine import HFRolloutEngine

__all__ = ["GenerationOutput", "HFRolloutEngine", "RolloutConfig", "RolloutEngine",
           "SamplingParams", "load_rollout_config"]
