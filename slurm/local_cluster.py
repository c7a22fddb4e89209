"""A real SLURM cluster on this machine for tests: one controller and two emulated nodes (n1, n2).

    with LocalCluster() as cluster:                  # installs Debian's slurm packages when missing
        job = cluster.sbatch(["slurm/train.sbatch", ...], nodes=2)
        cluster.wait(job)
    python -m slurm.local_cluster start|stop ROOT    # by hand; then export SLURM_CONF=ROOT/slurm.conf

Debian's slurmd supports several daemons per host (`slurmd -N n1`); node names resolve through a line in /etc/hosts
that `stop` removes again (when no other cluster's slurmd runs). Needs root (daemons, apt-get, /etc/hosts):
`available()` says why not. Both "nodes" share this machine's CPUs, disk and ports (two ranks binding one fixed
port collide, unlike on a real cluster). A requeued job waits cred_expire + 1 s before it starts again (121 s by
default): the config sets cred_expire=5, the least SLURM accepts. `--signal=B:USR1@10` reaches the batch shell
20-45 s before the time limit.

The nodes have no GPUs (no GRES), and SLURM refuses a job that asks for GPUs there ("Invalid generic
resource (gres) specification"), so jobs override the scripts' GPU and CPU requests on the sbatch command
line as on any CPU-only cluster: `sbatch *CPU_NODE_OPTIONS slurm/train.sbatch ...` (every script also
needs DEVICE=cpu in the environment).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from common.cli import command, description
from model_parallel.state import child_environment, free_port

HOSTS_LINE = "127.0.0.1 n1 n2  # parti local slurm cluster"
CPUS_PER_NODE = 2
# What the slurm/*.sbatch scripts' #SBATCH resource lines must be overridden with on these GPU-less nodes.
CPU_NODE_OPTIONS = ["--gpus-per-node=0", f"--cpus-per-task={CPUS_PER_NODE}"]
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
# The commands that tell whether PACKAGES are installed (slurm-client brings sinfo, squeue, scontrol, scancel too).
COMMANDS = ["slurmctld", "slurmd", "sbatch"]
# The states a job ends in: `wait` returns at the first of them.
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE")


def available() -> str | None:
    """None when a local cluster can be started here, else the reason."""
    if os.geteuid() != 0:
        return "starting SLURM daemons needs root"
    missing = [c for c in COMMANDS if shutil.which(c) is None]
    if missing and shutil.which("apt-get") is None:  # (ensure_installed would fail)
        return f"{', '.join(missing)} not installed and there is no apt-get to install SLURM"
    return None


def ensure_installed() -> None:
    if all(shutil.which(c) for c in COMMANDS):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for args in (["update", "-qq"], ["install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        done = subprocess.run(["apt-get", *args], env=env, capture_output=True, text=True, check=False)
        if done.returncode:  # (apt's own words: no network, a held package, a locked dpkg)
            raise RuntimeError(f"apt-get {args[0]} failed (exit status {done.returncode}) installing SLURM: "
                               + " ".join((done.stderr or done.stdout).split())[-500:])


def _config(root: Path, port: int) -> str:
    nodes = (f"NodeName=n[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[{port + 1}-{port + 2}] "
             f"CPUs={CPUS_PER_NODE} RealMemory=8000 State=UNKNOWN")
    return f"""ClusterName=partilocal
