#!/usr/bin/env bash
# Stops the one-node Slurm cluster started by .ci/slurm-up.sh (by pid file, never by process name).
set -uo pipefail

SCRATCH=${MEGASWIFT_SLURM_DIR:-/var/tmp/megaswift-slurm}

stop() {  # $1: pid file, $2: name for the log
  [ -f "$1" ] || return 0
  local pid; pid=$(cat "$1")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    echo "slurm-down: stopped $2 ($pid)"
  fi
  rm -f "$1"
}

command -v scancel >/dev/null && scancel --user="$(id -un)" 2>/dev/null
stop "$SCRATCH/slurmd.pid" slurmd
stop "$SCRATCH/slurmctld.pid" slurmctld
stop /run/munge/munged.pid munged
exit 0
