"""`python -m adaptface_jax.export --workdir DIR --out OUT [--step N]`: a trained run as HuggingFace files.

Plain LoRA (K = 1) is merged into the pretrained weights, W' = W + scale * A B, and written as a snapshot
(config.json + model.safetensors) that transformers loads as Dinov2Model / CLIPVisionModel. DA-LoRA mixes its K
deltas per image, which no single weight matrix can express: its full tree is written as safetensors instead, with a
note saying so.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from absl import flags
from safetensors.numpy import save_file

from adaptface_jax import cli, run_state, trainable_rules
from adaptface_jax.models import hf_weights
from adaptface_jax.models.lora import QKV_SLICES

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")


def merge_lora(backbone_params: dict, lora: dict, scale: float) -> dict:
  """Backbone params with every single-domain LoRA delta added to the kernel it adapts."""
  flat = dict(trainable_rules.flatten(jax.device_get(backbone_params)))
  adapters = trainable_rules.flatten(jax.device_get(lora))
  for path, lora_a in adapters.items():
    if not path.endswith("lora_a"):
      continue
    prefix = path[: -len("/lora_a")]
    lora_b = adapters[prefix + "/lora_b"]
    if lora_a.shape[0] != 1:
      raise ValueError(f"{prefix} has {lora_a.shape[0]} domain deltas; only plain LoRA can be merged")
    delta = scale * (np.asarray(lora_a[0], np.float64) @ np.asarray(lora_b[0], np.float64))
    name = prefix.rsplit("/", 1)[-1]
    if name in QKV_SLICES:  # an adapter on one slice of the fused qkv kernel
      kernel_path = prefix.rsplit("/", 1)[0] + "/kernel"
      width = delta.shape[1]
      offset = QKV_SLICES.index(name) * width
      kernel = np.array(flat[kernel_path], np.float64)
      kernel[:, offset:offset + width] += delta
    else:
      kernel_path = prefix + "/kernel"
      kernel = np.asarray(flat[kernel_path], np.float64) + delta
    flat[kernel_path] = kernel.astype(np.float32)
  return trainable_rules.unflatten(flat)


def _hf_config(vit_config) -> dict:
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


def export_run(workdir: str, out: str, step: int | None = None) -> Path:
  config, model, variables, meta = run_state.load_run(workdir, step=step)
  out = Path(out).expanduser()
  out.mkdir(parents=True, exist_ok=True)
  if model.num_domains > 1:
    flat = {k: np.asarray(v) for k, v in trainable_rules.flatten(jax.device_get(variables)).items()}
    save_file(flat, out / "adaptface_tree.safetensors")
    (out / "README.txt").write_text(
        "DA-LoRA mixes its K LoRA deltas per image with router weights, so they cannot be merged into one weight\n"
        "matrix. adaptface_tree.safetensors holds the full variable tree ('/'-joined paths: params/backbone,\n"
        "params/router, params/head, lora/..., margin/centers); config.json is the run's config.\n")
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=list))
    return out
  merged = merge_lora(variables["params"]["backbone"], variables.get("lora", {}).get("backbone", {}),
                      model.spec.scale if model.spec else 1.0)
  save_file(hf_weights.to_hf_tensors(merged, model.vit), out / "model.safetensors", metadata={"format": "pt"})
  (out / "config.json").write_text(json.dumps(_hf_config(model.vit), indent=2))
  if model.embedding_dim:  # a run without a head (pretraining) exports all it trained
    (out / "adaptface_head.json").write_text(json.dumps({"step": meta["step"], "note": (
        "merged backbone only; the embedding head (params/head) is not part of the HuggingFace model")}))
  return out


def main(argv):
  del argv
  print(export_run(_WORKDIR.value, _OUT.value, _STEP.value))


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "out"])
  cli.run(main)
