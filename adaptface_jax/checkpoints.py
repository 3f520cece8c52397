"""Orbax checkpoints of a training run: the last N steps plus the best by a validation metric.

Only the trainable subtree, the optimizer state, the step and the rng are written (the input position is the
step). The frozen backbone is not rewritten at each save: its fingerprint is stored and checked on restore, so a
workdir cannot silently be resumed with other pretrained weights.

Each save also records the sha256 of the saved state (`fingerprint`), and a restore recomputes it: bytes changed
on disk are found here, not as a NaN loss later. On resume, a damaged checkpoint (changed, truncated or missing
files) is reported in one line and moved to `checkpoints/damaged/`, and the previous one is used. Nothing is
deleted but by orbax's keep-the-last-N rotation.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class FingerprintMismatch(ValueError):
  pass


class DamagedCheckpoint(ValueError):
  """A checkpoint that does not read back as it was written: a file changed, truncated or missing."""


class SaveFailed(OSError):
  """A save that did not complete: a peer did not reach one of its barriers in time, or the write failed."""


def _leaves(tree) -> list[tuple[str, Any]]:
  """(path, leaf) sorted by path: `/`-joined keys, attribute names and indices. For nested dicts these are
  trainable_rules.flatten's paths, which the frozen fingerprints in existing checkpoints were computed with."""
  key = lambda k: getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return sorted((("/".join(str(key(k)) for k in path), leaf) for path, leaf in flat), key=lambda item: item[0])


def fingerprint(tree) -> str:
  """sha256 of a tree's paths, shapes, dtypes and bytes: ties a checkpoint to the frozen weights it adapts, and a
  restored state to the one that was saved."""
  digest = hashlib.sha256()
  for path, leaf in _leaves(jax.device_get(tree)):
    leaf = np.asarray(leaf)
    digest.update(f"{path}:{leaf.shape}:{leaf.dtype};".encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()


def _layout(tree) -> dict[str, tuple]:
  return {path: (tuple(leaf.shape), np.dtype(leaf.dtype).name) for path, leaf in _leaves(tree)}


def _read(step: int, where: Path, read: Callable[[], Any]):
  try:
    return read()
  except Exception as error:  # orbax and TensorStore raise anything from Exception to FileNotFoundError here
    while error.__cause__ is not None:  # the innermost error names the file; the outer ones dump TensorStore specs
      error = error.__cause__
    what = (str(error).strip().splitlines() or [type(error).__name__])[0][:400].rstrip(".")
    raise DamagedCheckpoint(f"checkpoint step {step} at {where} is damaged: {what}") from error


# No save waits longer than this for a peer: orbax ends a barrier or an asynchronous write that runs past it with an
# error, which ends the run (train.py). Writing a checkpoint of this project's size takes seconds.
SAVE_TIMEOUT_S = 300


def _orbax_manager(directory: Path, *, keep: int, **options) -> ocp.CheckpointManager:
  """An orbax manager of one folder. In a multi-process run the processes meet at named barriers during a save;
  the folder's name prefixes them, so that last/ and best/ saving the same step do not wait on each other's."""
  return ocp.CheckpointManager(
      directory, item_names=("state", "meta"),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=keep, create=False, **options,
          multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=directory.name),
          async_options=ocp.options.AsyncOptions(timeout_secs=SAVE_TIMEOUT_S)))


