"""HuggingFace checkpoints <-> Flax parameters of `adaptface_jax.models.vit.ViT`, and config.json <-> `ViTConfig`
(`vit_config`, `hf_config`): the one home of what the project knows of transformers' formats.

`load_backbone(source)` accepts a local snapshot directory (config.json + model.safetensors or pytorch_model.bin),
a directory that contains one (e.g. a HF cache folder) or a hub id, resolved by `huggingface_hub.snapshot_download`:
the HF cache (`$HF_HOME/hub`) first, then the hub unless HF_HUB_OFFLINE=1. Keys are mapped from the checkpoint
file's own names (the names `save_pretrained` writes), never from a live PyTorch module. Every target leaf must be
filled, every source key used or explicitly ignored, every shape checked; all problems are reported together.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from adaptface_jax.models.vit import ViT, ViTConfig

# Architecture configs of the supported hub models, so that a random-initialised backbone of the same architecture
# (offline demos, tests, `inspect`) needs no download. Values are those of the hub's config.json files.
PRESETS: dict[str, dict] = {
    "facebook/dinov2-small": dict(model_type="dinov2", hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                  mlp_ratio=4, patch_size=14, image_size=518, layerscale_value=1.0,
                                  layer_norm_eps=1e-6, hidden_act="gelu"),
    "facebook/dinov2-base": dict(model_type="dinov2", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                 mlp_ratio=4, patch_size=14, image_size=518, layerscale_value=1.0,
                                 layer_norm_eps=1e-6, hidden_act="gelu"),
    "openai/clip-vit-base-patch16": dict(
        model_type="clip", projection_dim=512,
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           patch_size=16, image_size=224, hidden_act="quick_gelu", layer_norm_eps=1e-5)),
    # Small architectures of the same families for fast tests and CPU smoke runs.
    "tiny-dinov2": dict(model_type="dinov2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        mlp_ratio=4, patch_size=14, image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6,
                        hidden_act="gelu"),
    # The synthetic-pretrained backbones' architectures (configs/pretrain.py): the two families at width 192, 6 blocks.
    "synthface-dinov2": dict(model_type="dinov2", hidden_size=192, num_hidden_layers=6, num_attention_heads=3,
                             mlp_ratio=4, patch_size=14, image_size=112, layerscale_value=1.0, layer_norm_eps=1e-6,
                             hidden_act="gelu"),
    "synthface-clip": dict(model_type="clip_vision_model", hidden_size=192, intermediate_size=768,
                           num_hidden_layers=6, num_attention_heads=3, patch_size=16, image_size=112,
                           hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "tiny-clip": dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, patch_size=16, image_size=224, hidden_act="quick_gelu",
                      layer_norm_eps=1e-5),
}

# Source keys that carry nothing the vision encoder uses.
IGNORED_KEYS = re.compile(r"^(text_model\.|text_projection\.|logit_scale$|embeddings\.mask_token$|.*position_ids$)")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


# transformers' defaults (Dinov2Config, CLIPVisionConfig, CLIPConfig) of the fields `vit_config` reads: save_pretrained
# leaves out every field at its default, so a config.json may omit them. Kept here, rather than read from
# transformers, so that loading a backbone never imports transformers (and torch with it);
# tests/test_backbones.py checks the table against transformers.
HF_DEFAULTS = {
    "dinov2": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, patch_size=14,
                   image_size=224, layer_norm_eps=1e-6, hidden_act="gelu", layerscale_value=1.0, qkv_bias=True,
                   use_swiglu_ffn=False),
    "clip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              patch_size=32, image_size=224, layer_norm_eps=1e-5, hidden_act="quick_gelu"),
    "clip": dict(projection_dim=512),
}



def vit_config(hf: dict) -> ViTConfig:
  """Architecture numbers from a HuggingFace `config.json` dict (Dinov2Model, CLIPVisionModel or CLIPModel)."""
  model_type = hf.get("model_type")
  projection_dim = None  # only a full CLIPModel carries visual_projection weights
  if model_type == "clip":  # the vision tower's config is nested
    projection_dim = hf.get("projection_dim", HF_DEFAULTS["clip"]["projection_dim"])
    hf, model_type = dict(hf.get("vision_config") or {}), "clip_vision_model"
  if model_type not in ("dinov2", "clip_vision_model"):
    raise ValueError(f"unsupported model_type {model_type!r}: this port reads 'dinov2', 'clip' and "
                     "'clip_vision_model' checkpoints")
  hf = {**HF_DEFAULTS[model_type], **hf}
  if model_type == "dinov2":
    if hf["use_swiglu_ffn"]:
      raise ValueError("DINOv2 with SwiGLU FFN (giant models) is not supported; use ViT-S/B/L checkpoints")
    hidden = hf["hidden_size"]
    return ViTConfig(
        family="dinov2", hidden_size=hidden, num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        # HF DINOv2 sizes its MLP by mlp_ratio and ignores intermediate_size.
        mlp_dim=int(hidden * hf["mlp_ratio"]), patch_size=hf["patch_size"], pretrain_image_size=hf["image_size"],
        layer_norm_eps=hf["layer_norm_eps"], activation=_activation(hf["hidden_act"]),
        layerscale_init=hf["layerscale_value"], qkv_bias=hf["qkv_bias"])
  return ViTConfig(
      family="clip", hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
      num_heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"], patch_size=hf["patch_size"],
      pretrain_image_size=hf["image_size"], layer_norm_eps=hf["layer_norm_eps"],
      activation=_activation(hf["hidden_act"]), projection_dim=projection_dim)



def _activation(name: str) -> str:
  if name not in ("gelu", "quick_gelu"):
    raise ValueError(f"unsupported hidden_act {name!r}; supported: 'gelu' (exact) and 'quick_gelu'")
  return name


def hf_config(vit_config: ViTConfig) -> dict:
  """The transformers config.json of a ViTConfig (the inverse of `vit_config`), for export."""
  from transformers import CLIPVisionConfig, Dinov2Config
  c = vit_config
  if c.family == "dinov2":
    config = Dinov2Config(hidden_size=c.hidden_size, num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                          mlp_ratio=c.mlp_dim // c.hidden_size, patch_size=c.patch_size,
                          image_size=c.pretrain_image_size, layer_norm_eps=c.layer_norm_eps,
                          layerscale_value=c.layerscale_init, qkv_bias=c.qkv_bias, hidden_act=c.activation)
    arch = "Dinov2Model"
  else:
    config = CLIPVisionConfig(hidden_size=c.hidden_size, intermediate_size=c.mlp_dim, num_hidden_layers=c.num_layers,
                              num_attention_heads=c.num_heads, patch_size=c.patch_size,
                              image_size=c.pretrain_image_size, layer_norm_eps=c.layer_norm_eps,
                              hidden_act=c.activation, projection_dim=c.projection_dim or 512)
    arch = "CLIPVisionModelWithProjection" if c.projection_dim else "CLIPVisionModel"
  return dict(config.to_dict(), architectures=[arch])


class CheckpointError(ValueError):
  """A checkpoint this loader cannot use: keys or shapes that do not match the architecture (the message lists every
  problem found), or a file layout it does not read."""


# ----------------------------------------------------------------------------------------------- key mapping


def _leaf_map(config: ViTConfig) -> dict[str, tuple[str, tuple[tuple[str, tuple[int, ...]], ...]]]:
  """Flax leaf path -> (transform kind, ((hf key, hf shape), ...)). Drives loading and exporting alike."""
  d, p, n_pos = config.hidden_size, config.patch_size, 1 + config.pos_grid ** 2
  lin = lambda out, inp: (out, inp)  # torch Linear weight layout [out, in]
  out: dict[str, Any] = {}
  if config.family == "dinov2":
    out["patch_kernel"] = ("patch", (("embeddings.patch_embeddings.projection.weight", (d, 3, p, p)),))
    out["patch_bias"] = ("copy", (("embeddings.patch_embeddings.projection.bias", (d,)),))
    out["cls"] = ("reshape", (("embeddings.cls_token", (1, 1, d)),))
    out["pos"] = ("reshape", (("embeddings.position_embeddings", (1, n_pos, d)),))
    out["final_norm/scale"] = ("copy", (("layernorm.weight", (d,)),))
    out["final_norm/bias"] = ("copy", (("layernorm.bias", (d,)),))
    layer = "encoder.layer.{i}."
    names = dict(norm1="norm1", norm2="norm2", q="attention.attention.query", k="attention.attention.key",
                 v="attention.attention.value", proj="attention.output.dense", fc1="mlp.fc1", fc2="mlp.fc2")
  else:
    out["patch_kernel"] = ("patch", (("embeddings.patch_embedding.weight", (d, 3, p, p)),))
    out["cls"] = ("copy", (("embeddings.class_embedding", (d,)),))
    out["pos"] = ("copy", (("embeddings.position_embedding.weight", (n_pos, d)),))
    for ours, theirs in (("pre_norm", "pre_layrnorm"), ("final_norm", "post_layernorm")):
      out[f"{ours}/scale"] = ("copy", ((f"{theirs}.weight", (d,)),))
      out[f"{ours}/bias"] = ("copy", ((f"{theirs}.bias", (d,)),))
    if config.projection_dim:
      out["projection"] = ("linear", (("visual_projection.weight", (config.projection_dim, d)),))
    layer = "encoder.layers.{i}."
    names = dict(norm1="layer_norm1", norm2="layer_norm2", q="self_attn.q_proj", k="self_attn.k_proj",
                 v="self_attn.v_proj", proj="self_attn.out_proj", fc1="mlp.fc1", fc2="mlp.fc2")

  for i in range(config.num_layers):
    pre, blk = layer.format(i=i), f"blocks_{i}/"
    for norm in ("norm1", "norm2"):
      out[blk + f"{norm}/scale"] = ("copy", ((pre + names[norm] + ".weight", (d,)),))
      out[blk + f"{norm}/bias"] = ("copy", ((pre + names[norm] + ".bias", (d,)),))
    out[blk + "qkv/kernel"] = ("fuse_linear", tuple((pre + names[s] + ".weight", lin(d, d)) for s in "qkv"))
    if config.qkv_bias:
      out[blk + "qkv/bias"] = ("fuse_bias", tuple((pre + names[s] + ".bias", (d,)) for s in "qkv"))
    for name, fan_in, fan_out in (("proj", d, d), ("fc1", d, config.mlp_dim), ("fc2", config.mlp_dim, d)):
      out[blk + f"{name}/kernel"] = ("linear", ((pre + names[name] + ".weight", lin(fan_out, fan_in)),))
      out[blk + f"{name}/bias"] = ("copy", ((pre + names[name] + ".bias", (fan_out,)),))
    if config.layerscale_init is not None:
      out[blk + "ls1"] = ("copy", ((pre + "layer_scale1.lambda1", (d,)),))
      out[blk + "ls2"] = ("copy", ((pre + "layer_scale2.lambda1", (d,)),))
  return out


def _to_flax(kind: str, arrays: list[np.ndarray], target_shape) -> np.ndarray:
  if kind == "patch":
    return arrays[0].transpose(2, 3, 1, 0)
  if kind == "linear":
    return arrays[0].T
  if kind == "fuse_linear":
    return np.concatenate([a.T for a in arrays], axis=1)
  if kind == "fuse_bias":
    return np.concatenate(arrays)
  return arrays[0].reshape(target_shape)


def _to_hf(kind: str, leaf: np.ndarray, hf_shapes) -> list[np.ndarray]:
  if kind == "patch":
    return [leaf.transpose(3, 2, 0, 1)]
  if kind == "linear":
    return [leaf.T]
  if kind == "fuse_linear":
    return [part.T for part in np.split(leaf, 3, axis=1)]
  if kind == "fuse_bias":
    return list(np.split(leaf, 3))
  return [leaf.reshape(hf_shapes[0])]


def _normalise_keys(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  # A full CLIPModel (and older CLIPVisionModel files) prefix the vision tower with `vision_model.`.
  return {k.removeprefix("vision_model."): v for k, v in tensors.items()}


def convert_checkpoint(tensors: dict[str, np.ndarray], config: ViTConfig, *, origin: str = "checkpoint") -> dict:
  """HF tensors -> nested Flax params of `ViT(config)`; raises CheckpointError listing every problem."""
  tensors = _normalise_keys(tensors)
  expected = jax.eval_shape(lambda: ViT(config).init(jax.random.key(0), jnp.zeros((1, config.patch_size,
                                                                                   config.patch_size, 3))))
  expected = traverse_util.flatten_dict(expected["params"], sep="/")
  leaf_map = _leaf_map(config)
  problems, used, flat = [], set(), {}
  for path, struct in expected.items():
    kind, sources = leaf_map[path]
    arrays = []
    for key, shape in sources:
      if key not in tensors:
        problems.append(f"missing key {key!r} (for {path})")
        continue
      used.add(key)
      if tuple(tensors[key].shape) != tuple(shape):
        problems.append(f"shape mismatch for {key!r}: checkpoint {tuple(tensors[key].shape)}, expected {shape}")
        continue
      arrays.append(np.asarray(tensors[key], np.float32))
    if len(arrays) == len(sources):
      flat[path] = _to_flax(kind, arrays, struct.shape)
  extra = sorted(k for k in tensors if k not in used and not IGNORED_KEYS.match(k))
  problems += [f"unexpected key {k!r} {tuple(tensors[k].shape)}" for k in extra]
  if problems:
    raise CheckpointError(f"{origin} does not match the {config.family} architecture "
                          f"({len(problems)} problem(s)):\n  " + "\n  ".join(problems))
  return traverse_util.unflatten_dict(flat, sep="/")


def to_hf_tensors(params: dict, config: ViTConfig) -> dict[str, np.ndarray]:
  """Inverse of `convert_checkpoint`: Flax params -> tensors with the names `save_pretrained` writes."""
  flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
  out = {}
  for path, (kind, sources) in _leaf_map(config).items():
    for (key, shape), array in zip(sources, _to_hf(kind, np.asarray(flat[path], np.float32), [s for _, s in sources])):
      out[key] = np.ascontiguousarray(array.reshape(shape))
  return out


# ------------------------------------------------------------------------------------------- files and sources


def _read_weights(directory: Path) -> dict[str, np.ndarray]:
  if (directory / "model.safetensors").exists():
    from safetensors.numpy import load_file
    return load_file(directory / "model.safetensors")
  if (directory / "pytorch_model.bin").exists():
    try:
      import torch
    except ImportError:
      raise CheckpointError(f"{directory / 'pytorch_model.bin'} needs PyTorch to read; install torch or convert "
                            "the snapshot to model.safetensors") from None
    state = torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in state.items()}
  if list(directory.glob("model-*.safetensors")):
    raise CheckpointError(f"{directory} holds a sharded checkpoint; this loader reads single-file snapshots")
  raise FileNotFoundError(f"{directory} has a config.json but no {' or '.join(WEIGHT_FILES)}")


def find_snapshot(directory: Path) -> Path:
  """`directory` itself if it holds config.json, else the single snapshot below it (e.g. a HF cache folder)."""
  if (directory / "config.json").exists():
    return directory
  found = sorted({p.parent for p in directory.rglob("config.json")
                  if any((p.parent / w).exists() for w in WEIGHT_FILES)})
  if len(found) == 1:
    return found[0]
  if not found:
    raise FileNotFoundError(f"no snapshot (config.json + {' or '.join(WEIGHT_FILES)}) found under {directory}")
  raise ValueError(f"several snapshots under {directory}; point at one of: " + ", ".join(map(str, found)))


# A hub repository id (`namespace/name`); anything else that is not a local path is a preset name or a mistake.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class BackboneUnavailableError(OSError):
  """A hub id whose snapshot is neither in the HuggingFace cache nor downloadable; the message says what to do."""


def is_hub_id(source: str) -> bool:
  return bool(_HUB_ID.match(source)) and ".." not in source


def _hub_cache() -> str:
  from huggingface_hub import constants
  return str(constants.HF_HUB_CACHE)


def _unavailable(hub_id: str, reason: str) -> BackboneUnavailableError:
  return BackboneUnavailableError(
      f"backbone {hub_id!r} is neither a local directory nor available from the HuggingFace cache ({_hub_cache()}) "
      f"or hub: {reason.rstrip('.')}. To fix it: with network, rerun without HF_HUB_OFFLINE=1 (the snapshot is "
      f"downloaded once into that cache) or fetch it first with `hf download {hub_id}`; without network, download "
      f"the snapshot on another machine, copy the folder that holds config.json and model.safetensors here and pass "
      f"its path with --config.model.backbone=/path/to/snapshot (load_backbone(path) in Python), or copy a whole "
      f"HuggingFace cache and point HF_HOME at it; or run a `:demo` config (a backbone pretrained on synthetic "
      f"faces, shipped in synthetic_backbones/; nothing to download).")


def _snapshot_download(hub_id: str, patterns: list[str]) -> Path:
  # snapshot_download looks in the HF cache first and honours HF_HUB_OFFLINE; its many error types (offline,
  # missing repo, auth, incomplete snapshot) all end in the same advice, given without the client's traceback.
  from huggingface_hub import snapshot_download
  try:
    return Path(snapshot_download(hub_id, allow_patterns=patterns))
  except Exception as error:  # noqa: BLE001
    first_line = (str(error).strip().splitlines() or [""])[0]
    raise _unavailable(hub_id, f"{type(error).__name__}: {first_line}") from None


def download_snapshot(hub_id: str) -> Path:
  """The snapshot directory of a hub id with config.json and one weights file (from the HF cache when there)."""
  snapshot = _snapshot_download(hub_id, ["config.json", WEIGHT_FILES[0]])
  if not (snapshot / WEIGHT_FILES[0]).exists():  # older repositories hold only pytorch_model.bin
    snapshot = _snapshot_download(hub_id, ["config.json", WEIGHT_FILES[1]])
  if not (snapshot / "config.json").exists() or not any((snapshot / w).exists() for w in WEIGHT_FILES):
    raise _unavailable(hub_id, f"its snapshot {snapshot} lacks config.json or the weights "
                               f"({' or '.join(WEIGHT_FILES)})")
  return snapshot


def _local_snapshot(source: str) -> Path | None:
  path = Path(os.path.expanduser(source))
  if not path.exists():
    return None
  if not path.is_dir():
    raise ValueError(f"{source} is a file; pass the snapshot directory that holds config.json")
  return find_snapshot(path)


def _unknown_source(source: str) -> FileNotFoundError:
  return FileNotFoundError(f"backbone source {source!r} is neither a local directory nor a hub id (namespace/name); "
                           f"architectures known without weights (with random_init=True): {sorted(PRESETS)}")


def _read_config_json(snapshot: Path) -> dict:
  """A snapshot's config.json, checked to describe an architecture this port builds; errors name the file."""
  path = snapshot / "config.json"
  try:
    config = json.loads(path.read_text())
    vit_config(config)
  except (ValueError, AttributeError) as error:  # JSONDecodeError is a ValueError; a non-dict has no .get
    raise CheckpointError(f"{path}: not a usable DINOv2 / CLIP config.json: {error}") from None
  return config


