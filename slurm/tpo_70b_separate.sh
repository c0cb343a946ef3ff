#!/bin/bash
# TPO of Llama-3-70B-Instruct with the rollout engines on GPUs of their own
# (rollout.placement=separate, docs/rollout.md): one allocation of 7 nodes of 8 H100s, the
# trainer on the first 4 (TP=8, PP=4, as slurm/tpo_70b.sh), a tpo-engine pool on the
# next 2 (two vLLM engines at TP=8) and the 70B judge's pool on the last (one engine at
# TP=8), as three srun steps (slurm/common.sh, tpo_launch_judge_pool). Trainer rank 0 serves the bridge on the first node; the engines
# connect to it, receive every weight sync over NCCL and do the rollouts. Set the paths as
# for tpo_70b.sh:
#   sbatch -p PARTITION -A ACCOUNT slurm/tpo_70b_separate.sh run.policy=/models/Meta-Llama-3-70B-Instruct \
#       judge.pairwise.model=/models/judge-70b prompts.path=/data/prompts.jsonl \
#       evaluation.path=/data/heldout.jsonl
# The same steps ran on one CPU node under a local Slurm (slurm/tpo_tiny_separate.sh,
# tests/repository/test_slurm_tpo.py); never on GPUs. A requeued job keeps its id, hence its ports;
# the bridge address is not in the run's settings digest, so it resumes its run.dir on
# whichever nodes it lands.
#SBATCH --job-name=tpo-70b-separate
#SBATCH --nodes=7
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=USR1@600
#SBATCH --output=%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
source slurm/common.sh
# Three steps: the judge pool (one TP=8 judge engine) on the last node, the policy's pool
# on the two before it, the trainer on the first four (tpo_launch_judge_pool).
JUDGE_NODES="${JUDGE_NODES:-1}" JUDGE_TASKS="${JUDGE_TASKS:-8}" \
ENGINE_NODES="${ENGINE_NODES:-2}" ENGINE_TASKS="${ENGINE_TASKS:-16}" tpo_launch_judge_pool \
    experiment=llama3_70b_separate \
    "run.dir=${RUN_DIR:-runs/tpo-70b-separate-${SLURM_JOB_ID}}" "$@"
