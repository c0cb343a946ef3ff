"""plan/cost/tenants.py: every holder of a run's GPU memory with its bytes in each state,
what the memory ledger and ``tpo-run --dry-run`` check. A vLLM engine claims its share
of the GPU and must hold its weights, workspace and one whole sequence inside it; a
sleeping engine keeps only what its sleep level leaves; a judge's size comes from its
checkpoint's config.json, and one whose size cannot be known is refused.

Sizes are counted here by hand (the tiny model, ModelConfig's defaults) or are published
(Llama 3.2 1B's parameters)."""

import json

import pytest

from megatron_tpo.config import ConfigError, ParallelConfig, load_model_config
from megatron_tpo.judge.config import JudgeConfig, RewardModelJudgeConfig
from megatron_tpo.placement.ledger import ASLEEP, AWAKE, GIB, IN_USE, RELEASED, WEIGHTS_ONLY
from megatron_tpo.plan.cost import tenants
from megatron_tpo.rollout.config import RolloutConfig, VLLMConfig
from megatron_tpo.tpo_config import RunConfig, TPOConfig

# Embedding and output layer 1001 x 64 each; per layer q and o 64 x 64, k and v 64 x 32
# (2 of 4 heads' width), the SwiGLU MLP 3 x 64 x 176, two norms of 64; the final norm.
TINY_PARAMETERS = 2 * 1001 * 64 + 4 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 176 + 2 * 64) + 64
LLAMA_1B_PARAMETERS = 1_235_814_400
# Llama 3.2 1B's KV cache per token at TP=1: K and V x 16 layers x 8 KV heads x 64 x bf16.
LLAMA_1B_KV_PER_TOKEN = 2 * 16 * 8 * 64 * 2
WORKSPACE = 2 * GIB      # plan/cost/engines.py's ENGINE_WORKSPACE_GIB


@pytest.fixture(scope="module")
def llama_1b():
    return load_model_config("llama3.2_1b")


def _run(**groups) -> TPOConfig:
    groups.setdefault("judge", JudgeConfig(kind="format"))   # a rule judge holds nothing
    return TPOConfig(**groups)


def test_an_engine_claims_its_share_and_must_hold_weights_workspace_and_one_sequence(llama_1b):
    weights = 2 * LLAMA_1B_PARAMETERS   # bf16
    needed = weights + WORKSPACE + 4096 * LLAMA_1B_KV_PER_TOKEN
    assert tenants.engine_claim(llama_1b, VLLMConfig(gpu_memory_utilization=1.0), 4096, needed,
                                "rollout.vllm") == (needed, weights, "")
    claim, held, refusal = tenants.engine_claim(
        llama_1b, VLLMConfig(gpu_memory_utilization=1.0), 4096, needed - 1, "rollout.vllm")
    assert (claim, held) == (needed - 1, weights) and refusal
    # Half of 8 GiB: 2.3 GiB of weights + 2 GiB of workspace + 0.125 GiB of KV do not fit.
    assert tenants.engine_claim(llama_1b, VLLMConfig(gpu_memory_utilization=0.5), 4096, 8 * GIB,
                                "judge.pairwise.vllm")[2] == (
        "llama3.2_1b weights 2.3 GiB per GPU at judge.pairwise.vllm.tensor_parallel_size=1, its "
        "workspace and one 4096-token sequence of KV cache need 4.4 GiB, more than "
        "judge.pairwise.vllm.gpu_memory_utilization=0.5 x 8.0 GiB = 4.0 GiB")
    # At TP=2 each GPU holds half the weights and half the KV heads: it fits.
    assert tenants.engine_claim(
        llama_1b, VLLMConfig(gpu_memory_utilization=0.5, tensor_parallel_size=2), 4096, 8 * GIB,
        "rollout.vllm") == (4 * GIB, LLAMA_1B_PARAMETERS, "")


