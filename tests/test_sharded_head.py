"""The class head sharded along the classes (sharding.class_head / state_shardings) computes the replicated head's
loss and gradients, on 8 devices of one process and on 2 processes x 2 devices; Partial FC at rate 1 is the full
head; a padded sharded head is saved with its true shape; and the sharded train step holds a fraction of the
replicated one's memory for a large head.

The checks run in subprocesses that set their own device count before JAX starts (this process may have started
JAX already); each prints one JSON line of measurements, asserted here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
COSFACE = dict(scale=64.0, m1=1.0, m2=0.0, m3=0.35)
ARCFACE = dict(scale=64.0, m1=1.0, m2=0.5, m3=0.0)
# 301 classes on 8 devices: padded to 304, 38 per device. B = 16 embeddings of D = 16.
CLASSES, DIM, BATCH = 301, 16, 16


def _run(function: str, *args, devices: int, env=None, **popen):
  code = (f"import jax; jax.config.update('jax_platforms', 'cpu'); jax.config.update('jax_num_cpu_devices', {devices});"
          f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}];"
          f"import test_sharded_head as t; t.{function}(*sys.argv[1:])")
  env = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
  return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **popen)


def _result(proc, timeout=300) -> dict:
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1])


def _problem():
  rng = np.random.RandomState(0)
  embeddings = rng.randn(BATCH, DIM).astype(np.float32)
  centers = rng.randn(DIM, CLASSES).astype(np.float32)
  labels = rng.randint(0, CLASSES, BATCH).astype(np.int32)
  labels[:3] = [0, CLASSES - 1, CLASSES - 1]  # the first and the last class (on the device with padding)
  return embeddings, centers, labels


def _loss_and_grads(mesh, head, margins, rng=None):
  """(loss, grad embeddings, grad centres [D, C]) of the problem under `head` (None: replicated head), computed
  on `mesh` with the batch split and the centres placed as `head` says."""
  import jax
  import jax.numpy as jnp

  from adaptface_jax import losses, sharding
  embeddings, centers, labels = _problem()
  replicated, batch = sharding.shardings(mesh)
  plain = head is None
  head = head or losses.ClassHead(num_classes=CLASSES)
  state = sharding.pad_centers({"margin": {"centers": jnp.asarray(centers)}}, head)
  placed = sharding.put(state, sharding.state_shardings(state, mesh, head))
  fn = jax.jit(jax.value_and_grad(
      lambda e, s, y: losses.margin_loss(e, s["margin"]["centers"], y, head=None if plain else head, rng=rng,
                                         **margins)[0], argnums=(0, 1)), out_shardings=replicated)
  loss, (grad_e, grad_s) = fn(sharding.put(embeddings, batch), placed, sharding.put(labels, batch))
  grad_c = np.asarray(grad_s["margin"]["centers"])
  assert not grad_c[:, CLASSES:].any(), "padding centres must get no gradient"
  return float(loss), np.asarray(grad_e), grad_c[:, :CLASSES]


def _max_diffs(a, b) -> list[float]:
  return [float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b)]


def _sharded_vs_replicated(mesh) -> dict:
  from adaptface_jax import sharding
  out = {}
  for name, margins in (("cosface", COSFACE), ("arcface", ARCFACE)):
    head = sharding.class_head({"shard": "on"}, mesh, CLASSES, DIM)
    assert head.shards == mesh.size and sharding.padded_classes(head) % mesh.size == 0
    replicated = _loss_and_grads(mesh, None, margins)
    out[name] = _max_diffs(_loss_and_grads(mesh, head, margins), replicated)
    out[name + "_grad_scale"] = float(np.abs(replicated[2]).max())
  return out


def eight_devices(tmp):
  """Runs on 8 devices: sharded vs replicated, Partial FC, the checkpoint of a padded head, the memory of a step."""
  import dataclasses

  import jax

  from adaptface_jax import checkpoints, sharding
  mesh = sharding.data_mesh()
  assert mesh.size == 8
  out = _sharded_vs_replicated(mesh)

  # Partial FC: a rate just below 1 samples every centre of every block (through the sampling path): the full head.
  head = sharding.class_head({"shard": "on", "sample_rate": 1 - 1e-9}, mesh, CLASSES, DIM)
  full = _loss_and_grads(mesh, dataclasses.replace(head, sample_rate=1.0), COSFACE)
  out["pfc_rate1"] = _max_diffs(_loss_and_grads(mesh, head, COSFACE, rng=jax.random.PRNGKey(3)), full)
  # At 0.3, 12 of each device's 38 centres (at least the batch: 16): the positives and random negatives only.
  head = dataclasses.replace(head, sample_rate=0.3)
  k = head.sample_size(sharding.padded_classes(head), BATCH)
  loss, _, grad_c = _loss_and_grads(mesh, head, COSFACE, rng=jax.random.PRNGKey(3))
  touched = np.abs(grad_c).sum(0) > 0
  _, _, labels = _problem()
  out["pfc"] = dict(k=k, loss=loss, full_loss=full[0], positives_touched=bool(touched[labels].all()),
                    touched_per_device=np.bincount(np.nonzero(touched)[0] // 38, minlength=8).tolist())

  # A padded sharded head, saved: the true shape [D, C] on disk, read back into a one-device state.
  from adaptface_jax import optim
  from configs import common
  tx, _ = optim.make_optimizer(common.base_config("dino", "lora").optim, 10)
  _, centers, _ = _problem()
  trainable = {"margin": {"centers": jax.numpy.asarray(centers)}}
  state = {"trainable": trainable, "opt_state": tx.init(trainable)}
  head = sharding.class_head({"shard": "on"}, mesh, CLASSES, DIM)
  placed = sharding.place_state(state, mesh, head)
  saved_shapes = {p: v.shape for p, v in checkpoints._leaves(placed)}
  manager = checkpoints.Checkpoints(Path(tmp) / "checkpoints")
  manager.save(1, sharding.checkpoint_state(placed, mesh, head), frozen_fingerprint="")
  manager.close()
  restored = checkpoints.Checkpoints(Path(tmp) / "checkpoints").restore(state)
  out["checkpoint"] = dict(placed=[list(s) for p, s in saved_shapes.items() if p.endswith("centers")],
                           restored=[list(v.shape) for p, v in checkpoints._leaves(restored) if p.endswith("centers")],
                           diff=float(np.abs(np.asarray(restored["trainable"]["margin"]["centers"]) - centers).max()))

  # The train step's memory for a 1M-identity head (D = 512) on a 2-layer ViT: sharded vs replicated, same mesh.
  from conftest import TINY_RUN

  from launch import memory_table
  totals = {}
  for shard in ("off", "on"):
    config = memory_table.experiment_config("dino", "tiny-dinov2", 8, shard)
    config.model.image_size = TINY_RUN["model.image_size"]
    totals[shard] = memory_table.memory(memory_table.compiled_step(config, 1_000_000, mesh, 8))
  out["memory"] = totals
  print(json.dumps(out))


def one_of_two_processes(process_id, port):
  """One of 2 processes x 2 devices: sharded vs replicated on the 4-device mesh of both."""
  import jax
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id))
  from adaptface_jax import sharding
  mesh = sharding.data_mesh()
  assert mesh.size == 4 and jax.process_count() == 2
  print(json.dumps(_sharded_vs_replicated(mesh)))


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
  return _result(_run("eight_devices", tmp_path_factory.mktemp("sharded_head"), devices=8))


@pytest.mark.parametrize("margin", ["cosface", "arcface"])
def test_sharded_head_computes_the_replicated_loss_and_gradients(eight, margin):
  # [loss, grad embeddings, grad centres]: the shards' log-sum-exp adds up in another order, nothing else differs.
  assert eight[margin + "_grad_scale"] > 1e-3  # gradients worth comparing
  assert max(eight[margin]) <= 1e-5, eight[margin]


def test_partial_fc_at_rate_one_is_the_full_head_and_below_samples_per_device(eight):
  assert max(eight["pfc_rate1"]) <= 1e-6, eight["pfc_rate1"]
  pfc = eight["pfc"]
  assert pfc["k"] == 16 and pfc["positives_touched"]
  # Each device's sampled centres, and only they, get a gradient (a sampled negative's may underflow to 0).
  assert all(12 <= n <= pfc["k"] for n in pfc["touched_per_device"][:-1]), pfc
  assert np.isfinite(pfc["loss"]) and pfc["loss"] < pfc["full_loss"]  # fewer negatives: a smaller softmax sum


def test_a_padded_sharded_head_is_saved_with_its_true_shape(eight):
  checkpoint = eight["checkpoint"]
  assert checkpoint["placed"] == [[DIM, 304]] * 3  # centres, AdamW mu and nu, padded for 8 devices
  assert checkpoint["restored"] == [[DIM, CLASSES]] * 3
  assert checkpoint["diff"] == 0.0


def test_sharded_head_step_holds_a_fraction_of_the_replicated_memory(eight):
  replicated, sharded = eight["memory"]["off"], eight["memory"]["on"]
  # The head [512, 1M] float32 is 2 GiB; with its gradient and AdamW moments far more, replicated on each device.
  assert replicated["total"] > 8 * 2**30, replicated
  assert sharded["total"] <= replicated["total"] / 6, (sharded, replicated)


def test_two_processes_shard_the_head_over_all_their_devices():
  port = free_port()
  procs = [_run("one_of_two_processes", index, port, devices=2) for index in range(2)]
  results = [_result(proc) for proc in procs]
  for result in results:
    for margin in ("cosface", "arcface"):
      assert max(result[margin]) <= 1e-5, result
