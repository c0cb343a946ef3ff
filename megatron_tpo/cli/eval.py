"""``tpo-eval``: the paper's evaluation of any checkpoint, on your own engines and judge.

    tpo-eval fetch-sets --out data/eval               # AlpacaEval 805 + MT-Bench 80, via pip
    tpo-eval --run runs/tiny/tpo --iteration 2 --sets alpaca_eval,mt_bench
    tpo-eval --model /models/my-hf-dir --reference set --sets alpaca_eval --json
    srun tpo-eval --run /ckpt/tpo70b --iteration 3 --sets alpaca_eval,arena_hard=q.jsonl \\
        experiment=llama3_70b judge=pairwise judge.pairwise.model=/models/llama3-70b-instruct \\
        judge.pairwise.placement=separate judge.pairwise.bridge.address=$HOST

The model is iteration T of a tpo-run directory (M_T; M_0 is its initial policy), an HF
directory, or a megatron dist checkpoint (then run.policy=HF_DIR gives its config and
tokenizer). Its answers come from the project's engines (rollout.engine=hf|vllm at any
rollout.vllm.tensor_parallel_size; one process, or every rank under torchrun/srun) with
the thought prompt (a run's own, else thought=...); only the parsed response is ever
judged or exported. The reference is M_0's answers (--reference m0, the default with
--run), the set's own reference answers (--reference set) or another model's (--reference
PATH). The judge is tpo-run's judge group: a pairwise LLM judge (both orders; its own
model colocated on HF engines or a tpo-engine --serve judge pool), a reward model or a
rule. Extra arguments are tpo-run's Hydra overrides (judge=..., rollout=..., keys); with
--run, the run's model, thought prompt, policy, sampling limits and failure score are
kept unless overridden.

Writes under --out (default <run>/eval/M_T, or eval/<name>): answers/ and annotations/
(stored in chunks: a re-run resumes, and judges without regenerating), annotations in
AlpacaEval's format, exports/ (AlpacaEval's model_outputs.json, Arena-Hard's answer
file), summary.json; --json prints the summary. Exit 2 on a bad setting or set file.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import List

from megatron_tpo.config.errors import ConfigError

# Keys a run directory decides for its models, unless the command line sets them.
INHERITED_FROM_RUN = ("model", "thought", "run.policy", "run.initial_checkpoint",
                      "rollout.sampling", "evaluation.failure_score")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpo-eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="a tpo-run directory (with --iteration)")
    which.add_argument("--model", help="an HF directory or a megatron dist checkpoint")
    parser.add_argument("--iteration", type=int, help="evaluate M_T of --run")
    parser.add_argument("--name", help="the model's label (AlpacaEval's generator)")
    parser.add_argument("--reference", help="m0 (default with --run), set, or a model path")
    parser.add_argument("--sets", default="alpaca_eval,mt_bench",
                        help="comma-separated: alpaca_eval, mt_bench, arena_hard=PATH, NAME=PATH")
    parser.add_argument("--sets-dir", default="data/eval", help="where fetch-sets wrote the sets")
    parser.add_argument("--out", help="output directory")
    parser.add_argument("--limit", type=int, help="only the first N items of each set")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy answers")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap-rounds", type=int, default=100)
    parser.add_argument("--judge-template", help="a pairwise judge prompt file")
    parser.add_argument("--instruction-difficulty",
                        help="AlpacaEval's instruction_difficulty.csv, for the full LC GLM")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", help="tpo-run Hydra overrides")
    return parser


def fetch_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpo-eval fetch-sets",
                                     description="download AlpacaEval's and MT-Bench's sets "
                                     "from the package index (pip) into --out")
    parser.add_argument("--out", default="data/eval")
    return parser


def _overridden(key: str, overrides: List[str]) -> bool:
    for override in overrides:
        name = override.split("=", 1)[0].lstrip("+~")
        if name == key or name.startswith(key + ".") or key.startswith(name + "."):
            return True
    return False


def _get(config, dotted: str):
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def _set(config, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        config = getattr(config, part)
    setattr(config, leaf, value)


def resolve_config(args):
    """tpo-run's config from the overrides; with --run, the run's own policy side."""
    from omegaconf import OmegaConf

    from megatron_tpo.cli.run import compose_config
    from megatron_tpo.tpo_config import TPOConfig

    config = compose_config(args.overrides)
    if args.run:
        path = Path(args.run) / "config.json"
        if not path.is_file():
            raise ConfigError(f"--run={args.run}: no config.json; not a tpo-run directory")
        saved = json.loads(path.read_text())
        saved["run"].pop("world_size", None)
        run_config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TPOConfig), saved))
        for key in INHERITED_FROM_RUN:
            if not _overridden(key, args.overrides):
                _set(config, key, _get(run_config, key))
    return config


def check_config(config, args) -> None:
    """The groups tpo-eval uses, before any weight is read."""
    from megatron_tpo.judge.config import check_judge_placement

    if args.run and args.iteration is None:
        raise ConfigError("--run needs --iteration T (0 is the run's initial policy M_0)")
    if args.model and args.iteration is not None:
        raise ConfigError("--iteration goes with --run, not --model")
    config.thought.validate()
    config.rollout.validate()
    config.judge.validate()
    check_judge_placement(config.judge, config.rollout)
    if config.judge.kind == "pairwise" and config.judge.pairwise.model is None:
        raise ConfigError("judge.kind=pairwise with judge.pairwise.model=null: tpo-eval's judge "
                          "must be one fixed model for every model it compares; set "
                          "judge.pairwise.model=<HF directory>")


def resolve_models(config, args):
    """(model, reference or None for the set's own answers)."""
    from megatron_tpo.evaluation.models import model_source, run_model_source

    if args.run:
        model = run_model_source(Path(args.run), args.iteration)
        if args.name:
            model = type(model)(args.name, model.weights, model.policy)
    else:
        model = model_source(args.model, config.run.policy or None, args.name)
    choice = args.reference or ("m0" if args.run else "set")
    if choice == "set":
        return model, None
    if choice == "m0":
        if not args.run:
            raise ConfigError("--reference m0 needs --run (or give M_0's path: --reference PATH)")
        return model, run_model_source(Path(args.run), 0)
    return model, model_source(choice, config.run.policy or None)


def judge_label(config) -> str:
    judge = config.judge
    if judge.kind == "pairwise":
        return f"pairwise:{Path(judge.pairwise.model).name}"
    if judge.kind == "reward_model":
        return f"reward_model:{Path(judge.reward_model.path).name}"
    return judge.kind


def build_task(config, args, model, reference):
    from dataclasses import asdict

    from megatron_tpo.evaluation.suite import EvalTask
    from megatron_tpo.judge.verdict import ALPACA_EVAL_STYLE_PROMPT, check_judge_template
    from megatron_tpo.parallel.collectives import world
    from megatron_tpo.rollout.factory import trainer_ranks_per_engine

    template = ALPACA_EVAL_STYLE_PROMPT
    if args.judge_template:
        template = Path(args.judge_template).read_text()
        check_judge_template(template, args.judge_template)
    world_size = world()[1]
    ranks_per_engine = trainer_ranks_per_engine(config.rollout, world_size)

    def build_judge():
        from megatron_tpo.build import build_judge_for_rank

        # No policy engine: tpo-eval's pairwise judge always has a model of its own.
        return build_judge_for_rank(config, None, None, ranks_per_engine, prompt_template=template)

    judge_settings = asdict(config.judge)
    for key in ("placement", "bridge"):     # where the judge runs does not change verdicts
        judge_settings["pairwise"].pop(key)
    return EvalTask(model=model, reference=reference, template=config.thought,
                    rollout=config.rollout, ranks_per_engine=ranks_per_engine,
                    build_judge=build_judge, annotator=judge_label(config),
                    judge_settings={**judge_settings, "prompt": template},
                    connect_judge_first=(config.judge.kind == "pairwise"
                                         and config.judge.pairwise.placement == "separate"))


def suite_config(args, config, model):
    from megatron_tpo.evaluation.suite import EvalSuiteConfig

    out = args.out or str(Path(args.run) / "eval" / model.name if args.run
                          else Path("eval") / model.name)
    return EvalSuiteConfig(sets=[s for s in args.sets.split(",") if s], sets_dir=args.sets_dir,
                           out=out, limit=args.limit, chunk_size=args.chunk_size,
                           temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                           bootstrap_rounds=args.bootstrap_rounds,
                           judge_template=args.judge_template,
                           instruction_difficulty=args.instruction_difficulty,
                           failure_score=config.evaluation.failure_score,
                           progress=not args.quiet)


def start_world() -> None:
    """Under torchrun or srun, the process group every rank's engine and judge share."""
    from megatron_tpo.parallel.launch import detect_distributed_env, start_distributed

    environment = detect_distributed_env()
    if environment.launcher != "single":
        start_distributed(environment)


def run(args) -> dict:
    """Everything but printing; the summary on rank 0 (None on the others)."""
    from megatron_tpo.evaluation.models import check_model_source
    from megatron_tpo.evaluation.suite import evaluate

    config = resolve_config(args)
    check_config(config, args)
    model, reference = resolve_models(config, args)
    for source in (model, reference):
        if source is not None:
            check_model_source(source)
    suite = suite_config(args, config, model)
    suite.validate()
    start_world()
    return evaluate(suite, build_task(config, args, model, reference))


def describe(summary: dict) -> str:
    lines = [f"{summary['model']} vs {summary['reference']} (judge {summary['annotator']})",
             "| set | n | win rate | s.e. | LC win rate | BT score [95%] | BT style-controlled |"
             " parse rate |",
             "|---|--:|--:|--:|--:|--:|--:|--:|"]

    def number(value, digits=1):
        return "-" if value is None else f"{value:.{digits}f}"

    for name, metrics in summary["sets"].items():
        bt = metrics.get("bradley_terry", {})
        styled = metrics.get("bradley_terry_style_controlled", {})
        lines.append(
            f"| {name} | {metrics['n']} | {number(metrics['win_rate'])} | "
            f"{number(metrics['standard_error'])} | "
            f"{number(metrics['length_controlled_winrate'])} | "
            f"{number(bt.get('score'))} [{number(bt.get('lower'))}, {number(bt.get('upper'))}] | "
            f"{number(styled.get('score'))} | "
            f"{number(metrics['thoughts']['model']['parse_rate'], 3)} |")
    lines.append(f"summary: {summary['out']}/summary.json")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["fetch-sets"]:
        args = fetch_parser().parse_args(argv[1:])
        try:
            from megatron_tpo.evaluation.fetch import fetch_sets

            for name, path in fetch_sets(Path(args.out)).items():
                print(f"tpo-eval: {path}")
        except ConfigError as error:
            print(f"tpo-eval fetch-sets: error: {error}", file=sys.stderr)
            return 2
        return 0
    args = build_parser().parse_args(argv)
    try:
        summary = run(args)
    except ConfigError as error:
        print(f"tpo-eval: error: {error}", file=sys.stderr)
        return 2
    if summary is not None:
        print(json.dumps(summary, indent=2) if args.json else describe(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
