"""rollout.placement=separate on localhost: a trainer world (TP=2, gloo) after one DPO step
and a tpo-engine pool of two HF engine processes, meeting over the bridge.

After ``push_weights`` through the pool proxy the pool's engines score the probes as
megatron does; seeded generation equals that of colocated HF engines holding the same
weights; a tensor corrupted on the bridge is named by the parity check; an engine's
error reaches every trainer rank; the pool exits cleanly when the trainer asks it to;
a missing side fails within its timeout, naming the address and port it waited on; and
one TPO iteration through a pool stores the rows a colocated one stores.

One spawn of the trainer world and one pool serve every multi-process assertion but the
last.
"""

import time
from pathlib import Path

import pytest
import torch

from llama_fixtures import megatron_shards, save_random_hf_llama, tiny_model_config
from megatron_tpo.config import ConfigError, ParallelConfig
from megatron_tpo.parallel.launch import free_local_port
from megatron_tpo.parallel.local_launch import spawn_local
from megatron_tpo.rollout.config import BridgeConfig, RolloutConfig, VLLMConfig
from megatron_tpo.rollout.engine import SamplingParams
from megatron_tpo.rollout.pool.bridge import BridgeError, open_engine_side
from megatron_tpo.rollout.pool.proxy import EnginePoolProxy
from megatron_tpo.train.config import DPOTrainingConfig
from megatron_tpo.train.dpo_batch import TokenizedPair

from tiny_hf import tiny_tokenizer

from tpo_fixtures import stage_rows, tiny_run_overrides
from engine_processes import start_engine_world, stop_engine_world
from weight_corruption import CORRUPTED, assert_corrupted_tensor_named

TRAINING = DPOTrainingConfig(beta=0.5, lr=5e-3, warmup_steps=0, train_steps=4,
                             micro_batch_pairs=1, pad_to_multiple_of=8, clip_grad=0.0)
BUCKET_BYTES = 300_000   # several buckets for the tiny model (see test_rollout_weight_sync)
PROMPTS = ["the cat", "my dog is", "a b c", "the sun is", "here is my"]
SEEDED = SamplingParams(n=2, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=5)


class WireCorruptingPool(EnginePoolProxy):
    """Sends one tensor wrong over the bridge once ``corrupt`` is set."""

    corrupt = False

    def _send_bucket(self, buffer, layout):
        for name, offset, shape in layout:
            if self.corrupt and name == CORRUPTED:
                buffer = buffer.clone()
                buffer[offset:offset + torch.Size(shape).numel()] += 0.05
        super()._send_bucket(buffer, layout)


def _trainer_worker(rank, world_size, model, shard_root, hf_dir, pairs, bridge, probes):
    from transformers import LlamaForCausalLM

    from megatron_tpo.parallel import init_megatron, shutdown_megatron
    from megatron_tpo.rollout.factory import trainer_ranks_per_engine
    from megatron_tpo.rollout.hf_engine import HFRolloutEngine
    from megatron_tpo.rollout.replicas import generate_on_all_ranks
    from megatron_tpo.train.dpo_trainer import DPOTrainer
    from megatron_tpo.weights import WeightSyncConfig, WeightSyncError, push_weights
    from megatron_tpo.weights.parity import trainer_token_logprobs

    parallel = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=1)
    init_megatron(parallel, model)
    trainer = DPOTrainer(model, parallel, TRAINING, shard_root)
    trainer.step(trainer.with_reference_logprobs(pairs))
    checked = WeightSyncConfig(bucket_bytes=BUCKET_BYTES, parity_tolerance=1e-4)

    pool = WireCorruptingPool.connect(bridge)
    report = {"metrics": push_weights(pool, trainer.ddp_chunks, model, checked, probes),
              "pool_scores": pool.score(probes),
              "each_replica": pool.score_each_replica(probes),
              "megatron_scores": trainer_token_logprobs(trainer.ddp_chunks, probes,
                                                        model.vocab_size)}
    separate = RolloutConfig(placement="separate", bridge=bridge)
    report["separate"] = generate_on_all_ranks(pool, PROMPTS, SEEDED,
                                               trainer_ranks_per_engine(separate, world_size))
    # Colocated: this rank's own HF engine, given the same weights the same way.
    colocated = HFRolloutEngine(LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32),
                                tiny_tokenizer())
    report["m0_scores"] = colocated.score(probes)
    push_weights(colocated, trainer.ddp_chunks, model, checked, probes)
    report["colocated"] = generate_on_all_ranks(
        colocated, PROMPTS, SEEDED, trainer_ranks_per_engine(RolloutConfig(), world_size))
    report["colocated_scores"] = colocated.score(probes)

    pool.corrupt = True
    try:
        push_weights(pool, trainer.ddp_chunks, model, checked, probes)
    except WeightSyncError as error:
        report["corrupted"] = str(error)
    report["version"] = pool.weight_version
    try:   # the second sequence, replica 1's share, holds a token id outside the vocabulary
        pool.score([[1, 2, 3], [1, model.vocab_size + 5, 3]])
    except BridgeError as error:
        report["engine_error"] = str(error)
    pool.shutdown()
    shutdown_megatron()
    return report


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    model = tiny_model_config()
    root = tmp_path_factory.mktemp("pool")
    hf_dir = save_random_hf_llama(model, root / "hf")
    tiny_tokenizer().save_pretrained(hf_dir)   # tpo-engine loads the checkpoint's tokenizer
    shard_root = megatron_shards(model, hf_dir, root / "tp2", 2, 1)
    generator = torch.Generator().manual_seed(7)

    def tokens(count):
        return torch.randint(0, model.vocab_size, (count,), generator=generator).tolist()

    pairs = [TokenizedPair(prompt=tokens(4), chosen=tokens(6), rejected=tokens(5))
             for _ in range(2)]
    probes = [tokens(12) for _ in range(3)]
    bridge = BridgeConfig(port=free_local_port(), engine_ranks=2, timeout_seconds=60.0)
    pool = start_engine_world([f"run.policy={hf_dir}", "rollout=tiny", "rollout.placement=separate",
                        f"rollout.bridge.port={bridge.port}", "rollout.bridge.engine_ranks=2",
                        f"rollout.bridge.timeout_seconds={bridge.timeout_seconds}"], 2, root)
    try:
        reports = spawn_local(_trainer_worker, 2, model, shard_root, hf_dir, pairs, bridge,
                              probes)
    finally:
        exit_codes, logs = stop_engine_world(pool, root)
    return reports, exit_codes, logs


