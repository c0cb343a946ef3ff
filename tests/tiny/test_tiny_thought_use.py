"""The thought-use probe tells a policy that reads its thought from one that ignores it."""

import random
import re

import pytest

from megatron_tpo.data.thought_templates import GENERIC
from megatron_tpo.rollout.engine import GenerationOutput, RolloutEngine
from megatron_tpo.tiny.task import SumProblem, generate_problems
from megatron_tpo.tiny.thought_use import column_sums_answer, forced_thought_scores
from megatron_tpo.tiny.thoughts import wrong_column_sums
from megatron_tpo.tiny.tokenizer import train_tokenizer

COLUMN_LINE = re.compile(r"^\w+: [\d +]+ = \d+$")


class AnsweringEngine(RolloutEngine):
    """Answers from the thought written into the prompt (``reads=True``: the number its
    column lines add up to, else 0) or from the instruction alone (the true sum)."""

    def __init__(self, reads: bool):
        self.reads, self.prompts = reads, []

    def answer(self, prompt: str) -> str:
        if not self.reads:
            terms = re.search(r"What is ([\d + ]+)\?", prompt).group(1).split(" + ")
            return str(sum(int(term) for term in terms))
        thought = prompt.split(GENERIC.thought_marker + "\n")[-1]
        thought = thought.split("\n" + GENERIC.response_marker)[0]
        lines = thought.split("\n")
        return column_sums_answer(thought) if all(COLUMN_LINE.match(l) for l in lines) else "0"

    def generate(self, prompts, sampling):
        self.prompts.extend(prompts)
        return [GenerationOutput(prompt=p, texts=[f"The answer is {self.answer(p)}."],
                                 num_tokens=[1]) for p in prompts]

    def update_weights(self, stream):
        raise NotImplementedError


@pytest.fixture(scope="module")
def problems():
    return generate_problems(40, num_terms=4, seed=5)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([GENERIC.prompt, "user assistant What is 12 + 34?"], vocab_size=300)


def test_the_true_column_sums_add_up_to_the_answer(problems):
    for problem in generate_problems(300, num_terms=4, seed=1):
        assert column_sums_answer("\n".join(problem.column_sums())) == problem.answer


def test_wrong_column_sums_add_up_to_another_number():
    rng = random.Random(0)
    problem = SumProblem((19, 28, 37, 46))   # ones 30, tens 1 + 1 + 2 + 3 + 4 = 13: 130
    thought = "\n".join(wrong_column_sums(problem, rng))
    ones, tens = (int(line.rsplit("= ", 1)[1]) for line in thought.split("\n"))
    assert column_sums_answer(thought) == str(tens * 10 + ones % 10) != problem.answer


def test_a_policy_that_reads_its_thought_is_right_after_the_true_sums_only(problems, tokenizer):
    engine = AnsweringEngine(reads=True)
    scores = forced_thought_scores(engine, tokenizer, problems)
    assert scores["correct"] == {"columns": 1.0, "wrong_sums": 0.0, "restate": 0.0,
                                 "unrelated": 0.0}
    assert scores["follows_wrong_sums"] == 1.0 and scores["problems"] == len(problems)
    # Each prompt is the thought prompt, the written thought, and the response marker.
    assert all(p.endswith(f"{GENERIC.response_marker}\n") for p in engine.prompts)
    assert len(engine.prompts) == 4 * len(problems)


def test_a_policy_that_ignores_its_thought_is_right_after_every_kind(problems, tokenizer):
    scores = forced_thought_scores(AnsweringEngine(reads=False), tokenizer, problems)
    assert set(scores["correct"].values()) == {1.0}
    assert scores["follows_wrong_sums"] == 0.0
