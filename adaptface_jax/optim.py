"""Learning-rate schedule and optimizer built from the `optim` section of a config.

The optimizer returned here is meant for the trainable subtree only (the LoRA / DA-LoRA deltas,
the domain classifier, the embedding head and the class centres). The train step differentiates
that subtree alone and calls `tx.init` / `tx.update` on it, so frozen pretrained weights never get
gradients or Adam moments: nothing here needs to know which weights are frozen, and the optimizer
state costs memory only for what trains.

Config fields (ml_collections.ConfigDict):
  name            'adamw'
  lr              peak learning rate, reached at the end of warmup
  end_lr          learning rate at the last step (cosine decay from lr)
  warmup_steps    int number of linear-warmup steps, or
  warmup_fraction float share of total_steps spent warming up (set exactly one of the two)
  weight_decay    decoupled weight decay (multiplied by the current learning rate, as in PyTorch)
  b1, b2, eps     Adam moments and denominator epsilon
  grad_clip_norm  global-norm clipping threshold; None or 0 turns clipping off
  decay_1d        optional, default False: False leaves 1-D leaves (biases, norm scales) undecayed
  accumulate_steps optional, default 1: micro-batches per update (read by the train step, checked here)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

_REQUIRED_FIELDS = ("name", "lr", "end_lr", "weight_decay", "b1", "b2", "eps", "grad_clip_norm")
_OPTIONAL_FIELDS = ("warmup_steps", "warmup_fraction", "decay_1d", "accumulate_steps")


def make_schedule(*, base_lr: float, total_steps: int, warmup_steps: int, end_lr: float) -> optax.Schedule:
  """Linear warmup from 0 to base_lr over warmup_steps, then cosine from base_lr to end_lr.

  The value at step `warmup_steps` is base_lr and at `total_steps` (and after) end_lr. Step 0
  has learning rate 0 when there is a warmup.
  """
  if total_steps <= 0:
    raise ValueError(f"total_steps must be > 0, got {total_steps}")
  if not 0 <= warmup_steps <= total_steps:
    raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
  if base_lr < 0 or end_lr < 0:
    raise ValueError(f"learning rates must be >= 0, got base_lr={base_lr}, end_lr={end_lr}")
  decay_steps = total_steps - warmup_steps

  def schedule(step: jnp.ndarray) -> jnp.ndarray:
    step = jnp.asarray(step, jnp.float32)
    if warmup_steps > 0:
      warmup_lr = base_lr * step / warmup_steps
    else:
      warmup_lr = jnp.asarray(base_lr, jnp.float32)
    if decay_steps > 0:
      progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
      decay_lr = end_lr + 0.5 * (base_lr - end_lr) * (1.0 + jnp.cos(math.pi * progress))
    else:
      decay_lr = jnp.asarray(end_lr, jnp.float32)
    return jnp.where(step < warmup_steps, warmup_lr, decay_lr)

  return schedule


def _resolve_warmup_steps(optim_config: ml_collections.ConfigDict, total_steps: int) -> int:
  steps = optim_config.get("warmup_steps", None)
  fraction = optim_config.get("warmup_fraction", None)
  if (steps is None) == (fraction is None):
    raise ValueError(
        "set exactly one of optim.warmup_steps (int) and optim.warmup_fraction (float in [0, 1]); "
        f"got warmup_steps={steps}, warmup_fraction={fraction}"
    )
  if steps is not None:
    if isinstance(steps, bool) or not isinstance(steps, int):
      raise ValueError(f"optim.warmup_steps must be an int, got {steps!r}")
    return steps
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"optim.warmup_fraction must be in [0, 1], got {fraction}")
  return int(round(fraction * total_steps))


def _matrices_only(params: Any) -> Any:
  # Weight decay on biases and normalisation scales pulls them toward 0, which is not a
  # regulariser for them but a bias; the usual recipe decays only matrices (and higher).
  return jax.tree_util.tree_map(lambda leaf: jnp.ndim(leaf) > 1, params)


def _adamw(optim_config: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
  decay_1d = bool(optim_config.get("decay_1d", False))
  return optax.adamw(
      learning_rate=schedule,
      b1=optim_config.b1,
      b2=optim_config.b2,
      eps=optim_config.eps,
      weight_decay=optim_config.weight_decay,
      mask=None if decay_1d else _matrices_only,
  )


_OPTIMIZERS: dict[str, Callable[[ml_collections.ConfigDict, optax.Schedule], optax.GradientTransformation]] = {
    "adamw": _adamw,
}


def make_optimizer(
    optim_config: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """clip_by_global_norm -> optimizer(schedule), and the schedule (for logging the lr).

  Apply it to the trainable subtree only; see the module docstring.
  """
  missing = [field for field in _REQUIRED_FIELDS if field not in optim_config]
  if missing:
    raise ValueError(f"optim config is missing fields {missing}; required: {list(_REQUIRED_FIELDS)}")
  unknown = sorted(set(optim_config.keys()) - set(_REQUIRED_FIELDS) - set(_OPTIONAL_FIELDS))
  if unknown:
    raise ValueError(
        f"optim config has unknown fields {unknown}; accepted: "
        f"{list(_REQUIRED_FIELDS) + list(_OPTIONAL_FIELDS)}"
    )
  name = optim_config.name
  if name not in _OPTIMIZERS:
    raise ValueError(f"unknown optimizer {name!r}; valid names: {sorted(_OPTIMIZERS)}")
  if optim_config.weight_decay < 0:
    raise ValueError(f"optim.weight_decay must be >= 0, got {optim_config.weight_decay}")
  accumulate = optim_config.get("accumulate_steps", 1)
  if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
    raise ValueError(f"optim.accumulate_steps must be an int >= 1, got {accumulate!r}")

  warmup_steps = _resolve_warmup_steps(optim_config, total_steps)
  schedule = make_schedule(
      base_lr=optim_config.lr,
      total_steps=total_steps,
      warmup_steps=warmup_steps,
      end_lr=optim_config.end_lr,
  )

  transforms = []
  clip_norm = optim_config.grad_clip_norm
  if clip_norm is not None and clip_norm != 0:
    if clip_norm < 0:
      raise ValueError(f"optim.grad_clip_norm must be > 0, or None/0 for no clipping; got {clip_norm}")
    transforms.append(optax.clip_by_global_norm(clip_norm))
  transforms.append(_OPTIMIZERS[name](optim_config, schedule))
  return optax.chain(*transforms), schedule