def test_a_given_kv_cache_size_is_claimed_instead_of_a_share(llama_1b):
    vllm = VLLMConfig(kv_cache_memory_bytes=GIB)
    assert tenants.engine_claim(llama_1b, vllm, 4096, 1.0, "rollout.vllm") == (
        2 * LLAMA_1B_PARAMETERS + WORKSPACE + GIB, 2 * LLAMA_1B_PARAMETERS, "")


def _engine_states(llama_1b, **vllm):
    config = _run(model=llama_1b, run=RunConfig(hardware="h100-80gb"),
                  rollout=RolloutConfig(engine="vllm", vllm=VLLMConfig(**vllm)))
    spec = tenants.policy_engine_spec(config, "gpu", 80 * GIB)
    return dict(spec.bytes_by_state), spec.detail


def test_a_sleeping_engine_keeps_what_its_level_leaves(llama_1b):
    claim, weights = 0.5 * 80 * GIB, 2 * LLAMA_1B_PARAMETERS
    for level in (1, 2):
        assert _engine_states(llama_1b, sleep_level=level) == (
            {AWAKE: claim, WEIGHTS_ONLY: weights + WORKSPACE, ASLEEP: 1.5 * GIB}, f"level {level}")
    assert _engine_states(llama_1b, sleep_level=0) == (
        {AWAKE: claim, WEIGHTS_ONLY: claim, ASLEEP: claim},
        "level 0: pauses scheduling, frees nothing")
    assert _engine_states(llama_1b, sleep_mode=False) == (
        {AWAKE: claim, WEIGHTS_ONLY: claim, ASLEEP: claim}, "no sleep mode: frees nothing")


def test_an_hf_engine_holds_float32_weights_and_sleeps_on_the_host():
    spec = tenants.policy_engine_spec(_run(), "cpu", 80 * GIB)
    assert dict(spec.bytes_by_state) == {AWAKE: 4 * TINY_PARAMETERS,
                                         WEIGHTS_ONLY: 4 * TINY_PARAMETERS, ASLEEP: 0.0}
    assert spec.detail == "on the host" and spec.refusal == ""


@pytest.mark.parametrize("tp, pp, world, rollout, count", [
    (1, 1, 1, RolloutConfig(), 0),
    (1, 1, 4, RolloutConfig(), 2),                   # the world's, DP's
    (2, 1, 2, RolloutConfig(), 2),                   # the world's, TP's (DP is 1)
    (2, 2, 8, RolloutConfig(), 5),                   # world, TP, DP, and both PP neighbours
    (1, 1, 1, RolloutConfig(engine="vllm", vllm=VLLMConfig(tensor_parallel_size=2)), 1),
    (1, 1, 1, RolloutConfig(engine="vllm", placement="separate",   # the pool's own GPUs
                            vllm=VLLMConfig(tensor_parallel_size=2)), 0),
])
def test_a_rank_holds_a_communicator_per_group_it_talks_in(tp, pp, world, rollout, count):
    config = _run(rollout=rollout, parallel=ParallelConfig(tensor_model_parallel_size=tp,
                                                           pipeline_model_parallel_size=pp))
    assert tenants.nccl_communicators(config, world) == count


def _by_gpu(specs):
    gpus = {}
    for spec in specs:
        gpus.setdefault(spec.gpu, []).append(spec.name)
    return gpus


