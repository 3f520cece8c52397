"""InsightFace verification-pair files (`lfw.bin`, `cfp_fp.bin`, `agedb_30.bin`, ...).

A `.bin` is a pickle of `(bins, issame_list)`: 2P encoded images in pair order a0, b0, a1, b1, ... and P bools.
Unpickling runs whatever the file asks for, so these files (usually downloaded) are read with a restricted
unpickler that builds only bytes, bytearrays, lists, tuples, bools and numpy uint8 / bool arrays; any other
global is refused before it is called.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from adaptface_jax.data.recordio import decode_image, encode_image

_ALLOWED_DTYPES = (np.dtype(np.uint8), np.dtype(np.bool_))
# The reconstruction functions numpy's own array pickles name (module paths differ between numpy 1.x and 2.x).
_NUMPY_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_NUMPY_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]


class RefusedPickleError(pickle.UnpicklingError):
  """The file asked for a global (or a numpy dtype) that a verification .bin never needs."""


def _checked_dtype(dtype: np.dtype, where: str) -> np.dtype:
  if dtype not in _ALLOWED_DTYPES:
    raise RefusedPickleError(f"{where}: refused numpy dtype {dtype}; a .bin holds only uint8 images and "
                                 f"bool labels")
  return dtype


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the globals that the `.bin` format needs, each wrapped to check its arguments."""

  def __init__(self, file, path: str, **kwargs):
    super().__init__(file, **kwargs)
    self._path = path

  def find_class(self, module: str, name: str):
    path = self._path

    def reconstruct(subtype, shape, dtype_code):
      if subtype is not np.ndarray:
        raise RefusedPickleError(f"{path}: refused array subtype {subtype!r}")
      return _NUMPY_RECONSTRUCT(np.ndarray, shape, dtype_code)

    def frombuffer(buffer, dtype, shape, order):
      _checked_dtype(np.dtype(dtype), path)
      return _NUMPY_FROMBUFFER(buffer, dtype, shape, order)

    def make_dtype(spec, align=False, copy=False):
      if isinstance(spec, bytes):  # Python-2 pickles loaded with encoding='bytes'
        spec = spec.decode("ascii")
      if not isinstance(spec, str):
        raise RefusedPickleError(f"{path}: refused numpy dtype spec {spec!r}")
      return _checked_dtype(np.dtype(spec, align, copy), path)

    def latin1_encode(text, encoding="utf-8"):
      # How Python 3 writes bytes in protocol 0-2 pickles.
      if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise RefusedPickleError(f"{path}: refused _codecs.encode({type(text).__name__}, {encoding!r})")
      return text.encode("latin-1")

    def make_bytearray(data=b""):
      if not isinstance(data, (bytes, bytearray)):
        raise RefusedPickleError(f"{path}: refused bytearray({type(data).__name__})")
      return bytearray(data)

    allowed = {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy.core.numeric", "_frombuffer"): frombuffer,
        ("numpy._core.numeric", "_frombuffer"): frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): make_dtype,
        ("_codecs", "encode"): latin1_encode,
        ("builtins", "bytearray"): make_bytearray,
    }
    try:
      return allowed[(module, name)]
    except KeyError:
      raise RefusedPickleError(
          f"{path}: refused to load global {module}.{name}: a verification .bin holds only images (bytes or uint8 "
          f"arrays) and bools, so this file is not one (or was crafted to run code)") from None


def _unpickle(path: Path):
  data = path.read_bytes()
  try:
    return _RestrictedUnpickler(io.BytesIO(data), str(path)).load()
  except UnicodeDecodeError:
    # Python-2 pickles store bytes as `str`; ASCII decoding (the default) fails on image data.
    return _RestrictedUnpickler(io.BytesIO(data), str(path), encoding="bytes").load()


def _as_image_bytes(entry, index: int, path: Path) -> bytes:
  if isinstance(entry, (bytes, bytearray)):
    return bytes(entry)
  if isinstance(entry, np.ndarray) and entry.dtype == np.uint8 and entry.ndim == 1:
    return entry.tobytes()
  description = (f"array of dtype {entry.dtype} shape {entry.shape}" if isinstance(entry, np.ndarray)
                 else type(entry).__name__)
  raise ValueError(f"{path}: image {index} is a {description}; expected encoded image bytes or a 1-D uint8 array")


