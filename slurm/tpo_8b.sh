#!/bin/bash
# TPO of Llama-3-8B-Instruct on one node of 8 H100s, judged by an ArmoRM-style reward
# model (configs/experiment/llama3_8b.yaml). Set the policy and data paths:
#   sbatch -p PARTITION -A ACCOUNT slurm/tpo_8b.sh run.policy=/models/Meta-Llama-3-8B-Instruct \
#       prompts.path=/data/ultrafeedback_prompts.jsonl evaluation.path=/data/heldout.jsonl
#SBATCH --job-name=tpo-8b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=USR1@300
#SBATCH --output=%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
source slurm/common.sh
tpo_launch experiment=llama3_8b "run.dir=${RUN_DIR:-runs/tpo-8b-${SLURM_JOB_ID}}" "$@"
