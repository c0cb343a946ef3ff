#!/bin/bash
# TPO of Llama-3-70B-Instruct on 9 nodes of 8 H100s: the policy at TP=8, PP=4, DP=2 with a
# colocated vLLM engine of TP=8 per 8 GPUs on the first 8 nodes, judged by a 70B pairwise
# LLM judge on the 9th (configs/experiment/llama3_70b.yaml). DP=2 shards the optimizer so
# the awake engine fits beside it (tpo-run --dry-run prints each phase). Set the paths:
#   sbatch -p PARTITION -A ACCOUNT slurm/tpo_70b.sh run.policy=/models/Meta-Llama-3-70B-Instruct \
#       judge.pairwise.model=/models/judge-70b prompts.path=/data/prompts.jsonl \
#       evaluation.path=/data/heldout.jsonl
# A larger allocation keeps the layout and adds data parallelism (--nodes=17: DP=4).
#SBATCH --job-name=tpo-70b
#SBATCH --nodes=9
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
# The 70B judge model is a tpo-engine pool of its own (one TP=8 engine) on the last
# JUDGE_NODES node(s); the trainer and the policy's colocated engines take the others.
JUDGE_NODES="${JUDGE_NODES:-1}" JUDGE_TASKS="${JUDGE_TASKS:-8}" tpo_launch_judge_pool \
    experiment=llama3_70b "run.dir=${RUN_DIR:-runs/tpo-70b-${SLURM_JOB_ID}}" "$@"
