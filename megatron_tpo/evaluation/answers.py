"""A model's answers to an evaluation set, through the project's own engines, with the
run's thought prompt; parsed into hidden thought and response, stored in chunks.

Only ``response`` ever goes to a judge or into an export. An output that does not parse
(no response marker, a repeated one, nothing after it) stays a failure: ``response`` is
None and ``parse_ok`` False; it is never replaced by the raw output. The raw output and
the thought are kept in the stored rows for the thought statistics only.

Every rank takes part (``generate_on_all_ranks``: each engine replica answers its
round-robin share; a vLLM tensor-parallel block gets the same prompts); one process with
the HF engine is the CPU case.
"""

from dataclasses import asdict, replace
from pathlib import Path
from typing import List, Optional, Sequence, TypedDict

from megatron_tpo.config.errors import ConfigError
from megatron_tpo.data.chat import apply_thought_chat_template
from megatron_tpo.data.config import ThoughtTemplate
from megatron_tpo.evaluation.chunks import ChunkStore, rank_zero_value, run_in_chunks
from megatron_tpo.evaluation.models import ModelSource, hf_directory, verify_run_checkpoint
from megatron_tpo.evaluation.sets import EvalItem, EvalSet
from megatron_tpo.preference.parse import rollout_rows
from megatron_tpo.rollout.config import RolloutConfig
from megatron_tpo.rollout.engine import RolloutEngine, SamplingParams
from megatron_tpo.rollout.replicas import generate_on_all_ranks


class AnswerRow(TypedDict):
    """One answer, e.g. ``{"id": "12", "instruction": "...", "category": "oasst",
    "output": "Here is my thought process: ... Here is my response: Paris.",
    "thought": "...", "response": "Paris.", "parse_ok": True, "parse_failure": None,
    "finish_reason": "stop", "output_tokens": 41, "thought_tokens": 30,
    "response_tokens": 2}``."""

    id: str
    instruction: str
    category: str
    output: str
    thought: Optional[str]
    response: Optional[str]
    parse_ok: bool
    parse_failure: Optional[str]
    finish_reason: str
    output_tokens: int
    thought_tokens: int
    response_tokens: int


def _token_count(tokenizer, text: Optional[str]) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0


def answer_rows(items: Sequence[EvalItem], outputs, template: ThoughtTemplate,
                tokenizer) -> List[AnswerRow]:
    """One row per item from its (single-sample) generation output."""
    parsed, _ = rollout_rows([item.instruction for item in items], outputs, template)
    return [AnswerRow(id=item.id, instruction=item.instruction, category=item.category,
                      output=row["output"], thought=row["thought"], response=row["response"],
                      parse_ok=row["parse_ok"], parse_failure=row["parse_failure"],
                      finish_reason=row["finish_reason"],
                      output_tokens=(len(row["output_token_ids"])
                                     or _token_count(tokenizer, row["output"])),
                      thought_tokens=_token_count(tokenizer, row["thought"]),
                      response_tokens=_token_count(tokenizer, row["response"]))
            for item, row in zip(items, parsed)]


PROMPT_TOO_LONG = "prompt_too_long"


def unanswerable_row(item: EvalItem) -> AnswerRow:
    """An instruction whose prompt leaves no room for ``max_new_tokens`` in the model's
    context: not generated (past its positions a model's output means nothing, and vLLM
    refuses it), a failure like any other answer that did not parse."""
    return AnswerRow(id=item.id, instruction=item.instruction, category=item.category,
                     output="", thought=None, response=None, parse_ok=False,
                     parse_failure=PROMPT_TOO_LONG, finish_reason="length", output_tokens=0,
                     thought_tokens=0, response_tokens=0)


