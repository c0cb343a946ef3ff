"""A one-node Slurm cluster on this machine (conftest.py's ``slurm`` fixture starts one per
session).

Debian's slurmctld/slurmd/munge packages run without systemd or cgroups when every
path is private (config, spool, state, munge socket and key under a temp dir), the
node is addressed as 127.0.0.1, and accounting is off. ``.ci/run`` installs them.
"""

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict

from megatron_tpo.parallel.launch import free_local_port

DAEMONS = ("munged", "slurmctld", "slurmd")


def slurm_installed() -> bool:
    return all(shutil.which(name) or Path(f"/usr/sbin/{name}").exists() for name in DAEMONS) \
        and shutil.which("sbatch") is not None


def _daemon(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class LocalSlurm:
    def __init__(self, root: Path, cpus: int = 4):
        self.root = Path(root)
        self.cpus = cpus
        self.host = socket.gethostname().split(".")[0]
        self.env: Dict[str, str] = {}

    def _write_config(self) -> Path:
        for folder in ("state", "spool", "munge"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o755)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.socket = self.root / "munge" / "munge.socket"
        config = self.root / "slurm.conf"
        config.write_text("\n".join([
            "ClusterName=tpotest",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={free_local_port()}",
            f"SlurmdPort={free_local_port()}",
            "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={self.socket}",
            "SlurmUser=root", "SlurmdUser=root",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "MpiDefault=none", "MailProg=/bin/true", "ReturnToService=2",
            "DependencyParameters=kill_invalid_depend",
            # The node may declare more CPUs than it has: tasks here are processes.
            "SlurmdParameters=config_overrides",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.root / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'slurmd.log'}",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=4000 "
            "State=UNKNOWN",
            f"PartitionName=test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))
        return config

    def start(self, timeout: float = 60.0) -> Dict[str, str]:
        config = self._write_config()
        self.env = {**os.environ, "SLURM_CONF": str(config)}
        subprocess.run([_daemon("munged"), "--force", f"--socket={self.socket}",
                        f"--key-file={self.root / 'munge' / 'munge.key'}",
                        f"--pid-file={self.root / 'munged.pid'}",
                        f"--log-file={self.root / 'munged.log'}",
                        f"--seed-file={self.root / 'munge' / 'munged.seed'}"],
                       check=True, env=self.env)
        subprocess.run([_daemon("slurmctld")], check=True, env=self.env)
        subprocess.run([_daemon("slurmd")], check=True, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env,
                                   capture_output=True, text=True).stdout.strip()
            if state == "idle":
                return self.env
            time.sleep(0.5)
        raise RuntimeError(f"local Slurm node never became idle (state {state!r}); "
                           f"see {self.root}/slurmctld.log and slurmd.log")

    def wait_for_job(self, job_id: str, timeout: float) -> str:
        """Poll squeue ourselves (sbatch --wait backs off to 32 s); return the job state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            queued = subprocess.run(["squeue", "-h", "-j", job_id], env=self.env,
                                    capture_output=True, text=True).stdout.strip()
            if not queued:
                break
            time.sleep(1.0)
        else:
            subprocess.run(["scancel", job_id], env=self.env)
            raise TimeoutError(f"Slurm job {job_id} still running after {timeout} s")
        details = subprocess.run(["scontrol", "show", "job", job_id], env=self.env,
                                 capture_output=True, text=True).stdout
        for field in details.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def start_requeued_job_now(self, job_id: str, timeout: float) -> None:
        """Slurm holds a requeued batch job back (pending, reason BeginTime) for about two
        minutes before it may start again; a test need not wait them out. Once the job is
        pending, move its begin time to now."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], env=self.env,
                                   capture_output=True, text=True).stdout.split()
            if state[:1] == ["PENDING"]:
                subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                               env=self.env, check=True)
                return
            time.sleep(0.5)
        raise TimeoutError(f"requeued Slurm job {job_id} not pending after {timeout} s")

    def stop(self) -> None:
        for name in reversed(DAEMONS):
            pid_file = self.root / f"{name}.pid"
            if pid_file.is_file():
                try:
                    os.kill(int(pid_file.read_text().strip()), 15)
                except (ProcessLookupError, ValueError):
                    pass

