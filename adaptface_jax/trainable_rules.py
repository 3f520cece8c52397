"""One rule set decides what trains.

`config.trainable` is an ordered list of (regex, "train" | "freeze") pairs matched against `/`-joined leaf paths of
the whole variable tree (models/face_model.py describes it), such as `params/backbone/blocks_0/qkv/kernel`; the first
match wins and a leaf that no rule matches is an error. What is differentiated, what the optimizer sees, what is
checkpointed and what `inspect_params` marks trainable all come from `split` below.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flax import traverse_util

MODES = ("train", "freeze")


def flatten(tree: Mapping) -> dict[str, Any]:
  return traverse_util.flatten_dict(dict(tree), sep="/")


def unflatten(flat: Mapping[str, Any]) -> dict:
  return traverse_util.unflatten_dict(dict(flat), sep="/")


def trainable_flags(tree: Mapping, rules: Iterable[tuple[str, str]]) -> dict[str, bool]:
  """path -> True (train) / False (freeze); raises listing every leaf no rule covers."""
  compiled = []
  for pattern, mode in rules:
    if mode not in MODES:
      raise ValueError(f"rule ({pattern!r}, {mode!r}): mode must be one of {MODES}")
    compiled.append((re.compile(pattern), mode == "train"))
  flags, uncovered = {}, []
  for path in flatten(tree):
    for regex, trainable in compiled:
      if regex.search(path):
        flags[path] = trainable
        break
    else:
      uncovered.append(path)
  if uncovered:
    shown = "\n  ".join(uncovered[:20]) + ("\n  ..." if len(uncovered) > 20 else "")
    raise ValueError(f"{len(uncovered)} variable(s) match no rule of config.trainable; add a rule for:\n  {shown}")
  return flags


def split(tree: Mapping, rules) -> tuple[dict, dict]:
  """(trainable, frozen): two sparse nested dicts whose union is `tree`."""
  flags = trainable_flags(tree, rules)
  flat = flatten(tree)
  return (unflatten({p: v for p, v in flat.items() if flags[p]}),
          unflatten({p: v for p, v in flat.items() if not flags[p]}))


def merge(*trees: Mapping) -> dict:
  """Union of sparse trees (inverse of `split`)."""
  flat = {}
  for tree in trees:
    flat.update(flatten(tree))
  return unflatten(flat)


def summary(tree: Mapping, rules) -> dict:
  """Per-leaf path/shape/dtype/count/trainable, totals per top-level subtree, and overall counts."""
  flags = trainable_flags(tree, rules)
  leaves, subtrees = [], {}
  for path, leaf in flatten(tree).items():
    count = int(np.prod(leaf.shape)) if leaf.shape else 1
    leaves.append(dict(path=path, shape=list(leaf.shape), dtype=str(leaf.dtype), count=count,
                       trainable=flags[path]))
    # Top-level subtree = collection plus first module (params/backbone, lora/backbone, margin/centers).
    key = "/".join(path.split("/")[:2])
    entry = subtrees.setdefault(key, {"total": 0, "trainable": 0})
    entry["total"] += count
    entry["trainable"] += count * flags[path]
  total = sum(leaf["count"] for leaf in leaves)
  trainable = sum(leaf["count"] for leaf in leaves if leaf["trainable"])
  return dict(total=total, trainable=trainable, frozen=total - trainable,
              trainable_percent=100.0 * trainable / max(total, 1), subtrees=subtrees, leaves=leaves)
