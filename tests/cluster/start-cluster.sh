#!/usr/bin/env bash
# Throwaway single-node SLURM cluster + sshd on loopback for pytest-day0's remote-executor tests.
# Debian 12 (apt), run as root. Idempotent: installs missing packages, (re)writes configs, starts only
# daemons that are not running, and ends with a real job submitted over ssh. `.ci/run` calls it before
# the test suite; tests find it through $BASE/cluster.env (tests/test_slurm_executor.py).
# Adapted from a measured recipe: ~12 s from nothing to a finished job, ~1 s when already installed.
# SLURM_CI_STARTED=FILE: append the name of each daemon this run starts to FILE, so the caller can stop exactly
# those (.ci/run, and the test suite's own start in tests/cluster/loopback.py, which also sets SLURM_CI_BY_TESTS=1).
# Any other start (a person, .ci/run) makes the cluster the caller's: the record that a test session started it
# is dropped, so no test session stops it.
set -euo pipefail
umask 022

BASE=${SLURM_CI_BASE:-/tmp/day0-cluster}
SSH_PORT=${SLURM_CI_SSH_PORT:-2222}
CTLD_PORT=${SLURM_CI_CTLD_PORT:-6817}
SLURMD_PORT=${SLURM_CI_SLURMD_PORT:-6818}
CI_USER=${SLURM_CI_USER:-slurmci}
ACCT=${SLURM_CI_ACCOUNTING:-0}      # 1 = add slurmdbd + MariaDB (127.0.0.1:3307) so plain `sacct` works
NODE=localhost                      # node name independent of `hostname`
ETC=$BASE/etc RUN=$BASE/run LOG=$BASE/log SPOOL=$BASE/spool MUNGE=$BASE/munge SSHD=$BASE/ssh DB=$BASE/db
MSOCK=$MUNGE/run/munge.socket.2 DBSOCK=$BASE/db/run/mysqld.sock
export SLURM_CONF=$ETC/slurm.conf

say()     { echo "[start-cluster] $*"; }
started() { say "started $1"; if [ -n "${SLURM_CI_STARTED:-}" ]; then echo "$1" >> "$SLURM_CI_STARTED"; fi; }
alive()   { [ -s "$1" ] && [ -r "/proc/$(cat "$1")/stat" ] && [ "$(awk '{print $3}' "/proc/$(cat "$1")/stat")" != Z ]; }  # zombie = dead
waitfor() { local n=$1; shift; for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done; return 1; }

[ "$(id -u)" = 0 ] || { echo "must run as root" >&2; exit 1; }
if [ "${SLURM_CI_BY_TESTS:-0}" != 1 ]; then rm -f "$BASE/started-by-tests"; fi   # started (or adopted) by hand

