"""tpo-eval's work end to end on tiny random policies (HF engine): answers with their
thoughts stripped, a scripted pairwise judge that sees responses only, annotations,
metrics, both exports, and a resumed run that neither regenerates nor re-judges.

The policies are word-level and random; the thought template splits at the word "user",
so some outputs parse (a thought, then a response), some have no marker and some have
two: every kind of answer the real models give.
"""

import json
import re
from pathlib import Path

import pytest

from megatron_tpo.data.config import ThoughtTemplate
from megatron_tpo.evaluation import suite as suite_module
from megatron_tpo.evaluation.models import model_source
from megatron_tpo.evaluation.suite import EvalSuiteConfig, EvalTask, evaluate
from megatron_tpo.evaluation.winrate import win_rate
from megatron_tpo.judge.pairwise import PairwiseJudge
from megatron_tpo.rollout.config import RolloutConfig
from megatron_tpo.rollout.engine import SamplingParams

from eval_fixtures import JUDGE_PROMPT, ShorterWinsJudgeEngine, alpaca_eval_metrics
from tpo_fixtures import write_instructions, write_policy
from tiny_hf import tiny_tokenizer

TEMPLATE = ThoughtTemplate(name="user", prompt="think then answer {instruction}",
                           response_marker="user")
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("tpo_eval")
    # Seeds whose greedy outputs parse always (the reference) and about half the time.
    write_policy(root / "m0", seed=2)
    write_policy(root / "m1", seed=5)
    write_instructions(root / "mine.jsonl", 8, seed=3)
    questions = [{"question_id": f"q{i}", "category": "arena-hard-v0.1", "cluster": "c",
                  "turns": [{"content": f"the cat {i}"}]} for i in range(4)]
    (root / "question.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    return root


def _task(root, engine, **overrides):
    tokenizer = tiny_tokenizer()
    stops = [tokenizer.convert_tokens_to_ids(t) for t in (".", "!", "?")]
    settings = dict(
        model=model_source(str(root / "m1"), name="M_1"),
        reference=model_source(str(root / "m0"), name="M_0"), template=TEMPLATE,
        rollout=RolloutConfig(engine="hf", batch_size=4, sampling=SamplingParams(
            max_new_tokens=8, stop_token_ids=stops)),
        ranks_per_engine=1,
        build_judge=lambda: PairwiseJudge(engine, SamplingParams(n=1, temperature=0.0),
                                          prompt_template=JUDGE_PROMPT),
        annotator="scripted", judge_settings={"scripted": "shorter wins"})
    settings.update(overrides)
    return EvalTask(**settings)


def _config(root, out):
    return EvalSuiteConfig(sets=[f"mine={root / 'mine.jsonl'}",
                                 f"arena_hard={root / 'question.jsonl'}"],
                           out=str(out), chunk_size=4, bootstrap_rounds=10, progress=False)


@pytest.fixture(scope="module")
def evaluated(workspace, tmp_path_factory):
    """One evaluation: (summary, the judge engine, its output directory)."""
    out = tmp_path_factory.mktemp("evaluated")
    engine = ShorterWinsJudgeEngine()
    return evaluate(_config(workspace, out), _task(workspace, engine)), engine, out


def _stored(directory):
    return [row for chunk in sorted(Path(directory).glob("chunk_*"))
            for row in json.loads(chunk.read_text())]


def _copy_answers(out, destination):
    import shutil

    shutil.copytree(out / "answers", destination / "answers")


@pytest.mark.slow
def test_answers_judged_on_responses_only_scored_and_exported(evaluated):
    summary, engine, out = evaluated
    answers = _stored(out / "answers/M_1/mine")
    parsed = [a for a in answers if a["parse_ok"]]
    failed = [a for a in answers if not a["parse_ok"]]
    assert parsed and failed, "the tiny policy should give both kinds of answer"
    for answer in parsed:
        thought, response = answer["output"].split("user")
        assert (answer["thought"], answer["response"]) == (thought.strip(), response.strip())
    for answer in failed:
        assert answer["response"] is None and answer["output"].count("user") != 1

    # The judge saw both orders of every pair that both sides answered, and only the
    # responses: each segment it was shown is a parsed response, never holding the marker.
    references = {a["response"] for a in _stored(out / "answers/M_0/mine") if a["parse_ok"]}
    responses = {a["response"] for a in parsed}
    shown = [seg for p in engine.prompts for seg in re.findall(r"<[AB]>(.*?)</[AB]>", p, re.S)]
    assert shown and set(shown) <= responses | references
    assert all("user" not in seg for seg in shown)
    for answer in answers:
        assert all(answer["output"] not in p for p in engine.prompts if answer["thought"])

    rows = json.loads((out / "annotations/M_1_vs_M_0/mine/annotations.json").read_text())
    for row, answer in zip(rows, answers):
        assert row["output_2"] == (answer["response"] or "")
        if row["parse_ok_1"] and row["parse_ok_2"]:
            shorter_wins = 2.0 if len(row["output_2"]) < len(row["output_1"]) else 1.0
            assert row["preference"] == (shorter_wins if row["output_1"] != row["output_2"] else 1.5) \
                or len(row["output_2"]) == len(row["output_1"])
            assert len(row["raw_completion"]) == 2
        else:
            assert row["raw_completion"] == []
            assert row["preference"] == (1.5 if not (row["parse_ok_1"] or row["parse_ok_2"])
                                         else 2.0 if row["parse_ok_2"] else 1.0)
    metrics = summary["sets"]["mine"]
    assert metrics["win_rate"] == pytest.approx(win_rate([r["preference"] for r in rows])["win_rate"])
    assert metrics["n"] == 8 and summary["n"] == 12
    assert metrics["thoughts"]["model"]["parse_rate"] == pytest.approx(len(parsed) / 8)
    assert "reference" in metrics["thoughts"] and "bradley_terry" in metrics
    assert metrics["bradley_terry"]["lower"] <= metrics["bradley_terry"]["score"] <= metrics["bradley_terry"]["upper"]

    exported = json.loads((out / "exports/mine/M_1/model_outputs.json").read_text())
    assert [e["output"] for e in exported] == [a["response"] or "" for a in answers]
    assert {tuple(sorted(e)) for e in exported} == {("generator", "instruction", "output")}
    arena = [json.loads(line) for line in
             (out / "exports/arena_hard/model_answer/M_1.jsonl").read_text().splitlines()]
    arena_answers = _stored(out / "answers/M_1/arena_hard")
    assert [a["question_id"] for a in arena] == [f"q{i}" for i in range(4)]
    for record, answer in zip(arena, arena_answers):
        assert set(record) == {"question_id", "answer_id", "model_id", "choices", "tstamp",
                               "conv_metadata"}
        assert record["choices"][0]["turns"][0]["content"] == (answer["response"] or "")
        assert set(record["conv_metadata"]) == {"token_len", "header_count", "list_count",
                                                "bold_count"}


def test_alpaca_evals_own_code_reads_the_annotations_to_the_same_numbers(evaluated):
    summary, _, out = evaluated
    rows = json.loads((out / "annotations/M_1_vs_M_0/mine/annotations.json").read_text())
    theirs = alpaca_eval_metrics()[0].get_winrate(rows)
    assert float(theirs["win_rate"]) == pytest.approx(summary["sets"]["mine"]["win_rate"])
    assert float(theirs["standard_error"]) == pytest.approx(
        summary["sets"]["mine"]["standard_error"])


@pytest.mark.slow
def test_a_rerun_reads_answers_and_annotations_back(workspace, evaluated, tmp_path,
                                                    monkeypatch):
    import shutil

    first, _, out = evaluated
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)

    def no_engine(*args, **kwargs):
        raise AssertionError("a finished evaluation built an engine")

    monkeypatch.setattr("megatron_tpo.rollout.factory.build_rollout_engine", no_engine)
    judge_engine = ShorterWinsJudgeEngine()
    again = evaluate(_config(workspace, tmp_path), _task(workspace, judge_engine))
    assert again["sets"] == first["sets"] and judge_engine.prompts == []

    # A run killed mid-way lost its last answer chunk: only that chunk is answered again,
    # then judged again (the annotations' settings digest the answers, which are the same).
    monkeypatch.undo()
    (tmp_path / "answers/M_1/mine/chunk_00001.json").unlink()
    (tmp_path / "annotations/M_1_vs_M_0/mine/chunk_00001.json").unlink()
    generated = count_generated_prompts(monkeypatch)
    resumed = evaluate(_config(workspace, tmp_path), _task(workspace, ShorterWinsJudgeEngine()))
    assert len(generated) == 4     # items 4..7 of the set, by M_1 alone
    assert resumed["sets"] == first["sets"]


