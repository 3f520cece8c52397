"""attention(): each implementation equals softmax-then-matmul, values and gradients; the choice per backend; the
CPU form's groups; the ViT gives the same numbers through each implementation."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptface_jax.models import attention, vit

SCALE = 0.25


def _inputs(dtype=jnp.float32, scale=0.5, shape=(4, 37, 3, 16)):
  """q, k, v as [B, T, N, H]."""
  return tuple(jnp.asarray(np.random.RandomState(i).randn(*shape) * scale, dtype) for i in range(3))


def _output_and_grads(fn, q, k, v):
  """fn(q, k, v) and the gradients of a loss nonlinear in it (so that they also depend on the forward values)."""
  weights = jnp.asarray(np.random.RandomState(9).randn(*q.shape), jnp.float32)

  def loss(q, k, v):
    out = fn(q, k, v)
    return jnp.sum(jnp.tanh(out.astype(jnp.float32)) * weights), out

  grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


def _implementation(name):
  return lambda q, k, v: attention.attention(q, k, v, SCALE, implementation=name)


# 8: logits in the hundreds, exp would overflow without the max (and the summation order of the score matmuls,
# which differs between the forms, moves them by more); 300 tokens x 16 heads: computed in groups on CPU.
@pytest.mark.parametrize("scale,shape,atol", [(0.5, (4, 37, 3, 16), 1e-6), (8.0, (4, 37, 3, 16), 3e-3),
                                              (0.5, (4, 300, 16, 8), 1e-6)])
def test_implementations_match_softmax_then_matmul_and_each_other(scale, shape, atol):
  q, k, v = _inputs(scale=scale, shape=shape)
  got = {name: _output_and_grads(_implementation(name), q, k, v) for name in ("grouped", "xla")}
  got["reference"] = _output_and_grads(lambda *a: attention.softmax_attention(*a, SCALE), q, k, v)
  assert all(np.all(np.isfinite(g)) for out, grads in got.values() for g in grads)
  # "xla" (the GPU's float32 form) against the CPU form, and each against the reference.
  for a, b in (("grouped", "xla"), ("grouped", "reference"), ("xla", "reference")):
    for x, y in zip(jax.tree.leaves(got[a]), jax.tree.leaves(got[b])):
      np.testing.assert_allclose(x, y, atol=atol)


def test_the_default_follows_the_backend_dtype_and_shapes(monkeypatch):
  bf16, f32 = _inputs(jnp.bfloat16, shape=(2, 5, 3, 64)), _inputs(shape=(2, 5, 3, 64))
  choose = lambda q, k: attention.default_implementation(q, k)
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert choose(*bf16[:2]) == choose(*f32[:2]) == "grouped"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert choose(*bf16[:2]) == "cudnn" and choose(*f32[:2]) == "xla"
  assert choose(*(x.astype(jnp.float16) for x in bf16[:2])) == "cudnn"
  assert choose(bf16[0][:, :1], bf16[1]) == "xla"  # the CLS query alone
  for head_dim in (12, 136):  # not a multiple of 8; over cuDNN's bound
    assert choose(*_inputs(jnp.bfloat16, shape=(2, 5, 3, head_dim))[:2]) == "xla"
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert choose(*bf16[:2]) == "xla"
  with pytest.raises(ValueError, match="not in"):
    attention.attention(*f32, SCALE, implementation="flash")


def test_bfloat16_keeps_dtype_and_stays_close_to_float32():
  low = _inputs(jnp.bfloat16)
  full = attention.softmax_attention(*(x.astype(jnp.float32) for x in low), SCALE)
  for name in ("grouped", "xla"):
    out, grads = _output_and_grads(_implementation(name), *low)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), full, atol=1e-2)
    assert all(g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's fused attention needs an NVIDIA GPU")
def test_cudnn_is_taken_on_gpu_in_bfloat16_and_matches_float32():
  q, k, v = _inputs(jnp.bfloat16, shape=(4, 257, 6, 64))  # ViT-S/14 at 224 px
  default = lambda *a: attention.attention(*a, SCALE)
  grad = jax.grad(lambda *a: jnp.sum(default(*a).astype(jnp.float32)), argnums=(0, 1, 2))
  hlo = jax.jit(grad).lower(q, k, v).as_text()
  assert "__cudnn$fmhaSoftmax" in hlo and "__cudnn$fmhaSoftmaxBackward" in hlo
  out, grads = _output_and_grads(default, q, k, v)
  with jax.default_matmul_precision("highest"):
    want, want_grads = _output_and_grads(lambda *a: attention.softmax_attention(*a, SCALE),
                                         *(x.astype(jnp.float32) for x in (q, k, v)))
  np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=1e-2)
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(np.asarray(g, np.float32), w, atol=3e-2 * np.abs(w).max())


def test_the_vit_gives_the_same_numbers_through_each_implementation(monkeypatch):
  """The call site's [B, T, N, H] layout, the scale and the CLS-only last block of a pooled forward."""
  config = vit.ViTConfig(family="dinov2", hidden_size=48, num_layers=1, num_heads=3, mlp_dim=96, patch_size=8,
                         pretrain_image_size=32, layer_norm_eps=1e-6, activation="gelu", layerscale_init=0.5)
  model = vit.ViT(config)
  rng = np.random.RandomState(0)
  images = jnp.asarray(rng.randn(2, 32, 32, 3), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), images)
  w_all, w_pooled = jnp.asarray(rng.randn(2, 17, 48), jnp.float32), jnp.asarray(rng.randn(2, 48), jnp.float32)

  def outputs_and_grads(params):
    def loss(params):  # linear in the outputs: a norm after a LayerNorm would leave gradients of rounding alone
      full = model.apply(params, images)
      pooled = model.apply(params, images, pooled_only=True)["pooler_output"]
      return jnp.sum(full["last_hidden_state"] * w_all) + jnp.sum(pooled * w_pooled), (full, pooled)
    return jax.grad(loss, has_aux=True)(params)

  monkeypatch.setattr(attention, "default_implementation", lambda q, k: "grouped")
  want = jax.jit(outputs_and_grads)(params)
  monkeypatch.setattr(attention, "default_implementation", lambda q, k: "xla")
  got = jax.jit(outputs_and_grads)(params)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=1e-5)


