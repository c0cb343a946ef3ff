"""The tiny run's task: add a few two-digit numbers, where writing running sums helps.

A tiny model does not learn to add four two-digit numbers in one step (the tens and
hundreds digits depend on the carry out of the ones column), but it does learn to add a
short column of single digits. So a policy that writes column addition in its thought
should beat one that answers at once, and the rule judge (``ExactAnswerJudge``) can
score the stated answer exactly.

Example (four terms)::

    instruction: What is 23 + 45 + 17 + 62?
    thought:     ones: 3 + 5 + 7 + 2 = 17
                 tens: 1 + 2 + 4 + 1 + 6 = 14
    response:    The answer is 147.
"""

import random
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

from megatron_tpo.data.config import ThoughtTemplate


@dataclass(frozen=True)
class SumProblem:
    terms: Tuple[int, ...]

    @classmethod
    def from_instruction(cls, instruction: str) -> "SumProblem":
        """The problem ``instruction`` states (the inverse of ``instruction``)."""
        if not (instruction.startswith("What is ") and instruction.endswith("?")):
            raise ValueError(f"not a tiny sum instruction: {instruction!r}")
        return cls(tuple(int(term) for term in instruction[len("What is "):-1].split(" + ")))

    @property
    def instruction(self) -> str:
        return "What is " + " + ".join(str(term) for term in self.terms) + "?"

    @property
    def answer(self) -> str:
        return str(sum(self.terms))

    def column_sums(self, written_total: Callable[[int], int] = lambda total: total
                    ) -> List[str]:
        """Column addition, ones first: each line adds one column's digits (after the carry
        from the column before) and the last line's total heads the answer.

        ``written_total`` turns each column's true total into the one written, which the
        carry into the next column follows (the wrong-sums thought misses them).
        """
        width = max(len(str(term)) for term in self.terms)
        lines, carry = [], 0
        for column in range(width):
            digits = [term // 10 ** column % 10 for term in self.terms]
            addends = ([carry] if column else []) + digits
            total = written_total(sum(addends))
            lines.append(f"{_column_name(column)}: {' + '.join(map(str, addends))} = {total}")
            carry = total // 10
        return lines


COLUMN_NAMES = ("ones", "tens", "hundreds", "thousands")


def _column_name(column: int) -> str:
    return COLUMN_NAMES[column] if column < len(COLUMN_NAMES) else f"column {column + 1}"


@dataclass(frozen=True)
class ProblemSplits:
    """Disjoint instruction sets: warm start (SFT), TPO training prompts, held-out eval."""

    sft: List[SumProblem]
    train: List[SumProblem]
    heldout: List[SumProblem]


def response_text(problem: SumProblem) -> str:
    """The response the judge reads; ``answer is X`` is what its default pattern captures."""
    return f"The answer is {problem.answer}."


def direct_demonstration(problem: SumProblem) -> str:
    return response_text(problem)


def thought_lead(template: ThoughtTemplate, thought: str) -> str:
    """A completion up to where its response starts: the thought between the markers."""
    return f"{template.thought_marker}\n{thought}\n{template.response_marker}\n"


def thought_demonstration(problem: SumProblem, template: ThoughtTemplate,
                          thought: Optional[str] = None) -> str:
    """Thought (the column sums unless given) then response, in the exact layout
    ``parse_thought_response`` splits."""
    thought = "\n".join(problem.column_sums()) if thought is None else thought
    return thought_lead(template, thought) + response_text(problem)


def generate_problems(count: int, num_terms: int, seed: int,
                      term_digits: int = 2) -> List[SumProblem]:
    """``count`` distinct problems of ``num_terms`` terms with ``term_digits`` digits each
    (1 to 9 for one digit), the same for a seed."""
    low, high = (1, 9) if term_digits == 1 else (10 ** (term_digits - 1), 10 ** term_digits - 1)
    space = (high - low + 1) ** num_terms
    if count > space // 2:
        raise ValueError(f"{count} distinct problems asked for, but {num_terms} terms of "
                         f"{term_digits} digit(s) give only {space}; ask for fewer")
    rng = random.Random(seed)
    seen, problems = set(), []
    while len(problems) < count:
        terms = tuple(rng.randint(low, high) for _ in range(num_terms))
        if terms not in seen:
            seen.add(terms)
            problems.append(SumProblem(terms))
    return problems


def split_problems(sizes: Sequence[int], num_terms: int, seed: int,
                   term_digits: int = 2) -> ProblemSplits:
    """SFT, train and held-out sets of the given sizes, with no instruction in two sets."""
    sft_size, train_size, heldout_size = sizes
    problems = generate_problems(sft_size + train_size + heldout_size, num_terms, seed,
                                 term_digits)
    return ProblemSplits(sft=problems[:sft_size],
                         train=problems[sft_size:sft_size + train_size],
                         heldout=problems[sft_size + train_size:])
