"""A clipped DPO step, and the metrics a step reports, against hand-made references.

One spawn of four gloo processes (TP=2, two data-parallel replicas with two pairs each)
takes one step with ``clip_grad`` well below the gradient norm. HF transformers and a
plain ``torch.nn.utils.clip_grad_norm_`` on the same weights and pairs give the
pre-clip norm the step must report and the clipped gradients Adam must have stepped
with; ``tokens_per_second`` times ``seconds`` must be the token count worked out below.
"""

import pytest
import torch
import torch.nn.functional as F

from llama_fixtures import megatron_shards, save_random_hf_llama, tiny_model_config
from megatron_tpo.config import ParallelConfig
from megatron_tpo.model import llama_layout as layout
from megatron_tpo.parallel.local_launch import spawn_local
from megatron_tpo.train.config import DPOTrainingConfig
from megatron_tpo.train.dpo_batch import TokenizedPair

pytestmark = pytest.mark.slow

TP, DP = 2, 2
# The pre-clip gradient norm of this step is about 5; clipping to 1 scales every
# gradient by about 1/5.
CLIPPED = DPOTrainingConfig(beta=0.3, lr=1e-3, warmup_steps=0, train_steps=4,
                            micro_batch_pairs=1, pad_to_multiple_of=8, clip_grad=1.0)
# Prompt, chosen, rejected lengths: tokens per pair = 2 * prompt + chosen + rejected.
#   DP rank 0: 2*3 + 4 + 2 = 12 and 2*5 + 1 + 6 = 17        -> 29
#   DP rank 1: 2*2 + 7 + 3 = 14 and 2*4 + 5 + 5 = 18        -> 32
# Every rank reports all DP ranks' tokens: 61; padding (to 8 or 16) is not counted.
PAIRS = [
    TokenizedPair(prompt=[11, 12, 13], chosen=[21, 22, 23, 24], rejected=[31, 32]),
    TokenizedPair(prompt=[14, 15, 16, 17, 18], chosen=[25], rejected=[33, 34, 35, 36, 37, 38]),
    TokenizedPair(prompt=[41, 42], chosen=[51, 52, 53, 54, 55, 56, 57], rejected=[61, 62, 63]),
    TokenizedPair(prompt=[43, 44, 45, 46], chosen=[58, 59, 60, 64, 65],
                  rejected=[66, 67, 68, 69, 70]),
]
TOKENS_OF_ALL_DP_RANKS = 61
# Added to the reference log-probs so the pairs' preferences differ in sign and size.
REFERENCE_SHIFT = torch.tensor([[0.7, -0.4], [-1.1, 0.2], [0.3, 0.9], [-0.5, -1.3]],
                               dtype=torch.float64)


def _clipped_step_worker(rank, world_size, model, shard_root):
    from megatron.core import parallel_state

    from megatron_tpo.parallel import init_megatron, shutdown_megatron
    from megatron_tpo.train.dpo_trainer import DPOTrainer
    from megatron_tpo.train.reference_logprobs import with_reference_logprobs

    parallel = ParallelConfig(tensor_model_parallel_size=TP)
    init_megatron(parallel, model)
    dp_rank = parallel_state.get_data_parallel_rank()
    share = slice(2 * dp_rank, 2 * dp_rank + 2)
    trainer = DPOTrainer(model, parallel, CLIPPED, shard_root)
    reference = trainer.reference_logprobs(PAIRS[share]) + REFERENCE_SHIFT[share]
    metrics = trainer.step(with_reference_logprobs(PAIRS[share], reference))
    chunk = trainer.chunks[0]
    # The optimizer clips main_grad in place (param.grad is main_grad), so after the
    # step it holds the gradients Adam stepped with.
    report = {"tp_rank": parallel_state.get_tensor_model_parallel_rank(), "dp_rank": dp_rank,
              "metrics": metrics, "reference": reference,
              "grads": {name: p.main_grad.detach().clone()
                        for name, p in chunk.named_parameters()}}
    shutdown_megatron()
    return report


@pytest.fixture(scope="module")
def clipped_step(tmp_path_factory):
    model = tiny_model_config()
    hf_dir = save_random_hf_llama(model, tmp_path_factory.mktemp("clip") / "hf", seed=4)
    shard_root = megatron_shards(model, hf_dir, tmp_path_factory.mktemp("clip_tp2"), TP, 1)
    reports = spawn_local(_clipped_step_worker, TP * DP, model, shard_root)
    return model, hf_dir, reports