@pytest.mark.slow
def test_the_pool_scores_the_probes_as_megatron_does_after_a_dpo_step(run):
    reports, _, _ = run
    for report in reports:
        assert report["metrics"]["version"] == 1
        assert 0 <= report["metrics"]["max_abs_logprob_diff"] < 1e-4
        pool = torch.tensor(report["pool_scores"], dtype=torch.float64)
        assert pool.shape == (3, 11)   # both replicas scored some of the three probes
        assert (pool - report["megatron_scores"]).abs().max() < 1e-4
        colocated = torch.tensor(report["colocated_scores"], dtype=torch.float64)
        assert (pool - colocated).abs().max() < 1e-4
        # The DPO step moved the weights: M_0's log-probs are visibly off.
        assert (torch.tensor(report["m0_scores"]) - pool).abs().max() > 1e-3
    assert reports[0]["pool_scores"] == reports[1]["pool_scores"]
    # What the parity check reads: each of the two replicas scored every probe.
    for report in reports:
        each = torch.tensor(report["each_replica"], dtype=torch.float64)
        assert each.shape == (2, 3, 11)
        assert (each - report["megatron_scores"]).abs().max() < 1e-4


@pytest.mark.slow
def test_seeded_generation_from_the_pool_equals_colocated_engines(run):
    reports, _, _ = run
    for report in reports:
        separate = [output.token_ids for output in report["separate"]]
        colocated = [output.token_ids for output in report["colocated"]]
        assert len(separate) == len(PROMPTS) and all(len(ids) == 2 for ids in separate)
        assert separate == colocated
        assert [o.prompt for o in report["separate"]] == PROMPTS
        # Replicas draw with their own seeds: the two samples of a prompt differ somewhere.
        assert any(ids[0] != ids[1] for ids in separate)


@pytest.mark.slow
def test_a_tensor_corrupted_on_the_bridge_is_named_by_the_parity_check(run):
    reports, _, _ = run
    for report in reports:
        assert_corrupted_tensor_named(report["corrupted"], rank=0)
        assert report["version"] == 2


@pytest.mark.slow
def test_an_engine_error_reaches_every_trainer_rank_and_the_pool_serves_on(run):
    reports, exit_codes, _ = run
    for report in reports:
        assert "the engine pool at 127.0.0.1:" in report["engine_error"]
        assert "engine rank 1: score: IndexError" in report["engine_error"]
    assert reports[1]["engine_error"].startswith("(from rank 0) a 'score' request to the "
                                                 "rollout.bridge pool: BridgeError: ")
    assert exit_codes == [0, 0]   # both ranks went on to answer the shutdown request


@pytest.mark.slow
def test_the_pool_stops_when_the_trainer_asks(run):
    _, exit_codes, logs = run
    assert exit_codes == [0, 0], logs


