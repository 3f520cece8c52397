import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptface_jax import losses

ARCFACE = dict(scale=64.0, m1=1.0, m2=0.5, m3=0.0)
COSFACE = dict(scale=64.0, m1=1.0, m2=0.0, m3=0.35)
SPHEREFACE = dict(scale=64.0, m1=1.7, m2=0.0, m3=0.0)
COMBINED = dict(scale=64.0, m1=1.2, m2=0.3, m3=0.2)
ALL_MARGINS = {"arcface": ARCFACE, "cosface": COSFACE, "sphereface": SPHEREFACE, "combined": COMBINED}


def _numpy_cosines(embeddings, centers):
  e = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
  c = centers / np.linalg.norm(centers, axis=0, keepdims=True)
  return np.clip(e @ c, -1.0, 1.0)


def _random_problem(seed=0, batch=6, dim=8, classes=5):
  rng = np.random.default_rng(seed)
  embeddings = rng.normal(size=(batch, dim)).astype(np.float32)
  centers = rng.normal(size=(dim, classes)).astype(np.float32)
  labels = rng.integers(0, classes, size=batch).astype(np.int32)
  return embeddings, centers, labels


def test_init_class_centers_shape_and_scale():
  centers = losses.init_class_centers(jax.random.key(0), 64, 1000)
  assert centers.shape == (64, 1000)
  assert centers.dtype == jnp.float32
  assert abs(float(jnp.std(centers)) - 0.01) < 0.001
  with pytest.raises(ValueError, match="num_classes"):
    losses.init_class_centers(jax.random.key(0), 64, 0)


def test_cosface_logits_match_numpy():
  embeddings, centers, labels = _random_problem()
  logits = np.asarray(losses.margin_logits(embeddings, centers, labels, **COSFACE))
  expected = 64.0 * _numpy_cosines(embeddings, centers)
  expected[np.arange(len(labels)), labels] -= 64.0 * 0.35
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-4)


def test_arcface_target_is_cos_of_theta_plus_margin():
  # Hand-made case: a 2-D embedding at 40 degrees from its class centre, 90 from the other.
  theta = math.radians(40.0)
  embeddings = np.array([[math.cos(theta), math.sin(theta)]], np.float32)
  centers = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)  # columns are the centres
  labels = np.array([0], np.int32)
  logits = np.asarray(losses.margin_logits(embeddings, centers, labels, **ARCFACE))
  target_theta = np.arccos(_numpy_cosines(embeddings, centers)[0, 0])
  np.testing.assert_allclose(target_theta, theta, atol=1e-6)
  np.testing.assert_allclose(logits[0, 0], 64.0 * np.cos(target_theta + 0.5), rtol=1e-5)
  np.testing.assert_allclose(logits[0, 1], 64.0 * math.cos(math.radians(50.0)), rtol=1e-5)


def test_arcface_random_targets_and_fallback_match_numpy():
  embeddings, centers, labels = _random_problem(seed=3, batch=64, dim=3, classes=4)
  logits = np.asarray(losses.margin_logits(embeddings, centers, labels, **ARCFACE))
  cosines = _numpy_cosines(embeddings, centers)
  rows = np.arange(len(labels))
  target_cos = cosines[rows, labels]
  theta = np.arccos(target_cos)
  m = 0.5
  # InsightFace's fallback past theta = pi - m: cos(theta) - m sin(m).
  expected_target = np.where(theta + m <= np.pi, np.cos(theta + m), target_cos - m * np.sin(m))
  assert np.any(theta + m > np.pi) and np.any(theta + m <= np.pi)  # both branches exercised
  np.testing.assert_allclose(logits[rows, labels], 64.0 * expected_target, rtol=1e-4, atol=1e-3)
  others = np.ones_like(cosines, bool)
  others[rows, labels] = False
  np.testing.assert_allclose(logits[others], 64.0 * cosines[others], rtol=1e-5, atol=1e-4)


def _sphereface_psi(angle):
  k = np.floor(angle / np.pi)
  return (-1.0) ** k * np.cos(angle) - 2.0 * k


