"""The memory ledger and the placement: the loop names its phases, one policy decides who
holds the accelerator in each, and the ledger's record is what the tenants did.

The real tiny run's engine and reward model are instrumented: every sleep, weight wake
and wake they perform must be the transition the ledger recorded for them, phase by
phase, and the dry run of the same config must write the same ledger line for line."""

import json

import pytest

from tiny_hf import save_classifier
from tpo_fixtures import tiny_run_overrides

from megatron_tpo.placement import MemoryLedger, Placement, TenantSpec
from megatron_tpo.placement import policy
from megatron_tpo.placement.ledger import ASLEEP, AWAKE, IN_USE, RELEASED, RESIDENT, WEIGHTS_ONLY

GPU = "test GPU"


class Recorder:
    """A handle that records what the placement asks of it."""

    def __init__(self, calls):
        self.calls = calls

    def sleep(self, keep_weights=None):
        self.calls.append(("sleep", keep_weights))

    def wake_weights(self):
        self.calls.append(("wake_weights",))

    def wake(self):
        self.calls.append(("wake",))


def two_tenant_placement(judge_uses_policy_engine=False):
    specs = [TenantSpec("engine", GPU, ((AWAKE, 10.0), (WEIGHTS_ONLY, 4.0), (ASLEEP, 1.0))),
             TenantSpec("judge", GPU, ((AWAKE, 5.0), (ASLEEP, 0.0))),
             TenantSpec("activations", GPU, ((IN_USE, 7.0), (RELEASED, 0.0))),
             TenantSpec("weights", GPU, ((RESIDENT, 2.0),))]
    placement = Placement(MemoryLedger(specs, capacity=100.0), judge_uses_policy_engine)
    engine_calls, judge_calls = [], []
    with placement.phase(policy.ENGINE_START_UP):
        placement.add("engine", policy.POLICY_ENGINE, AWAKE, Recorder(engine_calls))
    with placement.phase(policy.CONSTRUCTION):
        placement.add("judge", policy.JUDGE, AWAKE, Recorder(judge_calls))
        placement.add("activations", policy.TRAINING, RELEASED)
        placement.add("weights", policy.FIXED, RESIDENT)
    return placement, engine_calls, judge_calls


def test_each_phase_wakes_what_it_needs_and_puts_the_rest_to_sleep():
    placement, engine, judge = two_tenant_placement()
    # Built during construction, the judge is put to sleep there at once.
    assert engine == [("sleep", False)] and judge == [("sleep", None)]
    totals = {}
    for name in (policy.WEIGHT_SYNC, policy.PARITY_CHECK, policy.HELDOUT_ANSWERS,
                 policy.HELDOUT_JUDGING, policy.ROLLOUT, policy.JUDGING, policy.TRAIN):
        with placement.phase(name, 0):
            pass
        totals[name] = placement.ledger.lines[-1].gpus[0].total
    assert engine[1:] == [("wake_weights",), ("wake",), ("sleep", True), ("wake",),
                          ("sleep", False)]
    assert judge[1:] == [("wake",), ("sleep", None), ("wake",), ("sleep", None)]
    assert totals == {policy.WEIGHT_SYNC: 4 + 2, policy.PARITY_CHECK: 10 + 2,
                      policy.HELDOUT_ANSWERS: 10 + 2, policy.HELDOUT_JUDGING: 1 + 5 + 2,
                      policy.ROLLOUT: 10 + 2, policy.JUDGING: 1 + 5 + 2,
                      policy.TRAIN: 1 + 7 + 2}


def test_a_judge_that_generates_through_the_policy_engine_keeps_it_awake_to_judge():
    placement, engine, _ = two_tenant_placement(judge_uses_policy_engine=True)
    for name in (policy.ROLLOUT, policy.JUDGING, policy.PAIRS):
        with placement.phase(name, 0):
            pass
    assert engine == [("sleep", False), ("wake",), ("sleep", False)]   # asleep only at pairs
    states = [dict((n, s) for n, s, _ in line.gpus[0].tenants)["engine"]
              for line in placement.ledger.lines[-3:]]
    assert states == [AWAKE, AWAKE, ASLEEP]


def test_a_replayed_script_gives_the_same_lines_and_other_sizes_other_totals():
    placement, _, _ = two_tenant_placement()
    for name in (policy.ROLLOUT, policy.JUDGING, policy.TRAIN, policy.WEIGHT_SYNC):
        with placement.phase(name, 0):
            pass
    same = policy.replay(placement.script, MemoryLedger(placement.ledger.specs, 100.0))
    assert same.lines == placement.ledger.lines
    bigger = [TenantSpec(spec.name, spec.gpu, tuple((state, size * 10)
                                                     for state, size in spec.bytes_by_state))
              for spec in placement.ledger.specs]
    misfit = policy.replay(placement.script, MemoryLedger(bigger, 100.0)).first_misfit()
    assert misfit[0].phase == policy.ROLLOUT and misfit[1].total == 120.0


