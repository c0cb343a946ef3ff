"""When does the tiny M_0's response start to read its thought? Probe it during the warm start.

    python benchmarks/warm_start_curve.py                    # seed 0, the default warm start
    python benchmarks/warm_start_curve.py --seed 3 --every 500 tiny.sft.lr=6e-3

Builds the task, tokenizer, data and untrained M_0 that ``tpo-tiny --seed S`` builds
(``tiny.<key>=<value>`` overrides as there), runs the same warm start, and every
``--every`` steps prints one JSON line: the step, the warm start's seconds so far (the
probes not counted), the forced-thought probe of ``tiny/thought_use.py`` (right answers
after a written thought of each kind, on ``--problems`` held-out problems), and the greedy
held-out accuracy with the thought prompt and with the bare instruction. Nothing is
written to disk. A warm start whose ``columns`` share stays near the others' has a
response that ignores its thought, and TPO has nothing to find (README, Measured).
"""

import argparse
import json
import time

import torch


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=250, help="probe every N steps")
    parser.add_argument("--problems", type=int, default=100, help="held-out problems probed")
    parser.add_argument("overrides", nargs="*", help="tiny.<key>=<value> (TinyTaskConfig)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from megatron_tpo.cli.tiny import task_config
    from megatron_tpo.rollout.engine import SamplingParams
    from megatron_tpo.rollout.hf_engine import HFRolloutEngine
    from megatron_tpo.tiny.assets import warm_start_inputs
    from megatron_tpo.tiny.evaluate import score_policy
    from megatron_tpo.tiny.thought_use import forced_thought_scores
    from megatron_tpo.tiny.warm_start import supervised_warm_start

    args = parse_args(argv)
    config = task_config(args.seed, [], args.overrides)
    inputs = warm_start_inputs(config)
    model, tokenizer = inputs.model, inputs.tokenizer
    problems = inputs.splits.heldout[:args.problems]
    greedy = SamplingParams(n=1, temperature=0.0, top_p=1.0, max_new_tokens=120)
    started, probing = time.perf_counter(), 0.0

    def probe(steps: int) -> None:
        nonlocal probing
        if steps % args.every and steps != config.sft.steps:
            return
        probe_start = time.perf_counter()
        model.eval()
        with torch.no_grad():
            engine = HFRolloutEngine(model, tokenizer, batch_size=len(problems))
            forced = forced_thought_scores(engine, tokenizer, problems)
            accuracy = {style: score_policy(engine, tokenizer, problems, style, greedy).accuracy
                        for style in ("thought", "direct")}
        model.train()
        print(json.dumps({"step": steps,
                          "warm_start_seconds": round(probe_start - started - probing, 1),
                          "right_after_written_thought": forced["correct"],
                          "follows_wrong_sums": forced["follows_wrong_sums"],
                          "greedy_thought_prompt": accuracy["thought"],
                          "greedy_direct_prompt": accuracy["direct"]}), flush=True)
        probing += time.perf_counter() - probe_start

    print(json.dumps({"seed": args.seed, "sft": vars(config.sft), "sft_size": config.sft_size,
                      "thought_mix": config.thought_mix}), flush=True)
    supervised_warm_start(model, [item.example for item in inputs.data], config.sft,
                          pad_id=tokenizer.pad_token_id, progress=False, after_step=probe)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
