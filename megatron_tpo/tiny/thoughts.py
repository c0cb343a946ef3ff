"""The kinds of thought M_0 is shown, none of them labelled, and how to tell them apart later.

M_0's warm start writes the thought format with thoughts of mixed kinds, every one of
them followed by the correct answer, so nothing in its data says which kind helps:

    columns     ones: 3 + 5 + 7 + 2 = 17 / tens: 1 + 2 + 4 + 1 + 6 = 14   (helps: the
                answer can be read off the last line)
    wrong_sums  the same layout with every column total off by 1 to 3     (misleads)
    restate     We add 23, 45, 17 and 62.                                 (useless)
    unrelated   one or two sentences that have nothing to do with the sum (useless)

TPO has to find that ``columns`` pays from the judge's scores of the responses alone;
``classify_thought`` reads back which kind a sampled thought is, from its text and the
instruction, so shares per iteration can be computed from the stored rollouts.
"""

import random
import re
from typing import Dict, List, Mapping, Optional

from megatron_tpo.config import ConfigError
from megatron_tpo.tiny.task import SumProblem

THOUGHT_KINDS = ("columns", "wrong_sums", "restate", "unrelated")
# What a sampled thought can be classified as: a warm-start kind, or none of them.
# "none": an empty thought (what every direct-prompt output has).
CLASSIFIED_KINDS = THOUGHT_KINDS + ("other", "none", "unparsed")
DEFAULT_MIX = {kind: 0.25 for kind in THOUGHT_KINDS}

UNRELATED_SENTENCES = (
    "The weather is mild today.",
    "I like quiet mornings.",
    "Trains leave on time here.",
    "A cat sleeps on the mat.",
    "The river runs to the sea.",
    "Blue is a calm colour.",
)

_COLUMN_LINE = re.compile(r"^(\w+): (\d+(?: \+ \d+)*) = (\d+)$")


def validate_mix(mix: Mapping[str, float]) -> None:
    for kind, weight in mix.items():
        if kind not in THOUGHT_KINDS:
            raise ConfigError(f"tiny.thought_mix.{kind}={weight}: no such thought kind; kinds: "
                              f"{', '.join(THOUGHT_KINDS)}")
        if not weight >= 0:
            raise ConfigError(f"tiny.thought_mix.{kind}={weight}: must be >= 0")
    if sum(mix.values()) <= 0:
        raise ConfigError(f"tiny.thought_mix={dict(mix)}: the weights must not all be 0")


def draw_kind(mix: Mapping[str, float], rng: random.Random) -> str:
    kinds = [kind for kind in THOUGHT_KINDS if mix.get(kind, 0) > 0]
    return rng.choices(kinds, weights=[mix[kind] for kind in kinds])[0]


def wrong_column_sums(problem: SumProblem, rng: random.Random) -> List[str]:
    """Column addition whose every total is off by 1 to 3 (never below the true digits'
    reach of 0), the carry into the next column following the written total: a thought
    that reads like ``columns`` and leads to a wrong number."""
    def missed(true_total: int) -> int:
        offsets = [d for d in (-3, -2, -1, 1, 2, 3) if true_total + d >= 0]
        return true_total + rng.choice(offsets)

    return problem.column_sums(missed)


def restatement(problem: SumProblem) -> str:
    terms = [str(term) for term in problem.terms]
    return f"We add {', '.join(terms[:-1])} and {terms[-1]}."


def thought_text(problem: SumProblem, kind: str, rng: random.Random) -> str:
    if kind == "columns":
        return "\n".join(problem.column_sums())
    if kind == "wrong_sums":
        return "\n".join(wrong_column_sums(problem, rng))
    if kind == "restate":
        return restatement(problem)
    if kind == "unrelated":
        return " ".join(rng.sample(UNRELATED_SENTENCES, rng.randint(1, 2)))
    raise ConfigError(f"thought kind {kind!r}: must be one of {', '.join(THOUGHT_KINDS)}")


def classify_thought(problem: SumProblem, thought: Optional[str]) -> str:
    """Which kind ``thought`` (None: the output did not parse) is for ``problem``."""
    if thought is None:
        return "unparsed"
    text = thought.strip()
    if not text:
        return "none"
    if text == "\n".join(problem.column_sums()):
        return "columns"
    lines = text.split("\n")
    if lines and all(_COLUMN_LINE.match(line) for line in lines):
        return "wrong_sums"  # the column layout, but not the true column sums
    if text.startswith("We add "):
        return "restate"
    sentences = re.findall(r"[^.]+\.", text)
    if sentences and "".join(sentences).replace(" ", "") == text.replace(" ", "") and all(
            sentence.strip() in UNRELATED_SENTENCES for sentence in sentences):
        return "unrelated"
    return "other"


def kind_shares(kinds: List[str]) -> Dict[str, float]:
    """Share of each classified kind (all of CLASSIFIED_KINDS, zeros included)."""
    count = max(len(kinds), 1)
    return {kind: sum(k == kind for k in kinds) / count for kind in CLASSIFIED_KINDS}
