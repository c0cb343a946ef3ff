"""The tiny run as the paper runs it: one M_0 for both arms, its thoughts never labelled,
the kinds TPO samples read back from the stored rollouts, and the multi-seed benchmark."""

import hashlib
import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from megatron_tpo.cli.tiny import apply_tiny_overrides
from megatron_tpo.data.storage import IterationStore
from megatron_tpo.tiny.assets import TinyTaskConfig, tokenizer_corpus
from megatron_tpo.tiny.report import head_to_head, sampled_iteration
from megatron_tpo.tiny.task import SumProblem, generate_problems, response_text
from megatron_tpo.tiny.thoughts import DEFAULT_MIX, THOUGHT_KINDS, classify_thought, thought_text
from megatron_tpo.tiny.tokenizer import train_tokenizer
from megatron_tpo.tiny.warm_start import policy_prompt, warm_start_data
from tiny_task_fixtures import MODEL_YAML

REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def problems():
    return generate_problems(400, num_terms=4, seed=3)


@pytest.fixture(scope="module")
def tokenizer(problems):
    return train_tokenizer(tokenizer_corpus(problems[:100]), vocab_size=400)


def test_every_kind_the_warm_start_writes_is_read_back_as_that_kind(problems):
    rng = random.Random(0)
    for problem in problems[:100]:
        for kind in THOUGHT_KINDS:
            assert classify_thought(problem, thought_text(problem, kind, rng)) == kind
    problem = SumProblem((23, 45, 17, 62))
    assert classify_thought(problem, "ones: 3 + 5 + 7 + 2 = 17\ntens: 1 + 2 + 4 + 1 + 6 = 14") \
        == "columns"
    assert classify_thought(problem, "ones: 3 + 5 + 7 + 2 = 18\ntens: 1 + 2 + 4 + 1 + 6 = 14") \
        == "wrong_sums"
    assert classify_thought(problem, "ones: 3 + 5") == "other"
    assert classify_thought(problem, "") == "none"
    assert classify_thought(problem, None) == "unparsed"
    # A wrong-sums thought never states the true column sums.
    wrong = thought_text(problem, "wrong_sums", random.Random(1)).split("\n")
    assert all(w != c for w, c in zip(wrong, problem.column_sums()))


@pytest.mark.slow
def test_no_warm_start_example_tells_which_thought_is_good(problems, tokenizer):
    data = warm_start_data(problems, tokenizer, DEFAULT_MIX, seed=0)
    thoughts = [d for d in data if d.style == "thought"]
    directs = [d for d in data if d.style == "direct"]
    assert len(thoughts) == len(directs) == len(problems)
    kinds = Counter(d.kind for d in thoughts)
    assert set(kinds) == set(THOUGHT_KINDS)
    assert all(70 <= count <= 130 for count in kinds.values()), kinds  # 0.25 of 400 each
    for item in thoughts:
        problem = SumProblem.from_instruction(item.instruction)
        # Whatever the thought, the same prompt before it and the correct answer after it.
        prompt_ids, completion_ids = item.example
        assert tokenizer.decode(prompt_ids) == policy_prompt(tokenizer, item.instruction, "thought")
        assert item.target.endswith("Here is my response:\n" + response_text(problem))
        assert tokenizer.decode(completion_ids[:-1]) == item.target
        assert classify_thought(problem, item.target.split("\n", 1)[1].rsplit(
            "\nHere is my response:", 1)[0]) == item.kind
        assert not any(word in item.target.lower() for word in ("good", "bad", "correct",
                                                               "wrong", "helpful"))
    # The share of correct answers is the same (all) for every kind.
    for kind in THOUGHT_KINDS:
        of_kind = [d for d in thoughts if d.kind == kind]
        correct = [d.target.endswith(response_text(SumProblem.from_instruction(d.instruction)))
                   for d in of_kind]
        assert sum(correct) == len(of_kind)


def test_the_mix_is_a_setting(problems, tokenizer):
    data = warm_start_data(problems[:200], tokenizer, {"columns": 3.0, "restate": 1.0}, seed=0)
    kinds = Counter(d.kind for d in data if d.style == "thought")
    assert set(kinds) == {"columns", "restate"} and 120 <= kinds["columns"] <= 180, kinds
    config = apply_tiny_overrides(TinyTaskConfig(), ["tiny.thought_mix.unrelated=0",
                                                     "tiny.sft.steps=7", "tiny.sft_size=99"])
    assert (config.thought_mix["unrelated"], config.sft.steps, config.sft_size) == (0.0, 7, 99)
    # A bad override's refusal: tests/cli/test_cli_tiny.py.


def _rollout(prompt_id, sample_index, instruction, thought, parse_ok=True):
    return {"prompt_id": prompt_id, "sample_index": sample_index, "instruction": instruction,
            "thought": thought if parse_ok else None, "response": "The answer is 1." if parse_ok
            else None, "parse_ok": parse_ok, "output_token_ids": [1, 2, 3]}


