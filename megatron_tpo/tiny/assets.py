"""Everything the tiny TPO run needs before its loop starts, built locally in one call.

    assets = prepare_tiny_assets(Path("runs/tiny/assets"), TinyTaskConfig(seed=0))
    assets.policy                                 # HF model dir: M_0 of TPO and of the baseline
    assets.train_prompts, assets.heldout_prompts  # JSONL, field "instruction"
    assets.answers                                # JSONL, "instruction" and "answer", both sets

The directory holds a manifest of the config it was built from; a second call with the
same config reuses it without training, a different config rebuilds it.
"""

import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, NamedTuple, Sequence

from megatron_tpo.config import ConfigError, load_model_config
from megatron_tpo.data.thought_templates import GENERIC
from megatron_tpo.tiny.task import (ProblemSplits, SumProblem, direct_demonstration,
                                    response_text, split_problems, thought_demonstration)
from megatron_tpo.tiny.thoughts import DEFAULT_MIX, THOUGHT_KINDS, thought_text, validate_mix
from megatron_tpo.tiny.tokenizer import train_tokenizer
from megatron_tpo.tiny.warm_start import (SFTConfig, WarmStartExample, new_policy, save_policy,
                                          supervised_warm_start, warm_start_data)

MANIFEST = "manifest.json"
# Bump when the files written change meaning, so old asset directories are rebuilt.
ASSETS_VERSION = 2  # 2: one M_0 for both arms, thoughts of mixed kinds


