#!/bin/bash
# Convert checkpoints on Slurm:  sbatch slurm/convert.sh hf2mcore|mcore2hf [convert flags ...]
#
# Conversion streams one shard at a time and needs no GPU and no second node: one process on one node, started
# through `megaswift launch` like training so the torch.distributed environment is the same. Not requeued: a
# partial output folder is rewritten by running the same command again.
#SBATCH --job-name=megaswift-convert
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --no-requeue
#SBATCH --output=%x-%j.out

[ $# -ge 1 ] || { echo "usage: sbatch slurm/convert.sh hf2mcore|mcore2hf [convert flags ...]" >&2; exit 2; }
log_dir=logs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}
mkdir -p "$log_dir"
echo "megaswift: job ${SLURM_JOB_ID} on ${SLURM_JOB_NODELIST}; log: ${log_dir}/"

srun --ntasks-per-node=1 --output="${log_dir}/%N.log" \
  python -m megaswift launch --nproc-per-node 1 -- megaswift convert "$@" &
step=$!
trap 'scancel --signal=TERM "${SLURM_JOB_ID}"' TERM
wait "$step"; status=$?
while kill -0 "$step" 2>/dev/null; do wait "$step"; status=$?; done  # `wait` returned early to run the trap
exit "$status"