def read_architecture(source: str, *, random_init: bool = False) -> tuple[dict, Path | None]:
  """(HF config dict, snapshot dir or None) of a local path, a hub id or a preset name, without reading weights.

  A preset that is not a hub id (`tiny-dinov2`, ...) is answered from PRESETS, and so is every preset with
  random_init=True, without asking the hub. Otherwise a hub id's config.json comes from the HF cache or the hub
  (config.json only, never the weights); a hub id that is also a preset falls back to the preset when neither has
  it, so that shapes (`inspect`) are known offline. Weights are never taken from a preset: see load_backbone.
  """
  snapshot = _local_snapshot(source)
  if snapshot is not None:
    return _read_config_json(snapshot), snapshot
  if source in PRESETS and (random_init or not is_hub_id(source)):
    return dict(PRESETS[source]), None
  if not is_hub_id(source):
    raise _unknown_source(source)
  try:
    snapshot = _snapshot_download(source, ["config.json"])
    return _read_config_json(snapshot), snapshot
  except (BackboneUnavailableError, FileNotFoundError):
    if source in PRESETS:
      return dict(PRESETS[source]), None
    raise


# --------------------------------------------------------------------------------------------------- backbone


@dataclasses.dataclass
class Backbone:
  """A ViT encoder: its architecture, its parameters (a plain nested dict) and where they came from."""
  config: ViTConfig
  params: dict
  source: str

  def module(self, spec=None, dtype=jnp.float32) -> ViT:
    return ViT(self.config, spec=spec, dtype=dtype)

  def encode(self, images) -> dict:
    """NHWC float32 images, already normalised -> dict(last_hidden_state, pooler_output[, image_embeds])."""
    return _jitted_apply(self.config)(self.params, jnp.asarray(images, jnp.float32))


