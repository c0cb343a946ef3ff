"""One iteration's data, rollouts to pairs, as three stages the loop stores one by one.

    rollouts, failures = rollout_rows(instructions, outputs, template)       # parse
    judgments, counts = judge_rollouts(rollouts, judge, length_control, tok)  # responses only
    pairs, skipped = preference_pairs(rollouts, judgments, rho, preference)   # best vs worst

Each returns rows ready for ``IterationStore.write``, so a restart picks up after the
last finished stage (rollouts are stored before the judge ever runs). Only *valid*
samples are judged: parsed, and not cut at ``max_new_tokens``. Invalid ones are dropped,
or, when ``PreferenceConfig`` says so, offered as the rejected side of a pair.
"""

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

from megatron_tpo.config.errors import ConfigError
from megatron_tpo.data.parsing import ParseError, parse_thought_response
from megatron_tpo.data.storage import JudgmentRow, PairRow, RolloutRow
from megatron_tpo.data.thought_templates import ThoughtTemplate
from megatron_tpo.judge.base import Judge
from megatron_tpo.judge.config import LengthControlConfig
from megatron_tpo.preference.pairs import PromptSamples, select_pair
from megatron_tpo.rollout.engine import GenerationOutput

INVALID_SAMPLE_POLICIES = ("drop", "reject")


@dataclass
class PreferenceConfig:
    # What becomes of an output that does not follow the thought template: dropped, or
    # used as the rejected sample of its prompt (the paper does the latter).
    parse_failures: str = "drop"
    # Outputs cut at max_new_tokens are never chosen; dropped, or used as rejected.
    truncated: str = "drop"

    def validate(self) -> None:
        for name in ("parse_failures", "truncated"):
            if getattr(self, name) not in INVALID_SAMPLE_POLICIES:
                raise ConfigError(f"preference.{name}={getattr(self, name)!r}: must be one of "
                                  f"{INVALID_SAMPLE_POLICIES}")


@dataclass
class IterationData:
    rollouts: List[RolloutRow]
    judgments: List[JudgmentRow]
    pairs: List[PairRow]
    # Parse failures by reason, the judge's own counts, and skipped prompts by reason.
    counts: Counter = field(default_factory=Counter)


def response_length(response: str, unit: str, tokenizer=None) -> int:
    if unit == "chars":
        return len(response)
    if tokenizer is None:
        raise ValueError("length_control.unit=tokens needs the policy tokenizer")
    return len(tokenizer(response, add_special_tokens=False)["input_ids"])


def is_judged(row: RolloutRow) -> bool:
    return row["parse_ok"] and row["finish_reason"] != "length"


def rollout_rows(instructions: Sequence[str], outputs: Sequence[GenerationOutput],
                 template: ThoughtTemplate) -> Tuple[List[RolloutRow], Counter]:
    """``outputs[i]`` holds the K samples of ``instructions[i]``; every sample becomes a
    row with its token ids and its parse, failures counted by reason."""
    if len(instructions) != len(outputs):
        raise ValueError(f"{len(instructions)} instructions but {len(outputs)} outputs")
    rows: List[RolloutRow] = []
    failures: Counter = Counter()
    for prompt_id, (instruction, output) in enumerate(zip(instructions, outputs)):
        # Outputs built by hand (tests, external samples) may carry text only.
        token_ids = output.token_ids or [[] for _ in output.texts]
        finish_reasons = output.finish_reasons or ["stop" for _ in output.texts]
        for sample_index, text in enumerate(output.texts):
            try:
                parsed, failure = parse_thought_response(text, template), None
            except ParseError as error:
                parsed, failure = None, error.reason.value
                failures[failure] += 1
            if finish_reasons[sample_index] == "length":
                failures["truncated"] += 1
            rows.append(RolloutRow(
                prompt_id=prompt_id, sample_index=sample_index, instruction=instruction,
                prompt_text=output.prompt, prompt_token_ids=list(output.prompt_token_ids),
                output=text, output_token_ids=list(token_ids[sample_index]),
                finish_reason=finish_reasons[sample_index],
                thought=parsed.thought if parsed else None,
                response=parsed.response if parsed else None,
                parse_ok=parsed is not None, parse_failure=failure))
    return rows, failures


