import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from adaptface_jax import optim


def _config(**overrides) -> ml_collections.ConfigDict:
  fields = dict(
      name="adamw",
      lr=1e-3,
      end_lr=1e-5,
      warmup_steps=10,
      weight_decay=0.05,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      grad_clip_norm=5.0,
  )
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def _params():
  return {
      "dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones((3,))},
      "norm": {"scale": jnp.ones((4,))},
      "centers": jnp.ones((4, 5)),
  }


def test_schedule_key_points():
  schedule = optim.make_schedule(base_lr=1e-3, total_steps=100, warmup_steps=10, end_lr=1e-5)
  np.testing.assert_allclose(float(schedule(0)), 0.0)
  np.testing.assert_allclose(float(schedule(5)), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(10)), 1e-3, rtol=1e-6)
  midpoint = 1e-5 + 0.5 * (1e-3 - 1e-5)  # cosine halfway through the decay
  np.testing.assert_allclose(float(schedule(55)), midpoint, rtol=1e-5)
  np.testing.assert_allclose(float(schedule(100)), 1e-5, rtol=1e-5)
  np.testing.assert_allclose(float(schedule(500)), 1e-5, rtol=1e-5)  # holds after the end
  values = np.array([float(schedule(s)) for s in range(10, 101)])
  assert np.all(np.diff(values) <= 1e-12), "cosine phase must not increase"
  # Works on traced steps inside jit, as optax calls it.
  np.testing.assert_allclose(float(jax.jit(schedule)(jnp.int32(10))), 1e-3, rtol=1e-6)


def test_schedule_without_warmup_and_errors():
  schedule = optim.make_schedule(base_lr=2.0, total_steps=4, warmup_steps=0, end_lr=0.0)
  np.testing.assert_allclose([float(schedule(s)) for s in range(5)], [2.0, 1.0 + 2**-0.5, 1.0, 1.0 - 2**-0.5, 0.0],
                             atol=1e-6)
  with pytest.raises(ValueError, match="warmup_steps"):
    optim.make_schedule(base_lr=1.0, total_steps=10, warmup_steps=11, end_lr=0.0)
  with pytest.raises(ValueError, match="total_steps"):
    optim.make_schedule(base_lr=1.0, total_steps=0, warmup_steps=0, end_lr=0.0)


def test_warmup_fraction_resolves_to_steps():
  _, schedule = optim.make_optimizer(_config(warmup_steps=None, warmup_fraction=0.25), total_steps=40)
  np.testing.assert_allclose(float(schedule(10)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(5)), 5e-4, rtol=1e-6)


def test_warmup_must_be_set_exactly_once():
  with pytest.raises(ValueError, match="exactly one"):
    optim.make_optimizer(_config(warmup_fraction=0.1), total_steps=100)
  with pytest.raises(ValueError, match="exactly one"):
    optim.make_optimizer(_config(warmup_steps=None), total_steps=100)
  with pytest.raises(ValueError, match="warmup_fraction"):
    optim.make_optimizer(_config(warmup_steps=None, warmup_fraction=1.5), total_steps=100)


def test_unknown_optimizer_and_fields_are_errors():
  with pytest.raises(ValueError, match=r"unknown optimizer 'lamb'.*adamw"):
    optim.make_optimizer(_config(name="lamb"), total_steps=100)
  with pytest.raises(ValueError, match="weight_decey"):
    optim.make_optimizer(_config(weight_decey=0.1), total_steps=100)
  config = _config()
  del config["b2"]
  with pytest.raises(ValueError, match="missing fields.*b2"):
    optim.make_optimizer(config, total_steps=100)


def _first_moment(state):
  return optax.tree_utils.tree_get(state, "mu")


