"""``build_judge``: the one place that turns a ``JudgeConfig`` into a judge."""

import json
from typing import Dict, Optional

from megatron_tpo.data.chat import chat_prompt
from megatron_tpo.data.prompts import check_jsonl
from megatron_tpo.judge.base import Judge
from megatron_tpo.judge.config import JudgeConfig
from megatron_tpo.rollout.engine import RolloutEngine


def load_reference_answers(path: str, prompt_field: str, answer_field: str) -> Dict[str, str]:
    check_jsonl(path, prompt_field)
    check_jsonl(path, answer_field)
    with open(path, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return {record[prompt_field]: record[answer_field] for record in records}


def build_judge(config: JudgeConfig, engine: Optional[RolloutEngine] = None,
                judge_tokenizer=None, own_engine: Optional[RolloutEngine] = None,
                prompt_template: Optional[str] = None) -> Judge:
    """The configured judge; the pairwise one generates through ``engine``, its prompts in
    ``judge_tokenizer``'s chat template when one is given; ``own_engine`` is the judge
    model's own engine behind ``engine``, which the judge then sleeps, wakes and closes;
    ``prompt_template`` replaces the pairwise judge's prompt (tpo-eval's judge prompts)."""
    config.validate()
    if config.kind == "reward_model":
        from megatron_tpo.judge.reward_model import RewardModelJudge

        settings = config.reward_model
        return RewardModelJudge.from_pretrained(
            settings.path, batch_size=settings.batch_size, max_length=settings.max_length,
            device=settings.device, dtype=settings.dtype,
            trust_remote_code=settings.trust_remote_code,
            offload_between_phases=settings.offloads())
    if config.kind == "pairwise":
        from megatron_tpo.judge.pairwise import PairwiseJudge

        if engine is None:
            raise ValueError("judge.kind=pairwise needs a RolloutEngine to generate verdicts")
        format_prompt = (lambda text: text) if judge_tokenizer is None else (
            lambda text: chat_prompt(judge_tokenizer, [{"role": "user", "content": text}]))
        settings = config.pairwise
        template = {} if prompt_template is None else {"prompt_template": prompt_template}
        return PairwiseJudge(engine, settings.sampling, format_prompt=format_prompt, **template,
                             score_method=settings.score_method,
                             max_pairs_per_prompt=settings.max_pairs_per_prompt,
                             bradley_terry_prior=settings.bradley_terry_prior, seed=settings.seed,
                             own_engine=own_engine)
    if config.kind == "exact_answer":
        from megatron_tpo.judge.rules import ExactAnswerJudge

        settings = config.exact_answer
        answers = load_reference_answers(settings.answers_path, settings.prompt_field,
                                         settings.answer_field)
        return ExactAnswerJudge(answers, answer_pattern=settings.answer_pattern)
    from megatron_tpo.judge.rules import FormatJudge

    return FormatJudge(config.format.pattern, max_chars=config.format.max_chars)
