"""One writer per run folder: DIR/lock names the run that writes DIR.

Two runs on one folder would interleave their metrics and race on every checkpoint step, so a run
takes the lock before it writes anything and a second one stops with one line naming the holder.
A multi-process run is one writer: only its process 0 takes the lock (every process then learns
the outcome, so all stop together). The lock file is created whole by a hard link, which is atomic
on local and network file systems alike (every host of a run sees the folder).

A lock left by a process that died without releasing it (kill -9, a crashed host) is stale. It is
taken over when the holder ran on this host and its PID is gone (or now names a younger process),
or when the holder was an earlier start of this same SLURM job (a requeued job keeps its id but may
land on other hosts). Anything else is refused: from another host, a PID cannot be checked.
"""

import datetime
import json
import os
import socket

LOCK_NAME = "lock"


class LockError(ValueError):
  """The run folder is locked by another run, or cannot be written."""


def _start_ticks(pid: int) -> str | None:
  """The start time of process `pid` (clock ticks since boot; Linux), None where unknown."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      # Field 22; the command name (field 2) may hold spaces, so count from its closing ")".
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(pid: int, start: str | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # exists, owned by someone else
  now = _start_ticks(pid)
  return start is None or now is None or now == start


def _holder() -> dict:
  pid = os.getpid()
  return {"host": socket.gethostname(), "pid": pid, "start_ticks": _start_ticks(pid),
          "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
          "since": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}


def describe(holder: dict) -> str:
  job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
  return (f"PID {holder.get('pid')} on host {holder.get('host')}{job}, since "
          f"{holder.get('since')}")


def read_holder(workdir: str) -> dict | None:
  """Who holds DIR/lock, or None when nobody does."""
  try:
    with open(os.path.join(workdir, LOCK_NAME)) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}  # unreadable: treated as held, never taken over


def _stale(holder: dict, me: dict) -> bool:
  if holder.get("slurm_job_id") and holder["slurm_job_id"] == me["slurm_job_id"]:
    return True
  return (holder.get("host") == me["host"] and isinstance(holder.get("pid"), int)
          and holder["pid"] != me["pid"] and not _alive(holder["pid"], holder.get("start_ticks")))


class RunLock:
  """DIR/lock for this process: `acquire` (raises LockError naming the holder), `release`."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_NAME)
    self.taken_over = None  # the stale holder replaced, if any
    self._me = None

  def acquire(self):
    try:
      os.makedirs(self.workdir, exist_ok=True)
    except OSError as error:
      raise LockError(f"--workdir={self.workdir}: cannot create it ({error.strerror}: "
                      f"{error.filename})") from None
    me = _holder()
    tmp = f"{self.path}.{me['host']}.{me['pid']}"
    try:
      with open(tmp, "w") as f:
        json.dump(me, f)
    except OSError as error:
      raise LockError(f"--workdir={self.workdir}: not writable ({error.strerror})") from None
    try:
      for _ in range(3):
        try:
          os.link(tmp, self.path)
          self._me = me
          return
        except FileExistsError:
          holder = read_holder(self.workdir)
          if holder is None:
            continue  # released meanwhile
          if not _stale(holder, me):
            raise LockError(
                f"--workdir={self.workdir} is in use by another run ({describe(holder)}): one run "
                f"writes a run folder at a time; if that process is gone, remove {self.path}")
          # Renamed away first: of two processes taking over at once, one wins the rename.
          try:
            os.replace(self.path, tmp + ".stale")
            os.remove(tmp + ".stale")
            self.taken_over = holder
          except FileNotFoundError:
            pass
      raise LockError(f"--workdir={self.workdir}: could not take {self.path} (contended)")
    finally:
      os.remove(tmp)

  def release(self):
    """Removes DIR/lock if it is still this process's."""
    if self._me is not None and read_holder(self.workdir) == self._me:
      os.remove(self.path)
    self._me = None
