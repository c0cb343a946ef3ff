"""``tpo-run --dry-run``: the run's own build and loop code for one iteration, with
stand-ins that do no compute but hold what the real parts would hold.

    run = dry_run(config, world_size)    # the ledger of every phase the loop entered
    run.check()                          # ConfigError: the first misfit and a fix that fits
    print(run.report())

Everything the job reads before its first GPU second is read here too: the policy's
tokenizer and config.json, the prompt and held-out files (every line, every field), the
judge's checkpoint (its size), a rule judge's answers; the run directory is only checked,
never written. The engine, a model judge, the trainer, the checkpointer and the weight
push are stand-ins; the memory they claim comes from the planner's model
(``plan.tenants``) through the same ledger and placement the run uses, so the phases
sized are the phases the loop enters, by construction.
"""

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from megatron_tpo.build import Builders, build_tpo, check_run_dir
from megatron_tpo.config.errors import ConfigError
from megatron_tpo.judge.base import Judge, Judgment, check_grouping
from megatron_tpo.loop import run_tpo
from megatron_tpo.overrides import as_override, with_settings
from megatron_tpo.placement.ledger import GIB, GpuLine, MemoryLedger
from megatron_tpo.placement.policy import replay
from megatron_tpo.plan.cost import tenants
from megatron_tpo.report.metrics import RunMetrics
from megatron_tpo.rollout.engine import GenerationOutput, RolloutEngine, SamplingParams
from megatron_tpo.tpo_config import TPOConfig