def test_a_missing_pool_fails_within_the_timeout_naming_address_and_port():
    port = free_local_port()
    started = time.monotonic()
    with pytest.raises(BridgeError, match=f"no engine pool at 127.0.0.1:{port}: 0 of "
                                          "rollout.bridge.engine_ranks=2 tpo-engine ranks"):
        EnginePoolProxy.connect(BridgeConfig(port=port, engine_ranks=2, timeout_seconds=1.0))
    assert time.monotonic() - started < 5


@pytest.mark.slow
def test_an_engine_without_a_trainer_fails_within_the_timeout_naming_address_and_port():
    port = free_local_port()
    started = time.monotonic()
    with pytest.raises(BridgeError, match=f"engine rank 0: no trainer at 127.0.0.1:{port}"):
        open_engine_side(BridgeConfig(port=port, timeout_seconds=1.0), 0)
    assert time.monotonic() - started < 10


def test_separate_placement_settings_are_checked():
    with pytest.raises(ConfigError, match="rollout.placement='apart'"):
        RolloutConfig(placement="apart").validate()
    with pytest.raises(ConfigError, match="rollout.bridge.engine_ranks=3: must be a positive "
                                          r"multiple of the ranks per engine \(2"):
        RolloutConfig(engine="vllm", placement="separate", vllm=VLLMConfig(tensor_parallel_size=2),
                      bridge=BridgeConfig(engine_ranks=3)).validate()
    with pytest.raises(ConfigError, match="rollout.bridge.backend='mpi'"):
        RolloutConfig(placement="separate", bridge=BridgeConfig(backend="mpi")).validate()
    with pytest.raises(ConfigError, match="rollout.bridge.timeout_seconds=0"):
        RolloutConfig(placement="separate", bridge=BridgeConfig(timeout_seconds=0)).validate()
    # Colocated engines never look at the bridge settings.
    RolloutConfig(engine="vllm", vllm=VLLMConfig(tensor_parallel_size=8)).validate()
    # What tpo-engine checks of them at its start: tests/cli/test_cli_engine.py.


def test_tpo_engine_refuses_a_colocated_config_with_exit_status_2(capsys):
    from megatron_tpo.cli.engine import main

    assert main(["rollout=tiny"]) == 2
    assert "tpo-engine: error: rollout.placement='colocated'" in capsys.readouterr().err


def _one_iteration(root: Path, settings, world_size: int = 1) -> dict:
    from megatron_tpo.cli.run import compose_config, run_rank

    config = compose_config(tiny_run_overrides(root, iterations=1) + settings)
    config.validate(world_size)
    spawn_local(run_rank, world_size, config)
    return {stage: stage_rows(root / "run", 0, stage)
            for stage in ("rollouts", "judgments", "pairs", "reference", "heldout")}


# (trainer ranks, engine ranks, settings): the format judge on one rank; a pairwise judge
# (the policy judging itself) on a TP=2 trainer, which must put every trainer rank in front
# of the pool for its verdicts, as the rollouts do. Two pool replicas split the prompts as
# the two colocated replicas do, so the rows are the same.
ITERATION_CASES = {
    "format_judge": (1, 1, []),
    "pairwise_judge_tp2": (2, 2, ["parallel=tp2_pp1", "judge=pairwise",
                                  "judge.pairwise.sampling.max_new_tokens=4",
                                  "judge.pairwise.max_pairs_per_prompt=2"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(ITERATION_CASES))
def test_a_tpo_iteration_with_a_separate_pool_stores_the_rows_of_a_colocated_one(
        tmp_path, monkeypatch, case):
    trainer_ranks, engine_ranks, settings = ITERATION_CASES[case]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")   # both engines compute with one thread
    colocated_root, separate_root = tmp_path / "colocated", tmp_path / "separate"
    colocated_root.mkdir()
    separate_root.mkdir()
    colocated = _one_iteration(colocated_root, settings, trainer_ranks)
    separate_settings = settings + [
        "rollout.placement=separate", f"rollout.bridge.port={free_local_port()}",
        f"rollout.bridge.engine_ranks={engine_ranks}", "rollout.bridge.timeout_seconds=120"]
    pool = start_engine_world(tiny_run_overrides(separate_root, iterations=1) + separate_settings,
                              engine_ranks, separate_root)
    try:
        separate = _one_iteration(separate_root, separate_settings, trainer_ranks)
    finally:
        # tpo-run never calls shutdown itself: the proxy stops the pool when rank 0 exits.
        exit_codes, logs = stop_engine_world(pool, separate_root)
    assert exit_codes == [0] * engine_ranks, logs
    assert colocated["rollouts"] and colocated["reference"]
    for stage, rows in colocated.items():
        assert separate[stage] == rows, stage
