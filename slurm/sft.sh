#!/bin/bash
# Fine-tune on Slurm:  sbatch [--nodes=N] [--gpus-per-node=G] [--time=...] slurm/sft.sh RUN.yaml [--section.field value ...]
#
# One srun task per node starts that node's torchrun agent through `megaswift launch`, which takes the head node,
# rendezvous port, node rank and GPUs from the job (docs/clusters.md). Submit with your Python environment active
# (sbatch passes it on) from the folder the config's relative paths start from. Put checkpoint.save on storage every
# node shares: a requeued job (preemption, `scontrol requeue`) resumes from its latest complete checkpoint with the
# same command. Before the time limit the batch shell gets SIGTERM (--signal), passes it on, and the trainer saves.
#SBATCH --job-name=megaswift-sft
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:TERM@120
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

config=${1:?usage: sbatch slurm/sft.sh RUN.yaml [--section.field value ...]}
shift
log_dir=logs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}
mkdir -p "$log_dir"
echo "megaswift: job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST}; node logs: ${log_dir}/"

# In the background so the trap below runs as soon as SIGTERM arrives, not when the step ends.
srun --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE}" --kill-on-bad-exit=1 --open-mode=append \
  --output="${log_dir}/%N.log" python -m megaswift launch -- megaswift sft --config "$config" "$@" &
step=$!
trap 'echo "megaswift: SIGTERM: the step saves a checkpoint and stops"; scancel --signal=TERM "${SLURM_JOB_ID}"' TERM
wait "$step"; status=$?
while kill -0 "$step" 2>/dev/null; do wait "$step"; status=$?; done  # `wait` returned early to run the trap
exit "$status"