def test_closing_the_placement_closes_every_engine_and_judge_it_holds():
    from megatron_tpo.judge.pairwise import PairwiseJudge
    from megatron_tpo.rollout.engine import SamplingParams

    closed = []

    class Engine(Recorder):
        def __init__(self, name):
            super().__init__([])
            self.name = name

        def close(self):
            closed.append(self.name)

    placement, _, _ = two_tenant_placement()
    judge = PairwiseJudge(Engine("judge's replicas"), SamplingParams(),
                          own_engine=Engine("judge engine"))
    placement.add("policy engine pool proxy", policy.POLICY_ENGINE, handle=Engine("proxy"))
    placement.add("pairwise judge", policy.JUDGE, handle=judge)
    placement.close()
    assert closed == ["proxy", "judge engine"]


def test_each_phase_logs_the_ledgers_prediction_beside_what_the_device_holds(tmp_path,
                                                                            monkeypatch):
    """On a GPU (its readings stood in for here): memory_reserved's peak and the device's
    used memory beside the prediction for this rank's GPU, one record per phase."""
    import torch

    from megatron_tpo.report.metrics import RunMetrics

    gib = 1024 ** 3
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (30 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: 12 * gib)
    metrics = RunMetrics(tmp_path, enabled=True, tensorboard=False)
    placement, _, _ = two_tenant_placement()
    placement.gpu, placement.measure = GPU, metrics.log_device_memory
    for name in (policy.ROLLOUT, policy.TRAIN):
        with placement.phase(name, 3):
            pass
    records = metrics.records("memory")
    assert [(r["phase"], r["step"], r["predicted_bytes"]) for r in records] == [
        (policy.ROLLOUT, 3, 12.0), (policy.TRAIN, 3, 10.0)]
    assert all(r["reserved_peak_bytes"] == 12 * gib and r["device_used_bytes"] == 50 * gib
               for r in records)


# -- the real tiny run against its ledger and its dry run ---------------------------------
TENANT_OF = {"HFRolloutEngine": "policy engine", "RewardModelJudge": "reward model"}
STATE_OF = {"sleep": ASLEEP, "wake_weights": WEIGHTS_ONLY, "wake": AWAKE}


def _recording_run(rank, world_size, config):
    """tpo-run's rank, with every sleep, weight wake and wake of the real engine and the
    real reward model recorded (an outer call only: wake_weights may call wake)."""
    from megatron_tpo.cli.run import run_rank
    from megatron_tpo.judge.reward_model import RewardModelJudge
    from megatron_tpo.rollout.hf_engine import HFRolloutEngine

    events, depth = [], [0]

    def recorded(cls, method):
        original = getattr(cls, method)

        def call(self, *args, **kwargs):
            if depth[0] == 0:
                events.append((TENANT_OF[cls.__name__], STATE_OF[method]))
            depth[0] += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                depth[0] -= 1
        setattr(cls, method, call)

    for cls in (HFRolloutEngine, RewardModelJudge):
        for method in STATE_OF:
            if hasattr(cls, method):   # a judge has no weight-only wake
                recorded(cls, method)
    run_rank(rank, world_size, config)
    return events


def ledger_transitions(lines, tenant):
    """The states ``tenant`` moved to, line after line (its first: the state it was built in)."""
    states = [line["gpus"]["cpu of pipeline stage 0"]["tenants"][tenant]["state"]
              for line in lines if tenant in line["gpus"]["cpu of pipeline stage 0"]["tenants"]]
    moves = [state for before, state in zip(states, states[1:]) if state != before]
    return [state.split(" (")[0] for state in moves]


@pytest.fixture(scope="module")
def reward_model_run(tmp_path_factory):
    from megatron_tpo.cli.run import compose_config
    from megatron_tpo.parallel.local_launch import spawn_local

    root = tmp_path_factory.mktemp("ledger")
    judge = save_classifier(root / "rm")
    overrides = tiny_run_overrides(root, iterations=1) + [
        "judge=armorm", f"judge.reward_model.path={judge}", "judge.reward_model.device=cpu",
        "judge.reward_model.dtype=float32", "judge.reward_model.trust_remote_code=false",
        "judge.reward_model.offload_between_phases=true", "evaluation.num_prompts=2"]
    config = compose_config(overrides)
    config.validate(1)
    events = spawn_local(_recording_run, 1, config)[0]
    lines = [json.loads(line) for line in (root / "run" / "ledger.jsonl").read_text().splitlines()]
    return root, overrides, events, lines


@pytest.mark.slow
def test_the_tenants_did_exactly_what_the_ledger_recorded(reward_model_run):
    _, _, events, lines = reward_model_run
    phases = [line["phase"] for line in lines]
    assert phases == ["engine start-up", "construction", "weight sync", "parity check",
                      "held-out answers", "held-out judging", "rollout", "judging", "pairs",
                      "reference", "train", "checkpoint", "weight sync", "parity check",
                      "held-out answers", "held-out judging"]
    for tenant in ("policy engine", "reward model"):
        performed = [state for name, state in events if name == tenant]
        assert performed == ledger_transitions(lines, tenant), tenant
        assert performed, tenant


@pytest.mark.slow
def test_the_dry_run_writes_the_ledger_the_run_wrote(reward_model_run, capsys):
    from megatron_tpo.cli.run import main

    root, overrides, _, lines = reward_model_run
    trace = root / "dry_ledger.jsonl"
    assert main(["--dry-run", *overrides, "--trace", str(trace)]) == 0, capsys.readouterr().err
    assert [json.loads(line) for line in trace.read_text().splitlines()] == lines
