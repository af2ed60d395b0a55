"""Who owns a run directory, and what its run did: the owner lock and the run's history.

- ``RUN/owner.lock`` (JSON: host, pid, the process's start time, SLURM job id and restart count, a
  token): taken by rank 0 before anything is written into the run directory, released at exit.
  A second live owner is refused; a stale lock is taken over with a warning. Stale means: the
  owner's SLURM job is over (``squeue -j``; an earlier restart of our own job counts as over), or
  its pid is gone from this host (pid and start time, so a reused pid is not mistaken for it), or,
  when neither can be asked (another host, no squeue), its heartbeat (the lock's mtime, touched by
  the training loop) is older than ``DIFFMOE_LOCK_STALE_MINUTES`` (default 30).
- ``RUN/checkpoints/history.jsonl``: one JSON record per event - ``start`` (a new run id),
  ``resume``, ``config_change``, ``save``, ``corrupt``, ``adopt``. Retention deletes only
  checkpoints that this file proves older in this run's own lineage (`save` records of its run id).

Temporary checkpoint directories carry an ``owner.json`` with the same identity: only their owner,
or the successor of an owner that is gone, deletes them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid

LOCK = "owner.lock"
HISTORY = "history.jsonl"
OWNER = "owner.json"
HEARTBEAT_SECONDS = 60.0
# squeue states after which a job runs nothing any more (PENDING / REQUEUED jobs come back: live).
SLURM_GONE = ("", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
              "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED")  # fmt: skip


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked: one line naming the choices; exit 2."""


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner_identity() -> dict:
    pid, host = os.getpid(), socket.gethostname()
    me = {"host": host, "pid": pid, "start": _proc_start(pid), "time": time.time()}
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        me["slurm_job_id"] = job
        me["slurm_restart"] = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        me["owner"] = f"slurm job {job} (restart {me['slurm_restart']}, {host} pid {pid})"
    else:
        me["owner"] = f"{host} pid {pid}"
    return me


