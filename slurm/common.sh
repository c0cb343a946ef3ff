# Shared by the sbatch scripts: environment, a layout check before any accelerator time,
# and one srun step in which every task is one rank of the TPO job.
#   VENV       a virtual environment with megatron-tpo installed (default .venv)
#   CONTAINER  a container image for srun --container-image (pyxis); used instead of VENV
tpo_launch() {
    if [ -z "${CONTAINER:-}" ]; then
        # shellcheck disable=SC1091
        source "${VENV:-.venv}/bin/activate"
    fi
    echo "job ${SLURM_JOB_ID}: ${SLURM_NTASKS} tasks on ${SLURM_JOB_NODELIST}," \
         "restart ${SLURM_RESTART_COUNT:-0}"
    # Every rank finds its place from SLURM_PROCID/SLURM_NTASKS; the master is the first
    # node, the port derived from the job id (megatron_tpo.parallel.launch).
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
    # The layout, the files and the policy are checked here, on the batch host, before
    # srun spends accelerator time on a run that cannot start.
    SLURM_PROCID=0 SLURM_NTASKS="$SLURM_NTASKS" tpo-run --dry-run "$@"
    local container=()
    if [ -n "${CONTAINER:-}" ]; then
        container=(--container-image="$CONTAINER" --container-mounts="${CONTAINER_MOUNTS:-$PWD:$PWD}")
    fi
    # A failed task ends the whole step (no rank waits forever on a dead peer); the exit
    # code then says which. USR1 (see --signal) reaches every task: they checkpoint, and
    # rank 0 requeues the job.
    if ! srun --kill-on-bad-exit=1 "${container[@]}" tpo-run "$@"; then
        echo "job ${SLURM_JOB_ID}: the srun step failed; see the first task's error above" >&2
        exit 1
    fi
}
