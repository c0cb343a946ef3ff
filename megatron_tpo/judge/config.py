"""Judge settings (``configs/judge/<name>.yaml``): which judge, its options, length control."""

import re
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Union

from megatron_tpo.config.errors import ConfigError
from megatron_tpo.config.loading import load_group_config
from megatron_tpo.rollout.config import PLACEMENTS, BridgeConfig, RolloutConfig, VLLMConfig
from megatron_tpo.rollout.engine import SamplingParams

KINDS = ("reward_model", "pairwise", "exact_answer", "format")
LENGTH_UNITS = ("tokens", "chars")


@dataclass(kw_only=True)
class LengthControlConfig:
    """How much of this judge's preference for long responses to take back when pairs are
    chosen: controlled = z(score) - rho * z(length) within one prompt's samples. It sits in
    the judge group, though the preference code applies it, because the bias is the
    judge's: each judge's YAML (configs/judge/) carries the rho tuned for it, as the paper
    tunes rho per judge."""

    rho: float = 0.0
    """The length penalty; the paper picks it in [0, 0.5]; 0 is off."""
    unit: str = "tokens"
    """How a response's length is counted: ``tokens`` (the policy tokenizer's) or ``chars``."""

    def validate(self) -> None:
        if self.unit not in LENGTH_UNITS:
            raise ConfigError(f"judge.length_control.unit={self.unit!r}: must be one of "
                              f"{LENGTH_UNITS}")
        if self.rho < 0:
            raise ConfigError(f"judge.length_control.rho={self.rho}: must be >= 0")


@dataclass(kw_only=True)
class RewardModelJudgeConfig:
    """A scalar reward model (ArmoRM-style sequence classifier) scores each response."""

    path: str = ""
    """A local HF checkpoint directory (or hub name when reachable)."""
    batch_size: int = 8
    """(instruction, response) pairs scored per forward pass."""
    max_length: int = 4096
    """Longer (instruction, response) texts are truncated."""
    device: str = "cpu"
    """The torch device the model judges on."""
    dtype: str = "float32"
    """The torch dtype the model is loaded in."""
    trust_remote_code: bool = False
    """Let transformers run the checkpoint's own modelling code (ArmoRM ships some)."""
    offload_between_phases: Optional[bool] = None
    """Keep the model in host memory and move it to ``device`` only while it judges, so it
    does not sit beside the engine and the trainer all run; null: on for cuda devices."""

    def offloads(self) -> bool:
        if self.offload_between_phases is None:
            return self.device.startswith("cuda")
        return self.offload_between_phases


@dataclass(kw_only=True)
class PairwiseJudgeConfig:
    """An LLM judge compares responses two at a time, in both orders, and the verdicts
    become per-response scores."""

    model: Optional[str] = None
    """The judge model (an HF checkpoint directory) served by its own engine built like the
    policy's; null: the policy judges its own samples (Self-Taught-Evaluator style)."""
    score_method: str = "bradley_terry"
    """How verdicts become scores: bradley_terry or win_rate."""
    max_pairs_per_prompt: Optional[int] = None
    """Pairs judged per prompt, drawn with ``seed``; null: all K*(K-1)/2 pairs."""
    bradley_terry_prior: float = 0.5
    """Virtual wins per side of a pair."""
    seed: int = 0
    """Which pairs, when not all."""
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(
        n=1, temperature=0.0, top_p=1.0, max_new_tokens=1024))
    """How the judge writes each verdict (greedy by default)."""
    placement: str = "colocated"
    """Where the judge model's engines run (docs/rollout.md, "Where the judge runs"):
    colocated: one more engine in every trainer rank's process (HF engines only: vLLM's
    sleep-mode allocator is one per process, so two vLLM engines in one process sleep
    and wake each other's memory); separate: a ``tpo-engine --serve judge`` pool of its
    own GPUs, reached over ``bridge`` (its own port), which serves generate only."""
    bridge: BridgeConfig = field(default_factory=lambda: BridgeConfig(port=29710))
    """How trainer rank 0 reaches the judge pool (placement=separate)."""
    vllm: VLLMConfig = field(default_factory=lambda: VLLMConfig(
        gpu_memory_utilization=0.9, disable_custom_all_reduce=False))
    """The judge engine's own vLLM settings (rollout.engine=vllm picks vLLM). On GPUs of its
    own, it may take most of the memory and use vLLM's custom all-reduce: it never sleeps."""


@dataclass(kw_only=True)
class ExactAnswerJudgeConfig:
    """A rule judge for verifiable tasks: 1 for the reference answer, else 0."""

    answers_path: str = ""
    """JSONL with the instruction and its reference answer."""
    prompt_field: str = "instruction"
    """The answers file's field holding the instruction."""
    answer_field: str = "answer"
    """The answers file's field holding the reference answer."""
    answer_pattern: Optional[str] = None
    """A regex whose first group, at its last match in a response, is the answer; null: the
    whole response (case and spacing are ignored either way)."""


@dataclass(kw_only=True)
class FormatJudgeConfig:
    """A rule judge of the response's form alone."""

    pattern: str = ".+"
    """A regex the response must contain (``re.search``, ``.`` matches newlines) to score 1."""
    max_chars: Optional[int] = None
    """Longer responses score 0; null: any length."""


