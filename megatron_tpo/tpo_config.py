"""The root config of a TPO run: every group of ``configs/`` in one typed tree.

``tpo-run`` composes it with Hydra (``configs/tpo.yaml`` and its groups, plus
``experiment=...`` and command-line overrides), turns it into ``TPOConfig`` and calls
``validate(world_size)`` before any process group, weight or prompt is touched.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from megatron_tpo.checkpoint import CheckpointConfig
from megatron_tpo.checkpoint.initial import check_initial_checkpoint
from megatron_tpo.config.errors import ConfigError
from megatron_tpo.config.model import ModelConfig
from megatron_tpo.config.parallel import ParallelConfig
from megatron_tpo.data.config import PromptSetConfig, ThoughtTemplate
from megatron_tpo.evaluation.config import EvaluationConfig
from megatron_tpo.judge.config import JudgeConfig, check_judge_placement
from megatron_tpo.preference.config import PreferenceConfig
from megatron_tpo.rollout.config import RolloutConfig
from megatron_tpo.train.config import DPOTrainingConfig
from megatron_tpo.weights import WeightSyncConfig

# Where `tpo-tiny --prepare-only` writes the tiny run's policy and prompt files, which
# experiment=tiny_cpu reads: a missing one there means that step has not run.
TINY_ASSETS = "runs/tiny/assets"


@dataclass(kw_only=True)
class RunConfig:
    """The run itself: its policy M_0, directory, length, seed, logging and time limits."""

    name: str = "tpo"
    """The run's label in logs, metrics and reports."""
    dir: str = "runs/tpo"
    """The run directory: stage outputs, checkpoints, metrics, plots and summary.json."""
    policy: str = ""
    """M_0: a Hugging Face checkpoint directory (weights, config.json, tokenizer)."""
    initial_checkpoint: Optional[str] = None
    """M_0's weights for the trainer from a megatron-core dist checkpoint (``tpo-convert
    hf-to-dist``, or a NeMo 2 directory), loaded at the run's TP/PP instead of converted
    from ``policy``; ``policy`` still gives config.json, the tokenizer and the rollout
    engine. Part of the run directory's digest: other weights make other stages."""
    iterations: int = 3
    """TPO iterations: M_0 to M_iterations (a resumed run with more goes on)."""
    seed: int = 0
    """The run's seed: megatron's RNGs, and the seeds every stage derives from it."""
    pairs_per_step: int = 8
    """Preference pairs per optimizer step over all data-parallel ranks."""
    tensorboard: bool = True
    """Also log the metrics to TensorBoard (in the run directory)."""
    wandb_project: Optional[str] = None
    """Also log to Weights & Biases under this project (needs `wandb` installed)."""
    hardware: str = "cpu"
    """A configs/hardware/gpus.yaml name: the GPUs the dry run sizes every phase on (cpu:
    not sized), recorded for `tpo-plan --check`."""
    world_size: Optional[int] = None
    """The trainer ranks this recipe is written for (its sbatch script's tasks, less the
    engine and judge pools'): what `tpo-run --dry-run` sizes on a login node when no
    launcher, --world-size or --nodes says otherwise."""
    process_group_timeout_seconds: float = 1800.0
    """How long any collective waits for the slowest rank before the job fails (tpo-run's
    and tpo-engine's worlds; on GPUs NCCL's watchdog kills the job then). Work one rank
    does alone is not waited for in a collective (``rank_zero_timeout_seconds``, the
    bridges' ``request_timeout_seconds``), so this need not outlast it."""
    rank_zero_timeout_seconds: float = 4 * 3600.0
    """How long the other ranks wait for work rank 0 does alone: converting M_0, a stage
    it computes or stores alone (a rule judge's scores, the pairs). They wait on the
    store, not in a collective, so this may exceed ``process_group_timeout_seconds``."""

    def validate(self) -> None:
        # A policy without config.json is named with every other missing input, before
        # any group's check (TPOConfig.missing_inputs).
        if not self.policy:
            raise ConfigError("run.policy is empty: give the HF checkpoint directory of M_0")
        for name in ("iterations", "pairs_per_step"):
            if getattr(self, name) < 1:
                raise ConfigError(f"run.{name}={getattr(self, name)}: must be >= 1")
        if self.world_size is not None and self.world_size < 1:
            raise ConfigError(f"run.world_size={self.world_size}: must be >= 1 (or null)")
        for name in ("process_group_timeout_seconds", "rank_zero_timeout_seconds"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"run.{name}={getattr(self, name)}: must be positive")


