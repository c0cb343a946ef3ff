"""Prompts in the model's own chat template (ChatML for SmolLM2, Llama-3's for Llama).

Nothing here knows a template's layout: every prompt the policy or an LLM judge sees is
``tokenizer.apply_chat_template`` of plain role/content messages, so a model gets the
format it was instruction-tuned on. A tokenizer without a template is refused.
"""

from typing import Dict, List

from megatron_tpo.data.config import ThoughtTemplate

Messages = List[Dict[str, str]]


def chat_prompt(tokenizer, messages: Messages) -> str:
    """``messages`` in ``tokenizer``'s chat template, open for the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no chat_template; the "
                         "policy's prompts must use the format it was instruction-tuned on")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def thought_messages(instruction: str, template: ThoughtTemplate) -> Messages:
    messages = []
    if template.system_prompt is not None:
        messages.append({"role": "system", "content": template.system_prompt})
    messages.append({"role": "user", "content": template.user_message(instruction)})
    return messages


def apply_thought_chat_template(tokenizer, instruction: str, template: ThoughtTemplate) -> str:
    """The generation prompt: the chat-formatted thought prompt, open for the assistant turn."""
    return chat_prompt(tokenizer, thought_messages(instruction, template))
