#!/bin/bash
# TPO of Llama-3-70B-Instruct with the rollout engines on GPUs of their own
# (rollout.placement=separate, docs/rollout.md): one heterogeneous job, the trainer on the
# first component (4 nodes of 8 H100s, TP=8, PP=4, as slurm/tpo_70b.sh) and a tpo-engine
# pool on the second (2 nodes: two vLLM engines at TP=8). Trainer rank 0 serves the bridge
# on its node; the engines connect to it, receive every weight sync over NCCL and do the
# rollouts. Set the paths as for tpo_70b.sh:
#   sbatch -p PARTITION -A ACCOUNT slurm/tpo_70b_separate.sh run.policy=/models/Meta-Llama-3-70B-Instruct \
#       judge.pairwise.model=/models/judge-70b prompts.path=/data/prompts.jsonl \
#       evaluation.path=/data/heldout.jsonl
# Never run on GPUs: the separate mode ran only on CPU (gloo, HF engines, localhost).
# A requeued job may land on other nodes (another bridge address), which is not in the run's
# settings digest, so it resumes its run.dir (a requeued job keeps its job id).
#SBATCH --job-name=tpo-70b-separate
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=USR1@600
#SBATCH --output=%x-%j.out
#SBATCH hetjob
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
source slurm/common.sh
if [ -z "${CONTAINER:-}" ]; then
    # shellcheck disable=SC1091
    source "${VENV:-.venv}/bin/activate"
fi

# A plain srun (tpo_launch's) starts on the first component only: the trainer's. Its
# size is the world the dry run checks.
export SLURM_NTASKS="$SLURM_NTASKS_HET_GROUP_0"
trainer_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_0" | head -n 1)
# tpo-run's own master port is 20000 + job id % 20000 (megatron_tpo.parallel.launch).
bridge_port=$((20000 + (SLURM_JOB_ID + 1) % 20000))
engine_master_port=$((20000 + (SLURM_JOB_ID + 2) % 20000))
settings=(experiment=llama3_70b rollout=paper_separate
          "rollout.bridge.address=$trainer_host" "rollout.bridge.port=$bridge_port"
          "rollout.bridge.engine_ranks=$SLURM_NTASKS_HET_GROUP_1"
          "run.dir=${RUN_DIR:-runs/tpo-70b-separate-${SLURM_JOB_ID}}" "$@")

container=()
if [ -n "${CONTAINER:-}" ]; then
    container=(--container-image="$CONTAINER" --container-mounts="${CONTAINER_MOUNTS:-$PWD:$PWD}")
fi
echo "job ${SLURM_JOB_ID}: engine pool of ${SLURM_NTASKS_HET_GROUP_1} ranks on" \
     "${SLURM_JOB_NODELIST_HET_GROUP_1}, bridge at ${trainer_host}:${bridge_port}"
# The pool builds its engines, then waits (rollout.bridge.timeout_seconds) for trainer
# rank 0; it exits when tpo-run asks it to, or when tpo-run's rank 0 goes away.
MASTER_PORT=$engine_master_port srun --het-group=1 --kill-on-bad-exit=1 "${container[@]}" \
    tpo-engine "${settings[@]}" &
engine_step=$!
trap 'kill "$engine_step" 2>/dev/null || true' EXIT

tpo_launch "${settings[@]}"
if ! wait "$engine_step"; then
    echo "job ${SLURM_JOB_ID}: tpo-run finished but the engine pool step failed" >&2
    exit 1
fi
