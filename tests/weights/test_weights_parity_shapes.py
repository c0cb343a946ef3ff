"""The parity probes enter the trainer in shapes its GPU kernels accept.

Transformer Engine's FP8 GEMMs refuse token rows that are not a multiple of 8 (32 for
MXFP8): TE 2.11 ``pytorch/utils.py`` ``assert_dim_for_fp8_exec``, called in
``module/layernorm_linear.py`` on the layer's own input, which under sequence
parallelism is this TP rank's slice of the sequence. megatron-core 0.16.1 refuses a
sequence that the TP size does not divide when it splits it over the TP ranks
(``tensor_parallel/mappings.py``, ``_reduce_scatter_along_first_dim`` for Llama's
vocab-parallel embedding, ``_split_along_first_dim`` for the others). Neither runs on
CPU (FP8 needs TE; the local spec's RMSNorm refuses sequence parallelism), so a stand-in
does their checking: the trainer's ``GPTModel`` chunk claims the settings in its config
and its forward asserts what the GPU path would, then computes as the CPU model does
(under its real config). Probes of 8 tokens (7 inputs) are aligned to none
of the multiples.
"""

import contextlib
import copy

import pytest
import torch

from llama_fixtures import megatron_shards, save_random_hf_llama, tiny_model_config
from megatron_tpo.config import ParallelConfig
from megatron_tpo.parallel.local_launch import spawn_local
from megatron_tpo.train.config import DPOTrainingConfig, FP8Config
from megatron_tpo.train.fp8 import check_fp8_settings

from tiny_hf import tiny_tokenizer

TP = 2
# ffn_hidden_size 192: every GEMM width at TP=2 suits FP8 and MXFP8 (the tiny model's
# 176 does not), so the claimed settings are ones a GPU run could train with.
MODEL_OVERRIDES = dict(ffn_hidden_size=192)
PROBE_INSTRUCTIONS = ["the cat is my dog", "a b c d e f g h", "my sun is the moon !"]
PROBE_TOKENS = 8
# name: (train.fp8.recipe or None, parallel.sequence_parallel, train.pad_to_multiple_of,
# input length the probes enter the trainer with: 7 real, padded to what the settings need)
CASES = {
    "bf16": (None, False, 1, 7),                          # nothing to align: untouched
    "fp8": ("delayed", False, 1, 8),
    "sequence_parallel": (None, True, 1, 8),
    "fp8_sequence_parallel": ("delayed", True, 1, 16),    # 8 rows on each TP rank
    "mxfp8_sequence_parallel": ("mxfp8", True, 1, 64),    # 32 rows on each TP rank
    "fp8_trainer_padding": ("delayed", False, 12, 24),   # lcm(12, 8): as DPO pads, and more
}


def text_probe_ids():
    from megatron_tpo.weights.parity import text_probes

    tokenizer = tiny_tokenizer()
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": instruction}],
                                           tokenize=False, add_generation_prompt=True)
             for instruction in PROBE_INSTRUCTIONS]
    return text_probes(tokenizer, texts, count=3, length=PROBE_TOKENS)


def refuse_what_the_gpu_refuses(input_ids: torch.Tensor, config, tp: int) -> None:
    """Assert on a micro-batch's ``[sequences, length]`` ids what TE and megatron-core
    assert on its activations for ``config``'s FP8 and sequence-parallel settings.
    Written from their sources, not from megatron_tpo's rules, so the two cannot share a
    mistake."""
    sequences, length = input_ids.shape
    split = tp if config.sequence_parallel else 1
    if config.sequence_parallel:
        assert length % tp == 0, (
            f"First dimension of the tensor should be divisible by tensor parallel size "
            f"(sequence of {length} tokens, TP={tp})")
    if config.fp8:
        rows = sequences * length // split   # the tokens a TP rank's layernorm-linear sees
        multiple = 32 if config.fp8_recipe == "mxfp8" else 8
        assert rows % multiple == 0, (
            f"FP8 execution requires the product of all dimensions except the last to be "
            f"divisible by {multiple}: {rows} token rows (recipe {config.fp8_recipe}, "
            f"{length} tokens over {split} rank(s))")


