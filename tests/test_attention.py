"""attention() (softmax normalised after the matmul) equals softmax-then-matmul, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptface_jax import attention


def _inputs(dtype=jnp.float32, scale=0.5, shape=(4, 3, 37, 16)):
  return tuple(jnp.asarray(np.random.RandomState(i).randn(*shape) * scale, dtype) for i in range(3))


@pytest.mark.parametrize("scale", [0.5, 8.0])  # 8: logits in the hundreds, exp would overflow without the max
def test_matches_softmax_then_matmul(scale):
  q, k, v = _inputs(scale=scale)
  np.testing.assert_allclose(attention.attention(q, k, v), attention.softmax_attention(q, k, v), atol=2e-6)
  weights = jnp.asarray(np.random.RandomState(9).randn(*q.shape), jnp.float32)

  def loss(fn):  # nonlinear in the output, so the gradient also depends on the forward values
    return lambda q, k, v: jnp.sum(jnp.tanh(fn(q, k, v)) * weights)

  got = jax.grad(loss(attention.attention), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(attention.softmax_attention), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, w, atol=2e-5 * scale ** 2)


def test_bfloat16_keeps_dtype_and_stays_close_to_float32():
  low = _inputs(jnp.bfloat16)
  out = attention.attention(*low)
  assert out.dtype == jnp.bfloat16
  full = attention.softmax_attention(*(x.astype(jnp.float32) for x in low))
  np.testing.assert_allclose(np.asarray(out, np.float32), full, atol=3e-2)
  grads = jax.grad(lambda *a: attention.attention(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))(*low)
  assert all(g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)
