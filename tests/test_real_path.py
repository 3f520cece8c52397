"""The real path, first time: the default config (no `:demo`) with its hub id resolved from the HuggingFace cache
offline, CASIA-WebFace-style `train.rec` data and the five InsightFace `.bin` benchmarks, shrunk to two steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from test_hub import tiny_hf_model, write_hf_cache

from adaptface_jax.data import binfile, recordio
from configs import common

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES, IMAGES_PER_CLASS, NUM_PAIRS = 4, 4, 20


def _faces(rng, count):
  """Per-identity tinted noise: enough for the machinery, nothing to learn from."""
  tint = rng.integers(0, 256, (1, 1, 3))
  return [np.clip(tint + rng.normal(0, 40, (112, 112, 3)), 0, 255).astype(np.uint8) for _ in range(count)]


def _write_data(manual_dir: Path, bin_dir: Path) -> None:
  rng = np.random.default_rng(0)
  faces = [_faces(rng, IMAGES_PER_CLASS) for _ in range(NUM_CLASSES)]
  recordio.write_insightface_record(manual_dir, [(image, label) for label, images in enumerate(faces)
                                                 for image in images])
  for name in common.STANDARD_BENCHMARKS:
    images, issame = [], []
    for pair in range(NUM_PAIRS):  # alternating same / different: every fold has both
      a, b = pair % NUM_CLASSES, (pair + pair % 2) % NUM_CLASSES
      images += [faces[a][pair % IMAGES_PER_CLASS], faces[b][(pair + 1) % IMAGES_PER_CLASS]]
      issame.append(a == b)
    binfile.write_bin(bin_dir / f"{name}.bin", images, issame)


def test_default_config_trains_and_evaluates_from_hub_id_rec_and_bins(tmp_path):
  hf_home, manual_dir, workdir = tmp_path / "hf_home", tmp_path / "faces_webface_112x112", tmp_path / "run"
  model = tiny_hf_model("dinov2")
  write_hf_cache(hf_home, common.BACKBONES["dino"], model)
  _write_data(manual_dir, manual_dir)  # InsightFace ships the .bin files next to train.rec

  env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
  env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", ADAPTFACE_CACHE=str(tmp_path / "cache"))
  overrides = {"model.image_size": 56, "data.manual_dir": manual_dir, "data.num_classes": NUM_CLASSES,
               "data.batch_size": 8, "data.shuffle_buffer": 16, "eval.bin_dir": manual_dir, "eval.batch_size": 20,
               "total_steps": 2, "log_every": 1}
  cmd = [sys.executable, "-m", "adaptface_jax.main", "--config=configs/dalora_dino.py", f"--workdir={workdir}",
         *(f"--config.{key}={value}" for key, value in overrides.items())]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-4000:]

  assert any((workdir / "checkpoints").iterdir())
  results = json.loads((workdir / "results.json").read_text())
  for name in common.STANDARD_BENCHMARKS:
    assert results[name]["num_pairs"] == NUM_PAIRS and 0.0 <= results[name]["accuracy"] <= 1.0
  # The cached tiny snapshot was loaded (a preset architecture would hold 22M frozen weights).
  cached = sum(p.numel() for name, p in model.named_parameters() if "mask_token" not in name)
  assert json.loads((workdir / "summary.json").read_text())["frozen_params"] == cached
  assert (tmp_path / "cache" / "tfds" / "casia_webface").is_dir()
