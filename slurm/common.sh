# Shared by the sbatch scripts: environment, a layout check before any accelerator time,
# and one srun step in which every task is one rank of the TPO job.
#   VENV             a virtual environment with megatron-tpo installed (default .venv)
#   CONTAINER        an image for pyxis/enroot (srun --container-image: a registry URI or an
#                    enroot .sqsh), used instead of VENV; CONTAINER_MOUNTS what the tasks
#                    see (default $PWD:$PWD)
#   APPTAINER_IMAGE  an Apptainer/Singularity image (.sif), run as `srun apptainer exec --nv`,
#                    used instead of VENV; APPTAINER_BINDS what the tasks see (default $PWD)
# With a container, the batch host's dry run runs in the same image as the tasks.
# docker/Dockerfile builds one (docs/gpu_setup.md; it has not been built here).
# Arrays expand as ${a[@]+"${a[@]}"}: before bash 4.4 (CentOS/RHEL 7 has 4.2), "${a[@]}"
# of an empty array, such as tpo_container with a venv, is an unbound variable under set -u.
tpo_srun_placement=()
tpo_container=()

tpo_environment() {
    if [ -n "${CONTAINER:-}" ] && [ -n "${APPTAINER_IMAGE:-}" ]; then
        echo "job ${SLURM_JOB_ID:-}: set CONTAINER (pyxis) or APPTAINER_IMAGE, not both" >&2
        exit 2
    fi
    # Every srun step puts tpo_container between its own options and the command: pyxis
    # takes options of srun, apptainer wraps the command. Either way the tasks start in
    # the submit directory, where run.dir and relative paths resolve.
    if [ -n "${CONTAINER:-}" ]; then
        tpo_container=(--container-image="$CONTAINER" --container-workdir="$PWD"
                       --container-mounts="${CONTAINER_MOUNTS:-$PWD:$PWD}")
    elif [ -n "${APPTAINER_IMAGE:-}" ]; then
        tpo_container=(apptainer exec --nv --bind "${APPTAINER_BINDS:-$PWD}" --pwd "$PWD"
                       "$APPTAINER_IMAGE")
    else
        # shellcheck disable=SC1091
        source "${VENV:-.venv}/bin/activate"
    fi
    # megatron-core's overlap of TP communication with compute relies on one CUDA queue;
    # CUDA reads it when its context is created (tpo-run and tpo-engine set it too).
    export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
    # Slurm >= 22.05: srun no longer inherits the job's --cpus-per-task (a task would get
    # one CPU for its OMP_NUM_THREADS threads) unless SRUN_CPUS_PER_TASK says so.
    if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
        export SRUN_CPUS_PER_TASK="${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}"
    fi
}

# `tpo_on_batch_host VAR=VALUE ... COMMAND ARGS`: COMMAND with those variables, here on
# the batch host, in the tasks' image: apptainer runs it in place (no GPU needed); pyxis
# only runs inside steps, so it is a one-task step that may share the allocation's CPUs
# (--overlap: it must not wait behind a running engine pool).
tpo_on_batch_host() {
    if [ -n "${CONTAINER:-}" ]; then
        srun --overlap --nodes=1 --ntasks=1 ${tpo_container[@]+"${tpo_container[@]}"} env "$@"
    elif [ -n "${APPTAINER_IMAGE:-}" ]; then
        apptainer exec --bind "${APPTAINER_BINDS:-$PWD}" --pwd "$PWD" "$APPTAINER_IMAGE" env "$@"
    else
        env "$@"
    fi
}