@pytest.mark.parametrize("margins", [SPHEREFACE, COMBINED], ids=["sphereface", "combined"])
def test_multiplicative_margin_matches_numpy(margins):
  embeddings, centers, labels = _random_problem(seed=4, batch=64, dim=3, classes=4)
  logits = np.asarray(losses.margin_logits(embeddings, centers, labels, **margins))
  rows = np.arange(len(labels))
  theta = np.arccos(_numpy_cosines(embeddings, centers)[rows, labels])
  angle = margins["m1"] * theta + margins["m2"]
  assert np.any(angle > np.pi)  # the monotonic extension is exercised
  expected = margins["scale"] * (_sphereface_psi(angle) - margins["m3"])
  np.testing.assert_allclose(logits[rows, labels], expected, rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize("name", list(ALL_MARGINS))
def test_target_logit_is_monotonic_in_angle(name):
  margins = ALL_MARGINS[name]
  theta = np.linspace(0.0, np.pi, 2001, dtype=np.float32)
  embeddings = np.stack([np.cos(theta), np.sin(theta)], axis=1)
  centers = np.array([[1.0], [0.0]], np.float32)
  labels = np.zeros(len(theta), np.int32)
  target = np.asarray(losses.margin_logits(embeddings, centers, labels, **margins))[:, 0]
  assert np.all(np.diff(target) <= 1e-3), "target logit must not increase as the angle grows"
  # The margin makes the target strictly harder than the plain cosine (away from theta = 0
  # for the purely multiplicative margin, where m1 * 0 = 0).
  assert np.all(target[1:] < margins["scale"] * np.cos(theta[1:]) + 1e-3)


@pytest.mark.parametrize("name", list(ALL_MARGINS))
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["cos=+1", "cos=-1"])
def test_no_nan_at_cosine_boundaries(name, sign):
  margins = ALL_MARGINS[name]
  centers = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], np.float32)
  # Each embedding is exactly (or exactly opposite to) its own centre.
  embeddings = sign * centers.T.copy()
  labels = np.array([0, 1, 2], np.int32)

  def loss(e, c):
    return losses.margin_loss(e, c, labels, **margins)[0]

  value, (grad_e, grad_c) = jax.value_and_grad(loss, argnums=(0, 1))(embeddings, centers)
  assert np.isfinite(float(value))
  assert np.all(np.isfinite(grad_e)) and np.all(np.isfinite(grad_c))
  # Also finite through jit (XLA may fuse differently).
  jit_grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(embeddings, centers)
  assert all(np.all(np.isfinite(g)) for g in jit_grads)


def test_zero_embedding_gives_finite_loss_and_gradient():
  embeddings = np.zeros((2, 4), np.float32)
  centers = np.eye(4, 3, dtype=np.float32)
  labels = np.array([0, 2], np.int32)
  grad = jax.grad(lambda e: losses.margin_loss(e, centers, labels, **ARCFACE)[0])(embeddings)
  assert np.all(np.isfinite(grad))


def test_bfloat16_embeddings_compute_in_float32():
  embeddings, centers, labels = _random_problem(seed=5)
  logits_bf16 = losses.margin_logits(jnp.asarray(embeddings, jnp.bfloat16), centers, labels)
  logits_f32 = losses.margin_logits(jnp.asarray(embeddings, jnp.bfloat16).astype(jnp.float32), centers, labels)
  assert logits_bf16.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(logits_bf16), np.asarray(logits_f32))
  loss, aux = losses.margin_loss(jnp.asarray(embeddings, jnp.bfloat16), centers, labels)
  assert loss.dtype == jnp.float32 and aux["accuracy"].dtype == jnp.float32


def test_margin_loss_matches_cross_entropy_and_aux():
  embeddings, centers, labels = _random_problem(seed=6, batch=16, classes=4)
  loss, aux = losses.margin_loss(embeddings, centers, labels, scale=16.0, m3=0.2)
  logits = np.asarray(losses.margin_logits(embeddings, centers, labels, scale=16.0, m3=0.2), np.float64)
  log_probs = logits - np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1, keepdims=True)) - logits.max(
      1, keepdims=True
  )
  expected = -np.mean(log_probs[np.arange(16), labels])
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  cosines = _numpy_cosines(embeddings, centers)
  np.testing.assert_allclose(float(aux["accuracy"]), np.mean(cosines.argmax(1) == labels), atol=1e-6)
  np.testing.assert_allclose(float(aux["target_cosine"]), cosines[np.arange(16), labels].mean(), atol=1e-5)


