"""Flax ports of the DINOv2 and CLIP vision transformers, numerically faithful to HuggingFace transformers.

One module serves both families; the differences (LayerScale, pre-norm, activation, final norm, pooling) are
fields of `ViTConfig`, which hf_weights.vit_config reads from the checkpoint's own `config.json`.
q, k and v are one fused `qkv` Dense (one matmul); the loader fuses HF's separate projections.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adaptface_jax.models.attention import attention
from adaptface_jax.models.lora import QKV_SLICES, AdaptedDense, AdapterSpec

FAMILIES = ("dinov2", "clip")
# Rematerialisation of each block in the backward pass (`ViT.remat`): what the forward keeps for the backward.
#   ""      nothing recomputed (fastest; activations of every block stay in memory)
#   "dots"  keeps the linear layers' outputs, recomputes attention and the elementwise ops (LayerNorm, GELU)
#   "full"  keeps only each block's input and recomputes the whole block (least memory, one more forward)
REMAT_POLICIES = {"dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable, "full": None}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  family: str  # "dinov2" or "clip"
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  pretrain_image_size: int  # position embeddings are stored for this input size
  layer_norm_eps: float
  activation: str  # "gelu" (exact, erf) or "quick_gelu"
  layerscale_init: float | None = None  # DINOv2 LayerScale; None = no LayerScale
  qkv_bias: bool = True
  projection_dim: int | None = None  # CLIP visual_projection (no bias); None = absent

  @property
  def pos_grid(self) -> int:
    return self.pretrain_image_size // self.patch_size


def _act(name: str, x):
  return _gelu(x) if name == "gelu" else _quick_gelu(x)


# Both activations carry their own derivative: autodiff of the formulas keeps five or six [tokens, mlp_dim]
# intermediates alive for the backward pass; the rules below keep one (the derivative), which the MLP backward
# then reads once.
def _normal_cdf(x):
  # torch's erf form: XLA:CPU runs exact GELU 2.4x faster with it than with jax.nn.gelu's erfc form (forward).
  return 0.5 * (1 + jax.lax.erf(x * np.asarray(0.5 ** 0.5, x.dtype)))


@jax.custom_jvp
def _gelu(x):
  return x * _normal_cdf(x)  # exact GELU


@_gelu.defjvp
def _gelu_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  cdf = _normal_cdf(x)
  pdf = jnp.exp(-0.5 * x * x) * np.asarray((2 * np.pi) ** -0.5, x.dtype)
  return x * cdf, dx * (cdf + x * pdf)


@jax.custom_jvp
def _quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


@_quick_gelu.defjvp
def _quick_gelu_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  s = jax.nn.sigmoid(1.702 * x)
  return x * s, dx * (s + 1.702 * x * s * (1 - s))


@functools.lru_cache(maxsize=None)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] weights of torch's `interpolate(mode='bicubic', align_corners=False)` along one axis.

  HF interpolates position embeddings with exactly this; building the matrix on the host from the static
  sizes reproduces it to float rounding and costs two small matmuls on device.
  """
  a = -0.75  # torch's cubic convolution coefficient

  def cubic(t):
    t = abs(t)
    if t <= 1:
      return ((a + 2) * t - (a + 3)) * t * t + 1
    if t < 2:
      return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return 0.0

  weights = np.zeros((out_size, in_size), np.float64)
  scale = in_size / out_size
  for i in range(out_size):
    src = scale * (i + 0.5) - 0.5
    base = int(np.floor(src))
    frac = src - base
    for offset in range(-1, 3):
      weights[i, min(max(base + offset, 0), in_size - 1)] += cubic(offset - frac)
  return weights.astype(np.float32)


class Block(nn.Module):
  config: ViTConfig
  spec: AdapterSpec | None
  dtype: Any

  def setup(self):
    c, spec = self.config, self.spec
    targets = spec.targets if spec is not None else ()

    def dense(features, name, use_bias=True):
      if name == "qkv":
        slices = (None,) if "qkv" in targets else tuple(s for s in QKV_SLICES if s in targets)
      else:
        slices = (None,) if name in targets else ()
      return AdaptedDense(features, use_bias=use_bias, spec=spec, adapted_slices=slices, dtype=self.dtype,
                          name=name)

    norm = functools.partial(nn.LayerNorm, epsilon=c.layer_norm_eps, dtype=self.dtype, param_dtype=jnp.float32)
    self.norm1, self.norm2 = norm(name="norm1"), norm(name="norm2")
    self.qkv = dense(3 * c.hidden_size, "qkv", use_bias=c.qkv_bias)
    self.proj = dense(c.hidden_size, "proj")
    self.fc1 = dense(c.mlp_dim, "fc1")
    self.fc2 = dense(c.hidden_size, "fc2")
    if c.layerscale_init is not None:
      init = nn.initializers.constant(c.layerscale_init)
      self.ls1 = self.param("ls1", init, (c.hidden_size,), jnp.float32)
      self.ls2 = self.param("ls2", init, (c.hidden_size,), jnp.float32)

  def __call__(self, x, domain_weights, adapters_enabled, deterministic, cls_only):
    """cls_only: return the CLS token's output only ([B, 1, D]); the other tokens still serve as keys/values."""
    c = self.config
    kw = dict(adapters_enabled=adapters_enabled, deterministic=deterministic)
    batch, tokens, _ = x.shape
    head_dim = c.hidden_size // c.num_heads

    qkv = self.qkv(self.norm1(x), domain_weights, **kw)
    qkv = qkv.reshape(batch, tokens, 3, c.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, heads, head_dim]; no transpose (see attention.py)
    if cls_only:
      x, q = x[:, :1], q[:, :1]
    attn = attention(q, k, v, scale=head_dim ** -0.5).reshape(x.shape)
    attn = self.proj(attn, domain_weights, **kw)
    if c.layerscale_init is not None:
      attn = attn * self.ls1.astype(self.dtype)
    x = x + attn

    hidden = _act(c.activation, self.fc1(self.norm2(x), domain_weights, **kw))
    mlp = self.fc2(hidden, domain_weights, **kw)
    if c.layerscale_init is not None:
      mlp = mlp * self.ls2.astype(self.dtype)
    return x + mlp


