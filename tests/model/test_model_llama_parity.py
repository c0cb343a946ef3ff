"""megatron-core Llama at several TP/PP equals HF transformers on the same weights."""

import pytest
import torch

from llama_fixtures import megatron_shards, save_random_hf_llama, tiny_model_config
from megatron_tpo.config import ParallelConfig
from megatron_tpo.model import llama_layout as layout
from megatron_tpo.parallel.local_launch import spawn_local

pytestmark = pytest.mark.slow

SEQ_LEN, MICRO_BATCH, MICRO_BATCHES = 12, 2, 4


def _batch(vocab_size: int, seed: int = 7):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (MICRO_BATCHES * MICRO_BATCH, SEQ_LEN + 1),
                           generator=generator)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _run_layouts(rank, world_size, model, layouts, shard_roots, inputs, labels, with_grads):
    """Worker: for each (tp, pp), load the shards, run the pipeline schedule, report."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_tpo.model.llama import build_llama_chunks
    from megatron_tpo.model.mcore_shards import load_model_shards, with_global_layer_numbers
    from megatron_tpo.parallel import init_megatron

    reports = {}
    for (tp, pp, vpp), shard_root in zip(layouts, shard_roots):
        parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                  virtual_pipeline_model_parallel_size=vpp)
        init_megatron(parallel, model)
        chunks = build_llama_chunks(model, parallel)
        for chunk in chunks:
            load_model_shards(chunk, shard_root)
        logits_out = []

        def forward_step(data_iterator, gpt_model):
            tokens, targets = next(data_iterator)
            positions = torch.arange(SEQ_LEN).expand_as(tokens)
            output = gpt_model(tokens, positions, None)

            def loss_func(output_tensor):
                # Cross entropy over the true vocab: megatron's padding rows must not
                # take part in the softmax, or TP sizes with different padding differ.
                logits = gather_from_tensor_model_parallel_region(output_tensor)
                logits = logits[..., : model.vocab_size]
                if with_grads:
                    return torch.nn.functional.cross_entropy(
                        logits.reshape(-1, model.vocab_size), targets.reshape(-1)), {}
                logits_out.append(logits.detach())
                return logits.sum() * 0.0, {}

            return output, loss_func

        micro_batches = list(zip(inputs.chunk(MICRO_BATCHES), labels.chunk(MICRO_BATCHES)))
        iterators = [iter(micro_batches) for _ in chunks]
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if vpp else iterators[0],
            model=chunks if vpp else chunks[0],
            num_microbatches=MICRO_BATCHES, seq_length=SEQ_LEN, micro_batch_size=MICRO_BATCH,
            forward_only=not with_grads,
        )
        report = {"tp_rank": parallel_state.get_tensor_model_parallel_rank()}
        if logits_out:
            report["logits"] = torch.cat(logits_out)
        if with_grads:
            report["grads"] = {}
            for chunk in chunks:
                grads = {name: p.grad.detach().clone() for name, p in chunk.named_parameters()}
                report["grads"].update(with_global_layer_numbers(chunk, grads))
        reports[(tp, pp, vpp)] = report
        parallel_state.destroy_model_parallel()
    return reports


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = tiny_model_config()
    assert model.vocab_size % 2 == 1 and model.num_query_groups < model.num_attention_heads
    root = tmp_path_factory.mktemp("parity")
    hf_dir = save_random_hf_llama(model, root / "hf")
    shard_roots = {}
    for tp, pp in [(1, 1), (2, 1), (1, 2), (2, 2)]:
        shard_roots[(tp, pp, None)] = shard_roots[(tp, pp, 2)] = megatron_shards(
            model, hf_dir, root / f"tp{tp}pp{pp}", tp, pp)
    return model, hf_dir, shard_roots


# Per world size, the layouts whose logits are compared with HF's (forward only) and those
# whose gradients are compared with TP1/PP1's (another batch): one spawn of each world
# serves both tests.
LOGIT_LAYOUTS = {1: [(1, 1, None)], 2: [(2, 1, None), (1, 2, None), (1, 2, 2)],
                 4: [(2, 2, None)]}
SINGLE_LAYOUT, SPLIT_LAYOUT, INTERLEAVED_LAYOUT = (1, 1, None), (2, 2, None), (1, 2, 2)
GRAD_LAYOUTS = {1: [SINGLE_LAYOUT], 2: [INTERLEAVED_LAYOUT], 4: [SPLIT_LAYOUT]}


def _run_world(rank, world_size, model, shard_roots, logit_batch, grad_batch):
    """Worker: the logits of this world's LOGIT_LAYOUTS, then the gradients of its
    GRAD_LAYOUTS."""
    logit_layouts, grad_layouts = LOGIT_LAYOUTS[world_size], GRAD_LAYOUTS[world_size]
    return {"logits": _run_layouts(rank, world_size, model, logit_layouts,
                                   [shard_roots[l] for l in logit_layouts], *logit_batch, False),
            "grads": _run_layouts(rank, world_size, model, grad_layouts,
                                  [shard_roots[l] for l in grad_layouts], *grad_batch, True)}


@pytest.fixture(scope="module")
def worlds(checkpoint):
    """world size -> every rank's reports; the logits' batch is seed 7's, the gradients'
    seed 11's."""
    model, _, shard_roots = checkpoint
    logit_batch, grad_batch = _batch(model.vocab_size), _batch(model.vocab_size, seed=11)
    return {world_size: spawn_local(_run_world, world_size, model, shard_roots, logit_batch,
                                    grad_batch)
            for world_size in LOGIT_LAYOUTS}


