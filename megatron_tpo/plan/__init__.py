"""The parallelism planner behind ``tpo-plan``.

hardware (GPU table) -> parameters (megatron's exact per-rank buffers) -> memory and
timing (per layout) -> training_search (enumerate, reject with a reason, rank the layouts
the DPO trainer runs; runnable says which) and rollout (vLLM engine layouts) -> report /
emit. given_layout judges one layout (every problem, the smallest fixes); iteration and
pools estimate a whole TPO iteration, colocated against separate pools; run_dir,
run_check and calibration compare a recorded run with the estimate and fit the
efficiency assumptions to it.
"""

from megatron_tpo.plan.calibration import Calibration, fit_calibration, load_calibration
from megatron_tpo.plan.given_layout import assess_layout, parse_layout
from megatron_tpo.plan.hardware import GpuSpec, find_gpu, load_gpu_table
from megatron_tpo.plan.iteration import IterationAssumptions, IterationRequest
from megatron_tpo.plan.pools import compare_pools
from megatron_tpo.plan.rollout import plan_engines
from megatron_tpo.plan.run_check import check_figures, run_model
from megatron_tpo.plan.run_dir import read_run_dir
from megatron_tpo.plan.runnable import trainer_refusal
from megatron_tpo.plan.training_search import PlanError, search_training
from megatron_tpo.plan.workload import Assumptions, Cluster, TrainingLayout, Workload

__all__ = ["Assumptions", "Calibration", "Cluster", "GpuSpec", "IterationAssumptions",
           "IterationRequest", "PlanError", "TrainingLayout", "Workload", "assess_layout",
           "check_figures", "compare_pools", "find_gpu", "fit_calibration", "load_calibration",
           "load_gpu_table", "parse_layout", "plan_engines", "read_run_dir", "run_model",
           "search_training", "trainer_refusal"]
