"""Instruction sets: load, validate, clean, filter by length, slice per iteration.

A malformed file is reported by name and line before anything downstream runs, which
is why JSONL is checked line by line here rather than left to ``datasets``' parser.
"""

from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from megatron_tpo.config.errors import ConfigError
from megatron_tpo.data.config import PromptSetConfig
from megatron_tpo.data.jsonl import json_objects

FORMATS = {".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow"}


class PromptFileError(ConfigError):
    """A prompt file that cannot be read; the message names the file and line."""


def check_jsonl(path: Path, field: str) -> None:
    """Raise ``PromptFileError`` at the first line that is not a JSON object with ``field``."""
    for number, record in json_objects(path, PromptFileError):
        if field not in record:
            raise PromptFileError(f"{path}:{number}: missing field {field!r}")
        if not isinstance(record[field], str):
            raise PromptFileError(f"{path}:{number}: field {field!r} is "
                                  f"{type(record[field]).__name__}, not a string")


def read_instructions(config: PromptSetConfig) -> List[str]:
    """The raw instruction column of the configured file or hub dataset, in file order."""
    import datasets

    path = Path(config.path)
    if path.suffix in FORMATS:
        if not path.is_file():
            raise PromptFileError(f"{path}: prompt file not found")
        if path.suffix == ".jsonl":
            check_jsonl(path, config.field)
        try:
            dataset = datasets.load_dataset(FORMATS[path.suffix], data_files=str(path),
                                            split="train")
        except Exception as error:  # datasets raises many types; the user needs the file name
            raise PromptFileError(f"{path}: cannot be read as {FORMATS[path.suffix]} "
                                  f"({type(error).__name__}: {error})") from error
    elif path.is_dir():
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[config.split]
    else:
        try:
            dataset = datasets.load_dataset(config.path, split=config.split)
        except Exception as error:
            raise PromptFileError(f"{config.path}: not a local file or directory, and not "
                                  f"loadable as a hub dataset ({type(error).__name__}: "
                                  f"{error})") from error
    if config.field not in dataset.column_names:
        raise PromptFileError(f"{config.path}: no column {config.field!r} (columns: "
                              f"{', '.join(dataset.column_names)})")
    return list(dataset[config.field])


def clean_instructions(instructions: Sequence[Optional[str]]) -> List[str]:
    """Drop empty (or whitespace-only) and repeated instructions; keep first occurrences."""
    seen, kept = set(), []
    for instruction in instructions:
        if not instruction or not instruction.strip():
            continue
        key = instruction.strip()
        if key not in seen:
            seen.add(key)
            kept.append(instruction)
    return kept


def filter_by_token_length(instructions: Sequence[str], tokenizer, min_tokens: int,
                           max_tokens: int) -> List[str]:
    lengths = [len(ids) for ids in
               tokenizer(list(instructions), add_special_tokens=False)["input_ids"]]
    return [text for text, length in zip(instructions, lengths)
            if min_tokens <= length <= max_tokens]


def load_prompts(config: PromptSetConfig, tokenizer) -> List[str]:
    """The cleaned, length-filtered instruction set, in file order."""
    config.validate()
    instructions = clean_instructions(read_instructions(config))
    return filter_by_token_length(instructions, tokenizer, config.min_tokens, config.max_tokens)


def iteration_prompts(prompts: Sequence[str], iteration: int, per_iteration: int,
                      seed: int) -> List[str]:
    """Iteration ``iteration``'s own slice of one seeded shuffle of ``prompts``.

    Slices of different iterations never overlap (the paper trains each iteration on
    instructions unseen before); running out of prompts is an error, not a silent reuse.
    """
    if iteration < 0:
        raise ValueError(f"iteration={iteration}: must be >= 0")
    order = np.random.default_rng(seed).permutation(len(prompts))
    start, stop = iteration * per_iteration, (iteration + 1) * per_iteration
    if stop > len(prompts):
        raise ConfigError(f"iteration {iteration} needs prompts [{start}, {stop}) but the set "
                          f"has {len(prompts)}; lower prompts.prompts_per_iteration")
    return [prompts[i] for i in order[start:stop]]
