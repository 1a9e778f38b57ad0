# shellcheck shell=bash
# Shared by the sbatch templates (sourced, not run). `launch RUN_DIR [train.py flags]` starts
# train.py once per Slurm task with srun, forwards a stop signal to every task, and requeues
# the job when train.py stopped to be resumed (exit 75). The same command then resumes from
# the newest checkpoint in RUN_DIR.
#
# Why srun + train.py and not `accelerate launch`/torchrun per node: launchers do not
# forward SIGUSR1, kill their workers ~30 s after forwarding SIGTERM, and turn a worker's
# exit code 75 into 1, so the script could not tell "preempted" from "crashed".

# `run_dir_of DEFAULT [train.py flags]` prints the directory train.py will write to: the
# value of the last --output_dir VALUE or --output_dir=VALUE among the flags, else DEFAULT.
run_dir_of() {
  local dir=$1
  shift
  while (($# > 0)); do
    case $1 in
      --output_dir=*) dir=${1#--output_dir=} ;;
      --output_dir) if (($# > 1)); then dir=$2; shift; fi ;;
    esac
    shift
  done
  printf '%s\n' "$dir"
}

launch() {
  local run_dir=$1
  shift
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))  # same job id after a requeue: same port
  export MASTER_ADDR MASTER_PORT
  echo "$(date '+%F %T') job $SLURM_JOB_ID, start $((${SLURM_RESTART_COUNT:-0} + 1)):" \
       "$SLURM_NTASKS task(s) on $SLURM_JOB_NODELIST, rendezvous $MASTER_ADDR:$MASTER_PORT," \
       "run directory $(run_dir_of "$run_dir" "$@")"

  # Since Slurm 22.05 srun no longer inherits sbatch's --cpus-per-task: without this, each
  # task is bound to one CPU where the site binds tasks (loader workers then get none).
  if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi

  # One process per task; ranks come from Slurm, the GPU from LOCAL_RANK (Accelerate).
  # Not --kill-on-bad-exit: ranks leaving with 75 a moment apart would kill each other (the
  # step then ends 143, not 75). --wait ends the others 2 min after the first exits instead.
  # shellcheck disable=SC2016  # expanded by each task, not here
  srun --wait=120 bash -c '
    export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
    export LOCAL_WORLD_SIZE=${SLURM_NTASKS_PER_NODE:-1}
    exec python train.py "$@"' train.py --output_dir "$run_dir" "$@" &
  local srun_pid=$! rc=0

  # The signal reaches this shell only (#SBATCH --signal=B:..., scancel --batch, or a
  # preemption's TERM); pass it to the training step, which saves and exits 75.
  trap 'echo "$(date +%T) stop signal: train.py will checkpoint and exit";
        scancel --signal=USR1 "$SLURM_JOB_ID"' USR1 TERM INT
  while true; do
    wait "$srun_pid" && rc=0 || rc=$?
    kill -0 "$srun_pid" 2>/dev/null || break  # wait was only interrupted by the trap
  done
  trap - USR1 TERM INT

  if ((rc == 75)); then
    echo "$(date +%T) checkpoint saved; requeueing job $SLURM_JOB_ID to resume"
    scontrol requeue "$SLURM_JOB_ID"  # ends this shell at once: nothing may follow
  fi
  echo "$(date +%T) train.py exited $rc"
  return "$rc"
}
