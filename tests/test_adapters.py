"""LoRA / DA-LoRA: parity with peft, exactness at init, one-hot routing, rank-K*r mixing, and `inspect` counts."""

import copy
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import random_images
from flax import traverse_util

from adaptface_jax import load_backbone, trainable_rules
from adaptface_jax.models import face_model
from adaptface_jax.models.lora import AdaptedDense, AdapterSpec, lora_delta
from configs import common


def _lora_variables(module, backbone, images, seed=0):
  variables = module.init(jax.random.key(seed), jnp.asarray(images),
                          jnp.full((images.shape[0], module.spec.num_domains), 1.0 / module.spec.num_domains))
  return {"params": backbone.params, "lora": variables["lora"]}


def test_peft_parity_q_v_and_attention_output(hf_snapshots):
  from peft import LoraConfig, get_peft_model

  path, model = hf_snapshots["dinov2"]
  backbone = load_backbone(str(path))
  spec = AdapterSpec(rank=4, alpha=8.0, targets=("q", "v", "proj"))
  module = backbone.module(spec)
  images = random_images(2, 112)
  variables = _lora_variables(module, backbone, images)
  # Random non-zero A and B so that the deltas matter.
  rng = np.random.RandomState(3)
  flat = traverse_util.flatten_dict(variables["lora"], sep="/")
  flat = {k: rng.randn(*v.shape).astype(np.float32) * 0.05 for k, v in flat.items()}
  variables["lora"] = traverse_util.unflatten_dict(flat, sep="/")

  # get_peft_model modifies the model in place: wrap a copy, the fixture's model is shared with other tests.
  peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], lora_dropout=0.0,
                           init_lora_weights=False)
  peft_model = get_peft_model(copy.deepcopy(model), peft_config)
  ours_to_peft = {"qkv/q": "q_proj", "qkv/v": "v_proj", "proj": "o_proj"}
  state = dict(peft_model.named_parameters())
  with torch.no_grad():
    for i in range(backbone.config.num_layers):
      for ours, theirs in ours_to_peft.items():
        prefix = f"base_model.model.encoder.layer.{i}.attention.{theirs}"
        state[f"{prefix}.lora_A.default.weight"].copy_(torch.from_numpy(flat[f"blocks_{i}/{ours}/lora_a"][0].T))
        state[f"{prefix}.lora_B.default.weight"].copy_(torch.from_numpy(flat[f"blocks_{i}/{ours}/lora_b"][0].T))
    ref = peft_model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
  out = module.apply(variables, jnp.asarray(images))
  base = backbone.encode(images)
  err = np.abs(np.asarray(out["pooler_output"]) - ref.pooler_output.numpy()).max()
  assert err < 1e-4, err
  assert np.abs(np.asarray(out["pooler_output"]) - np.asarray(base["pooler_output"])).max() > 1e-2  # deltas matter


