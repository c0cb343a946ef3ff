r"""``tpo-check-prompts``: validate a prompt set, show what each iteration will get, and
write it as the JSONL file a job reads.

    tpo-check-prompts ultrafeedback --tokenizer /models/Meta-Llama-3-8B-Instruct
    tpo-check-prompts configs/prompts/ultrafeedback.yaml --tokenizer ... --iterations 4
    tpo-check-prompts /data/prompts.jsonl --field prompt --tokenizer ... --show-iteration 0
    # a held-out file: at least evaluation.num_prompts (64) usable instructions
    tpo-check-prompts /data/heldout.jsonl --field instruction --prompts-per-iteration 64 ...
    # prepare UltraFeedback's prompts on a login node with hub access, for offline jobs:
    tpo-check-prompts HuggingFaceH4/ultrafeedback_binarized --split train_prefs --field prompt \
        --tokenizer /models/Meta-Llama-3-8B-Instruct --write /data/ultrafeedback_prompts.jsonl

PROMPTS is a prompts config (a name of configs/prompts, written bare or as
configs/prompts/NAME, or a YAML path) or the prompts themselves (a .jsonl, .parquet or
.arrow file, a directory written by datasets' save_to_disk, or a hub dataset name); the
options override the config's settings. Run it before submitting a job: a malformed file
fails here, naming the file and line, and so does a set too small for --iterations full
iterations of prompts_per_iteration new prompts each. --write stores the cleaned,
length-filtered prompts (one {FIELD: instruction} object per line) for prompts.path.
Exit status: 0 when the set is usable, 2 otherwise.
"""

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

from megatron_tpo.config.errors import ConfigError
from megatron_tpo.config.loading import CONFIG_DIR
from megatron_tpo.data.chat import apply_thought_chat_template
from megatron_tpo.data.config import PromptSetConfig, load_prompt_set_config
from megatron_tpo.data.prompts import (PromptFileError, clean_instructions, filter_by_token_length,
                                       iteration_prompts, read_instructions)
from megatron_tpo.data.thought_templates import load_thought_template
from megatron_tpo.files import atomic_write

PROG = "tpo-check-prompts"
# Options that override a setting of PromptSetConfig, by attribute name.
SETTING_OPTIONS = ("field", "split", "min_tokens", "max_tokens", "prompts_per_iteration", "seed")


def shipped_prompt_configs() -> List[str]:
    return sorted(path.stem for path in (CONFIG_DIR / "prompts").glob("*.yaml"))


def _config_name(argument: str) -> Optional[str]:
    """The name ``argument`` gives a prompts config (``ultrafeedback``,
    ``configs/prompts/ultrafeedback``, ``configs/prompts/ultrafeedback.yaml``), or None
    where it names no config (a data file, a directory, a hub dataset)."""
    path = Path(argument)
    name = path.stem if path.suffix in (".yaml", ".yml") else path.name
    if path.parent.parts[-2:] == ("configs", "prompts"):
        return name
    if path.parent == Path(".") and name in shipped_prompt_configs():
        return name
    return None


def prompt_set_config(argument: str, overrides: Dict[str, object]) -> PromptSetConfig:
    """The prompt set PROMPTS and the options describe, validated."""
    name = _config_name(argument)
    if Path(argument).is_file() and Path(argument).suffix in (".yaml", ".yml"):
        return load_prompt_set_config(argument, **overrides)
    if name is not None:  # unknown names are refused with the list of known ones
        return load_prompt_set_config(name, **overrides)
    if Path(argument).suffix in (".yaml", ".yml"):
        return load_prompt_set_config(argument, **overrides)  # "file not found", named
    config = PromptSetConfig(path=argument, **overrides)
    config.validate()
    return config


