"""report/metrics_file.py reads back what RunMetrics writes: records grouped by kind, in
file order; a line without a kind, or a broken line, names the file and the line."""

import json

import pytest

from megatron_tpo.config.errors import ConfigError
from megatron_tpo.report.metrics import RunMetrics
from megatron_tpo.report.metrics_file import METRICS_FILE, read_metric_records


def test_reads_back_what_run_metrics_wrote_grouped_by_kind_in_order(tmp_path):
    metrics = RunMetrics(tmp_path, enabled=True, tensorboard=False)
    metrics.log({"rollouts": 8}, step=0)
    metrics.log_train_step(iteration=0, step=1, values={"loss": 0.69}, global_step=1)
    metrics.log({"rollouts": 16}, step=1)
    metrics.log_train_step(iteration=0, step=2, values={"loss": 0.5}, global_step=2)
    records = read_metric_records(tmp_path / METRICS_FILE)
    assert sorted(records) == ["counts", "train_step"]
    assert [r["rollouts"] for r in records["counts"]] == [8, 16]
    assert [(r["step"], r["loss"]) for r in records["train_step"]] == [(1, 0.69), (2, 0.5)]
    assert records["train_step"][0] == {"kind": "train_step", "iteration": 0, "step": 1,
                                        "rank": 0, "loss": 0.69}
    assert metrics.records("counts") == records["counts"]


def test_a_missing_file_has_no_records(tmp_path):
    assert read_metric_records(tmp_path / "nothing" / METRICS_FILE) == {}


def test_a_line_without_a_kind_names_the_file_and_line(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text(json.dumps({"kind": "counts", "step": 0}) + "\n" + json.dumps({"step": 1}))
    with pytest.raises(ConfigError) as error:
        read_metric_records(path)
    assert str(error.value) == f'{path}:2: a metrics line needs a "kind"'


def test_a_broken_line_names_the_file_and_line(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text('{"kind": "counts"}\n{"kind": \n')
    with pytest.raises(ConfigError, match=rf"{path}:2: not valid JSON"):
        read_metric_records(str(path))
