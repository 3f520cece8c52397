"""IJB-B / IJB-C 1:1 template verification, as in the InsightFace release: TAR at FAR over template pairs.

A release folder (IJBB/ or IJBC/) holds
  loose_crop/NAME                      the images, loosely cropped around the face
  meta/P_face_tid_mid.txt              `NAME TEMPLATE_ID MEDIA_ID`, a line per image
  meta/P_name_5pts_score.txt           `NAME x1 y1 ... x5 y5 DETECTOR_SCORE`, a line per image
  meta/P_template_pair_label.txt       `TEMPLATE_A TEMPLATE_B LABEL`, a line per pair (1 genuine, 0 impostor)
with P = ijbb or ijbc. An optional meta/alignment_template.txt (five lines `x y` in a 112x112 face) replaces the
ArcFace five-point template: the synthetic IJB-style benchmark ships its renderer's own, since its faces are
framed by the renderer rather than by the ArcFace template.

`read` checks all of it before anything is embedded, and refuses (ReleaseError, naming the file and line, and the
image) image names that leave loose_crop/ (absolute, `..`, or a symlink whose target resolves outside loose_crop/;
one resolving inside is followed, and loose_crop/ itself may be a symlink), detector scores that are not finite or
are negative, landmarks that are not finite, coincide, or lie more than LANDMARK_MARGIN of the crop's size outside
it, an image listed twice in the 5-point file or in two templates or media, ids beyond 64 bits, and lines that do
not parse. A score of 0 removes the image from its template in the D1 variants; a template scored 0 throughout has a
zero feature there and its pairs score 0 (as in arcface_torch), with a warning.

Protocol (arcface_torch's IJB script): each face is aligned to the template by the least-squares similarity of its
five landmarks (scikit-image) and embedded with its horizontal flip. A variant's image feature is
  F0: the image's raw embedding; F1: [image, flip] concatenated; F2: image + flip;
  N0: then L2-normalised (N1 keeps the norm, which weighs the image within its template);
  D1: then multiplied by the detector score (D0: not).
The images of one media (the frames of a video) are averaged, the media of a template summed and the sum
L2-normalised; a pair scores the cosine of its two templates. TAR at FAR f is the fraction of genuine pairs scoring
above the threshold that at most f of the impostor pairs exceed; it is null when there are fewer than 1/f impostor
pairs (not measurable). arcface_torch reads TAR at the ROC point whose FAR is nearest f, which can differ from this
by one step of the ROC.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import stat
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import sparse
from tqdm import tqdm

from adaptface_jax import runtime, verification
from adaptface_jax.data import recordio
from adaptface_jax.data.common import IMAGE_SIZE

log = logging.getLogger(__name__)

# The ArcFace five-point template of a 112x112 face: eye centres (image left first), nose tip, mouth corners.
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                             [70.7299, 92.2041]], np.float32)
FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
VARIANTS = tuple(f"N{n}D{d}F{f}" for n in (1, 0) for d in (1, 0) for f in (2, 1, 0))
MAIN_VARIANT = "N1D1F2"  # arcface_torch's default: norms kept, detector scores, image + flip
TEMPLATE_FILE = "alignment_template.txt"
NOTES = ("Variants: N1 keeps each image feature's norm (N0 normalises it), D1 weighs it by the detector score, F2 adds "
         "the flip's embedding (F1 concatenates it, F0 leaves it out). Media means are summed per template and "
         "L2-normalised; a pair scores the cosine of its templates. TAR at FAR f: genuine pairs above the threshold "
         "that at most f of the impostor pairs exceed.")
_PAIR_CHUNK_VALUES = 1 << 24  # feature values gathered per side and chunk of pairs (128 MiB in float64)
_ROC_POINTS = 200


@dataclasses.dataclass
class IJBSet:
  """One IJB release folder read: per image (in the 5-point file's order) its path, landmarks [N, 5, 2], detector
  score, template and media; per pair its two template ids [P, 2] and label [P]; the alignment template [5, 2]; per
  image its line in the 5-point file (`points_file`), which messages name."""
  name: str
  paths: list[Path]
  landmarks: np.ndarray
  scores: np.ndarray
  templates: np.ndarray
  medias: np.ndarray
  pairs: np.ndarray
  labels: np.ndarray
  template: np.ndarray
  template_source: str
  lines: np.ndarray | None = None
  points_file: Path | None = None


class ReleaseError(ValueError):
  """Something in an IJB release folder that `read` refuses; the message names the file and line, or the image."""


LANDMARK_MARGIN = 0.5  # landmarks may lie up to this fraction of the crop's width (height) left or right (above, below)
MIN_LANDMARK_SPREAD = 1.0  # px: the RMS distance of the five landmarks from their centre, below which they coincide
_INT64 = (-(1 << 63), (1 << 63) - 1)
_HEADER_CHUNK = 1024  # images whose headers a worker reads at a time
_POINT_FIELDS = [f"landmark {axis}{i}" for i in range(1, 6) for axis in "xy"] + ["detector score"]


def _meta_file(meta: Path, prefix: str, suffix: str) -> Path:
  path = meta / f"{prefix}_{suffix}"
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing: an IJB release folder has meta/{prefix}_face_tid_mid.txt, "
                            f"meta/{prefix}_name_5pts_score.txt and meta/{prefix}_template_pair_label.txt")
  return path


def _text_lines(path: Path):
  """(line number, fields) of each non-blank line of the UTF-8 text file `path`."""
  data = path.read_bytes()
  for number, raw in enumerate(data.splitlines(), 1):
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
      hint = " (a gzip file: unpack it first)" if data.startswith(b"\x1f\x8b") else ""
      raise ReleaseError(f"{path}:{number}: not UTF-8 text: {error}{hint}") from None
    fields = line.removeprefix("\ufeff").split() if number == 1 else line.split()
    if fields:
      yield number, fields


def _number(text: str, where: str, what: str) -> float:
  try:
    return float(text)
  except ValueError:
    raise ReleaseError(f"{where}: {what}: {text!r} is not a number") from None


def _integer(text: str, where: str, what: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise ReleaseError(f"{where}: {what}: {text!r} is not an integer") from None
  if not _INT64[0] <= value <= _INT64[1]:
    raise ReleaseError(f"{where}: {what}: {text} is out of range (ids are 64-bit integers, {_INT64[0]} to "
                       f"{_INT64[1]})")
  return value


def _check_name(name: str, where: str) -> None:
  if os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/"):
    raise ReleaseError(f"{where}: image name {name!r} leads out of loose_crop/: a name is a path inside loose_crop/, "
                       "neither absolute nor with `..`")


def _spread(points: np.ndarray) -> np.ndarray:
  """RMS distance of the landmarks [..., 5, 2] from their centre."""
  return np.sqrt(((points - points.mean(axis=-2, keepdims=True)) ** 2).sum(-1).mean(-1))


def _read_points(path: Path):
  """(names, landmarks [N, 5, 2], scores [N], line numbers [N]) of the 5-point file, each line checked."""
  names, values, score_texts, lines, first_line = [], [], [], [], {}
  for number, fields in _text_lines(path):
    where = f"{path}:{number}"
    if len(fields) != 12:
      raise ReleaseError(f"{where}: expected `NAME x1 y1 ... x5 y5 SCORE` (12 fields), got {len(fields)}")
    name = fields[0]
    _check_name(name, where)
    if name in first_line:
      raise ReleaseError(f"{where}: image {name!r} is listed again (first at line {first_line[name]}); an image has "
                         "one line")
    first_line[name] = number
    values.append([_number(text, where, f"{_POINT_FIELDS[i]} of image {name!r}") for i, text in enumerate(fields[1:])])
    names.append(name)
    score_texts.append(fields[11])
    lines.append(number)
  if not names:
    raise ReleaseError(f"{path}: lists no image")
  with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, refused below
    values = np.asarray(values, np.float32)
  landmarks, scores, lines = values[:, :10].reshape(-1, 5, 2), values[:, 10], np.asarray(lines)
  where = lambda index: f"{path}:{lines[index]}"
  bad = np.flatnonzero(~np.isfinite(landmarks).all(axis=(1, 2)))
  if bad.size:
    raise ReleaseError(f"{where(bad[0])}: the landmarks of image {names[bad[0]]!r} must be finite numbers, got "
                       f"{landmarks[bad[0]].tolist()}")
  bad = np.flatnonzero(~(np.isfinite(scores) & (scores >= 0)))
  if bad.size:
    raise ReleaseError(f"{where(bad[0])}: the detector score of image {names[bad[0]]!r} must be a finite number "
                       f">= 0 (in float32), got {score_texts[bad[0]]!r}")
  bad = np.flatnonzero(_spread(landmarks.astype(np.float64)) < MIN_LANDMARK_SPREAD)
  if bad.size:
    raise ReleaseError(f"{where(bad[0])}: the five landmarks of image {names[bad[0]]!r} coincide (within "
                       f"{MIN_LANDMARK_SPREAD:g} px of their centre): {landmarks[bad[0]].tolist()}; no similarity maps "
                       "them onto the template")
  return names, landmarks, scores, lines


def _read_tid_mid(path: Path) -> dict[str, tuple[int, int]]:
  """{image name: (template id, media id)} of the template file; an image listed twice must agree."""
  tid_mid, first_line = {}, {}
  for number, fields in _text_lines(path):
    where = f"{path}:{number}"
    if len(fields) != 3:
      raise ReleaseError(f"{where}: expected `NAME TEMPLATE_ID MEDIA_ID`, got {' '.join(fields)!r}")
    name = fields[0]
    _check_name(name, where)
    entry = (_integer(fields[1], where, f"template id of image {name!r}"),
             _integer(fields[2], where, f"media id of image {name!r}"))
    if name in tid_mid and tid_mid[name] != entry:
      (template, media), line = tid_mid[name], first_line[name]
      raise ReleaseError(f"{where}: image {name!r} has template {entry[0]}, media {entry[1]} here but template "
                         f"{template}, media {media} at line {line}; an image belongs to one template and media")
    tid_mid[name] = entry
    first_line.setdefault(name, number)
  return tid_mid


def _read_pairs(path: Path, templates: np.ndarray, tid_file: Path) -> np.ndarray:
  """[P, 3] (template A, template B, label) of the pair file. numpy parses it (IJB-C has 15.7M pairs); on a problem,
  the file is read again line by line, which names the first bad line (or returns the pairs, where Python reads
  what numpy would not)."""
  try:
    with warnings.catch_warnings():  # an empty file: the line-by-line pass says so
      warnings.simplefilter("ignore")
      pairs = np.loadtxt(path, dtype=np.int64, comments=None, ndmin=2, encoding="utf-8-sig")
  except (ValueError, OverflowError):  # UnicodeDecodeError is a ValueError
    pairs = None
  if pairs is not None and pairs.size and pairs.shape[1] == 3 and np.isin(pairs[:, 2], (0, 1)).all() \
      and np.isin(pairs[:, :2], templates).all():
    return pairs
  known = set(templates.tolist())
  rows = []
  for number, fields in _text_lines(path):
    where = f"{path}:{number}"
    if len(fields) != 3:
      raise ReleaseError(f"{where}: expected `TEMPLATE_A TEMPLATE_B LABEL`, got {' '.join(fields)!r}")
    a, b = (_integer(text, where, "template id") for text in fields[:2])
    label = _integer(fields[2], where, "label")
    if label not in (0, 1):
      raise ReleaseError(f"{where}: the label must be 0 (impostor) or 1 (genuine), got {fields[2]!r}")
    unknown = [t for t in (a, b) if t not in known]
    if unknown:
      raise ReleaseError(f"{where}: template(s) {unknown} have no image in {tid_file.name}")
    rows.append((a, b, label))
  if not rows:
    raise ReleaseError(f"{path}: lists no pair; expected lines `TEMPLATE_A TEMPLATE_B LABEL`")
  return np.asarray(rows, np.int64)


def _read_template(path: Path) -> np.ndarray:
  rows = []
  for number, fields in _text_lines(path):
    where = f"{path}:{number}"
    if len(fields) != 2 or len(rows) == 5:
      raise ReleaseError(f"{where}: expected five lines `x y` (a landmark in the 112x112 face), got "
                         f"{' '.join(fields)!r}" + (" after five" if len(rows) == 5 else ""))
    row = [_number(text, where, "coordinate") for text in fields]
    if not np.isfinite(row).all():
      raise ReleaseError(f"{where}: coordinates must be finite, got {' '.join(fields)!r}")
    rows.append(row)
  if len(rows) != 5:
    raise ReleaseError(f"{path}: expected five lines `x y`, got {len(rows)}")
  template = np.asarray(rows, np.float32)
  if _spread(template.astype(np.float64)) < MIN_LANDMARK_SPREAD:
    raise ReleaseError(f"{path}: the five points coincide: {template.tolist()}")
  return template


def _image_sizes(paths: list[Path], names: list[str], wheres: list[str], base: str) -> np.ndarray:
  """[n, 2] (width, height) from each image's header, after checking that the image resolves (symlinks followed)
  to a regular file inside `base` (the resolved loose_crop/); a file outside is never opened."""
  sizes = np.zeros((len(paths), 2), np.int64)
  for i, (path, name, where) in enumerate(zip(paths, names, wheres)):
    try:
      real = os.path.realpath(path)
    except (OSError, ValueError) as error:
      raise ReleaseError(f"{where}: image name {name!r} cannot be resolved: {error}") from None
    if not real.startswith(base.rstrip(os.sep) + os.sep):
      raise ReleaseError(f"{where}: image {name!r} resolves to {real}, outside {base}; images (and the targets of "
                         "symlinks among them) must lie inside loose_crop/")
    try:
      if not stat.S_ISREG(os.stat(real).st_mode):
        raise IsADirectoryError(f"{real} is not a regular file")
      with recordio.open_image(real) as image:  # an image over recordio.MAX_IMAGE_PIXELS: refused undecoded
        sizes[i] = image.size
    except (OSError, ValueError) as error:
      raise ReleaseError(f"{where}: cannot read the image {path}: {error}") from None
  return sizes


def read(root: str | Path) -> IJBSet:
  """Reads and checks an IJB-B / IJB-C release folder (see the module docstring) before anything is embedded: every
  line of the meta files, and each image's header; errors name the file and line at fault, and the image."""
  root = Path(root).expanduser()
  meta = root / "meta"
  found = sorted(meta.glob("*_face_tid_mid.txt")) if meta.is_dir() else []
  if len(found) != 1:
    raise FileNotFoundError(
        f"{root}: expected one meta/ijbb_face_tid_mid.txt or meta/ijbc_face_tid_mid.txt, found "
        f"{[p.name for p in found] or 'none'} (give the IJBB or IJBC folder of the release, which holds meta/ and "
        "loose_crop/)")
  tid_file = found[0]
  prefix = tid_file.name[:-len("_face_tid_mid.txt")]
  points_file = _meta_file(meta, prefix, "name_5pts_score.txt")
  names, landmarks, scores, lines = _read_points(points_file)
  tid_mid = _read_tid_mid(tid_file)
  missing = [name for name in names if name not in tid_mid]
  if missing or len(tid_mid) != len(names):
    raise ReleaseError(f"{tid_file} and {points_file} must list the same images: {len(missing)} of the landmark "
                       f"file's {len(names)} have no template (e.g. {missing[:3]}), the template file lists "
                       f"{len(tid_mid)}")
  templates, medias = np.asarray([tid_mid[name] for name in names], np.int64).T
  pairs = _read_pairs(_meta_file(meta, prefix, "template_pair_label.txt"), templates, tid_file)
  if pairs[:, 2].min() == pairs[:, 2].max():
    raise ReleaseError(f"{meta / f'{prefix}_template_pair_label.txt'}: labels must be 0 (impostor) or 1 (genuine), "
                       "with both present")
  template, source = ARCFACE_TEMPLATE, "ArcFace five-point template"
  if (meta / TEMPLATE_FILE).is_file():
    template, source = _read_template(meta / TEMPLATE_FILE), str(meta / TEMPLATE_FILE)

  loose_crop = root / "loose_crop"
  if not loose_crop.is_dir():
    raise FileNotFoundError(f"{loose_crop} is missing: an IJB release folder holds the images in loose_crop/")
  paths = [loose_crop / name for name in names]
  wheres = [f"{points_file}:{number}" for number in lines]
  base = os.path.realpath(loose_crop)
  chunks = [slice(start, start + _HEADER_CHUNK) for start in range(0, len(paths), _HEADER_CHUNK)]
  with concurrent.futures.ThreadPoolExecutor(runtime.usable_cpus()) as pool:
    sizes = np.concatenate(list(pool.map(lambda s: _image_sizes(paths[s], names[s], wheres[s], base), chunks)))
  low, high = -LANDMARK_MARGIN * sizes[:, None, :], (1 + LANDMARK_MARGIN) * sizes[:, None, :]
  beyond = np.maximum(low - landmarks, landmarks - high).max(axis=-1)  # [N, 5] px beyond the margin
  if (beyond > 0).any():
    i, j = np.unravel_index(np.argmax(beyond > 0), beyond.shape)
    x, y = landmarks[i, j]
    width, height = sizes[i]
    outside = max(-x, x - width, -y, y - height)
    raise ReleaseError(f"{wheres[i]}: landmark {j + 1} ({x:g}, {y:g}) of image {names[i]!r} lies {outside:.0f} px "
                       f"outside its {width}x{height} crop; landmarks may lie at most {100 * LANDMARK_MARGIN:.0f} % "
                       "of the crop's width (height) outside it")
  _warn_zero_scores(points_file, scores, templates)
  return IJBSet(name=root.name, paths=paths, landmarks=landmarks, scores=scores, templates=templates, medias=medias,
                pairs=pairs[:, :2], labels=pairs[:, 2].astype(bool), template=template, template_source=source,
                lines=lines, points_file=points_file)


def _warn_zero_scores(points_file: Path, scores: np.ndarray, templates: np.ndarray) -> None:
  """A detector score of 0 removes the image from its template in the D1 variants; a template whose every score is
  0 has a zero feature there, and each of its pairs scores 0 (cosine with a zero vector), as in arcface_torch."""
  if not (scores == 0).any():
    return
  template_ids, index = np.unique(templates, return_inverse=True)
  best = np.zeros(len(template_ids), np.float32)
  np.maximum.at(best, index, scores)
  empty = template_ids[best == 0]
  if len(empty) == len(template_ids):
    log.warning("%s: every detector score is 0: the D1 variants score every pair 0 (the D0 variants ignore the "
                "scores)", points_file)
  elif len(empty):
    log.warning("%s: every image of %d template(s) (e.g. %s) has detector score 0: in the D1 variants their feature "
                "is zero and each of their pairs scores 0", points_file, len(empty), empty[:5].tolist())


def similarity(points: np.ndarray, template: np.ndarray):
  """The least-squares similarity (scikit-image) mapping the five landmarks onto the template."""
  from skimage.transform import SimilarityTransform

  transform = SimilarityTransform.from_estimate(np.asarray(points, np.float64), np.asarray(template, np.float64))
  if not transform or not np.isfinite(transform.params).all():
    raise ValueError(f"no similarity maps landmarks {np.asarray(points).tolist()} onto the template "
                     "(degenerate landmarks?)")
  return transform


def align(image: np.ndarray, points: np.ndarray, template: np.ndarray = ARCFACE_TEMPLATE,
          size: int = IMAGE_SIZE) -> np.ndarray:
  """uint8 [size, size, 3]: `image` warped (bilinear, black outside) so that its landmarks land on the template."""
  from skimage.transform import warp

  transform = similarity(points, template)
  warped = warp(image, transform.inverse, output_shape=(size, size), order=1, mode="constant", cval=0,
                preserve_range=True)
  return np.clip(np.rint(warped), 0, 255).astype(np.uint8)


def _load_aligned(dataset: IJBSet, index: int) -> np.ndarray:

  path = dataset.paths[index]
  try:
    image = recordio.decode_image(path.read_bytes())
  except (OSError, ValueError) as error:
    raise ValueError(f"{path}: cannot read the image: {error}") from error
  try:
    return align(image, dataset.landmarks[index], dataset.template)
  except ValueError as error:  # numpy's LinAlgError ("SVD did not converge") is one
    where = f" ({dataset.points_file}:{dataset.lines[index]})" if dataset.lines is not None else ""
    raise ReleaseError(f"{path}{where}: cannot align the image to the template: {error}") from error


def embed(dataset: IJBSet, embed_batch: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
          batch_size: int = 2048) -> tuple[np.ndarray, np.ndarray]:
  """(raw embeddings, of the flips) [N, D] of every aligned image, `batch_size` images at a time: while one batch is
  embedded, a thread pool reads and aligns the next, and only features are kept, never all the images."""
  batches = [range(start, min(start + batch_size, len(dataset.paths)))
             for start in range(0, len(dataset.paths), batch_size)]
  outputs = []
  with concurrent.futures.ThreadPoolExecutor(runtime.usable_cpus()) as pool, \
       concurrent.futures.ThreadPoolExecutor(1) as ahead:
    load = lambda indices: np.stack(list(pool.map(lambda i: _load_aligned(dataset, i), indices)))
    pending = ahead.submit(load, batches[0])
    for number in tqdm(range(len(batches)), desc=f"{dataset.name} images", unit="batch"):
      images = pending.result()
      if number + 1 < len(batches):
        pending = ahead.submit(load, batches[number + 1])
      outputs.append(embed_batch(images))
  return tuple(np.concatenate(parts).astype(np.float32) for parts in zip(*outputs))


def image_features(emb: np.ndarray, emb_flip: np.ndarray, scores: np.ndarray, variant: str) -> np.ndarray:
  """The per-image feature of a variant `N{0,1}D{0,1}F{0,1,2}` (see the module docstring)."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; one of {VARIANTS}")
  norm, detector, flip = (variant[i] for i in (1, 3, 5))
  features = {"0": emb, "1": np.concatenate([emb, emb_flip], axis=1), "2": emb + emb_flip}[flip].astype(np.float64)
  if norm == "0":
    features = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
  if detector == "1":
    features = features * scores[:, None]
  return features


def template_features(features: np.ndarray, templates: np.ndarray, medias: np.ndarray):
  """(template ids [T], L2-normalised template features [T, D]): the mean of each media's images, summed over the
  media of the template."""
  template_ids, template_index = np.unique(templates, return_inverse=True)
  media_keys, media_index = np.unique(np.stack([template_index, medias]), axis=1, return_inverse=True)
  n, num_media = len(features), media_keys.shape[1]
  counts = np.bincount(media_index, minlength=num_media)
  to_media = sparse.csr_matrix((1.0 / counts[media_index], (media_index, np.arange(n))), shape=(num_media, n))
  to_template = sparse.csr_matrix((np.ones(num_media), (media_keys[0], np.arange(num_media))),
                                  shape=(len(template_ids), num_media))
  pooled = to_template @ (to_media @ features)
  return template_ids, pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def pair_scores(template_ids: np.ndarray, features: np.ndarray, pairs: np.ndarray) -> np.ndarray:
  """Cosine of the two (unit) template features of every pair, computed in chunks of pairs."""
  index = np.searchsorted(template_ids, pairs)
  out = np.empty(len(pairs), np.float64)
  chunk = max(1, _PAIR_CHUNK_VALUES // features.shape[1])
  for start in range(0, len(pairs), chunk):
    a, b = index[start:start + chunk, 0], index[start:start + chunk, 1]
    out[start:start + chunk] = np.einsum("pd,pd->p", features[a], features[b])
  return out


def tar_at_far(scores: np.ndarray, labels: np.ndarray, fars) -> list[float | None]:
  """TAR at each FAR: genuine pairs scoring above the (floor(f * impostors) + 1)-th highest impostor score, so at
  most a fraction f of the impostors pass; None where f * impostors < 1."""
  impostor = np.sort(scores[~labels])[::-1]
  genuine = np.sort(scores[labels])
  out = []
  for far in fars:
    allowed = int(np.floor(far * len(impostor) + 1e-9))
    if allowed < 1:
      out.append(None)
      continue
    threshold = impostor[allowed] if allowed < len(impostor) else -np.inf
    out.append(float(len(genuine) - np.searchsorted(genuine, threshold, side="right")) / len(genuine))
  return out


def evaluate(emb: np.ndarray, emb_flip: np.ndarray, dataset: IJBSet, variants=VARIANTS) -> dict:
  """{'benchmark', 'alignment', 'num_images', 'num_templates', 'num_genuine', 'num_impostor', 'variants': {variant:
  {'tar_at_far': {far label: TAR or None}, 'auc', 'roc': {'far', 'tar'}}}} from the raw embeddings of every image
  (and of its flip), in the dataset's image order."""
  num_impostor = int((~dataset.labels).sum())
  roc_fars = np.logspace(np.log10(1 / num_impostor), 0, _ROC_POINTS)
  results = {}
  for variant in variants:
    template_ids, features = template_features(image_features(emb, emb_flip, dataset.scores, variant),
                                               dataset.templates, dataset.medias)
    scores = pair_scores(template_ids, features, dataset.pairs)
    tars = tar_at_far(scores, dataset.labels, [*FARS, *roc_fars])  # the scores sorted once for both
    results[variant] = {"tar_at_far": dict(zip(map(verification.far_label, FARS), tars[:len(FARS)])),
                        "auc": verification.roc_auc(-scores, dataset.labels),
                        "roc": {"far": roc_fars.tolist(), "tar": tars[len(FARS):]}}
  return {"benchmark": dataset.name, "alignment": dataset.template_source, "num_images": len(emb),
          "num_templates": int(len(np.unique(dataset.templates))), "num_genuine": int(dataset.labels.sum()),
          "num_impostor": num_impostor, "variants": results}


def pixel_embeddings(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Raw pixels as embeddings (and of the flips): the baseline that learns nothing."""
  images = np.asarray(images, np.float32)
  return images.reshape(len(images), -1), images[:, :, ::-1].reshape(len(images), -1)


def format_table(results: dict) -> str:
  """Markdown table of `evaluate`'s results: a row per variant, TAR (%) at each FAR, and AUC."""
  rows = [f"{results['benchmark']}: {results['num_templates']} templates, {results['num_genuine']} genuine and "
          f"{results['num_impostor']} impostor pairs (- : fewer than 1/FAR impostor pairs)", "",
          "| variant | " + " | ".join(f"TAR@FAR={verification.far_label(f)}" for f in FARS) + " | AUC |",
          "|---" + "|---:" * (len(FARS) + 1) + "|"]
  for variant, r in results["variants"].items():
    cells = ["-" if v is None else f"{100 * v:.2f}" for v in r["tar_at_far"].values()]
    rows.append(f"| {variant} | " + " | ".join(cells) + f" | {r['auc']:.4f} |")
  return "\n".join(rows)


def write_results(out_dir: str | Path, results: dict, extra: dict | None = None) -> dict[str, Path]:
  """Writes ijb_results.json, ijb_results.md and ijb_roc.png (the main variant and two ablations) into out_dir."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = {"json": out_dir / "ijb_results.json", "markdown": out_dir / "ijb_results.md", "roc": out_dir / "ijb_roc.png"}
  paths["json"].write_text(json.dumps(verification.to_jsonable({**results, **(extra or {})}), indent=1) + "\n")
  paths["markdown"].write_text(format_table(results) + "\n\n" + NOTES + "\n")
  fig = Figure(figsize=(6, 5))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  variants = results["variants"]
  for variant in [v for v in (MAIN_VARIANT, "N0D0F2", "N0D0F0") if v in variants]:
    roc = variants[variant]["roc"]
    tar = np.asarray([np.nan if t is None else t for t in roc["tar"]])
    ax.plot(roc["far"], tar, label=f"{variant} (AUC {variants[variant]['auc']:.4f})")
  ax.set_xscale("log")
  ax.set_xlim(min(1e-6, variants[next(iter(variants))]["roc"]["far"][0]), 1)
  ax.set_ylim(0, 1.01)
  ax.set_xlabel("false accept rate")
  ax.set_ylabel("true accept rate")
  ax.set_title(f"{results['benchmark']} 1:1 template verification")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(loc="lower right", fontsize="small")
  fig.tight_layout()
  fig.savefig(paths["roc"], dpi=120)
  return paths
