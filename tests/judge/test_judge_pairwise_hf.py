"""The pairwise judge generating through the real HF engine (a tiny random judge model)."""


import pytest
import torch
from transformers import LlamaForCausalLM

from megatron_tpo.judge import build_judge, load_judge_config
from megatron_tpo.rollout import HFRolloutEngine

from tiny_hf import tiny_llama_config, tiny_tokenizer


def test_pairwise_judge_through_hf_engine():
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    engine = HFRolloutEngine(LlamaForCausalLM(tiny_llama_config(tokenizer)), tokenizer,
                             batch_size=6)
    config = load_judge_config("pairwise", pairwise={
        "score_method": "win_rate", "sampling": {"max_new_tokens": 4}})
    judge = build_judge(config, engine=engine, judge_tokenizer=tokenizer)
    responses = [["the cat", "a dog", "sun", "moon is here"], ["x", "y"]]
    judgment = judge.judge(["which is best", "pick one"], responses)

    # 4*3 + 2*1 ordered battles, each worth one win in total (a tie: half to each side),
    # and every response plays 2(K-1) games, so a prompt's win rates sum to K/2.
    assert judgment.counts["verdicts"] == 14
    assert sum(judgment.scores[0]) == pytest.approx(2.0)
    assert sum(judgment.scores[1]) == pytest.approx(1.0)
    again = build_judge(config, engine=engine, judge_tokenizer=tokenizer).judge(
        ["which is best", "pick one"], responses)
    assert again.scores == judgment.scores       # greedy verdicts are reproducible
