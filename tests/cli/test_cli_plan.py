"""cli/plan.py: ``tpo-plan``'s command line around the planner's modes (plan/modes.py,
whose reports tests/plan/ checks): its defaults are the planner's assumptions, a request
that names two modes is refused, and a reader that stops early is no error."""

import io
import sys

from megatron_tpo.cli.plan import build_parser, main, whole_run
from megatron_tpo.plan.workload import Assumptions

LAYOUT = ["--model", "llama3_8b", "--nodes", "1", "--seq-len", "4096", "--global-batch", "128",
          "--layout", "tp=8,pp=1,mbs=2"]


def test_the_defaults_are_the_planners_assumptions():
    args = build_parser().parse_args([])
    assumed = Assumptions()
    assert (args.attention, args.logprobs, args.mfu_bf16, args.mfu_fp8) == \
        (assumed.attention, assumed.logprobs, assumed.mfu_bf16, assumed.mfu_fp8)
    assert (args.gpus_per_node, args.gpu_memory_utilization, args.top) == (8, 0.9, 5)
    assert whole_run(args) is None   # no --experiment: no run config is composed


def test_check_and_calibrate_together_are_refused_before_reading_the_run(capsys, tmp_path):
    missing = str(tmp_path / "no_run")
    assert main(["--check", missing, "--calibrate", missing]) == 2
    captured = capsys.readouterr()
    assert captured.err == "tpo-plan: error: --check and --calibrate: give one\n"
    assert captured.out == ""


class ClosedPipe(io.StringIO):
    """stdout of ``tpo-plan ... | head`` once head has exited."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")


def test_a_reader_that_closes_the_pipe_early_is_not_an_error(monkeypatch, capsys):
    assert main(LAYOUT) == 0 and "Layout: TP8 PP1" in capsys.readouterr().out
    monkeypatch.setattr(sys, "stdout", ClosedPipe())   # restored after the test
    assert main(LAYOUT) == 0
    assert sys.stdout.name == "/dev/null"   # the interpreter's final flush has nowhere to fail
    sys.stdout.close()
