"""The live megatron weights of every rank as one stream of HF-named full tensors.

Every rank of the trainer world calls ``WeightStream(plan, chunks, model, transport)`` and
iterates it in the same order; it yields every HF tensor of the model on every rank, so
each rank's own engine (an HF replica on CPU, a vLLM TP worker on GPU) loads from it:

    for each bucket of the plan (consecutive tensors of one pipeline stage):
        the stage's TP shards of each tensor are written straight into their HF places
        in one flat buffer (llama_layout's merges: QKV split per query group, gate/up
        split, vocab padding cut), on the bucket's source (TP rank 0) after a gather
        over TP, or by each TP rank itself into shared memory (``bucket_transport``);
        the buffer reaches every rank (a broadcast: gloo on CPU, NCCL on GPU; or a
        barrier, for CPU ranks that share the buffer) and every rank yields views of it,
        ``(hf_name, tensor)``.

Bucket i + 1 is packed before bucket i is handed to the engines, so a rank holds two
buckets (with the broadcast: the one its engine reads, the next one arriving; shared
memory keeps two slots per host instead of per rank) and, on a broadcast's source, the
gathered shards of one tensor. A tensor larger than a bucket travels alone in a bucket
of its own size.

The plan (which rank sends which tensor, gathered from whom, in which bucket, at which
offset) depends only on the two layouts, so it is computed once per set of chunks and
cached. Only data-parallel replica 0 sends; the other replicas hold the same weights.
"""

import weakref
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from megatron_tpo.config import ModelConfig
from megatron_tpo.model import llama_layout as layout
from megatron_tpo.rollout.engine import tensor_checksum
from megatron_tpo.weights.transports import ProcessGroupTransport

_LOCAL_NAME_FOR_TE = {te: local for local, te in layout.TE_NAME_FOR_LOCAL.items()}


def hf_tensors(mcore_name: str, shards: List[torch.Tensor], model: ModelConfig
               ) -> Dict[str, torch.Tensor]:
    """One megatron tensor (global layer number), one shard per TP rank (one copy for a
    replicated tensor) -> the HF-named tensors it holds."""
    if mcore_name == layout.EMBEDDING:
        return {layout.HF_EMBEDDING: layout.merge_vocab(shards, model.vocab_size)}
    if mcore_name == layout.OUTPUT_LAYER:
        return {layout.HF_OUTPUT_LAYER: layout.merge_vocab(shards, model.vocab_size)}
    if mcore_name == layout.FINAL_NORM:
        return {layout.HF_FINAL_NORM: shards[0]}
    number, inner = _split_layer_name(mcore_name)
    return {layout.hf_layer_prefix(number) + name: tensor
            for name, tensor in layout.merge_layer_tensor(inner, shards, model).items()}


def hf_tensors_into(mcore_name: str, shards: List[torch.Tensor], model: ModelConfig,
                    out: Dict[str, torch.Tensor]) -> None:
    """``hf_tensors`` written into ``out`` (HF names -> tensors of the HF shapes): each
    shard goes straight into place, with no intermediate copy."""
    if mcore_name in (layout.EMBEDDING, layout.OUTPUT_LAYER):
        hf_name = layout.HF_EMBEDDING if mcore_name == layout.EMBEDDING else layout.HF_OUTPUT_LAYER
        layout.merge_vocab_into(shards, out[hf_name])
    elif mcore_name == layout.FINAL_NORM:
        out[layout.HF_FINAL_NORM].copy_(shards[0])
    else:
        number, inner = _split_layer_name(mcore_name)
        prefix = layout.hf_layer_prefix(number)
        layout.merge_layer_tensor_into(inner, shards, model, {
            name[len(prefix):]: tensor for name, tensor in out.items() if name.startswith(prefix)})


def _split_layer_name(mcore_name: str) -> Tuple[int, str]:
    prefix = "decoder.layers."
    if not mcore_name.startswith(prefix):
        raise KeyError(f"weight stream: no HF tensor for megatron tensor {mcore_name!r}")
    number, inner = mcore_name[len(prefix):].split(".", 1)
    return int(number), inner


def _is_tensor_parallel(mcore_name: str) -> bool:
    if mcore_name.startswith("decoder.layers."):
        return layout.is_tensor_parallel(_split_layer_name(mcore_name)[1])
    return layout.is_tensor_parallel(mcore_name)


def _hf_order_key(mcore_name: str) -> Tuple[int, int]:
    if mcore_name == layout.EMBEDDING:
        return (-1, 0)
    if mcore_name in (layout.FINAL_NORM, layout.OUTPUT_LAYER):
        return (1 << 30, 0 if mcore_name == layout.FINAL_NORM else 1)
    return (_split_layer_name(mcore_name)[0], 0)


