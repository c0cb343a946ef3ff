"""Thought Preference Optimization: the loop, as the paper's algorithm reads.

    M_0 = the instruction-tuned policy
    for t = 0 .. T-1:
        score M_t on held-out instructions (its judged score, its win rate against M_0)
        K thought+response samples of M_t for this iteration's new instructions
        parse each into thought and response; the judge scores the responses only
        length-controlled scores pick a best and a worst sample per instruction
        reference log-probs of every pair under M_t; DPO on thought+response -> M_{t+1}
        checkpoint M_{t+1}; push its weights into the rollout engine (checked)
    score M_T on held-out instructions

Every rank runs this same code (one ``srun`` or ``torchrun``): all ranks are trainer
ranks and each holds a rollout-engine replica. A pairwise judge generates through the
engines and a reward model scores its share of the responses, so both run on every rank;
a rule judge judges on rank 0. Each step runs in a named phase (``placement.phase``),
which wakes the memory holders that phase needs and puts the others to sleep; the loop
never wakes or sleeps anything itself. Each stage's rows land atomically in
``IterationStore``; a restarted run reads finished stages back and resumes training
from the newest checkpoint, so no sample is lost or duplicated.
"""

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from megatron_tpo.data.chat import apply_thought_chat_template
from megatron_tpo.data.prompts import iteration_prompts
from megatron_tpo.evaluation.heldout import score_heldout
from megatron_tpo.fault_injection import crash_point
from megatron_tpo.parallel.collectives import (after_rank_zero, broadcast_from_rank_zero,
                                               derived_seed, is_rank_zero)
from megatron_tpo.parallel.preemption import Preempted
from megatron_tpo.parts import TPOParts
from megatron_tpo.placement.policy import (CHECKPOINT, HELDOUT_ANSWERS, HELDOUT_JUDGING, JUDGING,
                                           PAIRS, PARITY_CHECK, REFERENCE, ROLLOUT, TRAIN,
                                           WEIGHT_SYNC)
from megatron_tpo.preference import judge_rollouts, preference_pairs, rollout_rows
from megatron_tpo.report.plots import plot_iterations
from megatron_tpo.report.summary import (iteration_record, last_per_iteration, run_summary,
                                         write_summary)
from megatron_tpo.rollout.engine import SamplingParams
from megatron_tpo.rollout.replicas import generate_on_all_ranks
from megatron_tpo.train.dpo_batch import tokenized_pairs
from megatron_tpo.train.pair_schedule import pairs_for_step
from megatron_tpo.weights import text_probes

logger = logging.getLogger(__name__)


def run_tpo(parts: TPOParts, iterations: Optional[int] = None) -> dict:
    """Run (or resume) the configured iterations (or the first ``iterations``: the dry run
    runs one); returns the run summary on every rank."""
    config = parts.config
    last = config.run.iterations if iterations is None else iterations
    iteration, step = resume(parts)
    started = time.monotonic()
    for t in range(iteration, last):
        run_iteration(parts, t, first_step=step if t == iteration else 0)
        per_iteration = (time.monotonic() - started) / (t + 1 - iteration)
        logger.info("iteration %d of %d done; about %.0f min to go at %.1f min an iteration",
                    t, last, (last - t - 1) * per_iteration / 60, per_iteration / 60)
    evaluate_heldout(parts, last)
    summary = run_summary(parts.store, parts.metrics.records("iteration"), last,
                          config.thought.name)
    if is_rank_zero():
        write_summary(summary, Path(config.run.dir) / "summary.json")
    return summary


def resume(parts: TPOParts) -> Tuple[int, int]:
    """Restore the newest checkpoint (if any) and give the engine exactly those weights."""
    trainer = parts.trainer
    state = parts.checkpointer.load_latest(trainer.ddp_chunks, trainer.optimizer,
                                           trainer.scheduler) or {}
    iteration = state.get("iteration", 0)
    sync_weights(parts, iteration)
    return iteration, state.get("step_in_iteration", 0)