@dataclass(kw_only=True)
class TPOConfig:
    """Every group of a TPO run (configs/tpo.yaml); ``validate`` checks each group, then
    the checks across groups, before any process starts."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy's architecture (configs/model/)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """The trainer's TP/PP/CP layout (configs/parallel/)."""
    train: DPOTrainingConfig = field(default_factory=DPOTrainingConfig)
    """One iteration's DPO: ``train_steps`` steps, with their own warm-up and decay."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """The sampling engines and their sampling (configs/rollout/)."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """Who scores the responses (configs/judge/)."""
    thought: ThoughtTemplate = field(default_factory=ThoughtTemplate)
    """The thought prompt; ``thought=direct`` is the direct-response baseline."""
    prompts: PromptSetConfig = field(default_factory=PromptSetConfig)
    """The training instructions (configs/prompts/)."""
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    """How judged samples become preference pairs."""
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    """The held-out score of every iteration's policy."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """The trainer's checkpoints."""
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    """How the trained weights reach the engines."""
    run: RunConfig = field(default_factory=RunConfig)
    """The run itself."""

    def validate(self, world_size: Optional[int] = None) -> None:
        """Every group's own check, then the checks across groups; before any work."""
        self.parallel.validate(self.model, world_size)
        if self.parallel.context_parallel_size > 1:
            # Each CP rank would need its load-balanced slice of every sequence, and the
            # sequence sums an all-reduce over CP; the DPO trainer does neither yet.
            raise ConfigError(f"parallel.context_parallel_size="
                              f"{self.parallel.context_parallel_size}: the DPO trainer does not "
                              "split pairs over context-parallel ranks; use 1")
        self._check_inputs_present()
        for group in (self.train, self.rollout, self.judge, self.thought, self.prompts,
                      self.preference, self.evaluation, self.checkpoint, self.weight_sync,
                      self.run):
            group.validate()
        check_judge_placement(self.judge, self.rollout)
        check_kv_cache_holds_one_sequence(self.rollout, self.model)
        check_policy_matches_model(self.run.policy, self.model)
        if self.run.initial_checkpoint:
            check_initial_checkpoint(self.run.initial_checkpoint, self.model)
        longest = self.prompts.max_tokens + self.rollout.sampling.max_new_tokens
        if longest > self.model.max_position_embeddings:
            raise ConfigError(
                f"prompts.max_tokens={self.prompts.max_tokens} + rollout.sampling.max_new_tokens="
                f"{self.rollout.sampling.max_new_tokens} exceeds model.max_position_embeddings="
                f"{self.model.max_position_embeddings}")
        if world_size is not None:
            data_parallel = self.parallel.data_parallel_size(world_size)
            per_step = data_parallel * self.train.micro_batch_pairs
            if self.run.pairs_per_step % per_step:
                raise ConfigError(
                    f"run.pairs_per_step={self.run.pairs_per_step} is not a multiple of data "
                    f"parallel size {data_parallel} * train.micro_batch_pairs="
                    f"{self.train.micro_batch_pairs}")

    def _input_files(self) -> Dict[str, str]:
        files = {"prompts.path": self.prompts.path}
        if self.evaluation.num_prompts:
            files["evaluation.path"] = self.evaluation.path
        if self.judge.kind == "exact_answer":
            files["judge.exact_answer.answers_path"] = self.judge.exact_answer.answers_path
        return files

    def missing_inputs(self) -> List[str]:
        """Each given input the job reads that is not there, as ``key=value: why``: the
        policy's config.json and the prompt, held-out and answer files (a hub dataset
        name is not a local file and is left to the reader)."""
        from megatron_tpo.data.prompts import FORMATS

        missing = []
        if self.run.policy and not (Path(self.run.policy) / "config.json").is_file():
            missing.append(f"run.policy={self.run.policy}: no config.json there (not a Hugging "
                           "Face checkpoint directory)")
        for key, path in self._input_files().items():
            if Path(path).suffix in FORMATS and not Path(path).is_file():
                missing.append(f"{key}={path}: file not found")
        return missing + self._missing_judge_checkpoint()

    def _missing_judge_checkpoint(self) -> List[str]:
        """The judge model a GPU recipe's dry run sizes (a local directory, or a hub id in
        the local cache): named here too, so one dry run names every missing input."""
        from megatron_tpo.plan.cost.tenants import checkpoint_model_config

        setting = {"reward_model": ("judge.reward_model.path", self.judge.reward_model.path),
                   "pairwise": ("judge.pairwise.model", self.judge.pairwise.model)}
        key, path = setting.get(self.judge.kind, (None, None))
        if self.run.hardware == "cpu" or not path:
            return []
        try:
            checkpoint_model_config(path, key)
        except ConfigError as error:
            return [str(error)]
        return []

    def _check_inputs_present(self) -> None:
        """All missing inputs in one error, so a first dry run names every one of them."""
        missing = self.missing_inputs()
        if not missing:
            return
        message = missing[0] if len(missing) == 1 else (
            f"{len(missing)} inputs are missing:" + "".join(f"\n  {item}" for item in missing))
        if any(TINY_ASSETS in item for item in missing):
            message += (f" ({TINY_ASSETS} is written by `tpo-tiny --prepare-only`, or by "
                        "`make tiny`: run it first)")
        raise ConfigError(message)


    def digest_fields(self) -> Dict[str, Any]:
        """What decides the stage outputs: everything but how long the run goes on, where
        it logs, and how weights and checkpoints move (where the engines sit, the bridge's
        address, buckets and transports, checkpoints kept), so a run resumed with more
        iterations, or requeued onto other nodes, keeps its finished stages."""
        plain = asdict(self)
        for key in ("iterations", "tensorboard", "wandb_project", "hardware", "world_size",
                    "process_group_timeout_seconds", "rank_zero_timeout_seconds"):
            plain["run"].pop(key)
        for key in ("placement", "bridge"):
            plain["rollout"].pop(key)
            plain["judge"]["pairwise"].pop(key)   # the judge pool's too
        for key in ("checkpoint", "weight_sync"):
            plain.pop(key)
        return plain


