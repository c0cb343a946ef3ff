"""tpo-eval's answers through the real vLLM (its CPU build, ``make test-vllm``): the same
greedy answers as the HF engine, one process or two engine replicas under a gloo world,
the second model's weights streamed into the engine the first one started (vLLM's
in-place reload), and the thoughts stripped before the judge.

Skipped where vLLM is not installed (the main venv)."""

import json
from pathlib import Path

import pytest

pytest.importorskip("vllm")
# vLLM's CPU build frees its shared memory only at interpreter exit: spawned ranks.
pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("spawned_ranks")]

from megatron_tpo.parallel.local_launch import spawn_local  # noqa: E402

from eval_fixtures import JUDGE_PROMPT, ShorterWinsJudgeEngine
from llama_fixtures import save_random_hf_llama, tiny_model_config
from tiny_hf import tiny_tokenizer
from tpo_fixtures import write_instructions

MARKER = "user"


def _policy(directory: Path, seed: int) -> Path:
    # Head size 32: the CPU attention backend's smallest (the tiny config's is 16).
    model = tiny_model_config(hidden_size=128, vocab_size=len(tiny_tokenizer()))
    save_random_hf_llama(model, directory, seed=seed)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def _evaluate(rank, world_size, root, engine_kind, out):
    from megatron_tpo.cli.eval import start_world
    from megatron_tpo.data.config import ThoughtTemplate
    from megatron_tpo.evaluation.models import model_source
    from megatron_tpo.evaluation.suite import EvalSuiteConfig, EvalTask, evaluate
    from megatron_tpo.judge.pairwise import PairwiseJudge
    from megatron_tpo.rollout.config import RolloutConfig, VLLMConfig
    from megatron_tpo.rollout.engine import SamplingParams

    vllm = VLLMConfig(dtype="float32", sleep_mode=False, kv_cache_memory_bytes=64 << 20,
                      enforce_eager=True, max_model_len=256)
    judge_engine = ShorterWinsJudgeEngine()
    task = EvalTask(
        model=model_source(str(root / "m1"), name="M_1"),
        reference=model_source(str(root / "m0"), name="M_0"),
        template=ThoughtTemplate(name="user", prompt="think then answer {instruction}",
                                 response_marker=MARKER),
        rollout=RolloutConfig(engine=engine_kind, vllm=vllm, batch_size=8,
                              sampling=SamplingParams(max_new_tokens=8)),
        ranks_per_engine=1, annotator="scripted", judge_settings={},
        build_judge=lambda: PairwiseJudge(judge_engine, SamplingParams(n=1, temperature=0.0),
                                          prompt_template=JUDGE_PROMPT))
    config = EvalSuiteConfig(sets=[f"mine={root / 'mine.jsonl'}"], out=str(root / out),
                             chunk_size=3, bootstrap_rounds=5, progress=False)
    start_world()     # as tpo-eval does under torchrun or srun
    summary = evaluate(config, task)
    return summary, judge_engine.prompts


def _answers(root, out, model):
    return [row for chunk in sorted((root / out / "answers" / model / "mine").glob("chunk_*"))
            for row in json.loads(chunk.read_text())]


def test_vllm_answers_equal_the_hf_engines_and_reach_the_judge_as_responses(tmp_path):
    _policy(tmp_path / "m0", seed=1)
    _policy(tmp_path / "m1", seed=2)
    write_instructions(tmp_path / "mine.jsonl", 6, seed=3)
    hf_summary, _ = spawn_local(_evaluate, 1, tmp_path, "hf", "hf")[0]
    vllm_summary, prompts = spawn_local(_evaluate, 1, tmp_path, "vllm", "vllm")[0]
    two_replicas = spawn_local(_evaluate, 2, tmp_path, "vllm", "vllm_two")
    for model in ("M_0", "M_1"):
        outputs = [row["output"] for row in _answers(tmp_path, "hf", model)]
        assert [row["output"] for row in _answers(tmp_path, "vllm", model)] == outputs
        assert [row["output"] for row in _answers(tmp_path, "vllm_two", model)] == outputs
    # M_0's answers differ from M_1's: the second model's weights did reach the engine.
    assert [r["output"] for r in _answers(tmp_path, "vllm", "M_0")] != \
        [r["output"] for r in _answers(tmp_path, "vllm", "M_1")]
    def stored(out):
        return json.loads((tmp_path / out / "summary.json").read_text())["sets"]

    assert stored("vllm") == stored("hf") == stored("vllm_two")
    assert vllm_summary["sets"] == hf_summary["sets"] == two_replicas[0][0]["sets"]
    assert two_replicas[1][0] is None    # rank 0 reports, and writes
    assert all(MARKER not in prompt.split("\n", 1)[1] for prompt in prompts)