def local_tensors(gpt_chunks: Sequence) -> Dict[str, Tuple[int, str, torch.Tensor]]:
    """``{megatron name with global layer number: (chunk index, local name, tensor)}`` of
    this rank's weights, with Transformer Engine's fused-norm names made local ones."""
    from megatron_tpo.model.mcore_shards import with_global_layer_numbers

    found = {}
    for index, chunk in enumerate(gpt_chunks):
        named = dict(chunk.named_parameters())
        renamed = with_global_layer_numbers(chunk, {name: name for name in named})
        for global_name, local_name in renamed.items():
            for te_name, local_suffix in _LOCAL_NAME_FOR_TE.items():
                if global_name.endswith(te_name):
                    global_name = global_name[: -len(te_name)] + local_suffix
            found[global_name] = (index, local_name, named[local_name])
    return found


@dataclass
class PlannedTensor:
    mcore_name: str
    gather_ranks: Tuple[int, ...]          # global ranks by TP rank; the first is the source
    hf_shapes: List[Tuple[str, Tuple[int, ...]]]
    shard_shape: Tuple[int, ...]           # of each TP rank's piece (equal on all of them)

    @property
    def shard_numel(self) -> int:
        return _numel(self.shard_shape)

    @property
    def numel(self) -> int:
        return sum(_numel(shape) for _, shape in self.hf_shapes)


@dataclass
class Bucket:
    source: int                            # global rank that packs and broadcasts it
    tensors: List[PlannedTensor] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    def views(self, buffer: torch.Tensor) -> Iterator[Tuple[str, torch.Tensor]]:
        offset = 0
        for planned in self.tensors:
            for name, shape in planned.hf_shapes:
                count = _numel(shape)
                yield name, buffer[offset:offset + count].view(shape)
                offset += count


@dataclass(eq=False)   # identity: transports are cached per plan
class WeightStreamPlan:
    buckets: List[Bucket]
    dtype: torch.dtype
    bucket_bytes: int

    @property
    def total_bytes(self) -> int:
        return sum(b.numel for b in self.buckets) * _element_size(self.dtype)

    @property
    def largest_bucket_bytes(self) -> int:
        return max(b.numel for b in self.buckets) * _element_size(self.dtype)

    @property
    def largest_tensor_bytes(self) -> int:
        return max(_numel(shape) for b in self.buckets for t in b.tensors
                   for _, shape in t.hf_shapes) * _element_size(self.dtype)

    @property
    def sources(self) -> List[int]:
        return sorted({b.source for b in self.buckets})

    @property
    def hf_names(self) -> List[str]:
        return [name for b in self.buckets for t in b.tensors for name, _ in t.hf_shapes]


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _rank_inventory(gpt_chunks: Sequence) -> dict:
    """What this rank holds and where it sits, for the plan every rank computes."""
    from megatron.core import parallel_state

    replica_zero = parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0
    return {
        "rank": torch.distributed.get_rank(),
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "tensors": {name: (tuple(t.shape), t.dtype)
                    for name, (_, _, t) in local_tensors(gpt_chunks).items()} if replica_zero else {},
    }


def _hf_shapes(mcore_name: str, shard_shape: Tuple[int, ...], tp: int, model: ModelConfig
               ) -> List[Tuple[str, Tuple[int, ...]]]:
    # The merges run on meta tensors: the layout is stated once, in llama_layout.
    shards = [torch.empty(shard_shape, device="meta") for _ in range(tp)]
    return [(name, tuple(t.shape)) for name, t in hf_tensors(mcore_name, shards, model).items()]