@dataclass(kw_only=True)
class TinyTaskConfig:
    """The tiny task and its warm start. Only the shape of a settings dataclass is shared
    with ``ModelConfig``: the policy's own shape is a ``ModelConfig`` loaded by name
    (``model``, configs/model/tiny_tpo.yaml), never repeated here."""

    seed: int = 0
    """Seeds the problems, the warm-start examples and M_0's initial weights."""
    num_terms: int = 4
    """Numbers added in one problem."""
    term_digits: int = 2
    """Digits of each number."""
    sft_size: int = 16000
    """Warm-start problems. 16,000 are each seen about three times in the warm start's
    3,000 steps. 4,000 seen eight times each in 2,000 steps left a response that read its
    thought far less (seed 1, right answers after the true column sums: 0.13 against 0.56;
    examples/tiny_cpu/README.md, Measured)."""
    train_size: int = 256
    """TPO's training instructions."""
    heldout_size: int = 100
    """Held-out instructions the iterations are scored on."""
    tokenizer_vocab_size: int = 512
    """The byte-level BPE tokenizer's vocabulary."""
    model: str = "tiny_tpo"
    """The policy's configs/model name."""
    thought_mix: Dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    """The warm start's thought kinds and their weights (tiny/thoughts.py); none is labelled."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """The warm start's supervised training."""

    def validate(self) -> None:
        if not 2 <= self.num_terms <= 6:
            raise ConfigError(f"tiny.num_terms={self.num_terms}: must be in [2, 6]")
        if not 1 <= self.term_digits <= 4:
            raise ConfigError(f"tiny.term_digits={self.term_digits}: must be in [1, 4]")
        for name in ("sft_size", "train_size", "heldout_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"tiny.{name}={getattr(self, name)}: must be >= 1")
        if self.tokenizer_vocab_size < 300:
            raise ConfigError(f"tiny.tokenizer_vocab_size={self.tokenizer_vocab_size}: must be "
                              ">= 300 (256 byte symbols, the special tokens, some merges)")
        validate_mix(self.thought_mix)
        self.sft.validate()


@dataclass(frozen=True)
class TinyAssets:
    root: Path
    tokenizer: Path
    policy: Path          # M_0, the same weights for both arms
    train_prompts: Path
    heldout_prompts: Path
    answers: Path
    manifest: Dict


def _paths(root: Path, manifest: Dict) -> TinyAssets:
    return TinyAssets(root=root, tokenizer=root / "tokenizer",
                      policy=root / "policy",
                      train_prompts=root / "train_prompts.jsonl",
                      heldout_prompts=root / "heldout_prompts.jsonl",
                      answers=root / "answers.jsonl", manifest=manifest)


def _wanted_manifest(config: TinyTaskConfig) -> Dict:
    return {"version": ASSETS_VERSION, "config": asdict(config)}


def _write_jsonl(path: Path, rows: Sequence[Dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def tokenizer_corpus(problems: Sequence[SumProblem]) -> List[str]:
    """What the tokenizer learns from: the thought prompt, the chat roles (so "assistant" is
    a token, not eight letters), and one demonstration of every thought kind per problem."""
    rng = random.Random(0)
    corpus = [GENERIC.prompt, "system\nuser\nassistant"]
    for problem in problems:
        corpus.append(problem.instruction)
        corpus.append(direct_demonstration(problem))
        corpus.extend(thought_demonstration(problem, GENERIC, thought_text(problem, kind, rng))
                      for kind in THOUGHT_KINDS)
    return corpus


def warm_start_counts(data: Sequence[WarmStartExample]) -> Dict[str, Dict[str, float]]:
    """Per prompt style and thought kind: examples, and the share whose response states the
    correct answer (1.0 for every kind: no kind is marked as better)."""
    groups: Dict[str, List[WarmStartExample]] = {}
    for item in data:
        groups.setdefault(item.kind or "direct", []).append(item)
    counts = {}
    for name, items in sorted(groups.items()):
        correct = sum(item.target.endswith(response_text(SumProblem.from_instruction(
            item.instruction))) for item in items)
        counts[name] = {"examples": len(items), "correct_answer_share": correct / len(items)}
    return counts


class WarmStartInputs(NamedTuple):
    """What the warm start starts from: the problem splits, the tokenizer trained on the
    warm-start problems, the supervised examples, and the untrained M_0."""

    splits: ProblemSplits
    tokenizer: object
    data: List[WarmStartExample]
    model: object


def warm_start_inputs(config: TinyTaskConfig) -> WarmStartInputs:
    splits = split_problems((config.sft_size, config.train_size, config.heldout_size),
                            config.num_terms, config.seed, config.term_digits)
    tokenizer = train_tokenizer(tokenizer_corpus(splits.sft), config.tokenizer_vocab_size)
    data = warm_start_data(splits.sft, tokenizer, config.thought_mix, config.seed)
    model = new_policy(load_model_config(config.model, vocab_size=len(tokenizer)), config.seed)
    return WarmStartInputs(splits, tokenizer, data, model)


def _build(staging: Path, config: TinyTaskConfig) -> Dict:
    splits, tokenizer, data, model = warm_start_inputs(config)
    tokenizer.save_pretrained(str(staging / "tokenizer"))
    _write_jsonl(staging / "train_prompts.jsonl", [{"instruction": p.instruction} for p in splits.train])
    _write_jsonl(staging / "heldout_prompts.jsonl",
                 [{"instruction": p.instruction} for p in splits.heldout])
    _write_jsonl(staging / "answers.jsonl", [{"instruction": p.instruction, "answer": p.answer}
                                             for p in splits.train + splits.heldout])
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    losses = supervised_warm_start(model, [item.example for item in data], config.sft,
                                   pad_id=tokenizer.pad_token_id)
    warm_start = {"first_loss": losses[0], "final_loss": sum(losses[-10:]) / len(losses[-10:]),
                  "wall_seconds": time.perf_counter() - start_wall,
                  "cpu_seconds": time.process_time() - start_cpu,
                  "data": warm_start_counts(data)}
    save_policy(model, tokenizer, staging / "policy")
    return {**_wanted_manifest(config), "vocab_size": len(tokenizer), "warm_start": warm_start}


def _reusable(root: Path, config: TinyTaskConfig):
    path = root / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    wanted = _wanted_manifest(config)
    if any(manifest.get(key) != value for key, value in wanted.items()):
        return None
    assets = _paths(root, manifest)
    needed = (assets.tokenizer, assets.policy, assets.train_prompts, assets.heldout_prompts, assets.answers)
    return assets if all(p.exists() for p in needed) else None


def prepare_tiny_assets(out_dir: Path, config: TinyTaskConfig) -> TinyAssets:
    """Build (or reuse) the tokenizer, the warm-started M_0 and the prompt files.

    Built in a staging directory and renamed into place, so an interrupted build leaves
    nothing that looks finished. An existing ``out_dir`` built from another config is
    replaced; one without a manifest is refused rather than deleted.
    """
    config.validate()
    root = Path(out_dir)
    reused = _reusable(root, config)
    if reused is not None:
        return reused
    if root.exists() and any(root.iterdir()) and not (root / MANIFEST).is_file():
        raise ConfigError(f"{root}: exists, is not empty and has no {MANIFEST}; not a tiny "
                          "assets directory, refusing to overwrite it")
    staging = root.with_name(root.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    manifest = _build(staging, config)
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if root.exists():
        shutil.rmtree(root)
    os.replace(staging, root)
    return _paths(root, manifest)
