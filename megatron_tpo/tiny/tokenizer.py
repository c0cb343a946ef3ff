"""A byte-level BPE tokenizer trained here on the tiny task's text, with Llama-3's chat format.

Nothing is downloaded: the vocabulary is learned from the task corpus and the thought
prompt. Digits are always single tokens, so a running sum is digit-by-digit work the
tiny model can learn instead of memorising multi-digit tokens. Special tokens and the
chat template follow Llama-3 (``<|begin_of_text|>``, header ids, ``<|eot_id|>``), so the
tiny run drives exactly the prompt code the real Llama-3 runs use.
"""

from pathlib import Path
from typing import Iterable

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
END_OF_TURN = "<|eot_id|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [BEGIN_OF_TEXT, END_OF_TEXT, START_HEADER, END_HEADER, END_OF_TURN, PAD]

# Llama-3's template: BOS once, each turn as header + "\n\n" + trimmed content + eot; the
# generation prompt opens the assistant turn.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)


def train_tokenizer(corpus: Iterable[str], vocab_size: int):
    """A ``PreTrainedTokenizerFast`` trained on ``corpus``; EOS is ``<|eot_id|>``.

    No post-processor adds BOS: the chat template writes it, and the rollout engine
    tokenizes chat-formatted prompts with ``add_special_tokens=False``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BEGIN_OF_TEXT,
                                   eos_token=END_OF_TURN, pad_token=PAD,
                                   additional_special_tokens=[START_HEADER, END_HEADER,
                                                              END_OF_TEXT])
    fast.chat_template = LLAMA3_CHAT_TEMPLATE
    return fast


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