def load_tokenizer(name_or_path: str):
    """The policy's tokenizer from a local directory; a named error otherwise."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise ConfigError(f"--tokenizer {name_or_path}: no tokenizer there "
                          f"({' '.join(str(error).split())[:300]})") from error


def kept_prompts(config: PromptSetConfig, tokenizer) -> Dict[str, object]:
    """The counts a user checks, and the prompts a job would keep, in file order."""
    raw = read_instructions(config)
    cleaned = clean_instructions(raw)
    kept = filter_by_token_length(cleaned, tokenizer, config.min_tokens, config.max_tokens)
    counts = {"read": len(raw), "dropped_empty_or_duplicate": len(raw) - len(cleaned),
              "dropped_by_token_length": len(cleaned) - len(kept), "kept": len(kept),
              "full_iterations": len(kept) // config.prompts_per_iteration}
    return {"counts": counts, "kept": kept}


def check_enough(config: PromptSetConfig, counts: Dict[str, int], iterations: int) -> None:
    """Refuse a set that cannot feed ``iterations`` iterations of new prompts."""
    if counts["full_iterations"] < iterations:
        raise ConfigError(
            f"{config.path}: {counts['kept']} usable prompts give {counts['full_iterations']} "
            f"full iterations of prompts_per_iteration={config.prompts_per_iteration}, fewer "
            f"than --iterations {iterations}; lower --prompts-per-iteration "
            "(prompts.prompts_per_iteration) or add prompts")


def write_jsonl(prompts: List[str], field: str, path: Path) -> None:
    """The prompts as JSONL, written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({field: text}, ensure_ascii=False) + "\n" for text in prompts)
    atomic_write(path, lambda handle: handle.write(lines.encode("utf-8")))


def first_prompt_of(config: PromptSetConfig, kept: List[str], iteration: int, tokenizer,
                    template_name: str) -> str:
    first = iteration_prompts(kept, iteration, config.prompts_per_iteration, config.seed)[0]
    return apply_thought_chat_template(tokenizer, first, load_thought_template(template_name))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompts", metavar="PROMPTS",
                        help=f"a prompts config ({', '.join(shipped_prompt_configs())}, "
                             "configs/prompts/NAME or a YAML path) or a prompt file, "
                             "directory or hub dataset name")
    parser.add_argument("--tokenizer", required=True,
                        help="the policy's tokenizer (a local directory, e.g. run.policy)")
    parser.add_argument("--field", help="the column holding the instruction")
    parser.add_argument("--split", help="split of a hub dataset or saved DatasetDict")
    parser.add_argument("--min-tokens", type=int, help="shortest instruction kept, in tokens")
    parser.add_argument("--max-tokens", type=int, help="longest instruction kept, in tokens")
    parser.add_argument("--prompts-per-iteration", type=int,
                        help="new prompts per iteration (prompts.prompts_per_iteration)")
    parser.add_argument("--seed", type=int, help="the shuffle's seed (prompts.seed)")
    parser.add_argument("--iterations", type=int, default=1,
                        help="full iterations the set must feed (run.iterations; default 1)")
    parser.add_argument("--thought-template", default="generic",
                        help="thought template for --show-iteration (configs/thought)")
    parser.add_argument("--show-iteration", type=int, default=None, metavar="T",
                        help="print the first chat-formatted prompt of iteration T")
    parser.add_argument("--write", type=Path, metavar="FILE.jsonl",
                        help="write the kept prompts as JSONL (for prompts.path)")
    return parser


def run(args: argparse.Namespace, say=print) -> None:
    """Print the counts, then refuse a set a job cannot use (ConfigError), then the
    asked-for prompt and the written file."""
    overrides = {name: getattr(args, name) for name in SETTING_OPTIONS
                 if getattr(args, name) is not None}
    config = prompt_set_config(args.prompts, overrides)
    if args.iterations < 1:
        raise ConfigError(f"--iterations {args.iterations}: must be >= 1")
    if args.write is not None and args.write.suffix != ".jsonl":
        raise ConfigError(f"--write {args.write}: give a .jsonl path")
    tokenizer = load_tokenizer(args.tokenizer)
    result = kept_prompts(config, tokenizer)
    counts, kept = result["counts"], result["kept"]
    for key, value in counts.items():
        say(f"{key}: {value}")
    check_enough(config, counts, args.iterations)
    if args.show_iteration is not None:
        say(first_prompt_of(config, kept, args.show_iteration, tokenizer, args.thought_template))
    if args.write is not None:
        write_jsonl(kept, config.field, args.write)
        say(f"wrote {len(kept)} prompts to {args.write} (prompts.path={args.write} "
            f"prompts.field={config.field})")


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ConfigError, PromptFileError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        sys.stdout = open(os.devnull, "w")  # `| head` closed the pipe; the check stands
    return 0


if __name__ == "__main__":
    sys.exit(main())
