#!/bin/bash
# Convert checkpoints on Slurm:  [PROCS_PER_NODE=P] sbatch [--nodes=N] slurm/convert.sh hf2mcore|mcore2hf [convert flags ...]
#
# Runs N x P processes (no GPU needed; P defaults to 8 for hf2mcore, 1 for mcore2hf): one srun task per node
# starts that node's torchrun agent through `megaswift launch`, which takes the head node, rendezvous port and
# node rank from the job (docs/clusters.md). Each process reads and writes its share of the tensors, balanced by
# bytes, into one torch_dist checkpoint (hf2mcore) or one HF folder (mcore2hf, a full model's export; adapters,
# --merge and --hf-config need P=1 on one node); rank 0 verifies and moves it into place. Input and OUT_DIR must
# be on storage every node shares. A process's memory is about the largest tensor it handles + 1 GiB, so P is
# bounded by the disk's throughput more than by memory.
# Not requeued: a partial output folder is rewritten by running the same command again.
#SBATCH --job-name=megaswift-convert
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --no-requeue
#SBATCH --output=%x-%j.out

[ $# -ge 1 ] || { echo "usage: [PROCS_PER_NODE=P] sbatch [--nodes=N] slurm/convert.sh hf2mcore|mcore2hf [convert flags ...]" >&2; exit 2; }
if [ "$1" = hf2mcore ]; then procs=${PROCS_PER_NODE:-8}; else procs=${PROCS_PER_NODE:-1}; fi
nodes=${SLURM_JOB_NUM_NODES:-1}
log_dir=logs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}
mkdir -p "$log_dir"
echo "megaswift: job ${SLURM_JOB_ID} on ${SLURM_JOB_NODELIST}: ${nodes} node(s) x ${procs} process(es); node logs: ${log_dir}/"

srun --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE}" --kill-on-bad-exit=1 --output="${log_dir}/%N.log" \
  python -m megaswift launch --nproc-per-node "$procs" -- megaswift convert "$@" &
step=$!
trap 'scancel --signal=TERM "${SLURM_JOB_ID}"' TERM
wait "$step"; status=$?
while kill -0 "$step" 2>/dev/null; do wait "$step"; status=$?; done  # `wait` returned early to run the trap
exit "$status"
