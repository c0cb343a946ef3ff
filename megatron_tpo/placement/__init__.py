"""Accelerator memory, phase by phase: one ledger every tenant claims through, and one
placement policy that puts each tenant in the state the loop's phase needs."""

from megatron_tpo.placement.ledger import MemoryLedger, TenantSpec
from megatron_tpo.placement.policy import Placement

__all__ = ["MemoryLedger", "Placement", "TenantSpec"]
