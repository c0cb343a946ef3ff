"""Judges: ``score(prompts, responses) -> scores`` for responses only, never thoughts."""

from megatron_tpo.judge.base import Judge, Judgment
from megatron_tpo.judge.config import (ExactAnswerJudgeConfig, FormatJudgeConfig, JudgeConfig,
                                       LengthControlConfig, PairwiseJudgeConfig,
                                       RewardModelJudgeConfig, load_judge_config)
from megatron_tpo.judge.factory import build_judge
from megatron_tpo.judge.pairwise import PairwiseJudge
from megatron_tpo.judge.reward_model import RewardModelJudge, reward_from_output
from megatron_tpo.judge.rules import ExactAnswerJudge, FormatJudge
from megatron_tpo.judge.tournament import bradley_terry, win_rates
from megatron_tpo.judge.verdict import PAIRWISE_JUDGE_PROMPT, parse_verdict

__all__ = [
    "ExactAnswerJudge", "ExactAnswerJudgeConfig", "FormatJudge", "FormatJudgeConfig", "Judge",
    "JudgeConfig", "Judgment", "LengthControlConfig", "PAIRWISE_JUDGE_PROMPT", "PairwiseJudge",
    "PairwiseJudgeConfig", "RewardModelJudge", "RewardModelJudgeConfig", "bradley_terry",
    "build_judge", "load_judge_config", "parse_verdict", "reward_from_output", "win_rates",
]
