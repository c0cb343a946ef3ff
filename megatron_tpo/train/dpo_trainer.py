"""DPO on megatron-core: one TPO iteration's training stage, for one rank.

    trainer = DPOTrainer(model, parallel, training, shard_root)   # after init_megatron
    pairs = trainer.with_reference_logprobs(pairs)                # once, from M_t
    for step in range(training.train_steps):
        metrics = trainer.step(pairs_of(step))                    # this DP rank's pairs

The policy runs through megatron's pipeline schedule (1F1B, interleaved with virtual
stages) with megatron's DDP, optimizer (distributed on GPUs) and grad clipping; its
log-probs come from the fused vocab-parallel kernel, never from full logits.
"""

import time
from typing import Dict, List, Optional, Sequence

import torch

from megatron_tpo.config import ConfigError, ModelConfig, ParallelConfig
from megatron_tpo.train.config import DPOTrainingConfig
from megatron_tpo.train.dpo_batch import PairMicroBatch, TokenizedPair, pair_micro_batches
from megatron_tpo.train.dpo_step import dpo_forward_step
from megatron_tpo.train.fp8 import fp8_transformer_overrides
from megatron_tpo.train.lr_schedule import warmup_decay_scheduler
from megatron_tpo.train.megatron_setup import OptimizerSettings, wrap_for_training
from megatron_tpo.train.pipeline_step import train_step
from megatron_tpo.train.policy_logprobs import return_hidden_states_from_output_layer
from megatron_tpo.train.recompute import recompute_transformer_fields
from megatron_tpo.train.reference_logprobs import reference_pair_logprobs, with_reference_logprobs


def _sequence_tokens(pairs: Sequence[TokenizedPair]) -> int:
    return sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)


def _check_layout(parallel: ParallelConfig) -> None:
    if parallel.context_parallel_size > 1:
        # Each CP rank would need its load-balanced slice of every sequence, and the
        # sequence sums an all-reduce over CP; neither is done here yet.
        raise ConfigError(f"parallel.context_parallel_size={parallel.context_parallel_size}: "
                          "the DPO trainer does not split pairs over context-parallel ranks")


class DPOTrainer:
    """This rank's policy chunks, optimizer and LR schedule; megatron must be initialised."""

    def __init__(self, model: ModelConfig, parallel: ParallelConfig,
                 training: DPOTrainingConfig, shard_root: Optional[str] = None):
        from megatron_tpo.model.llama import build_llama_chunks, llama_transformer_config
        from megatron_tpo.model.mcore_shards import load_model_shards

        training.validate()
        _check_layout(parallel)
        self.model, self.training = model, training
        on_gpu = torch.cuda.is_available()
        self.device = (torch.device("cuda", torch.cuda.current_device()) if on_gpu
                       else torch.device("cpu"))
        params_dtype = torch.bfloat16 if on_gpu else torch.float32
        config = llama_transformer_config(
            model, parallel, params_dtype,
            **recompute_transformer_fields(training, model, parallel),
            **fp8_transformer_overrides(training, model, parallel))
        self.chunks = build_llama_chunks(model, parallel, params_dtype=params_dtype, config=config)
        for chunk in self.chunks:
            if shard_root is not None:
                load_model_shards(chunk, shard_root)
            return_hidden_states_from_output_layer(chunk)
        self.ddp_chunks, self.optimizer = wrap_for_training(self.chunks, OptimizerSettings(
            lr=training.lr, min_lr=training.min_lr, weight_decay=training.weight_decay,
            clip_grad=training.clip_grad))
        self.scheduler = warmup_decay_scheduler(self.optimizer, training)

    def restart_lr_schedule(self) -> None:
        """Warm up and decay again from step 0: each TPO iteration is its own DPO run
        (against its own reference M_t); Adam's moments carry over."""
        self.scheduler = warmup_decay_scheduler(self.optimizer, self.training)

    def micro_batches(self, pairs: Sequence[TokenizedPair]) -> List[PairMicroBatch]:
        batches = pair_micro_batches(pairs, self.training.micro_batch_pairs,
                                     self.training.pad_to_multiple_of,
                                     self.training.pad_token_id,
                                     max_seq_length=self.model.max_position_embeddings)
        return [batch.to(self.device) for batch in batches]

    def reference_logprobs(self, pairs: Sequence[TokenizedPair]) -> torch.Tensor:
        """[pairs, 2] (chosen, rejected) log-probs under the current weights, on every rank.

        Call it before the iteration's first step, when the weights are M_t.
        """
        # Any number of pairs: the last micro-batch is filled with repeats, then cut off.
        filler = -len(pairs) % self.training.micro_batch_pairs
        padded = list(pairs) + [pairs[i % len(pairs)] for i in range(filler)]
        return reference_pair_logprobs(self.ddp_chunks, self.micro_batches(padded),
                                       self.model.vocab_size)[:len(pairs)]

    def reference_logprobs_shared(self, pairs: Sequence[TokenizedPair]) -> torch.Tensor:
        """``reference_logprobs`` of the same ``pairs`` given on every rank (the loop's
        whole iteration), each data-parallel replica computing only its round-robin share;
        [pairs, 2] on every rank."""
        from megatron.core import parallel_state

        replica = parallel_state.get_data_parallel_rank()
        replicas = parallel_state.get_data_parallel_world_size()
        mine = list(range(replica, len(pairs), replicas))
        values = torch.zeros(len(pairs), 2, dtype=torch.float64, device=self.device)
        if mine:   # a replica's ranks all skip together: they share its pairs
            values[mine] = self.reference_logprobs([pairs[i] for i in mine]).to(self.device)
        # Each row comes from one replica and is zero elsewhere: the sum is exact.
        torch.distributed.all_reduce(values, group=parallel_state.get_data_parallel_group())
        return values.cpu()

    def with_reference_logprobs(self, pairs: Sequence[TokenizedPair]) -> List[TokenizedPair]:
        return with_reference_logprobs(pairs, self.reference_logprobs(pairs))

    def step(self, pairs: Sequence[TokenizedPair]) -> Dict[str, float]:
        """One optimizer step on this DP rank's ``pairs`` (which carry reference log-probs).

        Returns ``grad_norm``, ``lr``, ``tokens_per_second`` (all DP ranks' sequence
        tokens) and ``seconds`` on every rank, and, on the last pipeline stage, the DPO
        metrics averaged over pairs: ``loss``, ``rewards/accuracy``, ``rewards/chosen``,
        ``rewards/rejected``, ``rewards/margin``, ``logps/chosen``, ``logps/rejected``.
        """
        from megatron.core import parallel_state

        batches = self.micro_batches(pairs)
        if batches[0].reference_logprobs is None:
            raise ValueError("pairs carry no reference log-probs: run with_reference_logprobs "
                             "on the iteration's pairs before training on them")
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        self.scheduler.step(1)
        metrics = train_step(self.ddp_chunks, self.optimizer,
                             dpo_forward_step(self.training, self.model.vocab_size), batches,
                             seq_length=batches[0].seq_length,
                             micro_batch_size=2 * self.training.micro_batch_pairs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        tokens = torch.tensor(float(_sequence_tokens(pairs)), device=self.device)
        torch.distributed.all_reduce(tokens, group=parallel_state.get_data_parallel_group())
        metrics.update(lr=self.optimizer.param_groups[0]["lr"], seconds=seconds,
                       tokens_per_second=tokens.item() / seconds)
        return metrics
