"""A run's state, built from its config or rebuilt from its workdir.

`setup(config, ...)` gives the model, the initial `TrainState`, the frozen tree and the optimizer (training starts
here); `load_run(workdir)` restores a finished or running run from its checkpoints (evaluation and export start
here, without the training loop).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections

from adaptface_jax import checkpoints, optim, trainable_rules
from adaptface_jax.data.common import DOMAIN_NAMES
from adaptface_jax.models import face_model, hf_weights


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  trainable: Any
  opt_state: Any
  rng: jnp.ndarray  # raw uint32 key, folded with the step: the same randomness however a run was interrupted


def setup(config: ml_collections.ConfigDict, num_classes: int, steps: int):
  """Model, initial state, frozen tree and optimizer for a config (the backbone weights are loaded here)."""
  backbone = hf_weights.load_backbone(config.model.backbone, random_init=config.model.random_init,
                                      seed=config.seed)
  model = face_model.create_model(config, backbone.config)
  labelled = len(DOMAIN_NAMES)
  if (config.router.mode == "oracle" or config.loss.supervised_weight > 0) and model.num_domains != labelled:
    raise ValueError(f"oracle routing and the supervised domain loss use the data's {labelled} domain labels "
                     f"{DOMAIN_NAMES}; they need adapter.num_domains == {labelled}, not {model.num_domains}")
  rng = jax.random.PRNGKey(config.seed)
  init_rng, state_rng = jax.random.split(rng)
  variables = jax.jit(lambda r: face_model.init_variables(model, r, num_classes))(init_rng)
  variables["params"]["backbone"] = backbone.params
  trainable, frozen = trainable_rules.split(variables, config.trainable)
  tx, schedule = optim.make_optimizer(config.optim, steps)
  state = TrainState(step=jnp.asarray(0, jnp.int32), trainable=trainable, opt_state=tx.init(trainable),
                     rng=state_rng)
  return model, state, frozen, tx, schedule


def load_run(workdir: str, *, step: int | None = None, which: str = "last"):
  """(config, model, variables, meta) of a finished or running training run, for evaluation and export."""
  workdir = Path(workdir).expanduser()
  if not (workdir / "config.json").exists():
    raise FileNotFoundError(f"{workdir} is not a training workdir (no config.json)")
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  manager = checkpoints.Checkpoints(workdir / "checkpoints", best_metric=config.eval.best_metric)
  step = step if step is not None else (manager.best_step() if which == "best" else manager.latest_step())
  if step is None:
    raise FileNotFoundError(f"no {which} checkpoint in {manager.directory}")
  meta = manager.read_meta(step, which)
  model, state, frozen, _, _ = setup(config, meta["num_classes"], steps=max(int(meta.get("total_steps", 1)), 1))
  state = manager.restore(state, step=step, which=which, expected_fingerprint=checkpoints.fingerprint(frozen))
  manager.close()
  return config, model, trainable_rules.merge(state.trainable, frozen), meta
