"""Tied input and output embeddings (Llama 3.2, SmolLM2) on a tiny random config.

The HF side stores one tensor and conversion writes it back that way; megatron shares
the weight (``share_embeddings_and_output_weights``), at PP=2 as two copies kept equal
through its embedding group. One spawn at TP=2/PP=2 computes a DPO step whose gradients
are compared with HF's, where the one tensor receives both gradients.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from dpo_fixtures import random_pairs
from llama_fixtures import megatron_shards, save_random_hf_llama, tiny_model_config
from megatron_tpo.config import ParallelConfig, load_model_config
from megatron_tpo.model import llama_layout as layout
from megatron_tpo.model.conversion import hf_to_mcore, mcore_to_hf
from megatron_tpo.model.hf_config import model_config_from_hf
from megatron_tpo.parallel.local_launch import spawn_local
from megatron_tpo.plan.cost.parameters import chunk_parameters, total_parameters
from megatron_tpo.train.config import DPOTrainingConfig

from tiny_hf import tiny_tokenizer

TP, PP = 2, 2
TRAINING = DPOTrainingConfig(beta=0.3, lr=1e-2, warmup_steps=0, train_steps=4,
                             micro_batch_pairs=1, pad_to_multiple_of=8, clip_grad=0.0)


def _tensors(directory):
    found = {}
    for path in sorted(directory.glob("**/*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                found[str(path.relative_to(directory)) + ":" + name] = handle.get_tensor(name)
    return found


@pytest.fixture(scope="module")
def tied_checkpoint(tmp_path_factory):
    model = tiny_model_config(tie_word_embeddings=True)
    return model, save_random_hf_llama(model, tmp_path_factory.mktemp("tied") / "hf")


def test_hf_stores_the_tied_embedding_once_and_the_config_reads_back_tied(tied_checkpoint):
    model, hf_dir = tied_checkpoint
    names = {key.split(":")[1] for key in _tensors(hf_dir)}
    assert layout.HF_EMBEDDING in names and layout.HF_OUTPUT_LAYER not in names
    raw = json.loads((hf_dir / "config.json").read_text())
    assert model_config_from_hf(raw).tie_word_embeddings is True


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
def test_round_trip_is_bit_exact_with_the_embedding_stored_once(tied_checkpoint, tmp_path,
                                                                tp, pp):
    model, hf_dir = tied_checkpoint
    mcore = hf_to_mcore(hf_dir, tmp_path / "mcore", tp, pp, make_vocab_size_divisible_by=1,
                        progress=False).destination
    mcore_names = [key.split(":")[1] for key in _tensors(tmp_path / "mcore")]
    assert mcore_names.count(layout.EMBEDDING) == tp and layout.OUTPUT_LAYER not in mcore_names
    mcore_to_hf(mcore, tmp_path / "back", progress=False)
    original = {k.split(":")[1]: t for k, t in _tensors(hf_dir).items()}
    back = {k.split(":")[1]: t for k, t in _tensors(tmp_path / "back").items()}
    assert back.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name
    assert json.loads((tmp_path / "back" / "config.json").read_text())["tie_word_embeddings"]


def test_nemo2_stores_the_tied_embedding_once_and_reads_back_bit_exact(tied_checkpoint,
                                                                        tmp_path):
    import yaml

    from megatron_tpo.model.dist_weights import DistWeightsReader
    from megatron_tpo.model.nemo import NEMO2_PREFIX, hf_to_nemo, nemo_to_hf

    model, hf_dir = tied_checkpoint
    hf_to_nemo(hf_dir, tmp_path / "nemo", progress=False)
    stored = DistWeightsReader(tmp_path / "nemo" / "weights", model.num_layers).tensors
    assert NEMO2_PREFIX + layout.EMBEDDING in stored
    assert NEMO2_PREFIX + layout.OUTPUT_LAYER not in stored
    config = yaml.safe_load((tmp_path / "nemo" / "context" / "model.yaml").read_text())
    assert config["config"]["share_embeddings_and_output_weights"] is True
    nemo_to_hf(tmp_path / "nemo", tmp_path / "back", progress=False)
    original = {k.split(":")[1]: t for k, t in _tensors(hf_dir).items()}
    back = {k.split(":")[1]: t for k, t in _tensors(tmp_path / "back").items()}
    assert back.keys() == original.keys() and layout.HF_OUTPUT_LAYER not in back
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name
    assert json.loads((tmp_path / "back" / "config.json").read_text())["tie_word_embeddings"]


def test_planner_counts_the_tied_embedding_once():
    # Published parameter counts: Llama 3.2 1B, 3B and SmolLM2-135M.
    assert total_parameters(load_model_config("llama3.2_1b")) == 1_235_814_400
    assert total_parameters(load_model_config("llama3.2_3b")) == 3_212_749_824
    assert total_parameters(load_model_config("smollm2_135m")) == 134_515_008
    model = load_model_config("llama3.2_1b")
    one_stage = [p.name for p in chunk_parameters(model, 1, 1, 1, 0)]
    last_of_two = [p.name for p in chunk_parameters(model, 1, 2, 1, 1)]
    assert "output_layer.weight" not in one_stage  # the embedding serves both
    assert "output_layer.weight" in last_of_two  # megatron's copy on the last stage


def _dpo_worker(rank, world_size, model, shard_root, pairs, hf_dir):
    from megatron.core import parallel_state
    from transformers import LlamaForCausalLM

    from megatron_tpo.model.mcore_shards import with_global_layer_numbers
    from megatron_tpo.parallel import init_megatron
    from megatron_tpo.rollout.hf_engine import HFRolloutEngine
    from megatron_tpo.train.dpo_trainer import DPOTrainer
    from megatron_tpo.train.reference_logprobs import with_reference_logprobs
    from megatron_tpo.weights import WeightSyncConfig, push_weights

    parallel = ParallelConfig(tensor_model_parallel_size=TP, pipeline_model_parallel_size=PP)
    init_megatron(parallel, model)
    trainer = DPOTrainer(model, parallel, TRAINING, shard_root)
    # A reference unlike the policy, so the loss's gradient is not zero.
    reference = torch.tensor([[0.8, -0.6], [-1.2, 0.4]], dtype=torch.float64)
    report = {"tp_rank": parallel_state.get_tensor_model_parallel_rank(),
              "metrics": trainer.step(with_reference_logprobs(pairs, reference)),
              "grads": {}, "weights": {}}
    for chunk in trainer.chunks:
        named = dict(chunk.named_parameters())
        report["grads"].update(with_global_layer_numbers(
            chunk, {n: p.main_grad.detach().clone() for n, p in named.items()}))
        report["weights"].update({n: p.detach().clone() for n, p in named.items()
                                  if n in (layout.EMBEDDING, layout.OUTPUT_LAYER)})
    # Every rank's HF engine (tied, at the old weights) gets the new ones, parity-checked.
    engine = HFRolloutEngine(LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32),
                             tiny_tokenizer())
    probes = [[1, 3, 46, 4, 32, 62, 33, 34, 63, 2, 3, 47, 4]]   # a tiny-tokenizer chat prompt
    report["sync"] = push_weights(engine, trainer.ddp_chunks, model,
                                  WeightSyncConfig(parity_tolerance=1e-4), probes)
    report["engine_embedding"] = engine.model.model.embed_tokens.weight.detach().clone()
    return report


@pytest.fixture(scope="module")
def dpo_run(tied_checkpoint, tmp_path_factory):
    model, hf_dir = tied_checkpoint
    shard_root = megatron_shards(model, hf_dir, tmp_path_factory.mktemp("tied_mcore"), TP, PP)
    pairs = random_pairs(model.vocab_size, count=2, seed=5, completion_lengths=(3, 9))
    return model, hf_dir, pairs, spawn_local(_dpo_worker, TP * PP, model, shard_root, pairs,
                                             hf_dir)


def _hf_sequence_logprobs(hf_model, prompt, completion):
    tokens = torch.tensor([list(prompt) + list(completion)])
    logprobs = F.log_softmax(hf_model(tokens).logits[0, :-1].double(), dim=-1)
    return logprobs.gather(-1, tokens[0, 1:, None])[len(prompt) - 1:, 0].sum()


@pytest.mark.slow
def test_dpo_gradients_at_tp2_pp2_equal_hf_with_both_uses_on_the_shared_weight(dpo_run):
    from transformers import LlamaForCausalLM

    model, hf_dir, pairs, reports = dpo_run
    hf_model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    assert hf_model.lm_head.weight is hf_model.model.embed_tokens.weight
    chosen = torch.stack([_hf_sequence_logprobs(hf_model, p.prompt, p.chosen) for p in pairs])
    rejected = torch.stack([_hf_sequence_logprobs(hf_model, p.prompt, p.rejected) for p in pairs])
    reference = torch.tensor([[0.8, -0.6], [-1.2, 0.4]], dtype=torch.float64)
    preference = (chosen - rejected) - (reference[:, 0] - reference[:, 1])
    loss = -F.logsigmoid(TRAINING.beta * preference).mean()
    loss.backward()
    last = [r for r in reports if "loss" in r["metrics"]]
    assert last and all(r["metrics"]["loss"] == pytest.approx(loss.item(), rel=1e-5)
                        for r in last)

    by_rank = [{} for _ in range(TP)]
    for report in reports:
        by_rank[report["tp_rank"]].update(report["grads"])
    got = layout.merge_model(by_rank, model)
    expected = {name: p.grad for name, p in hf_model.named_parameters()}
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad.float(), rtol=1e-4, atol=1e-6, msg=name)
    # The last stage's copy received the same summed gradient as the first stage's.
    copy = layout.merge_vocab([r[layout.OUTPUT_LAYER] for r in by_rank], model.vocab_size)
    torch.testing.assert_close(copy, expected[layout.HF_EMBEDDING].float(), rtol=1e-4, atol=1e-6)
    # Both uses reach it: an untied copy of the same weights splits the gradient into
    # the lookup's and the output layer's, and neither alone is the shared one.
    untied = _untied_grads(hf_dir, pairs, reference)
    both = untied[layout.HF_EMBEDDING] + untied[layout.HF_OUTPUT_LAYER]
    torch.testing.assert_close(got[layout.HF_EMBEDDING], both.float(), rtol=1e-4, atol=1e-6)
    for alone in (untied[layout.HF_EMBEDDING], untied[layout.HF_OUTPUT_LAYER]):
        assert (got[layout.HF_EMBEDDING] - alone).abs().max() > 1e-3


def _untied_grads(hf_dir, pairs, reference):
    from transformers import LlamaConfig, LlamaForCausalLM

    tied = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    config = LlamaConfig.from_pretrained(hf_dir)
    config.tie_word_embeddings = False
    untied = LlamaForCausalLM(config)
    state = dict(tied.state_dict())
    state[layout.HF_OUTPUT_LAYER] = tied.model.embed_tokens.weight.detach().clone()
    untied.load_state_dict(state)
    chosen = torch.stack([_hf_sequence_logprobs(untied, p.prompt, p.chosen) for p in pairs])
    rejected = torch.stack([_hf_sequence_logprobs(untied, p.prompt, p.rejected) for p in pairs])
    preference = (chosen - rejected) - (reference[:, 0] - reference[:, 1])
    (-F.logsigmoid(TRAINING.beta * preference).mean()).backward()
    return {name: p.grad for name, p in untied.named_parameters()}


@pytest.mark.slow
def test_one_optimizer_step_leaves_first_and_last_stage_copies_identical(dpo_run, tied_checkpoint):
    from megatron_tpo.model.hf_checkpoint import HFCheckpointReader

    reports = dpo_run[3]
    first = {r["tp_rank"]: r["weights"][layout.EMBEDDING] for r in reports
             if layout.EMBEDDING in r["weights"]}
    last = {r["tp_rank"]: r["weights"][layout.OUTPUT_LAYER] for r in reports
            if layout.OUTPUT_LAYER in r["weights"]}
    assert sorted(first) == sorted(last) == list(range(TP))
    for tp_rank in range(TP):
        assert torch.equal(first[tp_rank], last[tp_rank])
    # ...and the step did move them.
    before = HFCheckpointReader(tied_checkpoint[1]).get(layout.HF_EMBEDDING)
    merged = layout.merge_vocab([first[r] for r in range(TP)], dpo_run[0].vocab_size)
    assert (merged - before).abs().max() > 1e-4


@pytest.mark.slow
def test_weight_stream_sends_the_shared_weight_once_and_every_engine_matches(dpo_run):
    model, reports = dpo_run[0], dpo_run[3]
    first = [reports[r]["weights"][layout.EMBEDDING] for r in range(len(reports))
             if layout.EMBEDDING in reports[r]["weights"]]
    trained = layout.merge_vocab(first, model.vocab_size)
    per_layer = sum(math.prod(shape) for shape in layout.hf_layer_shapes(model).values())
    # float32: the layers, the final norm and the vocab matrix once (no lm_head).
    expected_bytes = 4 * (model.num_layers * per_layer + model.hidden_size
                          + model.vocab_size * model.hidden_size)
    for report in reports:
        assert report["sync"]["bytes"] == expected_bytes
        assert report["sync"]["max_abs_logprob_diff"] < 1e-4  # the tied lm_head moved too
        assert torch.equal(report["engine_embedding"], trained)
