"""The DPO trainer equals an independent HF reference, and learns.

Two layouts of four gloo processes: TP=2/PP=2, and TP=1/PP=2 with two virtual stages
per rank and two data-parallel replicas (each with its own half of the pairs; and the
loop's way, all pairs on every rank and each replica computing half of their reference
log-probs). One spawn
per layout serves every multi-process assertion: it computes the reference log-probs,
trains a few steps, then builds a second trainer from the same weights for one step
whose gradients are compared with HF transformers.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from dpo_fixtures import random_pairs
from llama_fixtures import megatron_shards, save_random_hf_llama, tiny_model_config
from megatron_tpo.config import ConfigError, ParallelConfig
from megatron_tpo.model import llama_layout as layout
from megatron_tpo.model.llama import transformer_engine_available
from megatron_tpo.parallel.local_launch import spawn_local
from megatron_tpo.train.config import DPOTrainingConfig, FP8Config
from megatron_tpo.train.dpo_batch import TokenizedPair
from megatron_tpo.train.fp8 import check_fp8_settings, transformer_config_fields

# (tensor, pipeline, virtual pipeline, data) parallel sizes; four processes each.
LAYOUTS = {"tp2_pp2": (2, 2, None, 1), "tp1_pp2_vpp2_dp2": (1, 2, 2, 2)}
# One pair per micro-batch: 4 / DP micro-batches per step, at least PP of them, as the
# interleaved schedule needs.
LEARNING = DPOTrainingConfig(beta=0.5, lr=2e-3, warmup_steps=2, train_steps=8,
                             micro_batch_pairs=1, pad_to_multiple_of=8, clip_grad=0.0,
                             recompute_granularity="selective")
# Label smoothing and a reference that disagrees with the policy make every term of the
# loss matter; full recomputation reruns the layers in backward.
PARITY = DPOTrainingConfig(beta=0.3, label_smoothing=0.1, lr=1e-3, warmup_steps=0,
                           train_steps=8, micro_batch_pairs=1, pad_to_multiple_of=8,
                           clip_grad=0.0, recompute_granularity="full")
LEARNING_STEPS = 5


def _trainer_worker(rank, world_size, model, shard_root, layout_sizes, all_pairs,
                    all_reference_shifts):
    from megatron.core import parallel_state

    from megatron_tpo.model.mcore_shards import with_global_layer_numbers
    from megatron_tpo.parallel import init_megatron
    from megatron_tpo.train.dpo_trainer import DPOTrainer
    from megatron_tpo.train.reference_logprobs import with_reference_logprobs

    tp, pp, vpp, _ = layout_sizes
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              virtual_pipeline_model_parallel_size=vpp)
    init_megatron(parallel, model)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    share = len(all_pairs) // dp_size
    pairs = all_pairs[dp_rank * share:(dp_rank + 1) * share]
    reference_shift = all_reference_shifts[dp_rank * share:(dp_rank + 1) * share]
    report = {"tp_rank": parallel_state.get_tensor_model_parallel_rank(), "dp_rank": dp_rank,
              "pairs": slice(dp_rank * share, (dp_rank + 1) * share)}

    learner = DPOTrainer(model, parallel, LEARNING, shard_root)
    report["reference"] = learner.reference_logprobs(pairs)
    report["shared_reference"] = learner.reference_logprobs_shared(all_pairs)
    stored = with_reference_logprobs(pairs, report["reference"])
    report["learning"] = [learner.step(stored) for _ in range(LEARNING_STEPS)]

    checked = DPOTrainer(model, parallel, PARITY, shard_root)
    shifted = with_reference_logprobs(pairs, report["reference"] + reference_shift)
    report["parity"] = checked.step(shifted)
    report["grads"] = {}
    for chunk in checked.chunks:
        # megatron's DDP accumulates into main_grad; clipping is off, so it is the raw grad.
        grads = {name: p.main_grad.detach().clone() for name, p in chunk.named_parameters()}
        report["grads"].update(with_global_layer_numbers(chunk, grads))
    return report


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    model = tiny_model_config()
    return model, save_random_hf_llama(model, tmp_path_factory.mktemp("dpo") / "hf")


def _every_layout_worker(rank, world_size, model, shard_roots, all_pairs,
                         all_reference_shifts):
    """Worker: _trainer_worker at each of LAYOUTS in turn (all of them four processes), so
    one spawned world serves both."""
    from megatron.core import parallel_state

    reports = {}
    for name, sizes in sorted(LAYOUTS.items()):
        reports[name] = _trainer_worker(rank, world_size, model, shard_roots[name], sizes,
                                        all_pairs, all_reference_shifts)
        parallel_state.destroy_model_parallel()
    return reports


@pytest.fixture(scope="module")
def every_layout(hf_checkpoint, tmp_path_factory):
    model, hf_dir = hf_checkpoint
    shard_roots = {name: megatron_shards(model, hf_dir, tmp_path_factory.mktemp(name), tp, pp)
                   for name, (tp, pp, _, _) in LAYOUTS.items()}
    pairs = random_pairs(model.vocab_size)
    reference_shift = torch.tensor([[0.7, -0.4], [-1.1, 0.2], [0.3, 0.9], [-0.5, -1.3]],
                                   dtype=torch.float64)
    (world_size,) = {tp * pp * dp for tp, pp, _, dp in LAYOUTS.values()}
    reports = spawn_local(_every_layout_worker, world_size, model, shard_roots, pairs,
                          reference_shift)
    return pairs, reference_shift, reports


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def run(request, hf_checkpoint, every_layout):
    model, hf_dir = hf_checkpoint
    pairs, reference_shift, reports = every_layout
    tp = LAYOUTS[request.param][0]
    return model, hf_dir, pairs, reference_shift, [r[request.param] for r in reports], tp


def _hf_sequence_logprobs(hf_model, prompt, completion):
    """Sum of log p(completion token) under HF's full logits: no padding, no kernel."""
    tokens = torch.tensor([list(prompt) + list(completion)])
    logprobs = F.log_softmax(hf_model(tokens).logits[0, :-1].double(), dim=-1)
    picked = logprobs.gather(-1, tokens[0, 1:, None])[:, 0]
    return picked[len(prompt) - 1:].sum()