@pytest.mark.parametrize("name", ["arcface", "cosface", "sphereface"])
def test_loss_decreases_on_separable_problem(name):
  margins = dict(ALL_MARGINS[name], scale=16.0)
  num_classes, per_class, dim = 4, 4, 8
  key_centers, key_noise, key_init = jax.random.split(jax.random.key(0), 3)
  true_centers = jax.random.normal(key_centers, (num_classes, dim))
  labels = jnp.repeat(jnp.arange(num_classes), per_class)
  embeddings = true_centers[labels] + 0.3 * jax.random.normal(key_noise, (num_classes * per_class, dim))
  params = (embeddings, losses.init_class_centers(key_init, dim, num_classes) * 100.0)

  def loss_fn(p):
    return losses.margin_loss(p[0], p[1], labels, **margins)

  @jax.jit
  def train(p):
    def step(p, _):
      (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
      return jax.tree_util.tree_map(lambda x, g: x - 0.05 * g, p, grads), loss

    return jax.lax.scan(step, p, None, length=300)

  initial_loss, _ = loss_fn(params)
  final_params, history = train(params)
  final_loss, aux = loss_fn(final_params)
  assert np.all(np.isfinite(history))
  assert float(final_loss) < 0.2 * float(initial_loss), (float(initial_loss), float(final_loss))
  assert float(aux["accuracy"]) == 1.0


def test_margin_input_errors():
  embeddings, centers, labels = _random_problem()
  with pytest.raises(ValueError, match="m1"):
    losses.margin_logits(embeddings, centers, labels, m1=0.5)
  with pytest.raises(ValueError, match="m2"):
    losses.margin_logits(embeddings, centers, labels, m2=-0.1)
  with pytest.raises(ValueError, match="scale"):
    losses.margin_logits(embeddings, centers, labels, scale=0.0)
  with pytest.raises(ValueError, match="scale"):  # also when m3 is a schedule (an array), as under margin warmup
    losses.margin_loss(embeddings, centers, labels, scale=-1.0, m3=jnp.asarray(0.2))
  with pytest.raises(ValueError, match="m2"):
    losses.margin_loss(embeddings, centers, labels, m2=4.0, m3=jnp.asarray(0.2))
  with pytest.raises(ValueError, match="dim"):
    losses.margin_logits(embeddings, centers.T, labels)
  with pytest.raises(ValueError, match="shape"):
    losses.margin_logits(embeddings, centers, labels[:-1])
  bad = labels.copy()
  bad[2] = 5
  with pytest.raises(ValueError, match="got 5 at index 2"):
    losses.margin_logits(embeddings, centers, bad)
  with pytest.raises(TypeError, match="margin"):
    losses.margin_loss(embeddings, centers, labels, margin=0.3)


# ---------------------------------------------------------------------------------------------
# Domain routing losses


def test_entropy_loss_extremes():
  one_hot = jax.nn.one_hot(jnp.array([0, 2, 1]), 3)
  assert float(losses.entropy_loss(one_hot)) == 0.0
  uniform = jnp.full((4, 3), 1.0 / 3.0)
  np.testing.assert_allclose(float(losses.entropy_loss(uniform)), math.log(3), rtol=1e-6)
  grad = jax.grad(losses.entropy_loss)(one_hot)
  assert np.all(np.isfinite(grad))


def test_balance_loss_extremes():
  # Every image confident, but the batch covers all domains equally: balanced.
  spread = jax.nn.one_hot(jnp.array([0, 1, 2, 0, 1, 2]), 3)
  np.testing.assert_allclose(float(losses.balance_loss(spread)), 0.0, atol=1e-6)
  np.testing.assert_allclose(float(losses.balance_loss(jnp.full((5, 3), 1 / 3))), 0.0, atol=1e-6)
  collapsed = jax.nn.one_hot(jnp.array([1, 1, 1, 1]), 3)
  np.testing.assert_allclose(float(losses.balance_loss(collapsed)), math.log(3), rtol=1e-6)
  assert np.all(np.isfinite(jax.grad(losses.balance_loss)(collapsed)))


def test_supervised_domain_loss_ignores_unlabelled():
  logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0], [5.0, -5.0, 0.0]])
  labels = jnp.array([0, -1, 2])
  log_probs = np.asarray(jax.nn.log_softmax(logits))
  expected = -(log_probs[0, 0] + log_probs[2, 2]) / 2
  np.testing.assert_allclose(float(losses.supervised_domain_loss(logits, labels)), expected, rtol=1e-6)
  grad = jax.grad(losses.supervised_domain_loss)(logits, labels)
  np.testing.assert_array_equal(np.asarray(grad[1]), 0.0)  # the unlabelled row gets no gradient


