"""Score a tiny policy on held-out problems the way the TPO loop scores it.

Sample through the rollout engine, split thought from response (thought style only),
and let ``ExactAnswerJudge`` read the response: an output that does not parse scores 0.
"""

from dataclasses import dataclass
from typing import Mapping, Sequence

from megatron_tpo.data.parsing import parse_outputs
from megatron_tpo.data.config import ThoughtTemplate
from megatron_tpo.data.thought_templates import GENERIC
from megatron_tpo.judge.rules import ExactAnswerJudge
from megatron_tpo.rollout.engine import RolloutEngine, SamplingParams
from megatron_tpo.tiny.task import SumProblem
from megatron_tpo.tiny.warm_start import policy_prompt


@dataclass(frozen=True)
class PolicyScore:
    accuracy: float  # mean judged score over all samples, unparsed ones count 0
    parse_rate: float  # share of samples with exactly one response marker
    samples: int


def answer_judge(problems: Sequence[SumProblem]) -> ExactAnswerJudge:
    return judge_of_answers({p.instruction: p.answer for p in problems})


def judge_of_answers(answers: Mapping[str, str]) -> ExactAnswerJudge:
    """The judge the tiny run configures (``configs/judge/exact_answer.yaml``'s pattern),
    checking the given answer of each instruction."""
    from megatron_tpo.judge import load_judge_config

    pattern = load_judge_config("exact_answer").exact_answer.answer_pattern
    return ExactAnswerJudge(answers, pattern)


def score_policy(engine: RolloutEngine, tokenizer, problems: Sequence[SumProblem], style: str,
                 sampling: SamplingParams, template: ThoughtTemplate = GENERIC) -> PolicyScore:
    """Accuracy and parse rate of ``sampling.n`` samples per problem."""
    prompts = [policy_prompt(tokenizer, p.instruction, style, template) for p in problems]
    outputs = engine.generate(prompts, sampling)
    texts = [text for output in outputs for text in output.texts]
    if style == "thought":
        parsed, _ = parse_outputs(texts, template)
        responses = [p.response if p is not None else None for p in parsed]
    else:
        responses = texts
    # An unparsed output has no response; the empty string scores 0 under the judge.
    grouped = [[r or "" for r in responses[i * sampling.n:(i + 1) * sampling.n]]
               for i in range(len(problems))]
    judgment = answer_judge(problems).judge([p.instruction for p in problems], grouped)
    scores = [s for row in judgment.scores for s in row]
    parsed_count = sum(r is not None for r in responses)
    return PolicyScore(accuracy=sum(scores) / len(scores),
                       parse_rate=parsed_count / len(responses), samples=len(scores))
