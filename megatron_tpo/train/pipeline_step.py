"""Megatron's pipeline schedule (1F1B, interleaved with VPP) for one optimiser step, and
forward-only passes that collect per-token values (reference log-probs, parity probes)."""

from typing import Callable, Dict, List, Sequence

import torch


def unwrapped(model):
    """The ``GPTModel`` inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def position_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """[batch, seq] positions 0..seq-1: every sequence of a micro-batch starts at 0."""
    return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)


def train_step(
    ddp_chunks: List,
    optimizer,
    forward_step: Callable,
    micro_batches: Sequence,
    seq_length: int,
    micro_batch_size: int,
) -> Dict[str, float]:
    """Run forward/backward over ``micro_batches`` and step the optimizer.

    ``forward_step(data_iterator, model) -> (output, loss_func)`` as megatron expects;
    ``loss_func`` returns ``(loss, metrics_dict)``. Returns the mean of each metric over
    micro-batches (on the last pipeline stage; empty elsewhere) plus ``grad_norm``.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in ddp_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    model = ddp_chunks if len(ddp_chunks) > 1 else ddp_chunks[0]
    # Every virtual stage reads each micro-batch once, so each gets its own iterator.
    iterators = [iter(micro_batches) for _ in ddp_chunks]
    iterator = iterators[0] if len(ddp_chunks) == 1 else iterators
    per_microbatch = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterator, model=model,
        num_microbatches=len(micro_batches), seq_length=seq_length,
        micro_batch_size=micro_batch_size, forward_only=False,
    )
    update_successful, grad_norm, _ = optimizer.step()
    metrics: Dict[str, float] = {}
    for name in per_microbatch[0] if per_microbatch else ():
        values = torch.stack([torch.as_tensor(m[name], dtype=torch.float64)
                              for m in per_microbatch])
        metrics[name] = values.mean().item()
    metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    metrics["update_successful"] = float(bool(update_successful))
    return metrics


def collecting_forward_step(values_of: Callable) -> Callable:
    """A forward-only step for megatron's schedule that collects, per micro-batch,
    ``values_of(gpt_model, hidden_states, batch) -> {name: tensor}`` on the last stage."""
    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch.input_ids, position_ids(batch.input_ids), None)

        def collect(hidden_states):
            # The schedule divides the returned loss in place, so it gets its own zero.
            return hidden_states.new_zeros(()), values_of(unwrapped(model), hidden_states, batch)

        return output, collect

    return forward_step


def forward_only(chunks: List, forward_step: Callable, micro_batches: Sequence,
                 seq_length: int, micro_batch_size: int) -> List[Dict]:
    """``forward_step``'s collected values of every micro-batch, without gradients (on the
    last pipeline stage; empty elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    iterators = [iter(micro_batches) for _ in chunks]
    with torch.no_grad():
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(chunks) > 1 else iterators[0],
            model=list(chunks) if len(chunks) > 1 else chunks[0],
            num_microbatches=len(micro_batches), seq_length=seq_length,
            micro_batch_size=micro_batch_size, forward_only=True)


def from_last_stage(values: torch.Tensor) -> torch.Tensor:
    """``values`` as the last pipeline stage computed them, on every stage (the others
    pass a tensor of the same shape and dtype to receive into)."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(
            values, src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group())
    return values
