"""Process set-up for the command-line entry points: run under tcmalloc when it is installed, and on CPU, one
XLA device per core.

XLA:CPU allocates the temporary buffers of every step afresh (gigabytes for a ViT train step). glibc's malloc
serves blocks above 32 MB with mmap and unmaps them when freed, so each step page-faults all of that memory in
again; tcmalloc keeps the memory (`python launch/benchmark.py` measures the difference). The entry points call
`use_tcmalloc()` first; it re-executes the command once with the library preloaded. ADAPTFACE_TCMALLOC=0 keeps
the system allocator.

On CPU the entry points also call `use_cpu_devices()` before JAX's first computation: XLA presents each core as a
device and the train step and embedding extraction shard the batch over them, as over GPUs, because one XLA:CPU
program spreads small operations (the batched attention matmuls) poorly over the cores. At most 8 devices by
default (each holds its own copy of the weights); ADAPTFACE_CPU_DEVICES=N sets the count (1: a single device).

A multi-process run (several hosts, or several processes on one host) joins through `use_processes()`: each
process then presents its own CPU devices, and XLA:CPU runs the collectives between processes over gloo (the
default of jax_cpu_collectives_implementation: nothing to set)."""

from __future__ import annotations

import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

_LIBRARIES = ("tcmalloc_minimal", "tcmalloc")  # Debian / Ubuntu: apt install libtcmalloc-minimal4
_SWITCH = "ADAPTFACE_TCMALLOC"
_CPU_DEVICES = "ADAPTFACE_CPU_DEVICES"
_MAX_CPU_DEVICES = 8


def find_tcmalloc() -> str | None:
  for name in _LIBRARIES:
    found = ctypes.util.find_library(name)
    if found:
      return found
  return None


def tcmalloc_preloaded() -> bool:
  return "tcmalloc" in os.environ.get("LD_PRELOAD", "")


def use_tcmalloc() -> None:
  """Re-executes this command with tcmalloc in LD_PRELOAD, unless it is there already, absent, or switched off."""
  if not sys.platform.startswith("linux") or os.environ.get(_SWITCH, "1") == "0":
    return
  if tcmalloc_preloaded():  # also stops a second re-execution
    return
  library = find_tcmalloc()
  if library is None:
    log.warning("tcmalloc not found: steps on CPU can take up to 2x longer with glibc's malloc. Install it "
                "(apt install libtcmalloc-minimal4) or set %s=0 to silence this.", _SWITCH)
    return
  env = dict(os.environ, LD_PRELOAD=f"{os.environ.get('LD_PRELOAD', '')} {library}".strip())
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)


def usable_cpus() -> int:
  """The CPUs this process may run on (its affinity, where the OS has one)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def use_cpu_devices(batch_size: int | None = None) -> int:
  """Makes XLA:CPU present one device per core this process may use, at most 8 (each device holds its own copy
  of the weights; ADAPTFACE_CPU_DEVICES overrides), lowered to a divisor of `batch_size` so that a batch splits
  evenly. Must run before JAX's first computation; no effect on GPU runs. Returns the count."""
  import jax

  wanted = os.environ.get(_CPU_DEVICES)
  if wanted is not None and not (wanted.isdigit() and int(wanted) >= 1):
    raise ValueError(f"{_CPU_DEVICES}={wanted!r}: expected a positive integer")
  count = int(wanted) if wanted else min(usable_cpus(), _MAX_CPU_DEVICES)
  if batch_size:
    count = max(d for d in range(1, count + 1) if batch_size % d == 0)
  jax.config.update("jax_num_cpu_devices", count)
  return count


def use_processes(coordinator_address: str | None = None, num_processes: int | None = None,
                  process_id: int | None = None, batch_size: int | None = None, heartbeat_timeout_s: int = 100) -> None:
  """Joins a multi-process run with jax.distributed.initialize: the values given, else JAX_COORDINATOR_ADDRESS
  and what JAX detects from the cluster (SLURM, Open MPI, Kubernetes, Cloud TPU). On CPU, each process presents
  `use_cpu_devices` devices for its share of `batch_size` (when num_processes is not given, the count divides the
  whole batch; ADAPTFACE_CPU_DEVICES sets it). A peer silent for `heartbeat_timeout_s` makes JAX's coordination
  service abort the processes (peers.py ends them earlier, with a message). Must run before JAX's first
  computation."""
  import jax

  if batch_size and num_processes:
    if batch_size % num_processes:
      raise ValueError(f"--config.data.batch_size={batch_size} does not split over --num_processes={num_processes}: "
                       "give a multiple of the process count")
    batch_size //= num_processes
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             heartbeat_timeout_seconds=heartbeat_timeout_s)
  # orbax's barriers outside its write thread are collectives without a timeout unless they go through the
  # coordination service: this makes every barrier of a save end (with an error) when a peer never arrives.
  import orbax.checkpoint  # noqa: F401 (defines the flag)
  from absl import flags
  flags.FLAGS.experimental_orbax_use_distributed_barrier = True
  use_cpu_devices(batch_size)