def run_iteration(parts: TPOParts, t: int, first_step: int = 0) -> None:
    config, phase = parts.config, parts.placement.phase
    evaluate_heldout(parts, t)
    instructions = iteration_prompts(parts.prompts, t, config.prompts.prompts_per_iteration,
                                     config.prompts.seed)
    with phase(ROLLOUT, t):
        rollouts = stage(parts, t, "rollouts", lambda: generate_rollouts(parts, instructions, t))
    with phase(JUDGING, t):
        judgments = stage(parts, t, "judgments", lambda: judge_rollouts(
            rollouts, parts.judge, config.judge.length_control, parts.tokenizer),
            on="all" if parts.judge.on_every_rank else "rank0")
    with phase(PAIRS, t):
        pairs = stage(parts, t, "pairs", lambda: preference_pairs(
            rollouts, judgments, config.judge.length_control.rho, config.preference), on="rank0")
    with phase(REFERENCE, t):
        reference = stage(parts, t, "reference", lambda: reference_logprobs(parts.trainer, pairs))
    with phase(TRAIN, t):
        train_on_pairs(parts, t, reference, first_step)
    with phase(CHECKPOINT, t):
        save_checkpoint(parts, t + 1, step_in_iteration=0)
    crash_point(t, "checkpoint")
    sync = sync_weights(parts, t + 1)
    crash_point(t, "weight_sync")
    parts.metrics.end_iteration(t, iteration_record(parts.store, t, sync))
    if parts.metrics.enabled:   # the rank that keeps the metrics draws them
        plot_iterations({config.thought.name: last_per_iteration(parts.metrics.records("iteration"))},
                        Path(config.run.dir) / "iterations.png")
    if parts.preemption.requested():  # M_{t+1} is saved: stop here, resume at t + 1
        raise Preempted(f"preempted after iteration {t}")


def sync_weights(parts: TPOParts, t: int) -> dict:
    """The trainer's weights (M_t) into the engine, checked on the run's first chat prompts."""
    settings = parts.config.weight_sync
    count = settings.num_probe_sequences
    probes = text_probes(parts.tokenizer, chat_prompts(parts, parts.prompts[:count]), count,
                         settings.probe_length)
    with parts.placement.phase(WEIGHT_SYNC, t):
        streamed = parts.weights.stream_into(parts.engine)
    with parts.placement.phase(PARITY_CHECK, t):
        return {**streamed, **parts.weights.check_parity(parts.engine, probes)}


def stage(parts: TPOParts, t: int, name: str, compute: Callable, on: str = "all") -> list:
    """This stage's rows: read back when the store holds them (a resumed run), else computed
    (on every rank, or on rank 0 alone with ``on="rank0"``) and written by rank 0."""
    store, digest = parts.store, parts.digest
    # Rank 0's view decides for all: a rank that looked only after rank 0 had written the
    # stage would skip the wait below and run ahead into the next stage's collectives.
    if not broadcast_from_rank_zero(store.is_finished(t, name, digest)):
        def compute_and_store() -> None:
            rows, counts = compute() if (on == "all" or is_rank_zero()) else ([], {})
            if is_rank_zero():
                store.write(t, name, rows, seed=parts.config.run.seed, config_digest=digest,
                            counts=counts)
                parts.metrics.log({f"{name}/{key}": value for key, value in counts.items()},
                                  step=t)
                logger.info("iteration %d: stored %d %s rows%s", t, len(rows), name,
                            "".join(f", {key} {value}" for key, value in counts.items()))
            crash_point(t, name)

        # Not a barrier: rank 0 may compute alone for longer than a collective may wait.
        after_rank_zero(compute_and_store, f"stage {name!r} of iteration {t}",
                        parts.config.run.rank_zero_timeout_seconds,
                        "run.rank_zero_timeout_seconds")
    return store.read(t, name)


def chat_prompts(parts: TPOParts, instructions: List[str]) -> List[str]:
    return [apply_thought_chat_template(parts.tokenizer, instruction, parts.config.thought)
            for instruction in instructions]


