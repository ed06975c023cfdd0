"""JAX's multi-process runtime, started from explicit flags, from a SLURM job step, or not at all.

One `python -m drt_jax.train` runs on one device, on all devices of a host, or as one process per
host or per GPU of a cluster: `initialize` is the only place that knows which. Every process then
checks that it runs the same config as all the others (`check_same_config`).
"""

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from drt_jax.config import ConfigError

# JAX's own SLURM rule, so a job's processes agree on the port without talking: one port in the
# ephemeral range [61440, 65535] per job id.
_SLURM_PORT_BASE, _SLURM_PORTS = 61440, 4096


class LaunchError(ValueError):
  """The multi-process settings (flags or SLURM variables) are incomplete or inconsistent."""


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
  """Where this process sits in a multi-process run."""
  coordinator_address: str  # "host:port" of process 0's coordination service
  num_processes: int
  process_id: int
  local_device_ids: tuple[int, ...] | None  # GPUs this process takes; None = all it can see


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None,
            environ: Mapping[str, str] = os.environ) -> ProcessGroup | None:
  """The process group that flags and environment describe, or None for a single-process run.

  A flag that is given wins; inside a SLURM job step of more than one task (`srun`), the rest comes
  from SLURM's variables; outside one, either all three flags are given or none.
  """
  flags = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  slurm = _slurm_group(environ)
  if slurm is None:
    if all(value is None for value in flags.values()):
      return None
    missing = [f"--{name}" for name, value in flags.items() if value is None]
    if missing:
      raise LaunchError(f"{', '.join(missing)} missing: give --coordinator_address, "
                        "--num_processes and --process_id together (or run under SLURM's srun)")
    local_device_ids = None
  else:
    flags = {name: getattr(slurm, name) if value is None else value
             for name, value in flags.items()}
    local_device_ids = slurm.local_device_ids
  if not 0 <= flags["process_id"] < flags["num_processes"]:
    raise LaunchError(f"--process_id={flags['process_id']}: must be in [0, --num_processes="
                      f"{flags['num_processes']})")
  if not re.fullmatch(r"\S+:\d+", flags["coordinator_address"]):
    raise LaunchError(f"--coordinator_address={flags['coordinator_address']!r}: must be host:port")
  return ProcessGroup(**flags, local_device_ids=local_device_ids)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> ProcessGroup | None:
  """Starts jax.distributed for the group `resolve` finds (nothing for a single process).

  Must run before anything touches a device. Returns the group, or None.
  """
  group = resolve(coordinator_address, num_processes, process_id)
  if group is not None:
    # "deactivate": JAX's own SLURM detection would pin every process to the GPU numbered
    # SLURM_LOCALID, which with one task per host leaves all GPUs but one idle.
    jax.distributed.initialize(group.coordinator_address, group.num_processes, group.process_id,
                               local_device_ids=group.local_device_ids,
                               cluster_detection_method="deactivate")
  return group


def barrier(name: str) -> None:
  """Waits until every process gets here; free in a single-process run.

  Processes finish compiling at different times, and CPU collectives (gloo) give a late peer only
  30 s to join the first use of a device group before the run hangs: the train loop starts here.
  """
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def all_true(ok: bool) -> bool:
  """True on every process when `ok` is true on every process; free in a single-process run."""
  if jax.process_count() == 1:
    return bool(ok)
  return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(ok)))).all())


def _slurm_group(environ: Mapping[str, str]) -> ProcessGroup | None:
  """The group of an `srun` job step of several tasks, from SLURM's variables; else None.

  SLURM_STEP_NUM_TASKS is set by srun only, so a batch script itself (one process, though its
  SLURM_NTASKS counts the whole allocation) is not mistaken for a member of a group.
  """
  num_tasks = int(environ.get("SLURM_STEP_NUM_TASKS", "1"))
  if num_tasks <= 1:
    return None
  required = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_STEP_NODELIST",
              "SLURM_STEP_TASKS_PER_NODE", "SLURM_JOB_ID")
  missing = [name for name in required if name not in environ]
  if missing:
    raise LaunchError(f"SLURM_STEP_NUM_TASKS={num_tasks} but {', '.join(missing)} unset: "
                      "start the tasks with srun")
  port = environ.get("JAX_COORDINATOR_PORT",
                     _SLURM_PORT_BASE + int(environ["SLURM_JOB_ID"]) % _SLURM_PORTS)
  tasks_here = tasks_per_node(environ["SLURM_STEP_TASKS_PER_NODE"])[int(environ["SLURM_NODEID"])]
  visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
  # One task per host takes all the host's GPUs; several take one each, by local rank, unless
  # SLURM already bound one GPU to each task (--gpus-per-task=1), which is then device 0.
  local_device_ids = None
  if tasks_here > 1 and len(visible) != 1:
    local_device_ids = (int(environ["SLURM_LOCALID"]),)
  return ProcessGroup(coordinator_address=f"{first_host(environ['SLURM_STEP_NODELIST'])}:{port}",
                      num_processes=num_tasks, process_id=int(environ["SLURM_PROCID"]),
                      local_device_ids=local_device_ids)


def first_host(nodelist: str) -> str:
  """The first host of a SLURM node list: "gpu[003-007,012],cpu1" -> "gpu003",
  "node-[1-4]-ib" -> "node-1-ib", "a,b" -> "a"."""
  match = re.match(r"([^,\[]*)(?:\[([^,\-\]]+)[^\]]*\])?([^,\[]*)", nodelist)
  prefix, first, suffix = match.groups()
  if not prefix + (first or ""):
    raise LaunchError(f"SLURM_STEP_NODELIST={nodelist!r}: no host name in it")
  return prefix + (first or "") + suffix


def tasks_per_node(spec: str) -> list[int]:
  """SLURM's compressed tasks-per-node list, expanded: "4(x2),1" -> [4, 4, 1]."""
  counts = []
  for part in spec.split(","):
    match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
    if match is None:
      raise LaunchError(f"SLURM_STEP_TASKS_PER_NODE={spec!r}: cannot read {part!r}")
    counts += [int(match[1])] * int(match[2] or 1)
  return counts


def check_same_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises ConfigError on every process unless all processes run the same config and workdir.

  A process with, say, another learning rate would silently train a different model on its shard;
  this compares a hash per top-level config section (gathered from all processes) and names the
  sections and processes that differ. Free in a single-process run.
  """
  if jax.process_count() == 1:
    return
  sections = {name: config[name] for name in sorted(config.keys())}
  sections["--workdir"] = workdir
  names = list(sections)
  digests = np.stack([_digest(sections[name]) for name in names])  # int32 [sections, 2]
  gathered = np.asarray(multihost_utils.process_allgather(digests))  # [processes, sections, 2]
  differs = (gathered != gathered[:1]).any(axis=-1)  # [processes, sections]
  if differs.any():
    bad_sections = [names[s] for s in np.flatnonzero(differs.any(axis=0))]
    bad_processes = np.flatnonzero(differs.any(axis=1)).tolist()
    raise ConfigError(f"processes {bad_processes} run a different {', '.join(bad_sections)} "
                      "than process 0: start every process with the same flags")


def _digest(value) -> np.ndarray:
  """64 bits of a stable hash of a config value, as int32 [2] (what process_allgather moves)."""
  value = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
  text = json.dumps(value, sort_keys=True, default=repr)
  return np.frombuffer(hashlib.sha256(text.encode()).digest()[:8], np.int32).copy()
