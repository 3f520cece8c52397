"""What the face datasets share, importable without any reader or renderer: the domain labels and the cache."""

from __future__ import annotations

import os
from pathlib import Path

IMAGE_SIZE = 112  # every face dataset holds aligned 112x112 faces

# An example's `domain` label is its index here (-1 when unknown, as for CASIA-WebFace and image folders).
DOMAIN_NAMES = ("general", "pose", "age")
UNKNOWN_DOMAIN = -1

# The synthetic world's verification benchmarks (`.bin` files written with the world).
SYNTHETIC_BENCHMARKS = ("synth_lfw", "synth_cfp_fp", "synth_agedb")

# The synthetic renderer's version: it names the cached worlds and is the major version of their TFDS builder, so
# that data rendered by an older renderer is never reused. Bump it whenever the renderer changes its images.
RENDERER_VERSION = 1


def default_cache_dir() -> Path:
  """`$ADAPTFACE_CACHE`, or ~/.cache/adaptface_jax: synthetic worlds and prepared TFDS data live under it."""
  return Path(os.environ.get("ADAPTFACE_CACHE") or "~/.cache/adaptface_jax").expanduser()
