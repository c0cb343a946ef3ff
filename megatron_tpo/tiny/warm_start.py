"""The tiny run's M_0: one tiny Llama, warm-started for both arms, never told which thought helps.

As in the paper (one instruction-tuned seed model for TPO and the direct baseline), a
single policy learns both prompts from the same problems: the bare instruction answered
at once, and the generic thought prompt answered with a thought of a kind drawn from
``thought_mix`` (``tiny/thoughts.py``: column sums, wrong sums, a restatement, unrelated
text) and then the response. Every thought, whatever its kind, is followed by the
correct answer, so the data teach the format and never which thought is worth writing.

    data = warm_start_data(problems, tokenizer, DEFAULT_MIX, seed=0)
    model = new_policy(model_config, seed)
    losses = supervised_warm_start(model, [d.example for d in data], SFTConfig())
    save_policy(model, tokenizer, out_dir / "policy")
"""

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from megatron_tpo.config import ConfigError, ModelConfig
from megatron_tpo.data.chat import apply_thought_chat_template
from megatron_tpo.data.config import ThoughtTemplate
from megatron_tpo.data.thought_templates import GENERIC
from megatron_tpo.tiny.task import SumProblem, direct_demonstration, thought_demonstration
from megatron_tpo.tiny.thoughts import draw_kind, thought_text, validate_mix

STYLES = ("thought", "direct")
IGNORE_INDEX = -100

# (prompt token ids, completion token ids ending in EOS)
Example = Tuple[List[int], List[int]]


@dataclass(kw_only=True)
class SFTConfig:
    """The tiny policy's warm start: supervised training on thought-then-answer examples."""

    steps: int = 3000
    """Optimizer steps. The response starts to read its thought late and by a jump, near
    step 2,000 or after it depending on the batch order (README, Measured): at 2,000 steps
    it read on two seeds of five, at 600 on none."""
    batch_size: int = 32
    """Examples per step."""
    lr: float = 3e-3
    """AdamW's peak learning rate."""
    warmup_steps: int = 30
    """Steps of linear warm-up to ``lr``."""
    final_lr_fraction: float = 0.1
    """Cosine decay after warm-up ends at this fraction of ``lr``; 1.0 holds ``lr``."""
    weight_decay: float = 0.01
    """AdamW's weight decay."""
    seed: int = 0
    """Seeds the batch order."""

    def validate(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sft.{name}={getattr(self, name)}: must be >= 1")
        if self.lr <= 0:
            raise ConfigError(f"sft.lr={self.lr}: must be positive")
        if not 0 < self.final_lr_fraction <= 1:
            raise ConfigError(f"sft.final_lr_fraction={self.final_lr_fraction}: must be in (0, 1]")
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(f"sft.warmup_steps={self.warmup_steps}: must be in [0, sft.steps)")


def policy_prompt(tokenizer, instruction: str, style: str,
                  template: ThoughtTemplate = GENERIC) -> str:
    """The chat-formatted generation prompt a policy of ``style`` is trained and sampled on."""
    if style == "thought":
        return apply_thought_chat_template(tokenizer, instruction, template)
    if style == "direct":
        return tokenizer.apply_chat_template([{"role": "user", "content": instruction}],
                                             tokenize=False, add_generation_prompt=True)
    raise ConfigError(f"tiny.style={style!r}: must be one of {', '.join(STYLES)}")


@dataclass(frozen=True)
class WarmStartExample:
    """One supervised example and what it was made of (for tests and the manifest; the
    model sees only ``example``)."""

    instruction: str
    style: str          # "thought" or "direct": which prompt
    kind: str           # the thought's kind, "" for direct
    target: str         # the completion text before EOS
    example: Example


def _tokenized(tokenizer, prompt: str, target: str) -> Example:
    # Prompt and completion tokenized apart, as the engine sees them at generation time.
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    target_ids = tokenizer(target, add_special_tokens=False).input_ids
    return prompt_ids, target_ids + [tokenizer.eos_token_id]


def warm_start_data(problems: Sequence[SumProblem], tokenizer, mix: Mapping[str, float],
                    seed: int, template: ThoughtTemplate = GENERIC) -> List[WarmStartExample]:
    """Per problem, a direct example and a thought example whose thought kind is drawn
    from ``mix``; both end in the correct answer."""
    validate_mix(mix)
    rng = random.Random(f"warm-start-thoughts-{seed}")
    data = []
    for problem in problems:
        direct = direct_demonstration(problem)
        data.append(WarmStartExample(
            problem.instruction, "direct", "", direct,
            _tokenized(tokenizer, policy_prompt(tokenizer, problem.instruction, "direct"), direct)))
        kind = draw_kind(mix, rng)
        target = thought_demonstration(problem, template, thought_text(problem, kind, rng))
        prompt = policy_prompt(tokenizer, problem.instruction, "thought", template)
        data.append(WarmStartExample(problem.instruction, "thought", kind, target,
                                     _tokenized(tokenizer, prompt, target)))
    return data


def packed_batch(examples: Sequence[Example], pad_id: int) -> dict:
    """The examples packed into as few rows as hold them at the longest one's length, for a
    packed (padding-free) forward: labels only on completion tokens, positions restarting at
    0 with each example.

    A thought example is over three times as long as a direct one, so a padded batch spends
    most of its direct rows on padding; packed, a row of one thought example holds three
    direct ones. Without an attention mask and without a cache, transformers reads the
    example boundaries from ``position_ids`` and masks each example from the others, so
    the loss is the padded batch's (tests/tiny/test_tiny_warm_start.py checks it in float64).
    """
    width = max(len(prompt) + len(completion) for prompt, completion in examples)
    rows: List[List[Example]] = []
    room: List[int] = []
    for example in sorted(examples, key=lambda e: len(e[0]) + len(e[1]), reverse=True):
        length = len(example[0]) + len(example[1])
        row = next((r for r, free in enumerate(room) if free >= length), len(rows))
        if row == len(rows):
            rows.append([])
            room.append(width)
        rows[row].append(example)
        room[row] -= length
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    position_ids = torch.zeros_like(input_ids)
    for r, row in enumerate(rows):
        start = 0
        for prompt, completion in row:
            length = len(prompt) + len(completion)
            input_ids[r, start:start + length] = torch.tensor(prompt + completion)
            labels[r, start + len(prompt):start + length] = torch.tensor(completion)
            # The row's end padding goes on counting from the last example: it comes after
            # every real token, so causal attention keeps it out of them.
            position_ids[r, start:] = torch.arange(width - start)
            start += length
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "use_cache": False}