@contextlib.contextmanager
def claiming(gpt_chunks, fp8_recipe, sequence_parallel, seen):
    """Each chunk's config claims the settings (as ``DPOTrainer`` would set them) and its
    forward refuses what the GPU would; ``seen`` collects the input shapes it accepted."""
    from megatron.core import parallel_state

    from megatron_tpo.train.fp8 import transformer_config_fields

    tp = parallel_state.get_tensor_model_parallel_world_size()
    originals = [(chunk, chunk.config) for chunk in gpt_chunks]
    for chunk, config in originals:
        claimed = copy.copy(config)
        claimed.sequence_parallel = sequence_parallel
        if fp8_recipe is not None:
            for name, value in transformer_config_fields(
                    FP8Config(enabled=True, recipe=fp8_recipe)).items():
                setattr(claimed, name, value)
        chunk.config = claimed

        def strict_forward(input_ids, *args, _chunk=chunk, _real=config, _claimed=claimed,
                           **kwargs):
            refuse_what_the_gpu_refuses(input_ids, _claimed, tp)
            seen.append(tuple(input_ids.shape))
            # The CPU model computes under its real config (GPTModel sizes RoPE by it).
            _chunk.config = _real
            try:
                return type(_chunk).forward(_chunk, input_ids, *args, **kwargs)
            finally:
                _chunk.config = _claimed

        chunk.forward = strict_forward
    try:
        yield
    finally:
        for chunk, config in originals:
            chunk.config = config
            del chunk.forward


def _worker(rank, world_size, model, shard_root, engine_hf_dir, probes):
    from transformers import LlamaForCausalLM

    from megatron_tpo.model.llama import build_llama_chunks
    from megatron_tpo.model.mcore_shards import load_model_shards
    from megatron_tpo.parallel import init_megatron
    from megatron_tpo.rollout.hf_engine import HFRolloutEngine
    from megatron_tpo.train.policy_logprobs import return_hidden_states_from_output_layer
    from megatron_tpo.weights import WeightSyncConfig, push_weights
    from megatron_tpo.weights.parity import trainer_token_logprobs

    parallel = ParallelConfig(tensor_model_parallel_size=TP)
    init_megatron(parallel, model)
    chunks = build_llama_chunks(model, parallel)
    for chunk in chunks:
        load_model_shards(chunk, shard_root)
        return_hidden_states_from_output_layer(chunk)   # as DPOTrainer sets it up
    engine = HFRolloutEngine(LlamaForCausalLM.from_pretrained(engine_hf_dir,
                                                              dtype=torch.float32),
                             tiny_tokenizer())
    settings = WeightSyncConfig(parity_tolerance=1e-4)
    report = {}
    for name, (recipe, sequence_parallel, pad, _) in CASES.items():
        seen = []
        result = report[name] = {"seen": seen}
        with claiming(chunks, recipe, sequence_parallel, seen):
            try:
                result["metrics"] = push_weights(engine, chunks, model, settings, probes,
                                                 pad_to_multiple_of=pad)
                result["trainer"] = trainer_token_logprobs(chunks, probes, model.vocab_size,
                                                           pad_to_multiple_of=pad)
            except AssertionError as error:   # the stand-in's refusal: the GPU's crash
                result["refused"] = str(error)
    # The stand-in itself refuses the unpadded probe micro-batch under each claim.
    unpadded = torch.tensor([probes[0][:-1]])
    for name, (recipe, sequence_parallel, _, _) in CASES.items():
        with claiming(chunks, recipe, sequence_parallel, []):
            try:
                refuse_what_the_gpu_refuses(unpadded, chunks[0].config, TP)
                report[name]["stand_in_accepts_unpadded"] = True
            except AssertionError:
                report[name]["stand_in_accepts_unpadded"] = False
    return report


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    model = tiny_model_config(**MODEL_OVERRIDES)
    root = tmp_path_factory.mktemp("parity_shapes")
    hf_dir = save_random_hf_llama(model, root / "trainer", seed=0)
    engine_dir = save_random_hf_llama(model, root / "engine", seed=1)   # stale until synced
    shard_root = megatron_shards(model, hf_dir, root / "tp2", TP, 1)
    probes = text_probe_ids()
    assert {len(p) for p in probes} == {PROBE_TOKENS}
    return spawn_local(_worker, TP, model, shard_root, engine_dir, probes)


