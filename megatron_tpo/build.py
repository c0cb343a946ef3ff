"""``build_tpo``: everything one rank needs for the loop, built once, checked before work.

Call it on every rank after ``init_megatron``. The memory holders are built in the order
the accelerator needs them: the policy engine first (vLLM claims its share of a free
device at start-up), then, with the engine asleep, the judge and the trainer. Each is
registered with the run's placement, which from then on moves it phase by phase and
keeps the ledger (``ledger.jsonl``). Rank 0 converts M_0 from the HF layout for the
trainer's tensor-parallel size (once per run directory) while the others wait for up to
``run.rank_zero_timeout_seconds`` (a 70B conversion may outlast a collective's timeout),
unless ``run.initial_checkpoint`` names a dist checkpoint, which every rank reads directly.

``tpo-run --dry-run`` builds through this same code with ``Builders`` of stand-ins that
do no compute (``dry_run.py``), so its phases and tenants are the run's.
"""

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional

from megatron_tpo.config.errors import ConfigError
from megatron_tpo.data.config import PromptSetConfig
from megatron_tpo.data.prompts import (PromptFileError, clean_instructions, load_prompts,
                                       read_instructions)
from megatron_tpo.data.storage import IterationStore, config_hash
from megatron_tpo.judge.base import Judge
from megatron_tpo.parallel.collectives import barrier, is_rank_zero, rank_zero_result, world
from megatron_tpo.parallel.preemption import PreemptionGuard
from megatron_tpo.parts import TPOParts
from megatron_tpo.placement import MemoryLedger, Placement
from megatron_tpo.placement import policy
from megatron_tpo.placement.ledger import ASLEEP, AWAKE, RELEASED, RESIDENT
from megatron_tpo.plan.cost import tenants
from megatron_tpo.report.metrics import RunMetrics
from megatron_tpo.tpo_config import TPOConfig, write_resolved_config

DIGEST_FILE = "config_digest.json"
LEDGER_FILE = "ledger.jsonl"


@dataclass(frozen=True)
class Builders:
    """How ``build_tpo`` makes the parts that compute or hold accelerator memory."""

    policy_engine: Callable      # (config, tokenizer) -> RolloutEngine
    judge: Callable              # (config, policy engine, tokenizer, ranks per engine) -> Judge
    trainer: Callable            # (config, run directory) -> DPOTrainer
    checkpointer: Callable       # (config, run directory) -> TrainingCheckpointer
    weights: Callable            # (config, trainer) -> WeightPush
    ranks_per_engine: Callable   # (config, world size) -> ranks that share one engine replica
    metrics: Callable            # (config, run directory) -> RunMetrics


def build_tpo(config: TPOConfig, builders: Optional[Builders] = None,
              world_size: Optional[int] = None, trace: Optional[Path] = None) -> TPOParts:
    """This rank's parts. ``world_size``: the job's (default this process group's), which
    sizes the ledger; ``trace``: where rank 0 keeps the ledger (default the run's
    ``ledger.jsonl``)."""
    from transformers import AutoTokenizer

    builders = builders or REAL_BUILDERS
    run_dir = Path(config.run.dir)
    world_size = world_size or world()[1]
    digest = claim_run_dir(config, run_dir)
    tokenizer = AutoTokenizer.from_pretrained(config.run.policy)
    prompts = training_prompts(config, tokenizer)
    heldout = heldout_prompts(config)
    metrics = builders.metrics(config, run_dir)
    placement = run_placement(config, world_size, trace or run_dir / LEDGER_FILE, metrics)
    for name in (tenants.RESERVE, tenants.NCCL, tenants.POLICY_POOL, tenants.JUDGE_POOL):
        placement.add(name, policy.FIXED, RESIDENT)
    placement.add(tenants.RECEIVED_BUCKETS, policy.SYNC, RELEASED)
    with placement.phase(policy.ENGINE_START_UP):
        engine = builders.policy_engine(config, tokenizer)
        placement.add(tenants.POLICY_ENGINE, policy.POLICY_ENGINE, AWAKE, engine)
    ranks_per_engine = builders.ranks_per_engine(config, world_size)
    with placement.phase(policy.CONSTRUCTION):   # beside the sleeping engine
        judge = builders.judge(config, engine, tokenizer, ranks_per_engine)
        placement.add(*judge_tenant(config), handle=judge)
        trainer = builders.trainer(config, run_dir)
        for name in tenants.TRAINER_STATE:
            placement.add(name, policy.FIXED, RESIDENT)
        for name in tenants.TRAINING_TRANSIENTS:
            placement.add(name, policy.TRAINING, RELEASED)
        placement.add(tenants.SENT_BUCKETS, policy.SYNC, RELEASED)
    return TPOParts(
        config=config, digest=digest, tokenizer=tokenizer, engine=engine, judge=judge,
        trainer=trainer, checkpointer=builders.checkpointer(config, run_dir),
        weights=builders.weights(config, trainer), placement=placement,
        store=IterationStore(run_dir / "stages"), metrics=metrics,
        preemption=PreemptionGuard(), prompts=prompts, heldout=heldout,
        engine_tensor_parallel_size=ranks_per_engine)


