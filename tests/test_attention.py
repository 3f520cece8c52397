"""The chunked attention (CPU, long sequences) equals the batched form, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptface_jax import attention


def _batched(q, k, v):
  return jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k), axis=-1) @ v


@pytest.mark.parametrize("size", [1, 2, 6])
def test_chunked_matches_batched(size):
  q, k, v = (jnp.asarray(np.random.RandomState(i).randn(6, 3, 37, 16), jnp.float32) for i in range(3))
  np.testing.assert_allclose(attention.chunked_attention(q, k, v, size), _batched(q, k, v), atol=1e-6)
  weights = jnp.asarray(np.random.RandomState(9).randn(6, 3, 37, 16), jnp.float32)

  def loss(fn):
    return lambda q, k, v: (fn(q, k, v) * weights).sum()

  got = jax.grad(loss(lambda q, k, v: attention.chunked_attention(q, k, v, size)), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(_batched), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-5)


def test_chunk_size_divides_batch_and_bounds_memory():
  assert attention.chunk_size(32, 6, 257) == 2  # 1.6 MB of scores per image: two images per chunk
  assert attention.chunk_size(7, 64, 1024) == 1  # one image over the budget still makes a chunk
  assert attention.chunk_size(12, 1, 16) == 12
  for batch, heads, tokens in [(32, 6, 257), (16, 12, 197), (30, 6, 200)]:
    size = attention.chunk_size(batch, heads, tokens)
    assert batch % size == 0 and (size == 1 or size * heads * tokens ** 2 * 4 <= attention._CHUNK_BYTES)


def test_attention_picks_the_chunked_form_for_long_sequences_on_cpu():
  q, k, v = (jnp.asarray(np.random.RandomState(i).randn(2, 2, 130, 8), jnp.float32) for i in range(3))
  jaxpr = str(jax.make_jaxpr(attention.attention)(q, k, v))
  assert ("custom_vjp_call" in jaxpr) == (jax.default_backend() == "cpu")
  np.testing.assert_allclose(attention.attention(q, k, v), _batched(q, k, v), atol=1e-6)
  short = str(jax.make_jaxpr(attention.attention)(q[:, :, :64], k[:, :, :64], v[:, :, :64]))
  assert "custom_vjp_call" not in short


def test_chunked_bfloat16_keeps_dtype_and_matches_float32():
  q, k, v = (jnp.asarray(np.random.RandomState(i).randn(4, 2, 40, 8) * 0.5, jnp.float32) for i in range(3))
  low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  out = attention.chunked_attention(*low, 2)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), _batched(q, k, v), atol=5e-2)
  grads = jax.grad(lambda *a: attention.chunked_attention(*a, 2).astype(jnp.float32).sum(), argnums=(0, 1, 2))(*low)
  want = jax.grad(lambda *a: _batched(*a).sum(), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(grads, want):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(g.astype(jnp.float32), w, atol=1e-1)
