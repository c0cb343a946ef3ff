"""The loop's phases, what each needs awake, and the one place that wakes and sleeps.

The loop only says which phase it is in (``with placement.phase(ROLLOUT, t): ...``);
``Placement`` wakes the tenants that phase needs, puts the others to sleep (or releases
them), claims every change in the ledger, times the phase, and on a GPU sets the
ledger's prediction beside what the device holds. Nothing else calls an engine's or a
judge's ``sleep``/``wake``, so the ledger's record is what the tenants did.

What each phase needs (every tenant not named rests: engines and judges asleep,
transient memory released; the trainer's state and the CUDA context are always held):

    engine start-up    the policy engine awake (vLLM claims its share at start-up)
    construction       nothing: the trainer and the judge are built beside a sleeping engine
    held-out answers   the policy engine
    held-out judging   the judge (an engine put to sleep here keeps its weights: the
                       rollout after it samples from them)
    rollout            the policy engine
    judging            the judge
    pairs              nothing
    reference, train   the trainer's activations, logits and communication buffers
    checkpoint         nothing
    weight sync        the policy engine's weights (no KV cache), the stream's buckets
    parity check       the policy engine

A judge that generates through the policy's own engine (a policy judging itself) has no
tenant of its own: its phases need the policy engine awake instead.
"""

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from megatron_tpo.placement.ledger import (ABSENT, ASLEEP, AWAKE, IN_USE, RELEASED, RESIDENT,
                                           WEIGHTS_ONLY, MemoryLedger)

logger = logging.getLogger(__name__)

# What the placement moves: each registered tenant is one of these, or fixed.
POLICY_ENGINE = "policy engine"
JUDGE = "judge"
TRAINING = "training transients"     # activations, logits, communication buffers
SYNC = "sync transients"             # the weight stream's buckets
FIXED = "fixed"                      # held in whatever state it was claimed in

RESTING = {POLICY_ENGINE: ASLEEP, JUDGE: ASLEEP, TRAINING: RELEASED, SYNC: RELEASED}

ENGINE_START_UP = "engine start-up"
CONSTRUCTION = "construction"
HELDOUT_ANSWERS = "held-out answers"
HELDOUT_JUDGING = "held-out judging"
ROLLOUT = "rollout"
JUDGING = "judging"
PAIRS = "pairs"
REFERENCE = "reference"
TRAIN = "train"
CHECKPOINT = "checkpoint"
WEIGHT_SYNC = "weight sync"
PARITY_CHECK = "parity check"


@dataclass(frozen=True)
class Phase:
    timing: Optional[str] = None          # its metrics key, timing/<timing>
    needs: Dict[str, str] = field(default_factory=dict)
    keeps_engine_weights: bool = False    # an engine put to sleep here must keep its weights


PHASES: Dict[str, Phase] = {
    ENGINE_START_UP: Phase(needs={POLICY_ENGINE: AWAKE}),
    CONSTRUCTION: Phase(),
    HELDOUT_ANSWERS: Phase("heldout", {POLICY_ENGINE: AWAKE}),
    HELDOUT_JUDGING: Phase("heldout", {JUDGE: AWAKE}, keeps_engine_weights=True),
    ROLLOUT: Phase("rollout", {POLICY_ENGINE: AWAKE}),
    JUDGING: Phase("judge", {JUDGE: AWAKE}),
    PAIRS: Phase("pairs"),
    REFERENCE: Phase("reference_logprobs", {TRAINING: IN_USE}),
    TRAIN: Phase("train", {TRAINING: IN_USE}),
    CHECKPOINT: Phase("checkpoint"),
    WEIGHT_SYNC: Phase("weight_sync", {POLICY_ENGINE: WEIGHTS_ONLY, SYNC: IN_USE}),
    PARITY_CHECK: Phase("weight_sync", {POLICY_ENGINE: AWAKE}),
}


@dataclass
class _Tenant:
    name: str
    kind: str
    handle: object = None     # what sleeps and wakes: a RolloutEngine, a Judge; None: accounting only


