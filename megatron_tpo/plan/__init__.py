"""The parallelism planner behind ``tpo-plan``, one job per sub-package.

hardware.py and workload.py: what every part is asked about (the GPU table; the cluster,
the job, one candidate layout).
cost/: what a layout costs. parameters (megatron's exact per-rank buffers) -> memory and
    timing of the trainer; engines (vLLM engine layouts); iteration and pools (a whole TPO
    iteration, colocated against separate pools); tenants (every GPU tenant of a run, in
    each state, for the memory ledger of ``tpo-run`` and its dry run).
search/: which layouts. training (enumerate, reject with a reason, rank the layouts the
    DPO trainer runs; runnable says which), given_layout (judge one layout: every problem,
    the smallest fixes).
recorded/: against a recorded run. run_dir reads it, run_check estimates it again figure
    by figure, calibration fits the efficiency assumptions to it.
report/: the answers as text and data (search, layout, iteration), and emit (a chosen
    plan as Hydra configs and an #SBATCH header).
modes.py: tpo-plan's modes, each from its request to its report.
"""