def run_placement(config: TPOConfig, world_size: int, trace: Path,
                  metrics: RunMetrics) -> Placement:
    """The run's ledger, sized by the planner for every kind of GPU of the job (rank 0
    keeps its trace), and the placement that moves the tenants; on a GPU, each phase's
    prediction for this rank's GPU goes to the metrics beside what the device holds."""
    import torch

    ledger = MemoryLedger(tenants.run_tenants(config, world_size), tenants.gpu_capacity(config),
                          trace=trace if is_rank_zero() else None)
    return Placement(ledger, tenants.judges_through_policy_engine(config),
                     gpu=tenants.trainer_gpu(config, own_pipeline_stage(config)),
                     timer=metrics.timer,
                     measure=metrics.log_device_memory if torch.cuda.is_available() else None)


def own_pipeline_stage(config: TPOConfig) -> int:
    """This rank's pipeline stage as the ledger names GPUs (middle stages as the first)."""
    import torch

    if not torch.distributed.is_initialized():   # one process (the dry run): no megatron
        return 0
    from megatron.core import parallel_state

    stage = parallel_state.get_pipeline_model_parallel_rank()
    return stage if stage in tenants.trainer_stages(config) else 0


def judge_tenant(config: TPOConfig):
    """``(ledger name, placement kind, state as built)`` of the judge's own memory holder:
    a reward model (built in host memory when it offloads), a colocated judge engine
    (built on its device); a judge without one is only closed at the end."""
    judge = config.judge
    if judge.kind == "reward_model":
        return tenants.REWARD_MODEL, policy.JUDGE, ASLEEP if judge.reward_model.offloads() else AWAKE
    if judge.kind == "pairwise" and judge.pairwise.model and judge.pairwise.placement == "colocated":
        return tenants.JUDGE_ENGINE, policy.JUDGE, AWAKE
    return "judge", policy.FIXED, RESIDENT


def judge_generates(config: TPOConfig) -> bool:
    """Whether the judge generates through engines (pairwise), and so lives on every rank."""
    return config.judge.kind == "pairwise"