def _hf_sequence_logprob(hf_model, prompt, completion):
    tokens = torch.tensor([list(prompt) + list(completion)])
    logprobs = F.log_softmax(hf_model(tokens).logits[0, :-1].double(), dim=-1)
    return logprobs.gather(-1, tokens[0, 1:, None])[len(prompt) - 1:, 0].sum()


@pytest.fixture(scope="module")
def hf_reference(clipped_step):
    """HF's DPO gradients on all four pairs, their norm, and plain torch clipping."""
    from transformers import LlamaForCausalLM

    model, hf_dir, reports = clipped_step
    hf_model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    reference = torch.cat([r["reference"] for r in sorted(reports, key=lambda r: r["dp_rank"])
                           if r["tp_rank"] == 0])
    chosen = torch.stack([_hf_sequence_logprob(hf_model, p.prompt, p.chosen) for p in PAIRS])
    rejected = torch.stack([_hf_sequence_logprob(hf_model, p.prompt, p.rejected) for p in PAIRS])
    preference = (chosen - rejected) - (reference[:, 0] - reference[:, 1])
    # DDP averages the DP ranks' gradients of their mean losses: the mean over all pairs.
    (-F.logsigmoid(CLIPPED.beta * preference)).mean().backward()
    raw = {name: p.grad.clone() for name, p in hf_model.named_parameters()}
    norm = torch.nn.utils.clip_grad_norm_(hf_model.parameters(), CLIPPED.clip_grad).item()
    clipped = {name: p.grad for name, p in hf_model.named_parameters()}
    return raw, norm, clipped


def _megatron_grads_in_hf_layout(reports, model):
    by_tp_rank = [{} for _ in range(TP)]
    for report in reports:
        if report["dp_rank"] == 0:
            by_tp_rank[report["tp_rank"]].update(report["grads"])
    return layout.merge_model(by_tp_rank, model)


def test_clipped_step_reports_the_pre_clip_norm_of_hf_gradients(clipped_step, hf_reference):
    raw, norm, _ = hf_reference
    assert norm > 2 * CLIPPED.clip_grad, f"norm {norm}: clipping would barely act"
    # float32 sums over ~10^5 gradients: the norms agree to about 3e-5.
    exact = torch.cat([g.double().flatten() for g in raw.values()]).norm().item()
    assert norm == pytest.approx(exact, rel=1e-4)
    for report in clipped_step[2]:  # every rank reports the whole model's norm
        assert report["metrics"]["grad_norm"] == pytest.approx(exact, rel=1e-4)
        assert report["metrics"]["update_successful"] == 1.0


def test_clipped_step_steps_with_gradients_rescaled_to_the_clip_norm(clipped_step,
                                                                    hf_reference):
    model, _, reports = clipped_step
    raw, norm, clipped = hf_reference
    got = _megatron_grads_in_hf_layout(reports, model)
    assert got.keys() == clipped.keys()
    scale = CLIPPED.clip_grad / norm
    for name, grad in clipped.items():
        assert grad.abs().max() > 0, f"{name}: zero gradient, the test would prove nothing"
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6 * scale, msg=name)
    total = torch.cat([g.flatten() for g in got.values()]).norm().item()
    assert total == pytest.approx(CLIPPED.clip_grad, rel=1e-4)
    # DP replicas stepped with the same clipped gradients.
    for report in reports:
        twin = next(r for r in reports if r["tp_rank"] == report["tp_rank"] and r is not report)
        for name, grad in report["grads"].items():
            torch.testing.assert_close(grad, twin["grads"][name], rtol=0, atol=0)


def test_tokens_per_second_counts_every_dp_ranks_prompt_and_completion_tokens(clipped_step):
    assert sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected)
               for p in PAIRS) == TOKENS_OF_ALL_DP_RANKS
    for report in clipped_step[2]:
        metrics = report["metrics"]
        assert metrics["seconds"] > 0
        assert metrics["tokens_per_second"] * metrics["seconds"] == pytest.approx(
            TOKENS_OF_ALL_DP_RANKS, rel=1e-9)
