"""LoRA and DA-LoRA adapters as a separate `lora` variable collection.

An adapted Dense keeps its frozen `kernel`/`bias` in `params` and its delta (`lora_a`, `lora_b`) in `lora`, at the
same module path (the variable tree: face_model.py). K = 1 is plain LoRA, K > 1 is DA-LoRA whose K deltas are
mixed per image by routing weights w [B, K]:  W' = W + scale * sum_k w_k A_k B_k  (x @ W layout).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Names a config may list in `adapter.targets`. q, k and v are slices of the fused qkv kernel.
TARGETS = ("qkv", "q", "k", "v", "proj", "fc1", "fc2")
QKV_SLICES = ("q", "k", "v")


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
  """Static description of the adapters; hashable so it can be a Flax module attribute."""
  rank: int = 16
  alpha: float = 16.0
  num_domains: int = 1
  targets: tuple[str, ...] = ("qkv", "proj")
  rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank
  init: str = "kaiming_uniform"  # or "normal"
  dropout: float = 0.0

  def __post_init__(self):
    unknown = sorted(set(self.targets) - set(TARGETS))
    if unknown:
      raise ValueError(f"unknown LoRA target(s) {unknown}; valid targets: {list(TARGETS)}")
    if "qkv" in self.targets and set(self.targets) & set(QKV_SLICES):
      raise ValueError("LoRA targets 'qkv' and per-slice 'q'/'k'/'v' adapt the same kernel; choose one form")
    if self.rank < 1 or self.num_domains < 1:
      raise ValueError(f"LoRA rank and num_domains must be >= 1, got {self.rank} and {self.num_domains}")
    if self.init not in ("kaiming_uniform", "normal"):
      raise ValueError(f"unknown LoRA init {self.init!r}; use 'kaiming_uniform' or 'normal'")

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

  def a_init(self):
    if self.init == "normal":
      return nn.initializers.normal(stddev=1.0 / self.rank)
    # Kaiming-uniform with a = sqrt(5) over fan_in, as torch.nn.Linear and peft initialise A.
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=-2, out_axis=-1)


def lora_delta(x, lora_a, lora_b, domain_weights, scale, dtype):
  """scale * sum_k w_k (x A_k) B_k as one rank-(K*r) product: ((x @ A_cat) * w_rep) @ B_cat."""
  num_domains, in_features, rank = lora_a.shape
  a_cat = jnp.transpose(lora_a, (1, 0, 2)).reshape(in_features, num_domains * rank).astype(dtype)
  b_cat = lora_b.reshape(num_domains * rank, lora_b.shape[-1]).astype(dtype)
  if num_domains > 1 and domain_weights is None:
    raise ValueError("a DA-LoRA layer (num_domains > 1) needs per-image domain_weights")
  if num_domains == 1:
    domain_weights = jnp.ones(x.shape[:1] + (1,), dtype)
  # [B, K] -> [B, K*r]: each image scales its own K rank-r blocks.
  w_rep = jnp.repeat(domain_weights.astype(dtype), rank, axis=-1)
  rows = x.reshape(x.shape[0], -1, in_features)
  out = _low_rank(rows, a_cat, b_cat, w_rep)
  return out.reshape(x.shape[:-1] + (b_cat.shape[-1],)) * jnp.asarray(scale, dtype)


@jax.custom_vjp
def _low_rank(x, a, b, w):
  """((x @ a) * w) @ b for x [B, T, in], a [in, R], b [R, out], w [B, R]."""
  return _low_rank_fwd(x, a, b, w)[0]


def _low_rank_fwd(x, a, b, w):
  hidden = x @ a
  return (hidden * w[:, None]) @ b, (x, a, b, w, hidden)


def _low_rank_bwd(res, d_out):
  x, a, b, w, hidden = res
  batch, tokens, in_features = x.shape
  rows = batch * tokens
  hidden_w = hidden * w[:, None]
  # The weight gradients contract over the B*T rows. Transposing the narrow [rows, R] operands keeps both
  # matmuls in plain row-major form; autodiff's own rule made XLA transpose x and d_out (8-72x wider) instead.
  d_b = hidden_w.reshape(rows, -1).T @ d_out.reshape(rows, -1)
  d_hidden_w = d_out @ b.T
  d_w = (d_hidden_w * hidden).sum(axis=1)
  d_hidden = d_hidden_w * w[:, None]
  d_a = (d_hidden.reshape(rows, -1).T @ x.reshape(rows, in_features)).T
  return d_hidden @ a.T, d_a, d_b, d_w


_low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


class AdaptedDense(nn.Module):
  """A Dense layer (x @ kernel + bias) whose frozen kernel may carry LoRA deltas.

  `adapted_slices`: () for no adapter, (None,) to adapt the whole output, or names of equal output slices
  (('q', 'v') of a fused qkv kernel) each with its own adapter at `<path>/<slice>/lora_a`.
  """
  features: int
  use_bias: bool = True
  spec: AdapterSpec | None = None
  adapted_slices: tuple[str | None, ...] = ()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, domain_weights=None, *, adapters_enabled=True, deterministic=True):
    in_features = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (in_features, self.features), jnp.float32)
    y = x.astype(self.dtype) @ kernel.astype(self.dtype)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
    if not self.adapted_slices:
      return y

    spec = self.spec
    # Created even when disabled, so init always yields the full tree.
    deltas = {}
    for slice_name in self.adapted_slices:
      if slice_name is None:
        deltas[None] = _lora_vars(self, spec, in_features, self.features)
      else:
        width = self.features // len(QKV_SLICES)
        deltas[slice_name] = _SliceLoRA(name=slice_name)(spec, in_features, width)
    if not adapters_enabled:
      return y

    if spec.dropout > 0.0:
      x = nn.Dropout(spec.dropout)(x, deterministic=deterministic)
    x = x.astype(self.dtype)
    if None in deltas:
      return y + lora_delta(x, *deltas[None], domain_weights, spec.scale, self.dtype)
    width = self.features // len(QKV_SLICES)
    pieces = []
    for name in QKV_SLICES:
      if name in deltas:
        pieces.append(lora_delta(x, *deltas[name], domain_weights, spec.scale, self.dtype))
      else:
        pieces.append(jnp.zeros(y.shape[:-1] + (width,), self.dtype))
    return y + jnp.concatenate(pieces, axis=-1)


def _lora_vars(module: nn.Module, spec: AdapterSpec, in_features: int, out_features: int):
  k = spec.num_domains
  a_init = spec.a_init()
  lora_a = module.variable("lora", "lora_a", lambda: a_init(module.make_rng("params"),
                                                            (k, in_features, spec.rank), jnp.float32))
  # B = 0 so that the adapted model starts exactly equal to the pretrained one.
  lora_b = module.variable("lora", "lora_b", lambda: jnp.zeros((k, spec.rank, out_features), jnp.float32))
  return lora_a.value, lora_b.value


class _SliceLoRA(nn.Module):
  """Holds the adapter of one slice of a fused kernel under `<dense path>/<slice name>/`."""

  @nn.compact
  def __call__(self, spec, in_features, out_features):
    return _lora_vars(self, spec, in_features, out_features)
