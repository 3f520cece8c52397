"""MXNet RecordIO (`train.rec` + `train.idx`) and InsightFace image records, read and written without MXNet.

On-disk record (little-endian): `[magic u32][lrec u32][payload][zero padding to 4 bytes]`, with
`lrec = cflag << 29 | length`. A payload that contains the magic at a 4-byte-aligned offset is cut there into
parts (cflag 1 first, 2 middle, 3 last; the magic itself is dropped and re-inserted by the reader), so a reader
that resynchronises on the magic never sees a false record start. The `.idx` file holds `key\\toffset\\n` lines.

An image record payload is an `IRHeader` (`flag u32, label f32, id u64, id2 u64`) followed, when `flag = n > 0`,
by n float32 labels, then the encoded image. InsightFace packages (`faces_webface_112x112`, ...) start with a
header record (flag > 0, labels `[N+1, N+K+1]`), hold the N images at keys 1..N grouped by identity, then one
record per identity with its key range `[start, end)`. Files made by `im2rec` have no header record.

Labels are stored as float32, so integer labels above 2**24 cannot be represented exactly.

Every image the project decodes goes through `open_image` (here, in `decode_image` and `image_size_of`, and in the
folder and TFDS converters): its size is read from the header first, and an image over MAX_IMAGE_PIXELS is refused
(ImageTooLarge, a ValueError naming it) before any pixel is decoded, so a decompression bomb (a small PNG of
30000x30000 pixels) costs nothing.
"""

from __future__ import annotations

import contextlib
import io
import logging
import numbers
import os
import re
import struct
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_RECORD_HEADER = struct.Struct("<II")  # magic, lrec
_IR_HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2
_LENGTH_BITS = 29
_MAX_LENGTH = (1 << _LENGTH_BITS) - 1
_CFLAG_WHOLE, _CFLAG_FIRST, _CFLAG_MIDDLE, _CFLAG_LAST = 0, 1, 2, 3
_MAX_EXACT_FLOAT32_INT = 1 << 24

IMAGE_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG"}

# The largest image decoded, in pixels: 40 Mpixel (a 36-Mpixel camera photo of 7360x4912 passes, 120 MB as RGB). The
# faces are 112x112 crops and IJB's photos far smaller; anything above is refused from its header.
MAX_IMAGE_PIXELS = 40_000_000
# PIL warns from 89 Mpixel on and refuses from 179 Mpixel on, in Image.open: open_image refuses all of these itself,
# naming the file, so PIL's warning would only repeat it.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class RecordIOError(ValueError):
  """A malformed RecordIO file: the message names the file and the byte offset."""


class ImageTooLarge(ValueError):
  """An image over MAX_IMAGE_PIXELS, refused from its header before it is decoded."""


class IRHeader(NamedTuple):
  flag: int
  label: float | np.ndarray  # float for flag 0, float32 array of `flag` values otherwise
  id: int
  id2: int


def pack_image_record(label, image_bytes: bytes, id: int = 0, id2: int = 0) -> bytes:  # noqa: A002 (MXNet name)
  """IRHeader + (optional float32 label array) + image bytes. A scalar label gives flag 0, a 1-D array flag n."""
  if isinstance(label, numbers.Real) or (isinstance(label, np.ndarray) and label.ndim == 0):
    return _IR_HEADER.pack(0, float(label), id, id2) + bytes(image_bytes)
  values = np.asarray(label, dtype=np.float32)
  if values.ndim != 1 or values.size == 0:
    raise ValueError(f"label must be a number or a non-empty 1-D array, got shape {values.shape}")
  return _IR_HEADER.pack(values.size, 0.0, id, id2) + values.astype("<f4").tobytes() + bytes(image_bytes)