_APPLY_CACHE: dict = {}


def _jitted_apply(config: ViTConfig):
  """One compiled encoder per architecture (jit itself re-specialises on image shapes)."""
  if config not in _APPLY_CACHE:
    module = ViT(config)
    _APPLY_CACHE[config] = jax.jit(lambda params, images: module.apply({"params": params}, images))
  return _APPLY_CACHE[config]


def init_params(config: ViTConfig, seed: int = 0) -> dict:
  images = jnp.zeros((1, config.patch_size, config.patch_size, 3))
  return jax.jit(lambda key: ViT(config).init(key, images)["params"])(jax.random.key(seed))


def load_backbone(source: str, *, random_init: bool = False, seed: int = 0) -> Backbone:
  """Loads a DINOv2 / CLIP vision encoder from a local snapshot or a hub id (HF cache first, then the hub).

  random_init=True builds the same architecture with random weights (no weights are read or downloaded; a
  preset name needs no hub at all); it is never chosen implicitly.
  """
  if random_init:
    config = vit_config(read_architecture(source, random_init=True)[0])
    return Backbone(config, init_params(config, seed), f"random-init:{source}")
  snapshot = _local_snapshot(source)
  if snapshot is None:
    if is_hub_id(source):
      snapshot = download_snapshot(source)
    elif source in PRESETS:
      raise ValueError(f"{source!r} names an architecture but no weights; pass a hub id or a snapshot directory, "
                       "or ask for random_init=True explicitly")
    else:
      raise _unknown_source(source)
  config = vit_config(_read_config_json(snapshot))
  tensors = _read_weights(snapshot)
  if config.family == "clip" and config.projection_dim and "visual_projection.weight" not in tensors:
    config = dataclasses.replace(config, projection_dim=None)
  params = convert_checkpoint(tensors, config, origin=str(snapshot))
  return Backbone(config, jax.tree.map(jnp.asarray, params), str(snapshot))
