"""`python -m adaptface_jax.inspect_params --config configs/<experiment>.py[:ARGS] [--json]`: the variable tree.

Shapes only (jax.eval_shape): no weights are read and nothing is downloaded for the known hub architectures.
"""

from __future__ import annotations

import json

import jax
from absl import flags
from ml_collections import config_flags

from adaptface_jax import cli, trainable_rules
from adaptface_jax.models import face_model

_CONFIG = cli.define(config_flags.DEFINE_config_file, "config", None, "Experiment config file.", lock_config=True)
_JSON = cli.define(flags.DEFINE_bool, "json", False, "Print one JSON object instead of a table.")


def describe(config) -> dict:
  model = face_model.create_model(config)
  shapes = jax.eval_shape(lambda: face_model.init_variables(model, jax.random.key(0), config.data.num_classes))
  out = trainable_rules.summary(shapes, config.trainable)
  out["experiment"] = config.get("experiment", "")
  out["backbone"] = config.model.backbone
  if not config.data.num_classes:
    out["note"] = "margin/centers not counted: num_classes is read from the dataset at training time"
  return out


def format_table(info: dict) -> str:
  width = max(len(leaf["path"]) for leaf in info["leaves"])
  lines = [f"{'path':<{width}}  {'shape':<18} {'dtype':<8} {'params':>11}  trainable"]
  for leaf in info["leaves"]:
    lines.append(f"{leaf['path']:<{width}}  {str(tuple(leaf['shape'])):<18} {leaf['dtype']:<8} "
                 f"{leaf['count']:>11,}  {'yes' if leaf['trainable'] else 'no'}")
  lines.append("")
  lines.append(f"{'subtree':<{width}}  {'total':>11} {'trainable':>11}")
  for name, entry in info["subtrees"].items():
    lines.append(f"{name:<{width}}  {entry['total']:>11,} {entry['trainable']:>11,}")
  lines.append("")
  lines.append(f"total {info['total']:,}  trainable {info['trainable']:,}  frozen {info['frozen']:,}  "
               f"({info['trainable_percent']:.2f}% trainable)")
  if "note" in info:
    lines.append(info["note"])
  return "\n".join(lines)


def main(argv):
  del argv
  info = describe(_CONFIG.value)
  print(json.dumps(info) if _JSON.value else format_table(info))


if __name__ == "__main__":
  cli.run(main)
