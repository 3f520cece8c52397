"""Shared fixtures: HF checkpoints made locally from configs with random weights (nothing is downloaded)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest


@pytest.fixture(scope="session")
def hf_snapshots(tmp_path_factory):
  """Full-size DINOv2 ViT-S/14, CLIP ViT-B/16 (vision and full CLIPModel) snapshots saved with save_pretrained."""
  import torch
  from transformers import (CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model)

  torch.manual_seed(0)
  root = tmp_path_factory.mktemp("hf")
  models = {
      "dinov2": Dinov2Model(Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                         image_size=518, patch_size=14)),
      "clip_vision": CLIPVisionModel(CLIPVisionConfig(hidden_size=768, intermediate_size=3072,
                                                      num_hidden_layers=12, num_attention_heads=12, patch_size=16,
                                                      image_size=224)),
      "clip_full": CLIPModel(CLIPConfig(
          vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             patch_size=16, image_size=64),
          text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
          projection_dim=24)),
  }
  out = {}
  for name, model in models.items():
    model.eval()
    model.save_pretrained(root / name)
    out[name] = (root / name, model)
  return out


def random_images(batch, size, seed=0):
  return np.random.RandomState(seed).randn(batch, size, size, 3).astype(np.float32)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  """One synthetic-world / TFDS cache for the whole test session (the tiny world is generated once)."""
  path = tmp_path_factory.mktemp("adaptface_cache")
  os.environ["ADAPTFACE_CACHE"] = str(path)
  return path


def tiny_run_args(**overrides):
  """Command-line overrides for a seconds-long run on the tiny synthetic world with a 2-layer ViT."""
  args = {"data.train": "synthetic_faces/tiny", "data.batch_size": 8, "log_every": 1, "eval.max_pairs": 40,
          "eval.batch_size": 32, "model.image_size": 56}
  args.update(overrides)
  return [f"--config.{k}={v}" for k, v in args.items()]
