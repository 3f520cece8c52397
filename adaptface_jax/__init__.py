"""AdaptFace-JAX: face recognition by LoRA / DA-LoRA adaptation of pretrained ViTs (DINOv2, CLIP) in JAX/Flax."""

import importlib.abc
import sys

from adaptface_jax.models.hf_weights import Backbone, load_backbone

__all__ = ["Backbone", "load_backbone"]

# Modules that were renamed or moved: importing an old name, or `python -m` on it, fails with the new name.
MOVED_MODULES = {
    **{name: f"models.{name}" for name in ("vit", "attention", "lora", "face_model", "preprocess", "hf_weights")},
    "inspect": "inspect_params",
    "evaluation": "embeddings",
    "partition": "trainable_rules (what trains) and adaptface_jax.sharding (the device mesh)",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
  """Last on sys.meta_path, so it is asked only about modules that no longer exist."""

  def find_spec(self, fullname, path=None, target=None):
    package, _, old = fullname.partition(".")
    if package == __name__ and old in MOVED_MODULES:
      raise ModuleNotFoundError(f"{fullname} is now {__name__}.{MOVED_MODULES[old]}")
    return None


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
  sys.meta_path.append(_MovedModuleFinder())
