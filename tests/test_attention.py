"""attention() (softmax normalised after the matmul, grouped on CPU) equals softmax-then-matmul, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptface_jax import attention


def _inputs(dtype=jnp.float32, scale=0.5, shape=(4, 3, 37, 16)):
  return tuple(jnp.asarray(np.random.RandomState(i).randn(*shape) * scale, dtype) for i in range(3))


# 8: logits in the hundreds, exp would overflow without the max; 300 tokens x 16 heads: computed in groups on CPU.
@pytest.mark.parametrize("scale,shape", [(0.5, (4, 3, 37, 16)), (8.0, (4, 3, 37, 16)), (0.5, (4, 16, 300, 8))])
def test_matches_softmax_then_matmul(scale, shape):
  q, k, v = _inputs(scale=scale, shape=shape)
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


def test_long_sequences_are_grouped_on_cpu_within_the_memory_bound(monkeypatch):
  assert attention.group_size(32, 6 * 257 * 257 * 4) == 2  # ViT-S/14 at 224 px: 1.6 MB of scores per image
  assert attention.group_size(7, 64 * 1024 * 1024 * 4) == 1  # one image over the budget still makes a group
  assert attention.group_size(12, 4) == 12
  calls = []
  monkeypatch.setattr(attention, "_attention", lambda q, k, v: calls.append(q.shape[0]) or q)
  attention.attention(*_inputs(shape=(4, 16, 300, 8)))  # 5.8 MB of scores per image: one image per group
  assert calls == [1, 1, 1, 1]
  calls.clear()
  attention.attention(*_inputs(shape=(4, 3, 37, 16)))  # short sequences: one pass over the batch
  assert calls == [4]
  calls.clear()
  monkeypatch.setattr(jax, "device_count", lambda: 8)  # a sharded batch is not sliced into groups
  attention.attention(*_inputs(shape=(4, 16, 300, 8)))
  assert calls == [4]
