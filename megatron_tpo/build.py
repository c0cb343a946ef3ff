"""``build_tpo``: everything one rank needs for the loop, built once, checked before work.

Call it on every rank after ``init_megatron``. Rank 0 converts M_0 from the HF layout
for the trainer's tensor-parallel size (once per run directory) while the others wait
for up to ``run.rank_zero_timeout_seconds`` (a 70B conversion may outlast a collective's
timeout), unless ``run.initial_checkpoint`` names a dist checkpoint, which every rank
reads directly.
"""

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

from megatron_tpo.config.errors import ConfigError
from megatron_tpo.tpo_config import TPOConfig, write_resolved_config
from megatron_tpo.data.prompts import (PromptSetConfig, clean_instructions, load_prompts,
                                      read_instructions)
from megatron_tpo.data.storage import IterationStore, config_hash
from megatron_tpo.parts import TPOParts
from megatron_tpo.parallel.collectives import barrier, is_rank_zero, rank_zero_result, world
from megatron_tpo.parallel.preemption import PreemptionGuard
from megatron_tpo.report.metrics import RunMetrics

DIGEST_FILE = "config_digest.json"


def build_tpo(config: TPOConfig) -> TPOParts:
    from transformers import AutoTokenizer

    from megatron_tpo.checkpoint import TrainingCheckpointer
    from megatron_tpo.checkpoint.initial import load_initial_checkpoint
    from megatron_tpo.rollout.factory import build_policy_engine, trainer_ranks_per_engine
    from megatron_tpo.train.dpo_trainer import DPOTrainer

    run_dir = Path(config.run.dir)
    digest = claim_run_dir(config, run_dir)
    tokenizer = AutoTokenizer.from_pretrained(config.run.policy)
    prompts = training_prompts(config, tokenizer)
    heldout = heldout_prompts(config)
    engine = build_policy_engine(config.rollout, config.run.policy, tokenizer)
    engine.sleep()   # the trainer is built on a free device; the first weight sync wakes it
    ranks_per_engine = trainer_ranks_per_engine(config.rollout, world()[1])
    judge, judge_engine = build_judge_for_rank(config, engine, tokenizer, ranks_per_engine)
    trainer = DPOTrainer(config.model, config.parallel, config.train,
                         shard_root=initial_weights(config, run_dir))
    if config.run.initial_checkpoint:
        load_initial_checkpoint(trainer.ddp_chunks, trainer.optimizer,
                                config.run.initial_checkpoint)
    return TPOParts(
        config=config, digest=digest, tokenizer=tokenizer, engine=engine, judge=judge,
        judge_engine=judge_engine, judge_on_every_rank=judge_on_every_rank(config),
        trainer=trainer,
        checkpointer=TrainingCheckpointer(run_dir / "checkpoints", config.checkpoint),
        store=IterationStore(run_dir / "stages"),
        metrics=RunMetrics(run_dir, enabled=is_rank_zero(), tensorboard=config.run.tensorboard,
                           wandb_project=config.run.wandb_project, config=asdict(config)),
        preemption=PreemptionGuard(), prompts=prompts, heldout=heldout,
        engine_tensor_parallel_size=ranks_per_engine)


def judge_generates(config: TPOConfig) -> bool:
    """Whether the judge generates through engines (pairwise), and so lives on every rank."""
    return config.judge.kind == "pairwise"


def judge_on_every_rank(config: TPOConfig) -> bool:
    """Whether every rank takes part in judging: a pairwise judge generates through every
    rank's engine, a reward model scores its share of the responses on every rank."""
    return judge_generates(config) or config.judge.kind == "reward_model"