def _hf_logits(hf_dir, inputs):
    from transformers import LlamaForCausalLM

    hf_model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf_model(inputs).logits


def _collect(reports, key):
    return [report[key] for report in reports if key in report]


def test_logits_match_hf_at_every_layout(checkpoint, worlds):
    model, hf_dir, _ = checkpoint
    inputs, _ = _batch(model.vocab_size)
    expected = _hf_logits(hf_dir, inputs)

    for world_size, layouts in LOGIT_LAYOUTS.items():
        reports = [report["logits"] for report in worlds[world_size]]
        for tp_pp in layouts:
            logits = _collect([r[tp_pp] for r in reports], "logits")
            assert logits, f"no rank produced logits at TP/PP {tp_pp}"
            for got in logits:  # every TP rank of the last stage holds the full logits
                difference = (got - expected).abs().max().item()
                assert difference < 1e-4, f"TP/PP {tp_pp}: max |megatron - HF| = {difference}"


def _hf_named_grads(reports, model, tp):
    """Merge megatron grads of every rank (global layer names) into HF names."""
    by_rank = [{} for _ in range(tp)]
    for report in reports:
        by_rank[report["tp_rank"]].update(report["grads"])
    return layout.merge_model(by_rank, model)


def test_1f1b_gradients_at_tp2_pp2_and_interleaved_equal_tp1_pp1(checkpoint, worlds):
    model, _, _ = checkpoint
    single, split, interleaved = ([report["grads"] for report in worlds[world_size]]
                                  for world_size in (1, 4, 2))
    reference = _hf_named_grads([r[SINGLE_LAYOUT] for r in single], model, tp=1)
    for name_of_run, run, layout_key, tp in (("TP2/PP2", split, SPLIT_LAYOUT, 2),
                                             ("TP1/PP2/VPP2", interleaved, INTERLEAVED_LAYOUT, 1)):
        parallel = _hf_named_grads([r[layout_key] for r in run], model, tp=tp)
        assert reference.keys() == parallel.keys()
        for name, grad in reference.items():
            assert grad.abs().max() > 0, f"{name}: zero gradient, the test would prove nothing"
            torch.testing.assert_close(parallel[name], grad, rtol=1e-4, atol=1e-6,
                                       msg=f"{name_of_run}: {name}")