def unpack_image_record(payload: bytes) -> tuple[IRHeader, bytes]:
  """Inverse of `pack_image_record`: (header, image bytes)."""
  if len(payload) < _IR_HEADER.size:
    raise ValueError(f"image record payload has {len(payload)} bytes, shorter than the {_IR_HEADER.size}-byte IRHeader")
  flag, label, record_id, record_id2 = _IR_HEADER.unpack_from(payload)
  start = _IR_HEADER.size
  if flag == 0:
    return IRHeader(0, label, record_id, record_id2), bytes(payload[start:])
  end = start + 4 * flag
  if end > len(payload):
    raise ValueError(f"IRHeader flag {flag} announces {flag} float32 labels but the payload has only "
                     f"{len(payload) - start} bytes after the header")
  labels = np.frombuffer(payload, dtype="<f4", count=flag, offset=start).astype(np.float32)
  return IRHeader(flag, labels, record_id, record_id2), bytes(payload[end:])


# ---------------------------------------------------------------------------------------------------------------
# Raw RecordIO


def _split_at_magic(payload: bytes) -> list[bytes]:
  """Cut the payload at every 4-byte-aligned occurrence of the magic (which is dropped)."""
  parts = []
  part_start = 0
  position = payload.find(_MAGIC_BYTES)
  while position != -1:
    if position % 4 == 0:
      parts.append(payload[part_start:position])
      part_start = position + 4
      position = payload.find(_MAGIC_BYTES, part_start)
    else:
      position = payload.find(_MAGIC_BYTES, position + 1)
  parts.append(payload[part_start:])
  return parts


def _padding(length: int) -> int:
  return (-length) % 4


class RecordIOWriter:
  """Writes `.rec` records (and `.idx` lines when `idx_path` is given) in the layout MXNet reads."""

  def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
    self.rec_path = Path(rec_path)
    self.idx_path = None if idx_path is None else Path(idx_path)
    self._rec = open(self.rec_path, "wb")
    self._idx = None if self.idx_path is None else open(self.idx_path, "w", encoding="ascii", newline="\n")
    self._offset = 0
    self._keys: set[int] = set()

  def write(self, key: int, payload: bytes) -> int:
    """Appends one record; returns the byte offset of its first part (what the `.idx` line holds)."""
    if self._rec.closed:
      raise ValueError(f"{self.rec_path}: writer is closed")
    if isinstance(key, bool) or not isinstance(key, numbers.Integral) or key < 0:
      raise ValueError(f"{self.rec_path}: record key must be a non-negative integer, got {key!r}")
    key = int(key)
    if key in self._keys:
      raise ValueError(f"{self.rec_path}: record key {key} written twice")
    record_offset = self._offset
    parts = _split_at_magic(bytes(payload))
    chunks = []
    for part_index, part in enumerate(parts):
      if len(part) > _MAX_LENGTH:
        raise ValueError(f"{self.rec_path}: record {key} has a part of {len(part)} bytes; RecordIO allows "
                         f"at most {_MAX_LENGTH}")
      if len(parts) == 1:
        cflag = _CFLAG_WHOLE
      elif part_index == 0:
        cflag = _CFLAG_FIRST
      elif part_index == len(parts) - 1:
        cflag = _CFLAG_LAST
      else:
        cflag = _CFLAG_MIDDLE
      chunks.append(_RECORD_HEADER.pack(MAGIC, (cflag << _LENGTH_BITS) | len(part)))
      chunks.append(part)
      chunks.append(b"\0" * _padding(len(part)))
    blob = b"".join(chunks)
    self._rec.write(blob)
    self._offset += len(blob)
    self._keys.add(key)
    if self._idx is not None:
      self._idx.write(f"{key}\t{record_offset}\n")
    return record_offset

  def close(self) -> None:
    if not self._rec.closed:
      self._rec.close()
    if self._idx is not None and not self._idx.closed:
      self._idx.close()

  def __enter__(self) -> "RecordIOWriter":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def read_idx(idx_path: str | os.PathLike) -> tuple[list[int], dict[int, int]]:
  """Parses an `.idx` file: (keys in file order, key -> byte offset)."""
  keys: list[int] = []
  offsets: dict[int, int] = {}
  with open(idx_path, "r", encoding="ascii") as handle:
    for line_number, line in enumerate(handle, start=1):
      if not line.strip():
        continue
      fields = line.split()
      try:
        key, offset = int(fields[0]), int(fields[1])
        if len(fields) != 2 or offset < 0:
          raise ValueError
      except (ValueError, IndexError):
        raise RecordIOError(f"{idx_path}:{line_number}: expected 'key<TAB>offset', got {line.rstrip()!r}") from None
      if key in offsets:
        raise RecordIOError(f"{idx_path}:{line_number}: key {key} appears twice")
      keys.append(key)
      offsets[key] = offset
  return keys, offsets


