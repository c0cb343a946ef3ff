"""tpo-plan --check / --calibrate / --calibration on a synthetic run directory written
in the loop's format: figures against an independent re-estimate, a calibration that
recovers the efficiencies the measurements were made from, and CPU runs."""

import json

import pytest

from megatron_tpo.cli.plan import main
from megatron_tpo.config import ConfigError, load_model_config
from megatron_tpo.plan.cost.iteration import IterationAssumptions
from megatron_tpo.plan.cost.timing import step_time
from megatron_tpo.plan.hardware import GIB, find_gpu
from megatron_tpo.plan.recorded.calibration import load_calibration
from megatron_tpo.plan.recorded.run_check import colocated_iteration, run_model
from megatron_tpo.plan.recorded.run_dir import read_run_dir, read_run_metrics
from megatron_tpo.plan.workload import Assumptions, Cluster, TrainingLayout, Workload

CONFIG = """\
model:
  name: llama3_8b
  num_layers: 32
  hidden_size: 4096
  ffn_hidden_size: 14336
  num_attention_heads: 32
  num_query_groups: 8
  vocab_size: 128256
  max_position_embeddings: 8192
parallel:
  tensor_model_parallel_size: 2
  pipeline_model_parallel_size: 1
  context_parallel_size: 1
  sequence_parallel: true
train:
  micro_batch_pairs: 1
  train_steps: 100
rollout:
  engine: vllm
  sampling: {{n: 8, max_new_tokens: 2048}}
judge:
  kind: reward_model
prompts:
  path: data/prompts.jsonl
  prompts_per_iteration: 5000
  max_tokens: 1024
run:
  world_size: 16
  hardware: {hardware}
"""
# Two iterations of 4 steps; each step trains 2500 sequences of 1000 tokens.
STEP_TOKENS = 2_500_000


def write_run(run_dir, hardware="h100-80gb", step_seconds=10.0, rollout_seconds=300.0,
              peak_bytes=50_000_000_000):
    run_dir.mkdir(exist_ok=True)
    (run_dir / "config.yaml").write_text(CONFIG.format(hardware=hardware))
    rows = []
    for iteration in range(2):
        for step in range(4):
            warm_up = 5.0 if step == 0 else 0.0  # the median leaves it out
            rows.append({"kind": "train_step", "iteration": iteration, "step": step,
                         "seconds": step_seconds + warm_up,
                         "tokens_per_second": STEP_TOKENS / step_seconds,
                         "sequence_tokens": STEP_TOKENS, "peak_memory_bytes": None, "rank": 0})
        rows.append({"kind": "iteration", "iteration": iteration,
                     "timing/rollout": rollout_seconds, "timing/judge": 100.0,
                     "timing/reference_logprobs": 20.0, "timing/train": 45.0,
                     "timing/weight_sync": 5.0, "timing/checkpoint": 60.0, "samples": 40000,
                     "pairs": 5000, "mean_prompt_tokens": 300.0, "mean_completion_tokens": 700.0})
    for rank in range(16):
        rows.append({"kind": "rank_memory", "rank": rank,
                     "peak_memory_bytes": None if peak_bytes is None else peak_bytes + rank})
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return run_dir


def _estimated_step(mfu_bf16=Assumptions().mfu_bf16):
    """The run's step, estimated independently of run_check: TP2 x DP8, micro-batch 2
    sequences (one pair), 2 x 5000 pairs / 4 steps = 2500 sequences of 1000 tokens."""
    cluster = Cluster("h100-80gb", find_gpu("h100-80gb"), 2, 8)
    workload = Workload(load_model_config("llama3_8b"), cluster, 1000, 2500,
                        Assumptions(mfu_bf16=mfu_bf16))
    return step_time(workload, TrainingLayout(2, 1, 1, 1, 8, 2, "none", False)).total


def _check(capsys, run_dir, *extra):
    assert main(["--check", str(run_dir), "--json", *extra]) == 0
    return {f["name"]: f for f in json.loads(capsys.readouterr().out)["figures"]}


def test_check_sets_each_figure_beside_its_measurement(capsys, tmp_path):
    run_dir = write_run(tmp_path / "run")
    figures = _check(capsys, run_dir)
    step = figures["train step"]
    assert step["measured"] == 10.0
    assert step["estimate"] == pytest.approx(_estimated_step())
    assert step["relative_error"] == pytest.approx((_estimated_step() - 10.0) / 10.0)
    assert figures["train tokens/s"]["measured"] == STEP_TOKENS / 10.0
    assert figures["peak memory (most loaded rank)"]["measured"] == pytest.approx(
        (50_000_000_000 + 15) / GIB)
    for stage, measured in (("rollout", 300.0), ("judge", 100.0), ("reference_logprobs", 20.0),
                            ("train", 45.0), ("weight_sync", 5.0), ("checkpoint", 60.0)):
        figure = figures[f"iteration: {stage}"]
        assert figure["measured"] == measured
        assert figure["estimate"] > 0 and figure["relative_error"] is not None
    assert main(["--check", str(run_dir)]) == 0
    text = capsys.readouterr().out
    assert "train step (s)" in text and "rel. error" in text and "%" in text