def _hf_pair_logprobs(hf_model, pairs):
    chosen = torch.stack([_hf_sequence_logprobs(hf_model, p.prompt, p.chosen) for p in pairs])
    rejected = torch.stack([_hf_sequence_logprobs(hf_model, p.prompt, p.rejected) for p in pairs])
    return chosen, rejected


def _last_stage_reports(reports):
    return [r for r in reports if "loss" in r["learning"][0]]


def _merged_hf_grads(reports, model, tp):
    """HF-named grads from DP rank 0's model replica (DDP made every replica's equal)."""
    by_rank = [{} for _ in range(tp)]
    for report in reports:
        if report["dp_rank"] == 0:
            by_rank[report["tp_rank"]].update(report["grads"])
    return layout.merge_model(by_rank, model)


@pytest.mark.slow
def test_reference_logprobs_equal_hf_on_every_rank_and_step_zero_loss_is_log_2(run):
    from transformers import LlamaForCausalLM

    model, hf_dir, pairs, _, reports, _ = run
    hf_model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        chosen, rejected = _hf_pair_logprobs(hf_model, pairs)
    expected = torch.stack([chosen, rejected], dim=1)
    for report in reports:  # every stage stores the pairs, so every rank has them
        torch.testing.assert_close(report["reference"], expected[report["pairs"]],
                                   rtol=1e-5, atol=1e-4)
        # All pairs on every rank, each data-parallel replica computing half of them:
        # every rank ends with every pair's values, the same as its own replica's.
        torch.testing.assert_close(report["shared_reference"], expected, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(report["shared_reference"][report["pairs"]],
                                   report["reference"], rtol=0, atol=1e-6)
    assert all(torch.equal(r["shared_reference"], reports[0]["shared_reference"])
               for r in reports)
    last = _last_stage_reports(reports)
    assert len(last) == 2
    for report in last:
        first = report["learning"][0]
        assert abs(first["loss"] - math.log(2)) < 1e-6, first
        assert first["rewards/margin"] == 0 and first["rewards/accuracy"] == 0


@pytest.mark.slow
def test_loss_goes_down_on_a_fixed_batch_under_warmup_and_cosine_lr(run):
    reports = run[4]
    steps = _last_stage_reports(reports)[0]["learning"]
    losses = [s["loss"] for s in steps]
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert steps[-1]["rewards/accuracy"] == 1.0 and steps[-1]["rewards/margin"] > 0

    def scheduled(step):  # linear warm-up to lr, then cosine to min_lr at train_steps
        if step <= LEARNING.warmup_steps:
            return LEARNING.lr * step / LEARNING.warmup_steps
        progress = (step - LEARNING.warmup_steps) / (LEARNING.train_steps - LEARNING.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return LEARNING.min_lr + (LEARNING.lr - LEARNING.min_lr) * cosine

    for report in reports:
        for number, metrics in enumerate(report["learning"], start=1):
            assert metrics["lr"] == pytest.approx(scheduled(number), rel=1e-12)
            assert metrics["tokens_per_second"] > 0 and metrics["grad_norm"] > 0


@pytest.mark.slow
def test_dpo_loss_and_gradients_equal_hf_with_plain_log_softmax(run):
    from transformers import LlamaForCausalLM

    model, hf_dir, pairs, reference_shift, reports, tp = run
    hf_model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    # The stored reference values are inputs of the loss, not under test here.
    last = _last_stage_reports(reports)
    reference = torch.zeros(len(pairs), 2, dtype=torch.float64)
    for report in last:
        reference[report["pairs"]] = report["reference"]
    reference += reference_shift
    chosen, rejected = _hf_pair_logprobs(hf_model, pairs)
    preference = (chosen - rejected) - (reference[:, 0] - reference[:, 1])
    beta, smoothing = PARITY.beta, PARITY.label_smoothing
    loss = (-(1 - smoothing) * F.logsigmoid(beta * preference)
            - smoothing * F.logsigmoid(-beta * preference)).mean()
    loss.backward()

    # Each DP rank's loss is the mean over its pairs; DDP averages gradients over DP.
    losses_by_dp_rank = {report["dp_rank"]: report["parity"]["loss"] for report in last}
    assert sum(losses_by_dp_rank.values()) / len(losses_by_dp_rank) == pytest.approx(
        loss.item(), rel=1e-5)
    expected = {name: p.grad for name, p in hf_model.named_parameters()}
    got = _merged_hf_grads(reports, model, tp)
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        assert grad.abs().max() > 0, f"{name}: zero gradient, the test would prove nothing"
        torch.testing.assert_close(got[name], grad.float(), rtol=1e-4, atol=1e-6, msg=name)



# Two pairs per micro-batch, where a pair's chosen and rejected rows sit P rows apart and
# their reference values P entries apart: an order mixed up between pairs shows only here.
IPO = DPOTrainingConfig(loss_type="ipo", beta=0.4, lr=1e-3, warmup_steps=0, train_steps=4,
                        micro_batch_pairs=2, pad_to_multiple_of=8, clip_grad=0.0)


def _two_pairs_per_micro_batch_worker(rank, world_size, model, shard_root, pairs,
                                      reference_shift):
    from megatron_tpo.model.mcore_shards import with_global_layer_numbers
    from megatron_tpo.parallel import init_megatron
    from megatron_tpo.train.dpo_trainer import DPOTrainer
    from megatron_tpo.train.reference_logprobs import with_reference_logprobs

    parallel = ParallelConfig()
    init_megatron(parallel, model)
    trainer = DPOTrainer(model, parallel, IPO, shard_root)
    odd = pairs[:3]   # the second micro-batch is filled up with a repeat, then cut off
    report = {"tp_rank": 0, "dp_rank": 0, "odd_reference": trainer.reference_logprobs(odd),
              "odd_shared_reference": trainer.reference_logprobs_shared(odd)}
    reference = trainer.reference_logprobs(pairs)
    report["reference"] = reference
    report["ipo"] = trainer.step(with_reference_logprobs(pairs, reference + reference_shift))
    report["grads"] = with_global_layer_numbers(trainer.chunks[0], {
        name: p.main_grad.detach().clone() for name, p in trainer.chunks[0].named_parameters()})
    return report


@pytest.fixture(scope="module")
def two_pairs_per_micro_batch(hf_checkpoint, tmp_path_factory):
    model, hf_dir = hf_checkpoint
    shard_root = megatron_shards(model, hf_dir, tmp_path_factory.mktemp("tp1"), 1, 1)
    pairs = random_pairs(model.vocab_size, seed=11)
    completions = [(len(p.chosen), len(p.rejected)) for p in pairs]
    assert len(set(completions)) == len(pairs), "pairs of one length would hide a mix-up"
    reference_shift = torch.tensor([[0.9, -0.6], [-1.2, 0.4], [0.2, 1.1], [-0.7, -0.3]],
                                   dtype=torch.float64)
    [report] = spawn_local(_two_pairs_per_micro_batch_worker, 1, model, shard_root, pairs,
                           reference_shift)
    return model, hf_dir, pairs, reference_shift, report


@pytest.mark.slow
def test_reference_logprobs_of_several_pairs_per_micro_batch_equal_hf_pair_by_pair(
        two_pairs_per_micro_batch):
    from transformers import LlamaForCausalLM

    _, hf_dir, pairs, _, report = two_pairs_per_micro_batch
    hf_model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        expected = torch.stack(_hf_pair_logprobs(hf_model, pairs), dim=1)
    torch.testing.assert_close(report["reference"], expected, rtol=1e-5, atol=1e-4)
    for name in ("odd_reference", "odd_shared_reference"):
        torch.testing.assert_close(report[name], expected[:3], rtol=1e-5, atol=1e-4, msg=name)


@pytest.mark.slow
def test_ipo_step_loss_and_gradients_equal_an_independent_ipo_on_hf(two_pairs_per_micro_batch):
    from transformers import LlamaForCausalLM

    model, hf_dir, pairs, reference_shift, report = two_pairs_per_micro_batch
    hf_model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float64)
    chosen, rejected = _hf_pair_logprobs(hf_model, pairs)
    reference = report["reference"] + reference_shift
    # IPO (Azar et al. 2023): squared distance of the log-ratio margin from 1 / (2 beta).
    margin = (chosen - reference[:, 0]) - (rejected - reference[:, 1])
    loss = ((margin - 1 / (2 * IPO.beta)) ** 2).mean()
    loss.backward()
    # Loss and gradient are the mean over both micro-batches' pairs.
    assert report["ipo"]["loss"] == pytest.approx(loss.item(), rel=1e-5)
    got = _merged_hf_grads([report], model, tp=1)
    for name, parameter in hf_model.named_parameters():
        largest = parameter.grad.abs().max()
        assert largest > 0, f"{name}: zero gradient, proves nothing"
        # A float32 trainer against float64: rounding relative to the tensor's scale.
        torch.testing.assert_close(got[name].double(), parameter.grad, rtol=1e-4,
                                   atol=3e-5 * largest.item(), msg=name)


def test_pair_micro_batches_put_chosen_then_rejected_and_mask_only_completions():
    from megatron_tpo.train.dpo_batch import pair_micro_batches

    pairs = [TokenizedPair(prompt=[1, 2], chosen=[3, 4, 5], rejected=[6]),
             TokenizedPair(prompt=[7], chosen=[8], rejected=[9, 10, 11, 12],
                           reference_chosen=-1.5, reference_rejected=-2.5)]
    with pytest.raises(ValueError, match="reference log-probs"):
        pair_micro_batches(pairs, 2)
    pairs[0].reference_chosen, pairs[0].reference_rejected = -0.5, -0.25
    first, second = pair_micro_batches(pairs, 1, pad_to_multiple_of=4, pad_token_id=0)
    # Longest sequence: 1 + 4 tokens -> 4 inputs; both micro-batches share that length.
    assert first.input_ids.shape == second.input_ids.shape == (2, 4)
    assert first.input_ids.tolist() == [[1, 2, 3, 4], [1, 2, 6, 0]]
    assert first.targets.tolist() == [[2, 3, 4, 5], [2, 6, 0, 0]]
    assert first.loss_mask.tolist() == [[0, 1, 1, 1], [0, 1, 0, 0]]
    assert second.targets.tolist() == [[8, 0, 0, 0], [9, 10, 11, 12]]
    assert second.loss_mask.tolist() == [[1, 0, 0, 0], [1, 1, 1, 1]]
    assert first.reference_logprobs.tolist() == [-0.5, -0.25]
    assert second.reference_logprobs.tolist() == [-1.5, -2.5]
    with pytest.raises(ConfigError, match="train.micro_batch_pairs=2"):
        pair_micro_batches(pairs[:1], 2)
    with pytest.raises(ConfigError, match="max_position_embeddings=3"):
        pair_micro_batches(pairs, 1, max_seq_length=3)


def _fp8(**settings) -> DPOTrainingConfig:
    return DPOTrainingConfig(micro_batch_pairs=1, pad_to_multiple_of=16,
                             fp8=FP8Config(enabled=True, **settings))


@pytest.mark.parametrize("training, model_overrides, tp, named", [
    (_fp8(recipe="fancy"), {}, 1, "train.fp8.recipe='fancy'"),
    (_fp8(format="e5m2"), {}, 1, "train.fp8.format='e5m2'"),
    (_fp8(amax_compute_algo="mean"), {}, 1, "train.fp8.amax_compute_algo"),
    (_fp8(), {"hidden_size": 72, "ffn_hidden_size": 192}, 1, "model.hidden_size = 72"),
    (_fp8(), {}, 2, "model.ffn_hidden_size / parallel.tensor_model_parallel_size=2 = 88"),
    (_fp8(recipe="mxfp8"), {"hidden_size": 80, "ffn_hidden_size": 192}, 1,
     "model.hidden_size = 80 is not a multiple of 32"),
    (DPOTrainingConfig(micro_batch_pairs=1, pad_to_multiple_of=2, fp8=FP8Config(enabled=True)),
     {}, 1, "train.pad_to_multiple_of=2: tokens per micro-batch are only guaranteed to be "
            "a multiple of 4"),
    (DPOTrainingConfig(micro_batch_pairs=1, pad_to_multiple_of=8,
                       fp8=FP8Config(enabled=True, recipe="mxfp8")),
     {"ffn_hidden_size": 192}, 1, "need a multiple of 32"),
])
def test_fp8_settings_that_cannot_work_are_refused_with_the_setting(training, model_overrides,
                                                                    tp, named):
    model = tiny_model_config(**model_overrides)
    parallel = ParallelConfig(tensor_model_parallel_size=tp)
    with pytest.raises(ConfigError) as refused:
        check_fp8_settings(training, model, parallel, check_environment=False)
    assert named in str(refused.value)


def test_fp8_settings_become_megatron_transformer_config_fields():
    from megatron_tpo.model.llama import llama_transformer_config

    fp8 = FP8Config(enabled=True, format="e4m3", recipe="tensorwise", margin=1,
                    amax_history_len=16, amax_compute_algo="most_recent", wgrad=False)
    config = llama_transformer_config(tiny_model_config(), ParallelConfig(), torch.bfloat16,
                                      **transformer_config_fields(fp8))
    assert (config.fp8, config.fp8_recipe, config.fp8_margin, config.fp8_amax_history_len,
            config.fp8_amax_compute_algo, config.fp8_wgrad) == (
        "e4m3", "tensorwise", 1, 16, "most_recent", False)


def test_fp8_is_refused_without_transformer_engine_or_cuda():
    training = _fp8()
    model, parallel = tiny_model_config(), ParallelConfig()
    check_fp8_settings(training, model, parallel, check_environment=False)  # shapes are fine
    if transformer_engine_available() and torch.cuda.is_available():
        pytest.skip("Transformer Engine and CUDA are present: FP8 is allowed here")
    needed = "Transformer Engine" if not transformer_engine_available() else "CUDA GPU"
    with pytest.raises(ConfigError, match=needed):
        check_fp8_settings(training, model, parallel)


def test_context_parallelism_is_refused_before_any_work():
    from megatron_tpo.train.dpo_trainer import DPOTrainer

    with pytest.raises(ConfigError, match="parallel.context_parallel_size=2"):
        DPOTrainer(tiny_model_config(), ParallelConfig(context_parallel_size=2),
                   DPOTrainingConfig())


def _sequence_parallel_gather_worker(rank, world_size):
    """Hidden-state gradients through the output layer's sequence-parallel gather."""
    from types import SimpleNamespace

    from megatron.core import parallel_state

    from megatron_tpo.kernels.logprob import fused_target_logprobs
    from megatron_tpo.parallel import init_megatron
    from megatron_tpo.train.policy_logprobs import return_hidden_states_from_output_layer

    init_megatron(ParallelConfig(tensor_model_parallel_size=world_size))
    generator = torch.Generator().manual_seed(5)
    seq, batch, hidden_size, vocab = 8, 2, 16, 30
    hidden = torch.randn(seq, batch, hidden_size, generator=generator)
    weight = torch.randn(vocab, hidden_size, generator=generator)
    targets = torch.randint(0, vocab, (seq, batch), generator=generator)
    rows = vocab // world_size
    shard = weight[rank * rows:(rank + 1) * rows]
    group = parallel_state.get_tensor_model_parallel_group()

    def logprob_sum(full_hidden):
        return fused_target_logprobs(full_hidden, shard, targets, tp_group=group,
                                     vocab_start=rank * rows).sum()

    everything = hidden.clone().requires_grad_()
    logprob_sum(everything).backward()

    gpt_model = SimpleNamespace(post_process=True, config=SimpleNamespace(sequence_parallel=True),
                                output_layer=torch.nn.Linear(hidden_size, rows, bias=False))
    return_hidden_states_from_output_layer(gpt_model)
    own = slice(rank * seq // world_size, (rank + 1) * seq // world_size)
    local = hidden[own].clone().requires_grad_()
    gathered, _ = gpt_model.output_layer(local)
    logprob_sum(gathered).backward()
    return everything.grad[own], local.grad


@pytest.mark.slow
def test_sequence_parallel_gather_keeps_the_kernel_hidden_gradient():
    """The kernel already sums the hidden gradient over TP ranks; the gather in front of it
    must hand each rank its slice of that sum, not sum it again."""
    for expected, got in spawn_local(_sequence_parallel_gather_worker, 2):
        assert expected.abs().max() > 0
        torch.testing.assert_close(got, expected)
