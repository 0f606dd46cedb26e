#!/usr/bin/env bash
# A throw-away one-node SLURM cluster on localhost, so CI submits jobs/*.sbatch to a real
# slurmctld + slurmd instead of trusting scripts nobody runs.
#
#   bash scripts/local-slurm.sh start      install slurm-wlm + munge from Debian if missing, write a
#                                          config, start munged, slurmctld, slurmd; wait for the node
#   bash scripts/local-slurm.sh stop       cancel our jobs, stop only the daemons this script started
#   bash scripts/local-slurm.sh status     what runs, sinfo, squeue
#   bash scripts/local-slurm.sh running    exit 0 when both daemons of this cluster are alive
#   bash scripts/local-slurm.sh wait       wait until the node takes jobs (stops nothing if it never does)
#   bash scripts/local-slurm.sh selftest   a 2-task srun job must see ranks 0 and 1 of 2
#   eval "$(bash scripts/local-slurm.sh env)"   SLURM_CONF for this shell
#
# start is idempotent (a second start finds the daemons alive and only waits for the node);
# stop ends what our pid files name and nothing else, so a munged that was running before
# is left alone. Needs root (Debian 12 / slurm 22.05 measured: cgroups unusable in
# containers, hence proctrack/linuxproc and task/none).
#
# Knobs (environment):
#   MPICONVNET_SLURM_DIR=/tmp/mpiconvnet-slurm   config, state, spool, logs and pid files
#   MPICONVNET_SLURM_MPI=pmi2                    srun's default --mpi (pmi2: MPICH, pmix: Open MPI)
#   MPICONVNET_SLURM_PORTS=6817,6818             slurmctld and slurmd ports
set -euo pipefail