# ---- 1. packages (postinst must not start system services, e.g. sshd on :22)
PKGS="munge slurmctld slurmd slurm-client openssh-server acl"
if [ "$ACCT" = 1 ]; then PKGS="$PKGS slurmdbd mariadb-server"; fi
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
  say "installing:$missing"
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; own_policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
  if [ "$own_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
fi

# ---- 2. dirs, test user, keys
install -d -m 755 "$BASE" "$ETC" "$RUN" "$LOG" "$SPOOL" "$SPOOL/ctld" "$SPOOL/d" "$SSHD" "$BASE/home"
install -d -o munge -g munge -m 755 "$MUNGE" "$MUNGE/run"          # clients need x on the socket dir
install -d -o munge -g munge -m 700 "$MUNGE/etc" "$MUNGE/lib" "$MUNGE/log"
[ -s "$MUNGE/etc/munge.key" ] || runuser -u munge -- mungekey --create --keyfile="$MUNGE/etc/munge.key"

id "$CI_USER" >/dev/null 2>&1 || useradd -M -U -d "$BASE/home/$CI_USER" -s /bin/bash "$CI_USER"
usermod -p '*' "$CI_USER"     # useradd leaves '!' (locked): sshd with UsePAM=no rejects locked accounts
CI_HOME=$(getent passwd "$CI_USER" | cut -d: -f6)
install -d -o "$CI_USER" -g "$CI_USER" -m 755 "$CI_HOME"
install -d -o "$CI_USER" -g "$CI_USER" -m 700 "$CI_HOME/.ssh"
[ -s "$SSHD/ssh_host_ed25519_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$SSHD/ssh_host_ed25519_key"
[ -s "$SSHD/client_key" ] || ssh-keygen -q -t ed25519 -N '' -C slurm-ci -f "$SSHD/client_key"
install -o "$CI_USER" -g "$CI_USER" -m 600 "$SSHD/client_key.pub" "$CI_HOME/.ssh/authorized_keys"
echo "[127.0.0.1]:$SSH_PORT $(cut -d' ' -f1,2 "$SSHD/ssh_host_ed25519_key.pub")" > "$SSHD/known_hosts"

# The "cluster" is this machine, so jobs run the pytest host's own interpreter (SLURM_CI_PYTHON, e.g. .ci/run's
# .venv python). The test user needs to traverse every directory on its way (pyenv under a 0700 /root is
# common): grant exactly that, search (x) only, by ACL, and say so. --purge in stop-cluster.sh removes it.
grant_traverse() {  # grant_traverse PATH...: x for $CI_USER on each ancestor it cannot traverse
  local p d
  for p in "$@"; do
    d=""
    for part in $(echo "${p#/}" | tr / ' '); do   # top-down: a child is only judged once its parent is open
      d="$d/$part"
      if [ -d "$d" ] && ! runuser -u "$CI_USER" -- test -x "$d"; then
        setfacl -m "u:$CI_USER:x" "$d" && echo "$d" >> "$BASE/granted" && say "granted $CI_USER search (x) on $d (ACL)"
      fi
    done
  done
}
if [ -n "${SLURM_CI_PYTHON:-}" ]; then
  mapfile -t py_paths < <("$SLURM_CI_PYTHON" -c 'import os, sys
print(os.path.realpath(sys.executable)); print(sys.prefix); print(sys.base_prefix)
import importlib.util as u; s = u.find_spec("pytest_day0"); print(os.path.dirname(os.path.dirname(s.origin)) if s and s.origin else sys.prefix)')
  grant_traverse "${py_paths[@]}"
  runuser -u "$CI_USER" -- "$SLURM_CI_PYTHON" -c 'import pytest_day0' \
    || { say "$CI_USER cannot run $SLURM_CI_PYTHON -c 'import pytest_day0'"; exit 1; }
fi

# ---- 3. configs (always rewritten)
# Declare at least 8 CPUs (config_overrides: slurmd accepts more than it has) so that a PTQ job and two
# serving jobs of concurrent test sessions run side by side instead of queueing on a 2-core CI box.
CPUS=$(nproc); [ "$CPUS" -ge "${SLURM_CI_CPUS:-8}" ] || CPUS=${SLURM_CI_CPUS:-8}
cat > "$SLURM_CONF" <<EOF
ClusterName=ci
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MSOCK
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.txt
ReturnToService=2
MinJobAge=600
InactiveLimit=0
KillWait=5
SlurmctldTimeout=30
SlurmdTimeout=30
SlurmdParameters=config_overrides
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
if [ "$ACCT" = 1 ]; then
  # AccountingStoragePass = munge socket for the slurmdbd connection (AuthInfo is NOT used there)
  printf '%s\n' AccountingStorageType=accounting_storage/slurmdbd AccountingStorageHost=localhost \
    AccountingStoragePort=6819 "AccountingStoragePass=$MSOCK" >> "$SLURM_CONF"
  cat > "$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MSOCK
DbdHost=localhost
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3307
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
EOF
  chmod 600 "$ETC/slurmdbd.conf"
else
  echo AccountingStorageType=accounting_storage/none >> "$SLURM_CONF"
fi
# `sacct -c` (jobcomp/filetxt) opens this file O_WRONLY|O_APPEND in the *client*, and
# slurmctld / root's sacct fchmod it back to 0644 -> the submitting user must own it.
touch "$LOG/jobcomp.txt"; chown "$CI_USER:$CI_USER" "$LOG/jobcomp.txt"

cat > "$SSHD/sshd_config" <<EOF
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $SSHD/ssh_host_ed25519_key
PidFile $RUN/sshd.pid
AllowUsers $CI_USER
AuthorizedKeysFile .ssh/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin no
MaxSessions 50
MaxStartups 50:30:100
Subsystem sftp internal-sftp
SetEnv SLURM_CONF=$SLURM_CONF
EOF

# ---- 4. daemons: munged -> [mariadbd -> slurmdbd] -> slurmctld -> slurmd -> sshd
if ! alive "$MUNGE/run/munged.pid"; then
  rm -f "$MSOCK" "$MSOCK.lock"
  runuser -u munge -- /usr/sbin/munged --socket="$MSOCK" --key-file="$MUNGE/etc/munge.key" \
    --pid-file="$MUNGE/run/munged.pid" --seed-file="$MUNGE/lib/munged.seed" --log-file="$MUNGE/log/munged.log"
  started munged
fi
waitfor 20 sh -c "munge -n -S '$MSOCK' | unmunge -S '$MSOCK'" || { say "munged not working"; exit 1; }

if [ "$ACCT" = 1 ]; then
  install -d -o mysql -g mysql -m 750 "$DB" "$DB/data" "$DB/run"
  [ -d "$DB/data/mysql" ] || mariadb-install-db --no-defaults --user=mysql --datadir="$DB/data" \
      --skip-test-db --auth-root-authentication-method=socket > "$DB/install.log" 2>&1
  alive "$DB/run/mariadbd.pid" || { setsid -f /usr/sbin/mariadbd --no-defaults --user=mysql \
      --datadir="$DB/data" --socket="$DBSOCK" --port=3307 --bind-address=127.0.0.1 \
      --pid-file="$DB/run/mariadbd.pid" --log-error="$DB/mariadbd.log" </dev/null >/dev/null 2>&1; started mariadbd; }
  waitfor 60 mariadb --no-defaults --socket="$DBSOCK" -uroot -e 'select 1' || { say "mariadbd failed: $DB/mariadbd.log"; exit 1; }
  mariadb --no-defaults --socket="$DBSOCK" -uroot -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1'
      IDENTIFIED BY 'slurmpw'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
  alive "$RUN/slurmdbd.pid" || { /usr/sbin/slurmdbd; started slurmdbd; }   # reads slurmdbd.conf next to $SLURM_CONF
  waitfor 60 sacctmgr -n list cluster || { say "slurmdbd not up, see $LOG/slurmdbd.log"; exit 1; }
fi

alive "$RUN/slurmctld.pid" || { /usr/sbin/slurmctld; started slurmctld; }
waitfor 40 scontrol ping || { say "slurmctld not up, see $LOG/slurmctld.log"; exit 1; }
alive "$RUN/slurmd.pid" || { /usr/sbin/slurmd -N "$NODE"; started slurmd; }

node_idle() { sinfo -h -n "$NODE" -o %t | grep -Eqx "idle|mix|alloc"; }   # up (busy is fine on a re-run)
if ! waitfor 40 node_idle; then
  scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true   # e.g. drained after an unclean stop
  waitfor 20 node_idle || { sinfo -R; say "node not idle, see $LOG/slurmd.log"; exit 1; }
fi

install -d -m 755 /run/sshd                   # privsep dir; normally created by systemd
/usr/sbin/sshd -t -f "$SSHD/sshd_config"
alive "$RUN/sshd.pid" || { /usr/sbin/sshd -f "$SSHD/sshd_config" -E "$LOG/sshd.log"; started sshd; }   # absolute path required
SSH=(ssh -p "$SSH_PORT" -i "$SSHD/client_key" -o BatchMode=yes -o IdentitiesOnly=yes
     -o UserKnownHostsFile="$SSHD/known_hosts" -o StrictHostKeyChecking=yes "$CI_USER@127.0.0.1")
waitfor 20 "${SSH[@]}" 'sinfo -h -o %t | grep -Eqx "idle|mix|alloc"' || { say "ssh check failed, see $LOG/sshd.log"; exit 1; }
# end-to-end proof: a job submitted over ssh runs and completes
jid=$("${SSH[@]}" 'sbatch --parsable -o /dev/null --wrap true') || { say "sbatch over ssh failed"; exit 1; }
done_ok() { [ "$("${SSH[@]}" "scontrol show job ${jid%%;*} -o" | grep -o 'JobState=[A-Z_]*')" = JobState=COMPLETED ]; }
waitfor 60 done_ok || { say "probe job ${jid%%;*} did not complete, see $LOG/slurmd.log"; exit 1; }

cat > "$BASE/cluster.env" <<EOF
export SLURM_CI_BASE=$BASE
export SLURM_CONF=$SLURM_CONF
export SLURM_SSH_HOST=127.0.0.1
export SLURM_SSH_PORT=$SSH_PORT
export SLURM_SSH_USER=$CI_USER
export SLURM_SSH_KEY=$SSHD/client_key
export SLURM_SSH_KNOWN_HOSTS=$SSHD/known_hosts
export SLURM_SSH_HOME=$CI_HOME
EOF
say "cluster up: node '$NODE' idle, partition 'debug', $CPUS CPUs, accounting=$([ "$ACCT" = 1 ] && echo slurmdbd || echo none)"
say "ssh: ${SSH[*]}"
say "env: source $BASE/cluster.env   (logs: $LOG)"