@dataclass(kw_only=True)
class JudgeConfig:
    """Which judge scores the responses (never the thoughts), and its options."""

    kind: str = "reward_model"
    """reward_model, pairwise, exact_answer or format: the sub-group below that is read."""
    length_control: LengthControlConfig = field(default_factory=LengthControlConfig)
    """The length control of pair selection, tuned to this judge's length bias."""
    reward_model: RewardModelJudgeConfig = field(default_factory=RewardModelJudgeConfig)
    """kind=reward_model's settings."""
    pairwise: PairwiseJudgeConfig = field(default_factory=PairwiseJudgeConfig)
    """kind=pairwise's settings."""
    exact_answer: ExactAnswerJudgeConfig = field(default_factory=ExactAnswerJudgeConfig)
    """kind=exact_answer's settings."""
    format: FormatJudgeConfig = field(default_factory=FormatJudgeConfig)
    """kind=format's settings."""

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"judge.kind={self.kind!r}: must be one of {KINDS}")
        self.length_control.validate()
        if self.kind == "reward_model":
            if not self.reward_model.path:
                raise ConfigError("judge.reward_model.path is empty")
            if self.reward_model.batch_size < 1 or self.reward_model.max_length < 1:
                raise ConfigError("judge.reward_model.batch_size and max_length must be >= 1")
        if self.kind == "pairwise":
            from megatron_tpo.judge.pairwise import SCORE_METHODS

            if self.pairwise.score_method not in SCORE_METHODS:
                raise ConfigError(f"judge.pairwise.score_method={self.pairwise.score_method!r}: "
                                  f"must be one of {SCORE_METHODS}")
            if self.pairwise.bradley_terry_prior <= 0:
                raise ConfigError("judge.pairwise.bradley_terry_prior must be > 0, or an "
                                  "undefeated response gets an infinite score")
            if self.pairwise.max_pairs_per_prompt is not None and self.pairwise.max_pairs_per_prompt < 1:
                raise ConfigError("judge.pairwise.max_pairs_per_prompt must be >= 1 or null")
            self.pairwise.sampling.validate()
            if self.pairwise.placement not in PLACEMENTS:
                raise ConfigError(f"judge.pairwise.placement={self.pairwise.placement!r}: must "
                                  f"be one of {PLACEMENTS}")
            if self.pairwise.placement == "separate" and self.pairwise.model is None:
                raise ConfigError("judge.pairwise.placement=separate needs judge.pairwise.model: "
                                  "a policy judging itself generates through its own engines")
        if self.kind == "exact_answer" and not self.exact_answer.answers_path:
            raise ConfigError("judge.exact_answer.answers_path is empty")


@contextmanager
def _named_as_judge_settings():
    """The rollout group's checks, reused for the judge's engine, naming its settings."""
    try:
        yield
    except ConfigError as error:
        raise ConfigError(re.sub(r"\brollout\.(vllm|bridge)\.", r"judge.pairwise.\1.",
                                 str(error))) from None


def judge_engine_settings(rollout: RolloutConfig, pairwise: PairwiseJudgeConfig) -> RolloutConfig:
    """The judge model's engine settings: the policy's engine kind (hf or vllm), device and
    batch size, with the judge's own placement, vLLM settings and bridge."""
    settings = replace(rollout, placement=pairwise.placement, vllm=pairwise.vllm,
                       bridge=pairwise.bridge)
    with _named_as_judge_settings():
        settings.validate()
    return settings


def check_judge_placement(judge: JudgeConfig, rollout: RolloutConfig) -> None:
    """Checks across the judge and rollout groups, before any engine is built.

    A vLLM judge engine inside the trainer's processes is refused. Beside the policy's
    colocated engine: vLLM's sleep-mode allocator (``CuMemAllocator``) is one per process,
    so either engine's ``sleep()`` unmaps the other's memory too and ``wake_up`` maps it
    back, and the second engine's start-up finds the first's memory taken (vLLM checks
    free memory against ``gpu_memory_utilization`` of the device's *total*). Without it
    (``rollout.placement=separate``), the judge engine would still claim its share of
    every trainer GPU before megatron is built. A judge pool has GPUs of its own."""
    if judge.kind != "pairwise" or judge.pairwise.model is None:
        return
    pairwise = judge.pairwise
    if pairwise.placement == "colocated" and rollout.engine == "vllm":
        why = ("would put two sleep-mode vLLM engines in one process, the policy's and the "
               "judge's (vLLM keeps one sleep-mode allocator per process: one engine's sleep "
               "unmaps the other's memory, and the second finds the first's memory taken at "
               "start-up)") if rollout.placement == "colocated" else (
              "would build a vLLM judge engine in every trainer rank's process, claiming "
              f"judge.pairwise.vllm.gpu_memory_utilization={pairwise.vllm.gpu_memory_utilization}"
              " of each trainer GPU before megatron is built")
        raise ConfigError(
            f"judge.pairwise.placement='colocated' with judge.pairwise.model={pairwise.model} "
            f"and rollout.engine=vllm {why}; serve the judge from a tpo-engine pool of its own "
            "GPUs: judge.pairwise.placement=separate (tpo-engine --serve judge; slurm/common.sh "
            "tpo_launch_judge_pool starts it)")
    judge_engine_settings(rollout, pairwise)
    if (pairwise.placement == rollout.placement == "separate"
            and (pairwise.bridge.address, pairwise.bridge.port)
            == (rollout.bridge.address, rollout.bridge.port)):
        raise ConfigError(f"judge.pairwise.bridge.port={pairwise.bridge.port} is "
                          "rollout.bridge.port at the same address: each pool needs a port of "
                          "its own on trainer rank 0")


def load_judge_config(name_or_path: Union[str, Path], **overrides) -> JudgeConfig:
    return load_group_config(JudgeConfig, "judge", name_or_path, **overrides)
