"""Image-folder datasets (`root/<identity>/<image>.jpg`) and their conversion to `.rec` / `.bin` files.

Identity subsets follow FRoundation: "first N" = the first N identity folders in sorted order, "most" (their
"selective" subsets) = the N identities with the most images. Either way labels 0..K-1 are assigned in sorted
identity-name order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from adaptface_jax.data import binfile, recordio

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_PIL_FORMAT_BY_OPTION = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG"}


def is_image_file(path: Path) -> bool:
  return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def scan_image_folder(root: str | os.PathLike) -> dict[str, list[Path]]:
  """identity name -> sorted image paths, identities in sorted order.

  Only images directly inside each identity folder count (.jpg/.jpeg/.png, any case); identity folders without
  images are left out with a warning, since a class without samples cannot be trained.
  """
  root = Path(root)
  if not root.exists():
    raise FileNotFoundError(f"{root}: image folder does not exist")
  if not root.is_dir():
    raise NotADirectoryError(f"{root}: expected a directory of identity folders (root/<identity>/<image>.jpg)")
  identities: dict[str, list[Path]] = {}
  empty = []
  for identity_dir in sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name):
    images = sorted((p for p in identity_dir.iterdir() if is_image_file(p)), key=lambda p: p.name)
    if images:
      identities[identity_dir.name] = images
    else:
      empty.append(identity_dir.name)
  if empty:
    log.warning("%s: %d identity folders hold no .jpg/.jpeg/.png image and are left out (e.g. %s)", root,
                len(empty), empty[:5])
  if not identities:
    loose = sum(1 for p in root.iterdir() if is_image_file(p))
    hint = f" ({loose} images lie directly in the root; put each identity in its own folder)" if loose else ""
    raise ValueError(f"{root}: no identity folder with .jpg/.jpeg/.png images found{hint}")
  return identities


def select_identities(identities: dict[str, list[Path]], num_identities: int | None,
                      mode: str = "first") -> dict[str, list[Path]]:
  """A subset of `num_identities` identities (None = all), returned in sorted name order.

  mode='first': the first N names in sorted order. mode='most': the N identities with the most images, ties
  broken by name.
  """
  if mode not in ("first", "most"):
    raise ValueError(f"mode must be 'first' or 'most', got {mode!r}")
  names = sorted(identities)
  if num_identities is None:
    return {name: identities[name] for name in names}
  if not 1 <= num_identities <= len(names):
    raise ValueError(f"num_identities={num_identities} but the folder has {len(names)} identities")
  if mode == "first":
    chosen = names[:num_identities]
  else:
    chosen = sorted(sorted(names, key=lambda name: (-len(identities[name]), name))[:num_identities])
  return {name: identities[name] for name in chosen}


def _checked_image_bytes(path: Path, image_format: str) -> bytes | np.ndarray:
  """The file's bytes when they already are an RGB image in the wanted format, else the decoded RGB pixels.

  Every file is fully decoded so that a corrupt source image fails here, naming the file; one over
  recordio.MAX_IMAGE_PIXELS is refused from its header, undecoded.
  """
  data = path.read_bytes()
  try:
    with recordio.open_image(data) as image:
      image.load()
      if image.format == _PIL_FORMAT_BY_OPTION[image_format] and image.mode == "RGB":
        return data
      return np.asarray(image.convert("RGB"), dtype=np.uint8)
  except recordio.ImageTooLarge as error:
    raise recordio.ImageTooLarge(f"{path}: {error}") from None
  except Exception as error:  # PIL raises several types for corrupt data
    raise ValueError(f"{path}: not a readable image: {error}") from error


def folder_to_record(root: str | os.PathLike, out_dir: str | os.PathLike, *, num_identities: int | None = None,
                     mode: str = "first", image_format: str = "jpg") -> dict:
  """Image folder -> InsightFace `train.rec`/`train.idx`/`property` with labels 0..K-1 in sorted identity order.

  Files already in `image_format` (and RGB) are stored byte for byte; others are converted to RGB and encoded
  (JPEG quality 95 or lossless PNG). Returns write_insightface_record's dict plus the identity names by label.
  """
  image_format = image_format.lower()
  if image_format not in _PIL_FORMAT_BY_OPTION:
    raise ValueError(f"image_format must be one of {sorted(_PIL_FORMAT_BY_OPTION)}, got {image_format!r}")
  chosen = select_identities(scan_image_folder(root), num_identities, mode)

  def samples() -> Iterator[tuple[bytes | np.ndarray, int]]:
    for label, paths in enumerate(chosen.values()):
      for path in paths:
        yield _checked_image_bytes(path, image_format), label

  info = recordio.write_insightface_record(out_dir, samples(), image_format=image_format)
  info["identity_names"] = list(chosen)
  return info


def pairs_to_bin(pairs_file: str | os.PathLike, root: str | os.PathLike, out_path: str | os.PathLike) -> dict:
  """A pairs list (lines `path_a path_b 1|0`, paths relative to root) -> a verification `.bin`.

  JPEG/PNG files are stored byte for byte (after checking they decode); blank lines and lines starting with
  '#' are ignored. Returns {'pairs', 'same', 'different', 'path'}.
  """
  pairs_file, root = Path(pairs_file), Path(root)
  images: list[bytes] = []
  issame: list[bool] = []
  for line_number, line in enumerate(pairs_file.read_text().splitlines(), start=1):
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    fields = line.split()
    if len(fields) != 3 or fields[2] not in ("0", "1"):
      raise ValueError(f"{pairs_file}:{line_number}: expected 'path_a path_b 1|0', got {line!r}")
    for relative in fields[:2]:
      path = root / relative
      if not path.is_file():
        raise FileNotFoundError(f"{pairs_file}:{line_number}: {path} does not exist")
      data = path.read_bytes()
      try:
        with recordio.open_image(data) as image:
          image.load()
          image_format = image.format
      except recordio.ImageTooLarge as error:
        raise recordio.ImageTooLarge(f"{pairs_file}:{line_number}: {path}: {error}") from None
      except Exception as error:  # PIL raises several types for corrupt data
        raise ValueError(f"{pairs_file}:{line_number}: {path} is not a readable image: {error}") from error
      if image_format not in ("JPEG", "PNG"):
        raise ValueError(f"{pairs_file}:{line_number}: {path} is {image_format}; verification files hold JPEG or PNG")
      images.append(data)
    issame.append(fields[2] == "1")
  if not issame:
    raise ValueError(f"{pairs_file}: no pairs found")
  binfile.write_bin(out_path, images, issame)
  same = int(sum(issame))
  return {"pairs": len(issame), "same": same, "different": len(issame) - same, "path": str(out_path)}
