from megatron_tpo.data.thought_templates import GENERIC
from megatron_tpo.rollout.engine import GenerationOutput, RolloutEngine, SamplingParams
from megatron_tpo.tiny.evaluate import score_policy
from megatron_tpo.tiny.task import SumProblem, thought_demonstration
from megatron_tpo.tiny.tokenizer import train_tokenizer


class ScriptedEngine(RolloutEngine):
    """Answers every prompt with the same scripted outputs, recording what it was asked."""

    def __init__(self, texts_for):
        self.texts_for, self.prompts = texts_for, []

    def generate(self, prompts, sampling):
        self.prompts.extend(prompts)
        return [GenerationOutput(prompt=p, texts=self.texts_for(i), num_tokens=[1] * sampling.n)
                for i, p in enumerate(prompts)]

    def update_weights(self, stream):
        raise NotImplementedError


def test_score_counts_unparsed_thought_outputs_as_wrong_and_reports_parse_rate():
    problems = [SumProblem((11, 22, 33, 44)), SumProblem((50, 60, 70, 80))]
    tokenizer = train_tokenizer([GENERIC.prompt, "user assistant"], vocab_size=300)

    def texts_for(index):
        right = thought_demonstration(problems[index], GENERIC)
        return [right, right.replace(problems[index].answer, "7"),
                "The answer is " + problems[index].answer,  # no response marker: unparsed
                right + "\nHere is my response:\nagain"]  # marker twice: unparsed

    engine = ScriptedEngine(texts_for)
    score = score_policy(engine, tokenizer, problems, "thought", SamplingParams(n=4))
    assert (score.accuracy, score.parse_rate, score.samples) == (0.25, 0.5, 8)
    assert "User query: What is 11 + 22 + 33 + 44?" in engine.prompts[0]


def test_direct_style_judges_the_whole_output_of_the_bare_instruction_prompt():
    problems = [SumProblem((10, 20, 30, 45))]
    tokenizer = train_tokenizer(["user assistant"], vocab_size=300)
    engine = ScriptedEngine(lambda i: ["The answer is 105.", "The answer is 104.", "105"])
    score = score_policy(engine, tokenizer, problems, "direct", SamplingParams(n=3))
    assert abs(score.accuracy - 1 / 3) < 1e-12 and score.parse_rate == 1.0
    assert engine.prompts[0].endswith("What is 10 + 20 + 30 + 45?<|eot_id|><|start_header_id|>"
                                      "assistant<|end_header_id|>\n\n")