def test_the_probe_multiple_keeps_each_tp_ranks_fp8_slice_aligned():
    from types import SimpleNamespace

    from megatron_tpo.weights.parity import probe_length_multiple

    def multiple(fp8, recipe, sequence_parallel, tp, pad=1):
        config = SimpleNamespace(fp8=fp8, fp8_recipe=recipe, sequence_parallel=sequence_parallel)
        return probe_length_multiple(config, tp, pad)

    assert multiple(None, "delayed", False, 8) == 1
    assert multiple(None, "delayed", False, 8, pad=16) == 16
    assert multiple("hybrid", "delayed", False, 8) == 8        # TP alone splits no tokens
    assert multiple(None, "delayed", True, 8) == 8
    # FP8 GEMMs see one rank's 1/TP of the sequence: 8 rows there, not lcm(8, TP) in all.
    assert multiple("hybrid", "tensorwise", True, 8) == 64
    assert multiple("e4m3", "mxfp8", True, 4) == 128
    assert multiple("hybrid", "delayed", True, 2, pad=12) == 48


def test_the_claimed_settings_are_ones_an_fp8_run_could_train_with():
    model = tiny_model_config(**MODEL_OVERRIDES)
    for recipe, sequence_parallel, _, _ in CASES.values():
        if recipe is not None:
            check_fp8_settings(
                DPOTrainingConfig(micro_batch_pairs=1, pad_to_multiple_of=32,
                                  fp8=FP8Config(enabled=True, recipe=recipe)),
                model, ParallelConfig(tensor_model_parallel_size=TP,
                                      sequence_parallel=sequence_parallel),
                check_environment=False)


@pytest.mark.slow
def test_the_stand_in_refuses_the_unpadded_probes_wherever_the_gpu_would(reports):
    for report in reports:
        assert {name: case["stand_in_accepts_unpadded"] for name, case in report.items()} == {
            "bf16": True, "fp8": False, "sequence_parallel": False,
            "fp8_sequence_parallel": False, "mxfp8_sequence_parallel": False,
            "fp8_trainer_padding": False}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_a_sync_passes_parity_with_probes_padded_to_what_the_trainer_accepts(reports, name):
    expected_length = CASES[name][3]
    for report in reports:
        case = report[name]
        assert "refused" not in case, case["refused"]
        # Every probe entered the trainer padded (and only as far as needed).
        assert case["seen"] and set(case["seen"]) == {(1, expected_length)}
        metrics = case["metrics"]
        # The padding is masked out: only the 7 real targets of each probe are compared,
        # and they match the engine, which scored the unpadded probes.
        assert metrics["parity_probe_tokens"] == 3 * (PROBE_TOKENS - 1)
        assert 0 <= metrics["mean_abs_logprob_diff"] <= metrics["max_abs_logprob_diff"] < 1e-4
        assert case["trainer"].shape == (3, PROBE_TOKENS - 1)



@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name in CASES if name != "bf16"])
def test_padding_leaves_the_real_tokens_log_probs_as_unpadded(reports, name):
    for report in reports:
        # Causal attention: the padding reaches no real token. What is left is float32
        # rounding of differently shaped GEMMs (measured 4.8e-7), far below any tolerance.
        torch.testing.assert_close(report[name]["trainer"], report["bf16"]["trainer"],
                                   rtol=0, atol=1e-5)
