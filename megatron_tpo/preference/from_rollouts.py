"""One iteration's data, rollouts to pairs: parse, judge responses only, length control, select.

Returns the three stages' rows ready for ``IterationStore.write``, so the loop stores
each stage and a restart can pick up after the last finished one.
"""

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence

from megatron_tpo.data.parsing import parse_outputs
from megatron_tpo.data.thought_templates import ThoughtTemplate
from megatron_tpo.judge.base import Judge
from megatron_tpo.judge.config import LengthControlConfig
from megatron_tpo.preference.pairs import PromptSamples, select_pairs
from megatron_tpo.rollout.engine import GenerationOutput

Row = Dict[str, Any]


@dataclass
class IterationData:
    rollouts: List[Row]
    judgments: List[Row]
    pairs: List[Row]
    # Parse failures by reason, the judge's own counts, and skipped prompts by reason.
    counts: Counter = field(default_factory=Counter)


def response_length(response: str, unit: str, tokenizer=None) -> int:
    if unit == "chars":
        return len(response)
    if tokenizer is None:
        raise ValueError("length_control.unit=tokens needs the policy tokenizer")
    return len(tokenizer(response, add_special_tokens=False)["input_ids"])


def build_iteration_data(instructions: Sequence[str], outputs: Sequence[GenerationOutput],
                         template: ThoughtTemplate, judge: Judge,
                         length_control: LengthControlConfig, tokenizer=None) -> IterationData:
    """``outputs[i]`` holds the K samples for ``instructions[i]`` (its chat-formatted prompt
    in ``outputs[i].prompt``); pairs keep the full outputs, thought and response."""
    if len(instructions) != len(outputs):
        raise ValueError(f"{len(instructions)} instructions but {len(outputs)} outputs")
    counts: Counter = Counter()
    rollouts: List[Row] = []
    responses: List[List[str]] = []
    kept_indices: List[List[int]] = []
    for prompt_id, (instruction, output) in enumerate(zip(instructions, outputs)):
        parsed, failures = parse_outputs(output.texts, template)
        counts.update(failures)
        for sample_index, (text, result) in enumerate(zip(output.texts, parsed)):
            rollouts.append({
                "prompt_id": prompt_id, "sample_index": sample_index,
                "instruction": instruction, "prompt_text": output.prompt, "output": text,
                "thought": result.thought if result else None,
                "response": result.response if result else None,
                "parse_ok": result is not None,
            })
        kept_indices.append([k for k, result in enumerate(parsed) if result is not None])
        responses.append([result.response for result in parsed if result is not None])

    judgment = judge.judge(list(instructions), responses)
    counts.update(judgment.counts)
    judgments: List[Row] = []
    samples: List[PromptSamples] = []
    for prompt_id, (indices, group) in enumerate(zip(kept_indices, responses)):
        lengths = [response_length(r, length_control.unit, tokenizer) for r in group]
        samples.append(PromptSamples(prompt_id, indices, judgment.scores[prompt_id], lengths))
        for position, sample_index in enumerate(indices):
            row = {"prompt_id": prompt_id, "sample_index": sample_index,
                   "score": float(judgment.scores[prompt_id][position]),
                   "response_length": lengths[position]}
            row.update({name: values[prompt_id][position]
                        for name, values in judgment.extras.items()})
            judgments.append(row)

    selected, skipped = select_pairs(samples, length_control.rho)
    counts.update(skipped)
    pairs = [{
        "prompt_id": pair.prompt_id, "instruction": instructions[pair.prompt_id],
        "prompt_text": outputs[pair.prompt_id].prompt,
        "chosen": outputs[pair.prompt_id].texts[pair.chosen_index],
        "rejected": outputs[pair.prompt_id].texts[pair.rejected_index],
        "chosen_index": pair.chosen_index, "rejected_index": pair.rejected_index,
        "chosen_score": pair.chosen_score, "rejected_score": pair.rejected_score,
        "score_margin": pair.score_margin, "length_margin": pair.length_margin,
        "controlled_margin": pair.controlled_margin,
    } for pair in selected]
    return IterationData(rollouts=rollouts, judgments=judgments, pairs=pairs, counts=counts)
