"""attention() (softmax normalised after the matmul, grouped on CPU) equals softmax-then-matmul, values and
gradients."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptface_jax.models import attention


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
  monkeypatch.setattr(attention, "_attention", lambda q, k, v: calls.append(q.shape[:2]) or q)
  attention.attention(*_inputs(shape=(4, 16, 300, 8)))  # 5.8 MB of scores per image: one image per group
  assert calls == [(1, 1)] * 4  # [shards, images]
  calls.clear()
  attention.attention(*_inputs(shape=(4, 3, 37, 16)))  # short sequences: one pass over the batch
  assert calls == [(4, 3)]
  calls.clear()
  monkeypatch.setattr(jax, "device_count", lambda: 2)  # each group lies within one device's rows of the batch
  attention.attention(*_inputs(shape=(4, 16, 300, 8)))
  assert calls == [(2, 1)] * 2


SHARDED = r"""
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from adaptface_jax.models import attention
assert jax.device_count() == 2
batch = NamedSharding(Mesh(np.asarray(jax.devices()), ("data",)), P("data"))
q, k, v = (jax.device_put(np.random.RandomState(i).randn(8, 4, 260, 16).astype(np.float32) * 0.5, batch)
           for i in range(3))
loss = lambda fn: (lambda q, k, v: (fn(q, k, v) ** 2).sum())
grad = jax.jit(jax.grad(loss(attention.attention), argnums=(0, 1, 2)))
hlo = grad.lower(q, k, v).compile().as_text()
moved = [op for op in ("all-to-all", "collective-permute", "all-gather", "all-reduce") if op in hlo]
assert not moved, moved
want = jax.grad(loss(attention.softmax_attention), argnums=(0, 1, 2))(*(np.asarray(x) for x in (q, k, v)))
for g, w in zip(grad(q, k, v), want):
  np.testing.assert_allclose(np.asarray(g), w, atol=2e-5)
print("ok")
"""


def test_groups_of_a_sharded_batch_stay_on_their_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
