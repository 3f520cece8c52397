"""Multi-head softmax attention, with a cache-friendly form for long sequences on CPU.

`attention(q, k, v)` takes heads-major [B, H, T, d] arrays (q already scaled) and returns [B, H, T, d].

On XLA:CPU the batched form materialises the [B, H, T, T] scores (50 MB for ViT-S at 224 px, batch 32) and
every pass over them (matmul, softmax, matmul, and the same again backwards) runs at memory speed. The
chunked form loops over groups of images whose scores fit in cache, and its backward recomputes the
probabilities chunk by chunk instead of storing them (as flash attention does): one extra QK^T matmul for far
less memory traffic. On accelerators, and for short sequences (112 px faces: T = 65), the batched form wins.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Scores of one chunk (chunk images x H x T x T float32) are kept under this size: about a core's L2 + share of L3.
_CHUNK_BYTES = 4 << 20
# Below this sequence length the batched form is as fast on CPU (measured: launch/bench_attention.py).
_MIN_CHUNKED_TOKENS = 128


def attention(q, k, v):
  """softmax(q k^T) v over heads-major [B, H, T, d] arrays; softmax in float32, output in q's dtype."""
  batch, heads, tokens, _ = q.shape
  if jax.default_backend() == "cpu" and tokens >= _MIN_CHUNKED_TOKENS:
    return chunked_attention(q, k, v, chunk_size(batch, heads, tokens))
  return batched_attention(q, k, v)


def batched_attention(q, k, v):
  """`attention` in one pass over the whole batch: the [B, H, T, T] probabilities are materialised."""
  return _probs(q, k) @ v


def chunk_size(batch: int, heads: int, tokens: int) -> int:
  """The largest divisor of `batch` whose scores fit in _CHUNK_BYTES (at least 1)."""
  per_image = heads * tokens * tokens * 4
  return max(c for c in range(1, batch + 1) if batch % c == 0 and (c == 1 or c * per_image <= _CHUNK_BYTES))


def _probs(q, k):
  logits = jnp.einsum("...qd,...kd->...qk", q, k)
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)


def _chunks(x, size):
  return x.reshape((x.shape[0] // size, size) + x.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def chunked_attention(q, k, v, size: int):
  """`attention` computed `size` images at a time (lax.map), with a recomputing backward."""
  return _chunked_forward(q, k, v, size)[0]


def _chunked_forward(q, k, v, size):
  out = jax.lax.map(lambda c: _probs(c[0], c[1]) @ c[2], (_chunks(q, size), _chunks(k, size), _chunks(v, size)))
  return out.reshape(q.shape), (q, k, v)


def _chunked_backward(size, residuals, d_out):
  def one_chunk(chunk):
    q, k, v, d_out = chunk
    probs = _probs(q, k)
    d_v = jnp.einsum("...qk,...qd->...kd", probs, d_out)
    d_probs = jnp.einsum("...qd,...kd->...qk", d_out, v).astype(jnp.float32)
    probs32 = probs.astype(jnp.float32)
    # Softmax backward: ds = p * (dp - sum_k(dp * p)).
    d_logits = (probs32 * (d_probs - (d_probs * probs32).sum(-1, keepdims=True))).astype(q.dtype)
    return d_logits @ k, jnp.einsum("...qk,...qd->...kd", d_logits, q), d_v

  grads = jax.lax.map(one_chunk, tuple(_chunks(x, size) for x in (*residuals, d_out)))
  return tuple(g.reshape(x.shape) for g, x in zip(grads, residuals))


chunked_attention.defvjp(_chunked_forward, _chunked_backward)
