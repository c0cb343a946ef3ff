"""A tiny TPO setting that runs in seconds: a random word-level policy, a format judge.

The random policy never writes the thought markers, so the loop tests use the direct
template (the whole output is the response). Punctuation tokens stop a sample, so its
length varies, and a format judge prefers responses of at most 24 characters: some of a
prompt's samples are that short, some are not, so iterations have pairs to train on.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import torch

from tiny_hf import tiny_llama_config, tiny_tokenizer

WORDS = "a b c d e f g h cat dog sun moon the is my".split()


def write_policy(directory: Path, seed: int = 0) -> Path:
    from transformers import GenerationConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, tie_word_embeddings=False))
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_instructions(path: Path, count: int, seed: int) -> Path:
    generator = torch.Generator().manual_seed(seed)
    lines = []
    for index in range(count):
        words = [WORDS[int(i)] for i in torch.randint(len(WORDS), (5,), generator=generator)]
        lines.append(json.dumps({"instruction": " ".join(words) + f" {index % 10}"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_run_overrides(root: Path, iterations: int = 2) -> List[str]:
    """Hydra overrides for a loop run in ``root`` (policy and prompt files written there)."""
    policy = root / "policy"
    if not policy.is_dir():
        write_policy(policy)
        write_instructions(root / "train.jsonl", 64, seed=1)
        write_instructions(root / "heldout.jsonl", 8, seed=2)
    tokenizer = tiny_tokenizer()
    stops = ",".join(str(tokenizer.convert_tokens_to_ids(t)) for t in (".", "!", "?", ",", ":"))
    return [
        "model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64",
        "model.num_attention_heads=4", "model.num_query_groups=2", f"model.vocab_size={len(tokenizer)}",
        "model.make_vocab_size_divisible_by=1", "model.max_position_embeddings=256",
        # As write_policy's config.json has them (HF's defaults): the engine reads those.
        "model.rope_theta=10000.0", "model.norm_epsilon=1e-6",
        "thought=direct", "judge=format", "judge.format.max_chars=24", "prompts=tiny",
        f"prompts.path={root / 'train.jsonl'}", "prompts.prompts_per_iteration=8",
        f"evaluation.path={root / 'heldout.jsonl'}", "evaluation.num_prompts=4",
        "rollout.sampling.n=4", "rollout.sampling.max_new_tokens=24",
        f"rollout.sampling.stop_token_ids=[{stops}]", "preference.truncated=reject",
        "train.train_steps=2", "train.warmup_steps=0", "train.lr=1e-3",
        "run.pairs_per_step=2", f"run.iterations={iterations}", f"run.policy={policy}",
        f"run.dir={root / 'run'}", "run.tensorboard=false",
    ]


def run_loop(root: Path, extra=(), iterations: int = 1, world_size: int = 1) -> dict:
    """A tiny loop run in ``root`` in ``world_size`` local processes; rank 0's summary."""
    from megatron_tpo.cli.run import compose_config, run_rank
    from megatron_tpo.parallel.local_launch import spawn_local

    config = compose_config(tiny_run_overrides(root, iterations) + list(extra))
    config.validate(world_size)
    return spawn_local(run_rank, world_size, config)[0]


def stage_rows(run_dir: Path, iteration: int, stage: str):
    """The stored rows of one stage of one iteration."""
    import pyarrow.parquet as pq

    path = run_dir / "stages" / f"iteration_{iteration:03d}" / f"{stage}.parquet"
    return pq.read_table(path).to_pylist()


def final_weights(run_dir: Path) -> dict:
    """Every tensor of the run's latest checkpoint: model weights and optimizer state."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    flat = run_dir / "final.pt"
    dcp_to_torch_save(run_dir / "checkpoints" / latest / "dist", flat)
    state = torch.load(flat, weights_only=False)  # written by the caller from our own run
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


# The CLI runs of the loop tests (the uninterrupted one and the kill-and-resume ones): two
# iterations of three DPO steps, so that a run can be cut inside an iteration, between a
# checkpoint and the weight sync, and after the sync, and every iteration's learning rate
# warms up (one step) and decays again.
ITERATIONS, TRAIN_STEPS = 2, 3


def loop_overrides(root: Path) -> list:
    ours = {"train.train_steps": TRAIN_STEPS, "train.warmup_steps": 1, "train.min_lr": 1e-4}
    return [o for o in tiny_run_overrides(root, ITERATIONS) if o.split("=")[0] not in ours
            ] + [f"{key}={value}" for key, value in ours.items()]


def session_processes(session: int) -> list:
    """``pid (name)`` of every process still in ``session`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:   # ended while we looked
            continue
        name, fields = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        if int(fields[3]) == session:   # state, ppid, pgrp, session
            found.append(f"{stat.parent.name} ({name})")
    return found


def run_cli(root: Path, crash_at=None, expect: int = 0) -> None:
    """``tpo-run`` in a child process of its own session, killed (SIGKILL, exit -9) or
    signalled at ``crash_at``. Nothing of it may outlive it: a process left in its session
    (reparented to init) would also hold its output open."""
    from megatron_tpo.fault_injection import CRASH_AT_VARIABLE

    env = dict(os.environ)
    env.pop(CRASH_AT_VARIABLE, None)
    if crash_at:
        env[CRASH_AT_VARIABLE] = crash_at
    command = [sys.executable, "-m", "megatron_tpo.cli.run", *loop_overrides(root)]
    log = root / f"tpo-run.{crash_at or 'whole'}.log".replace(":", "_")
    with open(log, "w") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=600)
        finally:
            left = wait_until_gone(process.pid)
            for entry in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.split()[0]), signal.SIGKILL)
    assert code == expect, log.read_text()[-3000:]
    assert not left, f"tpo-run (crash_at={crash_at}) left processes behind: {left}"


def wait_until_gone(session: int, seconds: float = 10.0) -> list:
    """Processes of ``session`` still there after ``seconds`` (helpers may take a moment
    to notice their parent died)."""
    deadline = time.monotonic() + seconds
    while (left := session_processes(session)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left
