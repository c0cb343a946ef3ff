"""``tpo-eval``'s work, start to end: answers, annotations, metrics, exports, summary.

    sets      = [load_eval_set(spec, sets_dir) ...]                  # file:line errors first
    answers   = answer_set(engines, model, set, ...)                 # every rank, stored
    reference = answer_set(engines, M_0, set, ...) | the set's own reference answers
    rows      = annotate(judge, ...)                                 # responses only, stored
    metrics   = set_metrics(rows, ...)                               # rank 0
    exports   = write_exports(answers, ...)                          # rank 0

Every rank calls ``evaluate`` (generation and a generating judge are spread over the
ranks' engines); rank 0 writes. Re-running the same command reads stored answers and
annotations back, so it judges without regenerating, and scores without judging.
"""

import csv
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional

from megatron_tpo.config.errors import ConfigError
from megatron_tpo.data.config import ThoughtTemplate
from megatron_tpo.evaluation.annotations import Side, annotate, check_verdicts_readable
from megatron_tpo.evaluation.answers import AnswerEngine, answer_set
from megatron_tpo.evaluation.chunks import ChunkStore, run_in_chunks
from megatron_tpo.evaluation.exports import write_exports
from megatron_tpo.evaluation.models import ModelSource
from megatron_tpo.evaluation.scores import alpaca_metrics, set_metrics
from megatron_tpo.evaluation.sets import EvalSet, load_eval_set
from megatron_tpo.files import atomic_write
from megatron_tpo.judge.base import Judge
from megatron_tpo.parallel.collectives import is_rank_zero
from megatron_tpo.rollout.config import RolloutConfig
from megatron_tpo.rollout.engine import SamplingParams

REFERENCE_FROM_SET = "set"


@dataclass(kw_only=True)
class EvalSuiteConfig:
    """What ``tpo-eval`` evaluates and how (the judge and engines are tpo-run's groups)."""

    sets: List[str] = field(default_factory=lambda: ["alpaca_eval", "mt_bench"])
    """``alpaca_eval``, ``mt_bench``, ``arena_hard=PATH``, ``NAME=PATH`` (sets.py)."""
    sets_dir: str = "data/eval"
    """Where ``tpo-eval fetch-sets`` put the public sets."""
    out: str = "eval"
    """Answers, annotations, converted weights, exports and summary.json go here."""
    limit: Optional[int] = None
    """The first this many items of every set (a quick look); None: all."""
    chunk_size: int = 64
    """Items answered or judged, then stored, at a time: a re-run resumes after the last."""
    temperature: float = 0.0
    """0 answers greedily (the paper's evaluations); above, sampled with ``seed``."""
    top_p: float = 1.0
    """Nucleus sampling of the answers (with temperature above 0)."""
    seed: int = 0
    """Seeds sampled answers and the Bradley-Terry bootstrap."""
    bootstrap_rounds: int = 100
    """Resamples for the Bradley-Terry 95% intervals (Arena-Hard uses 100)."""
    judge_template: Optional[str] = None
    """A pairwise judge prompt file with {instruction}, {response_a}, {response_b}; None:
    the AlpacaEval-style prompt (judge/verdict.py)."""
    instruction_difficulty: Optional[str] = None
    """AlpacaEval's instruction_difficulty.csv (index, difficulty per instruction of the
    805): the LC GLM then has its difficulty term (``length_controlled_noreg``)."""
    failure_score: float = 0.0
    """The judged score written for an answer that did not parse (tpo-run's
    ``evaluation.failure_score``); such an answer always loses to one that parsed."""
    progress: bool = True
    """Print a line per chunk answered or judged."""

    def validate(self) -> None:
        if not self.sets:
            raise ConfigError("--sets: name at least one set")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit={self.limit}: must be >= 1")
        if self.chunk_size < 1:
            raise ConfigError(f"--chunk-size={self.chunk_size}: must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"--temperature={self.temperature}, --top-p={self.top_p}: need "
                              "temperature >= 0 and 0 < top_p <= 1")
        if self.bootstrap_rounds < 0:
            raise ConfigError(f"--bootstrap-rounds={self.bootstrap_rounds}: must be >= 0")
        for name in ("judge_template", "instruction_difficulty"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"--{name.replace('_', '-')}={path}: no such file")

    def answer_sampling(self, rollout: SamplingParams) -> SamplingParams:
        """One answer per instruction, with the run's length limit and stop rules."""
        return SamplingParams(n=1, temperature=self.temperature, top_p=self.top_p,
                              max_new_tokens=rollout.max_new_tokens,
                              seed=self.seed if self.temperature > 0 else None,
                              stop=list(rollout.stop), stop_token_ids=list(rollout.stop_token_ids))