def build_judge_for_rank(config: TPOConfig, policy_engine, tokenizer,
                         policy_ranks_per_engine: int,
                         prompt_template: Optional[str] = None) -> Judge:
    """The judge on this rank.

    A pairwise judge generates its verdicts through engines, whose ranks (a vLLM tensor-
    parallel block, the trainer world in front of a separate pool) must all take part:
    it spreads its prompts over every rank's replica of the policy's engine, or, with
    ``judge.pairwise.model``, of that model's own engine (which loads the judge's
    checkpoint, and which the judge sleeps, wakes and closes), or asks that model's
    ``tpo-engine --serve judge`` pool (``judge.pairwise.placement=separate``). A reward
    model is loaded whole on every rank, which scores its round-robin share of the
    responses. A rule judge is built on every rank and judges on rank 0.
    ``prompt_template`` replaces the pairwise judge's prompt (tpo-eval passes its own).
    """
    from transformers import AutoTokenizer

    from megatron_tpo.judge.config import judge_engine_settings
    from megatron_tpo.judge.factory import build_judge
    from megatron_tpo.rollout.factory import build_rollout_engine
    from megatron_tpo.rollout.pool.proxy import EnginePoolProxy
    from megatron_tpo.rollout.replicas import EngineReplicas

    if not judge_generates(config):
        return build_judge(config.judge)
    judge_model = config.judge.pairwise.model
    if judge_model is None:
        engine = EngineReplicas(policy_engine, policy_ranks_per_engine)
        return build_judge(config.judge, engine=engine, judge_tokenizer=tokenizer,
                           prompt_template=prompt_template)
    judge_tokenizer = AutoTokenizer.from_pretrained(judge_model)
    settings = judge_engine_settings(config.rollout, config.judge.pairwise)
    if settings.placement == "separate":
        # The judge model's own tpo-engine pool (--serve judge): rank 0 asks it and every
        # rank gets every verdict back. Its GPUs are its own: no weight sync reaches it.
        own = EnginePoolProxy.connect(settings.bridge, "judge.pairwise.bridge")
        return build_judge(config.judge, engine=own, judge_tokenizer=judge_tokenizer,
                           own_engine=own, prompt_template=prompt_template)
    # Colocated: one more engine in this process (HF only; check_judge_placement refuses
    # a second vLLM engine beside the policy's).
    own = build_rollout_engine(settings, judge_model, judge_tokenizer, serves_checkpoint=True)
    engine = EngineReplicas(own, settings.ranks_per_engine)
    return build_judge(config.judge, engine=engine, judge_tokenizer=judge_tokenizer,
                       own_engine=own, prompt_template=prompt_template)


def _build_trainer(config: TPOConfig, run_dir: Path):
    from megatron_tpo.checkpoint.initial import load_initial_checkpoint
    from megatron_tpo.train.dpo_trainer import DPOTrainer

    trainer = DPOTrainer(config.model, config.parallel, config.train,
                         shard_root=initial_weights(config, run_dir))
    if config.run.initial_checkpoint:
        load_initial_checkpoint(trainer.ddp_chunks, trainer.optimizer,
                                config.run.initial_checkpoint,
                                config.run.rank_zero_timeout_seconds)
    return trainer


def _build_policy_engine(config: TPOConfig, tokenizer):
    from megatron_tpo.rollout.factory import build_policy_engine

    return build_policy_engine(config.rollout, config.run.policy, tokenizer)


def _build_checkpointer(config: TPOConfig, run_dir: Path):
    from megatron_tpo.checkpoint import TrainingCheckpointer

    return TrainingCheckpointer(run_dir / "checkpoints", config.checkpoint)


def _build_weight_push(config: TPOConfig, trainer):
    from megatron_tpo.weights import WeightPush

    return WeightPush(trainer.ddp_chunks, config.model, config.weight_sync,
                      config.train.pad_to_multiple_of)


def _ranks_per_engine(config: TPOConfig, world_size: int) -> int:
    from megatron_tpo.rollout.factory import trainer_ranks_per_engine

    return trainer_ranks_per_engine(config.rollout, world_size)


def _build_metrics(config: TPOConfig, run_dir: Path) -> RunMetrics:
    return RunMetrics(run_dir, enabled=is_rank_zero(), tensorboard=config.run.tensorboard,
                      wandb_project=config.run.wandb_project, config=asdict(config))


REAL_BUILDERS = Builders(policy_engine=_build_policy_engine, judge=build_judge_for_rank,
                         trainer=_build_trainer, checkpointer=_build_checkpointer,
                         weights=_build_weight_push, ranks_per_engine=_ranks_per_engine,
                         metrics=_build_metrics)


def claim_run_dir(config: TPOConfig, run_dir: Path) -> str:
    """The digest of the settings that decide stage outputs, written into ``run_dir``; a
    run directory holding stages made with other settings is refused (naming them)
    instead of mixing two runs' samples."""
    digest = check_run_dir(config, run_dir)
    barrier()  # every rank has compared before rank 0 writes
    if is_rank_zero():
        write_resolved_config(config, run_dir, world()[1])
        (run_dir / DIGEST_FILE).write_text(json.dumps(
            {"digest": digest, "fields": config.digest_fields()}, indent=1, default=str))
    return digest


