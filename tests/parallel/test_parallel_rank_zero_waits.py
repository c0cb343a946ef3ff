"""No rank waits in a collective for work rank 0 does alone (issue 28).

A trainer world of two gloo ranks whose process-group timeout is a few seconds (gloo
raises after it, as NCCL's watchdog would kill the job) works longer than that on rank 0
alone: a request to an engine pool, a stage computed on rank 0 (``stage(..., on="rank0")``),
M_0's conversion. Each completes on both ranks; rank 0's failure during such work
reaches the other rank as an error within a moment; a waiting rank gives up after its own
bound, naming the setting. A chunked generate request deals and seeds every sample as one
request would (and as colocated replicas do).

One spawn of the trainer world and one pool of two fake engine processes serve every
assertion: the work itself takes about 23 s (five pieces of 4 s, one of 2.5 s), starting
the six processes 10 to 30 s more on two busy cores.
"""

import dataclasses
import multiprocessing
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_tpo.parallel.launch import free_local_port
from megatron_tpo.parallel.local_launch import spawn_local
from megatron_tpo.rollout.config import BridgeConfig
from megatron_tpo.rollout.engine import SamplingParams

from seed_echo import SeedEcho

pytestmark = pytest.mark.slow

PROCESS_GROUP_TIMEOUT = 3.0   # seconds any collective of the trainer world may wait
LONGER = 4.0                  # rank 0's work: longer than that
ONE = SamplingParams(n=1, temperature=0.0, top_p=1.0, max_new_tokens=4, seed=0)
PROMPTS = [f"prompt {index}" for index in range(7)]
SEEDED = SamplingParams(n=2, temperature=1.0, top_p=1.0, max_new_tokens=4, seed=100)
CHUNK_SAMPLES = 6             # three prompts of SEEDED a request: chunks start off a replica


class SlowOrFailingSeedEcho(SeedEcho):
    """``SeedEcho`` that takes ``LONGER`` for a prompt starting with "slow", then fails for
    one ending in "failing"."""

    def generate(self, prompts, sampling):
        if any(prompt.startswith("slow") for prompt in prompts):
            time.sleep(LONGER)
        if any(prompt.endswith("failing") for prompt in prompts):
            raise ValueError("the engine failed on purpose")
        return super().generate(prompts, sampling)


def _engine_rank(engine_rank: int, bridge: BridgeConfig) -> None:
    import os

    from megatron_tpo.rollout.pool.bridge import open_engine_side
    from megatron_tpo.rollout.pool.server import EngineServer

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    EngineServer(SlowOrFailingSeedEcho(), open_engine_side(bridge, engine_rank)).serve()


def _outcome(work) -> dict:
    """What ``work()`` returned or raised on this rank, and when it ended."""
    try:
        return {"value": work(), "ended": time.monotonic()}
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}", "ended": time.monotonic()}


def _slow_conversion(policy, destination, tp, pp, **settings):
    from megatron_tpo.model.mcore_shards import MANIFEST

    time.sleep(LONGER)
    Path(destination).mkdir(parents=True)
    (Path(destination) / MANIFEST).write_text("{}")


def _both_ready(rank: int, root: Path) -> None:
    """Both ranks ready to start the world together: its rendezvous, too, waits at most
    the process group's timeout, and a loaded machine starts spawned ranks seconds apart."""
    (root / f"ready_{rank}").touch()
    deadline = time.monotonic() + 120
    while not all((root / f"ready_{other}").exists() for other in range(2)):
        assert time.monotonic() < deadline, "the other trainer rank did not start"
        time.sleep(0.01)


