"""tpo-fit-batch: its command line becomes the run it describes, and, as one rank of a
one-process job, it fits a fixed random batch with the full trainer stack (megatron DDP,
its optimizer, the pipeline schedule): the loss goes down within a few steps."""

import re

import pytest

from megatron_tpo.cli.fit_batch import build_parser, main


def test_the_parser_defaults_to_the_tiny_model_at_tp2_pp2():
    args = build_parser().parse_args([])
    assert (args.model, args.tp, args.pp, args.vpp, args.steps, args.micro_batches,
            args.micro_batch_size, args.seq_len, args.mcore) == ("tiny", 2, 2, None, 10, 4, 1,
                                                                32, None)
    args = build_parser().parse_args(["--model", "llama3_8b", "--tp", "8", "--pp", "1",
                                      "--vpp", "2", "--seq-len", "4096"])
    assert (args.model, args.tp, args.pp, args.vpp, args.seq_len) == ("llama3_8b", 8, 1, 2, 4096)


def test_one_rank_fits_the_batch_and_the_loss_goes_down(one_rank_job, capsys):
    main(["--tp", "1", "--pp", "1", "--steps", "3", "--micro-batches", "1", "--seq-len", "8"])
    out = capsys.readouterr().out
    losses = [float(x) for x in re.findall(r"step \d/3  loss (\d+\.\d+)", out)]
    assert len(losses) == 3
    # Random weights over a 1001-token vocab start near ln(1001) = 6.91.
    assert losses[0] == pytest.approx(6.91, abs=0.3)
    assert all(later < earlier for earlier, later in zip(losses, losses[1:]))
    summary = re.search(r"loss (\d+\.\d+) -> (\d+\.\d+); median step \d+ ms over 2 steps", out)
    assert summary and float(summary.group(1)) == pytest.approx(losses[0], abs=1e-4)
    assert float(summary.group(2)) == pytest.approx(losses[-1], abs=1e-4)
