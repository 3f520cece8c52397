"""Pretraining a backbone from scratch (configs/pretrain.py), its export as a transformers snapshot, the shipped
synthetic-pretrained snapshots, and the pretraining world's separation from the adaptation worlds."""

import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_run_args
from test_train_e2e import main_cmd, run

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {"dinov2": ROOT / "synthetic_backbones" / "dinov2_192x6", "clip": ROOT / "synthetic_backbones" / "clip_192x6"}


def _transformers_pooled(directory: Path, family: str, pixels: np.ndarray) -> np.ndarray:
  import torch
  from transformers import CLIPVisionModel, Dinov2Model
  model = (Dinov2Model if family == "dinov2" else CLIPVisionModel).from_pretrained(directory).eval()
  kwargs = {} if family == "dinov2" else {"interpolate_pos_encoding": True}  # DINOv2 always interpolates
  with torch.no_grad():
    return model(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()), **kwargs).pooler_output.numpy()


def _our_pooled(directory: Path, family: str, images: np.ndarray, image_size: int) -> np.ndarray:
  from adaptface_jax.models.hf_weights import load_backbone
  from adaptface_jax.models.preprocess import preprocess
  pixels = np.asarray(preprocess(images, image_size=image_size, family=family))
  return np.asarray(load_backbone(str(directory)).encode(pixels)["pooler_output"]), pixels


@pytest.mark.parametrize("family,arg", [("dinov2", "dino"), ("clip", "clip")])
def test_pretraining_trains_every_backbone_weight_and_exports_for_transformers(tmp_path, cache_dir, family, arg):
  from adaptface_jax import run_state, trainable_rules
  workdir = tmp_path / arg
  backbone = "tiny-dinov2" if family == "dinov2" else "tiny-clip"
  args = tiny_run_args(**{"model.backbone": backbone, "eval.world": "synthetic_faces/tiny", "eval.every_steps": 3,
                          "optim.warmup_fraction": 0.0, "model.image_size": 56 if family == "dinov2" else 64})
  run(main_cmd(f"configs/pretrain.py:{arg},steps=3", workdir, *args), cache_dir)
  config, model, variables, _ = run_state.load_run(str(workdir))
  trainable, frozen = trainable_rules.split(variables, config.trainable)
  assert not trainable_rules.flatten(frozen)  # nothing frozen, no adapter and no head
  assert set(trainable) == {"params", "margin"} and set(trainable["params"]) == {"backbone"}

  out = tmp_path / "snapshot"
  run([sys.executable, "-m", "adaptface_jax.export", f"--workdir={workdir}", f"--out={out}"], cache_dir)
  images = np.random.RandomState(0).randint(0, 256, (2, 112, 112, 3)).astype(np.uint8)
  ours, pixels = _our_pooled(out, family, images, config.model.image_size)
  theirs = _transformers_pooled(out, family, pixels)
  assert np.abs(ours - theirs).max() < 1e-4
  # The exported weights are the trained ones: the model's own feature equals the snapshot's pooled output.
  feature = np.asarray(model.apply({"params": variables["params"]}, images)["feature"])
  assert np.abs(feature - theirs).max() < 1e-4


def _model_card_sha256(directory: Path) -> str:
  card = (directory / "README.md").read_text()
  match = re.search(r"sha256[^0-9a-f]*([0-9a-f]{64})", card)
  assert match, f"{directory}/README.md gives no sha256"
  return match.group(1)


@pytest.mark.parametrize("family", sorted(SHIPPED))
def test_shipped_snapshot_matches_its_card_and_transformers(family):
  directory = SHIPPED[family]
  weights = (directory / "model.safetensors").read_bytes()
  assert len(weights) < 25 * 2 ** 20
  assert hashlib.sha256(weights).hexdigest() == _model_card_sha256(directory)
  images = np.random.RandomState(1).randint(0, 256, (2, 112, 112, 3)).astype(np.uint8)
  ours, pixels = _our_pooled(directory, family, images, 112)
  assert np.abs(ours - _transformers_pooled(directory, family, pixels)).max() < 1e-4


def test_shipped_dinov2_snapshot_beats_raw_pixels(tmp_path, cache_dir):
  """Un-tuned CLS features against cosine of raw pixels, on 400 balanced pairs of the tiny world's synth_lfw."""
  out = run([sys.executable, "-m", "adaptface_jax.evaluate", "--config=configs/lora_dino.py:demo",
             f"--backbone={SHIPPED['dinov2']}", "--benchmarks=synth_lfw", "--max_pairs=400", "--json",
             "--config.data.train=synthetic_faces/tiny"], cache_dir)
  features = json.loads(out.stdout.splitlines()[0])["accuracy"]
  from adaptface_jax.data import binfile, synthetic, tfds_builders
  from adaptface_jax.embeddings import balanced_subset
  world = tfds_builders.synthetic_world_for("synthetic_faces/tiny")
  images, issame = binfile.load_pairs(world["benchmarks"]["synth_lfw"])
  pairs = balanced_subset(issame, 400)
  sides = np.stack([2 * pairs, 2 * pairs + 1], axis=1).reshape(-1)
  pixels = synthetic.pixel_baseline(images[sides], issame[pairs])["accuracy"]
  assert features > pixels + 0.05, (features, pixels)


def test_pretraining_world_is_general_domain_on_its_own_identities(tmp_path):
  from adaptface_jax.data import synthetic
  world = synthetic.build_world(tmp_path, num_train_identities=4, images_per_identity=6, num_pairs=20,
                                train_kind="pretrain", identity_offset=100_000)
  meta = np.load(Path(world["train"]) / "meta.npz")
  assert (np.abs(meta["yaw"]) <= 30).all() and (meta["age"] <= 0.45).all() and (meta["domain"] == 0).all()
  assert meta["identity"].min() == 100_000 and (meta["label"] < 4).all()
  adaptation = synthetic.build_world(tmp_path, num_train_identities=4, images_per_identity=2, num_pairs=20)
  assert "pretrain-from100000" in world["root"] and world["root"] != adaptation["root"]
  # The adaptation world's benchmark identities start right after its training ones, far below 100,000.
  bench = np.load(Path(adaptation["benchmarks"]["synth_lfw"]).with_suffix(".meta.npz"))
  assert bench["identity"].max() < 100_000
