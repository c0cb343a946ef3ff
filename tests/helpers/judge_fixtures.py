"""A tiny pairwise judge whose verdicts parse, and the prompts and responses it was shaped
on: shared by the judge-pool test and tpo-eval's judge-pool test."""

from pathlib import Path

import torch

from tiny_hf import tiny_llama_config, tiny_tokenizer

PROMPTS = ["which is best", "pick one", "the sun is"]
RESPONSES = [["the cat", "a dog", "sun", "moon is here"], ["x y", "y"], ["hot", "up", "a b c"]]


def write_verdict_judge(directory: Path) -> Path:
    """A tiny random judge whose greedy first token is ``[[A]]`` or ``[[B]]``, which one
    depending on the judge prompt: verdicts that parse, and scores that are not all ties.

    Both verdict rows of the output layer point along the mean last hidden state of this
    test's judge prompts (so they beat every other token, scaled down), and apart along
    the difference between the first pair's two orders, split at their midpoint (so at
    least that pair gets the same response in both orders, which a random model, nearly
    blind to order, would not)."""
    from transformers import LlamaForCausalLM

    from megatron_tpo.data.chat import chat_prompt
    from megatron_tpo.judge.pairwise import pairs_to_judge
    from megatron_tpo.judge.verdict import PAIRWISE_JUDGE_PROMPT, render_judge_prompt

    tokenizer = tiny_tokenizer()
    torch.manual_seed(3)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, tie_word_embeddings=False))
    texts = [chat_prompt(tokenizer, [{"role": "user", "content": render_judge_prompt(
        PAIRWISE_JUDGE_PROMPT, prompt, group[i], group[j])}])
        for prompt, group in zip(PROMPTS, RESPONSES)
        for a, b in pairs_to_judge(len(group), None, None) for i, j in ((a, b), (b, a))]
    with torch.no_grad():
        last = torch.stack([model(**tokenizer(text, return_tensors="pt",
                                              add_special_tokens=False),
                                  output_hidden_states=True).hidden_states[-1][0, -1]
                            for text in texts])
        along = last.mean(0) / last.mean(0).norm()
        apart = last[0] - last[1]
        apart -= (apart @ along) * along
        apart *= 20 / apart.norm()
        middle = (last[0] + last[1]) / 2
        # (A - B) . h = 2 (apart . h - threshold along . h): zero at the first pair's middle.
        threshold = (apart @ middle) / (along @ middle)
        verdicts = tokenizer.convert_tokens_to_ids(["[[A]]", "[[B]]"])
        model.lm_head.weight.mul_(0.01)
        model.lm_head.weight[verdicts[0]] = 40 * along + apart - threshold * along
        model.lm_head.weight[verdicts[1]] = 40 * along - apart + threshold * along
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