def by_prompt(rows: Sequence[Dict]) -> Dict[int, List[Dict]]:
    grouped: Dict[int, List[Dict]] = defaultdict(list)
    for row in rows:
        grouped[row["prompt_id"]].append(row)
    return dict(sorted(grouped.items()))


def judge_rollouts(rollouts: Sequence[RolloutRow], judge: Judge,
                   length_control: LengthControlConfig, tokenizer=None
                   ) -> Tuple[List[JudgmentRow], Counter]:
    """Score the responses (never the thoughts) of the valid samples, grouped by prompt."""
    groups = {prompt_id: [r for r in rows if is_judged(r)]
              for prompt_id, rows in by_prompt(rollouts).items()}
    instructions = [rows[0]["instruction"] for rows in by_prompt(rollouts).values()]
    judgment = judge.judge(instructions, [[r["response"] for r in g] for g in groups.values()])
    rows: List[JudgmentRow] = []
    for position_of_prompt, judged in enumerate(groups.values()):
        for position, sample in enumerate(judged):
            row = JudgmentRow(
                prompt_id=sample["prompt_id"], sample_index=sample["sample_index"],
                score=float(judgment.scores[position_of_prompt][position]),
                response_length=response_length(sample["response"], length_control.unit,
                                                tokenizer))
            row.update({name: values[position_of_prompt][position]
                        for name, values in judgment.extras.items()})
            rows.append(row)
    return rows, Counter(judgment.counts)


def _invalid_reason(row: RolloutRow, preference: PreferenceConfig):
    """Why an unjudged sample may serve as the rejected output, or None if it may not."""
    if not row["parse_ok"]:
        return "parse_failure" if preference.parse_failures == "reject" else None
    return "truncated" if preference.truncated == "reject" else None


def preference_pairs(rollouts: Sequence[RolloutRow], judgments: Sequence[JudgmentRow],
                     rho: float, preference: PreferenceConfig
                     ) -> Tuple[List[PairRow], Counter]:
    """Per prompt, the best judged sample (after length control) against the worst one, or
    against an invalid sample when ``preference`` offers those as rejected."""
    scored = by_prompt(judgments)
    pairs: List[PairRow] = []
    skipped: Counter = Counter()
    for prompt_id, samples in by_prompt(rollouts).items():
        judged = scored.get(prompt_id, [])
        rejectable = [s["sample_index"] for s in samples if not is_judged(s)
                      and _invalid_reason(s, preference)]
        pair, reason = select_pair(PromptSamples(
            prompt_id, [j["sample_index"] for j in judged], [j["score"] for j in judged],
            [j["response_length"] for j in judged]), rho, rejectable)
        if pair is None:
            skipped[reason] += 1
            continue
        by_index = {s["sample_index"]: s for s in samples}
        chosen, rejected = by_index[pair.chosen_index], by_index[pair.rejected_index]
        pairs.append(PairRow(
            prompt_id=prompt_id, instruction=chosen["instruction"],
            prompt_text=chosen["prompt_text"], prompt_token_ids=chosen["prompt_token_ids"],
            chosen=chosen["output"], rejected=rejected["output"],
            chosen_token_ids=chosen["output_token_ids"],
            rejected_token_ids=rejected["output_token_ids"],
            chosen_index=pair.chosen_index, rejected_index=pair.rejected_index,
            chosen_score=pair.chosen_score, rejected_score=pair.rejected_score,
            rejected_reason=("judged" if is_judged(rejected)
                             else _invalid_reason(rejected, preference)),
            score_margin=pair.score_margin, length_margin=pair.length_margin,
            controlled_margin=pair.controlled_margin))
    return pairs, skipped


def build_iteration_data(instructions: Sequence[str], outputs: Sequence[GenerationOutput],
                         template: ThoughtTemplate, judge: Judge,
                         length_control: LengthControlConfig, tokenizer=None,
                         preference: PreferenceConfig = PreferenceConfig()) -> IterationData:
    """All three stages at once (the loop runs them one by one to store each)."""
    rollouts, counts = rollout_rows(instructions, outputs, template)
    judgments, judge_counts = judge_rollouts(rollouts, judge, length_control, tokenizer)
    pairs, skipped = preference_pairs(rollouts, judgments, length_control.rho, preference)
    return IterationData(rollouts, judgments, pairs, counts + judge_counts + skipped)
