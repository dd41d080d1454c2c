#!/usr/bin/env bash
# A one-node SLURM cluster on localhost, with accounting (slurmdbd + MariaDB), for clipse's
# SLURM tests and for trying the SLURM executor on a laptop.
#
#   scripts/slurm_cluster.sh install   # apt packages: slurm-wlm munge slurmdbd mariadb-server
#   scripts/slurm_cluster.sh up        # start munged, mariadbd, slurmdbd, slurmctld, slurmd
#   export SLURM_CONF=$(scripts/slurm_cluster.sh conf)   # so sbatch/squeue/sacct find it
#   scripts/slurm_cluster.sh down      # stop exactly the processes `up` started
#
# Everything lives under $CLIPSE_SLURM_DIR (default /tmp/clipse-slurm), wiped by `up`; job ids
# restart at 1 after each `up`. Ports 16817-16819 (SLURM) and 16820 (MariaDB) on 127.0.0.1.
# The node advertises one fake GPU (gres gpu:1 backed by /dev/null) for --gpus-per-node tests.
# Needs root (slurmd runs jobs as their user; munged and mariadbd run as their own users).
set -euo pipefail

DIR=${CLIPSE_SLURM_DIR:-/tmp/clipse-slurm}
trap 'echo "slurm_cluster: failed at line $LINENO ($BASH_COMMAND); logs in $DIR/log" >&2' ERR
NODE=$(hostname -s)
DB_PORT=16820
DB_PASS=clipse-test

conf() { echo "$DIR/etc/slurm.conf"; }

install_packages() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge slurmdbd mariadb-server >/dev/null
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local seconds=$1 what=$2; shift 2
  for _ in $(seq $((seconds * 10))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "slurm_cluster: $what did not come up; logs in $DIR/log" >&2
  return 1
}

write_configs() {
  local cpus mem
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))
  cat >"$DIR/etc/slurm.conf" <<EOF
ClusterName=clipse
SlurmctldHost=$NODE
SlurmUser=root
SlurmctldPort=16817
SlurmdPort=16818
AuthType=auth/munge
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/d
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
KillWait=5
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
MinJobAge=300
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=16819
GresTypes=gpu
NodeName=$NODE CPUs=$cpus RealMemory=$mem Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  echo "NodeName=$NODE Name=gpu File=/dev/null" >"$DIR/etc/gres.conf"
  cat >"$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=16819
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$DIR/etc/slurmdbd.conf"
}

up() {
  down quiet || true
  rm -rf "$DIR"
  mkdir -p "$DIR"/{etc,run,log,spool/ctld,spool/d,munge,mysql}
  chmod 755 "$DIR" "$DIR/run" "$DIR/log"
  write_configs
  export SLURM_CONF="$DIR/etc/slurm.conf"

  # munge at its default socket (every SLURM client looks there); a munged that already
  # answers is used as it is, otherwise one is started here as user munge
  if ! (munge -n | unmunge) >/dev/null 2>&1; then
    mkdir -p /run/munge "$DIR/munge"
    chown munge:munge /run/munge "$DIR/munge"
    chmod 755 /run/munge
    runuser -u munge -- munged --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
      --seed-file="$DIR/munge/munged.seed"
    wait_for 10 munged sh -c "munge -n | unmunge"
    cp "$DIR/munge/munged.pid" "$DIR/run/munged.pid"
  fi

  # MariaDB for slurmdbd, on its own port and data folder
  chown mysql:mysql "$DIR/mysql"
  mariadb-install-db --user=mysql --datadir="$DIR/mysql/data" --auth-root-authentication-method=normal \
    >"$DIR/log/mariadb-install.log" 2>&1
  cat >"$DIR/mysql/init.sql" <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
  chown mysql:mysql "$DIR/mysql/init.sql"
  (setsid mariadbd --user=mysql --datadir="$DIR/mysql/data" --port=$DB_PORT --bind-address=127.0.0.1 \
    --socket="$DIR/mysql/mysqld.sock" --pid-file="$DIR/mysql/mariadbd.pid" --init-file="$DIR/mysql/init.sql" \
    --innodb-buffer-pool-size=64M --log-error="$DIR/mysql/mariadbd.log" >/dev/null 2>&1 &)
  wait_for 60 mariadbd test -s "$DIR/mysql/mariadbd.pid"
  wait_for 60 mariadbd test -S "$DIR/mysql/mysqld.sock"
  cp "$DIR/mysql/mariadbd.pid" "$DIR/run/mariadbd.pid"

  slurmdbd >>"$DIR/log/slurmdbd.out" 2>&1  # reads slurmdbd.conf next to $SLURM_CONF
  wait_for 60 slurmdbd timeout 5 sacctmgr -i list cluster
  timeout 20 sacctmgr -i add cluster clipse >/dev/null 2>&1 || true
  slurmctld -f "$SLURM_CONF" >>"$DIR/log/slurmctld.out" 2>&1
  wait_for 60 slurmctld scontrol ping
  slurmd -f "$SLURM_CONF" >>"$DIR/log/slurmd.out" 2>&1
  wait_for 60 "node $NODE" sh -c "sinfo -h -N -o %T | grep -qE '^(idle|mixed|allocated)'"
  echo "SLURM up: SLURM_CONF=$SLURM_CONF" >&2
}

down() {
  local pidfile pid
  for name in slurmd slurmctld slurmdbd mariadbd munged; do
    pidfile="$DIR/run/$name.pid"
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
  done
  [ "${1:-}" = quiet ] || echo "SLURM down" >&2
}

case "${1:-}" in
  install) install_packages ;;
  up) up ;;
  down) down ;;
  conf) conf ;;
  *) echo "usage: $0 install|up|down|conf" >&2; exit 2 ;;
esac