@dataclass(kw_only=True)
class EvalTask:
    """The models, prompt and engines of one evaluation (the CLI resolves them)."""

    model: ModelSource
    reference: Optional[ModelSource]      # None: the sets' own reference answers
    template: ThoughtTemplate
    rollout: RolloutConfig
    ranks_per_engine: int
    build_judge: Callable[[], Judge]
    annotator: str
    judge_settings: dict
    connect_judge_first: bool = False
    """Build the judge before answering: a judge pool (tpo-engine --serve judge) waits
    only ``judge.pairwise.bridge.timeout_seconds`` for its client to join, and answering
    takes longer; a judge with engines of its own is built after, in the memory the
    answering engine gave back."""


def load_sets(config: EvalSuiteConfig, needs_reference: bool) -> List[EvalSet]:
    """Every set, cut to ``limit``; with the sets' own references, each item must have one."""
    sets = []
    for spec in config.sets:
        eval_set = load_eval_set(spec, Path(config.sets_dir))
        items = eval_set.items[:config.limit] if config.limit else eval_set.items
        if needs_reference:
            missing = sum(item.reference is None for item in items)
            if missing:
                raise ConfigError(f"--reference=set: {eval_set.name} ({eval_set.path}) has no "
                                  f"reference answer for {missing} of {len(items)} items; "
                                  "judge it against M_0 or a model instead")
        sets.append(replace(eval_set, items=items))
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise ConfigError(f"--sets: a set is named twice ({', '.join(names)})")
    return sets


def read_difficulty(path: str, eval_set: EvalSet) -> List[float]:
    """AlpacaEval's per-instruction difficulty for the items of its set, by index."""
    values: Dict[int, float] = {}
    with open(path, newline="") as handle:
        for number, row in enumerate(csv.reader(handle), start=1):
            try:
                values[int(row[0])] = float(row[-1])
            except (ValueError, IndexError):
                if number > 1:     # the header line
                    raise ConfigError(f"{path}:{number}: expected 'index,difficulty'") from None
    missing = [item.index for item in eval_set.items if item.index not in values]
    if missing:
        raise ConfigError(f"{path}: no difficulty for instruction index {missing[0]} of "
                          f"{eval_set.name} ({len(missing)} missing)")
    return [values[item.index] for item in eval_set.items]


def _set_reference_side(eval_set: EvalSet) -> Side:
    return Side("reference", [item.reference for item in eval_set.items])


def _side(name: str, rows: List[dict]) -> Side:
    return Side(name, [row["response"] if row["parse_ok"] else None for row in rows])


def evaluate(config: EvalSuiteConfig, task: EvalTask) -> Optional[dict]:
    """COLLECTIVE. The summary (rank 0; None elsewhere), also written to ``out/summary.json``."""
    config.validate()
    out = Path(config.out)
    sets = load_sets(config, needs_reference=task.reference is None)
    sampling = config.answer_sampling(task.rollout.sampling)
    engines = AnswerEngine(task.rollout, task.ranks_per_engine)
    # Asked now: closing a vLLM engine tears the default process group down with it.
    rank_zero = is_rank_zero()
    judge = task.build_judge() if task.connect_judge_first else None
    try:
        answers = {s.name: answer_set(engines, task.model, s, task.template, sampling, out,
                                      config.chunk_size, config.progress) for s in sets}
        references = None if task.reference is None else {
            s.name: answer_set(engines, task.reference, s, task.template, sampling, out,
                               config.chunk_size, config.progress) for s in sets}
        if engines.engine is not None:
            engines.engine.sleep()     # its memory to the judge
        annotations = _annotate_sets(config, task, sets, answers, references, judge)
    finally:
        engines.close()
    if not rank_zero:
        return None
    return _summarise(config, task, sets, answers, references, annotations, out)


