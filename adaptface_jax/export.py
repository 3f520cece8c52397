"""`python -m adaptface_jax.export --workdir DIR [--format hf|onnx] [--out OUT] [--step N]`: a trained run as
HuggingFace files or as one ONNX file.

hf (default): plain LoRA (K = 1) is merged into the pretrained weights, W' = W + scale * A B, and written as a
snapshot (config.json + model.safetensors) that transformers loads as Dinov2Model / CLIPVisionModel. DA-LoRA mixes its
K deltas per image, which no single weight matrix can express: its full tree is written as safetensors instead, with
a note saying so.

onnx: uint8 RGB faces [N, 112, 112, 3] (N dynamic) -> unit embeddings [N, D], embedded as verification embeds a face
(the raw embeddings of the image and of its horizontal flip, summed, L2-normalised), in float32. Plain LoRA is merged
as above; DA-LoRA keeps its router and per-image mixing in the graph. The graph is traced straight from JAX by
jax2onnx, pinned at 0.13.0: later releases cap orbax-checkpoint below the 0.12.8 this project pins. Two of its gaps
are worked around in the traced function: it has no antialiased bicubic resize, so the resize to model.image_size is
two constant matrix products holding jax.image.resize's own weights (the model then takes floats in 0..1 at its
size), and a concatenation along the dynamic batch axis loses its size, so image and flip go through the model as two
passes (sharing the weights).

Nothing lands on a training workdir's own files (cli.refuse_run_files: not --out WORKDIR, nor WORKDIR/config.json,
WORKDIR/checkpoints/...), and an hf --out folder that already holds files is refused unless --overwrite is given
(then the export's files there are replaced, others left). An existing onnx --out file is replaced. Every file is
written atomically (cli.write_atomically).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from safetensors.numpy import save

from adaptface_jax import cli, losses, run_state, trainable_rules
from adaptface_jax.data.common import IMAGE_SIZE
from adaptface_jax.models import face_model, hf_weights
from adaptface_jax.models.lora import QKV_SLICES

log = logging.getLogger(__name__)

_WORKDIR = cli.define(flags.DEFINE_string, "workdir", None, "Training workdir.")
_FORMAT = flags.DEFINE_enum("format", "hf", ["hf", "onnx"], "hf: a HuggingFace snapshot (DA-LoRA: its variable "
                            "tree); onnx: one .onnx file, uint8 faces [N, 112, 112, 3] -> unit embeddings [N, D].")
_OUT = cli.define(flags.DEFINE_string, "out", None, "hf: the output directory (required); onnx: the .onnx file "
                  "(default: WORKDIR/export/model.onnx).")
_STEP = cli.define(flags.DEFINE_integer, "step", None, "Checkpoint step (default: latest).")
_OVERWRITE = cli.define(flags.DEFINE_bool, "overwrite", False, "hf: write into an --out folder that already holds "
                        "files (the export's own files there are replaced, the others left).")


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


def check_hf_out(workdir: str, out: str, *, overwrite: bool = False) -> Path:
  """The --out folder of an hf export, refused (ValueError naming it) when it is a training workdir or one of its
  own files, a file, or a folder that already holds files without `overwrite`."""
  path = Path(out).expanduser()
  cli.refuse_run_files(path, flag="--out", workdirs=[workdir])
  if path.exists() and not path.is_dir():
    raise ValueError(f"--out={out}: {path} is a file; with --format=hf, --out names the folder to write")
  present = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
  if present and not overwrite:
    shown = ", ".join(present[:5]) + (f", ... ({len(present)} in all)" if len(present) > 5 else "")
    raise ValueError(f"--out={out}: {path} already holds {shown}; pass --overwrite to write the export over it (its "
                     "files there are replaced, the others left), or give a new or empty folder")
  return path


def export_run(workdir: str, out: str, step: int | None = None, *, overwrite: bool = False) -> Path:
  out = check_hf_out(workdir, out, overwrite=overwrite)
  config, model, variables, meta = run_state.load_run(workdir, step=step)

  def write(name: str, text: str) -> None:
    cli.write_atomically(out / name, lambda f: f.write(text))

  def tensors(name: str, flat: dict, **metadata) -> None:
    cli.write_atomically(out / name, lambda f: f.write(save(flat, metadata=metadata or None)), binary=True)

  if model.num_domains > 1:
    flat = {k: np.asarray(v) for k, v in trainable_rules.flatten(jax.device_get(variables)).items()}
    tensors("adaptface_tree.safetensors", flat)
    write("README.txt",
          "DA-LoRA mixes its K LoRA deltas per image with router weights, so they cannot be merged into one weight\n"
          "matrix. adaptface_tree.safetensors holds the full variable tree ('/'-joined paths: params/backbone,\n"
          "params/router, params/head, lora/..., margin/centers); config.json is the run's config.\n")
    write("config.json", json.dumps(config.to_dict(), indent=2, default=list))
    return out
  merged = merge_lora(variables["params"]["backbone"], variables.get("lora", {}).get("backbone", {}),
                      model.spec.scale if model.spec else 1.0)
  tensors("model.safetensors", hf_weights.to_hf_tensors(merged, model.vit), format="pt")
  write("config.json", json.dumps(hf_weights.hf_config(model.vit), indent=2))
  if model.embedding_dim:  # a run without a head (pretraining) exports all it trained
    write("adaptface_head.json", json.dumps({"step": meta["step"], "note": (
        "merged backbone only; the embedding head (params/head) is not part of the HuggingFace model")}))
  return out


def _resize_matrix(size: int, image_size: int) -> np.ndarray:
  """[image_size, size]: jax.image.resize's bicubic (antialiased when shrinking) weights along one axis."""
  return np.asarray(jax.image.resize(np.eye(size, dtype=np.float32), (image_size, size), "bicubic"))


