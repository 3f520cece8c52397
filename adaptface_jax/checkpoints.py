"""Orbax checkpoints of a training run: the last N steps plus the best by a validation metric.

Only the trainable subtree, the optimizer state, the step and the rng are written (the input position is the
step). The frozen backbone is not rewritten at each save: its fingerprint is stored and checked on restore, so a
workdir cannot silently be resumed with other pretrained weights.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class FingerprintMismatch(ValueError):
  pass


class Checkpoints:
  def __init__(self, directory: Path, *, keep: int = 3, best_metric: str | None = None):
    self.directory = Path(directory).expanduser().absolute()
    self.best_metric = best_metric
    self._last = ocp.CheckpointManager(
        self.directory / "last", item_names=("state", "meta"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=False))
    self._best = None
    if best_metric:
      self._best = ocp.CheckpointManager(
          self.directory / "best", item_names=("state", "meta"),
          options=ocp.CheckpointManagerOptions(
              max_to_keep=1, create=False, best_fn=lambda meta: meta["metrics"][best_metric], best_mode="max"))

  def latest_step(self) -> int | None:
    return self._last.latest_step()

  def best_step(self) -> int | None:
    return self._best.best_step() if self._best is not None else None

  def save(self, step: int, state, *, fingerprint: str, metrics: dict | None = None, **extra) -> None:
    meta = {"step": int(step), "frozen_fingerprint": fingerprint, "metrics": metrics or {}, **extra}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    self._last.save(step, args=args)
    if self._best is not None and metrics and self.best_metric in metrics:
      self._best.save(step, args=args, metrics=meta)

  def _restore(self, manager, step, target):
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                         meta=ocp.args.JsonRestore()))

  def read_meta(self, step: int, which: str = "last") -> dict:
    manager = self._last if which == "last" else self._best
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, state, *, step: int | None = None, which: str = "last", expected_fingerprint: str | None = None):
    """Restores into the structure of `state`; None when there is nothing to restore."""
    manager = self._last if which == "last" else self._best
    if manager is None:
      raise ValueError("this run keeps no best checkpoint (config.eval.best_metric is unset)")
    if step is None:
      step = manager.best_step() if which == "best" else manager.latest_step()
    if step is None:
      return None
    if step not in manager.all_steps():
      raise FileNotFoundError(f"no {which} checkpoint at step {step} in {manager.directory}; "
                              f"available: {sorted(manager.all_steps())}")
    meta = self.read_meta(step, which)
    if expected_fingerprint is not None and meta["frozen_fingerprint"] != expected_fingerprint:
      raise FingerprintMismatch(
          f"the checkpoint at step {step} in {manager.directory} was made with other frozen (backbone) weights "
          f"than this config loads; use a fresh --workdir or the config/backbone that made this run. "
          f"Nothing was overwritten.")
    try:
      return self._restore(manager, step, state)["state"]
    except (ValueError, KeyError) as e:
      raise ValueError(f"the checkpoint at step {step} in {manager.directory} does not match this config's "
                       f"trainable tree (another adapter/backbone?): {e}") from e

  def restore_latest(self, state, *, expected_fingerprint: str):
    return self.restore(state, expected_fingerprint=expected_fingerprint)

  def close(self) -> None:
    self._last.wait_until_finished()
    self._last.close()
    if self._best is not None:
      self._best.wait_until_finished()
      self._best.close()
