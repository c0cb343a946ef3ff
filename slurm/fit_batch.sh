#!/bin/bash
# The tiny trainer run as a Slurm job: four CPU tasks at TP=2, PP=2 over gloo.
# Works on a laptop's local Slurm as on a cluster's CPU partition:
#   sbatch slurm/fit_batch.sh
#SBATCH --job-name=tpo-fit-batch
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --cpus-per-task=1
#SBATCH --time=00:15:00
#SBATCH --output=%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
# Each task is one rank: megatron_tpo reads SLURM_PROCID/SLURM_NTASKS/SLURM_NODELIST.
srun --kill-on-bad-exit=1 "${VENV:-.venv}/bin/tpo-fit-batch" --tp 2 --pp 2 --steps "${STEPS:-10}"
