"""Multi-head softmax attention.

`attention(q, k, v)` takes heads-major [B, H, T, d] arrays (q already scaled) and returns [B, H, T, d].

The softmax is normalised after the second matmul: the [T, T] weights exp(s - max) go straight into the
matmul with v and the [T, d] result is divided by the row sums, which saves a full pass over the scores. On
XLA:CPU this runs the forward 1.1-1.9x faster than softmax-then-matmul, and forward + backward as fast
(`python launch/bench_attention.py`); on accelerators XLA fuses either form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention(q, k, v):
  """softmax(q k^T) v; the softmax statistics in float32, the matmuls and the output in q's dtype."""
  logits = jnp.einsum("...qd,...kd->...qk", q, k).astype(jnp.float32)
  # The max only keeps exp in range; it cancels in the ratio, so no gradient needs to flow through it.
  weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
  return (weights.astype(q.dtype) @ v) / weights.sum(-1, keepdims=True).astype(q.dtype)


def softmax_attention(q, k, v):
  """The textbook form, softmax then matmul: the reference for tests and benchmarks."""
  logits = jnp.einsum("...qd,...kd->...qk", q, k).astype(jnp.float32)
  return jax.nn.softmax(logits, axis=-1).astype(q.dtype) @ v