def _annotate_sets(config, task, sets, answers, references, judge: Optional[Judge]
                   ) -> Dict[str, List[dict]]:
    result = {}
    reference_name = task.reference.name if task.reference else "reference"
    for eval_set in sets:
        reference = _set_reference_side(eval_set) if references is None else \
            _side(reference_name, references[eval_set.name])
        model = _side(task.model.name, answers[eval_set.name])
        settings = {"judge": task.judge_settings, "failure_score": config.failure_score,
                    "model": task.model.name, "reference": reference.generator,
                    "answers": [row["response"] for row in answers[eval_set.name]],
                    "references": list(reference.responses)}
        store = ChunkStore(Path(config.out) / "annotations" /
                           f"{task.model.name}_vs_{reference.generator}" / eval_set.name,
                           {key: value for key, value in settings.items()
                            if key not in ("answers", "references")} |
                           {"inputs_digest": _digest(settings)}, config.chunk_size)
        indices = list(range(len(eval_set.items)))

        def judge_chunk(chunk, eval_set=eval_set, reference=reference, model=model):
            nonlocal judge
            if judge is None:
                judge = task.build_judge()
            items = [eval_set.items[i] for i in chunk]
            rows = annotate(judge, task.annotator, items,
                            Side(reference.generator, [reference.responses[i] for i in chunk]),
                            Side(model.generator, [model.responses[i] for i in chunk]),
                            config.failure_score)
            check_verdicts_readable(rows)
            return rows

        result[eval_set.name] = run_in_chunks(store, indices, judge_chunk,
                                              f"judging {eval_set.name}", config.progress)
    if judge is not None:
        judge.close()
    return result


def _digest(value) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _reference_tokens(eval_set, references, task) -> List[int]:
    if references is not None:
        return [row["response_tokens"] for row in references[eval_set.name]]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(task.model.policy)
    return [len(tokenizer(item.reference or "", add_special_tokens=False)["input_ids"])
            for item in eval_set.items]


def _summarise(config, task, sets, answers, references, annotations, out: Path) -> dict:
    per_set, files = {}, {}
    for eval_set in sets:
        difficulty = read_difficulty(config.instruction_difficulty, eval_set) \
            if config.instruction_difficulty and eval_set.name == "alpaca_eval" else None
        rows = annotations[eval_set.name]
        per_set[eval_set.name] = set_metrics(
            rows, answers[eval_set.name], None if references is None else references[eval_set.name],
            _reference_tokens(eval_set, references, task), difficulty,
            rounds=config.bootstrap_rounds, seed=config.seed)
        path = out / "annotations" / f"{task.model.name}_vs_{rows[0]['generator_1']}" / \
            eval_set.name / "annotations.json"
        atomic_write(path, lambda h, rows=rows: h.write(json.dumps(rows, indent=1).encode()))
        files[eval_set.name] = {"annotations": str(path), "exports": [
            str(p) for p in write_exports(answers[eval_set.name], task.model.name, eval_set, out)]}
    pooled = alpaca_metrics([row for name in annotations for row in annotations[name]])
    summary = {
        "model": task.model.name,
        "reference": task.reference.name if task.reference else "reference",
        "annotator": task.annotator,
        **{key: pooled[key] for key in ("n", "win_rate", "standard_error",
                                        "length_controlled_winrate", "lc_standard_error")},
        "sets": per_set, "files": files, "out": str(out),
        "settings": {k: v for k, v in asdict(config).items() if k != "progress"},
    }
    atomic_write(out / "summary.json",
                 lambda h: h.write(json.dumps(_finite(summary), indent=2).encode()))
    return _finite(summary)


def _finite(value):
    """NaN (an empty category, one annotation) as null: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