class ViT(nn.Module):
  """Vision transformer encoder. Input: NHWC float images, already normalised; H and W multiples of the patch."""
  config: ViTConfig
  spec: AdapterSpec | None = None
  dtype: Any = jnp.float32
  remat: str = ""  # a key of REMAT_POLICIES, or "" (none): memory for compute on large batches

  def setup(self):
    c = self.config
    p, d = c.patch_size, c.hidden_size
    # Patch embedding as a matmul over flattened patches, kernel laid out like a Conv (p, p, 3, D).
    self.patch_kernel = self.param("patch_kernel", nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=-1),
                                   (p, p, 3, d), jnp.float32)
    if c.family == "dinov2":
      self.patch_bias = self.param("patch_bias", nn.initializers.zeros, (d,), jnp.float32)
    self.cls = self.param("cls", nn.initializers.normal(0.02), (d,), jnp.float32)
    self.pos = self.param("pos", nn.initializers.normal(0.02), (1 + c.pos_grid ** 2, d), jnp.float32)
    norm = functools.partial(nn.LayerNorm, epsilon=c.layer_norm_eps, dtype=self.dtype, param_dtype=jnp.float32)
    if c.family == "clip":
      self.pre_norm = norm(name="pre_norm")
    self.final_norm = norm(name="final_norm")  # DINOv2 `layernorm`; CLIP `post_layernorm` on the pooled CLS
    block = Block
    if self.remat:
      if self.remat not in REMAT_POLICIES:
        raise ValueError(f"remat {self.remat!r} not in {sorted(REMAT_POLICIES)} (or '' for none)")
      # adapters_enabled, deterministic and cls_only are Python booleans (argument 0 is the module).
      block = nn.remat(Block, static_argnums=(3, 4, 5), policy=REMAT_POLICIES[self.remat])
    self.blocks = [block(c, self.spec, self.dtype, name=f"blocks_{i}") for i in range(c.num_layers)]
    if c.projection_dim:
      self.projection = self.param("projection", nn.initializers.lecun_normal(), (d, c.projection_dim), jnp.float32)

  def patch_embed(self, images):
    """[B, H, W, 3] -> [B, N, D] patch embeddings (no CLS, no position)."""
    c = self.config
    batch, height, width, channels = images.shape
    p = c.patch_size
    if height % p or width % p:
      raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {p}; resize the "
                       f"input to e.g. {max(1, round(height / p)) * p}x{max(1, round(width / p)) * p}")
    if channels != 3:
      raise ValueError(f"expected RGB images [B, H, W, 3], got shape {images.shape}")
    patches = images.astype(self.dtype).reshape(batch, height // p, p, width // p, p, 3)
    tokens = jnp.einsum("bhpwqc,pqcd->bhwd", patches, self.patch_kernel.astype(self.dtype))
    if c.family == "dinov2":
      tokens = tokens + self.patch_bias.astype(self.dtype)
    return tokens.reshape(batch, -1, c.hidden_size)

  def position_embeddings(self, grid_h: int, grid_w: int):
    c = self.config
    if (grid_h, grid_w) == (c.pos_grid, c.pos_grid):
      return self.pos
    grid = self.pos[1:].reshape(c.pos_grid, c.pos_grid, c.hidden_size)
    wh = jnp.asarray(bicubic_matrix(c.pos_grid, grid_h))
    ww = jnp.asarray(bicubic_matrix(c.pos_grid, grid_w))
    resized = jnp.einsum("ih,hwd,jw->ijd", wh, grid, ww, precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([self.pos[:1], resized.reshape(grid_h * grid_w, c.hidden_size)], axis=0)

  def __call__(self, images, domain_weights=None, *, adapters_enabled=True, deterministic=True, pooled_only=False):
    """Returns dict(last_hidden_state [B, 1+N, D], pooler_output [B, D], and image_embeds when projected).

    pooled_only: skip last_hidden_state. Both families pool the CLS token, so the last block then runs its
    attention output, projection and MLP for that token alone (the same numbers, about 7% fewer FLOPs for a
    12-block ViT at 224 px, forward and backward).
    """
    c = self.config
    tokens = self.patch_embed(images)
    batch = tokens.shape[0]
    grid_h, grid_w = images.shape[1] // c.patch_size, images.shape[2] // c.patch_size
    cls = jnp.broadcast_to(self.cls.astype(self.dtype), (batch, 1, c.hidden_size))
    x = jnp.concatenate([cls, tokens], axis=1) + self.position_embeddings(grid_h, grid_w).astype(self.dtype)
    if c.family == "clip":
      x = self.pre_norm(x)
    for i, block in enumerate(self.blocks):
      x = block(x, domain_weights, adapters_enabled, deterministic, pooled_only and i == c.num_layers - 1)
    if c.family == "dinov2":
      last = self.final_norm(x)
      pooled = last[:, 0]
    else:
      last = x
      pooled = self.final_norm(x[:, 0])
    out = {"pooler_output": pooled} if pooled_only else {"last_hidden_state": last, "pooler_output": pooled}
    if c.projection_dim:
      out["image_embeds"] = pooled @ self.projection.astype(self.dtype)
    return out
