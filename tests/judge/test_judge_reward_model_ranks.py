"""A reward-model judge spreads its scoring over every rank of the world: each rank scores
its round-robin share of the (instruction, response) texts, every rank gets all scores
back in order, equal to one process scoring alone. Between judge phases the model waits
in host memory (``offload_between_phases``, on by default for cuda). In the loop, a
two-rank run stores the judgments one process gives on the same rollouts."""

from pathlib import Path

import pytest
import torch
from transformers import LlamaForSequenceClassification

from tiny_hf import save_classifier, tiny_llama_config, tiny_tokenizer

from megatron_tpo.judge import JudgeConfig, RewardModelJudge, build_judge
from megatron_tpo.parallel.local_launch import spawn_local
from tpo_fixtures import run_loop, stage_rows

PROMPTS = ["the cat", "write a b c", "my dog"]
RESPONSES = [["the sun is a cat", "dog", "moon moon moon"], ["a b c", "c b a !"],
             ["is my dog", "the moon", "sun", "a"]]


def judge_config(path: Path, batch_size: int) -> JudgeConfig:
    config = JudgeConfig(kind="reward_model")
    config.reward_model.path = str(path)
    config.reward_model.batch_size = batch_size
    return config


def count_scored_texts(judge: RewardModelJudge) -> list:
    """How many texts the model's forward sees, per call."""
    calls = []
    judge.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[0]),
        with_kwargs=True)
    return calls


BATCH_SIZES = (1, 2)


def _ranks_worker(rank, world_size, path):
    """Worker: for each of BATCH_SIZES, the judge's scores on this rank and the batches
    this rank scored."""
    torch.distributed.init_process_group("gloo")
    reports = {}
    for batch_size in BATCH_SIZES:
        judge = build_judge(judge_config(Path(path), batch_size))
        calls = count_scored_texts(judge)
        reports[batch_size] = judge.judge(PROMPTS, RESPONSES).scores, calls
    return reports


@pytest.fixture(scope="module")
def classifier_and_rank_reports(tmp_path_factory):
    """One reward model, and one world of two ranks judging with it at every batch size."""
    path = save_classifier(tmp_path_factory.mktemp("rm") / "rm")
    return path, spawn_local(_ranks_worker, 2, str(path))


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_two_ranks_score_what_one_process_scores_each_scoring_its_share(
        classifier_and_rank_reports, batch_size):
    path, rank_reports = classifier_and_rank_reports
    alone = build_judge(judge_config(path, batch_size))
    alone_calls = count_scored_texts(alone)
    expected = alone.judge(PROMPTS, RESPONSES).scores
    assert sum(alone_calls) == 9 and len({s for row in expected for s in row}) == 9
    reports = [report[batch_size] for report in rank_reports]
    for scores, _ in reports:
        assert [len(row) for row in scores] == [3, 2, 4]
        flat, want = sum(scores, []), sum(expected, [])
        # Float32 rounding only: the ranks run on fewer CPU threads (another reduction
        # order), and batched texts have other neighbours and padding.
        assert flat == pytest.approx(want, abs=1e-5)
    # Round-robin over the 9 texts: rank 0 scores 5, rank 1 scores 4, never all of them.
    assert [sum(calls) for _, calls in reports] == [5, 4]
    assert all(max(calls) <= batch_size for _, calls in reports)


class DeviceLog(LlamaForSequenceClassification):
    """Records where it is asked to go; a CPU machine runs the "device" as the host."""

    def __init__(self, config):
        super().__init__(config)
        self.moves = []

    def to(self, *args, **kwargs):
        device = args[0] if args else kwargs.get("device")
        if isinstance(device, (str, torch.device)):
            self.moves.append(str(device))
            return super().to("cpu")
        return super().to(*args, **kwargs)


def test_the_reward_model_waits_in_host_memory_between_judge_phases(tmp_path):
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = DeviceLog(tiny_llama_config(tokenizer, num_labels=1)).eval()
    seen_during = []
    model.register_forward_pre_hook(lambda *_: seen_during.append(list(model.moves)))
    judge = RewardModelJudge(model, tokenizer, device="cuda:0", offload_between_phases=True)
    assert model.moves == []   # built in host memory, left there
    for response in ("dog", "sun"):   # two judging phases, as the run's placement runs them
        judge.wake()
        judge.judge(["q"], [[response]])
        judge.sleep()
    # On the device for each phase's forwards, back in host memory after each phase.
    assert seen_during == [["cuda:0"], ["cuda:0", "cpu", "cuda:0"]]
    assert model.moves == ["cuda:0", "cpu", "cuda:0", "cpu"]
    kept = DeviceLog(tiny_llama_config(tokenizer, num_labels=1)).eval()
    resident = RewardModelJudge(kept, tokenizer, device="cuda:0", offload_between_phases=False)
    resident.wake()
    resident.judge(["q"], [["dog"]])
    resident.sleep()
    assert kept.moves == ["cuda:0"]   # moved once, at build, and kept there


def test_offloading_defaults_on_for_cuda_only():
    config = JudgeConfig(kind="reward_model")
    config.reward_model.device = "cuda"
    assert config.reward_model.offloads() is True
    config.reward_model.device = "cpu"
    assert config.reward_model.offloads() is False
    config.reward_model.offload_between_phases = True
    assert config.reward_model.offloads() is True


@pytest.mark.slow
def test_the_loop_spreads_reward_model_judging_over_two_ranks(tmp_path):
    path = save_classifier(tmp_path / "rm")
    run_loop(tmp_path, world_size=2, extra=[
        "judge=armorm", f"judge.reward_model.path={path}", "judge.reward_model.device=cpu",
        "judge.reward_model.dtype=float32", "judge.reward_model.trust_remote_code=false",
        "judge.reward_model.batch_size=1", "evaluation.num_prompts=0"])
    run_dir = tmp_path / "run"
    rollouts = stage_rows(run_dir, 0, "rollouts")
    stored = {(r["prompt_id"], r["sample_index"]): r["score"]
              for r in stage_rows(run_dir, 0, "judgments")}
    judged = [r for r in rollouts if r["parse_ok"] and r["finish_reason"] != "length"]
    assert len(stored) == len(judged) > 8
    alone = build_judge(judge_config(path, batch_size=1))
    for row in judged:   # what one process scores on the same rollouts
        expected = alone.score([row["instruction"]], [[row["response"]]])[0][0]
        assert stored[(row["prompt_id"], row["sample_index"])] == pytest.approx(expected,
                                                                                abs=1e-5)
