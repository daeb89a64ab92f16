#!/usr/bin/env bash
# A real one-node SLURM cluster on localhost, for trying launch/merge.sbatch and for the test.
#   launch/slurm_local_cluster.sh start DIR   # writes DIR/slurm.conf, starts slurmctld + slurmd, waits for idle
#   launch/slurm_local_cluster.sh stop DIR    # stops both daemons by their saved PIDs
# Then: export SLURM_CONF=DIR/slurm.conf; sbatch ...
# Needs Debian's slurm-wlm (apt-get install -y slurm-wlm) and root: no systemd, no cgroups, no
# munge (auth/none: only for a sandbox). Facts behind each setting: ../shared/notes/slurm.md.
set -euo pipefail
cmd=${1:?start|stop}
dir=$(realpath -m "${2:?state directory}")

if [ "$cmd" = stop ]; then
  for daemon in slurmd slurmctld; do
    if [ -f "$dir/$daemon.pid" ]; then
      kill "$(cat "$dir/$daemon.pid")" 2>/dev/null || true
    fi
  done
  for daemon in slurmd slurmctld; do  # wait so the ports are free for the next cluster
    pid=$(cat "$dir/$daemon.pid" 2>/dev/null || echo)
    for _ in $(seq 50); do
      [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
  done
  exit 0
fi

for tool in slurmctld slurmd sbatch scontrol sinfo; do
  command -v "$tool" >/dev/null || { echo "slurm_local_cluster: $tool not found; install it with: apt-get install -y slurm-wlm" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "slurm_local_cluster: the daemons run as root here (SlurmUser=root); run as root" >&2; exit 1; }

mkdir -p "$dir/state" "$dir/spool" "$dir/log"
cpus=$(nproc)
mem=$(( $(free -m | awk '/^Mem:/ {print $2}') - 1024 ))
ctld_port=${SLURMCTLD_PORT:-16817}
slurmd_port=${SLURMD_PORT:-16818}
cat > "$dir/slurm.conf" <<CONF
ClusterName=distmerge-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid.slurm
SlurmdPidFile=$dir/slurmd.pid.slurm
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=batch_sched_delay=0
MailProg=/bin/true
ReturnToService=2
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$dir/slurm.conf
slurmctld -D -i -f "$SLURM_CONF" > "$dir/log/slurmctld.out" 2>&1 &
echo $! > "$dir/slurmctld.pid"
slurmd -D -N localhost -f "$SLURM_CONF" > "$dir/log/slurmd.out" 2>&1 &
echo $! > "$dir/slurmd.pid"
for _ in $(seq 100); do
  state=$(sinfo -h -o %T 2>/dev/null || true)
  if [ "$state" = idle ]; then
    echo "slurm_local_cluster: up, export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 0.2
done
echo "slurm_local_cluster: the node did not become idle (state: '${state:-none}'); logs:" >&2
tail -n 20 "$dir/log/"*.log "$dir/log/"*.out >&2 || true
"$0" stop "$dir"
exit 1