def test_calibration_recovers_the_efficiencies_the_run_was_made_from(capsys, tmp_path):
    """Measurements made from the model itself at MFU 0.45 and decode efficiency 0.3:
    --calibrate must find those two numbers, and --check with them shows no error."""
    probe = write_run(tmp_path / "probe")
    config, metrics = read_run_dir(probe)
    cluster = Cluster("h100-80gb", find_gpu("h100-80gb"), 2, 8)
    model = run_model(config, metrics, cluster, Assumptions(mfu_bf16=0.45),
                      IterationAssumptions(decode_efficiency=0.3))
    rollout = colocated_iteration(model).stages.rollout
    run_dir = write_run(tmp_path / "run", step_seconds=_estimated_step(0.45),
                        rollout_seconds=rollout)

    assert main(["--calibrate", str(run_dir)]) == 0
    assert "wrote" in capsys.readouterr().out
    calibration = load_calibration(run_dir / "calibration.yaml")
    assert calibration.mfu_bf16 == pytest.approx(0.45, rel=1e-6)
    assert calibration.decode_efficiency == pytest.approx(0.3, rel=1e-6)
    assert calibration.mfu_fp8 is None and calibration.hardware == "h100-80gb"

    figures = _check(capsys, run_dir, "--calibration", str(run_dir / "calibration.yaml"))
    assert abs(figures["train step"]["relative_error"]) < 1e-6
    assert abs(figures["iteration: rollout"]["relative_error"]) < 1e-6


def test_calibration_file_is_strict(tmp_path):
    path = tmp_path / "calibration.yaml"
    path.write_text("hardware: h100-80gb\nmfu_bf16: 0.5\nmfu: 0.4\n")
    with pytest.raises(ConfigError, match="mfu"):
        load_calibration(path)
    path.write_text("hardware: h100-80gb\nmfu_bf16: 1.5\n")
    with pytest.raises(ConfigError, match="mfu_bf16=1.5: must be in"):
        load_calibration(path)


CPU_TABLE = """\
gpus:
  cpu:
    description: 2 CPU cores, as a GPU-table entry so the planner can estimate
    memory_gib: 16
    bf16_tflops: 0.2
    fp8_tflops: null
    hbm_tb_per_s: 0.02
    nvlink_gb_per_s: 5
    internode_gbit_per_s: 10
"""


def test_cpu_run_without_a_hardware_entry_says_what_it_cannot_compare(capsys, tmp_path):
    run_dir = write_run(tmp_path / "run", hardware="cpu", peak_bytes=None)
    figures = _check(capsys, run_dir)
    assert figures["train step"]["measured"] == 10.0
    assert figures["train step"]["estimate"] is None
    assert "no estimate: unknown GPU 'cpu'" in figures["train step"]["note"]
    assert figures["peak memory (most loaded rank)"]["measured"] is None
    assert main(["--calibrate", str(run_dir)]) == 2
    assert "cannot calibrate" in capsys.readouterr().err


def test_cpu_run_with_a_cpu_entry_in_the_table_is_estimated(capsys, tmp_path):
    run_dir = write_run(tmp_path / "run", hardware="cpu", peak_bytes=None)
    table = tmp_path / "cpu.yaml"
    table.write_text(CPU_TABLE)
    figures = _check(capsys, run_dir, "--gpu-table", str(table), "--gpus-per-node", "16")
    assert figures["train step"]["estimate"] > 0
    peak = figures["peak memory (most loaded rank)"]
    assert peak["measured"] is None and "CPU runs have no" in peak["note"]


def test_from_a_run_config_judges_its_layout(capsys, tmp_path):
    run_dir = write_run(tmp_path / "run")
    assert main(["--from", str(run_dir / "config.yaml"), "--global-batch", "256", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["request"]["world_size"] == 16 and report["request"]["nodes"] == 2
    assert report["request"]["seq_len"] == 1024 + 2048  # longest prompt + max_new_tokens
    estimate = report["estimate"]
    assert (estimate["tensor_model_parallel_size"], estimate["micro_batch_size"],
            estimate["data_parallel_size"]) == (2, 2, 8)


def test_malformed_metrics_name_the_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train_step", "seconds": 1.0}\n{"kind": oops}\n')
    with pytest.raises(ConfigError, match=r"metrics.jsonl:2: not valid JSON"):
        read_run_metrics(path)
    path.write_text('{"seconds": 1.0}\n')
    with pytest.raises(ConfigError, match=r"metrics.jsonl:1: a metrics line needs a \"kind\""):
        read_run_metrics(path)


def test_run_config_without_its_groups_is_refused(capsys, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("model: {name: x}\n")
    (run_dir / "metrics.jsonl").write_text("")
    assert main(["--check", str(run_dir)]) == 2
    assert "no top-level parallel, run" in capsys.readouterr().err


def test_world_size_from_the_ranks_and_batch_from_pairs_per_step(capsys, tmp_path):
    """The loop's config may lack run.world_size (then the rank_memory rows count the
    ranks) and may carry run.pairs_per_step (then a step trains twice as many sequences)."""
    run_dir = write_run(tmp_path / "run")
    config = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(
        config.replace("  world_size: 16\n", "  pairs_per_step: 625\n"))
    figures = _check(capsys, run_dir)
    assert figures["train step"]["note"].startswith("1250 sequences of 2000 tokens")
    assert main(["--from", str(run_dir / "config.yaml"), "--global-batch", "256"]) == 2
    assert "--nodes is required" in capsys.readouterr().err
