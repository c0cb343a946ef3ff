"""A rollout engine on plain transformers: slow, but runs anywhere (tests, the tiny CPU run)."""

from typing import Iterable, List, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from megatron_tpo.rollout.engine import GenerationOutput, RolloutEngine, SamplingParams


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

    def sleep(self) -> None:
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
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        outputs: List[GenerationOutput] = []
        for start in tqdm(range(0, len(prompts), self.batch_size), desc="rollout batches",
                          leave=False, disable=len(prompts) <= self.batch_size):
            outputs.extend(self._generate_batch(prompts[start:start + self.batch_size], sampling))
        return outputs

    @torch.no_grad()
    def _generate_batch(self, prompts: Sequence[str], sampling: SamplingParams
                        ) -> List[GenerationOutput]:
        # Left padding keeps every prompt's last token next to its first generated one.
        # Chat-formatted prompts already carry <|begin_of_text|>; adding it again would
        # give the model a prompt it never saw in training.
        batch = self.tokenizer(list(prompts), return_tensors="pt", padding=True,
                               padding_side="left", add_special_tokens=False).to(self.device)
        greedy = sampling.temperature == 0
        sampled = self.model.generate(
            **batch, do_sample=not greedy, num_return_sequences=sampling.n,
            max_new_tokens=sampling.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            **({} if greedy else {"temperature": sampling.temperature, "top_p": sampling.top_p}),
        )
        completions = sampled[:, batch["input_ids"].shape[1]:]
        results = []
        for index, prompt in enumerate(prompts):
            rows = completions[index * sampling.n:(index + 1) * sampling.n]
            texts, counts = [], []
            for row in rows:
                tokens = self._strip_after_eos(row.tolist())
                counts.append(len(tokens))
                texts.append(self.tokenizer.decode(tokens, skip_special_tokens=True))
            results.append(GenerationOutput(prompt=prompt, texts=texts, num_tokens=counts))
        return results

    def _strip_after_eos(self, tokens: List[int]) -> List[int]:
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        eos_ids.add(self.tokenizer.pad_token_id)
        for position, token in enumerate(tokens):
            if token in eos_ids:
                return tokens[:position]
        return tokens

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
