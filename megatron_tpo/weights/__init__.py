"""The trainer's live weights into the rollout engines, checked: the stream of HF-named
tensors (stream.py), how its buckets reach every rank (transports.py), the push into an
engine (push.py) and the parity check after it (parity.py). The loop's seam is
``WeightPush``."""

from megatron_tpo.weights.config import WeightSyncConfig
from megatron_tpo.weights.parity import text_probes
from megatron_tpo.weights.push import WeightPush, WeightSyncError, push_weights

__all__ = ["WeightPush", "WeightSyncConfig", "WeightSyncError", "push_weights", "text_probes"]