class RecordIOReader:
  """Random access (through the `.idx`) and sequential reads of a `.rec` file.

  Reads use `os.pread` on one descriptor, so several threads may read at once. Without an `.idx`, the record
  offsets are found by walking the record headers once; keys are then the record ordinals 0, 1, 2, ...
  """

  def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
    self.rec_path = Path(rec_path)
    self.idx_path = None if idx_path is None else Path(idx_path)
    self._open()
    if self.idx_path is not None:
      self.keys, self._offsets = read_idx(self.idx_path)
      for key in self.keys:
        if self._offsets[key] >= self.file_size:
          raise RecordIOError(f"{self.idx_path}: key {key} points to byte offset {self._offsets[key]}, past the end "
                              f"of {self.rec_path} ({self.file_size} bytes); the .idx does not belong to this .rec "
                              f"or the .rec is truncated")
    else:
      record_offsets = list(self._scan_offsets())
      self.keys = list(range(len(record_offsets)))
      self._offsets = dict(zip(self.keys, record_offsets))

  def _open(self) -> None:
    self._fd = os.open(self.rec_path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    self.file_size = os.fstat(self._fd).st_size

  def __getstate__(self):
    state = self.__dict__.copy()
    del state["_fd"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._open()

  def close(self) -> None:
    if getattr(self, "_fd", None) is not None:
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "RecordIOReader":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # interpreter shutdown
      pass

  def __len__(self) -> int:
    return len(self.keys)

  def __contains__(self, key: int) -> bool:
    return key in self._offsets

  def offset_of(self, key: int) -> int:
    try:
      return self._offsets[key]
    except KeyError:
      raise KeyError(f"{self.rec_path}: no record with key {key}") from None

  def _pread_exact(self, length: int, offset: int, record_offset: int, what: str) -> bytes:
    data = os.pread(self._fd, length, offset)
    if len(data) != length:
      raise RecordIOError(f"{self.rec_path}: truncated record at byte offset {record_offset}: {what} at byte "
                          f"{offset} needs {length} bytes, the file ends after {len(data)} ({self.file_size} bytes "
                          f"in all)")
    return data

  def _read_part_header(self, offset: int, record_offset: int) -> tuple[int, int]:
    header = self._pread_exact(_RECORD_HEADER.size, offset, record_offset, "the part header")
    magic, lrec = _RECORD_HEADER.unpack(header)
    if magic != MAGIC:
      raise RecordIOError(f"{self.rec_path}: bad magic 0x{magic:08x} at byte offset {offset} (record starting at "
                          f"{record_offset}); expected 0x{MAGIC:08x}: wrong offset in the .idx or a corrupt file")
    return lrec >> _LENGTH_BITS, lrec & _MAX_LENGTH

  def _parts(self, offset: int) -> Iterator[tuple[int, int, int]]:
    """(data offset, length, offset after the part) of each part of the record whose first part starts at `offset`,
    checked: the magic, the order of the continuation flags, and that each payload lies inside the file."""
    position, expect_first = offset, True
    while True:
      cflag, length = self._read_part_header(position, offset)
      if expect_first and cflag not in (_CFLAG_WHOLE, _CFLAG_FIRST):
        raise RecordIOError(f"{self.rec_path}: record at byte offset {offset} starts with a continuation part "
                            f"(cflag {cflag}); wrong offset in the .idx or a corrupt file")
      if not expect_first and cflag not in (_CFLAG_MIDDLE, _CFLAG_LAST):
        raise RecordIOError(f"{self.rec_path}: record at byte offset {offset} has a part with cflag {cflag} at "
                            f"byte offset {position} where a continuation (2 or 3) was expected")
      data_offset = position + _RECORD_HEADER.size
      if data_offset + length > self.file_size:
        raise RecordIOError(f"{self.rec_path}: truncated record at byte offset {offset}: its payload needs "
                            f"{length} bytes from offset {data_offset}, the file has {self.file_size} bytes")
      position = data_offset + length + _padding(length)
      yield data_offset, length, position
      if cflag in (_CFLAG_WHOLE, _CFLAG_LAST):
        return
      expect_first = False

  def _read_record(self, offset: int, prefix_length: int | None = None) -> tuple[bytes, int]:
    """(payload, offset of the next record). With prefix_length, reads only until that many payload bytes are
    known (the parts are still walked, for the next offset)."""
    parts, known, end = [], 0, offset
    for data_offset, length, end in self._parts(offset):
      if prefix_length is not None and known >= prefix_length:
        continue
      take = length if prefix_length is None else min(length, prefix_length - known)
      parts.append(self._pread_exact(take, data_offset, offset, f"the {length}-byte payload"))
      known += take + len(_MAGIC_BYTES)  # the parts are joined by the magic they were split at
    return _MAGIC_BYTES.join(parts), end

  def read_at(self, offset: int) -> bytes:
    """The payload of the record whose first part starts at this byte offset."""
    return self._read_record(offset)[0]

  def read(self, key: int) -> bytes:
    return self._read_record(self.offset_of(key))[0]

  def read_prefix(self, key: int, length: int) -> bytes:
    """At least the first `length` payload bytes (fewer only if the payload is shorter), cheaper than `read`."""
    return self._read_record(self.offset_of(key), prefix_length=length)[0][:length]

  def _scan_offsets(self) -> Iterator[int]:
    position = 0
    while position < self.file_size:
      yield position
      *_, (_, _, position) = self._parts(position)

  def __iter__(self) -> Iterator[tuple[int, bytes]]:
    """(key, payload) pairs: in `.idx` order with an index, in file order (keys 0, 1, ...) without one."""
    if self.idx_path is not None:
      for key in self.keys:
        yield key, self.read(key)
      return
    position = 0
    key = 0
    while position < self.file_size:
      payload, position = self._read_record(position)
      yield key, payload
      key += 1


# ---------------------------------------------------------------------------------------------------------------
# Images


def encode_image(image: np.ndarray, image_format: str = "jpg", quality: int = 95) -> bytes:
  """uint8 HxWx3 RGB -> JPEG (quality `quality`, 4:4:4 so faces keep their colour edges) or lossless PNG bytes."""
  pil_format = IMAGE_FORMATS.get(image_format.lower())
  if pil_format is None:
    raise ValueError(f"image_format must be one of {sorted(IMAGE_FORMATS)}, got {image_format!r}")
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"expected a uint8 HxWx3 RGB image, got dtype {image.dtype} shape {image.shape}")
  buffer = io.BytesIO()
  options = {"quality": quality, "subsampling": 0} if pil_format == "JPEG" else {}
  Image.fromarray(image, mode="RGB").save(buffer, format=pil_format, **options)
  return buffer.getvalue()


def _too_large(name, pixels: int, size: str = "") -> ImageTooLarge:
  where = f"{name}: " if name is not None else ""
  return ImageTooLarge(f"{where}{size or 'image'} of {pixels:,} pixels ({pixels / 1e6:.0f} Mpixel) is over the "
                       f"{MAX_IMAGE_PIXELS / 1e6:.0f}-Mpixel bound on decoded images; refused from its header, "
                       "undecoded (a decompression bomb, or a photo to shrink first)")


def _unreadable(name, error: Exception) -> ValueError:
  reason = ("not an image file PIL can read (JPEG, PNG, ...)" if isinstance(error, Image.UnidentifiedImageError)
            else str(error) or type(error).__name__)
  return ValueError(f"{name}: not a readable image: {reason}")


@contextlib.contextmanager
def open_image(source: bytes | str | os.PathLike, name=None) -> Iterator[Image.Image]:
  """The PIL image of `source` (encoded bytes, or a file's path), opened lazily: its size comes from the header and
  is checked against MAX_IMAGE_PIXELS before any pixel is decoded (decode it inside the `with` block). Too large:
  ImageTooLarge. Unreadable header: PIL's error, or with `name` (the file, for messages) a ValueError naming it."""
  try:
    image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source)
  except Image.DecompressionBombError as error:  # PIL's own bound, above ours: only its message has the size
    found = re.search(r"\((\d+) pixels\)", str(error))
    raise _too_large(name, int(found.group(1)) if found else 2 * Image.MAX_IMAGE_PIXELS) from None
  except Exception as error:  # PIL raises several types for unreadable data
    if name is None:
      raise
    raise _unreadable(name, error) from error
  with image:
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
      raise _too_large(name, width * height, f"{width}x{height} image")
    yield image


