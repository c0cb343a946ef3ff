"""push_weights: after a DPO step at TP=2/PP=2, every rank's HF engine computes what
megatron computes, the parity check passes, a corrupted tensor is caught and named, and
the measured peak memory of the stream stays near two buckets, over both transports
(gather + broadcast; shared memory). At TP=1/PP=2 with two virtual stages per rank and
two data-parallel replicas, the engines end up equal to HF transformers on the
checkpoint the trainer loaded.

One spawn of four gloo processes per layout and transport serves every multi-process
assertion.
"""

from pathlib import Path

import pytest
import torch

from llama_fixtures import megatron_shards, save_random_hf_llama, tiny_model_config
from megatron_tpo.config import ConfigError, ParallelConfig
from megatron_tpo.parallel.local_launch import spawn_local
from megatron_tpo.rollout.engine import SamplingParams
from megatron_tpo.rollout.hf_engine import HFRolloutEngine
from megatron_tpo.train.config import DPOTrainingConfig
from megatron_tpo.train.dpo_batch import TokenizedPair
from megatron_tpo.weights import WeightSyncConfig

from tiny_hf import tiny_tokenizer
from weight_corruption import assert_corrupted_tensor_named, corrupted_stream

TRAINING = DPOTrainingConfig(beta=0.5, lr=5e-3, warmup_steps=0, train_steps=4,
                             micro_batch_pairs=1, pad_to_multiple_of=8, clip_grad=0.0)
# The largest tensor of the tiny model is a 1001 x 64 float32 vocab table (256 KB), a
# layer is 184 KB: six buckets, three per pipeline stage.
BUCKET_BYTES = 300_000
# Real text, as the loop probes the run's first chat prompts.
PROBE_INSTRUCTIONS = ["the cat is my dog", "a b c d e f g h", "my sun is the moon !"]


def text_probe_ids():
    from megatron_tpo.weights.parity import text_probes

    tokenizer = tiny_tokenizer()
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": instruction}],
                                           tokenize=False, add_generation_prompt=True)
             for instruction in PROBE_INSTRUCTIONS]
    return text_probes(tokenizer, texts, count=3, length=64)


class CorruptingEngine(HFRolloutEngine):
    """Loads one tensor wrong, as a broken transport or loader would."""

    def update_weights(self, stream):
        super().update_weights(corrupted_stream(stream))


class ScoresRecorded(HFRolloutEngine):
    """Keeps what it is asked to score."""

    def score(self, token_ids):
        self.scored = [list(ids) for ids in token_ids]
        return super().score(token_ids)


class SlightlyOff(HFRolloutEngine):
    """Off by 2e-3 on every log-prob: nothing a bf16 engine would show, but twice what a
    float32 engine may differ from a float32 trainer."""

    def score(self, token_ids):
        return [[value - 2e-3 for value in sequence] for sequence in super().score(token_ids)]


class SecondReplicaOff(HFRolloutEngine):
    """Fronts two replicas, the second scoring 0.5 off (as a pool replica holding a bad
    tensor would): the parity check must look at every replica, not the first."""

    def score_each_replica(self, token_ids):
        good = self.score(token_ids)
        return [good, [[value - 0.5 for value in sequence] for sequence in good]]


class NaNScores(HFRolloutEngine):
    """Scores one probe token NaN, as an engine whose activations overflowed would."""

    def score(self, token_ids):
        scores = super().score(token_ids)
        scores[1][4] = float("nan")
        return scores


class SecondReplicaNaN(HFRolloutEngine):
    """Fronts two replicas, the second scoring one probe token NaN."""

    def score_each_replica(self, token_ids):
        good = self.score(token_ids)
        return [good, [[float("nan")] + sequence[1:] for sequence in good]]


