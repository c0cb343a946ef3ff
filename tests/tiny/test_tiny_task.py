import re

import pytest

from megatron_tpo.data.parsing import parse_thought_response
from megatron_tpo.data.thought_templates import GENERIC
from megatron_tpo.tiny.evaluate import answer_judge
from megatron_tpo.tiny.task import (SumProblem, direct_demonstration, generate_problems,
                                    split_problems, thought_demonstration)


def terms_of(instruction):
    # Independent of SumProblem: read the numbers back out of the instruction text.
    match = re.fullmatch(r"What is (\d+(?: \+ \d+)+)\?", instruction)
    assert match, instruction
    return [int(x) for x in match.group(1).split(" + ")]


def test_reference_answers_are_the_sums_of_the_numbers_in_the_instruction():
    for problem in generate_problems(300, num_terms=4, seed=3):
        terms = terms_of(problem.instruction)
        assert len(terms) == 4 and all(10 <= t <= 99 for t in terms)
        assert int(problem.answer) == sum(terms)
    single = generate_problems(50, num_terms=5, seed=3, term_digits=1)
    assert all(1 <= t <= 9 for p in single for t in terms_of(p.instruction))


def test_every_column_line_is_correct_arithmetic_and_ends_in_the_answer():
    for problem in generate_problems(300, num_terms=4, seed=4) + [SumProblem((99, 99, 99, 99))]:
        lines = problem.column_sums()
        carry = 0
        for column, line in enumerate(lines):
            left, total = line.split(": ")[1].split(" = ")
            addends = [int(x) for x in left.split(" + ")]
            assert sum(addends) == int(total)
            digits = [int(str(t).zfill(2)[-1 - column]) for t in terms_of(problem.instruction)]
            assert addends == ([carry] if column else []) + digits
            carry = int(total) // 10
        ones_total = int(lines[0].rsplit(" = ", 1)[1])
        tens_total = int(lines[1].rsplit(" = ", 1)[1])
        assert str(tens_total) + str(ones_total % 10) == problem.answer
    assert SumProblem((23, 45, 17, 62)).column_sums() == ["ones: 3 + 5 + 7 + 2 = 17",
                                                         "tens: 1 + 2 + 4 + 1 + 6 = 14"]


def test_problems_repeat_for_a_seed_and_splits_share_no_instruction():
    assert generate_problems(20, 4, seed=7) == generate_problems(20, 4, seed=7)
    assert generate_problems(20, 4, seed=7) != generate_problems(20, 4, seed=8)
    splits = split_problems((500, 100, 50), num_terms=4, seed=0)
    sets = [{p.instruction for p in part} for part in (splits.sft, splits.train, splits.heldout)]
    assert [len(s) for s in sets] == [500, 100, 50]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    with pytest.raises(ValueError, match="only 81"):
        generate_problems(60, num_terms=2, seed=0, term_digits=1)


def test_demonstrations_parse_and_score_one_under_the_configured_judge():
    problems = generate_problems(40, 4, seed=1)
    judge = answer_judge(problems)
    thought_responses, direct_responses = [], []
    for problem in problems:
        parsed = parse_thought_response(thought_demonstration(problem, GENERIC), GENERIC)
        assert parsed.thought == "\n".join(problem.column_sums())
        assert parsed.response == f"The answer is {problem.answer}."
        thought_responses.append([parsed.response])
        direct_responses.append([direct_demonstration(problem)])
    instructions = [p.instruction for p in problems]
    assert judge.score(instructions, thought_responses) == [[1.0]] * 40
    assert judge.score(instructions, direct_responses) == [[1.0]] * 40
    wrong = [[f"The answer is {int(p.answer) + 1}."] for p in problems]
    assert judge.score(instructions, wrong) == [[0.0]] * 40