class AnswerEngine:
    """One engine for the models of an evaluation, built for the first and reused for the
    next when its architecture is the same (its weights streamed in, as a weight sync
    does): a vLLM engine is started once per process."""

    def __init__(self, rollout: RolloutConfig, ranks_per_engine: int):
        if rollout.placement != "colocated":
            raise ConfigError(f"rollout.placement={rollout.placement!r}: tpo-eval answers with "
                              "engines of its own (colocated); a separate pool serves a "
                              "training run's weights")
        self.rollout, self.ranks_per_engine = rollout, ranks_per_engine
        self.engine: Optional[RolloutEngine] = None
        self.tokenizer = None
        self.loaded: Optional[Path] = None
        self.architecture: Optional[dict] = None
        self.context: Optional[int] = None    # the loaded model's max_position_embeddings

    def load(self, hf_dir: Path) -> RolloutEngine:
        from transformers import AutoTokenizer

        from megatron_tpo.model.hf_config import read_hf_config_dict
        from megatron_tpo.rollout.factory import build_rollout_engine

        if self.loaded == hf_dir:
            return self.engine
        ignored = ("torch_dtype", "dtype", "transformers_version", "_name_or_path")
        architecture = {k: v for k, v in read_hf_config_dict(hf_dir).items() if k not in ignored}
        if self.engine is not None and architecture == self.architecture:
            from megatron_tpo.model.hf_checkpoint import HFCheckpointReader

            reader = HFCheckpointReader(hf_dir)
            self.engine.update_weights((name, reader.get(name)) for name in sorted(reader.file_of))
            self.engine.wake()
        else:
            self.close()
            self.tokenizer = AutoTokenizer.from_pretrained(hf_dir)
            self.engine = build_rollout_engine(self.rollout, str(hf_dir), self.tokenizer,
                                               serves_checkpoint=True)
        self.loaded, self.architecture = hf_dir, architecture
        self.context = architecture.get("max_position_embeddings")
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.engine, self.loaded = None, None


def answer_settings(model: ModelSource, template: ThoughtTemplate,
                    sampling: SamplingParams) -> dict:
    """What decides a model's answers, stored beside them."""
    return {"model": model.name, "weights": str(Path(model.weights).resolve()),
            "template": asdict(template), "sampling": asdict(sampling)}


def prepared_hf_directory(model: ModelSource, cache_dir: Path, progress: bool) -> Path:
    """COLLECTIVE. The model's HF directory, converted on rank 0 if it must be."""
    verify_run_checkpoint(model)
    return Path(rank_zero_value(lambda: str(hf_directory(model, cache_dir, progress)),
                                f"converting {model.name} ({model.weights})"))


def answer_set(engines: AnswerEngine, model: ModelSource, eval_set: EvalSet,
               template: ThoughtTemplate, sampling: SamplingParams, out_dir: Path,
               chunk_size: int, progress: bool = True) -> List[AnswerRow]:
    """COLLECTIVE. ``model``'s answers to ``eval_set``: stored ones read back, the rest
    generated (one sample per instruction; greedy unless ``sampling`` says otherwise)."""
    sampling = replace(sampling, n=1)
    store = ChunkStore(Path(out_dir) / "answers" / model.name / eval_set.name,
                       {**answer_settings(model, template, sampling), "set": eval_set.path},
                       chunk_size)
    hf_dir = None

    def answer(items: Sequence[EvalItem]) -> List[dict]:
        nonlocal hf_dir
        if hf_dir is None:   # only when something is left to answer
            hf_dir = prepared_hf_directory(model, Path(out_dir) / "models", progress)
        engine = engines.load(hf_dir)
        prompts = [apply_thought_chat_template(engines.tokenizer, item.instruction, template)
                   for item in items]
        lengths = [len(engines.tokenizer(p, add_special_tokens=False)["input_ids"])
                   for p in prompts]
        fits = [i for i, n in enumerate(lengths)
                if engines.context is None or n + sampling.max_new_tokens <= engines.context]
        outputs = generate_on_all_ranks(engine, [prompts[i] for i in fits], sampling,
                                        engines.ranks_per_engine) if fits else []
        answered = dict(zip(fits, answer_rows([items[i] for i in fits], outputs, template,
                                              engines.tokenizer)))
        return [dict(answered.get(i) or unanswerable_row(item)) for i, item in enumerate(items)]

    return run_in_chunks(store, eval_set.items, answer,
                         f"{model.name} answers {eval_set.name}", progress)
