"""A scalar reward-model judge: an HF sequence classifier scores (instruction, response).

Every rank of the world holds the whole model (it is not sharded) and scores its
round-robin share of the texts; all scores come back, in order, on every rank, so every
rank must call ``judge`` with the same texts (the loop's judge stage runs on all ranks).
One GPU alone would take longer than the other ranks' collective timeout on the paper's
5,000 x 8 responses. With ``offload_between_phases`` the model waits in host memory and
is on its device only between ``wake`` and ``sleep`` (the run's placement wakes it for
the judging phases), so it does not sit beside the engine and the trainer on the
accelerator for the whole run.
"""

from typing import List, Sequence

import torch
from tqdm.auto import tqdm

from megatron_tpo.judge.base import Judge, Judgment, check_grouping
from megatron_tpo.parallel.collectives import world


def reward_from_output(output) -> torch.Tensor:
    """One reward per row: ArmoRM-style models return ``score``; plain classifiers ``logits``."""
    score = getattr(output, "score", None)
    if score is not None:
        return score.reshape(score.shape[0], -1)[:, 0]
    return output.logits[:, 0]


class RewardModelJudge(Judge):
    on_every_rank = True

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int = 4096,
                 device: str = "cpu", offload_between_phases: bool = False):
        self.offload_between_phases = offload_between_phases
        self.model = model.eval() if offload_between_phases else model.to(device).eval()
        self.tokenizer = tokenizer
        # Right truncation keeps the instruction and the start of the response. Right
        # padding because these models count positions from the start, not from the mask.
        tokenizer.truncation_side = "right"
        tokenizer.padding_side = "right"
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device

    @classmethod
    def from_pretrained(cls, path: str, batch_size: int = 8, max_length: int = 4096,
                        device: str = "cpu", dtype: str = "float32",
                        trust_remote_code: bool = False,
                        offload_between_phases: bool = False) -> "RewardModelJudge":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        return cls(model, tokenizer, batch_size=batch_size, max_length=max_length, device=device,
                   offload_between_phases=offload_between_phases)

    def conversation_text(self, instruction: str, response: str) -> str:
        """The reward model sees the bare instruction and the response, never the thought."""
        messages = [{"role": "user", "content": instruction},
                    {"role": "assistant", "content": response}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return f"{instruction}\n\n{response}"

    def effective_batch_size(self) -> int:
        # Sequence classifiers read the score at the last non-pad token, found through
        # config.pad_token_id; without one (Llama-3 has none) padding would move that
        # token, so such models are run one text at a time, unpadded.
        if self.tokenizer.pad_token_id is None or self.model.config.pad_token_id is None:
            return 1
        return self.batch_size

    @torch.no_grad()
    def rewards(self, texts: Sequence[str]) -> List[float]:
        batch_size = self.effective_batch_size()
        device = next(self.model.parameters()).device   # wherever the phase put the model
        rewards: List[float] = []
        for start in tqdm(range(0, len(texts), batch_size), desc="reward model batches",
                          leave=False, disable=len(texts) <= batch_size):
            # Chat texts carry their own special tokens, so none are added.
            batch = self.tokenizer(list(texts[start:start + batch_size]), return_tensors="pt",
                                   padding=batch_size > 1, truncation=True,
                                   max_length=self.max_length,
                                   add_special_tokens=False).to(device)
            output = self.model(**batch)
            rewards.extend(reward_from_output(output).float().cpu().tolist())
        return rewards

    def wake(self) -> None:
        if self.offload_between_phases:
            self.model.to(self.device)

    def sleep(self) -> None:
        """Back to host memory, its cached blocks released for the engine and the trainer."""
        if self.offload_between_phases:
            self.model.to("cpu")
            if str(self.device).startswith("cuda"):
                torch.cuda.empty_cache()

    def rewards_on_all_ranks(self, texts: Sequence[str]) -> List[float]:
        """``rewards(texts)`` with each rank scoring its round-robin share; every rank of
        the world must call it with the same texts, and gets all rewards in order."""
        rank, world_size = world()
        mine = list(range(rank, len(texts), world_size))
        scored = self.rewards([texts[i] for i in mine]) if mine else []
        if world_size == 1:
            return scored
        # Objects, not a tensor: the same call works over gloo and over NCCL whatever
        # device the reward model is on (a few floats per response).
        gathered: List[list] = [None] * world_size
        torch.distributed.all_gather_object(gathered, list(zip(mine, scored)))
        by_index = dict(pair for share in gathered for pair in share)
        return [by_index[i] for i in range(len(texts))]

    def judge(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> Judgment:
        check_grouping(prompts, responses)
        texts = [self.conversation_text(prompt, response)
                 for prompt, group in zip(prompts, responses) for response in group]
        flat = self.rewards_on_all_ranks(texts)
        scores, start = [], 0
        for group in responses:
            scores.append(flat[start:start + len(group)])
            start += len(group)
        return Judgment(scores=scores)
