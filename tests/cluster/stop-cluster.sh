#!/usr/bin/env bash
# Stop what start-cluster.sh started (PID files only). --purge also deletes $BASE, the test user and the
# traverse ACLs start-cluster.sh granted it. SLURM_CI_ONLY="sshd slurmd ..." stops only the daemons named (the
# test suite stops the ones its own start started, tests/cluster/loopback.py).
set -uo pipefail
BASE=${SLURM_CI_BASE:-/tmp/day0-cluster}
CI_USER=${SLURM_CI_USER:-slurmci}
export SLURM_CONF=$BASE/etc/slurm.conf
say() { echo "[stop-cluster] $*"; }
# running = exists and not a zombie (some container inits reap orphans only every ~2 s)
running() { [ -r "/proc/$1/stat" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }

ONLY=${SLURM_CI_ONLY:-}
wanted() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }

stop() {  # stop <expected comm> <pidfile>
  local name=$1 pf=$2 pid
  [ -s "$pf" ] || { say "$name: no pidfile"; return 0; }
  wanted "$name" || { say "$name: left running (not in SLURM_CI_ONLY)"; return 0; }
  pid=$(cat "$pf")
  if running "$pid" && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$name" ]; then
    kill "$pid"
    for _ in $(seq 40); do running "$pid" || break; sleep 0.25; done
    if running "$pid"; then say "$name ($pid) ignored SIGTERM, SIGKILL"; kill -9 "$pid"; fi
    say "$name ($pid) stopped"
  else
    say "$name: pid $pid not running (stale pidfile)"
  fi
  rm -f "$pf"
}

# cancel remaining jobs through Slurm itself so slurmstepd/job processes end cleanly
if wanted slurmctld && [ -s "$BASE/run/slurmctld.pid" ] && running "$(cat "$BASE/run/slurmctld.pid")"; then
  jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// }" ]; then
    say "cancelling jobs: $jobs"; scancel $jobs
    for _ in $(seq 40); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.25; done
  fi
fi

stop sshd      "$BASE/run/sshd.pid"
stop slurmd    "$BASE/run/slurmd.pid"
stop slurmctld "$BASE/run/slurmctld.pid"
stop slurmdbd  "$BASE/run/slurmdbd.pid"
stop mariadbd  "$BASE/db/run/mariadbd.pid"
stop munged    "$BASE/munge/run/munged.pid"

if [ "${1:-}" = --purge ]; then
  if [ -s "$BASE/granted" ]; then   # ACLs start-cluster.sh added for SLURM_CI_PYTHON
    sort -u "$BASE/granted" | while read -r d; do setfacl -x "u:$CI_USER" "$d" 2>/dev/null && say "ACL removed: $d"; done
  fi
  id "$CI_USER" >/dev/null 2>&1 && userdel "$CI_USER" && say "user $CI_USER removed"
  rm -rf "$BASE" && say "$BASE removed"
fi
exit 0
