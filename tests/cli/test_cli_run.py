"""tpo-run's config: composed with Hydra, refused whole and by name before any work."""


import pytest

from tpo_fixtures import tiny_run_overrides

from megatron_tpo.cli.run import compose_config, main
from megatron_tpo.config import ConfigError
from megatron_tpo.data.chat import apply_thought_chat_template


@pytest.fixture(scope="module")
def overrides(tmp_path_factory):
    return tiny_run_overrides(tmp_path_factory.mktemp("tiny"))


@pytest.mark.slow
@pytest.mark.parametrize("bad, named", [
    (["model.bogus=1"], "model.bogus: no such setting; model has name, num_layers"),
    (["train.lrr=1e-6"], "train.lrr: no such setting; did you mean train.lr"),
    (["rollout.vllm.gpu_mem=0.5"],
     "no such setting; did you mean rollout.vllm.gpu_memory_utilization?"),
    (["+model.bogus=1"], "Key 'bogus' not in 'ModelConfig'"),
    (["train.lr=abc"], "train.lr"),
    (["train.lr=-1"], "train.lr=-1.0"),
    (["thought=nothere"], "Could not find 'thought/nothere'"),
    (["parallel=tp2_pp2", "model.num_query_groups=1"],
     "parallel.tensor_model_parallel_size=2 does not divide model.num_query_groups=1"),
    (["prompts.path=/nonexistent/prompts.jsonl"], "prompts.path=/nonexistent/prompts.jsonl: file"),
    (["model.num_layers=4"], "model.num_layers=4, but run.policy="),
    (["run.pairs_per_step=3", "train.micro_batch_pairs=2"], "run.pairs_per_step=3"),
    (["rollout.sampling.max_new_tokens=250"], "rollout.sampling.max_new_tokens=250"),
    (["judge.length_control.rho=-0.1"], "judge.length_control.rho=-0.1: must be >= 0"),
    # megatron's LR scheduler refuses it too, but with a bare assert once the run started.
    (["train.warmup_steps=2", "train.train_steps=2"],
     "train.warmup_steps=2, train.train_steps=2: need 0 <= warmup_steps < train_steps"),
    (["preference.truncated=bogus"], "preference.truncated='bogus': must be one of"),
    (["preference.parse_failures=keep"], "preference.parse_failures='keep': must be one of"),
    (["rollout.engine=vllm", "rollout.vllm.kv_cache_memory_bytes=49151"],
     "rollout.vllm.kv_cache_memory_bytes=49151 cannot hold one sequence of 256 tokens"),
])
def test_a_bad_override_stops_before_any_work_and_names_the_key(overrides, bad, named, capsys,
                                                                 tmp_path):
    run_dir = tmp_path / "never_created"
    assert main(["--dry-run", *overrides, f"run.dir={run_dir}", *bad]) == 2
    error = capsys.readouterr().err
    assert "tpo-run: error:" in error and named in error, error
    assert main([*overrides, f"run.dir={run_dir}", *bad]) == 2
    assert not run_dir.exists()