SLURM_DIR=${MPICONVNET_SLURM_DIR:-/tmp/mpiconvnet-slurm}
MPI_DEFAULT=${MPICONVNET_SLURM_MPI:-pmi2}
PORTS=${MPICONVNET_SLURM_PORTS:-6817,6818}
CTLD_PORT=${PORTS%,*}
SLURMD_PORT=${PORTS#*,}
CONF=$SLURM_DIR/etc/slurm.conf
RUN=$SLURM_DIR/run
LOG=$SLURM_DIR/log
NODE=localhost
PARTITION=debug
export SLURM_CONF=$CONF

say() { echo "local-slurm: $*" >&2; }
die() { say "error: $*"; exit 1; }

# true when pid file $1 names a live process whose command name is $2; the name check
# keeps a recycled pid from being taken (and later killed) as ours
ours_alive() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

install_packages() {
  local need=()
  command -v slurmctld >/dev/null || need+=(slurmctld)
  command -v slurmd >/dev/null || need+=(slurmd)
  command -v sbatch >/dev/null || need+=(slurm-client)
  command -v munged >/dev/null || need+=(munge)
  # srun --mpi=pmix (Open MPI) needs the PMIx library; pmi2 (MPICH) is built into slurm
  if command -v dpkg >/dev/null && ! dpkg -s libpmix2 >/dev/null 2>&1; then need+=(libpmix2); fi
  if [ ${#need[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || die "missing ${need[*]} and no apt-get; install SLURM and munge by hand"
    say "apt-get install ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
  # Debian's mpi_pmix plugin dlopen()s .../pmix2/lib/libpmix.so, which only the -dev
  # package (with ~15 MB of autotools) ships; a symlink to the runtime library suffices
  local so
  so=$(dpkg -L libpmix2 2>/dev/null | grep '/pmix2/lib/libpmix\.so\.2$' | head -1 || true)
  if [ -n "$so" ] && [ ! -e "${so%.2}" ]; then ln -s libpmix.so.2 "${so%.2}"; fi
}

write_config() {
  mkdir -p "$SLURM_DIR/etc" "$SLURM_DIR/state" "$SLURM_DIR/spool" "$RUN" "$LOG"
  # declare exactly the hardware slurmd detects: more drains the node, less wastes cores
  local detected hw mem
  detected=$(slurmd -C | head -1)
  hw=$(tr ' ' '\n' <<<"$detected" | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ')
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$detected")
  mem=$((mem * 9 / 10))   # headroom: memory seen at run time varies and slurm drains on a shortfall
  # Job ids must not repeat across restarts: MPICH names its shared-memory segment after the
  # PMI job id (JOBID.STEP), and a segment left in /dev/shm by a killed rank of an earlier
  # cluster's job 1 makes the next job 1 fail in MPI_Init ("UCX ERROR failed to unpack
  # address") or hang. Starting from the clock keeps ids fresh and below MaxJobId (67 M).
  local first_job_id=$(( $(date +%s) % 50000000 + 1000 ))
  cat >"$CONF" <<EOF
# written by scripts/local-slurm.sh (mpiconvnet CI); deleted state on every start
ClusterName=mpiconvnet-ci
SlurmctldHost=$NODE
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# reject at submission what the node can never run (-N2, --gres=gpu) instead of pending forever
EnforcePartLimits=ALL
# containers have no usable cgroups
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# look at the queue every 2 s (default 60 s), so a requeued job starts as soon as it may
SchedulerParameters=sched_interval=2,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=$MPI_DEFAULT
ReturnToService=2
SlurmdTimeout=300
InactiveLimit=0
# finished jobs stay visible to scontrol for 5 minutes, long enough for tests to read them
MinJobAge=300
# a requeued job waits the credential lifetime (default 120 s) before it may start again;
# 10 s keeps the requeue tests short
AuthInfo=cred_expire=10
KillWait=10
Waittime=0
JobRequeue=1
FirstJobId=$first_job_id
NodeName=$NODE NodeHostname=$NODE NodeAddr=127.0.0.1 ${hw}RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  # PMIx from pip's Open MPI has no munge security component: use native and stay quiet
  echo "PMIxEnv=PMIX_SECURITY_MODE=native" >"$SLURM_DIR/etc/mpi.conf"
  # No /etc/slurm/slurm.conf: it would make this cluster every shell's default, so that a
  # test run in another checkout (which should skip its SLURM tests) submitted to it, and our
  # stop cancelled that run's jobs. Commands inside jobs (srun, scontrol requeue) need none:
  # slurmd puts SLURM_CONF=$CONF into every job's environment; outside jobs, use
  # eval "$(bash scripts/local-slurm.sh env)".
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  if munge_works; then
    ours_alive "$RUN/munged.pid" munged || say "munged already running (not started here, will not stop it)"
    return 0
  fi
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null ||
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
  chmod 700 /etc/munge
  chmod 400 /etc/munge/munge.key
  chmod 755 /run/munge
  # munged refuses root ("PRNG seed dir is insecure"), so it runs as its own user
  runuser -u munge -- /usr/sbin/munged
  local i
  for i in $(seq 50); do munge_works && break; sleep 0.2; done
  munge_works || die "munged does not answer; see /var/log/munge/munged.log"
  cp /run/munge/munged.pid "$RUN/munged.pid"
  say "munged pid $(cat "$RUN/munged.pid")"
}

wait_for_node() {
  local state="" deadline=$((SECONDS + 60))
  while [ $SECONDS -lt $deadline ]; do
    ours_alive "$RUN/slurmctld.pid" slurmctld || { tail -n 5 "$LOG/slurmctld.log" >&2; die "slurmctld died; see $LOG/slurmctld.log"; }
    ours_alive "$RUN/slurmd.pid" slurmd || { tail -n 5 "$LOG/slurmd.log" >&2; die "slurmd died; see $LOG/slurmd.log"; }
    state=$(timeout 5 sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
    case "$state" in
      idle* | mixed* | allocated*) say "node $NODE is $state (partition $PARTITION, $(timeout 5 sinfo -h -n "$NODE" -o %c) CPUs)"; return 0 ;;
      down* | drain*) timeout 5 scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
    esac
    sleep 1
  done
  tail -n 20 "$LOG/slurmctld.log" "$LOG/slurmd.log" >&2 || true
  die "node $NODE not idle after 60 s (state '${state:-unknown}'); see $LOG/"
}

port_taken() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }

start() {
  [ "$(id -u)" = 0 ] || die "start needs root (it installs packages and runs the daemons as root)"
  mkdir -p "$RUN" "$LOG"
  # a half-started cluster is worse than none: undo whatever this call started
  trap 'code=$?; if [ $code -ne 0 ]; then say "start failed (exit $code), stopping what it started"; stop; fi' EXIT
  install_packages
  start_munge
  if ours_alive "$RUN/slurmctld.pid" slurmctld && ours_alive "$RUN/slurmd.pid" slurmd; then
    say "already running"
    wait_for_node
    trap - EXIT
    return 0
  fi
  stop_slurm   # one daemon alive without the other: start both afresh
  for port in "$CTLD_PORT" "$SLURMD_PORT"; do
    port_taken "$port" && die "port $port is in use by another program (another SLURM?); set MPICONVNET_SLURM_PORTS=7817,7818"
  done
  write_config
  rm -rf "${SLURM_DIR:?}/state"/* "${SLURM_DIR:?}/spool"/*   # no jobs left over from an earlier cluster
  slurmctld -f "$CONF" || die "slurmctld did not start; see $LOG/slurmctld.log"
  slurmd -f "$CONF" -N "$NODE" || die "slurmd did not start; see $LOG/slurmd.log"
  local i
  for i in $(seq 50); do [ -s "$RUN/slurmctld.pid" ] && [ -s "$RUN/slurmd.pid" ] && break; sleep 0.2; done
  say "slurmctld pid $(cat "$RUN/slurmctld.pid" 2>/dev/null), slurmd pid $(cat "$RUN/slurmd.pid" 2>/dev/null), config $CONF"
  wait_for_node
  trap - EXIT
}

# stop the process named by pid file $1 (command name $2): TERM, up to 20 s, then KILL
stop_process() {
  if ! ours_alive "$1" "$2"; then rm -f "$1"; return 0; fi
  local pid i
  pid=$(cat "$1")
  kill "$pid"
  for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then say "$2 ($pid) ignored SIGTERM; SIGKILL"; kill -9 "$pid"; fi
  rm -f "$1"
  say "stopped $2 ($pid)"
}

stop_slurm() {
  if ours_alive "$RUN/slurmctld.pid" slurmctld; then
    # jobs first, so no slurmstepd or rank outlives the daemons
    local jobs
    jobs=$(timeout 10 squeue -h -o %i 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086
      timeout 10 scancel --full --quiet $jobs 2>/dev/null || true
      local deadline=$((SECONDS + 30))
      while [ $SECONDS -lt $deadline ] && [ -n "$(timeout 5 squeue -h 2>/dev/null)" ]; do sleep 1; done
    fi
  fi
  kill_leftover_steps
  stop_process "$RUN/slurmd.pid" slurmd
  stop_process "$RUN/slurmctld.pid" slurmctld
}

# kill process $1 and everything below it, children first
kill_tree() {
  local child
  for child in $(pgrep -P "$1" 2>/dev/null); do kill_tree "$child"; done
  kill -9 "$1" 2>/dev/null || true
}

# Jobs that outlived the cancel (ignoring TERM, or requeued again) would be orphaned by
# stopping slurmd. Ours are the slurmstepd processes holding a file under SLURM_DIR (the
# slurmd log, the step sockets in the spool); a site's own slurmstepd never does.
kill_leftover_steps() {
  local pid
  for pid in $(pgrep -x slurmstepd 2>/dev/null); do
    if ls -l "/proc/$pid/fd" 2>/dev/null | grep -q -- "-> $SLURM_DIR/"; then
      say "job step process $pid outlived the cancel; killing it and its tasks"
      kill_tree "$pid"
    fi
  done
}

stop() {
  stop_slurm
  stop_process "$RUN/munged.pid" munged   # a no-op unless this script started it
  # the link that versions before 2026-11-25 made
  if [ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$CONF" ]; then rm -f /etc/slurm/slurm.conf; fi
  return 0
}

status() {
  local name
  for name in munged slurmctld slurmd; do
    if ours_alive "$RUN/$name.pid" "$name"; then echo "$name: running (pid $(cat "$RUN/$name.pid"))"
    else echo "$name: not running (from this script)"; fi
  done
  timeout 5 sinfo 2>/dev/null || true
  timeout 5 squeue 2>/dev/null || true
}

selftest() {
  local out=$SLURM_DIR/selftest.out id state
  rm -f "$out"
  id=$(sbatch --parsable -n2 -t 1 -o "$out" --wrap 'srun bash -c "echo task \$SLURM_PROCID of \$SLURM_NTASKS"')
  for _ in $(seq 60); do
    state=$(scontrol show job "$id" 2>/dev/null | grep -o 'JobState=[A-Z]*' | cut -d= -f2)
    case "$state" in PENDING | CONFIGURING | RUNNING | COMPLETING) sleep 1 ;; *) break ;; esac
  done
  cat "$out" 2>/dev/null || true
  [ "$state" = COMPLETED ] && grep -q 'task 0 of 2' "$out" && grep -q 'task 1 of 2' "$out" ||
    die "selftest job $id ended $state without ranks 0 and 1 of 2; see $out and $LOG/"
  say "selftest ok (job $id)"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  status) status ;;
  running) ours_alive "$RUN/slurmctld.pid" slurmctld && ours_alive "$RUN/slurmd.pid" slurmd ;;
  wait) wait_for_node ;;
  selftest) selftest ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: bash scripts/local-slurm.sh start|stop|restart|status|running|wait|selftest|env" >&2; exit 2 ;;
esac
