"""Writes the model card (README.md) and the learning-curve plot of a synthetic-pretrained backbone snapshot.

  python launch/pretrain_card.py --workdir workdirs/pretrain_dino --snapshot synthetic_backbones/dinov2_192x6

Reads the pretraining run (config.json, summary.json, metrics.jsonl), hashes the snapshot's model.safetensors and
evaluates the snapshot un-tuned (its pooled feature, no adapter, no head) on the full synthetic benchmarks of the
adaptation world (`synthetic_faces/demo`), beside the raw-pixel baseline of the same pairs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ARCHITECTURE = {
    "dinov2": "DINOv2 family (`Dinov2Model`): patch 14, CLS token, LayerScale, exact GELU, position embeddings "
              "interpolated to the input grid",
    "clip": "CLIP family (`CLIPVisionModel`): patch 16, class embedding, pre-LayerNorm, quick-GELU, post-LayerNorm "
            "pooled CLS",
}


def untuned_and_pixels(snapshot: Path, family: str) -> tuple[dict, dict]:
  from adaptface_jax import evaluate
  from adaptface_jax.data import binfile, synthetic, tfds_builders
  from configs import common
  config = common.experiment("dino" if family == "dinov2" else "clip", "lora", "demo")
  untuned = evaluate.evaluate_untuned(config, str(snapshot), {"eval.max_pairs": 0})
  world = tfds_builders.synthetic_world_for(config.data.train)
  pixels = {}
  for name in config.eval.benchmarks:
    images, issame = binfile.load_pairs(world["benchmarks"][name])
    pixels[name] = synthetic.pixel_baseline(images, issame)
  return untuned, pixels


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="the pretraining run")
  parser.add_argument("--snapshot", required=True, help="its export (config.json + model.safetensors)")
  parser.add_argument("--note", default="", help="how the run went (interruptions, machine load), for the card")
  args = parser.parse_args()
  workdir, snapshot = Path(args.workdir), Path(args.snapshot)
  config = json.loads((workdir / "config.json").read_text())
  summary = json.loads((workdir / "summary.json").read_text())
  metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  hf = json.loads((snapshot / "config.json").read_text())
  family = "dinov2" if hf["model_type"] == "dinov2" else "clip"
  arg = "dino" if family == "dinov2" else "clip"
  sha256 = hashlib.sha256((snapshot / "model.safetensors").read_bytes()).hexdigest()
  untuned, pixels = untuned_and_pixels(snapshot, family)

  curve = [m for m in metrics if any(k.startswith("eval/") for k in m)]
  names = [k.removeprefix("eval/") for k in curve[0] if k.startswith("eval/")] if curve else []
  if curve:
    figure, axis = plt.subplots(figsize=(6, 4))
    for name in names:
      axis.plot([m["step"] for m in curve], [100 * m[f"eval/{name}"] for m in curve], marker="o", label=name)
    axis.set_xlabel("pretraining step (64 images)")
    axis.set_ylabel(f"accuracy % ({config['eval']['max_pairs']}-pair subsets)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(snapshot / "learning_curve.png", dpi=100)
  speeds = [m["images_per_sec"] for m in metrics if "images_per_sec" in m]
  # Each logged window covers log_every steps (the first one after a start also holds the compilation).
  train_seconds = sum(config["log_every"] * config["data"]["batch_size"] / s for s in speeds)
  wall = summary["wall_time_s_last_session"]
  width, depth = hf.get("hidden_size") or hf["vision_config"]["hidden_size"], hf.get("num_hidden_layers")
  lines = [
      f"# Synthetic-pretrained {family} ViT ({width} wide, {depth} blocks)",
      "",
      "A backbone trained from random initialisation on this project's synthetic face world, so that the",
      "adaptation methods have something face-specific to adapt offline. It has never seen a real face: its",
      "numbers say nothing about real-data accuracy (that needs the real pretrained weights and CASIA-WebFace).",
      "",
      "## Architecture",
      "",
      f"- {ARCHITECTURE[family]}.",
      f"- Width {width}, {depth} blocks, {hf.get('num_attention_heads')} heads, input 112 px. "
      f"`transformers.{hf['architectures'][0]}.from_pretrained(<this folder>)` and "
      "`adaptface_jax.load_backbone(<this folder>)` load it.",
      "",
      "## Pretraining",
      "",
      f"- Data: `{config['data']['train']}`: the general domain only (near-frontal |yaw| <= 30 degrees, young "
      "age <= 0.45, ordinary light), on identities numbered from 100,000, disjoint from every adaptation world. "
      "Profile (pose) and old (age) faces are unseen.",
      f"- Every backbone weight trained, no adapter, no head: CosFace (s={config['loss']['scale']:g}, "
      f"m={config['loss']['m3']:g}, the margin grown from 0 over the first {config['loss']['margin_warmup_steps']} "
      f"steps) on the pooled feature; AdamW lr {config['optim']['lr']:g}, weight decay "
      f"{config['optim']['weight_decay']:g}, warmup {config['optim']['warmup_fraction']:g} of the steps then "
      f"cosine; batch {config['data']['batch_size']}, {summary['steps']} steps "
      f"({summary['steps'] * config['data']['batch_size']:,} images).",
      f"- Time on a 2-core CPU: {train_seconds / 60:.1f} min of training steps (the logged windows: "
      f"{sum(speeds) / len(speeds):.1f} images/s on average); the run's last start took {wall / 60:.1f} min "
      "wall time, evaluations included." + (f" {args.note}" if args.note else ""),
      f"- Reproduce: `python -m adaptface_jax.main --config configs/pretrain.py:{arg} "
      f"--workdir workdirs/pretrain_{arg}` then `python -m adaptface_jax.export --workdir workdirs/pretrain_{arg} "
      f"--out {snapshot} --overwrite` and "
      f"`python launch/pretrain_card.py --workdir workdirs/pretrain_{arg} --snapshot {snapshot}`.",
      "",
      f"model.safetensors sha256: {sha256}",
      "",
      "## Un-tuned accuracy (pooled feature, full 6,000-pair synthetic benchmarks, 10-fold, flip)",
      "",
      "| benchmark | un-tuned backbone | fold std | raw pixels |",
      "|---|---:|---:|---:|",
  ]
  for name, result in untuned.items():
    lines.append(f"| {name} | {100 * result['accuracy']:.2f} | {100 * result['accuracy_std']:.2f} | "
                 f"{100 * pixels[name]['accuracy']:.2f} |")
  lines += ["", "Reproduce: `python -m adaptface_jax.evaluate --config configs/lora_"
            f"{arg}.py:demo --backbone {snapshot} --max_pairs 0`.", ""]
  if curve:
    lines += ["## Learning curve", "", "| step | " + " | ".join(names) + " |",
              "|---:|" + "---:|" * len(names)]
    lines += [f"| {m['step']} | " + " | ".join(f"{100 * m[f'eval/{n}']:.2f}" for n in names) + " |" for m in curve]
    lines += ["", "![learning curve](learning_curve.png)", ""]
  (snapshot / "README.md").write_text("\n".join(lines))
  print((snapshot / "README.md").read_text())


if __name__ == "__main__":
  main()
