"""plan/modes.py: tpo-plan's request from its command line (every missing option named in
one error, options that need another refused), and the run settings of a layout."""

import pytest

from megatron_tpo.cli.plan import build_parser
from megatron_tpo.config import ConfigError
from megatron_tpo.plan.modes import layout_overrides, layout_settings, resolve_request
from megatron_tpo.plan.workload import TrainingLayout

GIVEN = ["--model", "llama3_8b", "--nodes", "2", "--seq-len", "4096", "--global-batch", "128"]


def _request(*argv):
    return resolve_request(build_parser().parse_args(list(argv)), None)


def _error(*argv) -> str:
    with pytest.raises(ConfigError) as error:
        _request(*argv)
    return str(error.value)


@pytest.mark.parametrize("argv, message", [
    (GIVEN[2:], "--model is required (or --from a run's config.yaml, or --experiment)"),
    (["--model", "llama3_8b", "--seq-len", "4096", "--global-batch", "128"],
     "--nodes is required (nodes in the allocation, or --experiment's run.world_size)"),
    (["--model", "llama3_8b", "--nodes", "1"],
     "--seq-len and --global-batch are required (--seq-len: tokens per sequence the memory "
     "must hold, or --experiment; --global-batch: sequences per optimizer step, or "
     "--experiment)"),
    ([*GIVEN, "--response-tokens", "200"],
     "the iteration estimate needs --prompts, --prompt-tokens, --thought-tokens"),
    (["--model", "llama3_8b", "--nodes", "1", "--prompts", "10", "--prompt-tokens", "5"],
     "--seq-len and --global-batch are required (--seq-len: tokens per sequence the memory "
     "must hold, or --experiment; --global-batch: sequences per optimizer step, or "
     "--experiment); the iteration estimate needs --thought-tokens, --response-tokens"),
])
def test_every_missing_option_is_named_in_one_error(argv, message):
    assert _error(*argv) == message


@pytest.mark.parametrize("argv, message", [
    ([*GIVEN, "train.lr=1e-6"], "train.lr=1e-6: tpo-run overrides go with --experiment"),
    ([*GIVEN, "--recompute", "full"], "--recompute, --fp8 and --micro-batch describe a given "
                                      "layout: use them with --layout or --from"),
    ([*GIVEN, "--gpus-per-node", "0"], "--gpus-per-node must be positive, got 0"),
    ([*GIVEN, "--top", "0"], "--top must be positive, got 0"),
    ([*GIVEN, "--mfu-bf16", "1.5"], "--mfu-bf16 must be in (0, 1]"),
    ([*GIVEN[:-3], "16384", *GIVEN[-2:]],
     "--seq-len 16384 exceeds llama3_8b's max_position_embeddings=8192"),
    ([*GIVEN, "--from", "/nonexistent/run.yaml"], "--from /nonexistent/run.yaml: file not found"),
])
def test_inconsistent_options_are_refused(argv, message):
    assert _error(*argv) == message


def test_a_complete_request():
    request = _request(*GIVEN, "--layout", "tp=2,pp=2,mbs=2", "--recompute", "selective",
                       "--prompts", "100", "--prompt-tokens", "50", "--thought-tokens", "60",
                       "--response-tokens", "70")
    workload = request.workload
    assert (workload.model.name, workload.cluster.world_size, workload.seq_len,
            workload.global_batch) == ("llama3_8b", 16, 4096, 128)
    assert (request.layout.tp, request.layout.pp, request.layout.dp, request.layout.micro_batch,
            request.layout.recompute) == (2, 2, 4, 2, "selective")
    assert (request.iteration.prompts, request.iteration.samples,
            request.iteration.sequence_tokens) == (100, 8, 180)
    assert request.whole_run is None and request.run_config is None
    assert _request(*GIVEN).layout is None and _request(*GIVEN).iteration is None


def test_a_layouts_run_settings_and_their_overrides():
    layout = TrainingLayout(tp=4, pp=2, vpp=3, cp=1, dp=2, micro_batch=4, recompute="none",
                            fp8=True)
    assert dict(layout_settings(layout))["parallel.virtual_pipeline_model_parallel_size"] == 3
    assert layout_overrides(layout) == [
        "parallel.tensor_model_parallel_size=4", "parallel.pipeline_model_parallel_size=2",
        "parallel.virtual_pipeline_model_parallel_size=3", "parallel.context_parallel_size=1",
        "parallel.sequence_parallel=true", "train.micro_batch_pairs=2",
        "train.recompute_granularity=null", "train.fp8.enabled=true"]
    flat = TrainingLayout(1, 1, 1, 1, 8, 2, "full", False)
    assert layout_overrides(flat)[2] == "parallel.virtual_pipeline_model_parallel_size=null"
    assert layout_overrides(flat)[-2:] == ["train.recompute_granularity=full",
                                           "train.fp8.enabled=false"]