# -- stand-ins --------------------------------------------------------------------------
class StandInEngine(RolloutEngine):
    """Answers every prompt at once with text in the thought template's format."""

    def __init__(self, thought, tokenizer):
        self.thought, self.tokenizer = thought, tokenizer

    def _text(self, k: int) -> str:
        if self.thought.response_marker is None:
            return f"response {k}"
        return (f"{self.thought.thought_marker or ''} thought {k} "
                f"{self.thought.response_marker} response {k}")

    def generate(self, prompts: Sequence[str], sampling: SamplingParams) -> List[GenerationOutput]:
        texts = [self._text(k) for k in range(sampling.n)]
        ids = [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        return [GenerationOutput(
            prompt=prompt, texts=list(texts), num_tokens=[len(i) for i in ids],
            prompt_token_ids=self.tokenizer(prompt, add_special_tokens=False)["input_ids"],
            token_ids=[list(i) for i in ids], finish_reasons=["stop"] * sampling.n)
            for prompt in prompts]

    def score(self, token_ids: Sequence[Sequence[int]]) -> List[List[float]]:
        return [[0.0] * (len(ids) - 1) for ids in token_ids]

    def update_weights(self, stream: Iterable[Tuple[str, torch.Tensor]]) -> None:
        for _ in stream:
            pass


class StandInJudge(Judge):
    """A model judge's place: the first response of each group best, the last worst."""

    on_every_rank = True

    def judge(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> Judgment:
        check_grouping(prompts, responses)
        return Judgment(scores=[[-float(k) for k in range(len(group))] for group in responses])


class StandInTrainer:
    ddp_chunks = optimizer = scheduler = None

    def reference_logprobs_shared(self, pairs) -> torch.Tensor:
        return torch.zeros(len(pairs), 2, dtype=torch.float64)

    def step(self, pairs) -> Dict[str, float]:
        return {}

    def restart_lr_schedule(self) -> None:
        pass


class StandInCheckpointer:
    def load_latest(self, *state) -> None:
        return None   # the dry run starts where a new run starts

    def save(self, *state) -> None:
        pass


class StandInWeightPush:
    def stream_into(self, engine: RolloutEngine) -> Dict[str, float]:
        engine.update_weights(iter(()))
        engine.set_weight_version(engine.weight_version + 1)
        return {}

    def check_parity(self, engine: RolloutEngine, probes) -> Dict[str, float]:
        return {}


def _stand_in_judge(config: TPOConfig, engine, tokenizer, ranks_per_engine: int) -> Judge:
    # A rule judge is cheap: the real one, which reads its answers file as the run will.
    if config.judge.kind in ("reward_model", "pairwise"):
        return StandInJudge()
    from megatron_tpo.judge.factory import build_judge

    return build_judge(config.judge)


STAND_INS = Builders(
    policy_engine=lambda config, tokenizer: StandInEngine(config.thought, tokenizer),
    judge=_stand_in_judge, trainer=lambda config, run_dir: StandInTrainer(),
    checkpointer=lambda config, run_dir: StandInCheckpointer(),
    weights=lambda config, trainer: StandInWeightPush(),
    ranks_per_engine=lambda config, world_size: 1,   # one process plays every rank
    metrics=lambda config, run_dir: RunMetrics(run_dir, enabled=False))


# -- the dry run ------------------------------------------------------------------------
@dataclass
class DryRun:
    config: TPOConfig
    world_size: int
    ledger: MemoryLedger
    script: List[tuple]

    def check(self) -> None:
        """A ConfigError naming the first phase that does not fit, its GPU, the tenants
        there and the smallest single setting after which every phase fits."""
        refusal = misfit_message(self.config, self.world_size, self.script, self.ledger)
        if refusal:
            raise ConfigError(refusal)

    def fits(self, config: TPOConfig, world_size: int) -> bool:
        """Whether the same run's phases all fit with ``config``'s tenant sizes; cheaper
        than ``verdict_for``, which also searches for a fix."""
        return fits_everywhere(config, world_size, self.script)

    def verdict_for(self, config: TPOConfig, world_size: int) -> str:
        """The same run's phases with ``config``'s tenant sizes (another layout, say):
        '' when every phase fits, else what ``check`` would say (tpo-plan's verdict)."""
        return misfit_message(config, world_size, self.script,
                              replayed_ledger(config, world_size, self.script))

    def summary(self) -> str:
        """One line: the fullest phase and GPU (tpo-doctor's line)."""
        if tenants.gpu_capacity(self.config) is None:
            return f"memory per phase: not checked (run.hardware={self.config.run.hardware})"
        line, gpu = max(self.ledger.peaks(), key=lambda peak: peak[1].total / peak[1].capacity)
        return (f"fullest: {line.phase} on {gpu.gpu}, {gpu.total / GIB:.1f} of "
                f"{gpu.capacity / GIB:.1f} GiB (tpo-run --dry-run lists every phase)")

    def report(self) -> str:
        """Each phase's peak on each kind of GPU; a GPU that holds the same in every phase
        (an engine pool's) on one line."""
        if tenants.gpu_capacity(self.config) is None:
            return f"memory per phase: not checked (run.hardware={self.config.run.hardware})"
        lines = []
        for name in self.ledger.gpus():
            peaks = [(line, gpu) for line, gpu in self.ledger.peaks() if gpu.gpu == name]
            if len({gpu.describe() for _, gpu in peaks}) == 1:
                lines.append(f"  fits: every phase on {name}: {peaks[0][1].describe()}")
                continue
            lines += [f"  fits: {line.phase} on {name}: {gpu.describe()}" for line, gpu in peaks]
        return "\n".join(lines)


DRY_RUN_PROMPTS = 4

NO_SINGLE_FIX = ("no single setting fits it: a larger allocation (more DP shards the "
                 "optimizer), tpo-plan --layout for a larger PP, or rollout.placement=separate")


def dry_run(config: TPOConfig, world_size: int, trace: Optional[Path] = None) -> DryRun:
    """Build the run's parts with stand-ins and run its first iteration in a scratch
    directory; ``trace``: also write the ledger there (as a run's ``ledger.jsonl``)."""
    check_run_dir(config, Path(config.run.dir))
    with tempfile.TemporaryDirectory(prefix="tpo-dry-run-") as scratch:
        run = replace(config.run, dir=scratch, tensorboard=False, wandb_project=None)
        parts = build_tpo(replace(config, run=run), STAND_INS, world_size=world_size,
                          trace=trace if trace is not None else Path(scratch) / "ledger.jsonl")
        # Every file was read and checked whole by the build; the iteration itself needs
        # only a few instructions to enter every phase (the stand-ins' sizes are fixed).
        few = replace(parts.config.prompts,
                      prompts_per_iteration=min(parts.config.prompts.prompts_per_iteration,
                                                DRY_RUN_PROMPTS))
        parts = replace(parts, config=replace(parts.config, prompts=few),
                        heldout=parts.heldout[:DRY_RUN_PROMPTS])
        run_tpo(parts, iterations=1)
    return DryRun(config, world_size, parts.placement.ledger, parts.placement.script)


# -- verdicts and fixes -----------------------------------------------------------------
def replayed_ledger(config: TPOConfig, world_size: int, script: List[tuple]) -> MemoryLedger:
    """The ledger of a recorded run's phases with ``config``'s tenant sizes."""
    ledger = MemoryLedger(tenants.run_tenants(config, world_size), tenants.gpu_capacity(config))
    return replay(script, ledger, tenants.judges_through_policy_engine(config))


def misfit_message(config: TPOConfig, world_size: int, script: List[tuple],
                   ledger: MemoryLedger) -> str:
    """'' when every phase of ``ledger`` fits; else the first misfit, its GPU, its
    tenants, and the smallest single setting after which every phase fits."""
    found = ledger.first_misfit()
    if found is None:
        return ""
    line, gpu = found
    reason = "; ".join(gpu.refusals) or (
        f"needs {gpu.total / GIB:.1f} GiB, more than the {gpu.capacity / GIB:.1f} GiB it has")
    fix = smallest_fix(config, world_size, script, gpu)
    return (f"does not fit: {line.phase} on {gpu.gpu}: {gpu.describe()}; {reason}; "
            + (f"smallest fix: {fix}" if fix else NO_SINGLE_FIX))


def fits_everywhere(config: TPOConfig, world_size: int, script: List[tuple]) -> bool:
    """Whether every phase of the recorded run fits with ``config``'s tenant sizes."""
    return replayed_ledger(config, world_size, script).first_misfit() is None


def smallest_fix(config: TPOConfig, world_size: int, script: List[tuple],
                 gpu: GpuLine) -> str:
    """The first candidate setting, in order of how little it changes, after which the
    recorded run fits in every phase; '' when none does."""
    for key, value in candidate_fixes(config, {name for name, _, _ in gpu.tenants}):
        try:
            changed = with_settings(config, [(key, value)])
            if fits_everywhere(changed, world_size, script):
                return as_override(key, value)
        except ConfigError:   # the candidate is not a valid setting for this run
            continue
    return ""


def candidate_fixes(config: TPOConfig, present: set) -> List[Tuple[str, object]]:
    """Single settings that could fit the tenants ``present`` at a misfit, least change
    first: a sleep that frees memory, offloading, smaller transients, recomputation,
    then smaller or wider engines."""
    rollout, judge, train = config.rollout, config.judge, config.train
    vllm = rollout.vllm
    fixes: List[Tuple[str, object]] = []
    if tenants.POLICY_ENGINE in present and rollout.engine == "vllm":
        if not vllm.sleep_mode:
            fixes.append(("rollout.vllm.sleep_mode", True))
        elif vllm.sleep_level == 0:
            fixes.append(("rollout.vllm.sleep_level", 1))
    if tenants.REWARD_MODEL in present:
        if not judge.reward_model.offloads():
            fixes.append(("judge.reward_model.offload_between_phases", True))
        fixes += [("judge.reward_model.batch_size", judge.reward_model.batch_size // 2 ** k)
                  for k in range(1, 5) if judge.reward_model.batch_size // 2 ** k >= 1]
    if present & {tenants.SENT_BUCKETS, tenants.RECEIVED_BUCKETS}:
        fixes += [("weight_sync.bucket_bytes", config.weight_sync.bucket_bytes // 2 ** k)
                  for k in range(1, 4)]
    if present & set(tenants.TRAINING_TRANSIENTS) and train.recompute_granularity != "full":
        fixes.append(("train.recompute_granularity", "full"))
    for prefix, engine, name in (("rollout.vllm", vllm, tenants.POLICY_ENGINE),
                                 ("rollout.vllm", vllm, tenants.POLICY_POOL),
                                 ("judge.pairwise.vllm", judge.pairwise.vllm, tenants.JUDGE_POOL)):
        if name in present and (rollout.engine == "vllm" or name == tenants.JUDGE_POOL):
            percent = round(engine.gpu_memory_utilization * 100)
            fixes += [(f"{prefix}.gpu_memory_utilization", share / 100)
                      for share in range(percent - 1, 4, -1)]
            fixes += [(f"{prefix}.tensor_parallel_size", size) for size in (2, 4, 8)
                      if size > engine.tensor_parallel_size]
    return list(dict.fromkeys(fixes))