def onnx_embed_fn(model: face_model.FaceModel, variables: dict):
  """uint8 faces [N, 112, 112, 3] -> unit embeddings [N, D] of image + flip, in ops jax2onnx converts."""
  rows = _resize_matrix(IMAGE_SIZE, model.image_size)

  def embed(faces):
    x = faces.astype(jnp.float32) / 255.0
    if model.image_size != IMAGE_SIZE:  # the resize preprocess does, one axis at a time
      x = jnp.einsum("sh,nhwc->nswc", rows, x, precision="highest")
      x = jnp.einsum("tw,nswc->nstc", rows, x, precision="highest")
    raw = model.apply(variables, x)["embedding_raw"] + model.apply(variables, x[:, :, ::-1])["embedding_raw"]
    return losses.safe_l2_normalize(raw)

  return embed


def export_onnx(workdir: str, out: str | None = None, step: int | None = None) -> Path:
  if out:
    cli.refuse_run_files(out, flag="--out", workdirs=[workdir])
    if Path(out).expanduser().is_dir():
      raise ValueError(f"--out={out}: {Path(out).expanduser()} is a folder; with --format=onnx, --out names the "
                       ".onnx file to write")
  import jax2onnx  # only this format needs the exporter

  _, model, variables, meta = run_state.load_run(workdir, step=step)
  variables, _ = face_model.split_margin(variables)
  model = model.clone(dtype=jnp.float32, remat="")
  if model.spec is not None and model.num_domains == 1:
    merged = merge_lora(variables["params"]["backbone"], variables["lora"]["backbone"], model.spec.scale)
    variables = {"params": {**variables["params"], "backbone": merged}}
    model = model.clone(spec=None)
  elif model.router_mode == "oracle":  # faces come without domain labels: uniform weights, as for unlabelled faces
    model = model.clone(router_mode="uniform")
  out = Path(out).expanduser() if out else Path(workdir).expanduser() / "export" / "model.onnx"
  # jax2onnx's dm_pix plugins do not import with this jax (unused here) and onnx_ir leaves some intermediate values
  # untyped: warnings that do not concern the graph.
  for name in ("jax2onnx.plugins.plugin_system", "onnx_ir.serde"):
    logging.getLogger(name).setLevel(logging.ERROR)
  faces = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3"), jnp.uint8)
  proto = jax2onnx.to_onnx(onnx_embed_fn(model, variables), [faces], model_name="adaptface",
                           input_names=["faces"], output_names=["embedding"])
  cli.write_atomically(out, lambda f: f.write(proto.SerializeToString()), binary=True)  # the weights are in it
  log.info("step %d exported to %s (%.1f MB)", meta["step"], out, out.stat().st_size / 1e6)
  return out


def main(argv):
  del argv
  if _FORMAT.value == "onnx":
    print(export_onnx(_WORKDIR.value, _OUT.value, _STEP.value))
  elif _OUT.value is None:
    raise ValueError("--out (the output directory) is required with --format=hf")
  else:
    print(export_run(_WORKDIR.value, _OUT.value, _STEP.value, overwrite=_OVERWRITE.value))


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  cli.run(main)
