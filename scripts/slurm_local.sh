#!/usr/bin/env bash
# A one-node SLURM cluster on this machine for tests/test_launch.py: installs Debian's munge, slurmctld, slurmd and
# slurm-client if missing, writes a minimal slurm.conf (this host, its CPUs, no cgroups, no accounting) and starts
# whichever daemons are not running; run it again at any time. Needs root. On failure it says why in one line.
#
#   scripts/slurm_local.sh
set -euo pipefail
if [[ $# -ne 0 ]]; then
  echo "usage: $0   (as root; installs and starts a local SLURM cluster)" >&2
  exit 2
fi
fail() { echo "slurm_local: $*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || fail "needs root (it installs packages and starts daemons)"
HOST=$(hostname -s)
CONF=/etc/slurm/slurm.conf
LOG=/var/log/slurm

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
  || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || fail "SLURM is not installed and there is no apt-get to install it"
  export DEBIAN_FRONTEND=noninteractive
  pkgs=(munge slurmctld slurmd slurm-client)
  apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null 2>&1; } \
    || fail "could not install ${pkgs[*]} with apt-get"
fi

# munge authenticates every SLURM message; the package's postinst makes the key, a bare image may lack it.
mkdir -p /run/munge && chown munge:munge /run/munge
[[ -s /etc/munge/munge.key ]] || runuser -u munge -- mungekey --create >/dev/null || fail "could not create a munge key"
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- munged || fail "munged did not start"
  munge -n | unmunge >/dev/null 2>&1 || fail "munged started but does not answer"
fi

MARK="# written by scripts/slurm_local.sh"
if [[ -e $CONF ]] && ! grep -qxF "$MARK" "$CONF"; then
  fail "$CONF exists and was not written by this script; not touching a real cluster's config"
fi
mkdir -p /var/spool/slurmctld /var/spool/slurmd "$LOG"
# proctrack/linuxproc and task/none need no cgroups (containers often have none writable); SlurmUser=root because
# the daemons serve this machine only; KillWait=10 (default 30) kills a job's leftover processes sooner after its
# SIGTERM, which keeps the tests short. At least 2 CPUs (config_overrides: slurmd takes the count as given) so that
# the tests' two-task jobs fit on any machine.
cat >"$CONF.new" <<CONF
$MARK
ClusterName=local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=10
SlurmdParameters=config_overrides
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$(($(nproc) > 2 ? $(nproc) : 2)) State=UNKNOWN
PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
changed=0
cmp -s "$CONF.new" "$CONF" || { mv "$CONF.new" "$CONF"; changed=1; }
rm -f "$CONF.new"

running() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
if running /run/slurmctld.pid && [[ $changed -eq 1 ]]; then scontrol reconfigure >/dev/null; fi
running /run/slurmctld.pid || slurmctld || fail "slurmctld did not start (see $LOG/slurmctld.log)"
running /run/slurmd.pid || slurmd || fail "slurmd did not start (see $LOG/slurmd.log)"

for _ in $(seq 60); do
  state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)
  case $state in
    idle | mixed | allocated | completing) exit 0 ;;
    down* | drain*) scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
  esac
  sleep 1
done
fail "node $HOST is not ready after 60 s (state: ${state:-no answer}; see $LOG/)"