def test_long_sequences_are_grouped_on_cpu_within_the_memory_bound(monkeypatch):
  assert attention.group_size(32, 6 * 257 * 257 * 4) == 2  # ViT-S/14 at 224 px: 1.6 MB of scores per image
  assert attention.group_size(7, 64 * 1024 * 1024 * 4) == 1  # one image over the budget still makes a group
  assert attention.group_size(12, 4) == 12
  calls = []
  monkeypatch.setattr(attention, "_attention", lambda q, k, v: calls.append(q.shape[:2]) or q)
  grouped = lambda shape: attention.attention(*_inputs(shape=shape), SCALE, implementation="grouped")
  grouped((4, 300, 16, 8))  # 5.8 MB of scores per image: one image per group
  assert calls == [(1, 1)] * 4  # [shards, images]
  calls.clear()
  grouped((4, 37, 3, 16))  # short sequences: one pass over the batch
  assert calls == [(4, 3)]  # [images, heads]
  calls.clear()
  monkeypatch.setattr(jax, "device_count", lambda: 2)  # each group lies within one device's rows of the batch
  grouped((4, 300, 16, 8))
  assert calls == [(2, 1)] * 2


SHARDED = r"""
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from adaptface_jax.models import attention
assert jax.device_count() == 2
batch = NamedSharding(Mesh(np.asarray(jax.devices()), ("data",)), P("data"))
q, k, v = (jax.device_put(np.random.RandomState(i).randn(8, 260, 4, 16).astype(np.float32) * 0.5, batch)
           for i in range(3))
loss = lambda fn: (lambda q, k, v: (fn(q, k, v, 0.25) ** 2).sum())
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
