"""The thought prompt inside the policy's chat template (Llama-3's header/eot format)."""

from typing import Dict, List

from megatron_tpo.data.thought_templates import ThoughtTemplate


def thought_messages(instruction: str, template: ThoughtTemplate) -> List[Dict[str, str]]:
    messages = []
    if template.system_prompt is not None:
        messages.append({"role": "system", "content": template.system_prompt})
    messages.append({"role": "user", "content": template.user_message(instruction)})
    return messages


def apply_thought_chat_template(tokenizer, instruction: str, template: ThoughtTemplate) -> str:
    """The generation prompt: the chat-formatted thought prompt, open for the assistant turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no chat_template; the "
                         "policy's prompts must use the format it was instruction-tuned on")
    return tokenizer.apply_chat_template(thought_messages(instruction, template),
                                         tokenize=False, add_generation_prompt=True)
