"""Thought prompts, judge prompts and reward-model input in the tokenizer's own template.

Two real templates, verbatim: SmolLM2-135M-Instruct's ChatML (which adds its own system
turn when there is none) and Meta-Llama-3-8B-Instruct's header/eot layout. Each must
yield exactly the prompt the thought template asks for, with no Llama-3 text in ChatML.
"""

from typing import List, Sequence

import pytest
import torch

from megatron_tpo.data.chat import apply_thought_chat_template, chat_prompt
from megatron_tpo.data.thought_templates import GENERIC, load_thought_template
from megatron_tpo.judge.config import JudgeConfig
from megatron_tpo.judge.factory import build_judge
from megatron_tpo.judge.reward_model import RewardModelJudge
from megatron_tpo.rollout.engine import GenerationOutput, RolloutEngine

SMOLLM2_CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
SMOLLM2_SYSTEM = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                  "Hugging Face<|im_end|>\n")
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
INSTRUCTION = "Why is the sky blue? Answer in {two} sentences."


def _tokenizer(template):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
        bos_token="<|begin_of_text|>", unk_token="<unk>")
    tokenizer.chat_template = template
    return tokenizer


def _chatml(*turns):
    return "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in turns)


def _llama3(*turns):
    return "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>{role}<|end_header_id|>\n\n{text.strip()}<|eot_id|>"
        for role, text in turns)


def test_generic_thought_prompt_in_chatml_and_llama3_is_the_templates_user_turn():
    asked = GENERIC.user_message(INSTRUCTION)
    assert asked.endswith("User query: " + INSTRUCTION) and "Here is my response:" in asked
    chatml = apply_thought_chat_template(_tokenizer(SMOLLM2_CHATML), INSTRUCTION, GENERIC)
    assert chatml == SMOLLM2_SYSTEM + _chatml(("user", asked)) + "<|im_start|>assistant\n"
    llama3 = apply_thought_chat_template(_tokenizer(LLAMA3), INSTRUCTION, GENERIC)
    assert llama3 == (_llama3(("user", asked))
                      + "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "<|eot_id|>" not in chatml and "<|im_start|>" not in llama3


def test_system_variant_puts_the_thought_prompt_in_each_templates_system_turn():
    template = load_thought_template("system")
    chatml = apply_thought_chat_template(_tokenizer(SMOLLM2_CHATML), INSTRUCTION, template)
    # A system turn of its own replaces SmolLM2's default one.
    assert chatml == (_chatml(("system", template.system_prompt), ("user", INSTRUCTION))
                      + "<|im_start|>assistant\n")
    llama3 = apply_thought_chat_template(_tokenizer(LLAMA3), INSTRUCTION, template)
    assert llama3.startswith(_llama3(("system", template.system_prompt), ("user", INSTRUCTION)))


class _RecordingEngine(RolloutEngine):
    """Answers every judge prompt with a verdict for A and remembers the prompts."""

    def __init__(self):
        self.prompts: List[str] = []

    def generate(self, prompts: Sequence[str], sampling) -> List[GenerationOutput]:
        self.prompts += list(prompts)
        return [GenerationOutput(prompt=p, texts=["Better. [[A]]"], num_tokens=[3])
                for p in prompts]

    def update_weights(self, stream) -> None:
        raise AssertionError("not used")


@pytest.mark.parametrize("template,opening,closing", [
    (SMOLLM2_CHATML, SMOLLM2_SYSTEM + "<|im_start|>user\n",
     "<|im_end|>\n<|im_start|>assistant\n"),
    (LLAMA3, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
     "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
])
def test_pairwise_judge_prompts_use_the_judge_tokenizers_template(template, opening, closing):
    engine = _RecordingEngine()
    judge = build_judge(JudgeConfig(kind="pairwise"), engine=engine,
                        judge_tokenizer=_tokenizer(template))
    judgment = judge.judge([INSTRUCTION], [["first answer", "second answer"]])
    assert len(engine.prompts) == 2  # both orders
    for prompt in engine.prompts:
        assert prompt.startswith(opening) and prompt.endswith(closing)
        body = prompt[len(opening):-len(closing)]
        assert body.startswith("Please act as an impartial judge")
        assert INSTRUCTION in body and "first answer" in body and "second answer" in body
    # Each order's verdict is "A", so the two responses win once each: a tie.
    assert judgment.scores[0][0] == pytest.approx(judgment.scores[0][1])


def test_reward_model_input_is_the_bare_instruction_and_response_in_its_template():
    chatml = RewardModelJudge(torch.nn.Identity(), _tokenizer(SMOLLM2_CHATML))
    assert chatml.conversation_text(INSTRUCTION, "Rayleigh scattering.") == (
        SMOLLM2_SYSTEM + _chatml(("user", INSTRUCTION), ("assistant", "Rayleigh scattering.")))
    llama3 = RewardModelJudge(torch.nn.Identity(), _tokenizer(LLAMA3))
    assert llama3.conversation_text(INSTRUCTION, "Rayleigh scattering.") == _llama3(
        ("user", INSTRUCTION), ("assistant", "Rayleigh scattering."))


def test_a_tokenizer_without_a_chat_template_is_refused_for_policy_and_judge_prompts():
    bare = _tokenizer(None)
    with pytest.raises(ValueError, match="no chat_template"):
        apply_thought_chat_template(bare, INSTRUCTION, GENERIC)
    with pytest.raises(ValueError, match="no chat_template"):
        chat_prompt(bare, [{"role": "user", "content": "hi"}])