def decode_image(data: bytes, name: str | os.PathLike | None = None) -> np.ndarray:
  """Encoded image bytes -> uint8 HxWx3 RGB. An image over MAX_IMAGE_PIXELS raises ImageTooLarge (a ValueError)
  from its header, undecoded. A corrupt one raises PIL's error (OSError / UnidentifiedImageError), or with `name`
  (the file, for messages) a ValueError naming it."""
  with open_image(data, name) as image:
    try:
      image.load()
      return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except Exception as error:  # PIL raises several types for corrupt data
      if name is None:
        raise
      raise _unreadable(name, error) from error


def image_size_of(data: bytes, name: str | os.PathLike | None = None) -> tuple[int, int]:
  """(height, width) from the encoded image's header, without decoding the pixels; refused as decode_image would
  refuse it (ImageTooLarge, or the header's error)."""
  with open_image(data, name) as image:
    width, height = image.size
  return height, width


# ---------------------------------------------------------------------------------------------------------------
# InsightFace packages


def _resolve_rec_paths(path: str | os.PathLike) -> tuple[Path, Path | None, Path | None]:
  path = Path(path)
  if path.is_dir():
    rec_path = path / "train.rec"
    if not rec_path.exists():
      found = sorted(path.glob("*.rec"))
      if len(found) != 1:
        raise FileNotFoundError(f"{path}: expected train.rec (or exactly one .rec file) in this directory, "
                                f"found {[p.name for p in found]}")
      rec_path = found[0]
  else:
    rec_path = path
  if not rec_path.exists():
    raise FileNotFoundError(f"{rec_path}: no such .rec file")
  idx_path = rec_path.with_suffix(".idx")
  property_path = rec_path.parent / "property"
  return rec_path, idx_path if idx_path.exists() else None, property_path if property_path.exists() else None


