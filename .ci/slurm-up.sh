#!/usr/bin/env bash
# Installs and starts a one-node Slurm cluster on this machine (as root, without systemd) for tests/slurm/.
# Idempotent: when the cluster already answers and its node is idle, it does nothing.
# Facts behind each step: /work/shared/docs/slurm-facts.md (munged as the munge user, daemons started by hand,
# short credential expiry and scheduler intervals so a requeue reruns within seconds).
set -euo pipefail

SCRATCH=${MEGASWIFT_SLURM_DIR:-/var/tmp/megaswift-slurm}
CONF=/etc/slurm/slurm.conf

log() { echo "slurm-up: $*"; }

cluster_idle() {
  scontrol ping 2>/dev/null | grep "is UP" >/dev/null && sinfo -h -o %T 2>/dev/null | grep -x "idle" >/dev/null
}

if command -v scontrol >/dev/null && [ -f "$CONF" ] && cluster_idle; then
  log "already up and idle"; exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  log "installing slurmctld slurmd slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

# munged refuses to run as root; its key is created by the package install.
mkdir -p /run/munge && chown munge:munge /run/munge
if ! (munge -n | unmunge) >/dev/null 2>&1; then
  runuser -u munge -- munged
  for _ in $(seq 50); do (munge -n | unmunge) >/dev/null 2>&1 && break; sleep 0.1; done
  (munge -n | unmunge) >/dev/null 2>&1 || { log "munged did not start"; exit 1; }
fi

mkdir -p "$SCRATCH"/{ctld,d,log} /etc/slurm
HOST=$(hostname)
# `slurmd -C` prints this machine's node line (CPUs, sockets, memory); its UpTime line is not a config key.
NODE_LINE=$(slurmd -C | grep '^NodeName=')
cat > "$CONF" <<EOF
ClusterName=ci
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=2,bf_interval=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
KillWait=30
StateSaveLocation=${SCRATCH}/ctld
SlurmdSpoolDir=${SCRATCH}/d
SlurmctldPidFile=${SCRATCH}/slurmctld.pid
SlurmdPidFile=${SCRATCH}/slurmd.pid
SlurmctldLogFile=${SCRATCH}/log/slurmctld.log
SlurmdLogFile=${SCRATCH}/log/slurmd.log
${NODE_LINE} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
alive "$SCRATCH/slurmctld.pid" || { log "starting slurmctld"; slurmctld; }
alive "$SCRATCH/slurmd.pid" || { log "starting slurmd"; slurmd; }

for _ in $(seq 60); do
  if cluster_idle; then log "node ${HOST} idle ($(sinfo --version))"; exit 0; fi
  sleep 1
done
log "the node did not become idle within 60 s; state: $(sinfo -h -o '%T %E' 2>&1)"
log "logs: ${SCRATCH}/log/slurmctld.log ${SCRATCH}/log/slurmd.log"
exit 1