tpo_launch() {
    tpo_environment
    echo "job ${SLURM_JOB_ID}: ${tpo_trainer_tasks:-$SLURM_NTASKS} trainer tasks on ${SLURM_JOB_NODELIST}," \
         "restart ${SLURM_RESTART_COUNT:-0}"
    # Every rank finds its place from SLURM_PROCID/SLURM_NTASKS; the master is the first
    # node, the port derived from the job id (megatron_tpo.parallel.launch).
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
    # The layout, the files and the policy are checked here, on the batch host, before
    # srun spends accelerator time on a run that cannot start.
    tpo_on_batch_host SLURM_PROCID=0 SLURM_NTASKS="${tpo_trainer_tasks:-$SLURM_NTASKS}" \
        tpo-run --dry-run "$@"
    local container=(${tpo_container[@]+"${tpo_container[@]}"})
    # A failed task ends the whole step (no rank waits forever on a dead peer); the exit
    # code then says which. USR1 (see --signal) reaches every task: they checkpoint, and
    # rank 0 requeues the job. tpo_srun_placement (tpo_launch_separate) narrows the step
    # to the trainer's share of the allocation.
    if ! srun --kill-on-bad-exit=1 ${tpo_srun_placement[@]+"${tpo_srun_placement[@]}"} \
            ${container[@]+"${container[@]}"} tpo-run "$@"; then
        echo "job ${SLURM_JOB_ID}: the srun step failed; see the first task's error above" >&2
        exit 1
    fi
}

