"""A real one-node SLURM cluster on this machine, for tests: Debian's slurm-wlm and munge, daemons started by
hand (no systemd, no accounting), stopped by PID afterwards. Needs root (it writes /etc/slurm/slurm.conf, the
only place srun inside jobs reads)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SLURM_CONF = Path("/etc/slurm/slurm.conf")


def missing_reason() -> str | None:
    for tool in ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo"):
        if shutil.which(tool) is None:
            return f"{tool} not found: install Debian's slurm-wlm and munge (.ci/run does)"
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd/munged needs root"
    return None


def _conf(state: Path, cpus: int, mem_mb: int) -> str:
    host = socket.gethostname()
    return f"""ClusterName=traitmon-test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=600
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmdSpoolDir={state}/slurmd
StateSaveLocation={state}/slurmctld
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd.log
GresTypes=gpu
NodeName={host} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def slurm_cluster(state: Path, cpus: int | None = None, mem_mb: int = 12000):
    """Start munged, slurmctld and slurmd; yield the partition name; stop every daemon started, by PID."""
    state.mkdir(parents=True, exist_ok=True)
    (state / "slurmd").mkdir(exist_ok=True)
    (state / "slurmctld").mkdir(exist_ok=True)
    SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
    previous = SLURM_CONF.read_text() if SLURM_CONF.exists() else None
    SLURM_CONF.write_text(_conf(state, cpus or os.cpu_count() or 2, mem_mb))
    started: list[int] = []
    try:
        run_dir = Path("/run/munge")
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(run_dir, "munge", "munge")
        munge_pid = run_dir / "munged.pid"  # munged runs as user munge: it cannot write into root's tmp dirs
        munge_pid.unlink(missing_ok=True)
        subprocess.run(["runuser", "-u", "munge", "--", "munged", "--force", f"--pid-file={munge_pid}"], check=True,
                       capture_output=True)
        started.append(_wait_pid(munge_pid))
        subprocess.run(["slurmctld"], check=True, capture_output=True)
        started.append(_wait_pid(state / "slurmctld.pid"))
        subprocess.run(["slurmd"], check=True, capture_output=True)
        started.append(_wait_pid(state / "slurmd.pid"))
        _wait_idle()
        yield "debug"
    finally:
        for pid in reversed(started):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in started:
            for _ in range(50):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
        if previous is None:
            SLURM_CONF.unlink(missing_ok=True)
        else:
            SLURM_CONF.write_text(previous)


def _wait_pid(path: Path, timeout: float = 20) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        pid = _pid(path)
        if pid:
            return pid
        time.sleep(0.1)
    raise RuntimeError(f"daemon did not write {path}")


def _wait_idle(timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    out = ""
    while time.monotonic() < end:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], check=False, capture_output=True, text=True).stdout.strip()
        if out and all(state.startswith(("idle", "mix", "alloc")) for state in out.split()):
            return
        time.sleep(0.5)
    raise RuntimeError(f"slurm node never became idle (sinfo: {out!r})")
