#!/bin/bash
# tpo-eval on a cluster: M_3 of an 8B TPO run answered by 8 vLLM replicas on the first
# node, judged pairwise by a 70B judge served by a `tpo-engine --serve judge` pool (one
# TP=8 vLLM engine) on the second. Set the paths below, then:
#   sbatch -p PARTITION -A ACCOUNT examples/eval_cluster/job.sh
# Written against the project's CPU-tested pieces (the judge pool ran on CPU with HF
# engines over gloo, the answers on vLLM's CPU build); never run on a GPU.
#SBATCH --job-name=tpo-eval
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
source .venv/bin/activate
RUN_DIR=${RUN_DIR:-/ckpt/tpo8b}
JUDGE_MODEL=${JUDGE_MODEL:-/models/Meta-Llama-3-70B-Instruct}
ARENA_HARD=${ARENA_HARD:-/data/arena-hard-v0.1/question.jsonl}

host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -1)   # tpo-eval's rank 0
judge=(judge=pairwise "judge.pairwise.model=$JUDGE_MODEL"
       judge.pairwise.placement=separate "judge.pairwise.bridge.address=$host"
       "judge.pairwise.bridge.port=$((20000 + SLURM_JOB_ID % 20000))"
       judge.pairwise.bridge.engine_ranks=8 judge.pairwise.vllm.tensor_parallel_size=8
       judge.pairwise.sampling.max_new_tokens=512)
# The judge pool: one TP=8 vLLM engine of the 70B judge on the second node.
MASTER_PORT=$((21000 + SLURM_JOB_ID % 20000)) srun --kill-on-bad-exit=1 --nodes=1 \
    --ntasks=8 --relative=1 tpo-engine --serve judge experiment=llama3_8b "${judge[@]}" &
# The answers: 8 vLLM replicas of the policy on the first node; verdicts from the pool.
MASTER_PORT=$((22000 + SLURM_JOB_ID % 20000)) srun --kill-on-bad-exit=1 --nodes=1 \
    --ntasks=8 --relative=0 tpo-eval --run "$RUN_DIR" --iteration 3 --json \
    --sets "alpaca_eval,mt_bench,arena_hard=$ARENA_HARD" \
    experiment=llama3_8b rollout.engine=vllm rollout.vllm.tensor_parallel_size=1 "${judge[@]}"
wait