def label_to_int(label: float | np.ndarray, where: str) -> int:
  """The integer class id of an IRHeader label (the first value of an array label); `where` prefixes errors."""
  if isinstance(label, np.ndarray):
    if label.size == 0:
      raise ValueError(f"{where}: empty label array")
    label = label[0]  # InsightFace convention: the class id is the first value of an array label
  value = float(label)
  if not value.is_integer():
    raise ValueError(f"{where}: label {value} is not an integer class id")
  return int(value)


class InsightFaceRecord:
  """An InsightFace-style `.rec` (with header record) or an `im2rec` `.rec`, as a labelled image collection.

  `path` is a directory holding `train.rec` + `train.idx` (+ `property`), or the `.rec` path itself (the `.idx`
  next to it is used when present; otherwise the record offsets are found by one pass over the record headers).

  `layout` is 'insightface' when record 0 is a header record (flag > 0, no image): images are keys 1..N and K
  comes from record 0 (the `property` file is only cross-checked). Otherwise it is 'im2rec': every key is an
  image and K is the number of distinct labels. Labels must lie in [0, K); reading one outside raises ValueError.
  """

  def __init__(self, path: str | os.PathLike):
    self.rec_path, self.idx_path, self.property_path = _resolve_rec_paths(path)
    self.reader = RecordIOReader(self.rec_path, self.idx_path)
    self._num_classes: int | None = None
    self._identity_ranges: dict[int, tuple[int, int]] | None = None
    self._labels: np.ndarray | None = None
    # The InsightFace header record carries labels and no image; an im2rec file with array labels also has
    # flag > 0 on record 0, but an image follows.
    header0, header0_image = None, b""
    if 0 in self.reader:
      header0, header0_image = unpack_image_record(self.reader.read(0))
    if header0 is not None and header0.flag > 0 and not header0_image:
      self.layout = "insightface"
      if header0.flag < 2:
        raise ValueError(f"{self.rec_path}: header record 0 has flag {header0.flag}; expected 2 values "
                         f"[N+1, N+K+1]")
      image_end, identity_end = int(header0.label[0]), int(header0.label[1])
      if not 1 <= image_end <= identity_end:
        raise ValueError(f"{self.rec_path}: header record 0 holds [{image_end}, {identity_end}], not a valid "
                         f"[N+1, N+K+1] pair")
      self.image_keys = np.arange(1, image_end, dtype=np.int64)
      self._identity_keys = np.arange(image_end, identity_end, dtype=np.int64)
      # Without identity records K is left to the distinct labels, as for im2rec files.
      self._num_classes = (identity_end - image_end) or None
      expected_last_keys = {image_end - 1, identity_end - 1} - {0}
      if any(key not in self.reader for key in expected_last_keys):
        raise ValueError(f"{self.rec_path}: header record 0 announces {image_end - 1} images and "
                         f"{identity_end - image_end} identities, but the index lacks the keys that implies")
    else:
      self.layout = "im2rec"
      self.image_keys = np.asarray(self.reader.keys, dtype=np.int64)
      self._identity_keys = np.zeros((0,), dtype=np.int64)
    if not len(self.image_keys):
      raise RecordIOError(f"{self.rec_path}: holds no images ({os.path.getsize(self.rec_path)} bytes)")
    self._check_property()

  def _check_property(self) -> None:
    if self.property_path is None or self.layout != "insightface":
      return
    text = self.property_path.read_text().strip()
    try:
      property_classes = int(text.split(",")[0])
    except ValueError:
      log.warning("%s: cannot parse %r as 'num_classes,height,width'; using record 0", self.property_path, text)
      return
    if self._num_classes is not None and property_classes != self._num_classes:
      log.warning("%s says %d classes but record 0 of %s says %d; using record 0", self.property_path,
                  property_classes, self.rec_path, self._num_classes)

  def close(self) -> None:
    self.reader.close()

  def __enter__(self) -> "InsightFaceRecord":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def __len__(self) -> int:
    return self.num_images

  @property
  def num_images(self) -> int:
    return int(self.image_keys.size)

  @property
  def num_classes(self) -> int:
    """K from record 0 (InsightFace layout) or the number of distinct labels (im2rec; reads all headers once)."""
    if self._num_classes is None:
      self._num_classes = int(np.unique(self._read_labels()).size)
    return self._num_classes

  @property
  def identity_ranges(self) -> dict[int, tuple[int, int]]:
    """label -> [start, end) image-key range, from the identity records of the InsightFace layout."""
    if self.layout != "insightface":
      raise ValueError(f"{self.rec_path}: an im2rec file has no identity records; use labels() instead")
    if self._identity_ranges is None:
      ranges = {}
      for label, key in enumerate(self._identity_keys.tolist()):
        header, _ = unpack_image_record(self.reader.read(key))
        if header.flag < 2:
          raise ValueError(f"{self.rec_path}: identity record {key} has flag {header.flag}, expected [start, end)")
        start, end = int(header.label[0]), int(header.label[1])
        if not 1 <= start <= end <= self.num_images + 1:
          raise ValueError(f"{self.rec_path}: identity record {key} (label {label}) has range [{start}, {end}) "
                           f"outside the image keys 1..{self.num_images}")
        ranges[label] = (start, end)
      self._identity_ranges = ranges
    return self._identity_ranges

  def _read_labels(self) -> np.ndarray:
    if self._labels is None:
      labels = np.empty(self.image_keys.shape, dtype=np.int64)
      for position, key in enumerate(self.image_keys.tolist()):
        prefix = self.reader.read_prefix(key, _IR_HEADER.size + 4)
        if len(prefix) < _IR_HEADER.size:
          raise ValueError(f"{self.rec_path}: key {key} holds {len(prefix)} bytes, too short for an IRHeader")
        flag, label, _, _ = _IR_HEADER.unpack_from(prefix)
        if flag > 0:  # the class id is the first of the float32 labels after the header
          if len(prefix) < _IR_HEADER.size + 4:
            raise ValueError(f"{self.rec_path}: key {key} has IRHeader flag {flag} but no float32 label follows")
          (label,) = struct.unpack_from("<f", prefix, _IR_HEADER.size)
        labels[position] = label_to_int(label, f"{self.rec_path} key {key}")
      self._labels = labels
    return self._labels

  def labels(self) -> np.ndarray:
    """The int64 label of every image, in `image_keys` order (reads record headers only). Validated."""
    labels = self._read_labels()
    bad = np.flatnonzero((labels < 0) | (labels >= self.num_classes))
    if bad.size:
      self._raise_bad_label(int(self.image_keys[bad[0]]), int(labels[bad[0]]))
    return labels.copy()

  def _raise_bad_label(self, key: int, label: int) -> None:
    hint = (" (im2rec files must use labels 0..K-1 with every class present)" if self.layout == "im2rec" else "")
    raise ValueError(f"{self.rec_path}: key {key} has label {label}, outside [0, {self.num_classes}){hint}")

  def _check_image_key(self, key: int) -> None:
    if self.layout == "insightface":
      if not 1 <= key <= self.num_images:
        raise KeyError(f"{self.rec_path}: key {key} is not an image key (images are keys 1..{self.num_images})")

  def read(self, key: int) -> tuple[bytes, int]:
    """(encoded image bytes, int label) of an image key."""
    key = int(key)
    self._check_image_key(key)
    header, image_bytes = unpack_image_record(self.reader.read(key))
    label = label_to_int(header.label, f"{self.rec_path} key {key}")
    if not 0 <= label < self.num_classes:
      self._raise_bad_label(key, label)
    return image_bytes, label

  def decode(self, key: int, on_error: str = "raise") -> tuple[np.ndarray, int] | None:
    """(uint8 HxWx3 RGB, label). A corrupt image raises ValueError, or with on_error='skip' logs and gives None."""
    if on_error not in ("raise", "skip"):
      raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    image_bytes, label = self.read(key)
    try:
      return decode_image(image_bytes), label
    except Exception as error:  # PIL raises several types for corrupt data
      message = f"{self.rec_path}: key {key}: corrupt image ({len(image_bytes)} bytes): {error}"
      if on_error == "raise":
        raise ValueError(message) from error
      log.warning("%s; skipped", message)
      return None


