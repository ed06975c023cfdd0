"""Stopping on a signal at one step that every process agrees on.

SLURM sends SIGTERM on `scancel`, at the time limit and on preemption, and SIGUSR1 some seconds
before the limit when asked (`--signal=USR1@120`, launch/slurm.sbatch). The handlers only note the
signal; the train loop asks `StopSignal.poll` after each step and, once it answers a signal, saves
that step and exits. Processes receive a signal at different steps, so in a multi-process run
`poll` returns the maximum over all processes of what each had seen one call earlier: a tiny
all-reduce dispatched behind the step just launched, read at the next call while the device runs
the following step, so the host never waits for it. Every process therefore stops after the same
step. Ctrl-C (SIGINT) keeps Python's KeyboardInterrupt.
"""

import signal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignal:
  """Context manager: while active, SIGTERM and SIGUSR1 are noted instead of killing the process."""

  def __init__(self):
    self.received = 0  # the last signal number seen here, 0 = none
    self._previous = {}
    self._pending = None  # the all-reduce dispatched at the last poll (multi-process)
    self._reduce = None

  def __enter__(self):
    try:
      for signum in SIGNALS:
        self._previous[signum] = signal.signal(signum, self._note)
    except ValueError:  # not the main thread: signals stay as they were
      self._restore()
    return self

  def __exit__(self, *exc):
    self._restore()

  def _restore(self):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def _note(self, signum, frame):
    del frame
    self.received = signum

  def poll(self) -> int:
    """The signal to stop on (0: none yet); the same on every process at the same call."""
    if jax.process_count() == 1:
      return self.received
    if self._reduce is None:
      mesh = jax.make_mesh((jax.device_count(),), ("all",),
                           axis_types=(jax.sharding.AxisType.Auto,))
      self._sharding = NamedSharding(mesh, P("all"))
      self._reduce = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))
    agreed = 0 if self._pending is None else int(self._pending)
    local = np.full((jax.local_device_count(),), self.received, np.int32)
    self._pending = self._reduce(jax.make_array_from_process_local_data(self._sharding, local))
    return agreed


def name(signum: int) -> str:
  return signal.Signals(signum).name