# The architecture fields a policy checkpoint must agree on with the model group.
_ARCHITECTURE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                        "num_query_groups", "vocab_size", "tie_word_embeddings")


def check_policy_matches_model(policy: str, model: ModelConfig) -> None:
    from megatron_tpo.model.hf_config import model_config_from_hf, read_hf_config_dict

    from_checkpoint = model_config_from_hf(read_hf_config_dict(Path(policy)))
    for name in _ARCHITECTURE_FIELDS:
        ours, theirs = getattr(model, name), getattr(from_checkpoint, name)
        if ours != theirs:
            raise ConfigError(f"model.{name}={ours}, but run.policy={policy} has {theirs}; pick "
                              "the model config that describes the checkpoint")


# vLLM's KV cache blocks on its CPU build, in tokens. Its GPU attention backends use 16 by
# default, so there the check below asks for at most two CPU blocks more than vLLM does.
VLLM_KV_BLOCK_TOKENS = 128


def check_kv_cache_holds_one_sequence(rollout: RolloutConfig, model: ModelConfig) -> None:
    """An explicit ``rollout.vllm.kv_cache_memory_bytes`` must hold one sequence of vLLM's
    ``max_model_len`` (unset, vLLM takes the checkpoint's max_position_embeddings), or
    vLLM refuses to start. Its check (``check_enough_kv_cache_memory``,
    ``v1/core/kv_cache_utils.py``; ``v1/core/kv_cache_planning.py`` in 0.33) counts whole
    blocks for the sequence plus the one block its pool holds back."""
    from megatron_tpo.plan.cost.engines import kv_bytes_per_token_per_gpu

    vllm = rollout.vllm
    if rollout.engine != "vllm" or vllm.kv_cache_memory_bytes is None:
        return
    length, source = ((vllm.max_model_len, "rollout.vllm.max_model_len") if vllm.max_model_len
                      else (model.max_position_embeddings,
                            "model.max_position_embeddings, vLLM's default max_model_len"))
    per_token = kv_bytes_per_token_per_gpu(model, vllm.tensor_parallel_size, vllm.dtype_bytes)
    block_bytes = VLLM_KV_BLOCK_TOKENS * per_token
    needed = (-(-length // VLLM_KV_BLOCK_TOKENS) + 1) * block_bytes
    if needed <= vllm.kv_cache_memory_bytes:
        return
    longest = (vllm.kv_cache_memory_bytes // block_bytes - 1) * VLLM_KV_BLOCK_TOKENS
    raise ConfigError(
        f"rollout.vllm.kv_cache_memory_bytes={vllm.kv_cache_memory_bytes} cannot hold one "
        f"sequence of {length} tokens ({source}): vLLM needs {needed} bytes (blocks of "
        f"{VLLM_KV_BLOCK_TOKENS} tokens for it, plus one, at {per_token} bytes a token per "
        f"engine rank in {vllm.dtype}) and refuses to start. Set rollout.vllm.max_model_len="
        f"<n> (this budget holds n <= {max(longest, 0)}) or rollout.vllm.kv_cache_memory_bytes"
        f" >= {needed}")


def register_with_hydra() -> None:
    """Make ``tpo_schema`` (this dataclass) the base of ``configs/tpo.yaml``."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="tpo_schema", node=TPOConfig)


def write_resolved_config(config: TPOConfig, run_dir: Path, world_size: int) -> None:
    """The config as run, plus the world size it ran with (``tpo-plan --check`` reads it)."""
    import yaml

    resolved = json.loads(json.dumps(asdict(config), default=str))
    resolved["run"]["world_size"] = world_size
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    (run_dir / "config.json").write_text(json.dumps(resolved, indent=2))
