"""Run logging in the workdir: metrics as JSON lines and TensorBoard events, and a terminal progress bar."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm


class MetricsLog:
  """Writes only on process 0 of a multi-host run."""

  def __init__(self, workdir: Path, *, enabled: bool = True):
    self.enabled = enabled
    self._workdir = Path(workdir)
    self._jsonl = open(self._workdir / "metrics.jsonl", "a") if enabled else None
    self._tensorboard = None

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **scalars}) + "\n")
    self._jsonl.flush()
    if self._tensorboard is None:
      from clu import metric_writers  # lazy: pulls in TensorBoard
      self._tensorboard = metric_writers.SummaryWriter(str(self._workdir / "tensorboard"))
    self._tensorboard.write_scalars(int(step), scalars)
    self._tensorboard.flush()

  @contextlib.contextmanager
  def progress(self, *, total: int, initial: int):
    bar = tqdm(total=total, initial=initial, unit="step", disable=not self.enabled, file=sys.stderr,
               dynamic_ncols=True)
    try:
      yield bar
    finally:
      bar.close()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tensorboard is not None:
      self._tensorboard.close()
