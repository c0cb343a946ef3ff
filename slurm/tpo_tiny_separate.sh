#!/bin/bash
# The tiny TPO run with its rollout engines apart from the trainer
# (rollout.placement=separate, docs/rollout.md), on CPUs of one node: a tpo-engine pool of
# ENGINE_TASKS HF engines beside a trainer of the remaining tasks, weights over a gloo bridge.
#   tpo-tiny --prepare-only                       # once: task, tokenizer, warm-started M_0
#   sbatch --ntasks=3 slurm/tpo_tiny_separate.sh parallel=tp2_pp1    # 2 trainer + 1 engine
# Extra arguments are tpo-run overrides (tpo-engine gets the same). Requeued, the job
# resumes in the same run directory, as slurm/tpo_tiny.sh does.
#SBATCH --job-name=tpo-tiny-separate
#SBATCH --nodes=1
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=USR1@60
#SBATCH --output=%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
source slurm/common.sh
# EXPERIMENT= (empty) runs configs/tpo.yaml's defaults with the given overrides alone.
EXPERIMENT="${EXPERIMENT-tiny_cpu}"
ENGINE_TASKS="${ENGINE_TASKS:-1}" ENGINE_NODES=0 tpo_launch_separate \
    ${EXPERIMENT:+"experiment=$EXPERIMENT"} "run.dir=${RUN_DIR:-runs/slurm-tiny-separate-${SLURM_JOB_ID}}" "$@"
