"""The memory ledger: every holder of accelerator memory (a tenant) and what it holds now.

A tenant is one holder on one kind of GPU of the job: the policy engine, a judge's model,
the trainer's weights, gradients, optimizer state and activations, the weight stream's
buckets, the CUDA context. Each has its predicted bytes in each of its states (from the
planner's model, ``plan.tenants``), and claims a state when it is built, woken, put to
sleep, loaded or offloaded; ``Placement`` makes those claims as the loop enters its phases.
The ledger keeps one line per phase entered: each GPU's tenants, their states and bytes
(``ledger.jsonl`` in the run directory, and what ``tpo-run --dry-run`` checks and prints).

    ledger = MemoryLedger(specs, capacity=80 * GIB)
    ledger.claim("policy engine", AWAKE)          # on every GPU that has that tenant
    ledger.enter("rollout", iteration=0)          # a trace line; GPU figures beside it
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

# Tenant states. A tenant's spec lists the ones it can be in, with their bytes.
ABSENT = "absent"             # not built yet
AWAKE = "awake"               # an engine: weights and KV cache; a judge's model on its device
WEIGHTS_ONLY = "weights only" # an engine woken for a weight sync: no KV cache yet
ASLEEP = "asleep"             # an engine asleep (its level in the spec); a model offloaded
RESIDENT = "resident"         # always held (trainer state, CUDA context, an engine pool's claim)
IN_USE = "in use"             # transient memory (activations, buckets) while its phase runs
RELEASED = "released"

GIB = 1024 ** 3


@dataclass(frozen=True)
class TenantSpec:
    """One holder of accelerator memory on one GPU role, with its bytes per state."""

    name: str
    gpu: str                                  # the GPU role: "h100-80gb GPU of pipeline stage 0"
    bytes_by_state: Tuple[Tuple[str, float], ...]
    detail: str = ""                          # e.g. "level 2" for an engine's sleep
    refusal: str = ""                         # why it cannot start at all (a KV cache too small)

    def bytes_in(self, state: str) -> float:
        if state == ABSENT:
            return 0.0
        return dict(self.bytes_by_state)[state]


@dataclass(frozen=True)
class GpuLine:
    """One GPU role at one phase: every tenant present, its state and bytes."""

    gpu: str
    tenants: Tuple[Tuple[str, str, float], ...]   # (name, state, bytes)
    capacity: Optional[float]
    refusals: Tuple[str, ...] = ()

    @property
    def total(self) -> float:
        return sum(size for _, _, size in self.tenants)

    @property
    def fits(self) -> bool:
        return not self.refusals and (self.capacity is None or self.total <= self.capacity)

    def describe(self) -> str:
        held = " + ".join(f"{name} ({state}) {size / GIB:.1f}"
                          for name, state, size in self.tenants if size > 0)
        capacity = "" if self.capacity is None else f" of {self.capacity / GIB:.1f}"
        return f"{self.total / GIB:.1f}{capacity} GiB ({held or 'nothing'})"


@dataclass(frozen=True)
class PhaseLine:
    """The ledger at one phase: the phase, the loop's iteration, every GPU role."""

    phase: str
    iteration: Optional[int]
    gpus: Tuple[GpuLine, ...]

    def as_json(self) -> dict:
        return {"phase": self.phase, "iteration": self.iteration, "gpus": {
            line.gpu: {"capacity_bytes": line.capacity, "total_bytes": line.total,
                       "tenants": {name: {"state": state, "bytes": size}
                                   for name, state, size in line.tenants},
                       **({"refusals": list(line.refusals)} if line.refusals else {})}
            for line in self.gpus}}


class MemoryLedger:
    """What each tenant holds now on each GPU role, and one line per phase entered."""

    def __init__(self, specs: Sequence[TenantSpec], capacity: Optional[float] = None,
                 trace: Optional[Path] = None):
        self.specs = list(specs)
        self.capacity = capacity
        self.states: Dict[str, str] = {spec.name: ABSENT for spec in self.specs}
        self.lines: List[PhaseLine] = []
        self.trace = Path(trace) if trace is not None else None

    def has(self, name: str) -> bool:
        return name in self.states

    def claim(self, name: str, state: str) -> None:
        """``name`` now holds its ``state`` bytes on every GPU role that has it."""
        for spec in self._specs(name):
            spec.bytes_in(state)   # a state the tenant does not have is a KeyError here
        self.states[name] = state

    def _specs(self, name: str) -> Iterator[TenantSpec]:
        return (spec for spec in self.specs if spec.name == name)

    def gpus(self) -> List[str]:
        return list(dict.fromkeys(spec.gpu for spec in self.specs))

    def snapshot(self, phase: str, iteration: Optional[int] = None) -> PhaseLine:
        lines = []
        for gpu in self.gpus():
            here = [spec for spec in self.specs if spec.gpu == gpu
                    and self.states[spec.name] != ABSENT]
            lines.append(GpuLine(
                gpu, tuple((spec.name, self._state_label(spec), spec.bytes_in(self.states[spec.name]))
                           for spec in here), self.capacity,
                tuple(spec.refusal for spec in here if spec.refusal)))
        return PhaseLine(phase, iteration, tuple(lines))

    def _state_label(self, spec: TenantSpec) -> str:
        state = self.states[spec.name]
        return f"{state} ({spec.detail})" if state == ASLEEP and spec.detail else state

    def enter(self, phase: str, iteration: Optional[int] = None) -> PhaseLine:
        """Record the phase just entered, with every tenant's state as it is now."""
        line = self.snapshot(phase, iteration)
        self.lines.append(line)
        if self.trace is not None:
            self.trace.parent.mkdir(parents=True, exist_ok=True)
            with open(self.trace, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(line.as_json()) + "\n")
        return line

    def first_misfit(self) -> Optional[Tuple[PhaseLine, GpuLine]]:
        for line in self.lines:
            for gpu in line.gpus:
                if not gpu.fits:
                    return line, gpu
        return None

    def peaks(self) -> List[Tuple[PhaseLine, GpuLine]]:
        """Each (phase, GPU role) once, at its largest total over the recorded lines."""
        largest: Dict[Tuple[str, str], Tuple[PhaseLine, GpuLine]] = {}
        for line in self.lines:
            for gpu in line.gpus:
                key = (line.phase, gpu.gpu)
                if key not in largest or gpu.total > largest[key][1].total:
                    largest[key] = (line, gpu)
        return list(largest.values())