def test_adapted_model_equals_frozen_at_init_and_one_hot_equals_lora():
  backbone = load_backbone("tiny-dinov2", random_init=True)
  images = random_images(3, 56)
  base = backbone.encode(images)["last_hidden_state"]
  spec = AdapterSpec(rank=4, alpha=4.0, num_domains=3, targets=("qkv", "proj", "fc1", "fc2"))
  module = backbone.module(spec)
  variables = _lora_variables(module, backbone, images)
  w = jnp.asarray(np.random.RandomState(0).dirichlet(np.ones(3), size=3), jnp.float32)
  at_init = module.apply(variables, jnp.asarray(images), w)["last_hidden_state"]
  np.testing.assert_array_equal(np.asarray(at_init), np.asarray(base))  # B = 0: exactly the frozen model

  rng = np.random.RandomState(1)
  lora = jax.tree.map(lambda x: jnp.asarray(rng.randn(*x.shape) * 0.1, jnp.float32), variables["lora"])
  plain = backbone.module(AdapterSpec(rank=4, alpha=4.0, num_domains=1, targets=spec.targets))
  for k in range(3):
    one_hot = jax.nn.one_hot(jnp.full((3,), k), 3)
    mixed = module.apply({"params": backbone.params, "lora": lora}, jnp.asarray(images), one_hot)
    single = plain.apply({"params": backbone.params, "lora": jax.tree.map(lambda x: x[k:k + 1], lora)},
                         jnp.asarray(images))
    np.testing.assert_allclose(mixed["last_hidden_state"], single["last_hidden_state"], atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny-dinov2", "tiny-clip"])
def test_pooled_only_gives_the_same_pooled_output_and_gradients(preset):
  """The last block computed for the CLS token alone changes neither the pooled feature nor the LoRA gradients."""
  backbone = load_backbone(preset, random_init=True)
  images = jnp.asarray(random_images(3, 4 * backbone.config.patch_size))
  module = backbone.module(AdapterSpec(rank=4, alpha=4.0, num_domains=3, targets=("qkv", "proj", "fc1", "fc2")))
  w = jnp.asarray(np.random.RandomState(0).dirichlet(np.ones(3), size=3), jnp.float32)
  rng = np.random.RandomState(1)
  lora = jax.tree.map(lambda x: jnp.asarray(rng.randn(*x.shape) * 0.1, jnp.float32),
                      _lora_variables(module, backbone, np.asarray(images))["lora"])

  def pooled(lora, w, pooled_only):
    out = module.apply({"params": backbone.params, "lora": lora}, images, w, pooled_only=pooled_only)
    assert ("last_hidden_state" in out) != pooled_only
    return out["pooler_output"]

  np.testing.assert_allclose(pooled(lora, w, True), pooled(lora, w, False), atol=1e-5)
  grads = [jax.grad(lambda a, w, p=p: jnp.sum(pooled(a, w, p) ** 2), argnums=(0, 1))(lora, w) for p in (True, False)]
  for got, want in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_rank_k_r_product_equals_sum_of_k_deltas():
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(4, 5, 8), jnp.float32)
  a = jnp.asarray(rng.randn(3, 8, 2), jnp.float32)
  b = jnp.asarray(rng.randn(3, 2, 6), jnp.float32)
  w = jnp.asarray(rng.dirichlet(np.ones(3), size=4), jnp.float32)
  fused = lora_delta(x, a, b, w, 0.5, jnp.float32)
  expected = sum(0.5 * w[:, k, None, None] * (x @ a[k] @ b[k]) for k in range(3))
  np.testing.assert_allclose(fused, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_domains", [1, 3])
def test_low_rank_product_gradients_match_autodiff_of_the_sum(num_domains):
  """lora_delta's own backward (x, A, B and the routing weights) equals autodiff of sum_k w_k x A_k B_k."""
  rng = np.random.RandomState(1)
  x = jnp.asarray(rng.randn(4, 5, 8), jnp.float32)
  a = jnp.asarray(rng.randn(num_domains, 8, 2), jnp.float32)
  b = jnp.asarray(rng.randn(num_domains, 2, 6), jnp.float32)
  w = jnp.asarray(rng.dirichlet(np.ones(num_domains), size=4), jnp.float32)
  cotangent = jnp.asarray(rng.randn(4, 5, 6), jnp.float32)

  def reference(x, a, b, w):
    return sum(0.5 * w[:, k, None, None] * (x @ a[k] @ b[k]) for k in range(num_domains))

  def fused(x, a, b, w):
    return lora_delta(x, a, b, w if num_domains > 1 else None, 0.5, jnp.float32)

  argnums = (0, 1, 2, 3) if num_domains > 1 else (0, 1, 2)
  got = jax.grad(lambda *args: (fused(*args) * cotangent).sum(), argnums=argnums)(x, a, b, w)
  want = jax.grad(lambda *args: (reference(*args) * cotangent).sum(), argnums=argnums)(x, a, b, w)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_adapter_spec_validation():
  with pytest.raises(ValueError, match="unknown LoRA target"):
    AdapterSpec(targets=("qkv", "mlp"))
  with pytest.raises(ValueError, match="same kernel"):
    AdapterSpec(targets=("qkv", "q"))
  assert AdapterSpec(rank=16, alpha=16).scale == 1.0
  assert AdapterSpec(rank=16, alpha=16, rslora=True).scale == 4.0


def test_dense_without_adapter_has_no_lora_collection():
  variables = AdaptedDense(4).init(jax.random.key(0), jnp.ones((2, 3)))
  assert set(variables) == {"params"}


def test_face_model_outputs_and_router_modes():
  config = common.experiment("dino", "dalora", "tiny")
  config.model.image_size = 56
  for mode, router_input in (("learned", "frozen_cls"), ("learned", "patch_mean"), ("uniform", "frozen_cls"),
                             ("oracle", "frozen_cls")):
    config.router.mode, config.router.input = mode, router_input
    model = face_model.create_model(config)
    variables = face_model.init_variables(model, jax.random.key(0), num_classes=None, input_size=56)
    assert ("router" in variables["params"]) == (mode == "learned")
    images = jnp.asarray(np.random.RandomState(0).randint(0, 255, (4, 56, 56, 3)), jnp.uint8)
    domains = jnp.asarray([0, 1, 2, -1])
    out = model.apply(variables, images, domains)
    assert out["embedding"].shape == (4, 512)
    np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out["domain_weights"].sum(-1), 1.0, atol=1e-5)
    if mode == "oracle":
      np.testing.assert_allclose(out["domain_weights"][:3], np.eye(3))
      np.testing.assert_allclose(out["domain_weights"][3], np.full(3, 1 / 3))


def test_rules_must_cover_every_leaf():
  tree = {"params": {"backbone": {"w": np.zeros(2)}, "head": {"w": np.zeros(3)}}, "lora": {"a": np.zeros(4)}}
  with pytest.raises(ValueError, match="params/head/w"):
    trainable_rules.split(tree, [(r"^lora/", "train"), (r"^params/backbone/", "freeze")])
  rules = [(r"^lora/", "train"), (r"^params/head/", "train"), (r".*", "freeze")]
  trainable, frozen = trainable_rules.split(tree, rules)
  assert set(trainable_rules.flatten(trainable)) == {"params/head/w", "lora/a"}
  assert set(trainable_rules.flatten(frozen)) == {"params/backbone/w"}
  assert set(trainable_rules.flatten(trainable_rules.merge(trainable, frozen))) == set(trainable_rules.flatten(tree))


@pytest.mark.parametrize("experiment,expected", [
    ("lora_dino", 442_368), ("dalora_dino", 1_327_104), ("lora_clip", 884_736), ("dalora_clip", 2_654_208)])
def test_inspect_adapter_counts(experiment, expected):
  command = [sys.executable, "-m", "adaptface_jax.inspect_params", f"--config=configs/{experiment}.py", "--json"]
  out = subprocess.run(command, capture_output=True, text=True, check=True)
  info = json.loads(out.stdout)
  assert info["subtrees"]["lora/backbone"]["total"] == expected
  assert info["subtrees"]["params/backbone"]["trainable"] == 0
  assert info["total"] == info["trainable"] + info["frozen"]
  lora_leaves = [leaf for leaf in info["leaves"] if leaf["path"].startswith("lora/")]
  assert lora_leaves and all(leaf["trainable"] for leaf in lora_leaves)
