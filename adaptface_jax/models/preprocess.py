"""On-device preprocessing shared by training and evaluation: uint8 faces -> resized, normalised float images.

The input pipeline ships uint8 112x112 faces (4x less host->device traffic than float32); resizing and the
per-backbone normalisation happen here, inside the jitted model, so training and evaluation cannot diverge.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Normalisation each backbone was pretrained with.
NORMALIZATION = {
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),  # OpenAI CLIP
}


def preprocess(images, *, image_size: int, family: str, dtype=jnp.float32):
  """[B, H, W, 3] uint8 (0..255) or float (0..1) -> [B, S, S, 3] normalised, S = image_size (bicubic resize)."""
  if images.dtype == jnp.uint8:
    images = images.astype(jnp.float32) / 255.0
  images = images.astype(jnp.float32)
  batch, height, width, channels = images.shape
  if (height, width) != (image_size, image_size):
    images = jax.image.resize(images, (batch, image_size, image_size, channels), method="bicubic")
  mean, std = NORMALIZATION[family]
  return ((images - jnp.asarray(mean)) / jnp.asarray(std)).astype(dtype)
