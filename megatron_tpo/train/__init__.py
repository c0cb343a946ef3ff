"""Training stage of a TPO iteration: the DPO loss, reference log-probs, the megatron-core step."""