def check_run_dir(config: TPOConfig, run_dir: Path) -> str:
    """``claim_run_dir``'s check alone, writing nothing (the dry run makes it). A directory
    with no stored stage takes new settings: a corrected rerun after a failed start."""
    digest_fields = config.digest_fields()
    digest = config_hash(digest_fields)
    path = run_dir / DIGEST_FILE
    stored = any((run_dir / "stages").glob("iteration_*/*.manifest.json"))
    if path.is_file() and stored:
        before = json.loads(path.read_text())
        if before["digest"] != digest:
            changed = sorted(_changed_keys(before["fields"], json.loads(
                json.dumps(digest_fields, default=str))))
            raise ConfigError(f"run.dir={run_dir} holds a run made with other settings "
                              f"({', '.join(changed[:6])}); resume it with those settings, or "
                              "give this run another run.dir")
    return digest


def _changed_keys(before, now, prefix="") -> List[str]:
    if isinstance(before, dict) and isinstance(now, dict):
        keys = set(before) | set(now)
        return [k for key in keys for k in _changed_keys(before.get(key), now.get(key),
                                                           f"{prefix}{key}.")]
    return [] if before == now else [prefix.rstrip(".")]


def training_prompts(config: TPOConfig, tokenizer) -> List[str]:
    try:
        prompts = load_prompts(config.prompts, tokenizer)
    except PromptFileError as error:
        raise ConfigError(f"prompts.path={config.prompts.path} (prompts.field="
                          f"{config.prompts.field}): {error}") from error
    needed = config.run.iterations * config.prompts.prompts_per_iteration
    if needed > len(prompts):
        raise ConfigError(f"run.iterations={config.run.iterations} x prompts."
                          f"prompts_per_iteration={config.prompts.prompts_per_iteration} needs "
                          f"{needed} new instructions, but {config.prompts.path} has "
                          f"{len(prompts)} after cleaning and length filtering")
    return prompts


def heldout_prompts(config: TPOConfig) -> List[str]:
    settings = config.evaluation
    if not settings.num_prompts:
        return []
    try:
        instructions = clean_instructions(read_instructions(
            PromptSetConfig(path=settings.path, field=settings.field)))
    except PromptFileError as error:
        raise ConfigError(f"evaluation.path={settings.path} (evaluation.field={settings.field}): "
                          f"{error}") from error
    if len(instructions) < settings.num_prompts:
        raise ConfigError(f"evaluation.num_prompts={settings.num_prompts}, but {settings.path} "
                          f"has {len(instructions)} distinct instructions")
    return instructions[:settings.num_prompts]


def initial_weights(config: TPOConfig, run_dir: Path) -> Optional[str]:
    """M_0 in the trainer's per-rank layout, converted once by rank 0; None when
    ``run.initial_checkpoint`` provides M_0 (loaded into the built trainer instead)."""
    from megatron_tpo.model.conversion import hf_to_mcore
    from megatron_tpo.model.mcore_shards import MANIFEST

    if config.run.initial_checkpoint:
        return None
    tp = config.parallel.tensor_model_parallel_size
    pp = config.parallel.pipeline_model_parallel_size
    destination = run_dir / "initial_weights" / f"tp{tp}_pp{pp}"

    def convert() -> None:
        if (destination / MANIFEST).is_file():
            return
        shutil.rmtree(destination, ignore_errors=True)  # a conversion cut short
        hf_to_mcore(Path(config.run.policy), destination, tp, pp,
                    make_vocab_size_divisible_by=config.model.make_vocab_size_divisible_by,
                    progress=False)

    rank_zero_result(convert, f"converting M_0 ({config.run.policy}) to {destination}",
                     config.run.rank_zero_timeout_seconds, "run.rank_zero_timeout_seconds")
    return str(destination)
