#!/bin/bash
# The tiny TPO run as a Slurm job on CPUs: 1, 2 or 4 tasks over gloo (TP=2, PP=2 with 4).
#   tpo-tiny --prepare-only                       # once: task, tokenizer, warm-started M_0
#   sbatch --ntasks=4 slurm/tpo_tiny.sh parallel=tp2_pp2
# Extra arguments are tpo-run overrides. Requeued (preempted, or `scontrol requeue`), the
# job resumes in the same run directory from its last finished stage and checkpoint.
#SBATCH --job-name=tpo-tiny
#SBATCH --nodes=1
#SBATCH --ntasks=1
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
tpo_launch ${EXPERIMENT:+"experiment=$EXPERIMENT"} "run.dir=${RUN_DIR:-runs/slurm-tiny-${SLURM_JOB_ID}}" "$@"
