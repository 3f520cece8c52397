"""Face-recognition margin losses and the DA-LoRA domain-routing losses.

Everything here is a pure function of arrays, so it can be jitted, differentiated and tested
without any module state. All arithmetic runs in float32: margin logits are multiplied by a
scale of ~64, and bfloat16 cannot resolve the cosine differences a margin of 0.35 / 64 makes.

Margin family (InsightFace's combined margin), for the target class with angle theta:

    logit = scale * (cos(m1 * theta + m2) - m3)        other classes: scale * cos(theta)

    ArcFace    m1=1, m2=0.5, m3=0      additive angular margin
    CosFace    m1=1, m2=0,   m3=0.35   additive cosine margin (no trigonometry is evaluated)
    SphereFace m1>1                    multiplicative angular margin
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Squared-norm floor for L2 normalisation: keeps an all-zero vector from dividing by zero.
_NORM_EPS = 1e-12
# Distance kept from cos = +-1 before arccos, whose derivative is infinite there.
# 1e-6 is still representable next to 1.0 in float32 (spacing ~6e-8).
_ARCCOS_EPS = 1e-6
# Floor under 1 - cos^2 before sqrt, whose derivative is infinite at 0.
_SIN_SQ_EPS = 1e-12


def init_class_centers(rng: jax.Array, embedding_dim: int, num_classes: int) -> jnp.ndarray:
  """Class-centre matrix [embedding_dim, num_classes], normal with std 0.01 (as partial-FC).

  The scale of the init does not change the logits (centres are normalised), only the
  effective step size the optimiser sees on them.
  """
  if embedding_dim <= 0 or num_classes <= 0:
    raise ValueError(
        f"embedding_dim and num_classes must be positive, got {embedding_dim} and {num_classes}"
    )
  return 0.01 * jax.random.normal(rng, (embedding_dim, num_classes), dtype=jnp.float32)


def safe_l2_normalize(x: jnp.ndarray, axis: int = -1) -> jnp.ndarray:
  """x / ||x|| along `axis`, finite (and with finite gradient) for an all-zero x (evaluation's
  verification.strict_l2_normalize refuses such rows instead)."""
  squared_norm = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared_norm, _NORM_EPS))


def _check_margins(scale: float, m1: float, m2: float, m3: float) -> tuple[float, float, float, float]:
  # float() makes a traced margin fail here, loudly: scale, m1 and m2 pick the code path, so they
  # must be static Python numbers (config values). The cosine margin m3 is only subtracted, so it
  # may also be a scalar array (a margin schedule, see train.loss_fn).
  scale, m1, m2 = float(scale), float(m1), float(m2)
  if not scale > 0:
    raise ValueError(f"margin scale must be > 0, got {scale}")
  if not m1 >= 1.0:
    raise ValueError(f"multiplicative angular margin m1 must be >= 1, got {m1}")
  if not 0.0 <= m2 < math.pi:
    raise ValueError(f"additive angular margin m2 must be in [0, pi), got {m2}")
  if isinstance(m3, jax.Array):  # a schedule (the margin warmup): a traced value, not checked here
    return scale, m1, m2, m3
  m3 = float(m3)
  if not math.isfinite(m3):
    raise ValueError(f"additive cosine margin m3 must be finite, got {m3}")
  return scale, m1, m2, m3


def _check_label_shapes(embeddings: jnp.ndarray, centers: jnp.ndarray, labels: jnp.ndarray) -> None:
  if embeddings.ndim != 2 or centers.ndim != 2:
    raise ValueError(
        f"expected embeddings [batch, dim] and centers [dim, classes], got shapes "
        f"{embeddings.shape} and {centers.shape}"
    )
  if embeddings.shape[1] != centers.shape[0]:
    raise ValueError(
        f"embedding dim {embeddings.shape[1]} does not match centers dim {centers.shape[0]} "
        f"(centers are [dim, classes])"
    )
  if labels.shape != embeddings.shape[:1]:
    raise ValueError(f"labels must have shape {embeddings.shape[:1]}, got {labels.shape}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
  _check_label_range(labels, centers.shape[1], "class labels", allow_negative=False)


def _check_label_range(labels: jnp.ndarray, num_classes: int, what: str, *, allow_negative: bool) -> None:
  # Values can only be checked outside jit; inside jit an out-of-range label would silently
  # select nothing, so callers are expected to have validated their data pipeline.
  if isinstance(labels, jax.core.Tracer):
    return
  values = np.asarray(labels)
  if values.size == 0:
    return
  bad = values >= num_classes
  if not allow_negative:
    bad |= values < 0
  if np.any(bad):
    index = int(np.argmax(bad))
    allowed = f"< {num_classes} (negative = unlabelled)" if allow_negative else f"in [0, {num_classes})"
    raise ValueError(f"{what} must be {allowed}; got {int(values.flat[index])} at index {index}")


def _angular_target(target_cos: jnp.ndarray, m1: float, m2: float) -> jnp.ndarray:
  """cos(m1 * theta + m2), made monotonic in theta over [0, pi], from cos(theta)."""
  if m1 == 1.0:
    # ArcFace: cos(t + m) = cos t cos m - sin t sin m avoids arccos and its infinite slope at
    # +-1; the sqrt gets a floored argument for the same reason.
    sin = jnp.sqrt(jnp.maximum(1.0 - jnp.square(target_cos), _SIN_SQ_EPS))
    with_margin = target_cos * math.cos(m2) - sin * math.sin(m2)
    # Past theta = pi - m2 the angle would wrap and cos(theta + m2) would rise again. The
    # standard InsightFace fallback (easy_margin=False) switches to the cosine-margin form
    # cos(theta) - m2 * sin(m2) there: monotonic in theta, though not continuous.
    threshold = math.cos(math.pi - m2)
    fallback = target_cos - m2 * math.sin(m2)
    return jnp.where(target_cos > threshold, with_margin, fallback)

  # Multiplicative margin: the angle itself is needed. Clipping off the +-1 ends keeps the
  # arccos derivative finite (the clip passes zero gradient there, which is harmless: cos = 1 is
  # already the optimum and cos = -1 is a single point).
  theta = jnp.arccos(jnp.clip(target_cos, -1.0 + _ARCCOS_EPS, 1.0 - _ARCCOS_EPS))
  angle = m1 * theta + m2
  # SphereFace's monotonic extension past pi: on [k pi, (k+1) pi] use (-1)^k cos(angle) - 2k.
  # It equals cos(angle) for angle <= pi and keeps decreasing, continuously, beyond.
  k = jnp.floor(angle / math.pi)
  sign = 1.0 - 2.0 * jnp.mod(k, 2.0)
  return sign * jnp.cos(angle) - 2.0 * k


@dataclasses.dataclass(frozen=True)
class ClassHead:
  """How the class-centre matrix [D, C'] is laid out and how much of it a step uses.

  num_classes: the true number of classes; columns from it on are padding (the centres are padded to a multiple of
    `shards` so that they split evenly over devices) and never get a logit.
  shards: the columns form this many equal blocks, one per device when the head is sharded; Partial FC samples
    within each block, so that each device keeps its own centres.
  sample_rate: Partial FC. Below 1, each step keeps the batch's positive classes and random negatives, up to
    `sample_size` centres per block; the other centres get no logit and a zero gradient.
  logits_sharding: the placement of the [B, C'] cosines (classes along the mesh axis the centres are sharded over),
    so that every device computes the logits of its own centres; None for a replicated head.
  """
  num_classes: int
  shards: int = 1
  sample_rate: float = 1.0
  logits_sharding: Any = None

  def sample_size(self, columns: int, batch: int) -> int:
    """Centres sampled per block: the rate's share of the block, and at least the global batch (every positive
    class of the batch must fit) or the whole block."""
    per_shard = columns // self.shards
    return min(per_shard, max(math.ceil(self.sample_rate * per_shard), batch))

  def by_block(self, x: jnp.ndarray) -> jnp.ndarray:
    """x [shards, ...] with block i on device i, where the head is sharded: each device samples its own centres."""
    if self.logits_sharding is None:
      return x
    mesh, (_, axis) = self.logits_sharding.mesh, self.logits_sharding.spec
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis)))


def sample_classes(rng: jax.Array, centers: jnp.ndarray, labels: jnp.ndarray, head: ClassHead):
  """Partial FC (arcface_torch's PartialFC): in each block of centres, the positive classes of the (global) batch and
  random negatives, a fixed count per block so that shapes are static. Returns (sampled centres [D, shards * k],
  labels remapped to the sampled columns, which sampled columns are real classes).

  Positives score above every random negative and padding below, so top_k keeps all positives and picks padding
  only when a block has too few real classes. Gradients reach the sampled centres alone (through the gather).
  """
  dim, columns = centers.shape
  shards = head.shards
  per_shard = columns // shards
  k = head.sample_size(columns, labels.shape[0])
  block, local = labels // per_shard, labels % per_shard
  positive = jnp.zeros((shards, per_shard), bool).at[block, local].set(True)
  real = (jnp.arange(columns) < head.num_classes).reshape(shards, per_shard)
  score = jnp.where(positive, 2.0, jnp.where(real, jax.random.uniform(rng, (shards, per_shard)), -1.0))
  score = head.by_block(score)
  # [shards, k]: the k best of each block, in index order (as arcface_torch): at rate 1 the sample is the head itself.
  # A sort rather than lax.top_k, whose XLA custom call is not partitioned: each device sorts its own block.
  index = jnp.sort(jnp.argsort(-score, axis=1)[:, :k], axis=1)
  slot = jnp.zeros((shards, per_shard), jnp.int32).at[jnp.arange(shards)[:, None], index].set(jnp.arange(k))
  sampled = jnp.take_along_axis(centers.reshape(dim, shards, per_shard), index[None], axis=2)
  return (sampled.reshape(dim, shards * k), block * k + slot[block, local],
          jnp.take_along_axis(real, index, axis=1).reshape(-1))


def _cosines_and_logits(
    embeddings: jnp.ndarray,
    centers: jnp.ndarray,
    labels: jnp.ndarray,
    scale: float,
    m1: float,
    m2: float,
    m3: float,
    *,
    real: jnp.ndarray | None = None,
    sharding=None,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """(cosines, logits, target logits). Columns where `real` is False (padding) get -inf logits and cosines: no
  probability, no gradient. With `sharding` the [B, C] matrices are placed along the classes: every device
  multiplies the gathered embeddings by its own centres, and the reductions over classes (log-sum-exp, the target
  entries, argmax) combine the shards. The target entries are picked by a one-hot sum rather than a gather along the
  sharded axis, which XLA would serve by gathering the whole matrix."""
  scale, m1, m2, m3 = _check_margins(scale, m1, m2, m3)
  _check_label_shapes(embeddings, centers, labels)
  embeddings = safe_l2_normalize(embeddings.astype(jnp.float32), axis=1)
  centers = safe_l2_normalize(centers.astype(jnp.float32), axis=0)
  # Rounding can push |cos| a hair past 1; the margin formulas assume [-1, 1].
  cosines = jnp.clip(embeddings @ centers, -1.0, 1.0)
  if sharding is not None:
    cosines = jax.lax.with_sharding_constraint(cosines, sharding)

  is_target = jax.nn.one_hot(labels, cosines.shape[1], dtype=cosines.dtype)
  target_cos = jnp.sum(cosines * is_target, axis=1)
  if m1 == 1.0 and m2 == 0.0:
    target_with_margin = target_cos - m3
  else:
    target_with_margin = _angular_target(target_cos, m1, m2) - m3
  # Only the B target entries get the margin; adding the difference through the one-hot mask
  # avoids evaluating the margin on the whole [B, C] matrix.
  logits = scale * (cosines + is_target * (target_with_margin - target_cos)[:, None])
  if real is not None:
    cosines = jnp.where(real, cosines, -jnp.inf)
    logits = jnp.where(real, logits, -jnp.inf)
  return cosines, logits, scale * target_with_margin


def margin_logits(
    embeddings: jnp.ndarray,
    centers: jnp.ndarray,
    labels: jnp.ndarray,
    *,
    scale: float = 64.0,
    m1: float = 1.0,
    m2: float = 0.0,
    m3: float = 0.35,
) -> jnp.ndarray:
  """Combined-margin logits [batch, classes] (float32).

  Args:
    embeddings: [batch, dim], any float dtype; L2-normalised here.
    centers: [dim, classes]; each column L2-normalised here.
    labels: [batch] integer class ids in [0, classes).
    scale, m1, m2, m3: static Python floats, see the module docstring. Defaults are CosFace
      with the original project's s=64, m=0.35.
  """
  _, logits, _ = _cosines_and_logits(embeddings, centers, labels, scale, m1, m2, m3)
  return logits


def margin_loss(
    embeddings: jnp.ndarray,
    centers: jnp.ndarray,
    labels: jnp.ndarray,
    *,
    head: ClassHead | None = None,
    rng: jax.Array | None = None,
    **margins: float,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """Mean softmax cross-entropy over margin logits.

  `margins` are the keyword arguments of `margin_logits` (scale, m1, m2, m3). `head` describes padded, sharded or
  sampled centres (None: all columns are classes, nothing sampled); Partial FC (head.sample_rate < 1) draws its
  sample from `rng`.
  Returns (loss, aux) where aux holds:
    accuracy: fraction of images whose nearest centre (by plain cosine, no margin) is their own (among the
      sampled centres under Partial FC);
    target_cosine: mean cosine between each embedding and its own class centre.
  """
  unknown = set(margins) - {"scale", "m1", "m2", "m3"}
  if unknown:
    raise TypeError(f"unknown margin arguments {sorted(unknown)}; expected scale, m1, m2, m3")
  params = {"scale": 64.0, "m1": 1.0, "m2": 0.0, "m3": 0.35, **margins}
  real, sharding = None, None
  if head is not None:
    sharding = head.logits_sharding
    if head.sample_rate < 1.0:
      if rng is None:
        raise ValueError("Partial FC (sample_rate < 1) needs an rng")
      centers, labels, real = sample_classes(rng, centers, labels, head)
    elif head.num_classes < centers.shape[1]:
      real = jnp.arange(centers.shape[1]) < head.num_classes
  cosines, logits, target_logits = _cosines_and_logits(embeddings, centers, labels, **params, real=real,
                                                       sharding=sharding)
  loss = jnp.mean(jax.nn.logsumexp(logits, axis=1) - target_logits)
  is_target = jax.nn.one_hot(labels, cosines.shape[1], dtype=bool)
  aux = {
      "accuracy": jnp.mean((jnp.argmax(cosines, axis=1) == labels).astype(jnp.float32)),
      "target_cosine": jnp.mean(jnp.sum(jnp.where(is_target, cosines, 0.0), axis=1)),
  }
  return loss, aux


# ----------------------------------------------------------------------------------------------
# Domain routing (DA-LoRA). `weights` are the per-image routing probabilities [batch, domains],
# `logits` the domain classifier's pre-softmax outputs.


def _entropy(probabilities: jnp.ndarray, axis: int = -1) -> jnp.ndarray:
  # p log p -> 0 as p -> 0, but log(0) = -inf would give 0 * inf = NaN in both value and
  # gradient; the inner where keeps log's argument positive so neither branch makes a NaN.
  positive = probabilities > 0
  safe = jnp.where(positive, probabilities, 1.0)
  return -jnp.sum(jnp.where(positive, probabilities * jnp.log(safe), 0.0), axis=axis)


def _check_weights(weights: jnp.ndarray) -> jnp.ndarray:
  if weights.ndim != 2:
    raise ValueError(f"routing weights must be [batch, domains], got shape {weights.shape}")
  return weights.astype(jnp.float32)


def entropy_loss(weights: jnp.ndarray) -> jnp.ndarray:
  """Mean per-image routing entropy: 0 for one-hot routing, log K for uniform.

  Minimising it makes each image commit to one domain; on its own it tends to send every image
  to the same domain, which `balance_loss` counters.
  """
  return jnp.mean(_entropy(_check_weights(weights), axis=1))


def balance_loss(weights: jnp.ndarray, batch_mean: jnp.ndarray | None = None) -> jnp.ndarray:
  """log K - H(mean routing over the batch) = KL(mean routing || uniform).

  0 when the batch uses all domains equally, log K when every image picks the same domain.

  The loss is not a mean over images, so the losses of micro-batches do not average to the whole batch's. When
  `weights` are one of several equal micro-batches, `batch_mean` [K] is the whole batch's mean routing (computed
  beforehand): the loss is then evaluated there, and differentiated through this micro-batch's mean, so that the
  micro-batches' values and gradients average to the whole batch's (the chain rule through a mean of means).
  """
  weights = _check_weights(weights)
  num_domains = weights.shape[1]
  mean = jnp.mean(weights, axis=0)
  if batch_mean is not None:
    mean = jax.lax.stop_gradient(batch_mean.astype(jnp.float32)) + (mean - jax.lax.stop_gradient(mean))
  return math.log(num_domains) - _entropy(mean)


def supervised_domain_loss(logits: jnp.ndarray, domain_labels: jnp.ndarray,
                           num_labelled: jnp.ndarray | None = None) -> jnp.ndarray:
  """Softmax cross-entropy against domain labels, averaged over labelled images only.

  Labels < 0 mark images without a domain label. With no labelled image the loss is exactly 0
  (with zero gradient), never NaN. `num_labelled` (> 0) replaces this batch's count of labelled
  images (at least 1) as the divisor: one of N equal micro-batches passes 1/N of the whole batch's
  divisor, so that the micro-batches' losses average to the whole batch's however the labels fall.
  """
  if logits.ndim != 2:
    raise ValueError(f"domain logits must be [batch, domains], got shape {logits.shape}")
  if domain_labels.shape != logits.shape[:1]:
    raise ValueError(f"domain_labels must have shape {logits.shape[:1]}, got {domain_labels.shape}")
  if not jnp.issubdtype(domain_labels.dtype, jnp.integer):
    raise ValueError(f"domain_labels must be integers, got dtype {domain_labels.dtype}")
  _check_label_range(domain_labels, logits.shape[1], "domain labels", allow_negative=True)
  labelled = domain_labels >= 0
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=1)
  safe_labels = jnp.where(labelled, domain_labels, 0)
  nll = -jnp.take_along_axis(log_probs, safe_labels[:, None], axis=1)[:, 0]
  if num_labelled is None:
    num_labelled = jnp.maximum(jnp.sum(labelled), 1)
  return jnp.sum(jnp.where(labelled, nll, 0.0)) / jnp.asarray(num_labelled, jnp.float32)


def domain_losses(
    logits: jnp.ndarray,
    weights: jnp.ndarray,
    domain_labels: jnp.ndarray | None,
    *,
    entropy_weight: float,
    balance_weight: float,
    supervised_weight: float,
    batch_mean: jnp.ndarray | None = None,
    num_labelled: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """Weighted sum of the routing losses, and each unweighted term for logging.

  `domain_labels` may be None only when supervised_weight is 0 (the term is then logged as 0).
  For one of several equal micro-batches, `batch_mean` and `num_labelled` describe the whole batch
  (see `balance_loss` and `supervised_domain_loss`).
  Returns (total, {"entropy", "balance", "supervised"}).
  """
  if logits.shape != weights.shape:
    raise ValueError(
        f"domain logits {logits.shape} and routing weights {weights.shape} must have the same shape"
    )
  for name, value in (
      ("entropy_weight", entropy_weight),
      ("balance_weight", balance_weight),
      ("supervised_weight", supervised_weight),
  ):
    if not value >= 0:
      raise ValueError(f"{name} must be >= 0, got {value}")
  if domain_labels is None:
    if supervised_weight > 0:
      raise ValueError(
          f"supervised_weight is {supervised_weight} but no domain labels were given; "
          "pass labels (-1 for unlabelled images) or set supervised_weight to 0"
      )
    supervised = jnp.zeros((), jnp.float32)
  else:
    supervised = supervised_domain_loss(logits, domain_labels, num_labelled)
  terms = {
      "entropy": entropy_loss(weights),
      "balance": balance_loss(weights, batch_mean),
      "supervised": supervised,
  }
  total = (
      entropy_weight * terms["entropy"]
      + balance_weight * terms["balance"]
      + supervised_weight * terms["supervised"]
  )
  return total, terms
