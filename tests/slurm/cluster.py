"""A real SLURM cluster on loopback: one slurmctld and N `slurmd -N nX` daemons posing as nodes.

    python tests/slurm/cluster.py up [--nodes 2] [--cpus 8] [--dir /tmp/diffmoe-slurm]
    export SLURM_CONF=/tmp/diffmoe-slurm/slurm.conf     # printed by `up`; then sbatch, squeue, ...
    python tests/slurm/cluster.py down --dir /tmp/diffmoe-slurm

`LocalSlurmCluster(...).start()` installs Debian's ``slurmctld slurmd slurm-client munge`` with
apt-get when missing (root only), writes a slurm.conf whose state, spool and log directories all
live under one directory, starts munged (unless one already answers), slurmctld and the slurmds in
the foreground as its own children, and waits until `sinfo` shows every node idle. `stop()` cancels
the cluster's jobs, then ends exactly the processes it started (the PIDs it recorded in
``pids.json``), never anything found by name. Clients reach it through ``SLURM_CONF`` (`env()`).

Facts this relies on (measured, docs/design.md section 4): SlurmctldHost must equal ``hostname -s``;
there is no systemd, so munged runs as the munge user with /run/munge created by hand;
proctrack/linuxproc and task/none need no cgroups; ``SlurmdParameters=config_overrides`` lets a node
claim more CPUs than the machine has; node names must resolve (an /etc/hosts line to 127.0.0.1);
``AuthInfo=cred_expire=10`` lets a requeued job start again in ~15 s instead of ~2 min.
Ports are picked free at start, so two clusters (two pytest sessions) can run side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from diffmoe_dist.parallel.launch import free_ports

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "scancel", "munged", "munge")
HOSTS_MARK = "# diffmoe-dist tests/slurm: loopback SLURM node names"
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_SOCKET_DIR = Path("/run/munge")
# Final job states; PREEMPTED is left out: with PreemptMode=REQUEUE the job runs again.
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


class ClusterUnavailable(RuntimeError):
    """This machine cannot have the local cluster (not root, no apt-get, install failed): tests skip."""


class ClusterStartError(RuntimeError):
    """SLURM is installed but a daemon failed or the nodes never became idle: a harness bug to fix."""


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def ensure_installed(log=print) -> None:
    """apt-get installs the Debian packages when a binary is missing; raises ClusterUnavailable."""
    if not missing_binaries():
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"SLURM is not installed ({', '.join(missing_binaries())}) and installing needs root")
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable("SLURM is not installed and apt-get is unavailable: install slurmctld slurmd munge")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # No init system here: a policy-rc.d of 101 keeps the packages' postinst from starting daemons
    # against a slurm.conf that does not exist; the harness starts its own.
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = not policy.exists()
    if made_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
        t0 = time.time()
        res = _run(install, env=env)
        if res.returncode != 0:
            log("[slurm] apt-get install failed; running apt-get update first")
            _run(["apt-get", "update", "-qq"], env=env)
            res = _run(install, env=env)
        if res.returncode != 0:
            raise ClusterUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {res.stderr.strip()[-500:]}")
        log(f"[slurm] installed {' '.join(PACKAGES)} in {time.time() - t0:.0f} s")
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)
    if missing_binaries():
        raise ClusterUnavailable(f"after apt-get install, still missing: {', '.join(missing_binaries())}")


class LocalSlurmCluster:
    """N loopback nodes (n1..nN, `cpus` each) in partitions `debug` (default) and `urgent`.

    `urgent` has a higher PriorityTier: with PreemptType=preempt/partition_prio and
    PreemptMode=REQUEUE, a job there requeues `debug` jobs that hold the nodes it needs.
    """

    def __init__(self, nodes: int = 2, cpus: int = 8, root: str | os.PathLike | None = None, kill_wait: int = 30):
        self.nodes, self.cpus, self.kill_wait = nodes, cpus, kill_wait
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="diffmoe-slurm-"))
        self.conf = self.root / "slurm.conf"
        self.node_names = [f"n{i + 1}" for i in range(nodes)]
        self.procs: dict[str, subprocess.Popen] = {}
        self.start_seconds: float | None = None

    # ---- clients -------------------------------------------------------------------------------
    def env(self, base: dict | None = None) -> dict[str, str]:
        """The environment for sbatch/squeue/...: SLURM_CONF points at this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        for k in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k != "SLURM_CONF"]:
            del env[k]  # a test run inside an allocation must not leak that job into ours
        return env

    def cmd(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        res = _run(list(args), env=self.env(), timeout=timeout)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {res.returncode}: {res.stderr.strip()}")
        return res.stdout

    def sbatch(self, *args: str, env: dict | None = None, cwd: str | os.PathLike | None = None) -> int:
        res = _run(["sbatch", "--parsable", *args], env=self.env(env), cwd=cwd, timeout=30)
        if res.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} exited {res.returncode}: {res.stderr.strip()}")
        return int(res.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, ExitCode, Restarts, NodeList, ...)."""
        out = self.cmd("scontrol", "show", "job", "-o", str(job_id), check=False)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(self, job_id: int, timeout: float = 300, states=ENDED) -> dict[str, str]:
        """Polls until the job reaches one of `states` (a requeued job passes through PENDING again)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout:.0f} s")

    def node_states(self) -> dict[str, str]:
        out = self.cmd("sinfo", "-h", "-N", "-o", "%N %t", check=False)
        return dict(line.split() for line in out.splitlines() if len(line.split()) == 2)

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self, timeout: float = 60, log=print) -> LocalSlurmCluster:
        t0 = time.time()
        if os.geteuid() != 0:
            raise ClusterUnavailable("the local SLURM cluster runs its daemons as root; this session is not root")
        ensure_installed(log)
        for sub in ("state", "log", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._ensure_hosts()
        self._write_conf()
        try:
            self._start_munge()
            sbin = lambda name: shutil.which(name) or f"/usr/sbin/{name}"  # noqa: E731
            self._spawn("slurmctld", [sbin("slurmctld"), "-D", "-c", "-f", str(self.conf)])
            for name in self.node_names:
                self._spawn(f"slurmd-{name}", [sbin("slurmd"), "-D", "-N", name, "-f", str(self.conf)])
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.time() - t0
        return self

    def _ensure_hosts(self) -> None:
        missing = []
        for name in self.node_names:
            try:
                socket.gethostbyname(name)
            except OSError:
                missing.append(name)
        if missing:
            with open("/etc/hosts", "a") as f:
                f.write(f"127.0.0.1 {' '.join(missing)}  {HOSTS_MARK}\n")

    def _write_conf(self) -> None:
        ctld_port, *node_ports = free_ports(1 + self.nodes)
        r = self.root
        lines = [
            f"ClusterName=diffmoe{ctld_port}",
            f"SlurmctldHost={socket.gethostname().split('.')[0]}",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            "AuthInfo=cred_expire=10",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            # a requeued job becomes eligible cred_expire + 1 s later; schedule it within a second
            "SchedulerParameters=bf_interval=1,sched_interval=1",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SlurmdParameters=config_overrides",
            "JobRequeue=1",
            f"KillWait={self.kill_wait}",
            "MinJobAge=600",
            "InactiveLimit=0",
            "SlurmdTimeout=300",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={r}/log/jobcomp.txt",
            "PreemptType=preempt/partition_prio",
            "PreemptMode=REQUEUE",
        ]
        for name, port in zip(self.node_names, node_ports):
            lines.append(f"NodeName={name} NodeAddr=127.0.0.1 Port={port} CPUs={self.cpus} State=UNKNOWN")
        nodes = ",".join(self.node_names)
        lines += [
            f"PartitionName=debug Nodes={nodes} Default=YES MaxTime=INFINITE State=UP PriorityTier=1",
            f"PartitionName=urgent Nodes={nodes} MaxTime=INFINITE State=UP PriorityTier=10",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _munge_answers(self) -> bool:
        if shutil.which("munge") is None:
            return False
        try:
            cred = _run(["munge", "-n"], timeout=5)
            return cred.returncode == 0 and _run(["unmunge"], input=cred.stdout, timeout=5).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def _start_munge(self) -> None:
        if self._munge_answers():
            return  # someone's munged (another cluster, a system one): share it, never stop it
        import pwd

        munge = pwd.getpwnam("munge")
        if not MUNGE_KEY.exists():
            MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
            MUNGE_KEY.write_bytes(os.urandom(1024))
        for path, mode in ((MUNGE_KEY, 0o400), (MUNGE_KEY.parent, 0o700)):
            os.chown(path, munge.pw_uid, munge.pw_gid)
            os.chmod(path, mode)
        for d in (MUNGE_SOCKET_DIR, Path("/var/log/munge"), Path("/var/lib/munge")):
            d.mkdir(parents=True, exist_ok=True)
            os.chown(d, munge.pw_uid, munge.pw_gid)
        MUNGE_SOCKET_DIR.chmod(0o755)
        munged = shutil.which("munged") or "/usr/sbin/munged"
        self._spawn("munged", [munged, "-F"], user=munge.pw_uid, group=munge.pw_gid)
        deadline = time.time() + 15
        while not self._munge_answers():
            if time.time() > deadline or self.procs["munged"].poll() is not None:
                raise ClusterStartError(f"munged did not answer; see {self.root}/log/munged.out")
            time.sleep(0.2)

    def _spawn(self, name: str, cmd: list[str], **kw) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, **kw
        )
        log.close()
        self._record()

    def _record(self) -> None:
        pids = {name: {"pid": p.pid, "exe": Path(p.args[0]).name} for name, p in self.procs.items()}
        (self.root / "pids.json").write_text(json.dumps(pids, indent=1))

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        states: dict[str, str] = {}
        while time.time() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise ClusterStartError(f"{name} exited {p.returncode}; see {self.root}/log/")
            states = self.node_states()
            if len(states) == self.nodes and all(s == "idle" for s in states.values()):
                return
            time.sleep(0.5)
        raise ClusterStartError(f"nodes not idle after {timeout:.0f} s: {states}; see {self.root}/log/")

    def stop(self, timeout: float = 60) -> None:
        """Cancels every job of this cluster, waits for them to end, then ends the recorded daemons."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            jobs = self.cmd("squeue", "-h", "-o", "%i", check=False).split()
            if jobs:
                self.cmd("scancel", *jobs, check=False)
                deadline = time.time() + timeout
                while time.time() < deadline and self.cmd("squeue", "-h", "-o", "%i", check=False).split():
                    time.sleep(1)
        _wait_for_step_daemons(self.root)
        # slurmds first (they would otherwise log the controller's absence), munged last
        order = sorted(self.procs, key=lambda n: (n == "munged", n == "slurmctld"))
        for name in order:
            _terminate(self.procs[name])
        self.procs.clear()
        (self.root / "pids.json").unlink(missing_ok=True)

    def __enter__(self) -> LocalSlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def step_daemons(root: Path) -> list[int]:
    """PIDs of this cluster's slurmstepds: they log to a slurmd log file under root/log."""
    logs, pids = str(root / "log") + "/", []
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or (proc / "comm").read_text().strip() != "slurmstepd":
                continue
            if any(os.readlink(fd).startswith(logs) for fd in (proc / "fd").iterdir()):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def _wait_for_step_daemons(root: Path, timeout: float = 30) -> None:
    # A job leaves squeue a second or so before its slurmstepds (double-forked by slurmd, so not
    # our children) exit: waiting for them leaves no orphan behind; killing is the last resort.
    deadline = time.time() + timeout
    while step_daemons(root) and time.time() < deadline:
        time.sleep(0.2)
    for pid in step_daemons(root):
        os.kill(pid, signal.SIGKILL)


def _terminate(proc: subprocess.Popen, grace: float = 10) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def stop_recorded(root: Path) -> list[str]:
    """`down`: ends the daemons listed in root/pids.json whose executable still matches (no PID reuse)."""
    pids_file = root / "pids.json"
    if not pids_file.exists():
        return []
    stopped = []
    conf_env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
    jobs = _run(["squeue", "-h", "-o", "%i"], env=conf_env).stdout.split()
    if jobs:
        _run(["scancel", *jobs], env=conf_env)
        deadline = time.time() + 60
        while time.time() < deadline and _run(["squeue", "-h", "-o", "%i"], env=conf_env).stdout.split():
            time.sleep(1)
    _wait_for_step_daemons(root)
    for name, rec in sorted(json.loads(pids_file.read_text()).items(), key=lambda kv: kv[0] == "munged"):
        try:
            comm = Path(f"/proc/{rec['pid']}/comm").read_text().strip()
        except OSError:
            continue
        if comm != rec["exe"][:15]:
            continue
        os.kill(rec["pid"], signal.SIGTERM)
        for _ in range(100):
            if not Path(f"/proc/{rec['pid']}").exists():
                break
            time.sleep(0.1)
        stopped.append(name)
    pids_file.unlink()
    return stopped


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("up", "down"))
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--cpus", type=int, default=8, help="CPUs each node claims (may exceed the machine's)")
    p.add_argument("--dir", default=None, help="state/spool/log directory (default: a new /tmp/diffmoe-slurm-*)")
    args = p.parse_args(argv)
    if args.action == "down":
        if args.dir is None:
            p.error("down needs --dir")
        print(f"stopped: {', '.join(stop_recorded(Path(args.dir))) or 'nothing'}")
        return 0
    cluster = LocalSlurmCluster(args.nodes, args.cpus, args.dir)
    try:
        cluster.start()
    except (ClusterUnavailable, ClusterStartError) as exc:
        print(f"cluster.py: {exc}", file=sys.stderr)
        return 1
    print(f"[slurm] {args.nodes} nodes idle in {cluster.start_seconds:.1f} s")
    print(f"export SLURM_CONF={cluster.conf}")
    print(f"# stop with: python {sys.argv[0]} down --dir {cluster.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