SlurmctldHost=localhost
SlurmctldPort={port}
SlurmUser=root
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MailProg=/bin/true
MpiDefault=none
ReturnToService=2
SchedulerParameters=sched_interval=2,bf_interval=2
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.%n.log
{nodes}
PartitionName=local Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:2
"""


class LocalCluster:
    def __init__(self, root: str | Path | None = None, port: int | None = None):
        # Absolute: sbatch reads SLURM_CONF in its caller's cwd, the daemons the config's paths in theirs.
        self.root = Path(root or tempfile.mkdtemp(prefix="parti-slurm-")).resolve()
        self.port = port or free_port(3)  # (the controller's, then one per node)
        self.conf = self.root / "slurm.conf"
        self.env = child_environment(SLURM_CONF=str(self.conf))

    def run(self, *args: str, check: bool = True) -> str:
        return subprocess.run(list(args), check=check, capture_output=True, text=True, env=self.env).stdout

    def start(self) -> LocalCluster:
        why = available()
        if why:
            raise RuntimeError(f"cannot start a local SLURM cluster: {why}")
        ensure_installed()
        for d in ("state", "spool/n1", "spool/n2"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(_config(self.root, self.port))
        hosts = Path("/etc/hosts").read_text()
        if HOSTS_LINE not in hosts:
            Path("/etc/hosts").write_text(hosts.rstrip("\n") + "\n" + HOSTS_LINE + "\n")
        try:
            self.run("slurmctld", "-f", str(self.conf), "-i")
            for node in ("n1", "n2"):
                self.run("slurmd", "-f", str(self.conf), "-N", node)
        except subprocess.CalledProcessError as failed:  # (slurmctld daemonized already: stop it, as below)
            self.stop()
            raise RuntimeError(f"{failed.cmd[0]} did not start: {(failed.stderr or '').strip()}; "
                               f"see {self.root}/*.log") from failed
        deadline = time.time() + 60
        while time.time() < deadline:
            states = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).split()
            # Exactly "idle": sinfo appends "*" to a node that does not respond (its slurmd not registered yet,
            # or gone), and other marks ("~" powered down, "@" reboot pending, "$" maintenance...) to one that
            # would not take a job either.
            if len(states) == 2 and all(s == "idle" for s in states):
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"local SLURM nodes did not become idle: {states}; see {self.root}/*.log")

    def stop(self) -> None:
        """Cancel the jobs, stop the daemons (TERM, then KILL), remove the /etc/hosts line."""
        self.run("scancel", "--full", "-u", "root", check=False)
        deadline = time.time() + 15
        while self.run("squeue", "-h", check=False).strip() and time.time() < deadline:
            time.sleep(0.5)
        pids = []
        for pid_file in self.root.glob("*.pid"):
            try:
                pids.append(int(pid_file.read_text().strip()))
                os.kill(pids[-1], signal.SIGTERM)
            except (ValueError, ProcessLookupError):
                pass
        time.sleep(2)
        subprocess.run(["pkill", "-KILL", "-f", str(self.conf)], check=False)  # daemons that did not stop
        for pid in self.job_steps():  # job steps they left behind (this cluster's only: others may be running)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # Another cluster's nodes resolve through the same line.
        if not subprocess.run(["pgrep", "-x", "slurmd"], capture_output=True, check=False).stdout:
            hosts = Path("/etc/hosts").read_text()
            if HOSTS_LINE in hosts:
                Path("/etc/hosts").write_text(hosts.replace(HOSTS_LINE + "\n", ""))

    def job_steps(self) -> list[int]:
        """The slurmstepd processes of this cluster's jobs: those working in its folder or writing its logs
        (a step's process names only its job id, which every local cluster counts from 1)."""
        steps = []
        for proc in Path("/proc").iterdir():
            try:
                if not proc.name.isdigit() or not (proc / "cmdline").read_bytes().startswith(b"slurmstepd"):
                    continue
                opened = [os.readlink(proc / "cwd"), *(os.readlink(fd) for fd in (proc / "fd").iterdir())]
            except OSError:  # (ended meanwhile, or not ours to read)
                continue
            if any(Path(path).is_relative_to(self.root.resolve()) for path in opened):
                steps.append(int(proc.name))
        return steps

    def sbatch(self, args: list[str], cwd: str | Path | None = None, env: dict | None = None) -> str:
        out = subprocess.run(["sbatch", "--parsable", *args], check=True, capture_output=True, text=True,
                             cwd=cwd, env={**self.env, **(env or {})}).stdout
        return out.strip().split(";")[0]

    def state(self, job: str) -> str:
        """The job's state, UNKNOWN when SLURM does not know it. scontrol shows an array job as one record per task
        (the pending ones as one record), so that `wait` returns only once every task ended: while any has not,
        the first such record's state (RUNNING, PENDING, ...); then the first that is not COMPLETED (FAILED,
        CANCELLED, ...), and COMPLETED only when every task completed."""
        out = self.run("scontrol", "show", "job", job, "-o", check=False)
        states = [word.split("=", 1)[1] for word in out.split() if word.startswith("JobState=")]
        if not states:
            return "UNKNOWN"
        return next((s for s in states if s not in FINAL_STATES), None) or \
            next((s for s in states if s != "COMPLETED"), "COMPLETED")

    def wait(self, job: str, timeout: float = 600, done=FINAL_STATES) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.state(job)
            if state in done:
                return state
            time.sleep(1)
        raise TimeoutError(f"job {job} still {self.state(job)} after {timeout} s")

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser("python -m slurm.local_cluster", description=description(__doc__))
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("root", help="the cluster's folder (its config, state and logs): stop takes start's")
    args = parser.parse_args(argv)
    cluster = LocalCluster(args.root)
    with command(errors=(RuntimeError, subprocess.CalledProcessError)):
        if args.action == "start":
            cluster.start()
            print(f"started; export SLURM_CONF={cluster.conf}")
        else:
            cluster.stop()
            print(f"stopped the cluster of {cluster.conf}")


if __name__ == "__main__":
    main()
