"""What a layout costs: per-rank parameters and buffers, trainer memory and step time,
engine layouts, a whole iteration on colocated or separate pools, and every GPU tenant of
a run for the memory ledger."""
