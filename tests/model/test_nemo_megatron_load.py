"""NeMo 2 directories (ours and NeMo's own) and ``hf-to-dist`` checkpoints, of untied and
tied models, load through megatron-core's ``dist_checkpointing.load`` at TP=2, PP=2 with
logits equal to HF's."""

from pathlib import Path

import pytest
import torch

from llama_fixtures import save_random_hf_llama, tiny_model_config
from megatron_tpo.config import ParallelConfig
from megatron_tpo.model.hf_config import model_config_from_hf, read_hf_config_dict
from megatron_tpo.model.nemo import hf_to_dist, hf_to_nemo
from megatron_tpo.parallel.local_launch import spawn_local

pytestmark = pytest.mark.slow

FIXTURE = Path("/work/shared/fixtures/nemo2_tiny_llama")
SEQ_LEN, MICRO_BATCH, MICRO_BATCHES = 12, 2, 2


def _logits_after_dist_load(rank, world_size, cases, tokens):
    """Worker: build each model at TP=2/PP=2, load its checkpoint, return the logits."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_tpo.model.dist_weights import load_into_model
    from megatron_tpo.model.llama import build_llama
    from megatron_tpo.parallel import init_megatron

    parallel = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    results = []
    for model, weights_dir, prefix in cases:
        init_megatron(parallel, model)
        gpt = build_llama(model, parallel).eval()
        load_into_model(gpt, weights_dir, prefix)
        logits = []

        def forward_step(data_iterator, gpt_model):
            batch = next(data_iterator)
            output = gpt_model(batch, torch.arange(SEQ_LEN).expand_as(batch), None)

            def collect(output_tensor):
                full = gather_from_tensor_model_parallel_region(output_tensor)
                logits.append(full[..., : model.vocab_size].detach())
                return output_tensor.sum() * 0.0, {}

            return output, collect

        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(tokens.chunk(MICRO_BATCHES)),
            model=gpt, num_microbatches=MICRO_BATCHES, seq_length=SEQ_LEN,
            micro_batch_size=MICRO_BATCH, forward_only=True)
        results.append(torch.cat(logits) if logits else None)
        parallel_state.destroy_model_parallel()
    return results


def _hf_logits(hf_dir, tokens, norms_to_one=False):
    from transformers import LlamaForCausalLM

    hf_model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    if norms_to_one:
        with torch.no_grad():
            for name, parameter in hf_model.named_parameters():
                if name.endswith("layernorm.weight"):
                    parameter.fill_(1.0)
    with torch.no_grad():
        return hf_model(tokens).logits


def test_nemo_and_dist_checkpoints_load_at_tp2_pp2_with_hf_logits(tmp_path):
    model = tiny_model_config()  # vocab 1001: the checkpoint's rows differ from TP=2's padding
    hf_dir = save_random_hf_llama(model, tmp_path / "hf")
    hf_to_nemo(hf_dir, tmp_path / "nemo", progress=False)
    hf_to_dist(hf_dir, tmp_path / "dist", progress=False)
    # Tied (Llama 3.2's way): the checkpoints hold the embedding alone, and megatron's last
    # stage reads its output layer from the embedding's key.
    tied = tiny_model_config(tie_word_embeddings=True)
    tied_dir = save_random_hf_llama(tied, tmp_path / "tied_hf", seed=3)
    hf_to_nemo(tied_dir, tmp_path / "tied_nemo", progress=False)
    hf_to_dist(tied_dir, tmp_path / "tied_dist", progress=False)
    cases = [(model, tmp_path / "nemo" / "weights", "module."), (model, tmp_path / "dist", ""),
             (tied, tmp_path / "tied_nemo" / "weights", "module."),
             (tied, tmp_path / "tied_dist", "")]
    tokens = torch.randint(0, 320, (MICRO_BATCH * MICRO_BATCHES, SEQ_LEN),
                           generator=torch.Generator().manual_seed(5))
    expected = [_hf_logits(hf_dir, tokens)] * 2 + [_hf_logits(tied_dir, tokens)] * 2
    if FIXTURE.is_dir():
        # NeMo's own checkpoint; its per-layer norms are ones (see test_nemo_checkpoint),
        # and megatron is built from the HF config, so HF is compared with norms at one.
        fixture_model = model_config_from_hf(read_hf_config_dict(FIXTURE / "hf"))
        cases.append((fixture_model, FIXTURE / "nemo" / "weights", "module."))
        expected.append(_hf_logits(FIXTURE / "hf", tokens, norms_to_one=True))

    reports = spawn_local(_logits_after_dist_load, 4, cases, tokens)
    for index, (case, want) in enumerate(zip(cases, expected)):
        produced = [report[index] for report in reports if report[index] is not None]
        assert len(produced) == 2, "both TP ranks of the last stage return logits"
        for got in produced:
            difference = (got - want).abs().max().item()
            assert difference < 1e-4, f"{case[1]}: max |megatron - HF| = {difference}"
