"""From sampled token ids to a finished completion: where it stops, its text, and why.

Every engine samples past the point a completion ends (vLLM keeps the stop token, HF
pads finished rows), so both hand their raw ids to ``finish_completion``, which applies
one rule: cut before the first EOS or stop token, then before the first stop string;
the text is the decode of exactly the ids kept, so DPO trains on what the text shows.
"""

from dataclasses import dataclass
from typing import Collection, List, Optional, Sequence


@dataclass
class FinishedCompletion:
    token_ids: List[int]
    text: str
    finish_reason: str  # "stop" or "length"


def _decode(tokenizer, token_ids: Sequence[int]) -> str:
    return tokenizer.decode(list(token_ids), skip_special_tokens=True)


def _first_stop(text: str, stop: Sequence[str]) -> Optional[int]:
    found = [text.find(s) for s in stop if s in text]
    return min(found) if found else None


def _cut_at_stop_string(token_ids: List[int], tokenizer, stop: Sequence[str]
                        ) -> Optional[List[int]]:
    """The longest prefix of ``token_ids`` whose text ends before the first stop string,
    or None when the text holds no stop string."""
    if not stop or _first_stop(_decode(tokenizer, token_ids), stop) is None:
        return None
    # The shortest prefix whose text holds a stop string: a decoded prefix only grows,
    # so bisect instead of decoding every prefix.
    low, high = 1, len(token_ids)
    while low < high:
        middle = (low + high) // 2
        if _first_stop(_decode(tokenizer, token_ids[:middle]), stop) is None:
            low = middle + 1
        else:
            high = middle
    start = _first_stop(_decode(tokenizer, token_ids[:low]), stop)
    # Token `low - 1` completes the stop string; it may also carry text from before it
    # (or the string may span tokens), so drop tokens until the text ends before it.
    kept = low - 1
    while kept > 0 and len(_decode(tokenizer, token_ids[:kept])) > start:
        kept -= 1
    return token_ids[:kept]


def finish_completion(token_ids: Sequence[int], tokenizer, stop_token_ids: Collection[int],
                      stop: Sequence[str] = ()) -> FinishedCompletion:
    """Cut raw sampled ids before the first of ``stop_token_ids`` (EOS included) or the
    first stop string; a completion cut by neither finished for ``"length"``."""
    token_ids = list(token_ids)
    reason = "length"
    for position, token in enumerate(token_ids):
        if token in stop_token_ids:
            token_ids, reason = token_ids[:position], "stop"
            break
    cut = _cut_at_stop_string(token_ids, tokenizer, stop)
    if cut is not None:
        token_ids, reason = cut, "stop"
    return FinishedCompletion(token_ids, _decode(tokenizer, token_ids), reason)


def eos_token_ids(tokenizer, generation_eos=None) -> List[int]:
    """The end-of-sequence ids a model stops at: its generation config's (Llama-3
    instruct lists both ``<|end_of_text|>`` and ``<|eot_id|>``) and the tokenizer's."""
    ids = generation_eos if isinstance(generation_eos, (list, tuple)) else [generation_eos]
    ids = [token for token in ids if token is not None]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
