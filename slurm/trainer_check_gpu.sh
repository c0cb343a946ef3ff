#!/bin/bash
# Check a trainer layout on GPUs before a long TPO run: fit a fixed batch with the real
# model shape, print loss, step time and (per rank) peak memory. Choose the layout with
# `tpo-plan ... --emit DIR` and copy its #SBATCH header here.
#   MODEL=llama3_70b TP=8 PP=4 SEQ_LEN=4096 sbatch --nodes=4 slurm/trainer_check_gpu.sh
#   MCORE=/ckpt/llama3-70b-tp8-pp4 ... to start from converted weights instead of random
#   CONTAINER=image.sqsh or APPTAINER_IMAGE=image.sif ... to run in the image (slurm/common.sh)
#SBATCH --job-name=tpo-trainer-check
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --exclusive
#SBATCH --time=00:30:00
#SBATCH --output=%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
source slurm/common.sh
# The venv (VENV), or the image every task runs in (CONTAINER with pyxis, APPTAINER_IMAGE),
# as for the TPO jobs; it also sets CUDA_DEVICE_MAX_CONNECTIONS=1 for megatron's overlap.
tpo_environment
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
args=(--model "${MODEL:-llama3_8b}" --tp "${TP:-8}" --pp "${PP:-1}" --steps "${STEPS:-5}"
      --seq-len "${SEQ_LEN:-4096}" --micro-batches "${MICRO_BATCHES:-8}")
[ -n "${VPP:-}" ] && args+=(--vpp "$VPP")
[ -n "${MCORE:-}" ] && args+=(--mcore "$MCORE")
# ${a[@]+"${a[@]}"}: slurm/common.sh says why (bash before 4.4 under set -u).
srun --kill-on-bad-exit=1 ${tpo_container[@]+"${tpo_container[@]}"} \
    tpo-fit-batch ${args[@]+"${args[@]}"}