class Checkpoints:
  def __init__(self, directory: Path, *, keep: int = 3, best_metric: str | None = None):
    self.directory = Path(directory).expanduser().absolute()
    self.best_metric = best_metric
    self._last = _orbax_manager(self.directory / "last", keep=keep)
    self._best = None
    if best_metric:
      self._best = _orbax_manager(self.directory / "best", keep=1, best_mode="max",
                                  best_fn=lambda meta: meta["metrics"][best_metric])

  def latest_step(self) -> int | None:
    return self._last.latest_step()

  def all_steps(self) -> list[int]:
    """The steps of last/, oldest first."""
    return sorted(self._last.all_steps())

  def best_step(self) -> int | None:
    return self._best.best_step() if self._best is not None else None

  def save(self, step: int, state, *, frozen_fingerprint: str, metrics: dict | None = None, **extra) -> None:
    meta = {"step": int(step), "frozen_fingerprint": frozen_fingerprint, "metrics": metrics or {},
            "state_sha256": fingerprint(state), **extra}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    with self._saving():
      self._last.save(step, args=args)
      # A run resumed behind a damaged newest checkpoint saves its steps again; best/ may hold one of them already.
      if self._best is not None and metrics and self.best_metric in metrics and step not in self._best.all_steps():
        self._best.save(step, args=args, metrics=meta)

  @contextlib.contextmanager
  def _saving(self):
    """Orbax writes in the background: a write or a barrier that failed (a peer that never came: orbax's timeout)
    surfaces at the next save or at close, as one SaveFailed, which the command line prints as a paragraph."""
    try:
      yield
    except (TimeoutError, jax.errors.JaxRuntimeError) as error:
      reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
      raise SaveFailed(f"a checkpoint save in {self.directory} did not complete: {reason}. A save ends when a peer "
                       f"does not reach it within {SAVE_TIMEOUT_S} s (or the filesystem failed); rerunning the "
                       "command of every process resumes from the last complete checkpoint") from error

  def _restore(self, manager, step, target):
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))

  def _manager(self, which: str):
    manager = self._last if which == "last" else self._best
    if manager is None:
      raise ValueError("this run keeps no best checkpoint (config.eval.best_metric is unset)")
    return manager

  def read_meta(self, step: int, which: str = "last") -> dict:
    manager = self._manager(which)
    return _read(step, Path(manager.directory) / str(step),
                 lambda: manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

  def restore(self, state, *, step: int | None = None, which: str = "last", expected_fingerprint: str | None = None):
    """Restores into the structure of `state`; None when there is nothing to restore. Raises DamagedCheckpoint for
    a checkpoint that does not read back as saved, ValueError for one of another model or other frozen weights."""
    manager = self._manager(which)
    if step is None:
      step = manager.best_step() if which == "best" else manager.latest_step()
    if step is None:
      return None
    if step not in manager.all_steps():
      raise FileNotFoundError(f"no {which} checkpoint at step {step} in {manager.directory}; "
                              f"available: {sorted(manager.all_steps())}")
    where = Path(manager.directory) / str(step)
    meta = self.read_meta(step, which)
    if expected_fingerprint is not None and meta["frozen_fingerprint"] != expected_fingerprint:
      raise FingerprintMismatch(
          f"the checkpoint at step {step} in {manager.directory} was made with other frozen (backbone) weights "
          f"than this config loads; use a fresh --workdir or the config/backbone that made this run. "
          f"Nothing was overwritten.")
    # The saved tree's own metadata tells another model (a config error) from damage (any failure to read it).
    saved = _layout(_read(step, where, lambda: ocp.StandardCheckpointHandler().metadata(where / "state")))
    wanted = _layout(state)
    if saved != wanted:
      differ = sorted(p for p in saved.keys() | wanted.keys() if saved.get(p) != wanted.get(p))
      raise ValueError(
          f"the checkpoint at step {step} in {manager.directory} does not match this config's trainable tree "
          f"(another adapter/backbone?): {len(differ)} leaves differ, e.g. " +
          "; ".join(f"{p}: saved {saved.get(p)}, config {wanted.get(p)}" for p in differ[:3]))
    restored = _read(step, where, lambda: self._restore(manager, step, state)["state"])
    if "state_sha256" in meta and fingerprint(restored) != meta["state_sha256"]:  # older checkpoints have none
      raise DamagedCheckpoint(f"checkpoint step {step} at {where} is damaged: its arrays differ from the sha256 "
                              "recorded when it was saved (bytes changed on disk)")
    return restored

  def restore_latest(self, state, *, expected_fingerprint: str):
    """The newest usable checkpoint of last/ restored into `state`; None when there is none.

    Damaged newer checkpoints are reported (a line each) and, once an older one restored, moved to damaged/ so
    that the run can save those steps again. When none is usable, nothing is moved and the error lists them all.
    """
    damaged = []
    for step in self.all_steps()[::-1]:
      try:
        restored = self.restore(state, step=step, expected_fingerprint=expected_fingerprint)
      except DamagedCheckpoint as error:
        damaged.append((step, error))
        continue
      if damaged:
        self._set_aside(damaged, fallback=step)
      return restored
    if damaged:
      raise DamagedCheckpoint(
          f"no checkpoint in {self._last.directory} is usable (nothing was moved or deleted): " +
          "; ".join(str(error) for _, error in damaged) +
          ". Move that directory away to train this run from the start.")
    return None

  def _set_aside(self, damaged: list, *, fallback: int) -> None:
    if jax.process_index() == 0:
      for step, error in damaged:
        destination = self.directory / "damaged" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        destination.parent.mkdir(exist_ok=True)
        (Path(self._last.directory) / str(step)).rename(destination)
        log.warning("%s; moved it to %s, resuming from step %d", error, destination, fallback)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("adaptface_damaged_checkpoints_moved")
    self._last.reload()

  def close(self) -> None:
    with self._saving():
      for manager in filter(None, (self._last, self._best)):
        manager.wait_until_finished()
        manager.close()