def generate_rollouts(parts: TPOParts, instructions: List[str], t: int):
    """K samples of M_t per instruction, each parsed into thought and response."""
    sampling = replace(parts.config.rollout.sampling,
                       seed=derived_seed(parts.config.run.seed, t, "rollouts"))
    outputs = generate_on_all_ranks(parts.engine, chat_prompts(parts, instructions), sampling,
                                    parts.engine_tensor_parallel_size)
    return rollout_rows(instructions, outputs, parts.config.thought)


def evaluate_heldout(parts: TPOParts, t: int) -> None:
    """Greedy answers of M_t to the held-out instructions, judged against M_0's."""
    if not parts.heldout:
        return
    config = parts.config

    def answer_and_judge():
        greedy = SamplingParams(n=1, temperature=0.0, top_p=1.0,
                                max_new_tokens=config.rollout.sampling.max_new_tokens,
                                stop=config.rollout.sampling.stop,
                                stop_token_ids=config.rollout.sampling.stop_token_ids)
        with parts.placement.phase(HELDOUT_ANSWERS, t):
            outputs = generate_on_all_ranks(parts.engine, chat_prompts(parts, parts.heldout),
                                            greedy, parts.engine_tensor_parallel_size)
            answers, failures = rollout_rows(parts.heldout, outputs, config.thought)
        first = answers if t == 0 else parts.store.read(0, "heldout")
        with parts.placement.phase(HELDOUT_JUDGING, t):
            return score_heldout(answers, first, parts.judge,
                                 config.evaluation.failure_score), failures

    stage(parts, t, "heldout", answer_and_judge)


def reference_logprobs(trainer, pairs: List[dict]):
    """Sequence log-probs of every pair under M_t (the policy before this iteration's DPO)."""
    if not pairs:
        return [], {"pairs": 0}
    values = trainer.reference_logprobs_shared(tokenized_pairs(pairs))
    rows = [dict(row, reference_chosen=float(chosen), reference_rejected=float(rejected))
            for row, (chosen, rejected) in zip(pairs, values.tolist())]
    return rows, {"pairs": len(rows)}


def train_on_pairs(parts: TPOParts, t: int, reference: List[dict], first_step: int) -> None:
    """``train.train_steps`` DPO steps on the iteration's pairs, from ``first_step`` on."""
    config, trainer = parts.config, parts.trainer
    if not reference:
        logger.warning("iteration %d produced no preference pairs; M_%d = M_%d", t, t + 1, t)
        return
    if first_step == 0:
        trainer.restart_lr_schedule()
    pairs = tokenized_pairs(reference)
    for step in parts.metrics.progress(range(first_step, config.train.train_steps),
                                       f"DPO iteration {t}"):
        batch = pairs_for_step(pairs, config.run.pairs_per_step, step,
                               seed=derived_seed(config.run.seed, t, "pairs"))
        metrics = trainer.step(batch)
        parts.metrics.log_train_step(t, step, metrics,
                                     global_step=t * config.train.train_steps + step)
        crash_point(t, "train", step)
        if step + 1 == config.train.train_steps and "loss" in metrics:
            logger.info("iteration %d: DPO step %d: loss %.4f, reward accuracy %.2f, "
                        "%.0f tokens/s", t, step, metrics["loss"],
                        metrics.get("rewards/accuracy", float("nan")),
                        metrics.get("tokens_per_second", float("nan")))
        # After the last step the iteration's own checkpoint follows at once.
        if step + 1 < config.train.train_steps and parts.preemption.requested():
            save_checkpoint(parts, t, step_in_iteration=step + 1)
            raise Preempted(f"preempted in iteration {t} after DPO step {step + 1}")


def save_checkpoint(parts: TPOParts, iteration: int, step_in_iteration: int) -> None:
    trainer = parts.trainer
    global_step = iteration * parts.config.train.train_steps + step_in_iteration
    parts.checkpointer.save(global_step, trainer.ddp_chunks, trainer.optimizer, trainer.scheduler,
                            {"iteration": iteration, "step_in_iteration": step_in_iteration})