def test_huge_gradient_is_clipped():
  tx, _ = optim.make_optimizer(_config(weight_decay=0.0, warmup_steps=0), total_steps=100)
  params = _params()
  state = tx.init(params)
  huge = jax.tree_util.tree_map(lambda p: 1e6 * jnp.ones_like(p), params)
  updates, state = tx.update(huge, state, params)
  # Adam's first moment after one step is (1 - b1) * gradient: the clipped gradient has
  # global norm exactly grad_clip_norm.
  np.testing.assert_allclose(float(optax.tree.norm(_first_moment(state))), 0.1 * 5.0, rtol=1e-5)
  assert np.all(np.isfinite(optax.tree.norm(updates)))
  # Each coordinate moves by at most ~lr: the spike does not throw the parameters.
  assert float(max(jnp.max(jnp.abs(u)) for u in jax.tree_util.tree_leaves(updates))) <= 1e-3 * 1.001

  unclipped, _ = optim.make_optimizer(_config(weight_decay=0.0, warmup_steps=0, grad_clip_norm=None),
                                      total_steps=100)
  unclipped_state = unclipped.init(params)
  _, unclipped_state = unclipped.update(huge, unclipped_state, params)
  assert float(optax.tree.norm(_first_moment(unclipped_state))) > 1e4


def test_small_gradient_is_not_clipped():
  tx, _ = optim.make_optimizer(_config(weight_decay=0.0), total_steps=100)
  params = _params()
  small = jax.tree_util.tree_map(lambda p: 0.01 * jnp.ones_like(p), params)
  _, state = tx.update(small, tx.init(params), params)
  np.testing.assert_allclose(
      float(optax.tree.norm(_first_moment(state))), 0.1 * float(optax.tree.norm(small)), rtol=1e-5
  )


@pytest.mark.parametrize("grad_clip_norm", [None, 0.0])
def test_clipping_off(grad_clip_norm):
  tx, _ = optim.make_optimizer(_config(grad_clip_norm=grad_clip_norm), total_steps=100)
  params = _params()
  grads = jax.tree_util.tree_map(lambda p: 100.0 * jnp.ones_like(p), params)
  _, state = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(
      float(optax.tree.norm(_first_moment(state))), 0.1 * float(optax.tree.norm(grads)), rtol=1e-5
  )
  with pytest.raises(ValueError, match="grad_clip_norm"):
    optim.make_optimizer(_config(grad_clip_norm=-1.0), total_steps=100)


def _step_with_zero_gradient(config):
  # With zero gradients Adam's own update is 0, so any change is weight decay alone.
  tx, schedule = optim.make_optimizer(config, total_steps=100)
  params = _params()
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  return optax.apply_updates(params, updates), float(schedule(0))


def test_weight_decay_mask_skips_1d_leaves_by_default():
  new_params, lr = _step_with_zero_gradient(_config(warmup_steps=0, weight_decay=0.1))
  decayed = 1.0 - lr * 0.1
  assert lr == pytest.approx(1e-3)
  np.testing.assert_allclose(new_params["dense"]["kernel"], decayed, rtol=1e-6)
  np.testing.assert_allclose(new_params["centers"], decayed, rtol=1e-6)
  np.testing.assert_array_equal(new_params["dense"]["bias"], 1.0)
  np.testing.assert_array_equal(new_params["norm"]["scale"], 1.0)


def test_decay_1d_true_decays_everything():
  new_params, lr = _step_with_zero_gradient(_config(warmup_steps=0, weight_decay=0.1, decay_1d=True))
  decayed = 1.0 - lr * 0.1
  for leaf in jax.tree_util.tree_leaves(new_params):
    np.testing.assert_allclose(leaf, decayed, rtol=1e-6)


def test_optimizer_minimises_quadratic_under_jit():
  config = _config(lr=0.1, end_lr=0.001, warmup_steps=5, weight_decay=0.0)
  tx, _ = optim.make_optimizer(config, total_steps=200)
  target = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.array([-1.0, 2.0])}
  params = jax.tree_util.tree_map(jnp.zeros_like, target)

  def loss(p):
    return sum(jnp.sum((p[k] - target[k]) ** 2) for k in p)

  @jax.jit
  def run(params):
    def step(carry, _):
      params, state = carry
      updates, state = tx.update(jax.grad(loss)(params), state, params)
      return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=200)
    return params

  final = run(params)
  assert float(loss(final)) < 1e-2 * float(loss(params))
  assert math.isfinite(float(loss(final)))