def test_supervised_domain_loss_all_unlabelled_is_zero():
  logits = jnp.array([[2.0, 0.0], [0.0, 3.0]])
  labels = jnp.array([-1, -1])
  value, grad = jax.value_and_grad(losses.supervised_domain_loss)(logits, labels)
  assert float(value) == 0.0
  np.testing.assert_array_equal(np.asarray(grad), 0.0)
  value_jit = jax.jit(losses.supervised_domain_loss)(logits, labels)
  assert float(value_jit) == 0.0
  with pytest.raises(ValueError, match="got 2 at index 1"):
    losses.supervised_domain_loss(logits, jnp.array([0, 2]))


def test_domain_losses_combines_weighted_terms():
  logits = jnp.array([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [-2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
  weights = jax.nn.softmax(logits)
  labels = jnp.array([0, -1, 1, -1])
  total, terms = losses.domain_losses(
      logits, weights, labels, entropy_weight=0.1, balance_weight=0.5, supervised_weight=2.0
  )
  assert set(terms) == {"entropy", "balance", "supervised"}
  np.testing.assert_allclose(float(terms["entropy"]), float(losses.entropy_loss(weights)), rtol=1e-6)
  np.testing.assert_allclose(float(terms["balance"]), float(losses.balance_loss(weights)), rtol=1e-6)
  np.testing.assert_allclose(
      float(terms["supervised"]), float(losses.supervised_domain_loss(logits, labels)), rtol=1e-6
  )
  expected = 0.1 * terms["entropy"] + 0.5 * terms["balance"] + 2.0 * terms["supervised"]
  np.testing.assert_allclose(float(total), float(expected), rtol=1e-6)

  def total_from_logits(lg):
    return losses.domain_losses(
        lg, jax.nn.softmax(lg), labels, entropy_weight=0.1, balance_weight=0.5, supervised_weight=2.0
    )[0]

  grad = jax.grad(total_from_logits)(logits)
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)

  total_no_labels, terms_no_labels = losses.domain_losses(
      logits, weights, None, entropy_weight=0.1, balance_weight=0.5, supervised_weight=0.0
  )
  assert float(terms_no_labels["supervised"]) == 0.0
  np.testing.assert_allclose(float(total_no_labels), float(0.1 * terms["entropy"] + 0.5 * terms["balance"]), rtol=1e-6)
  with pytest.raises(ValueError, match="no domain labels"):
    losses.domain_losses(logits, weights, None, entropy_weight=0.1, balance_weight=0.0, supervised_weight=1.0)


def test_balance_term_prevents_routing_collapse():
  # Features that share a large common component (as pooled image features do): entropy
  # minimisation alone sends every image to one domain; with the balance term the batch keeps
  # using all domains while each image still routes confidently.
  features = 1.0 + 0.3 * jax.random.normal(jax.random.key(1), (24, 6))
  init = 0.1 * jax.random.normal(jax.random.key(2), (6, 3))

  def routing_after_training(balance_weight):
    def loss_fn(w):
      logits = features @ w
      return losses.domain_losses(
          logits, jax.nn.softmax(logits), None, entropy_weight=1.0, balance_weight=balance_weight,
          supervised_weight=0.0,
      )[0]

    def step(w, _):
      return w - 0.5 * jax.grad(loss_fn)(w), None

    w, _ = jax.lax.scan(step, init, None, length=1000)
    return jax.nn.softmax(features @ w)

  collapsed = routing_after_training(0.0)
  assert float(losses.balance_loss(collapsed)) > 0.9 * math.log(3)
  balanced = routing_after_training(2.0)
  assert float(losses.balance_loss(balanced)) < 0.05
  assert float(losses.entropy_loss(balanced)) < 0.35 * math.log(3)