def _megatron_logits(chunks, tokens, vocab_size):
    """Full-vocab logits of ``tokens`` on the last pipeline stage (None elsewhere)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_tpo.train.pipeline_step import position_ids, unwrapped

    def forward_step(data_iterator, model):
        ids = next(data_iterator)
        output = model(ids, position_ids(ids), None)

        def collect(hidden):  # the trainer's output layer hands back hidden states
            shard = hidden @ unwrapped(model).output_layer.weight.t()
            shards = [torch.empty_like(shard) for _ in range(
                parallel_state.get_tensor_model_parallel_world_size())]
            torch.distributed.all_gather(shards, shard,
                                         group=parallel_state.get_tensor_model_parallel_group())
            return hidden.new_zeros(()), {"logits": torch.cat(shards, dim=-1)[..., :vocab_size]}

        return output, collect

    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([tokens]), model=chunks[0],
            num_microbatches=1, seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0],
            forward_only=True)
    return out[0]["logits"] if parallel_state.is_pipeline_last_stage() else None


def _engine_logits(engine, tokens):
    with torch.no_grad():
        return engine.model(tokens).logits


def _sync_worker(rank, world_size, model, shard_root, hf_dir, pairs, tokens, transport, probes):
    from transformers import LlamaForCausalLM

    from megatron_tpo.parallel import init_megatron, shutdown_megatron
    from megatron_tpo.rollout.memory import peak_extra_bytes
    from megatron_tpo.train.dpo_trainer import DPOTrainer
    from megatron_tpo.weights import WeightSyncError, push_weights
    from megatron_tpo.weights.stream import cached_plan
    from megatron_tpo.weights.transports import cached_transport

    parallel = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    init_megatron(parallel, model)
    trainer = DPOTrainer(model, parallel, TRAINING, shard_root)
    trainer.step(trainer.with_reference_logprobs(pairs))

    def engine(kind=HFRolloutEngine):  # each rank's own replica, still at the old weights
        return kind(LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32),
                    tiny_tokenizer())

    replica = engine(ScoresRecorded)
    report = {"before": _engine_logits(replica, tokens)}
    checked = WeightSyncConfig(bucket_bytes=BUCKET_BYTES, parity_tolerance=1e-4,
                               transport=transport)
    report["metrics"] = push_weights(replica, trainer.ddp_chunks, model, checked, probes)
    report["scored"] = replica.scored
    report["after"] = _engine_logits(replica, tokens)
    report["megatron"] = _megatron_logits(trainer.chunks, tokens, model.vocab_size)
    unchecked = WeightSyncConfig(bucket_bytes=BUCKET_BYTES, check_parity=False,
                                 transport=transport)
    report["unchecked"], report["peak_bytes"] = peak_extra_bytes(
        lambda: push_weights(replica, trainer.ddp_chunks, model, unchecked, probes),
        torch.device("cpu"))
    plan = cached_plan(trainer.chunks, model, BUCKET_BYTES)
    report["plan"] = dict(buckets=len(plan.buckets), sources=plan.sources,
                          largest_bucket=plan.largest_bucket_bytes,
                          largest_tensor=plan.largest_tensor_bytes)
    report["auto"] = type(cached_transport("auto", plan, torch.device("cpu"))).__name__
    try:
        push_weights(engine(CorruptingEngine if rank == 1 else HFRolloutEngine),
                     trainer.ddp_chunks, model, checked, probes)
    except WeightSyncError as error:
        report["corrupted"] = str(error)
    try:
        push_weights(engine(SecondReplicaOff), trainer.ddp_chunks, model, checked, probes)
    except WeightSyncError as error:
        report["second_replica"] = str(error)
    by_dtype = WeightSyncConfig(bucket_bytes=BUCKET_BYTES, transport=transport)
    try:   # the default tolerance, resolved from the float32 trainer
        push_weights(engine(SlightlyOff), trainer.ddp_chunks, model, by_dtype, probes)
    except WeightSyncError as error:
        report["slightly_off"] = str(error)
    try:
        push_weights(engine(), trainer.ddp_chunks, model, by_dtype)
    except ValueError as error:
        report["no_probes"] = str(error)
    shutdown_megatron()
    return report


@pytest.fixture(scope="module", params=["broadcast", "shared_memory"])
def reports(request, tmp_path_factory):
    model = tiny_model_config()
    hf_dir = save_random_hf_llama(model, tmp_path_factory.mktemp("sync") / "hf")
    shard_root = megatron_shards(model, hf_dir, tmp_path_factory.mktemp("tp2_pp2"), 2, 2)
    generator = torch.Generator().manual_seed(7)
    pairs = [TokenizedPair(prompt=torch.randint(0, model.vocab_size, (4,), generator=generator
                                                ).tolist(),
                           chosen=torch.randint(0, model.vocab_size, (6,), generator=generator
                                                ).tolist(),
                           rejected=torch.randint(0, model.vocab_size, (5,), generator=generator
                                                  ).tolist()) for _ in range(2)]
    tokens = torch.randint(0, model.vocab_size, (2, 12), generator=generator)
    return request.param, spawn_local(_sync_worker, 4, model, shard_root, hf_dir, pairs, tokens,
                                      request.param, text_probe_ids())


@pytest.mark.slow
def test_every_ranks_engine_computes_the_megatron_logits_after_a_dpo_step(reports):
    _, reports = reports
    last_stage = [r["megatron"] for r in reports if r["megatron"] is not None]
    assert len(last_stage) == 2
    megatron = last_stage[0]
    torch.testing.assert_close(last_stage[1], megatron, rtol=0, atol=0)
    # The step moved the weights: the engines' old logits are visibly off.
    assert (reports[0]["before"] - megatron).abs().max() > 1e-3
    for report in reports:
        assert torch.equal(report["after"], reports[0]["after"])  # identical on every rank
        assert (report["after"] - megatron).abs().max() < 1e-4


@pytest.mark.slow
def test_parity_check_passes_and_versions_go_up_by_one_per_sync(reports):
    _, reports = reports
    for report in reports:
        metrics = report["metrics"]
        assert metrics["version"] == 1 and report["unchecked"]["version"] == 2
        assert 0 <= metrics["mean_abs_logprob_diff"] <= metrics["max_abs_logprob_diff"] < 1e-4
        assert metrics["parity_tolerance"] == 1e-4
        assert metrics["parity_probe_tokens"] == 3 * 12   # 3 probes of 13 tokens
        assert report["unchecked"]["max_abs_logprob_diff"] != report["unchecked"][
            "max_abs_logprob_diff"]  # nan: not checked
        # Every HF tensor once: 4 layers of the tiny model plus embedding, norm and head.
        model = tiny_model_config()
        per_layer = (2 * model.hidden_size * model.hidden_size           # q, o
                     + 2 * model.hidden_size * model.hidden_size // 2    # k, v (2 of 4 heads)
                     + 3 * model.hidden_size * model.ffn_hidden_size + 2 * model.hidden_size)
        expected = 4 * (model.num_layers * per_layer + (2 * model.vocab_size + 1)
                        * model.hidden_size)
        assert metrics["bytes"] == expected
        assert metrics["seconds"] > 0


@pytest.mark.slow
def test_a_corrupted_tensor_stops_the_sync_on_every_rank_and_is_named(reports):
    _, reports = reports
    for report in reports:
        message = report["corrupted"]
        assert_corrupted_tensor_named(message, rank=1)
        assert "weight_sync.parity_tolerance=0.0001" in message
        # Every replica behind an engine is checked: the second one's offset is caught.
        assert "probe log-probs differ from the trainer's by 0.5" in report["second_replica"]


@pytest.mark.slow
def test_the_probes_are_the_given_text_and_a_small_shift_fails_the_float32_bound(reports):
    _, reports = reports
    probes = text_probe_ids()
    for report in reports:
        assert report["scored"] == probes   # the given text, not random ids
        message = report["slightly_off"]
        assert "probe log-probs differ from the trainer's by 0.002 (mean 0.002)" in message
        assert "> weight_sync.parity_tolerance_float32=0.001 (float32 trainer)" in message
        assert "weight_sync.check_parity=true needs probes" in report["no_probes"]


@pytest.mark.slow
def test_measured_peak_memory_of_a_sync_is_two_buckets_plus_one_tensors_shards(reports):
    transport, reports = reports
    plan = reports[0]["plan"]
    assert plan["buckets"] == 6 and plan["sources"] == [0, 2]   # TP rank 0 of each stage
    bucket, tensor = plan["largest_bucket"], plan["largest_tensor"]
    assert bucket <= BUCKET_BYTES
    model = tiny_model_config()
    padded_tensor = tensor * model.padded_vocab_size(2) / model.vocab_size
    for rank, report in enumerate(reports):
        peak = report["peak_bytes"]
        assert report["auto"] == "SharedMemoryTransport"   # CPU ranks of one host
        if transport == "shared_memory":
            # The two slots are mapped once per plan; a sync allocates nothing of size.
            assert peak < tensor / 4, (rank, peak)
        elif rank in plan["sources"]:
            assert peak >= bucket, (rank, peak)   # the measurement sees the buffers
            # Two buckets, plus the largest tensor's gathered (vocab-padded) shards and
            # gloo's staging of that gather's input and output (up to 64 KiB of its small
            # buffers come and go between runs); the shards are written straight into the
            # bucket, never concatenated.
            assert peak <= 2 * bucket + 3 * padded_tensor + 2**16, (rank, peak, bucket, tensor)
        else:
            # The bucket being read and the next one arriving, plus up to one tensor that
            # the process group stages for a gather this rank joins.
            assert bucket <= peak <= 2 * bucket + tensor, (rank, peak, bucket)


def _virtual_pipeline_worker(rank, world_size, model, shard_root, other_hf_dir, tokens,
                             probes):
    from transformers import LlamaForCausalLM

    from megatron_tpo.model.llama import build_llama_chunks
    from megatron_tpo.model.mcore_shards import load_model_shards
    from megatron_tpo.parallel import init_megatron, shutdown_megatron
    from megatron_tpo.weights import WeightSyncError, push_weights
    from megatron_tpo.weights.stream import cached_plan

    parallel = ParallelConfig(tensor_model_parallel_size=1, pipeline_model_parallel_size=2,
                              virtual_pipeline_model_parallel_size=2)
    init_megatron(parallel, model)
    chunks = build_llama_chunks(model, parallel)   # plain chunks, no DDP wrapper
    for chunk in chunks:
        load_model_shards(chunk, shard_root)
    engine = HFRolloutEngine(LlamaForCausalLM.from_pretrained(other_hf_dir, dtype=torch.float32),
                             tiny_tokenizer())
    metrics = push_weights(engine, chunks, model,
                           WeightSyncConfig(bucket_bytes=BUCKET_BYTES, parity_tolerance=1e-4),
                           probes)
    sources = cached_plan(chunks, model, BUCKET_BYTES).sources
    sampled = engine.generate(["the cat", "my dog is"], SEEDED)
    # A NaN log-prob is no parity: on every rank, on the last rank only (the check's
    # all-reduce must carry it to the others), or on a second replica behind one engine.
    nan_failures = {}
    for case, kind in (("every rank", NaNScores),
                       ("last rank", NaNScores if rank == world_size - 1 else HFRolloutEngine),
                       ("second replica", SecondReplicaNaN)):
        nan_engine = kind(LlamaForCausalLM.from_pretrained(other_hf_dir, dtype=torch.float32),
                          tiny_tokenizer())
        try:
            nan_failures[case] = push_weights(
                nan_engine, chunks, model,
                WeightSyncConfig(bucket_bytes=BUCKET_BYTES, parity_tolerance=1e-4), probes)
        except WeightSyncError as error:
            nan_failures[case] = str(error)
    shutdown_megatron()
    return (metrics, _engine_logits(engine, tokens), sources, [o.token_ids for o in sampled],
            nan_failures)


SEEDED = SamplingParams(n=2, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=5)


@pytest.mark.slow
def test_virtual_pipeline_and_data_parallel_layouts_stream_the_loaded_checkpoint(tmp_path):
    from transformers import LlamaForCausalLM

    model = tiny_model_config()
    hf_dir = save_random_hf_llama(model, tmp_path / "trainer", seed=0)
    other = save_random_hf_llama(model, tmp_path / "engine", seed=1)
    shard_root = megatron_shards(model, hf_dir, tmp_path / "tp1_pp2", 1, 2)
    tokens = torch.randint(0, model.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)(tokens).logits
        stale = LlamaForCausalLM.from_pretrained(other, dtype=torch.float32)(tokens).logits
    assert (stale - expected).abs().max() > 1e-2

    def seeded_samples(path):
        engine = HFRolloutEngine(LlamaForCausalLM.from_pretrained(path, dtype=torch.float32),
                                 tiny_tokenizer())
        return [o.token_ids for o in engine.generate(["the cat", "my dog is"], SEEDED)]

    reference_samples = seeded_samples(hf_dir)
    assert seeded_samples(other) != reference_samples
    for metrics, logits, sources, samples, nan_failures in spawn_local(
            _virtual_pipeline_worker, 4, model, shard_root, other, tokens, text_probe_ids()):
        # Ranks 0 and 2 are the first replica's pipeline; the second replica sends nothing.
        assert sources == [0, 2]
        assert metrics["version"] == 1 and metrics["max_abs_logprob_diff"] < 1e-4
        assert (logits - expected).abs().max() < 1e-4
        assert samples == reference_samples   # seeded sampling follows the new weights
        for case, failure in nan_failures.items():
            assert isinstance(failure, str), f"NaN on {case} passed the check: {failure}"
            assert "differ from the trainer's by inf (mean inf)" in failure, (case, failure)
            assert "> weight_sync.parity_tolerance=0.0001" in failure, (case, failure)


def test_weight_sync_settings_are_checked():
    with pytest.raises(ConfigError, match="weight_sync.bucket_bytes=0"):
        WeightSyncConfig(bucket_bytes=0).validate()
    with pytest.raises(ConfigError, match="weight_sync.probe_length=1"):
        WeightSyncConfig(probe_length=1).validate()
    with pytest.raises(ConfigError, match="weight_sync.parity_tolerance=0"):
        WeightSyncConfig(parity_tolerance=0).validate()


def _transport_worker(rank, world_size, cases):
    """Worker: for each case, this rank's shared-memory directory as ``cases[case]`` gives
    it; which transport ``auto`` and ``shared_memory`` give, and what is left in it."""
    import megatron_tpo.weights.transports as transport
    from megatron_tpo.weights.stream import Bucket, PlannedTensor, WeightStreamPlan

    torch.distributed.init_process_group("gloo")
    plan = WeightStreamPlan([Bucket(0, [PlannedTensor("decoder.final_layernorm.weight", (0,),
                                                      [("model.norm.weight", (64,))], (64,))])],
                            torch.float32, 1 << 20)
    reports = {}
    for case, shm_dirs in cases.items():
        transport.SHARED_MEMORY_DIR = Path(shm_dirs[rank])   # as a container per rank sees it
        picked = {}
        for name in ("auto", "shared_memory"):
            try:
                picked[name] = type(transport.choose_transport(name, plan,
                                                               torch.device("cpu"))).__name__
            except ValueError as error:
                picked[name] = str(error)
        torch.distributed.barrier()   # a shared directory is looked at once every rank is done
        left = sorted(path.name for path in Path(shm_dirs[rank]).iterdir())
        torch.distributed.barrier()   # and before the next case makes slots
        reports[case] = picked, left
    return reports


@pytest.fixture(scope="module")
def transport_choices(tmp_path_factory):
    """One world of two ranks tries both cases: a directory both ranks see (shared) and one
    of its own per rank (a /dev/shm per container)."""
    root = tmp_path_factory.mktemp("shm")
    cases = {True: [root / "shm"] * 2, False: [root / "shm0", root / "shm1"]}
    for dirs in cases.values():
        for directory in dirs:
            directory.mkdir(exist_ok=True)
    return spawn_local(_transport_worker, 2, {case: [str(d) for d in dirs]
                                              for case, dirs in cases.items()})


@pytest.mark.slow
@pytest.mark.parametrize("shared", [True, False])
def test_shared_memory_is_used_only_where_every_rank_sees_the_same_files(transport_choices,
                                                                         shared):
    for report in transport_choices:
        picked, left = report[shared]
        assert left == []   # the slots' names are gone once mapped (or refused)
        if shared:
            assert picked == {"auto": "SharedMemoryTransport",
                              "shared_memory": "SharedMemoryTransport"}
        else:   # one host, but a /dev/shm of its own per rank: never a private file of zeros
            assert picked["auto"] == "ProcessGroupTransport"
            assert "the ranks do not share" in picked["shared_memory"]
