"""The jitted train step: only the trainable subtree moves, the optimizer never sees frozen leaves, the loss
falls, the data-parallel step on 8 simulated devices matches the single-device one, and rematerialised blocks give
the same gradients for less memory."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from adaptface_jax import run_state, train, trainable_rules
from adaptface_jax.models import hf_weights
from configs import common


def tiny_config(adapter="dalora"):
  config = common.experiment("dino", adapter, "tiny")
  config.model.image_size = 56
  config.optim.lr = 3e-3
  config.optim.warmup_fraction = 0.0
  return config


def fixed_batch(batch=8, num_classes=4, seed=0):
  rng = np.random.RandomState(seed)
  return {"image": rng.randint(0, 256, (batch, 56, 56, 3)).astype(np.uint8),
          "label": (np.arange(batch) % num_classes).astype(np.int32),
          "domain": (np.arange(batch) % 3).astype(np.int32)}


def run_steps(config, steps, batch):
  model, state, frozen, tx, schedule = run_state.setup(config, num_classes=4, steps=steps)
  step_fn = jax.jit(train.make_train_step(model, tx, schedule, config.loss), donate_argnums=0)
  initial_frozen = jax.tree.map(np.asarray, frozen)
  losses = []
  for _ in range(steps):
    state, metrics = step_fn(state, frozen, batch)
    losses.append(float(metrics["loss/total"]))
  return state, frozen, initial_frozen, losses


def test_frozen_untouched_optimizer_state_trainable_only_and_loss_decreases():
  config = tiny_config()
  state, frozen, initial_frozen, losses = run_steps(config, 25, fixed_batch())
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, frozen), initial_frozen)
  trainable_paths = set(trainable_rules.flatten(state.trainable))
  frozen_paths = set(trainable_rules.flatten(frozen))
  assert trainable_paths and frozen_paths and not trainable_paths & frozen_paths
  assert all(p.startswith("params/backbone/") for p in frozen_paths)
  # Every array in the optimizer state has the shape of a trainable leaf; the big frozen kernels appear nowhere.
  opt_shapes = {tuple(x.shape) for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 1}
  trainable_shapes = {tuple(x.shape) for x in jax.tree.leaves(state.trainable)}
  assert opt_shapes <= trainable_shapes
  n_opt = sum(np.size(x) for x in jax.tree.leaves(state.opt_state))
  n_trainable = sum(np.size(x) for x in jax.tree.leaves(state.trainable))
  assert n_opt <= 2 * n_trainable + 16  # Adam's mu and nu (+ counters) of the trainable leaves only
  assert losses[-1] < 0.5 * losses[0], losses
  # The adapters actually moved (B starts at zero).
  lora_b = [v for p, v in trainable_rules.flatten(state.trainable).items() if p.endswith("lora_b")]
  assert lora_b and all(np.abs(np.asarray(v)).max() > 0 for v in lora_b)


def test_data_parallel_step_matches_single_device():
  code = r"""
import json, sys
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
sys.path.insert(0, "tests")
from test_train_step import tiny_config, fixed_batch
from adaptface_jax import run_state, train, trainable_rules
assert len(jax.devices()) == int(sys.argv[1]), jax.devices()
config = tiny_config()
model, state, frozen, tx, schedule = run_state.setup(config, num_classes=4, steps=3)
mesh = Mesh(np.asarray(jax.devices()), ("data",))
rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
step = jax.jit(train.make_train_step(model, tx, schedule, config.loss), in_shardings=(rep, rep, data),
               out_shardings=(rep, rep))
state, frozen = jax.device_put(state, rep), jax.device_put(frozen, rep)
batch = jax.device_put(fixed_batch(), data)
# One step's gradients and metrics (Adam's first update is ~lr * sign(g), which would amplify float noise in
# near-zero gradients; the gradient itself is what data parallelism must preserve).
grad_fn = jax.jit(jax.grad(lambda t, f, b: train.loss_fn(t, f, b, jax.random.PRNGKey(1), model=model,
                                                         loss_config=config.loss)[0]),
                  in_shardings=(rep, rep, data), out_shardings=rep)
grads = trainable_rules.flatten(jax.device_get(grad_fn(state.trainable, frozen, batch)))
state, metrics = step(state, frozen, batch)
grads["metrics|loss"] = np.asarray(metrics["loss/total"])
grads["metrics|grad_norm"] = np.asarray(metrics["grad_norm"])
np.savez(sys.argv[2], **{k.replace("/", "|"): v for k, v in grads.items()})
"""
  results = []
  for devices in (1, 8):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    out = f"/tmp/dp_{devices}_{os.getpid()}.npz"
    subprocess.run([sys.executable, "-c", code, str(devices), out], check=True, env=env)
    results.append(dict(np.load(out)))
  assert results[0].keys() == results[1].keys()
  for key in results[0]:
    # Gradients within 1e-5; the scalar loss and grad norm (~1e2) to float32 resolution of their magnitude.
    tolerance = dict(rtol=1e-6) if key.startswith("metrics|") else dict(atol=1e-5)
    np.testing.assert_allclose(results[0][key], results[1][key], err_msg=key, **tolerance)


def test_bfloat16_compute_keeps_float32_parameters_and_learns():
  config = tiny_config()
  config.model.dtype = "bfloat16"
  state, _, _, losses = run_steps(config, 15, fixed_batch())
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.trainable))
  assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0], losses


def test_remat_keeps_parameter_paths_and_gradients_and_saves_memory(tmp_path):
  # 8 blocks: remat pays off when many blocks' activations would otherwise wait for the backward.
  arch = dict(hf_weights.PRESETS["tiny-dinov2"], num_hidden_layers=8)
  (tmp_path / "config.json").write_text(json.dumps(arch))
  batch = fixed_batch(batch=16)
  grads, temp_bytes, paths = {}, {}, {}
  for remat in ("", "dots", "full"):
    config = tiny_config()
    config.model.backbone = str(tmp_path)
    config.model.remat = remat
    model, state, frozen, _, _ = run_state.setup(config, num_classes=4, steps=1)
    paths[remat] = set(trainable_rules.flatten(trainable_rules.merge(state.trainable, frozen)))
    grad_fn = jax.jit(jax.grad(lambda t, f, b: train.loss_fn(t, f, b, jax.random.PRNGKey(1), model=model,
                                                             loss_config=config.loss)[0]))
    with jax.default_matmul_precision("float32"):  # on GPUs, not TF32: the programs differ in their fusions
      compiled = grad_fn.lower(state.trainable, frozen, batch).compile()
    temp_bytes[remat] = compiled.memory_analysis().temp_size_in_bytes
    grads[remat] = trainable_rules.flatten(compiled(state.trainable, frozen, batch))
  # The same variables (checkpoints and HF weights load unchanged), the same gradients to float tolerance.
  assert paths["dots"] == paths["full"] == paths[""]
  for remat in ("dots", "full"):
    for key, value in grads[""].items():
      np.testing.assert_allclose(grads[remat][key], value, atol=1e-6, rtol=1e-5, err_msg=f"{remat}: {key}")
  # Fewer activations kept for the backward: less scratch memory in the compiled gradient (XLA:CPU's buffer
  # assignment; measured 12.6 MB without remat, 10.3 with dots, 11.1 with full).
  assert max(temp_bytes["dots"], temp_bytes["full"]) < 0.95 * temp_bytes[""], temp_bytes


def test_unknown_remat_policy_is_rejected():
  config = tiny_config()
  config.model.remat = "blocks"
  with pytest.raises(ValueError, match="remat 'blocks'"):
    run_state.setup(config, num_classes=4, steps=1)
