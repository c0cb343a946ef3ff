"""A rollout engine on plain transformers: slow, but runs anywhere (tests, the tiny CPU run)."""

from typing import Dict, Iterable, List, Sequence, Tuple

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from megatron_tpo.rollout.completions import eos_token_ids, finish_completion
from megatron_tpo.rollout.engine import (
    GenerationOutput, RolloutEngine, SamplingParams, tensor_checksum,
)


class _StopStrings(StoppingCriteria):
    """Ends a row once its completion's text holds a stop string.

    Only the last few tokens are decoded each step (a full decode every step would be
    quadratic in the length); a hit there is confirmed on the whole completion, and
    ``finish_completion`` decides where the completion is cut either way.
    """

    def __init__(self, tokenizer, stop: Sequence[str], prompt_length: int):
        self.tokenizer, self.stop, self.prompt_length = tokenizer, list(stop), prompt_length
        self.window = max(len(s) for s in stop) + 8

    def _holds_stop(self, token_ids: torch.Tensor) -> bool:
        text = self.tokenizer.decode(token_ids.tolist(), skip_special_tokens=True)
        return any(s in text for s in self.stop)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        completions = input_ids[:, self.prompt_length:]
        done = [self._holds_stop(row[-self.window:]) and self._holds_stop(row)
                for row in completions]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class HFRolloutEngine(RolloutEngine):
    def __init__(self, model, tokenizer, device: str = "cpu", batch_size: int = 8):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        if tokenizer.pad_token is None:
            # Llama-3 ships no pad token; padded positions are masked out, and output is
            # cut at the first end-of-sequence token anyway, so EOS can stand in.
            tokenizer.pad_token = tokenizer.eos_token
        self.device = device
        self.batch_size = batch_size
        self.asleep = False
        self.eos_token_ids = eos_token_ids(tokenizer, model.generation_config.eos_token_id)

    def sleep(self, keep_weights: bool = False) -> None:
        # Parks the weights in host memory so a colocated trainer gets the accelerator.
        self.model.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.asleep = True

    def wake(self) -> None:
        self.model.to(self.device)
        self.asleep = False

    def generate(self, prompts: Sequence[str], sampling: SamplingParams) -> List[GenerationOutput]:
        if self.asleep:
            raise RuntimeError("HFRolloutEngine.generate called while asleep; call wake() first")
        sampling.validate()
        devices = [torch.device(self.device).index or 0] if str(self.device).startswith("cuda") else []
        # A private RNG stream: a seeded rollout must not reset the trainer's RNG.
        with torch.random.fork_rng(devices=devices, enabled=sampling.seed is not None):
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            outputs: List[GenerationOutput] = []
            for start in tqdm(range(0, len(prompts), self.batch_size), desc="rollout batches",
                              leave=False, disable=len(prompts) <= self.batch_size):
                outputs.extend(self._generate_batch(prompts[start:start + self.batch_size],
                                                    sampling))
        return outputs

    @torch.no_grad()
    def _generate_batch(self, prompts: Sequence[str], sampling: SamplingParams
                        ) -> List[GenerationOutput]:
        # Left padding keeps every prompt's last token next to its first generated one.
        # Chat-formatted prompts already carry <|begin_of_text|>; adding it again would
        # give the model a prompt it never saw in training.
        batch = self.tokenizer(list(prompts), return_tensors="pt", padding=True,
                               padding_side="left", add_special_tokens=False).to(self.device)
        prompt_length = batch["input_ids"].shape[1]
        stop_ids = self.eos_token_ids + [t for t in sampling.stop_token_ids
                                         if t not in self.eos_token_ids]
        greedy = sampling.temperature == 0
        criteria = StoppingCriteriaList(
            [_StopStrings(self.tokenizer, sampling.stop, prompt_length)] if sampling.stop else [])
        sampled = self.model.generate(
            **batch, do_sample=not greedy, num_return_sequences=sampling.n,
            max_new_tokens=sampling.max_new_tokens, eos_token_id=stop_ids,
            pad_token_id=self.tokenizer.pad_token_id, stopping_criteria=criteria,
            **({} if greedy else {"temperature": sampling.temperature, "top_p": sampling.top_p,
                                  "top_k": 0}),
        )
        finished = [finish_completion(row.tolist(), self.tokenizer, stop_ids, sampling.stop)
                    for row in sampled[:, prompt_length:]]
        logprobs = (self._completion_logprobs(batch["attention_mask"], sampled, sampling.n)
                    if sampling.logprobs else None)
        results = []
        for index, prompt in enumerate(prompts):
            rows = range(index * sampling.n, (index + 1) * sampling.n)
            mask = batch["attention_mask"][index].bool()
            results.append(GenerationOutput(
                prompt=prompt, texts=[finished[r].text for r in rows],
                num_tokens=[len(finished[r].token_ids) for r in rows],
                prompt_token_ids=batch["input_ids"][index][mask].tolist(),
                token_ids=[finished[r].token_ids for r in rows],
                finish_reasons=[finished[r].finish_reason for r in rows],
                logprobs=None if logprobs is None else [
                    logprobs[r][:len(finished[r].token_ids)] for r in rows]))
        return results

    def _completion_logprobs(self, prompt_mask: torch.Tensor, sampled: torch.Tensor,
                             n: int) -> List[List[float]]:
        """Log-probs of every sampled token under the raw model distribution (before
        temperature and top-p), from one forward pass over prompt + completion."""
        prompt_length = prompt_mask.shape[1]
        completion_length = sampled.shape[1] - prompt_length
        mask = torch.cat([prompt_mask.repeat_interleave(n, dim=0),
                          torch.ones_like(sampled[:, prompt_length:])], dim=1)
        # Left padding shifts positions; count them from each row's first real token.
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        logits = self.model(input_ids=sampled, attention_mask=mask, position_ids=positions,
                            logits_to_keep=completion_length + 1).logits[:, :-1]
        picked = torch.log_softmax(logits.float(), dim=-1).gather(
            -1, sampled[:, prompt_length:, None])[..., 0]
        return picked.tolist()

    @torch.no_grad()
    def score(self, token_ids: Sequence[Sequence[int]]) -> List[List[float]]:
        if self.asleep:
            raise RuntimeError("HFRolloutEngine.score called while asleep; call wake() first")
        scores: List[List[float]] = []
        for start in range(0, len(token_ids), self.batch_size):
            scores.extend(self._score_batch(token_ids[start:start + self.batch_size]))
        return scores

    def _score_batch(self, sequences: Sequence[Sequence[int]]) -> List[List[float]]:
        # Right padding: causal attention never lets a real token see the pad after it.
        longest = max(len(s) for s in sequences)
        ids = torch.zeros(len(sequences), longest, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            ids[row, :len(sequence)] = torch.tensor(list(sequence), dtype=torch.long)
        ids = ids.to(self.device)
        logits = self.model(input_ids=ids).logits[:, :-1].float()
        picked = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        return [picked[row, :len(s) - 1].tolist() for row, s in enumerate(sequences)]

    @torch.no_grad()
    def update_weights(self, stream: Iterable[Tuple[str, torch.Tensor]]) -> None:
        # Tensors are copied as they arrive (the stream may be larger than memory), so an
        # error part-way leaves a half-updated model: callers must treat it as fatal.
        parameters = dict(self.model.named_parameters())
        for name, tensor in stream:
            if name not in parameters:
                raise KeyError(f"update_weights: {name!r} is not a parameter of "
                               f"{type(self.model).__name__}")
            target = parameters[name]
            if target.shape != tensor.shape:
                raise ValueError(f"update_weights: {name!r} has shape {tuple(tensor.shape)}, "
                                 f"the model expects {tuple(target.shape)}")
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))

    def weight_checksums(self, names: Sequence[str]) -> Dict[str, Tuple[float, float]]:
        parameters = dict(self.model.named_parameters())
        return {name: tensor_checksum(parameters[name]) for name in names if name in parameters}