class Placement:
    """Registers the tenants as they are built and moves them phase by phase.

    ``judge_uses_policy_engine``: the judge generates through the policy's engine.
    ``gpu``: this rank's own GPU role in the ledger (measured against it on a GPU).
    ``measure``: called at the end of each phase with (phase, iteration, predicted bytes of
    ``gpu``) on a GPU; the run logs the device's figures beside the prediction.
    """

    def __init__(self, ledger: MemoryLedger, judge_uses_policy_engine: bool = False,
                 gpu: Optional[str] = None, timer: Optional[Callable] = None,
                 measure: Optional[Callable] = None):
        self.ledger = ledger
        self.judge_uses_policy_engine = judge_uses_policy_engine
        self.gpu, self.timer, self.measure = gpu, timer, measure
        self.tenants: List[_Tenant] = []
        self.current: Optional[str] = None
        # Every add, phase entry and ledger line, in order: ``replay`` sizes the same run
        # again with other tenant sizes (a candidate fix) without running it.
        self.script: List[tuple] = []

    # -- tenants -------------------------------------------------------------------
    def add(self, name: str, kind: str, state: str = RESIDENT, handle=None) -> None:
        """``name`` was built holding ``state``; the current phase then places it. A name
        the ledger does not size holds nothing on any GPU of this job (a pool's proxy):
        it is only closed at the end."""
        self.script.append(("add", name, kind, state))
        if self.ledger.has(name):
            self.ledger.claim(name, state)
        else:
            kind = FIXED
        self.tenants.append(_Tenant(name, kind, handle))
        if self.current is not None:
            self._place(self.tenants[-1], PHASES[self.current])

    def close(self) -> None:
        """Close every tenant that has a ``close`` (engines, a judge's engine)."""
        for tenant in self.tenants:
            if tenant.handle is not None and hasattr(tenant.handle, "close"):
                tenant.handle.close()

    # -- phases --------------------------------------------------------------------
    def wanted(self, kind: str, phase: Phase) -> Optional[str]:
        if kind == FIXED:
            return None
        needs = dict(phase.needs)
        if self.judge_uses_policy_engine and needs.get(JUDGE) == AWAKE:
            needs[POLICY_ENGINE] = AWAKE
        return needs.get(kind, RESTING[kind])

    def _place(self, tenant: _Tenant, phase: Phase) -> None:
        state = self.wanted(tenant.kind, phase)
        if state is None or state == self.ledger.states[tenant.name]:
            return
        now = self.ledger.states[tenant.name]
        if tenant.handle is not None:
            self._move(tenant.handle, tenant.kind, now, state, phase)
        self.ledger.claim(tenant.name, state)

    @staticmethod
    def _move(handle, kind: str, now: str, state: str, phase: Phase) -> None:
        if state == ASLEEP:
            if kind == POLICY_ENGINE:
                handle.sleep(keep_weights=phase.keeps_engine_weights)
            else:
                handle.sleep()
        elif state == WEIGHTS_ONLY:
            handle.wake_weights()
        elif state == AWAKE and now != ABSENT:
            handle.wake()

    def enter(self, name: str) -> Phase:
        phase = PHASES[name]
        self.current = name
        self.script.append(("enter", name))
        for tenant in self.tenants:
            self._place(tenant, phase)
        return phase

    @contextlib.contextmanager
    def phase(self, name: str, iteration: Optional[int] = None):
        """Place the tenants for phase ``name``, run the block (timed, its start and end
        logged), then record the ledger's line for it: what the phase held, including
        tenants built inside it."""
        phase = self.enter(name)
        where = f"iteration {iteration}: " if iteration is not None else ""
        logger.info("%s%s%s", where, name, self._memory_note())
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        timed = (self.timer(f"timing/{phase.timing}") if self.timer and phase.timing
                 else contextlib.nullcontext())
        started = time.perf_counter()
        with timed:
            yield
        logger.info("%s%s done in %.1f s", where, name, time.perf_counter() - started)
        line = self.ledger.enter(name, iteration)
        self.script.append(("record", name, iteration))
        if self.measure is not None and self.gpu is not None:
            predicted = next((g.total for g in line.gpus if g.gpu == self.gpu), 0.0)
            self.measure(name, iteration, predicted)


    def _memory_note(self) -> str:
        """This rank's GPU as the ledger predicts it now (tenants built later not yet in)."""
        if self.gpu is None:
            return ""
        held = next((line for line in self.ledger.snapshot("").gpus if line.gpu == self.gpu), None)
        return "" if held is None or held.capacity is None else f" ({held.describe()})"


def replay(script: List[tuple], ledger: MemoryLedger,
           judge_uses_policy_engine: bool = False) -> MemoryLedger:
    """``ledger`` (fresh, with its own tenant sizes) taken through a recorded ``script``:
    the same tenants added in the same states, the same phases entered and recorded."""
    placement = Placement(ledger, judge_uses_policy_engine)
    for operation, *arguments in script:
        if operation == "add":
            placement.add(*arguments)
        elif operation == "enter":
            placement.enter(*arguments)
        else:
            ledger.enter(*arguments)
    return ledger