def _as_issame(issame, path: Path) -> np.ndarray:
  if isinstance(issame, np.ndarray):
    values = issame.reshape(-1).tolist() if issame.dtype in _ALLOWED_DTYPES else None
  elif isinstance(issame, (list, tuple)):
    values = list(issame)
  else:
    values = None
  if values is None:
    raise ValueError(f"{path}: issame_list is a {type(issame).__name__}; expected a list of bools")
  for index, value in enumerate(values):
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, int) and value in (0, 1)):
      continue
    raise ValueError(f"{path}: issame_list[{index}] = {value!r}; expected a bool")
  return np.asarray(values, dtype=bool)


def read_bin(path: str | os.PathLike) -> tuple[list[bytes], np.ndarray]:
  """(2P encoded images in pair order a0, b0, a1, b1, ..., issame bool [P]), read with a restricted unpickler."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such verification .bin file")
  try:
    content = _unpickle(path)
  except RefusedPickleError:
    raise
  except Exception as error:  # truncated or garbled pickles raise EOFError, ValueError, struct.error, ...
    raise pickle.UnpicklingError(f"{path}: not a readable verification .bin pickle: {error!r}") from error
  if not isinstance(content, (tuple, list)) or len(content) != 2:
    raise ValueError(f"{path}: expected a pickled (bins, issame_list) pair, got {type(content).__name__}")
  bins, issame = content
  if not isinstance(bins, (list, tuple)):
    raise ValueError(f"{path}: bins is a {type(bins).__name__}; expected a list of encoded images")
  images = [_as_image_bytes(entry, index, path) for index, entry in enumerate(bins)]
  issame = _as_issame(issame, path)
  if len(images) != 2 * len(issame):
    raise ValueError(f"{path}: {len(images)} images for {len(issame)} pairs; a .bin holds exactly 2 images per pair")
  if not len(issame):
    raise ValueError(f"{path}: holds no pairs")
  return images, issame


def write_bin(path: str | os.PathLike, images: Sequence, issame: Sequence[bool], *, image_format: str = "jpg",
              quality: int = 95) -> None:
  """Writes a `.bin` (protocol-4 pickle of (list of bytes, list of bool)).

  `images` are 2P entries in pair order a0, b0, a1, b1, ...: encoded bytes (stored as given) or uint8 HxWx3 RGB
  arrays (encoded as JPEG of the given quality, or lossless PNG with image_format='png').
  """
  issame_list = [bool(value) for value in issame]
  if len(images) != 2 * len(issame_list):
    raise ValueError(f"{path}: {len(images)} images for {len(issame_list)} pairs; need exactly 2 images per pair")
  encoded = []
  for index, image in enumerate(images):
    if isinstance(image, (bytes, bytearray, memoryview)):
      encoded.append(bytes(image))
    else:
      try:
        encoded.append(encode_image(image, image_format, quality))
      except ValueError as error:
        raise ValueError(f"{path}: image {index}: {error}") from None
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "wb") as handle:
    pickle.dump((encoded, issame_list), handle, protocol=4)


def load_pairs(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [2P, H, W, 3] RGB images in pair order, issame bool [P]); every image must decode, all one size."""
  path = Path(path)
  images, issame = read_bin(path)
  decoded = []
  for index, data in enumerate(images):
    try:
      image = decode_image(data)
    except Exception as error:  # PIL raises several types for corrupt data
      raise ValueError(f"{path}: image {index} (pair {index // 2}) is corrupt: {error}") from error
    if decoded and image.shape != decoded[0].shape:
      raise ValueError(f"{path}: image {index} is {image.shape[0]}x{image.shape[1]} but image 0 is "
                       f"{decoded[0].shape[0]}x{decoded[0].shape[1]}")
    decoded.append(image)
  return np.stack(decoded), issame
