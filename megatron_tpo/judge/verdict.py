"""The pairwise judge's prompt and the verdict it must end with."""

import re
from typing import Optional

# Written for this project in the style of the Self-Taught Evaluator's pairwise prompt:
# reason first, then a verdict in a fixed form that a regular expression can find.
PAIRWISE_JUDGE_PROMPT = """Please act as an impartial judge and evaluate the quality of the \
responses provided by two AI assistants to the user question displayed below. Choose the \
assistant that follows the user's instructions and answers the user's question better. \
Consider helpfulness, relevance, accuracy, depth, creativity and level of detail. Do not let \
the order in which the responses were presented, their length, or the names of the \
assistants influence your decision. First explain your evaluation briefly, then output your \
final verdict strictly in this format: "[[A]]" if assistant A is better, "[[B]]" if \
assistant B is better.

[User Question]
{instruction}

[The Start of Assistant A's Answer]
{response_a}
[The End of Assistant A's Answer]

[The Start of Assistant B's Answer]
{response_b}
[The End of Assistant B's Answer]"""

# tpo-eval's default: written for this project in the manner of AlpacaEval's annotator
# prompt (an instruction, two unordered outputs, pick the one a person would prefer,
# answer with an identifier only), ending in the same verdict form as above.
ALPACA_EVAL_STYLE_PROMPT = """You are ranking the outputs of two AI assistants to one \
instruction, for a leaderboard that should reflect what people prefer. Read the \
instruction, then both outputs, and decide which output a careful person would rather \
receive: the one that follows the instruction more faithfully and is more helpful, \
correct and clear. The order of the outputs is arbitrary and says nothing about their \
quality; do not prefer an output for being longer.

## Instruction
{instruction}

## Output A
{response_a}

## Output B
{response_b}

## Verdict
Answer with "[[A]]" if output A is better or "[[B]]" if output B is better, and nothing \
else."""

TEMPLATE_FIELDS = ("{instruction}", "{response_a}", "{response_b}")

VERDICT_PATTERN = re.compile(r"\[\[([AB])\]\]")


def render_judge_prompt(template: str, instruction: str, response_a: str, response_b: str) -> str:
    # Plain replacement, not str.format: responses are model text full of braces.
    return (template.replace("{instruction}", instruction)
            .replace("{response_a}", response_a).replace("{response_b}", response_b))


def check_judge_template(template: str, source: str) -> None:
    """A judge prompt must show the instruction and both responses."""
    from megatron_tpo.config.errors import ConfigError

    missing = [field for field in TEMPLATE_FIELDS if field not in template]
    if missing:
        raise ConfigError(f"{source}: the judge prompt has no {', '.join(missing)} "
                          f"placeholder (it needs {', '.join(TEMPLATE_FIELDS)})")


def parse_verdict(text: str) -> Optional[str]:
    """"A" or "B" from the judge's output; ``None`` when absent or contradictory.

    A judge that names both verdicts (say, quoting the format, then deciding) is read as
    undecided rather than guessed at; such verdicts count as ties and are reported.
    """
    verdicts = set(VERDICT_PATTERN.findall(text))
    return verdicts.pop() if len(verdicts) == 1 else None