def _as_encoded(image, image_format: str, quality: int, sample_index: int) -> bytes:
  if isinstance(image, (bytes, bytearray, memoryview)):
    return bytes(image)
  try:
    return encode_image(image, image_format, quality)
  except ValueError as error:
    raise ValueError(f"sample {sample_index}: {error}") from None


def _as_label(label, sample_index: int) -> int:
  if isinstance(label, (bool, np.bool_)) or not isinstance(label, numbers.Integral):
    raise ValueError(f"sample {sample_index}: label must be an integer class id, got {label!r}")
  label = int(label)
  if label < 0:
    raise ValueError(f"sample {sample_index}: label {label} is negative; labels must be 0..K-1")
  if label >= _MAX_EXACT_FLOAT32_INT:
    raise ValueError(f"sample {sample_index}: label {label} cannot be stored exactly in the float32 label field")
  return label


def write_insightface_record(out_dir: str | os.PathLike, samples: Iterable, *, image_format: str = "jpg",
                             quality: int = 95, with_header: bool = True) -> dict:
  """Writes `out_dir/train.rec`, `train.idx` and `property` (`K,H,W`) from (image, label) samples.

  `image` is a uint8 HxWx3 RGB array (encoded as `image_format`) or already-encoded bytes (stored as given).
  Labels must be the integers 0..K-1, each used at least once. The file holds the images grouped by label:
  samples are sorted stably by label, so the order within an identity is the input order, and already-grouped
  input keeps its order exactly. All images must share one size.

  with_header=True writes the InsightFace layout (header record 0, images at keys 1..N, identity records
  N+1..N+K); with_header=False writes an im2rec-style file (images only, keys 0..N-1).
  Returns {'images': N, 'identities': K, 'rec': path, 'idx': path, 'property': path}.
  """
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  rec_path, idx_path, property_path = out_dir / "train.rec", out_dir / "train.idx", out_dir / "property"
  entries: list[tuple[int, int, int]] = []  # (label, spool offset, length)
  image_size: tuple[int, int] | None = None
  # Images are spooled to a scratch file first so that arbitrarily ordered input can be regrouped by label
  # without holding every encoded image in memory.
  with tempfile.TemporaryFile(dir=out_dir, prefix=".spool-") as spool:
    spool_offset = 0
    for sample_index, (image, label) in enumerate(samples):
      label = _as_label(label, sample_index)
      encoded = _as_encoded(image, image_format, quality, sample_index)
      try:
        size = image_size_of(encoded)
      except Exception as error:
        raise ValueError(f"sample {sample_index} (label {label}): the image bytes are not a readable image: "
                         f"{error}") from None
      if image_size is None:
        image_size = size
      elif size != image_size:
        raise ValueError(f"sample {sample_index} (label {label}) is {size[0]}x{size[1]} but earlier images are "
                         f"{image_size[0]}x{image_size[1]}; align/resize all faces to one size first")
      spool.write(encoded)
      entries.append((label, spool_offset, len(encoded)))
      spool_offset += len(encoded)
    spool.flush()
    if not entries:
      raise ValueError(f"{out_dir}: no samples to write")
    order = sorted(range(len(entries)), key=lambda i: entries[i][0])  # stable
    num_classes = max(label for label, _, _ in entries) + 1
    counts = np.bincount([label for label, _, _ in entries], minlength=num_classes)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
      raise ValueError(f"{out_dir}: labels must be 0..K-1 with every class used; labels {empty[:10].tolist()} "
                       f"(of K={num_classes}) have no image")
    num_images = len(entries)
    spool_fd = spool.fileno()
    with RecordIOWriter(rec_path, idx_path) as writer:
      first_key = 1 if with_header else 0
      if with_header:
        writer.write(0, pack_image_record(np.array([num_images + 1, num_images + num_classes + 1]), b""))
      identity_starts = first_key + np.concatenate([[0], np.cumsum(counts)])
      for position, entry_index in enumerate(order):
        label, offset, length = entries[entry_index]
        key = first_key + position
        writer.write(key, pack_image_record(float(label), os.pread(spool_fd, length, offset), key, 0))
      if with_header:
        for label in range(num_classes):
          writer.write(num_images + 1 + label, pack_image_record(
              np.array([identity_starts[label], identity_starts[label + 1]]), b"", label, 0))
  property_path.write_text(f"{num_classes},{image_size[0]},{image_size[1]}\n")
  return {"images": num_images, "identities": int(num_classes), "rec": str(rec_path), "idx": str(idx_path),
          "property": str(property_path)}
