"""``tpo-check-prompts``: validate a prompt set and show what each iteration will get.

Run it on a login node before submitting a job: a malformed file fails here, naming
the file and line, instead of minutes into an allocation.
"""

import argparse
import sys
from typing import Dict, List, Optional

from megatron_tpo.config.errors import ConfigError
from megatron_tpo.data.chat import apply_thought_chat_template
from megatron_tpo.data.prompts import (PromptFileError, clean_instructions, filter_by_token_length,
                                       iteration_prompts, load_prompt_set_config,
                                       read_instructions)
from megatron_tpo.data.thought_templates import load_thought_template


def prompt_set_report(config, tokenizer) -> Dict[str, int]:
    raw = read_instructions(config)
    cleaned = clean_instructions(raw)
    kept = filter_by_token_length(cleaned, tokenizer, config.min_tokens, config.max_tokens)
    return {"read": len(raw), "dropped_empty_or_duplicate": len(raw) - len(cleaned),
            "dropped_by_token_length": len(cleaned) - len(kept), "kept": len(kept),
            "full_iterations": len(kept) // config.prompts_per_iteration}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts", help="configs/prompts/<name> or a YAML path")
    parser.add_argument("--tokenizer", required=True, help="the policy tokenizer (a local directory)")
    parser.add_argument("--thought-template", default="generic")
    parser.add_argument("--show-iteration", type=int, default=None,
                        help="print the first chat-formatted prompt of this iteration")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    try:
        config = load_prompt_set_config(args.prompts)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        report = prompt_set_report(config, tokenizer)
        for key, value in report.items():
            print(f"{key}: {value}")
        if args.show_iteration is not None:
            kept = filter_by_token_length(clean_instructions(read_instructions(config)), tokenizer,
                                          config.min_tokens, config.max_tokens)
            first = iteration_prompts(kept, args.show_iteration, config.prompts_per_iteration,
                                      config.seed)[0]
            template = load_thought_template(args.thought_template)
            print(apply_thought_chat_template(tokenizer, first, template))
    except (ConfigError, PromptFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
