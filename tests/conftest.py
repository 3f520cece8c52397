"""Shared fixtures: HF checkpoints made locally from configs with random weights (nothing is downloaded)."""

import os
import shutil
import socket
import tempfile
import uuid

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One JAX persistent compilation cache for the whole test run: the pytest-xdist workers (which inherit the
# controller's environment) and every subprocess they start reuse each other's compiled programs instead of
# compiling the same tiny runs again. A fresh directory per run, so a run never reads programs compiled by an older
# checkout; the executables are the ones XLA compiles, so results are unchanged.
JAX_CACHE = os.environ.setdefault(
    "ADAPTFACE_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), f"adaptface_jax_compile_cache_{uuid.uuid4().hex}"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", JAX_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))  # a bound turns on JAX's file lock


def pytest_sessionfinish(session):
  if not hasattr(session.config, "workerinput"):  # the controller (or a run without xdist), once all workers ended
    shutil.rmtree(JAX_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def hf_snapshots(tmp_path_factory):
  """Full-size DINOv2 ViT-S/14, CLIP ViT-B/16 (vision and full CLIPModel) snapshots saved with save_pretrained."""
  import torch
  from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model

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


def free_port() -> int:
  """A TCP port of 127.0.0.1 that nothing listens on now (for a coordinator of test processes)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def random_images(batch, size, seed=0):
  return np.random.RandomState(seed).randn(batch, size, size, 3).astype(np.float32)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  """One synthetic-world / TFDS cache for the whole test session (the tiny world is generated once)."""
  path = tmp_path_factory.mktemp("adaptface_cache")
  os.environ["ADAPTFACE_CACHE"] = str(path)
  return path


TINY_RUN = {"data.train": "synthetic_faces/tiny", "data.batch_size": 8, "log_every": 1, "eval.max_pairs": 40,
            "eval.batch_size": 32, "model.image_size": 56}


def tiny_run_args(**overrides):
  """Command-line overrides for a seconds-long run on the tiny synthetic world with a 2-layer ViT."""
  return [f"--config.{k}={v}" for k, v in {**TINY_RUN, **overrides}.items()]


def tiny_config(arg: str, overrides: dict | None = None):
  """The config of `--config=configs/lora_dino.py:ARG` with `tiny_run_args`, for a run in this process."""
  from configs import lora_dino
  config = lora_dino.get_config(arg)
  config.update_from_flattened_dict({**TINY_RUN, **(overrides or {})})
  return config


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, cache_dir):
  """(workdir, config) of a finished 4-step run: checkpoints at steps 2 and 4, synth_lfw evaluated at step 4 (the
  best checkpoint). Shared: copy the workdir before changing anything in it."""
  from adaptface_jax import train
  config = tiny_config("demo,tiny,steps=4", {"checkpoint_every": 2, "eval.benchmarks": ("synth_lfw",)})
  workdir = tmp_path_factory.mktemp("finished") / "run"
  train.train_and_evaluate(config, str(workdir))
  return workdir, config
