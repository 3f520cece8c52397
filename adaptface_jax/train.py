"""The training loop: `train_and_evaluate(config, workdir)`.

State is a plain pytree {step, trainable, opt_state, rng}. The frozen subtree (pretrained backbone) is a separate,
non-donated argument of the jitted step: `jax.value_and_grad` differentiates `trainable` alone, so no gradient and
no optimizer state ever exist for frozen weights.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from adaptface_jax import checkpoints, losses, peers, sharding, trainable_rules
from adaptface_jax.metrics_log import MetricsLog
from adaptface_jax.models import face_model
from adaptface_jax.models.preprocess import preprocess
from adaptface_jax.run_state import TrainState, init_from_run, setup

log = logging.getLogger(__name__)


def loss_fn(trainable, frozen, batch, rng, *, model: face_model.FaceModel, loss_config, step=None, whole_batch=None,
            head: losses.ClassHead | None = None):
  """Margin loss + weighted domain losses. Returns (total, metrics).

  With loss_config.margin_warmup_steps > 0 the cosine margin m3 grows linearly from 0 over that many steps (`step`):
  a backbone trained from scratch first learns under a plain normalised softmax, then under the CosFace margin.
  `whole_batch`: when `batch` is a micro-batch of gradient accumulation, what its domain losses need of the whole
  batch ({"mean_weights", "num_labelled"}, see make_train_step). `head` (sharding.class_head): padded, sharded or
  sampled class centres; None: a plain replicated head.
  """
  variables, centers = face_model.split_margin(trainable_rules.merge(trainable, frozen))
  out = model.apply(variables, batch["image"], batch.get("domain"), train=True, rngs={"dropout": rng})
  c = loss_config
  ramp = 1.0
  if c.get("margin_warmup_steps", 0) and step is not None:
    ramp = jnp.minimum(1.0, step / c.margin_warmup_steps)
  margin_value, aux = losses.margin_loss(out["embedding"], centers, batch["label"], scale=c.scale,
                                         m1=c.m1, m2=c.m2, m3=c.m3 * ramp, head=head, rng=jax.random.fold_in(rng, 1))
  metrics = {"loss/margin": margin_value, "train_accuracy": aux["accuracy"]}
  total = margin_value
  if out["domain_weights"] is not None:
    weights = out["domain_weights"]
    if out["domain_logits"] is not None:
      labels = batch.get("domain") if c.supervised_weight > 0 else None
      whole = whole_batch or {}
      domain_total, terms = losses.domain_losses(
          out["domain_logits"], weights, labels, entropy_weight=c.entropy_weight,
          balance_weight=c.balance_weight, supervised_weight=c.supervised_weight,
          batch_mean=whole.get("mean_weights"), num_labelled=whole.get("num_labelled"))
      total = total + domain_total
      metrics.update({f"loss/domain_{k}": v for k, v in terms.items()})
    mean_weights = weights.mean(axis=0)
    metrics.update({f"routing/mean_w{k}": mean_weights[k] for k in range(weights.shape[-1])})
    metrics["routing/max_w"] = weights.max(axis=-1).mean()
  metrics["loss/total"] = total
  return total, metrics


def make_train_step(model, tx, schedule, loss_config, accumulate_steps: int = 1, head: losses.ClassHead | None = None):
  """The train step: the gradient of `loss_fn` on the batch, then one optimizer update.

  With accumulate_steps N > 1 the batch (config.data.batch_size, the effective batch) is split into N micro-batches
  that run forward and backward one after the other, and their mean gradient makes the one update: the activation
  memory of a batch of B/N, the update of a batch of B, equal to it up to float rounding (loss, metrics, gradients)
  where nothing is random: dropout masks (and Partial FC's sampled centres) are drawn per micro-batch. The step
  consumes the whole batch, so no half-accumulated state ever exists between steps (checkpoints and resumption are
  unchanged).

  The balance loss is a function of the batch-mean routing, not a mean over images: with learned routing and
  balance_weight > 0, a forward-only pass first computes the routing of every micro-batch (the router, and for
  router.input "frozen_cls" the frozen backbone it reads; with the micro-batch's rng, so the same router dropout),
  and each micro-batch's balance loss is evaluated at the whole batch's mean (losses.balance_loss).
  """
  learned_balance = model.num_domains > 1 and model.router_mode == "learned" and loss_config.balance_weight > 0
  loss = functools.partial(loss_fn, model=model, loss_config=loss_config, head=head)
  grad_fn = jax.value_and_grad(loss, has_aux=True)

  def accumulated(trainable, frozen, batch, rng, step):
    n = accumulate_steps
    if batch["label"].shape[0] % n:
      raise ValueError(f"a batch of {batch['label'].shape[0]} does not split into optim.accumulate_steps={n} "
                       "equal micro-batches")
    micro, rngs = _micro_batches(batch, n), jax.random.split(rng, n)
    whole = {}
    if learned_balance:
      variables, _ = face_model.split_margin(trainable_rules.merge(trainable, frozen))
      routing = lambda xs: model.apply(variables, xs[0]["image"], xs[0].get("domain"), rngs={"dropout": xs[1]},
                                       method=_training_routing).mean(axis=0)
      whole["mean_weights"] = jax.lax.map(routing, (micro, rngs)).mean(axis=0)
    if loss_config.supervised_weight > 0 and "domain" in batch:
      whole["num_labelled"] = jnp.maximum(jnp.sum(batch["domain"] >= 0), 1) / n

    def add(grad_sum, xs):
      (_, metrics), grads = grad_fn(trainable, frozen, xs[0], xs[1], step=step, whole_batch=whole)
      return jax.tree.map(jnp.add, grad_sum, grads), metrics

    grad_sum, metrics = jax.lax.scan(add, jax.tree.map(jnp.zeros_like, trainable), (micro, rngs))
    metrics = jax.tree.map(lambda m: m.mean(axis=0), metrics)
    if "loss/domain_balance" in metrics:  # the whole batch's, also where balance_weight is 0 (no first pass)
      mean_weights = jnp.stack([metrics[f"routing/mean_w{k}"] for k in range(model.num_domains)])
      metrics["loss/domain_balance"] = losses.balance_loss(mean_weights[None])
    return jax.tree.map(lambda g: g / n, grad_sum), metrics

  def train_step(state: TrainState, frozen, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    if accumulate_steps == 1:
      (_, metrics), grads = grad_fn(state.trainable, frozen, batch, rng, step=state.step)
    else:
      grads, metrics = accumulated(state.trainable, frozen, batch, rng, state.step)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["lr"] = schedule(state.step)
    return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics
  return train_step


def _micro_batches(batch: dict, n: int) -> dict:
  """[B, ...] -> [n, B/n, ...], micro-batch j taking rows j, n + j, 2n + j, ...: each device's contiguous rows of
  the sharded batch hold an equal share of every micro-batch (B a multiple of n x devices), so nothing moves
  between devices."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), batch)


def _training_routing(model: face_model.FaceModel, images, domain_labels):
  """The routing weights of a training forward (FaceModel.__call__), without the adapted backbone pass."""
  x = preprocess(images, image_size=model.image_size, family=model.vit.family, dtype=model.dtype)
  return model.route(x, domain_labels, deterministic=False)[1]


class _StopOnSigterm:
  """SIGTERM (a scheduler pre-empting the job) asks the loop to checkpoint and exit cleanly."""

  def __init__(self):
    self.requested = threading.Event()
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self.requested.set())
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _data_source(config):
  """(num_examples, num_classes) of the training set, failing early with what is missing and how to provide it."""
  from adaptface_jax.data import pipeline  # TensorFlow is imported only when data is needed
  info = pipeline.dataset_info(config.data.train, data_dir=config.data.data_dir or None,
                               manual_dir=config.data.manual_dir or None)
  num_classes = config.data.num_classes or info["num_classes"]
  if config.data.num_classes and config.data.num_classes != info["num_classes"]:
    raise ValueError(f"config.data.num_classes={config.data.num_classes} but {config.data.train} has "
                     f"{info['num_classes']} identities; fix the config or the data")
  return info["num_examples"], num_classes


def total_steps(config, num_examples: int) -> int:
  if config.total_steps:
    return int(config.total_steps)
  return int(config.num_epochs * num_examples // config.data.batch_size)


def jit_train_step(model, tx, schedule, loss_config, mesh: Mesh, head: losses.ClassHead | None = None,
                   state_sharding=None, accumulate_steps: int = 1):
  """The train step jitted for `mesh`: the state placed by `state_sharding` (sharding.state_shardings; replicated
  when None), frozen replicated, the batch sharded; the state is donated. `head` (sharding.class_head) goes to the
  margin loss; XLA inserts the collectives a sharded head needs."""
  replicated, batch_sharding = sharding.shardings(mesh)
  state_sharding = replicated if state_sharding is None else state_sharding
  return jax.jit(make_train_step(model, tx, schedule, loss_config, accumulate_steps, head), donate_argnums=0,
                 in_shardings=(state_sharding, replicated, batch_sharding), out_shardings=(state_sharding, replicated))


def _global_batch(local_batch: dict, sharding) -> dict:
  """Per-process numpy batch -> one global array per key, sharded over the data axis of all devices."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from `workdir` when it holds checkpoints), evaluates periodically, returns the final metrics
  of this invocation ({} for a run that was finished already: it is left as it is)."""
  run_start = time.perf_counter()
  workdir = Path(workdir).expanduser()
  # Everything that can refuse the run (batch, data, backbone, checkpoints, benchmarks) is checked before the
  # workdir is created or written: a refused command leaves no half-made workdir behind.
  init_from = config.get("init_from", "")
  if init_from and Path(init_from).expanduser().resolve() == workdir.resolve():
    raise ValueError(f"--config.init_from={init_from} is this run's own --workdir; give another workdir to the new "
                     "run (rerunning the command on its workdir resumes it without init_from)")
  mesh = sharding.data_mesh()
  accumulate = config.optim.get("accumulate_steps", 1)
  if accumulate < 1 or config.data.batch_size <= 0 or config.data.batch_size % (accumulate * mesh.size):
    raise ValueError(f"--config.data.batch_size={config.data.batch_size} with --config.optim.accumulate_steps="
                     f"{accumulate}: the global batch must be a positive multiple of accumulate_steps (>= 1) x the "
                     f"{mesh.size} device(s) it is sharded over: each micro-batch is split over all devices")
  num_examples, num_classes = _data_source(config)
  steps = total_steps(config, num_examples)
  model, state, frozen, tx, schedule = setup(config, num_classes, steps)
  frozen_fingerprint = checkpoints.fingerprint(frozen)

  manager = checkpoints.Checkpoints(workdir / "checkpoints", keep=config.keep_checkpoints,
                                    best_metric=config.eval.best_metric)
  peers.progress.checkpoints = manager.directory / "last"
  restored = manager.restore_latest(state, expected_fingerprint=frozen_fingerprint)
  if restored is not None:
    state = restored
    if int(state.step) >= steps:  # rerunning a finished command must not rewrite its summary or results
      log.info("%s is finished (step %d of %d): nothing to do", workdir, int(state.step), steps)
      manager.close()
      if not (workdir / "summary.json").exists() and jax.process_index() == 0:
        # The run ended between its final checkpoint and its summary: write the summary from its metrics log.
        logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        final = {k: v for line in logged for k, v in line.items() if k not in ("step", "time")}
        _write_summary(workdir, config, state, frozen, steps, final, wall_time=None)
        log.info("wrote its missing summary.json")
      return {}
    log.info("resumed from step %d%s", int(state.step),
             " (init_from applies to a fresh workdir only)" if init_from else "")
  elif init_from:  # a new run (step 0) from another run's trainable weights, with a fresh optimizer and schedule
    state = init_from_run(state, frozen, config, init_from, tx=tx)
  log.info("batch %d sharded over %d %s device(s)", config.data.batch_size, mesh.size, jax.default_backend())
  replicated, batch_sharding = sharding.shardings(mesh)
  head = sharding.class_head(config.get("centers"), mesh, num_classes, model.output_dim)
  log.info("class centres of %d identities %s%s", num_classes,
           f"sharded over {head.shards} devices" if head.shards > 1 else "replicated",
           f", Partial FC at rate {head.sample_rate}" if head.sample_rate < 1 else "")
  state = sharding.place_state(state, mesh, head)  # the centres padded and split over the devices when sharded
  frozen = sharding.put(frozen, replicated)
  step_fn = jit_train_step(model, tx, schedule, config.loss, mesh, head, sharding.state_shardings(state, mesh, head),
                           accumulate_steps=accumulate)

  from adaptface_jax.data import pipeline
  start = int(state.step)
  batches: Iterator[dict] = pipeline.train_iterator(
      config.data.train, data_dir=config.data.data_dir or None, manual_dir=config.data.manual_dir or None,
      batch_size=config.data.batch_size, seed=config.seed, flip=config.data.flip,
      randaugment=tuple(config.data.randaugment) or None, shuffle_buffer=config.data.shuffle_buffer,
      process_index=jax.process_index(), process_count=jax.process_count(), start_step=start)
  eval_every = config.eval.every_steps or max(1, num_examples // config.data.batch_size)
  evaluator = _make_evaluator(config, model, frozen, mesh)

  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  metrics_log = MetricsLog(workdir, enabled=jax.process_index() == 0)
  last_metrics: dict = {}
  with _StopOnSigterm() as stop, metrics_log.progress(total=steps, initial=start) as bar:
    window_start, window_images = time.perf_counter(), 0
    for step in range(start, steps):
      batch = _global_batch(next(batches), batch_sharding)
      with jax.transfer_guard("disallow"):  # the step itself must not copy between host and device
        state, metrics = step_fn(state, frozen, batch)
      window_images += config.data.batch_size
      done = step + 1
      peers.progress.step = done
      stopping = stop.requested.is_set()  # read once: a signal arriving later is handled at the next step
      evaluate_now = evaluator is not None and (done % eval_every == 0 or done == steps)
      save_now = done % config.checkpoint_every == 0 or done == steps or evaluate_now or stopping
      log_now = done % config.log_every == 0 or done == steps
      if log_now or save_now:
        # Checked before every save: NaN parameters make every later loss NaN, so no bad checkpoint is written.
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
        if bad:
          raise FloatingPointError(f"non-finite training metrics at step {done}: {bad}; the last good checkpoint "
                                   f"in {manager.directory} is untouched (lower optim.lr or check the data)")
      if log_now:
        metrics["images_per_sec"] = window_images / max(time.perf_counter() - window_start, 1e-9)
        metrics_log.write(done, metrics)
        bar.set_postfix(loss=f"{metrics['loss/total']:.3f}", img_s=f"{metrics['images_per_sec']:.1f}")
        window_start, window_images = time.perf_counter(), 0
        last_metrics.update(metrics)
      bar.update(1)
      accuracies = None
      if evaluate_now:
        accuracies = {name: r["accuracy"] for name, r in evaluator(state.trainable, workdir, step=done).items()}
        metrics_log.write(done, {f"eval/{name}": a for name, a in accuracies.items()})
        last_metrics.update({f"eval/{name}": a for name, a in accuracies.items()})
      if save_now:  # the state of the true number of classes (all processes take part when it is cut)
        saved = sharding.checkpoint_state(state, mesh, head)
        manager.save(done, saved, frozen_fingerprint=frozen_fingerprint, num_classes=num_classes, total_steps=steps,
                     metrics=accuracies)
      if stopping:
        log.warning("SIGTERM: checkpoint saved at step %d, exiting", done)
        break
  manager.close()
  metrics_log.close()
  if int(jax.device_get(state.step)) == steps and jax.process_index() == 0:  # the last step was saved
    _write_summary(workdir, config, saved, frozen, steps, last_metrics, time.perf_counter() - run_start)
  return last_metrics


def _write_summary(workdir, config, state, frozen, steps, metrics, wall_time):
  """summary.json marks a finished run (the ablation runner skips those) and feeds the study report."""
  count = lambda tree: int(sum(np.size(x) for x in jax.tree.leaves(tree)))
  summary = {"experiment": config.get("experiment", ""), "steps": steps, "batch_size": config.data.batch_size,
             "wall_time_s_last_session": wall_time, "trainable_params": count(state.trainable),
             "frozen_params": count(frozen), "final_metrics": metrics}
  (workdir / "summary.json").write_text(json.dumps(summary, indent=2))


def _make_evaluator(config, model, frozen, mesh):
  """Periodic verification on config.eval.benchmarks (None when none are configured)."""
  if not config.eval.benchmarks:
    return None
  from adaptface_jax import embeddings
  return embeddings.Evaluator(config, model, frozen, mesh)