def test_kind_shares_and_scores_come_from_the_stored_rollouts(tmp_path):
    problem = SumProblem((23, 45, 17, 62))
    columns = "\n".join(problem.column_sums())
    rows = [_rollout(0, 0, problem.instruction, columns),
            _rollout(0, 1, problem.instruction, columns),
            _rollout(0, 2, problem.instruction, "We add 23, 45, 17 and 62."),
            _rollout(0, 3, problem.instruction, None, parse_ok=False)]
    store = IterationStore(tmp_path / "stages")
    store.write(0, "rollouts", rows, seed=0, config_digest="x")
    store.write(0, "judgments", [{"prompt_id": 0, "sample_index": i, "score": s,
                                  "response_length": 4} for i, s in ((0, 1.0), (1, 0.0), (2, 0.0))],
                seed=0, config_digest="x")
    record = sampled_iteration(store, 0)
    assert record["kinds"]["columns"] == 0.5 and record["kinds"]["restate"] == 0.25
    assert record["kinds"]["unparsed"] == 0.25 and record["kinds"]["wrong_sums"] == 0.0
    assert record["score_by_kind"]["columns"] == 0.5 and record["score_by_kind"]["unparsed"] == 0
    assert record["mean_thought_chars"] == pytest.approx((2 * len(columns) + 25) / 3)


def test_head_to_head_counts_wins_and_ties_on_the_same_instructions():
    first = [{"instruction": "a", "score": 1.0}, {"instruction": "b", "score": 0.0},
             {"instruction": "c", "score": 1.0}]
    second = [{"instruction": "c", "score": 1.0}, {"instruction": "b", "score": 1.0},
              {"instruction": "a", "score": 0.0}]
    assert head_to_head(first, second) == pytest.approx((1 + 0 + 0.5) / 3)


def short_overrides(tmp_path: Path):
    model = tmp_path / "test_tiny.yaml"
    model.write_text(MODEL_YAML)
    return [f"tiny.model={model}", "tiny.sft_size=48", "tiny.sft.steps=2",
            "tiny.sft.batch_size=4", "tiny.sft.warmup_steps=1", "tiny.tokenizer_vocab_size=400",
            "model.num_layers=1", "model.hidden_size=32", "model.ffn_hidden_size=64",
            "model.num_attention_heads=4", "model.num_query_groups=2",
            "model.max_position_embeddings=256", "run.iterations=1",
            "prompts.prompts_per_iteration=4", "evaluation.num_prompts=4",
            "rollout.sampling.n=2", "rollout.sampling.max_new_tokens=8", "rollout.batch_size=8",
            "run.pairs_per_step=2", "train.train_steps=1", "train.micro_batch_pairs=1",
            "run.tensorboard=false"]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """benchmarks/tiny_seeds.py over one seed of a one-iteration tiny run."""
    tmp_path = tmp_path_factory.mktemp("seeds")
    result = subprocess.run(
        [sys.executable, str(REPOSITORY / "benchmarks" / "tiny_seeds.py"), "--seed-list", "0",
         "--root", str(tmp_path / "runs"), "--", *short_overrides(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=REPOSITORY)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp_path / "runs" / "seed_0", result.stdout


@pytest.mark.slow
def test_both_arms_start_from_byte_identical_m0_weights(short_run):
    seed_root, _ = short_run
    policies = {}
    for arm in ("tpo", "baseline"):
        # The M_0 each run loaded, as its run directory records it.
        fields = json.loads((seed_root / arm / "config_digest.json").read_text())["fields"]
        policy = Path(fields["run"]["policy"])
        policies[arm] = hashlib.sha256((policy / "model.safetensors").read_bytes()).hexdigest()
    assert policies["tpo"] == policies["baseline"]
    assert fields["run"]["policy"].endswith("assets/policy")
    summary = json.loads((seed_root / "summary.json").read_text())
    assert summary["tpo"]["thought"] == "generic" and summary["baseline"]["thought"] == "direct"
    # M_0 held-out answers of both arms: the same instructions, each arm's own prompt.
    tpo0 = IterationStore(seed_root / "tpo" / "stages").read(0, "heldout")
    base0 = IterationStore(seed_root / "baseline" / "stages").read(0, "heldout")
    assert [r["instruction"] for r in tpo0] == [r["instruction"] for r in base0]


@pytest.mark.slow
def test_summary_kinds_are_those_of_the_stored_rollouts(short_run):
    seed_root, _ = short_run
    summary = json.loads((seed_root / "summary.json").read_text())
    for arm in ("tpo", "baseline"):
        stored = sampled_iteration(IterationStore(seed_root / arm / "stages"), 0)
        assert summary[arm]["sampled"][0]["kinds"] == stored["kinds"]
        assert len(summary[arm]["heldout"]) == 2  # M_0 and M_1
    assert summary["baseline"]["sampled"][0]["kinds"]["none"] + \
        summary["baseline"]["sampled"][0]["kinds"]["unparsed"] == 1.0
    assert len(summary["tpo_vs_baseline_win_rate"]) == 2
    assert (seed_root / "tpo_vs_baseline.png").stat().st_size > 10_000


@pytest.mark.slow
def test_the_multi_seed_benchmark_ends_with_its_json(short_run):
    seed_root, stdout = short_run
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["seeds"] == [0]
    summary = json.loads((seed_root / "summary.json").read_text())
    assert result["tpo_final"] == [summary["tpo"]["heldout_score"][-1]]
    assert result["baseline_final"] == [summary["baseline"]["heldout_score"][-1]]
    assert result["tpo_m0"] == [summary["tpo"]["heldout_score"][0]]
    assert len(result["tpo_scores"][0]) == 2 and len(result["columns_share"][0]) == 1
    assert "TPO (thought prompt): held-out score per iteration over 1 seed(s)" in stdout
    # Whether M_0's response reads a thought written for it, on the run's held-out problems.
    thought_use = summary["m0"]["thought_use"]
    assert result["m0_thought_use"] == [thought_use]
    assert thought_use["problems"] == 4
    assert set(thought_use["correct"]) == {"columns", "wrong_sums", "restate", "unrelated"}
    assert "M_0 given a thought, share of right answers over 1 seed(s):" in stdout