def test_every_distinct_pipeline_stage_and_each_pool_is_a_gpu_of_its_own():
    trainer = [tenants.RESERVE, tenants.NCCL, *tenants.TRAINER_STATE,
               *tenants.TRAINING_TRANSIENTS, tenants.SENT_BUCKETS]
    colocated = _run(parallel=ParallelConfig(pipeline_model_parallel_size=4))
    gpus = _by_gpu(tenants.run_tenants(colocated, 4))
    # The first stage (embedding, most micro-batches in flight) and the last (logits).
    assert list(gpus) == ["cpu of pipeline stage 0", "cpu of pipeline stage 3"]
    for names in gpus.values():   # on a CPU run the host plays the GPU: the engine is there
        assert sorted(names) == sorted(trainer + [tenants.POLICY_ENGINE])

    separate = _run(rollout=RolloutConfig(placement="separate"))
    specs = tenants.run_tenants(separate, 1)
    assert _by_gpu(specs) == {
        "cpu of pipeline stage 0": trainer,   # no policy engine beside the trainer
        "cpu of the policy's engine pool": [tenants.RESERVE, tenants.POLICY_POOL,
                                            tenants.RECEIVED_BUCKETS]}
    buckets = {spec.name: dict(spec.bytes_by_state) for spec in specs
               if "buckets" in spec.name}
    # Sent and received alike: the bucket being filled and the one in flight.
    assert buckets == {name: {IN_USE: 2 * separate.weight_sync.bucket_bytes, RELEASED: 0.0}
                       for name in (tenants.SENT_BUCKETS, tenants.RECEIVED_BUCKETS)}


def test_the_gpu_is_named_by_the_runs_hardware_and_a_cpu_run_has_no_capacity():
    gpu_run = _run(run=RunConfig(hardware="h100-80gb"))
    assert tenants.trainer_gpu(gpu_run, 3) == "h100-80gb GPU of pipeline stage 3"
    assert tenants.gpu_capacity(gpu_run) == pytest.approx(79.6 * GIB)   # configs/hardware
    assert tenants.gpu_capacity(_run()) is None and tenants.gpu_name(_run()) == "cpu"


def test_a_reward_model_is_sized_from_its_checkpoints_config(tmp_path):
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "config.json").write_text(json.dumps({   # the tiny model, as HF names it
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 176,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 1001}))
    path = str(tmp_path / "rm")
    forward = 8 * 4096 * 176 * 2 * 2   # a batch's gate and up projections, 8 x 4096 tokens
    on_host = _run(judge=JudgeConfig(kind="reward_model",
                                     reward_model=RewardModelJudgeConfig(path=path)))
    [spec] = tenants.judge_specs(on_host, ["cpu"], 80 * GIB)
    assert (spec.name, spec.detail) == (tenants.REWARD_MODEL, "kept on the GPU")
    assert dict(spec.bytes_by_state) == {AWAKE: 4 * TINY_PARAMETERS + forward,
                                         ASLEEP: 4 * TINY_PARAMETERS}
    on_gpu = _run(run=RunConfig(hardware="h100-80gb"), judge=JudgeConfig(
        kind="reward_model", reward_model=RewardModelJudgeConfig(path=path, device="cuda",
                                                                 dtype="bfloat16")))
    specs = tenants.judge_specs(on_gpu, ["stage 0", "stage 1"], 80 * GIB)
    assert [spec.gpu for spec in specs] == ["stage 0", "stage 1"]
    assert dict(specs[0].bytes_by_state) == {AWAKE: 2 * TINY_PARAMETERS + forward, ASLEEP: 0.0}
    assert specs[0].detail == "offloaded to the host"


def test_a_judge_whose_size_cannot_be_known_is_refused_naming_the_setting(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError) as refused:
        tenants.checkpoint_model_config(str(empty), "judge.pairwise.model")
    assert str(refused.value) == (f"judge.pairwise.model={empty}: no config.json there (not a "
                                  "Hugging Face checkpoint directory)")
    with pytest.raises(ConfigError) as refused:   # a hub id no cache holds
        tenants.checkpoint_model_config("no-such-org/no-such-judge-7b", "judge.reward_model.path")
    assert str(refused.value).startswith("judge.reward_model.path=no-such-org/no-such-judge-7b: "
                                         "no config.json there, and not a hub id in the local")
    assert "hf download no-such-org/no-such-judge-7b --local-dir DIR" in str(refused.value)