def count_generated_prompts(monkeypatch) -> list:
    """The prompts the suite hands its engines from now on (appended as they go)."""
    generated = []
    real_generate = suite_module.answer_set.__globals__["generate_on_all_ranks"]

    def counting(engine, prompts, sampling, tp):
        generated.extend(prompts)
        return real_generate(engine, prompts, sampling, tp)

    monkeypatch.setitem(suite_module.answer_set.__globals__, "generate_on_all_ranks", counting)
    return generated


def test_a_judge_that_never_gives_a_readable_verdict_is_refused(workspace, evaluated, tmp_path):
    from megatron_tpo.evaluation.annotations import UnreadableJudgeError

    _copy_answers(evaluated[2], tmp_path)     # judging only
    engine = ShorterWinsJudgeEngine(unreadable_every=1)
    with pytest.raises(UnreadableJudgeError, match=r"0 of \d+ verdicts readable.*cannot decide"):
        evaluate(_config(workspace, tmp_path), _task(workspace, engine))


@pytest.mark.slow
def test_unreadable_verdicts_are_left_out_not_counted_as_ties(workspace, evaluated, tmp_path):
    _copy_answers(evaluated[2], tmp_path)
    engine = ShorterWinsJudgeEngine(unreadable_every=2)   # every second order unreadable
    summary = evaluate(_config(workspace, tmp_path), _task(workspace, engine))
    rows = json.loads((tmp_path / "annotations/M_1_vs_M_0/mine/annotations.json").read_text())
    judged = [r for r in rows if r["raw_completion"]]
    assert judged and all(len(r["games"]) == 1 for r in judged)
    assert all(r["preference"] in (1.0, 2.0) for r in judged)
    assert summary["sets"]["mine"]["judge"]["verdicts_unreadable"] == len(judged)


def test_an_instruction_longer_than_the_context_is_a_failure_not_generated(workspace, tmp_path,
                                                                           monkeypatch):
    questions = tmp_path / "long.jsonl"
    questions.write_text(json.dumps({"instruction": "the cat"}) + "\n" +
                         json.dumps({"instruction": " ".join(["dog"] * 300)}) + "\n")
    generated = count_generated_prompts(monkeypatch)
    config = EvalSuiteConfig(sets=[f"long={questions}"], out=str(tmp_path / "out"),
                             bootstrap_rounds=0, progress=False)
    summary = evaluate(config, _task(workspace, ShorterWinsJudgeEngine()))
    answers = json.loads((tmp_path / "out/answers/M_1/long/chunk_00000.json").read_text())
    assert answers[1]["parse_failure"] == "prompt_too_long" and answers[1]["response"] is None
    assert all("dog dog dog" not in prompt for prompt in generated) and len(generated) == 2
    assert summary["sets"]["long"]["thoughts"]["model"]["prompt_too_long"] == 1