def test_show_config_prints_every_setting_once_after_the_overrides_with_its_doc(capsys):
    from omegaconf import DictConfig, OmegaConf

    overrides = ["experiment=tiny_cpu", "train.lr=1e-6", "judge.format.max_chars=200",
                 "rollout.sampling.stop=[DONE]"]
    # Nothing is checked or read: the tiny run's assets need not exist.
    assert main(["--show-config", *overrides]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "train.lr = 1e-06  # Adam's peak learning rate, after a linear warm-up, then " \
           "decayed to min_lr at train_steps." in lines
    assert any(line.startswith('judge.format.max_chars = 200  # ') for line in lines)
    assert any(line.startswith('rollout.sampling.stop = ["DONE"]  # Strings that end a '
                               'sample as EOS does') for line in lines)
    assert any(line.startswith('model.name = "tiny_tpo"  # ') for line in lines)
    assert any(line.startswith('run.policy = "runs/tiny/assets/policy"  # M_0: a Hugging Face')
               for line in lines)
    keys = [line.partition(" = ")[0] for line in lines]
    assert len(keys) == len(set(keys))

    def leaves(node) -> int:
        return sum(leaves(node[name]) if isinstance(node._get_node(name), DictConfig)
                   and not node._get_node(name)._is_none() else 1 for name in node.keys())

    assert len(keys) == leaves(OmegaConf.structured(compose_config(overrides)))


def test_show_config_is_not_mixed_with_a_dry_run(capsys):
    assert main(["--show-config", "--dry-run"]) == 2
    assert "--dry-run, --show-config: give one of them" in capsys.readouterr().err


def test_the_baseline_differs_from_tpo_in_the_thought_prompt_only(overrides):
    tpo = compose_config(overrides + ["thought=generic"])
    baseline = compose_config(overrides + ["thought=direct"])
    tpo_fields, baseline_fields = tpo.digest_fields(), baseline.digest_fields()
    assert [k for k in tpo_fields if tpo_fields[k] != baseline_fields[k]] == ["thought"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tpo.run.policy)
    asked = apply_thought_chat_template(tokenizer, "cat dog", tpo.thought)
    direct = apply_thought_chat_template(tokenizer, "cat dog", baseline.thought)
    assert direct == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\ncat dog"
                      "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "Here is my thought process:" in asked and asked.endswith(
        "User query: cat dog<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.mark.slow
def test_a_requeued_run_on_other_nodes_keeps_its_stages_but_other_sampling_does_not(overrides):
    from megatron_tpo.data.storage import config_hash

    def digest(*changes):
        return config_hash(compose_config(overrides + list(changes)).digest_fields())

    plain = digest()
    # How weights and checkpoints move, and where the engines sit, decide no stage output.
    assert digest("rollout.placement=separate", "rollout.bridge.address=node7",
                  "rollout.bridge.port=31000", "weight_sync.bucket_bytes=4096",
                  "weight_sync.transport=broadcast", "checkpoint.keep_last=5",
                  "run.iterations=9") == plain
    assert digest("rollout.sampling.temperature=0.5") != plain
    assert digest("run.initial_checkpoint=/some/dist_checkpoint") != plain


def _kv_cache_refusal(overrides, *settings):
    config = compose_config(overrides + ["rollout.engine=vllm", *settings])
    try:
        config.validate(world_size=1)
    except ConfigError as error:
        return str(error)
    return None


@pytest.mark.slow
def test_a_kv_cache_that_cannot_hold_one_sequence_is_refused_with_the_bytes_and_the_fix(
        overrides):
    """vLLM refuses to start unless its KV cache holds one max_model_len sequence in whole
    128-token blocks (CPU build) plus the block its pool holds back. The tiny model: 2 layers
    x K and V x 2 query groups x head_dim 8 x 2 bytes (bf16) = 128 bytes a token."""
    # max_model_len unset: vLLM takes max_position_embeddings, 256 tokens = 2 blocks + 1.
    assert _kv_cache_refusal(overrides, "rollout.vllm.kv_cache_memory_bytes=49152") is None
    assert _kv_cache_refusal(overrides, "rollout.vllm.kv_cache_memory_bytes=49151") == (
        "rollout.vllm.kv_cache_memory_bytes=49151 cannot hold one sequence of 256 tokens "
        "(model.max_position_embeddings, vLLM's default max_model_len): vLLM needs 49152 "
        "bytes (blocks of 128 tokens for it, plus one, at 128 bytes a token per engine rank "
        "in bfloat16) and refuses to start. Set rollout.vllm.max_model_len=<n> (this budget "
        "holds n <= 128) or rollout.vllm.kv_cache_memory_bytes >= 49152")
    # The fixes it names: a shorter max_model_len (129 tokens already take a second block),
    # or more bytes; float32 doubles them, TP=2 halves them (one query group a rank).
    assert _kv_cache_refusal(overrides, "rollout.vllm.kv_cache_memory_bytes=49151",
                             "rollout.vllm.max_model_len=128") is None
    assert "needs 49152 bytes" in _kv_cache_refusal(
        overrides, "rollout.vllm.kv_cache_memory_bytes=49151", "rollout.vllm.max_model_len=129")
    assert "needs 98304 bytes" in _kv_cache_refusal(
        overrides, "rollout.vllm.kv_cache_memory_bytes=49152", "rollout.vllm.dtype=float32")
    assert _kv_cache_refusal(overrides, "rollout.vllm.kv_cache_memory_bytes=24576",
                             "rollout.vllm.tensor_parallel_size=2") is None
    # Without an explicit size vLLM sizes the cache from gpu_memory_utilization: no check.
    assert _kv_cache_refusal(overrides) is None


BROKEN_LINE = '{"instruction": "a"}\n{oops\n'
MISSING_FIELD = '{"prompt": "a"}\n'


@pytest.mark.parametrize("case, named", [
    ("broken_line", "train.jsonl:2"),
    ("missing_field", "train.jsonl:1"),
    ("heldout_field", "evaluation.field"),
    ("too_few_prompts", "needs 80 new instructions"),
    ("context_parallel", "parallel.context_parallel_size=2"),
    ("judge_missing", "judge.pairwise.model=/nonexistent/judge: no config.json there"),
])
def test_the_dry_run_reads_what_the_job_will_read_and_refuses_it_before_any_gpu_time(
        overrides, tmp_path, capsys, case, named):
    """What the job used to die on after its engines were built, refused with exit 2."""
    prompts = tmp_path / "train.jsonl"
    prompts.write_text(BROKEN_LINE if case == "broken_line" else MISSING_FIELD)
    bad = {
        "broken_line": [f"prompts.path={prompts}"],
        "missing_field": [f"prompts.path={prompts}"],
        "heldout_field": ["evaluation.field=prompt"],
        "too_few_prompts": ["run.iterations=10"],
        "context_parallel": ["parallel.context_parallel_size=2"],
        "judge_missing": ["judge=pairwise", "judge.pairwise.model=/nonexistent/judge"],
    }[case]
    code = main(["--dry-run", *overrides, f"run.dir={tmp_path / 'run'}", *bad])
    error = capsys.readouterr().err
    assert code == 2 and named in error, error
    assert not (tmp_path / "run").exists()


def test_a_run_directory_with_no_stored_stage_takes_corrected_settings(overrides, tmp_path,
                                                                        capsys):
    from megatron_tpo.build import check_run_dir, claim_run_dir

    run_dir = tmp_path / "run"
    claim_run_dir(compose_config(overrides + ["train.lr=1e-2"]), run_dir)   # a failed start
    corrected = compose_config(overrides + ["train.lr=1e-3"])
    check_run_dir(corrected, run_dir)   # nothing stored: no refusal
    stage = run_dir / "stages" / "iteration_000"
    stage.mkdir(parents=True)
    (stage / "rollouts.manifest.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds a run made with other settings"):
        check_run_dir(corrected, run_dir)


def test_the_tiny_run_on_a_fresh_clone_names_every_missing_asset_and_the_step_that_makes_them(
        tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["experiment=tiny_cpu"]) == 2
    error = capsys.readouterr().err
    assert "4 inputs are missing:\n  run.policy=runs/tiny/assets/policy: no config.json there" \
        in error
    for key in ("prompts.path", "evaluation.path", "judge.exact_answer.answers_path"):
        assert f"\n  {key}=runs/tiny/assets/" in error
    assert "`tpo-tiny --prepare-only`" in error
    assert not (tmp_path / "runs" / "tiny" / "tpo").exists()


def test_a_gpu_recipes_first_dry_run_names_every_missing_input_at_once(tmp_path, monkeypatch,
                                                                      capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--dry-run", "experiment=llama3_70b", "judge.pairwise.model=/nowhere/judge"]) \
        == 2
    listed = [line.split("=")[0].strip() for line in capsys.readouterr().err.splitlines()
              if line.startswith("  ")]
    assert listed == ["run.policy", "prompts.path", "evaluation.path", "judge.pairwise.model"]
