"""Gradient accumulation (optim.accumulate_steps): N micro-batches make the update of one batch N times as large, for
LoRA and for DA-LoRA with its batch-level balance loss, without moving images between devices; a run resumed after a
checkpoint ends where an uninterrupted one does; a batch that does not split is refused."""

import json
import shutil

import jax
import numpy as np
import optax
import pytest
from conftest import TINY_RUN
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from adaptface_jax import run_state, train, trainable_rules
from adaptface_jax.models import hf_weights
from configs import common, dalora_dino

BATCH = 8


@pytest.fixture(scope="module")
def one_block(tmp_path_factory):
  """A local 1-block variant of the tiny ViT (random weights): the compiled steps, not the depth, are under test."""
  path = tmp_path_factory.mktemp("one_block")
  (path / "config.json").write_text(json.dumps(dict(hf_weights.PRESETS["tiny-dinov2"], num_hidden_layers=1)))
  return str(path)


def fake_batch():
  rng = np.random.RandomState(0)
  domain = (np.arange(BATCH) % 3).astype(np.int32)
  domain[[1, 2, 5]] = -1  # unlabelled images, unevenly spread over the micro-batches
  return {"image": rng.randint(0, 256, (BATCH, 56, 56, 3)).astype(np.uint8),
          "label": (np.arange(BATCH) % 4).astype(np.int32), "domain": domain}


def step_results(backbone: str, adapter: str, accumulate_steps: tuple[int, ...]) -> dict:
  """{N: (updated trainable leaves, metrics, compiled HLO)} of one step on `fake_batch` with accumulate_steps=N, from
  the same initial state, the batch sharded over up to 2 devices."""
  config = common.experiment("dino", adapter, "tiny")
  config.model.backbone = backbone
  config.model.image_size = 56
  config.router.dropout = 0.0  # dropout masks are drawn per micro-batch: equality holds without dropout only
  config.loss.balance_weight = 0.5
  config.loss.supervised_weight = 0.5 if adapter == "dalora" else 0.0
  model, state, frozen, _, schedule = run_state.setup(config, num_classes=4, steps=1)
  # Plain SGD makes the update a fixed multiple of the gradient. Adam's first update is ~lr * sign(g), which would
  # turn float rounding in near-zero gradients into differences as large as the learning rate.
  tx = optax.sgd(0.1)
  state = state.replace(opt_state=tx.init(state.trainable))
  mesh = Mesh(np.asarray(jax.devices()[:2]), ("data",))
  replicated, data = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
  state, frozen = jax.device_put(state, replicated), jax.device_put(frozen, replicated)
  batch = jax.device_put(fake_batch(), data)
  results = {}
  for n in accumulate_steps:
    step = jax.jit(train.make_train_step(model, tx, schedule, config.loss, accumulate_steps=n),
                   in_shardings=(replicated, replicated, data), out_shardings=(replicated, replicated))
    compiled = step.lower(state, frozen, batch).compile()
    updated, metrics = compiled(state, frozen, batch)
    trainable = {k: np.asarray(v) for k, v in trainable_rules.flatten(jax.device_get(updated.trainable)).items()}
    results[n] = trainable, {k: float(v) for k, v in jax.device_get(metrics).items()}, compiled.as_text()
  return results


@pytest.mark.parametrize("adapter", ["lora", "dalora"])
def test_micro_batches_update_like_one_batch(one_block, adapter):
  results = step_results(one_block, adapter, (1, 2, 4))
  params, metrics, _ = results[1]
  if adapter == "dalora":
    assert {"loss/domain_balance", "loss/domain_supervised", "routing/mean_w2", "routing/max_w"} <= set(metrics)
    assert metrics["loss/domain_balance"] > 1e-3 and metrics["loss/domain_supervised"] > 1e-3
  for n in (2, 4):
    accumulated, accumulated_metrics, hlo = results[n]
    assert accumulated.keys() == params.keys() and accumulated_metrics.keys() == metrics.keys()
    for key, value in params.items():
      np.testing.assert_allclose(accumulated[key], value, rtol=0, atol=1e-5, err_msg=f"N={n}: {key}")
    for key, value in metrics.items():  # the scalars (grad_norm ~1e2) to float32 resolution of their magnitude
      np.testing.assert_allclose(accumulated_metrics[key], value, rtol=1e-6, atol=1e-6, err_msg=f"N={n}: {key}")
    # Each device computes its own rows of every micro-batch: no images are exchanged between devices (checked where
    # the process has 2 devices, e.g. XLA_FLAGS=--xla_force_host_platform_device_count=2).
    assert "all-to-all" not in hlo and "collective-permute" not in hlo and "all-gather" not in hlo


def tiny_dalora_config(backbone, **overrides):
  config = dalora_dino.get_config("demo,tiny,steps=4")
  config.update_from_flattened_dict({**TINY_RUN, "model.backbone": backbone, "eval.benchmarks": (),
                                     "checkpoint_every": 2, "optim.accumulate_steps": 2, **overrides})
  return config


def trainable_leaves(workdir):
  config, _, variables, meta = run_state.load_run(str(workdir))
  trainable, _ = trainable_rules.split(variables, config.trainable)
  return meta["step"], {k: np.asarray(v) for k, v in trainable_rules.flatten(trainable).items()}


def logged_losses(workdir) -> list[dict]:
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in line.items() if k == "step" or k.startswith(("loss/", "routing/"))} for line in lines]


def test_a_resumed_accumulating_run_ends_like_an_uninterrupted_one(tmp_path, cache_dir, one_block):
  straight = tmp_path / "straight"
  train.train_and_evaluate(tiny_dalora_config(one_block), str(straight))
  # The workdir as a run stopped right after its step-2 checkpoint leaves it: its later checkpoint, summary and
  # log lines taken away. A step consumes its whole batch, so no stop can fall between two micro-batches.
  resumed = tmp_path / "resumed"
  shutil.copytree(straight, resumed)
  shutil.rmtree(resumed / "checkpoints" / "last" / "4")
  (resumed / "summary.json").unlink()
  log = resumed / "metrics.jsonl"
  log.write_text("".join(line + "\n" for line in log.read_text().splitlines() if json.loads(line)["step"] <= 2))
  assert train.train_and_evaluate(tiny_dalora_config(one_block), str(resumed))  # {} had it found nothing to do
  # Steps 3 and 4 ran again, from the restored state, to the same losses and weights.
  assert [line["step"] for line in logged_losses(resumed)] == [1, 2, 3, 4]
  assert logged_losses(resumed) == logged_losses(straight)
  step_a, a = trainable_leaves(straight)
  step_b, b = trainable_leaves(resumed)
  assert step_a == step_b == 4 and a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(b[key], a[key], err_msg=key)


def test_a_batch_that_does_not_split_into_micro_batches_is_refused(tmp_path, one_block):
  with pytest.raises(ValueError, match=r"--config\.data\.batch_size=8.*--config\.optim\.accumulate_steps=3"):
    train.train_and_evaluate(tiny_dalora_config(one_block, **{"optim.accumulate_steps": 3}), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