def _slurm_state(job: str) -> str | None:
    """The job's state from squeue ("" when squeue no longer knows it), None when squeue cannot tell."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", str(job), "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return "" if "invalid job id" in out.stderr.lower() else None
    states = out.stdout.split()
    live = [s for s in states if s not in SLURM_GONE]
    return live[0] if live else (states[0] if states else "")


def _pid_alive(pid, start) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except (TypeError, ValueError):
        return False
    return start is None or _proc_start(int(pid)) in (None, start)


def stale_seconds() -> float:
    return 60.0 * float(os.environ.get("DIFFMOE_LOCK_STALE_MINUTES") or 30)


def owner_alive(other: dict, me: dict, mtime: float) -> tuple[bool, str]:
    """(alive, why) for the owner that ``other`` describes, seen from ``me``."""
    job = other.get("slurm_job_id")
    if job and job == me.get("slurm_job_id"):
        if int(other.get("slurm_restart", 0)) < int(me.get("slurm_restart", 0)):
            return False, f"an earlier run (restart {other.get('slurm_restart', 0)}) of this job"
    elif job:
        state = _slurm_state(job)
        if state is not None:
            if state in SLURM_GONE:
                return False, f"slurm job {job} is {state or 'no longer known to squeue'}"
            return True, f"slurm job {job} is {state}"
    if other.get("host") == me["host"]:
        pid = other.get("pid")
        if pid == me["pid"]:
            return False, "an earlier trainer of this process"
        if not _pid_alive(pid, other.get("start")):
            return False, f"pid {pid} is gone"
        return True, f"pid {pid} is alive on {me['host']}"
    age = time.time() - mtime
    if age > stale_seconds():
        return False, f"no heartbeat for {age / 60:.0f} min"
    return True, f"its heartbeat is {age:.0f} s old"


def read_owner(path: str) -> tuple[dict | None, float]:
    """(the JSON identity in ``path`` or None if unreadable, its mtime); raises FileNotFoundError."""
    mtime = os.stat(path).st_mtime
    try:
        with open(path) as f:
            return json.load(f), mtime
    except (OSError, ValueError):
        return None, mtime


class RunLock:
    """``RUN/owner.lock``; `acquire` on rank 0 only (the trainer broadcasts its verdict)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK)
        self.me = {**owner_identity(), "token": uuid.uuid4().hex}
        self.held = False
        self._created_dir = False
        self._beat = 0.0

    def acquire(self, log=print) -> None:
        if not os.path.isdir(self.run_dir):
            os.makedirs(self.run_dir, exist_ok=True)
            self._created_dir = True
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    other, mtime = read_owner(self.path)
                except FileNotFoundError:
                    continue
                if other is None:  # being written this instant, or debris
                    if time.time() - mtime < 5:
                        time.sleep(0.5)
                        continue
                    other, alive, why = {"owner": "an unreadable lock"}, False, "unreadable"
                else:
                    alive, why = owner_alive(other, self.me, mtime)
                if alive:
                    raise self._in_use(other, why) from None
                log(f"[diffmoe] WARNING: taking over {self.path} from {other.get('owner')} ({why})")
                aside = f"{self.path}.stale-{self.me['pid']}"
                try:
                    os.rename(self.path, aside)  # one taker wins; the others retry against its lock
                except FileNotFoundError:
                    continue
                if read_owner(aside)[0] != (None if why == "unreadable" else other):
                    try:  # another taker's fresh lock replaced the stale one meanwhile: give it back
                        os.link(aside, self.path)
                    except FileExistsError:
                        pass
                os.remove(aside)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
                f.flush()
                os.fsync(f.fileno())
            self.held, self._beat = True, time.monotonic()
            return
        raise RunDirError(f"could not take {self.path}: other processes keep taking it; is a second job starting?")

    def check(self) -> None:
        """Read-only `acquire`: raises the same one-line RunDirError when another live owner holds the
        lock, and takes nothing (diffmoe-train asks this before it builds anything)."""
        try:
            other, mtime = read_owner(self.path)
        except FileNotFoundError:
            return
        if other is None:
            return
        alive, why = owner_alive(other, self.me, mtime)
        if alive:
            raise self._in_use(other, why)

    def _in_use(self, other: dict, why: str) -> RunDirError:
        return RunDirError(
            f"train.run_dir={self.run_dir} is in use by {other.get('owner')} ({why}): use another "
            f"train.run_dir (sbatch -J NAME runs in RUNS/NAME), or wait until it ends; if it is really "
            f"gone, delete {self.path}"
        )

    def keep_for_requeue(self) -> None:
        """A SLURM job stopping to be requeued (exit 75) keeps the lock while it is PENDING or
        REQUEUED: its restart takes it back (an earlier restart of the same job is stale), another job
        is refused while squeue shows this one alive, anyone may take it once squeue shows it over."""
        if self.me.get("slurm_job_id"):
            self.held = False

    def heartbeat(self) -> None:
        if self.held and time.monotonic() - self._beat > HEARTBEAT_SECONDS:
            self._beat = time.monotonic()
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self, remove_empty_dir: bool = False) -> None:
        if not self.held:
            return
        self.held = False
        try:
            other, _ = read_owner(self.path)
            if other is not None and other.get("token") == self.me["token"]:
                os.remove(self.path)
        except OSError:
            pass
        if remove_empty_dir and self._created_dir:
            try:
                os.rmdir(self.run_dir)  # only if empty: a refused start leaves no trace
            except OSError:
                pass


class RunHistory:
    """``RUN/checkpoints/history.jsonl``: appended by the owner's rank 0, one fsynced line per event."""

    def __init__(self, ckpt_root: str):
        self.root = ckpt_root
        self.path = os.path.join(ckpt_root, HISTORY)

    def records(self) -> list[dict]:
        if not os.path.isfile(self.path):
            return []
        out = []
        with open(self.path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:  # a torn last line of a killed writer
                    pass
        return out

    def append(self, event: str, **fields) -> None:
        os.makedirs(self.root, exist_ok=True)
        line = json.dumps({"event": event, "time": round(time.time(), 3), **fields}) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def current(self) -> dict | None:
        """The newest ``start`` record: the run this directory holds now."""
        starts = [r for r in self.records() if r.get("event") == "start"]
        return starts[-1] if starts else None

    def lineage(self, run_id: str | None) -> list[str]:
        """Checkpoint directories that run ``run_id`` saved (or adopted), oldest first."""
        order: list[str] = []
        for r in self.records():
            if r.get("run_id") != run_id:
                continue
            event = r.get("event")
            names = r.get("dirs", []) if event == "adopt" else [r.get("dir")] if event == "save" else []
            for name in names:
                if name in order:
                    order.remove(name)
                order.append(name)
        return order

    def corrupt(self) -> set[str]:
        """Directories found corrupt since they were last saved."""
        bad: set[str] = set()
        for r in self.records():
            if r.get("event") == "corrupt":
                bad.add(r.get("dir"))
            elif r.get("event") == "save":
                bad.discard(r.get("dir"))
        return bad