def _trainer_rank(rank, world_size, bridge: BridgeConfig, root: Path):
    # Everything imported before the world starts: no collective waits for an import.
    import torch

    import megatron_tpo.model.conversion as conversion
    from megatron_tpo.build import initial_weights
    from megatron_tpo.data.storage import IterationStore
    from megatron_tpo.loop import stage
    from megatron_tpo.parallel.collectives import rank_zero_result
    from megatron_tpo.parallel.launch import detect_distributed_env, start_distributed
    from megatron_tpo.rollout.pool.proxy import EnginePoolProxy
    from megatron_tpo.rollout.replicas import generate_on_all_ranks

    _both_ready(rank, root)
    start_distributed(detect_distributed_env(), timeout_seconds=PROCESS_GROUP_TIMEOUT)
    report = {}
    pool = EnginePoolProxy.connect(bridge)
    report["slow_request"] = _outcome(lambda: pool.generate(["slow", "quick"], ONE))
    report["failing_request"] = _outcome(
        lambda: pool.generate(["slow and failing", "quick"], ONE))
    report["one_request"] = pool.generate(PROMPTS, SEEDED)
    pool.config = dataclasses.replace(bridge, request_chunk_samples=CHUNK_SAMPLES)
    report["chunked"] = pool.generate(PROMPTS, SEEDED)
    pool.shutdown()
    report["colocated"] = generate_on_all_ranks(SlowOrFailingSeedEcho(), PROMPTS, SEEDED)

    run = SimpleNamespace(seed=0, rank_zero_timeout_seconds=60.0, initial_checkpoint=None,
                          policy=str(root / "hf"))
    parts = SimpleNamespace(store=IterationStore(root / "stages"), digest="test",
                            config=SimpleNamespace(run=run),
                            metrics=SimpleNamespace(log=lambda *args, **kwargs: None))

    def slow_pairs():
        time.sleep(LONGER)
        return [{"prompt": "p", "chosen": "a", "rejected": "b"}], {"pairs": 1}

    def failing_pairs():
        time.sleep(LONGER)
        raise ValueError("the pairs failed on purpose")

    report["slow_stage"] = _outcome(lambda: stage(parts, 0, "pairs", slow_pairs, on="rank0"))
    report["failing_stage"] = _outcome(
        lambda: stage(parts, 1, "pairs", failing_pairs, on="rank0"))

    conversion.hf_to_mcore = _slow_conversion
    layout = SimpleNamespace(run=run, model=SimpleNamespace(make_vocab_size_divisible_by=1),
                             parallel=SimpleNamespace(tensor_model_parallel_size=1,
                                                      pipeline_model_parallel_size=1))
    report["conversion"] = _outcome(lambda: initial_weights(layout, root / "run"))

    # Last: a rank that gave up leaves rank 0 alone in the closing broadcast.
    report["bound"] = _outcome(lambda: rank_zero_result(
        lambda: time.sleep(2.5), "a test's slow work", 1.0, "test.bound_seconds"))
    torch.distributed.destroy_process_group()   # spawn_local's teardown need not load megatron
    return report


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    root = tmp_path_factory.mktemp("waits")
    bridge = BridgeConfig(port=free_local_port(), engine_ranks=2, timeout_seconds=60.0,
                          request_timeout_seconds=60.0)
    context = multiprocessing.get_context("spawn")
    engines = [context.Process(target=_engine_rank, args=(rank, bridge)) for rank in range(2)]
    for engine in engines:
        engine.start()
    try:
        return spawn_local(_trainer_rank, 2, bridge, root)
    finally:
        for engine in engines:
            engine.join(timeout=30)
            if engine.is_alive():
                engine.kill()


def test_a_pool_request_longer_than_the_process_group_timeout_completes(reports):
    for report in reports:
        outcome = report["slow_request"]
        assert "error" not in outcome, outcome
        assert [output.texts for output in outcome["value"]] == [["slow @ 0"], ["quick @ 1"]]


def test_an_engine_failing_after_a_long_request_reaches_every_trainer_rank_at_once(reports):
    zero, one = (report["failing_request"] for report in reports)
    assert zero["error"].startswith("BridgeError: the engine pool at 127.0.0.1:")
    assert "engine rank 0: generate: ValueError: the engine failed on purpose" in zero["error"]
    assert one["error"].startswith("BridgeError: (from rank 0) a 'generate' request to the "
                                   "rollout.bridge pool: BridgeError: the engine pool at")
    assert "the engine failed on purpose" in one["error"]
    assert abs(one["ended"] - zero["ended"]) < 1.5


def test_chunked_requests_deal_and_seed_every_sample_as_one_request_does(reports):
    for report in reports:
        texts = [output.texts for output in report["one_request"]]
        # Prompt j: replica j % 2 of two, its (j // 2)-th prompt, seeded seed + replica.
        assert texts == [[f"prompt {j} @ {100 + j % 2 + (j // 2) * 2 + k}" for k in range(2)]
                         for j in range(len(PROMPTS))]
        assert [output.texts for output in report["chunked"]] == texts
        assert [output.texts for output in report["colocated"]] == texts


def test_a_rank_zero_stage_longer_than_the_process_group_timeout_completes(reports):
    for report in reports:
        outcome = report["slow_stage"]
        assert "error" not in outcome, outcome
        assert outcome["value"] == [{"prompt": "p", "chosen": "a", "rejected": "b"}]


def test_a_rank_zero_stage_failing_late_fails_every_rank_at_once_with_its_error(reports):
    zero, one = (report["failing_stage"] for report in reports)
    assert zero["error"] == "ValueError: the pairs failed on purpose"
    assert one["error"] == ("RankZeroFailed: (from rank 0) stage 'pairs' of iteration 1: "
                            "ValueError: the pairs failed on purpose")
    assert abs(one["ended"] - zero["ended"]) < 1.5


def test_converting_m0_longer_than_the_process_group_timeout_completes(reports):
    for report in reports:
        outcome = report["conversion"]
        assert "error" not in outcome, outcome
        assert outcome["value"].endswith("run/initial_weights/tp1_pp1")


def test_a_waiting_rank_gives_up_after_its_own_bound_naming_the_setting(reports):
    outcome = reports[1]["bound"]
    assert outcome["error"] == ("RankZeroFailed: rank 0 did not finish a test's slow work "
                                "within test.bound_seconds=1 s")
