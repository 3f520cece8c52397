"""Multi-head softmax attention, with the implementation chosen per backend.

`attention(q, k, v, scale)` takes [B, T, N, H] arrays (the fused qkv projection's output, reshaped, with no
transpose) and returns [B, T, N, H], like `jax.nn.dot_product_attention`. The implementations:

- "cudnn": cuDNN's fused flash attention through `jax.nn.dot_product_attention`: the [T, T] scores never reach
  memory. The default on GPU where cuDNN takes the inputs (`cudnn_applies`).
- "xla": `jax.nn.dot_product_attention`'s XLA form (softmax statistics in float32); XLA fuses it on accelerators.
  The default on GPU otherwise (float32, an unsupported head size) and on other accelerators.
- "grouped": the CPU form, the default there: it runs faster on XLA:CPU than "xla", forward and forward +
  backward (`python launch/bench_attention.py` measures both). Heads-major [B, N, T, H] for the batched matmuls
  (XLA:CPU runs them faster in this layout), and the softmax normalised after the second matmul: the weights
  exp(s - max) go straight into the matmul with v and the [T, H] result is divided by the row sums, which saves
  a full pass over the scores. Long sequences are computed a few images at a time (static slices, so XLA sees
  independent groups) so that a group's scores stay in cache; with the batch sharded over several devices each
  group is cut from one device's rows ([devices, images per device, ...]), so XLA moves nothing between devices
  (a batch slice across the shard boundary made it add all-to-all and collective-permute).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("grouped", "xla", "cudnn")
# Scores of one group (images x H x Tq x Tk float32) are kept under this size: about a core's L2 + share of L3.
_GROUP_BYTES = 4 << 20
_MIN_GROUPED_TOKENS = 128


def attention(q, k, v, scale: float, implementation: str | None = None):
  """softmax(scale q k^T) v over [B, T, N, H] arrays; the softmax statistics in float32, the output in q's dtype.

  implementation: one of IMPLEMENTATIONS, or None for `default_implementation`'s choice.
  """
  implementation = implementation or default_implementation(q, k)
  if implementation == "grouped":
    heads_major = lambda x: x.transpose(0, 2, 1, 3)
    out = _grouped(heads_major(q * jnp.asarray(scale, q.dtype)), heads_major(k), heads_major(v))
    return heads_major(out)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} not in {IMPLEMENTATIONS}")
  return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)


def default_implementation(q, k) -> str:
  backend = jax.default_backend()
  if backend == "cpu":
    return "grouped"
  return "cudnn" if backend == "gpu" and cudnn_applies(q, k) else "xla"


def cudnn_applies(q, k) -> bool:
  """Whether cuDNN's fused attention takes these [B, T, N, H] inputs: the conditions jax checks, with the head
  size bound of GPUs before Hopper (later ones take up to 256), for self-attention over the whole sequence.

  A query shorter than the keys (the CLS-only last block of a pooled forward) goes to XLA: one row of scores
  per head is a matrix-vector product, with no tile for a fused kernel to keep on chip.
  """
  head_dim = q.shape[-1]
  return (q.dtype in (jnp.bfloat16, jnp.float16) and q.dtype == k.dtype and head_dim % 8 == 0 and head_dim <= 128
          and q.shape[1] == k.shape[1])


def _grouped(q, k, v):
  """The CPU form on heads-major [B, N, T, H] arrays, q already scaled."""
  batch, heads, tokens, _ = q.shape
  # A symbolic batch (a shape-polymorphic trace, e.g. the ONNX export) cannot be split into groups.
  if tokens < _MIN_GROUPED_TOKENS or not isinstance(batch, int):
    return _attention(q, k, v)
  # Groups never straddle two devices' rows of a batch sharded over all of them: [shards, images per shard, ...].
  devices = jax.device_count()
  shards = devices if batch % devices == 0 else 1
  per_shard = batch // shards
  groups = per_shard // group_size(per_shard, heads * tokens * k.shape[2] * 4)
  split = lambda x: jnp.split(x.reshape(shards, per_shard, *x.shape[1:]), groups, axis=1)
  out = jnp.concatenate([_attention(*group) for group in zip(*(split(x) for x in (q, k, v)))], axis=1)
  return out.reshape(*q.shape[:-1], v.shape[-1])


def group_size(batch: int, bytes_per_image: int) -> int:
  """The largest divisor of `batch` whose scores fit in _GROUP_BYTES (at least 1)."""
  return max(g for g in range(1, batch + 1) if batch % g == 0 and (g == 1 or g * bytes_per_image <= _GROUP_BYTES))


def _attention(q, k, v):
  logits = jnp.einsum("...qd,...kd->...qk", q, k, preferred_element_type=jnp.float32)
  # The max only keeps exp in range; it cancels in the ratio, so no gradient needs to flow through it.
  weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
  out = jnp.matmul(weights.astype(q.dtype), v, preferred_element_type=jnp.float32)
  return (out / weights.sum(-1, keepdims=True)).astype(q.dtype)


def softmax_attention(q, k, v, scale: float):
  """The textbook form on [B, T, N, H] arrays, softmax then matmul in float32: the reference for tests."""
  logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * scale
  return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), v.astype(jnp.float32)).astype(q.dtype)