def new_policy(model_config: ModelConfig, seed: int):
    """A freshly initialised ``LlamaForCausalLM`` shaped by ``model_config``."""
    from transformers import LlamaForCausalLM

    from megatron_tpo.model.hf_config import hf_config_from_model

    model_config.validate()
    torch.manual_seed(seed)
    return LlamaForCausalLM(hf_config_from_model(model_config))


def warm_start_schedule(optimizer, sft: SFTConfig):
    """Linear warm-up over ``sft.warmup_steps`` from 0 to ``sft.lr``, then cosine decay to
    ``sft.final_lr_fraction`` of it at ``sft.steps``."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=sft.warmup_steps, num_training_steps=sft.steps,
        min_lr_rate=sft.final_lr_fraction)


def supervised_warm_start(model, examples: Sequence[Example], sft: SFTConfig,
                          pad_id: int, progress: bool = True,
                          after_step: Optional[Callable[[int], None]] = None) -> List[float]:
    """Train ``model`` in place on batches drawn from ``examples``; returns the step losses.
    ``after_step(steps_done)`` runs after every step (benchmarks/warm_start_curve.py probes
    the model there; it must leave the model in training mode)."""
    sft.validate()
    rng = random.Random(sft.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=sft.lr, betas=(0.9, 0.98),
                                  weight_decay=sft.weight_decay)
    schedule = warm_start_schedule(optimizer, sft)
    model.train()
    losses = []
    population, size = list(examples), min(sft.batch_size, len(examples))
    bar = tqdm(range(sft.steps), desc="warm start", disable=not progress, leave=False)
    for step in bar:
        batch = packed_batch(rng.sample(population, size), pad_id)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        if after_step is not None:
            after_step(step + 1)
    model.eval()
    return losses


def save_policy(model, tokenizer, path: Path) -> None:
    """An HF directory the rollout engine and conversion load: weights, tokenizer, and a
    generation config whose EOS is the end of the assistant turn."""
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
