"""Prompt sets, thought templates and parsing, and per-iteration stage storage."""

from megatron_tpo.data.chat import apply_thought_chat_template, thought_messages
from megatron_tpo.data.config import PromptSetConfig, ThoughtTemplate, load_prompt_set_config
from megatron_tpo.data.parsing import (ParseError, ParseFailure, ThoughtResponse, parse_outputs,
                                       parse_thought_response)
from megatron_tpo.data.prompts import (PromptFileError, check_jsonl, clean_instructions,
                                       filter_by_token_length, iteration_prompts, load_prompts,
                                       read_instructions)
from megatron_tpo.data.storage import STAGES, IterationStore, config_hash
from megatron_tpo.data.thought_templates import (BUILTIN_TEMPLATES, DIRECT, GENERIC, SPECIFIC,
                                                 load_thought_template)

__all__ = [
    "BUILTIN_TEMPLATES", "DIRECT", "GENERIC", "IterationStore", "ParseError", "ParseFailure",
    "PromptFileError", "PromptSetConfig", "SPECIFIC", "STAGES", "ThoughtResponse",
    "ThoughtTemplate", "apply_thought_chat_template", "check_jsonl", "clean_instructions",
    "config_hash", "filter_by_token_length", "iteration_prompts", "load_prompts",
    "load_prompt_set_config", "load_thought_template", "parse_outputs", "parse_thought_response", "read_instructions",
    "thought_messages",
]