def build_judge_for_rank(config: TPOConfig, policy_engine, tokenizer,
                         policy_ranks_per_engine: int):
    """``(judge, the judge model's own engine or None)`` on this rank.

    A pairwise judge generates its verdicts through engines, whose ranks (a vLLM tensor-
    parallel block, the trainer world in front of a separate pool) must all take part:
    it lives on every rank and spreads its prompts over every rank's replica of the
    policy's engine, or, with ``judge.pairwise.model``, of that model's own engine (which
    loads the judge's checkpoint), or asks that model's ``tpo-engine --serve judge``
    pool (``judge.pairwise.placement=separate``). A reward model is loaded whole on every
    rank, which scores its round-robin share of the responses. A rule judge lives on rank
    0 (None elsewhere).
    """
    from transformers import AutoTokenizer

    from megatron_tpo.judge.config import judge_engine_settings
    from megatron_tpo.judge.factory import build_judge
    from megatron_tpo.rollout.engine_pool import EnginePoolProxy
    from megatron_tpo.rollout.replicas import EngineReplicas
    from megatron_tpo.rollout.factory import build_rollout_engine

    if config.judge.kind == "reward_model":   # whole on every rank, each scoring its share
        return build_judge(config.judge), None
    if not judge_generates(config):
        return (build_judge(config.judge) if is_rank_zero() else None), None
    judge_model = config.judge.pairwise.model
    if judge_model is None:
        engine = EngineReplicas(policy_engine, policy_ranks_per_engine)
        return build_judge(config.judge, engine=engine, judge_tokenizer=tokenizer), None
    judge_tokenizer = AutoTokenizer.from_pretrained(judge_model)
    settings = judge_engine_settings(config.rollout, config.judge.pairwise)
    if settings.placement == "separate":
        # The judge model's own tpo-engine pool (--serve judge): rank 0 asks it and every
        # rank gets every verdict back. Its GPUs are its own: the loop's sleep and wake of
        # this proxy do nothing, and no weight sync ever reaches it.
        own = EnginePoolProxy.connect(settings.bridge, "judge.pairwise.bridge")
        return build_judge(config.judge, engine=own, judge_tokenizer=judge_tokenizer), own
    # Colocated: one more engine in this process (HF only; check_judge_placement refuses
    # a second vLLM engine beside the policy's).
    own = build_rollout_engine(settings, judge_model, judge_tokenizer, serves_checkpoint=True)
    engine = EngineReplicas(own, settings.ranks_per_engine)
    return build_judge(config.judge, engine=engine, judge_tokenizer=judge_tokenizer), own


def claim_run_dir(config: TPOConfig, run_dir: Path) -> str:
    """The digest of the settings that decide stage outputs; a run directory written with
    other settings is refused (naming them) instead of mixing two runs' samples."""
    digest_fields = config.digest_fields()
    digest = config_hash(digest_fields)
    path = run_dir / DIGEST_FILE
    if path.is_file():
        before = json.loads(path.read_text())
        if before["digest"] != digest:
            changed = sorted(_changed_keys(before["fields"], json.loads(
                json.dumps(digest_fields, default=str))))
            raise ConfigError(f"run.dir={run_dir} holds a run made with other settings "
                              f"({', '.join(changed[:6])}); resume it with those settings, or "
                              "give this run another run.dir")
    barrier()  # every rank has compared before rank 0 writes
    if is_rank_zero():
        write_resolved_config(config, run_dir, world()[1])
        path.write_text(json.dumps({"digest": digest, "fields": digest_fields}, indent=1,
                                   default=str))
    return digest


def _changed_keys(before, now, prefix="") -> List[str]:
    if isinstance(before, dict) and isinstance(now, dict):
        keys = set(before) | set(now)
        return [k for key in keys for k in _changed_keys(before.get(key), now.get(key),
                                                           f"{prefix}{key}.")]
    return [] if before == now else [prefix.rstrip(".")]


def training_prompts(config: TPOConfig, tokenizer) -> List[str]:
    prompts = load_prompts(config.prompts, tokenizer)
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
    instructions = clean_instructions(read_instructions(
        PromptSetConfig(path=settings.path, field=settings.field)))
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
