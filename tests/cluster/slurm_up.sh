#!/usr/bin/env bash
# Bring up a real one-node SLURM on this machine for tests/cluster/test_slurm.py:
# installs Debian's slurmd/slurmctld/slurm-client and munge when missing, writes a one-node
# /etc/slurm/slurm.conf (partition "debug", the node's CPUs and memory as `slurmd -C` reports
# them), starts munged, slurmctld and slurmd by hand (no systemd here) and waits until the node
# is idle. Idempotent: when the daemons already answer with this configuration it only checks.
#
#   sudo tests/cluster/slurm_up.sh          # exit 0: ready
#                                           # exit 3: cannot run here (one line says why)
#   tests/cluster/slurm_up.sh --down        # stop the daemons this script started
#
# It never touches a slurm.conf it did not write (a real cluster's): it stops with exit 3.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by megaponder tests/cluster/slurm_up.sh"
CANNOT=3

cannot() { echo "slurm_up: $*" >&2; exit "$CANNOT"; }
log() { echo "slurm_up: $*" >&2; }
# a live process of that name behind the pid file (a stale file's pid may have been reused)
running() { [ -s "$1" ] && [ "$(cat "/proc/$(cat "$1" 2>/dev/null)/comm" 2>/dev/null)" = "$(basename "$1" .pid)" ]; }
stop() {  # the daemon behind a pid file, waiting until it is gone (it removes the file first)
  local pid
  running "$1" || return 0
  pid=$(cat "$1")
  kill -TERM "$pid"
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}

if [ "${1:-}" = "--down" ]; then
  grep -qF "$MARK" "$CONF" 2>/dev/null || cannot "$CONF was not written by this script; not stopping anything"
  for pidfile in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do stop "$pidfile"; done
  exit 0
fi

[ "$(id -u)" = 0 ] || cannot "needs root (installs packages, writes $CONF, starts daemons)"

# -- packages -------------------------------------------------------------------------------
missing=()
for bin in slurmctld slurmd sbatch munged; do
  command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
done
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 || cannot "${missing[*]} missing and no apt-get to install slurm-wlm and munge"
  log "installing slurmd slurmctld slurm-client munge (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  # the lock timeout: other jobs on a shared machine may be installing packages too
  apt_get() { apt-get -q -o DPkg::Lock::Timeout=600 "$@"; }
  if ! apt_get install -y --no-install-recommends slurmd slurmctld slurm-client munge >/dev/null; then
    apt_get update >/dev/null || true
    apt_get install -y --no-install-recommends slurmd slurmctld slurm-client munge >/dev/null \
      || cannot "apt-get could not install slurmd slurmctld slurm-client munge"
  fi
fi

# -- configuration --------------------------------------------------------------------------
node=$(hostname -s)
# "NodeName=vm CPUs=2 Boards=1 ... RealMemory=24105": what slurmd itself will find, so the
# node never starts drained for claiming more than it has
hardware=$(slurmd -C | head -1 | sed -e 's/^NodeName=[^ ]* //')
want=$(cat <<EOF
$MARK
# One node for the test suite; see the script for how it is started.
ClusterName=megaponder-test
SlurmctldHost=$node
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# finished jobs stay visible to scontrol for 10 min (the tests read their state and restarts)
MinJobAge=600
# a pending job whose start time arrives runs within seconds, not at the next 60 s pass
SchedulerParameters=sched_interval=5
NodeName=$node $hardware State=UNKNOWN
# the test jobs (2 tasks each) share the node's few CPUs and run side by side
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8
EOF
)

if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
  cannot "$CONF exists and was not written by this script (a real cluster?); not touching it"
fi

node_state() { sinfo -h -n "$node" -o %t 2>/dev/null | head -1; }
healthy() {
  running /run/munge/munged.pid && running /run/slurmctld.pid && running /run/slurmd.pid \
    && scontrol ping 2>/dev/null | grep -q UP \
    && case "$(node_state)" in idle|mix|alloc|comp) true;; *) false;; esac
}

if [ -e "$CONF" ] && [ "$(cat "$CONF")" = "$want" ] && healthy; then
  exit 0   # the common case: a second call is a check only
fi

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
changed=0
if [ ! -e "$CONF" ] || [ "$(cat "$CONF")" != "$want" ]; then
  printf '%s\n' "$want" > "$CONF"
  changed=1
fi

# -- daemons --------------------------------------------------------------------------------
if ! running /run/munge/munged.pid; then
  [ -s /etc/munge/munge.key ] || mungekey -c -k /etc/munge/munge.key
  mkdir -p /run/munge
  chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
  chmod 0700 /etc/munge /var/log/munge
  chmod 0755 /run/munge
  chmod 0600 /etc/munge/munge.key
  runuser -u munge -- munged
fi
for _ in $(seq 50); do munge -n </dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n </dev/null | unmunge >/dev/null 2>&1 || cannot "munged does not answer (see /var/log/munge/munged.log)"

if [ "$changed" = 1 ]; then   # a new configuration: restart what runs with the old one
  for pidfile in /run/slurmd.pid /run/slurmctld.pid; do stop "$pidfile"; done
fi
running /run/slurmctld.pid || slurmctld
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
scontrol ping 2>/dev/null | grep -q UP || cannot "slurmctld does not answer (see /var/log/slurm/slurmctld.log)"
running /run/slurmd.pid || slurmd

for _ in $(seq 150); do
  case "$(node_state)" in
    idle|mix|alloc|comp) exit 0;;
    down*|drain*|drng*|fail*|inval*)   # left down by an earlier stop: it is fine now
      scontrol update NodeName="$node" State=RESUME 2>/dev/null || true;;
  esac
  sleep 0.2
done
cannot "node $node is '$(node_state)', not idle (see /var/log/slurm/slurmd.log)"