def build_plan(gpt_chunks: Sequence, model: ModelConfig, bucket_bytes: int) -> WeightStreamPlan:
    """The transfer plan from every rank's inventory (a collective over the world)."""
    inventories: List[Optional[dict]] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(inventories, _rank_inventory(gpt_chunks))
    holders: Dict[str, List[Tuple[int, int]]] = {}
    shapes, dtypes = {}, set()
    for inventory in inventories:
        for name, (shape, dtype) in inventory["tensors"].items():
            holders.setdefault(name, []).append((inventory["tp_rank"], inventory["rank"]))
            shapes[name] = shape
            dtypes.add(dtype)
    if len(dtypes) != 1:
        raise ValueError(f"weight stream: the model's weights mix dtypes {sorted(map(str, dtypes))}")
    if model.tie_word_embeddings:
        # The last stage's output layer is a copy of the embedding (kept equal by megatron's
        # embedding group); the HF model holds the one tensor, sent from the first stage.
        holders.pop(layout.OUTPUT_LAYER, None)
    planned = []
    for name in sorted(holders, key=lambda n: (_hf_order_key(n), n)):
        ranks = tuple(rank for _, rank in sorted(holders[name]))
        if not _is_tensor_parallel(name):
            ranks = ranks[:1]
        planned.append(PlannedTensor(name, ranks, _hf_shapes(name, shapes[name], len(ranks), model),
                                     shapes[name]))
    dtype = dtypes.pop()
    return WeightStreamPlan(_bucketed(planned, bucket_bytes // _element_size(dtype)), dtype,
                            bucket_bytes)


def _bucketed(planned: List[PlannedTensor], bucket_numel: int) -> List[Bucket]:
    buckets: List[Bucket] = []
    for tensor in planned:
        source = tensor.gather_ranks[0]
        last = buckets[-1] if buckets else None
        if last is None or last.source != source or last.numel + tensor.numel > bucket_numel:
            buckets.append(Bucket(source))
        buckets[-1].tensors.append(tensor)
    return buckets


_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def cached_plan(gpt_chunks: Sequence, model: ModelConfig, bucket_bytes: int) -> WeightStreamPlan:
    """``build_plan`` once per set of chunks and bucket size (every rank calls it alike)."""
    per_chunk = _PLANS.setdefault(gpt_chunks[0], {})
    key = (tuple(id(c) for c in gpt_chunks), bucket_bytes)
    if key not in per_chunk:
        per_chunk[key] = build_plan(gpt_chunks, model, bucket_bytes)
    return per_chunk[key]


class WeightStream:
    """Iterate to get every ``(hf_name, tensor)`` of the model on every rank.

    Iterating runs collectives: every rank must iterate the whole stream, in step. The
    yielded tensors are views of a buffer that is reused once the next bucket arrives.
    ``transport`` (``bucket_transport``) moves the buckets; the process group's gathers and
    broadcasts by default.
    """

    def __init__(self, plan: WeightStreamPlan, gpt_chunks: Sequence, model: ModelConfig,
                 transport=None):
        self.plan, self.model = plan, model
        self.rank = torch.distributed.get_rank()
        self.local = {name: tensor for name, (_, _, tensor) in local_tensors(gpt_chunks).items()}
        self.device = next(gpt_chunks[0].parameters()).device
        self.transport = transport or ProcessGroupTransport(self.device, plan.dtype)
        self.finished = False

    def __iter__(self) -> Iterator[Tuple[str, torch.Tensor]]:
        for bucket, buffer in self.buckets():
            yield from bucket.views(buffer)

    def buckets(self) -> Iterator[Tuple[Bucket, torch.Tensor]]:
        """Each bucket with its flat buffer (``bucket.views(buffer)`` names its tensors),
        for a consumer that forwards whole buckets rather than tensors.

        The next bucket is packed before this one is handed out, so its source converts
        while the other ranks' engines load (the transports keep two buffers for it).
        """
        buckets = self.plan.buckets
        buffers = [self._packed(0)] if buckets else []
        for index, bucket in enumerate(buckets):
            if index + 1 < len(buckets):
                buffers.append(self._packed(index + 1))
            yield bucket, buffers[index]
            buffers[index] = None
            if index + 1 < len(buckets):
                self.transport.publish(buckets[index + 1], buffers[index + 1])
        self.finished = True

    def _packed(self, index: int) -> torch.Tensor:
        """Bucket ``index`` packed (readable everywhere once published; the first bucket
        is published here)."""
        bucket = self.plan.buckets[index]
        buffer = self.transport.buffer(index, bucket)
        self._pack(bucket, buffer)
        if index == 0:
            self.transport.publish(bucket, buffer)
        return buffer

    def _pack(self, bucket: Bucket, buffer: torch.Tensor) -> None:
        views = dict(bucket.views(buffer))
        for planned in bucket.tensors:
            # Shards gathered for one tensor die before the next tensor's are gathered.
            shards = self.transport.shards(planned, self.local.get(planned.mcore_name))
            if shards is not None:
                hf_tensors_into(planned.mcore_name, shards, self.model,
                                {name: views[name] for name, _ in planned.hf_shapes})

    def source_checksums(self) -> Dict[str, Tuple[float, float]]:
        """``(sum, sum of squares)`` of every HF tensor this rank is the source of, as the
        stream sends it (a collective over TP groups, like the stream, but no broadcast).

        Converted again rather than recorded while streaming: the trainer's weights have
        not changed since, conversion is deterministic, and a sync that passes its check
        never pays for it.
        """
        gather = ProcessGroupTransport(self.device, self.plan.dtype)
        checksums: Dict[str, Tuple[float, float]] = {}
        for bucket in self.plan.buckets:
            for planned in bucket.tensors:
                shards = gather.shards(planned, self.local.get(planned.mcore_name))
                if shards is not None:
                    for name, tensor in hf_tensors(planned.mcore_name, shards,
                                                   self.model).items():
                        checksums[name] = tensor_checksum(tensor.to(self.plan.dtype))
        return checksums
