"""The processes of a multi-process run watch each other, so that losing one ends the run cleanly.

Without this, a process that dies leaves the others to learn it late or never: a collective fails at once or
waits for it, and JAX's coordination service aborts the survivors only after its heartbeat timeout, with a C++
stack dump and no word on what was saved. `join` starts a thread in each process that posts a beat to the
coordination service's key-value store and reads the peers' beats. A peer silent for `timeout_s` seconds (or one
that reports it stopped on an error) ends every other process within about that bound, with one paragraph: which
process was lost and at which step, the last complete checkpoint, and the command that resumes from it.

`watching()` wraps the work of a joined process: on success it tells the peers it is leaving and leaves with
them; on an error (which a lost peer may have caused: a failed collective) it tells them so and waits up to the
bound for the thread to name a lost peer, or until every peer has stopped too. A process that ends on an error exits
without JAX's exit handler, which would wait at a shutdown barrier for the lost peer.

Losing process 0 is the exception: it hosts the coordination service, and JAX's client in the other processes
aborts them at once with its own message (jaxlib offers no callback that Python can take in its place).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import shlex
import sys
import threading
import time
from pathlib import Path

DEFAULT_TIMEOUT_S = 30
_KEY = "adaptface/peer/{}"
_LEFT, _FAILED = "left", "failed"


@dataclasses.dataclass
class Progress:
  """What the message on a lost peer tells: kept current by the training loop."""
  step: int | None = None  # the steps done
  checkpoints: Path | None = None  # the folder of the run's complete checkpoints (checkpoints/last)


progress = Progress()
_watch: _Watch | None = None


def join(coordinator_address: str | None, num_processes: int | None, process_id: int | None, *,
         batch_size: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
  """Joins the multi-process run (runtime.use_processes) and starts watching the peers."""
  global _watch
  from adaptface_jax import runtime
  if not timeout_s > 0:
    raise ValueError(f"--peer_timeout={timeout_s}: expected a positive number of seconds")
  import jax
  from jax._src import distributed

  # JAX's own detection of a silent peer aborts the process with a C++ stack dump: it must come well after ours.
  runtime.use_processes(coordinator_address, num_processes, process_id, batch_size,
                        heartbeat_timeout_s=max(100, int(3 * timeout_s)))
  client = distributed.global_state.client  # the coordination service's client (JAX has no public accessor)
  _watch = _Watch(client, jax.process_index(), jax.process_count(), timeout_s)
  _watch.start()
  atexit.register(_exit_without_jax_handlers)  # runs before JAX's handler (registered earlier, at import)


@contextlib.contextmanager
def watching():
  """The work of a joined process (no effect in a one-process run); see the module docstring."""
  if _watch is None:
    yield
    return
  try:
    yield
  except BaseException:
    # The error may be what a lost peer causes (a collective that failed): the watch names the peer, and ends this
    # process, within its bound; peers that stopped on an error too end the wait at once.
    _watch.fail()
    _watch.decided.wait(_watch.timeout_s + 2 * _watch.interval_s)
    raise
  _watch.leave()
  import jax
  jax.distributed.shutdown()  # leave together: process 0 hosts the coordination service


def _end(who: str, why: str) -> None:
  """Ends this process, which lost `who`, with the message (called on the watch's thread)."""
  _watch.fail()  # a peer that stopped on an error learns that this one did not die
  sys.stdout.flush()
  print(f"error: {lost_message(f'{who} of {_watch.count}', why)}", file=sys.stderr, flush=True)
  os._exit(1)


def _exit_without_jax_handlers() -> None:
  if _watch is not None and not _watch.left:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def last_checkpoint() -> int | None:
  """The newest complete checkpoint step (orbax renames a step's folder to its number once it is complete)."""
  folder = progress.checkpoints
  steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder and folder.is_dir() else []
  return max(steps, default=None)


def lost_message(who: str, why: str) -> str:
  step = f"after step {progress.step}" if progress.step is not None else "before its first step"
  checkpoint = last_checkpoint()
  saved = (f"The last complete checkpoint is step {checkpoint} in {progress.checkpoints}; rerunning the command of "
           "every process resumes from it" if checkpoint is not None else
           "No checkpoint was complete; rerunning the command of every process starts the run again")
  return f"lost {who} {step}: {why}. {saved} (this process's command: {shlex.join(sys.orig_argv)})"


class _Watch(threading.Thread):
  """Posts this process's beats (a counter, or `failed` / `left`) and reads the peers' every `interval_s`."""

  def __init__(self, client, index: int, count: int, timeout_s: float):
    super().__init__(name="peer-watch", daemon=True)
    self.client, self.index, self.count, self.timeout_s = client, index, count, timeout_s
    self.interval_s = min(max(timeout_s / 10, 0.2), 5.0)
    self.left = False
    self.status: str | None = None  # None while working, then _FAILED or _LEFT
    self.decided = threading.Event()  # no peer is left to wait for
    self._leaving = threading.Event()

  def _post(self, value: str) -> bool:
    try:
      self.client.key_value_set(_KEY.format(self.index), value, allow_overwrite=True)
      return True
    except Exception:  # the coordination service is gone: run() names process 0
      return False

  def fail(self) -> None:
    self.status = _FAILED
    self._post(_FAILED)

  def leave(self) -> None:
    self._leaving.set()
    self.join()
    self._post(_LEFT)
    self.left = True

  def run(self) -> None:
    beat, now = 0, time.monotonic()
    peers = [p for p in range(self.count) if p != self.index]
    seen = {p: (None, now) for p in peers}  # the last value read from each peer, and when it changed
    reached = now  # the last time the coordination service answered
    while not self._leaving.wait(self.interval_s):
      beat += 1
      now = time.monotonic()
      if self._post(self.status or str(beat)):
        reached = now
      elif now - reached > self.timeout_s:
        return _end("process 0", f"the coordination service it hosts has not answered for {self.timeout_s:g} s")
      for peer in list(peers):
        try:
          value = self.client.key_value_try_get(_KEY.format(peer))
        except Exception:  # not posted yet (still starting), or the service is gone (handled above)
          value = None
        if value == _FAILED and self.status is None:  # when both failed, each says its own error
          return _end(f"process {peer}", "it stopped on an error (its own output says which)")
        if value in (_LEFT, _FAILED):
          peers.remove(peer)
        elif value != seen[peer][0]:
          seen[peer] = (value, now)
        elif now - seen[peer][1] > self.timeout_s:
          return _end(f"process {peer}", f"no sign of life from it for {self.timeout_s:g} s (it died, or its "
                                         "host or the network did)")
      if not peers:
        self.decided.set()