# The rollout engines apart from the trainer (rollout.placement=separate), as two srun
# steps of one allocation: a tpo-engine pool of ENGINE_TASKS tasks on the last
# ENGINE_NODES nodes, and tpo_launch's trainer step on the others; with ENGINE_NODES=0
# both steps share the nodes (CPU runs on one node). Trainer rank 0, on the first node,
# serves the bridge; each step gets a port of its own, derived from the job id, so a
# requeued job (same id) uses the same ports.
tpo_launch_separate() {
    tpo_environment
    local engine_tasks="${ENGINE_TASKS:?set ENGINE_TASKS, the tpo-engine processes}"
    local engine_nodes="${ENGINE_NODES:-0}"
    local nodes
    mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    # A judge pool (tpo_launch_judge_pool) holds the last nodes and tasks already.
    local trainer_nodes=$(( ${#nodes[@]} - engine_nodes - ${tpo_judge_nodes:-0} ))
    tpo_trainer_tasks=$(( SLURM_NTASKS - engine_tasks - ${tpo_judge_tasks:-0} ))
    if [ "$tpo_trainer_tasks" -lt 1 ] || [ "$trainer_nodes" -lt 1 ]; then
        echo "job ${SLURM_JOB_ID}: ENGINE_TASKS=$engine_tasks ENGINE_NODES=$engine_nodes leave" \
             "no room for the trainer in ${SLURM_NTASKS} tasks on ${#nodes[@]} nodes" >&2
        exit 2
    fi
    local settings=("$@" rollout.placement=separate "rollout.bridge.address=${nodes[0]}"
                    "rollout.bridge.port=$((20000 + (SLURM_JOB_ID + 1) % 20000))"
                    "rollout.bridge.engine_ranks=$engine_tasks")
    local engine_placement=(--ntasks="$engine_tasks")
    tpo_srun_placement=(--ntasks="$tpo_trainer_tasks")
    if [ "$engine_nodes" -gt 0 ]; then
        engine_placement+=(--nodes="$engine_nodes" --relative="$trainer_nodes")
        tpo_srun_placement+=(--nodes="$trainer_nodes" --relative=0)
    else
        engine_placement+=(--exact)
        tpo_srun_placement+=(--exact)
    fi
    local container=(${tpo_container[@]+"${tpo_container[@]}"})
    local where="beside the trainer"
    [ "$engine_nodes" -gt 0 ] && where="on ${engine_nodes} nodes of their own"
    echo "job ${SLURM_JOB_ID}: engine pool of ${engine_tasks} tasks ${where}," \
         "bridge at ${nodes[0]}"
    # The pool builds its engines, then waits (rollout.bridge.timeout_seconds) for trainer
    # rank 0; it exits when tpo-run asks it to, or when tpo-run's rank 0 goes away.
    MASTER_PORT=$((20000 + (SLURM_JOB_ID + 2) % 20000)) srun --kill-on-bad-exit=1 \
        ${engine_placement[@]+"${engine_placement[@]}"} ${container[@]+"${container[@]}"} \
        tpo-engine ${settings[@]+"${settings[@]}"} &
    local engine_step=$!
    tpo_launch ${settings[@]+"${settings[@]}"}
    if ! wait "$engine_step"; then
        echo "job ${SLURM_JOB_ID}: tpo-run finished but the engine pool step failed" >&2
        exit 1
    fi
}

# A pairwise judge model on GPUs of its own (judge.pairwise.placement=separate,
# docs/rollout.md "Where the judge runs"): a `tpo-engine --serve judge` step of
# JUDGE_TASKS tasks on the last JUDGE_NODES nodes of the allocation (JUDGE_NODES=0: beside
# the others, for CPU runs on one node), then the rest of the job on the nodes before
# them: tpo_launch_separate when ENGINE_TASKS is set (the policy's pool takes the
# ENGINE_NODES before the judge's), tpo_launch otherwise. Trainer rank 0 serves the
# judge's bridge too, on a port of its own (from the job id, like the others).
tpo_launch_judge_pool() {
    tpo_environment
    local judge_tasks="${JUDGE_TASKS:?set JUDGE_TASKS, the tpo-engine processes of the judge pool}"
    local judge_nodes="${JUDGE_NODES:-0}"
    local nodes
    mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    local other_nodes=$(( ${#nodes[@]} - judge_nodes ))
    if [ $(( SLURM_NTASKS - judge_tasks )) -lt 1 ] || [ "$other_nodes" -lt 1 ]; then
        echo "job ${SLURM_JOB_ID}: JUDGE_TASKS=$judge_tasks JUDGE_NODES=$judge_nodes leave" \
             "no room for the trainer in ${SLURM_NTASKS} tasks on ${#nodes[@]} nodes" >&2
        exit 2
    fi
    tpo_judge_tasks=$judge_tasks
    tpo_judge_nodes=$judge_nodes
    local settings=("$@" judge.pairwise.placement=separate
                    "judge.pairwise.bridge.address=${nodes[0]}"
                    "judge.pairwise.bridge.port=$((20000 + (SLURM_JOB_ID + 3) % 20000))"
                    "judge.pairwise.bridge.engine_ranks=$judge_tasks")
    local judge_placement=(--ntasks="$judge_tasks")
    if [ "$judge_nodes" -gt 0 ]; then
        judge_placement+=(--nodes="$judge_nodes" --relative="$other_nodes")
    else
        judge_placement+=(--exact)
    fi
    local container=(${tpo_container[@]+"${tpo_container[@]}"})
    local where="beside the trainer"
    [ "$judge_nodes" -gt 0 ] && where="on ${judge_nodes} nodes of their own"
    echo "job ${SLURM_JOB_ID}: judge pool of ${judge_tasks} tasks ${where}," \
         "bridge at ${nodes[0]}"
    # It loads judge.pairwise.model, waits for trainer rank 0 (judge.pairwise.bridge.
    # timeout_seconds) and serves verdicts until tpo-run stops it or goes away.
    MASTER_PORT=$((20000 + (SLURM_JOB_ID + 4) % 20000)) srun --kill-on-bad-exit=1 \
        ${judge_placement[@]+"${judge_placement[@]}"} ${container[@]+"${container[@]}"} \
        tpo-engine --serve judge ${settings[@]+"${settings[@]}"} &
    local judge_step=$!
    if [ -n "${ENGINE_TASKS:-}" ]; then
        tpo_launch_separate ${settings[@]+"${settings[@]}"}
    else
        tpo_trainer_tasks=$(( SLURM_NTASKS - judge_tasks ))
        tpo_srun_placement=(--ntasks="$tpo_trainer_tasks")
        if [ "$judge_nodes" -gt 0 ]; then
            tpo_srun_placement+=(--nodes="$other_nodes" --relative=0)
        else
            tpo_srun_placement+=(--exact)
        fi
        tpo_launch ${settings[@]+"${settings[@]}"}
    fi
    if ! wait "$judge_step"; then
        echo "job ${SLURM_JOB_ID}: tpo-run finished but the judge pool step failed" >&2
        exit 1
    fi
}
