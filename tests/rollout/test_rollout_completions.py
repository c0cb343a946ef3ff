"""finish_completion on a byte-level BPE tokenizer (Llama-3's kind): multi-byte
characters split over tokens, tokens that carry a leading space or part of a stop
string, and completions that start mid-character."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from megatron_tpo.rollout.completions import finish_completion

CORPUS = ["the cat sat on the mat. ", "héllo wörld — naïve café ", "thought: x<R>response!",
          "日本語のテキスト ", "</R> end of response"]


@pytest.fixture(scope="module")
def byte_level():
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS * 50, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


def _decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_a_stop_string_cuts_at_the_last_token_boundary_before_it(byte_level):
    rng = random.Random(0)
    checked = 0
    for _ in range(400):
        ids = byte_level("".join(rng.choice(CORPUS) for _ in range(2)),
                         add_special_tokens=False)["input_ids"]
        ids = ids[rng.randrange(len(ids)):]          # may start inside a character
        text = _decode(byte_level, ids)
        if len(text) < 3:
            continue
        begin = rng.randrange(len(text) - 1)
        stop = text[begin:begin + rng.randint(1, 4)]
        done = finish_completion(ids, byte_level, [byte_level.eos_token_id], [stop])
        kept = len(done.token_ids)
        assert done.token_ids == ids[:kept] and done.finish_reason == "stop"
        assert done.text == _decode(byte_level, done.token_ids) and stop not in done.text
        assert len(done.text) <= text.find(stop)     # no part of the stop string is kept
        # One more token would already reach into the stop string.
        longer = _decode(byte_level, ids[:kept + 1])
        assert stop in longer or len(longer) > text.find(stop), (stop, text, done.text)
        checked += 1
    assert checked > 300


def test_eos_comes_before_a_later_stop_string_and_length_needs_neither(byte_level):
    ids = byte_level("the cat sat", add_special_tokens=False)["input_ids"]
    eos = byte_level.eos_token_id
    stopped = finish_completion(ids[:2] + [eos] + ids[2:], byte_level, [eos], ["sat"])
    assert stopped.token_ids == ids[:2] and stopped.finish_reason == "stop"
    running = finish_completion(ids, byte_level, [eos], ["dog"])
    assert running.token_ids == ids and running.finish_reason == "length"
    assert running.text == "the cat sat"
