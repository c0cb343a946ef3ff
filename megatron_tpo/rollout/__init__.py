"""Generation backends behind the ``RolloutEngine`` seam."""

from megatron_tpo.rollout.config import RolloutConfig, VLLMConfig, load_rollout_config
from megatron_tpo.rollout.engine import GenerationOutput, RolloutEngine, SamplingParams
from megatron_tpo.rollout.factory import build_rollout_engine
from megatron_tpo.rollout.hf_engine import HFRolloutEngine

__all__ = ["GenerationOutput", "HFRolloutEngine", "RolloutConfig", "RolloutEngine",
           "SamplingParams", "VLLMConfig", "build_rollout_engine", "load_rollout_config"]
