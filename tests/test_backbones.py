"""Parity of the Flax DINOv2 / CLIP ports with transformers, and the loader's handling of bad checkpoints."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import random_images
from safetensors.numpy import load_file, save_file

from adaptface_jax import load_backbone
from adaptface_jax.models import hf_weights, vit
from adaptface_jax.models.hf_weights import BackboneUnavailableError, CheckpointError
from adaptface_jax.models.vit import bicubic_matrix

TOL = 1e-4


def _torch_outputs(model, images, **kwargs):
  with torch.no_grad():
    return model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)), **kwargs)


@pytest.mark.parametrize("name,size,kwargs", [
    ("dinov2", 224, {}), ("dinov2", 112, {}),
    ("clip_vision", 224, {}), ("clip_vision", 112, {"interpolate_pos_encoding": True}),
])
def test_full_size_parity(hf_snapshots, name, size, kwargs):
  path, model = hf_snapshots[name]
  backbone = load_backbone(str(path))
  images = random_images(2, size)
  ref = _torch_outputs(model, images, **kwargs)
  out = backbone.encode(images)
  for key in ("last_hidden_state", "pooler_output"):
    err = np.abs(np.asarray(out[key]) - getattr(ref, key).numpy()).max()
    assert err < TOL, (name, size, key, err)


def test_full_clip_model_loads_vision_tower_and_projection(hf_snapshots):
  path, model = hf_snapshots["clip_full"]
  backbone = load_backbone(str(path))
  assert backbone.config.projection_dim == 24 and backbone.config.hidden_size == 64
  images = random_images(2, 64)
  with torch.no_grad():
    pixel = torch.from_numpy(images.transpose(0, 3, 1, 2))
    ref = model.vision_model(pixel_values=pixel)
    ref_proj = model.visual_projection(ref.pooler_output)
  out = backbone.encode(images)
  assert np.abs(np.asarray(out["pooler_output"]) - ref.pooler_output.numpy()).max() < TOL
  assert np.abs(np.asarray(out["image_embeds"]) - ref_proj.numpy()).max() < TOL


def test_pytorch_bin_snapshot_and_parent_directory(hf_snapshots, tmp_path):
  path, model = hf_snapshots["clip_full"]
  snapshot = tmp_path / "cache" / "models--x" / "snapshots" / "abc"
  snapshot.mkdir(parents=True)
  shutil.copy(path / "config.json", snapshot)
  torch.save({k: torch.from_numpy(v) for k, v in load_file(path / "model.safetensors").items()},
             snapshot / "pytorch_model.bin")
  from_bin = load_backbone(str(tmp_path / "cache"))  # a folder that contains the snapshot
  from_st = load_backbone(str(path))
  images = random_images(1, 64)
  np.testing.assert_allclose(from_bin.encode(images)["pooler_output"], from_st.encode(images)["pooler_output"],
                             atol=1e-6)


def test_bicubic_matrix_matches_torch():
  grid = np.random.RandomState(1).randn(37, 37).astype(np.float32)
  for out_size in (8, 16, 40):
    ref = torch.nn.functional.interpolate(torch.from_numpy(grid)[None, None], size=(out_size, out_size),
                                          mode="bicubic", align_corners=False)[0, 0].numpy()
    w = bicubic_matrix(37, out_size)
    np.testing.assert_allclose(w @ grid @ w.T, ref, atol=1e-5)


def _broken_snapshot(tmp_path, hf_snapshots, edit):
  path, _ = hf_snapshots["clip_full"]
  target = tmp_path / "broken"
  shutil.copytree(path, target)
  tensors = load_file(target / "model.safetensors")
  edit(tensors)
  save_file(tensors, target / "model.safetensors")
  return target


def test_checkpoint_problems_are_all_listed(tmp_path, hf_snapshots):
  def edit(t):
    del t["vision_model.encoder.layers.0.self_attn.q_proj.weight"]
    del t["vision_model.post_layernorm.bias"]
    t["vision_model.encoder.layers.1.mlp.fc1.weight"] = np.zeros((5, 64), np.float32)
    t["vision_model.extra.weight"] = np.zeros((3,), np.float32)
  target = _broken_snapshot(tmp_path, hf_snapshots, edit)
  with pytest.raises(CheckpointError) as info:
    load_backbone(str(target))
  msg = str(info.value)
  assert "4 problem(s)" in msg
  for fragment in ("missing key 'encoder.layers.0.self_attn.q_proj.weight'", "missing key 'post_layernorm.bias'",
                   "shape mismatch for 'encoder.layers.1.mlp.fc1.weight'", "unexpected key 'extra.weight'"):
    assert fragment in msg


def test_unknown_model_type_and_bad_image_size(tmp_path, hf_snapshots):
  path, _ = hf_snapshots["clip_full"]
  target = tmp_path / "vit"
  shutil.copytree(path, target)
  config = json.loads((target / "config.json").read_text())
  config["model_type"] = "vit"
  (target / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="unsupported model_type 'vit'"):
    load_backbone(str(target))
  backbone = load_backbone(str(path))
  with pytest.raises(ValueError, match="not a multiple of the patch size 16"):
    backbone.encode(random_images(1, 60))


def test_unreachable_hub_id_names_it_and_explains(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(BackboneUnavailableError) as info:
    load_backbone("someone/not-in-any-cache")
  assert "someone/not-in-any-cache" in str(info.value) and "snapshot" in str(info.value)


def test_random_init_is_explicit():
  with pytest.raises(ValueError, match="random_init=True"):
    load_backbone("tiny-dinov2")
  backbone = load_backbone("tiny-dinov2", random_init=True)
  assert backbone.source.startswith("random-init:")
  assert backbone.encode(random_images(1, 28))["last_hidden_state"].shape == (1, 5, 64)


def test_architecture_comes_from_config_json():
  config = hf_weights.vit_config(dict(model_type="dinov2", hidden_size=48, num_hidden_layers=3, num_attention_heads=3,
                                  patch_size=7, image_size=70, layerscale_value=0.1, layer_norm_eps=1e-5))
  assert (config.hidden_size, config.num_layers, config.num_heads, config.patch_size, config.pos_grid,
          config.layerscale_init, config.layer_norm_eps, config.mlp_dim) == (48, 3, 3, 7, 10, 0.1, 1e-5, 192)


@pytest.mark.parametrize("model_type", sorted(hf_weights.HF_DEFAULTS))
def test_config_defaults_are_transformers_own(model_type):
  from transformers import CONFIG_MAPPING
  defaults = CONFIG_MAPPING[model_type]().to_dict()
  assert {key: defaults[key] for key in hf_weights.HF_DEFAULTS[model_type]} == hf_weights.HF_DEFAULTS[model_type]


def test_a_sparse_config_json_reads_as_transformers_reads_it(tmp_path):
  """save_pretrained writes only the fields off their defaults; both readers fill in the same architecture."""
  from transformers import AutoConfig
  for hf in (dict(model_type="dinov2", hidden_size=48, num_attention_heads=3),
             dict(model_type="clip", vision_config=dict(hidden_size=48, num_attention_heads=3, patch_size=16)),
             dict(model_type="clip_vision_model", hidden_act="gelu")):
    (tmp_path / "config.json").write_text(json.dumps(hf))
    full = AutoConfig.from_pretrained(tmp_path).to_dict()
    assert hf_weights.vit_config(hf) == hf_weights.vit_config(full), hf


@pytest.mark.parametrize("name", ["gelu", "quick_gelu"])
def test_activation_values_and_derivatives_match_torch(name):
  x = np.linspace(-8, 8, 2001).astype(np.float32)
  fn = torch.nn.functional.gelu if name == "gelu" else (lambda t: t * torch.sigmoid(1.702 * t))
  tx = torch.tensor(x, requires_grad=True)
  fn(tx).sum().backward()
  value, vjp = jax.vjp(lambda x: vit._act(name, x), jnp.asarray(x))
  np.testing.assert_allclose(value, fn(torch.tensor(x)).numpy(), atol=1e-6)
  np.testing.assert_allclose(vjp(jnp.ones_like(value))[0], tx.grad.numpy(), atol=1e-6)
  second = jax.grad(jax.grad(lambda t: vit._act(name, t)))(0.3)  # the custom rule stays differentiable
  assert np.isfinite(second) and second != 0
