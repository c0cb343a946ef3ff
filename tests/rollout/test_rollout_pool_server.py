"""rollout/pool/server.py: how a separate pool's ranks share a request. Replica ``r`` of
``R`` takes items ``r, r + R, ...`` of the whole call and seeds it with ``seed + r``, as
colocated replicas do; a call sent in chunks (``EnginePoolProxy.generate``) must deal and
seed every sample exactly as the whole call would. Every rank of a replica computes, its
first rank answers. (The requests' transport, over two processes: test_rollout_pool.py.)"""

import pytest
import torch

from megatron_tpo.rollout.engine import SamplingParams
from megatron_tpo.rollout.pool.bridge import Bridge
from megatron_tpo.rollout.pool.server import EngineServer, replica_seed, replica_share

from seed_echo import SeedEcho

PROMPTS = [f"prompt {index}" for index in range(7)]
SAMPLING = SamplingParams(n=2, seed=100)


def _server(engine_rank: int, engine_ranks: int, ranks_per_engine: int = 1) -> EngineServer:
    """Engine rank ``engine_rank`` of a pool (bridge rank 0 is the trainer's): only the
    requests' handling, which touches neither the store nor the process groups."""
    bridge = Bridge(store=None, control=None, data=None, data_device=torch.device("cpu"),
                    rank=1 + engine_rank, size=1 + engine_ranks, where="127.0.0.1:29700")
    return EngineServer(SeedEcho(), bridge, ranks_per_engine)


def test_a_replica_takes_every_rth_item_of_the_whole_call():
    assert replica_share(7, 0, 3) == [0, 3, 6] and replica_share(7, 2, 3) == [2, 5]
    # A chunk of items 4, 5, 6 of the call: replica 0 has item 6, replica 1 item 4.
    assert [replica_share(3, r, 3, first=4) for r in range(3)] == [[2], [0], [1]]
    assert replica_share(1, 1, 3, first=0) == []


def _whole_call_seeds(replicas: int):
    """Each prompt's sample seeds when the call is one request, as colocated replicas
    draw them: replica r's j-th prompt (prompt r + j R), sample k: seed + r + j n + k."""
    n, seed = SAMPLING.n, SAMPLING.seed
    return {index: [f"{prompt} @ {seed + index % replicas + (index // replicas) * n + k}"
                    for k in range(n)] for index, prompt in enumerate(PROMPTS)}


@pytest.mark.parametrize("replicas", [1, 2, 3])
@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
def test_a_chunked_call_deals_and_seeds_every_sample_as_the_whole_call(replicas, chunk):
    servers = [_server(rank, replicas) for rank in range(replicas)]
    seeds = {}
    for first in range(0, len(PROMPTS), chunk):
        request = PROMPTS[first:first + chunk]
        for server in servers:
            for local, output in server._generate((request, SAMPLING, first)):
                assert output.prompt == PROMPTS[first + local]
                assert first + local not in seeds, "a prompt answered twice"
                seeds[first + local] = output.texts
    assert seeds == _whole_call_seeds(replicas)


def test_without_a_seed_every_replica_samples_unseeded():
    assert replica_seed(SamplingParams(seed=None), 1, 2, first=5) is None
    assert replica_seed(SamplingParams(n=3, seed=0), 1, 2, first=5) == 1 + 2 * 3


def test_every_rank_of_a_replica_computes_and_its_first_rank_answers():
    """Two replicas of two ranks (tensor parallel engines): ranks 0, 1 and 2, 3."""
    servers = [_server(rank, 4, ranks_per_engine=2) for rank in range(4)]
    assert [(s.replica, s.replicas, s.replies) for s in servers] == [
        (0, 2, True), (0, 2, False), (1, 2, True), (1, 2, False)]
    replies = [s._generate((PROMPTS[:3], SAMPLING, 0)) for s in servers]
    assert [s.engine.asked for s in servers] == [[PROMPTS[0:3:2]]] * 2 + [[PROMPTS[1:2]]] * 2
    assert replies[1] is None and replies[3] is None
    assert [index for index, _ in replies[0]] == [0, 2] and [i for i, _ in replies[2]] == [1]
    sequences = [[1], [1, 2], [1, 2, 3]]
    assert [s._score(sequences) for s in servers] == [[(0, [1.0]), (2, [3.0])], None,
                                                      [(1, [2.0])], None]
    # The parity probes: every replica scores every sequence.
    assert [s._score_everywhere(sequences) for s in servers] == [[[1.0], [2.0], [3.0]], None] * 2


def test_a_replica_with_nothing_to_do_does_not_call_its_engine():
    server = _server(2, 3)
    assert server._generate((PROMPTS[:2], SAMPLING, 0)) == []
    assert server._score([[1, 2]]) == [] and server.engine.asked == []
