"""1:N identification of probe faces against a gallery, from the command line.

  python -m adaptface_jax.identify --workdir W --gallery DIR --probe DIR [--top_k 5] [--out probes.csv]

Both folders hold aligned 112x112 faces (.jpg/.jpeg/.png). The gallery has one folder per identity; the probe
folder has images directly in it (unlabelled) and/or in one folder per identity (labelled by the folder's name).
Each face is embedded as in verification (the raw embeddings of the image and of its flip, summed, L2-normalised);
an identity's template is the normalised mean of its faces; a probe's score against an identity is the cosine of
its embedding and the template.

Writes one CSV row per probe with its top-k gallery identities and scores (default WORKDIR/identify/probes.csv).
With labelled probes it also reports, on stdout and in metrics.json beside the CSV:
  - closed set (probes whose identity is in the gallery): CMC at rank 1 and rank 5;
  - open set, when some labelled probes' identities are not in the gallery: TPIR at FPIR = 1e-2 and 1e-1, where
    the threshold t lets that fraction of the non-mated probes' best scores reach t, and a mated probe counts as
    identified when its own identity ranks first with a score >= t.
Gallery embeddings are cached in WORKDIR/identify/cache/, keyed by the checkpoint and the gallery's file bytes; a
cache file that does not read back (a run killed while writing it) is rebuilt, with a warning naming it.

Every input is checked before anything is written: the faces' sizes from their headers (an image over
recordio.MAX_IMAGE_PIXELS is refused undecoded), the probes decoded, --out kept off the workdir's own files
(cli.refuse_run_files). Every file is written atomically (cli.write_atomically).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import sys
import zipfile
from pathlib import Path

import numpy as np
from absl import flags

from adaptface_jax import cli
from adaptface_jax.data.common import IMAGE_SIZE

_WORKDIR = cli.define(flags.DEFINE_string, "workdir", None, "A training workdir: its checkpoint embeds the faces.",
                      required=True)
_GALLERY = flags.DEFINE_string("gallery", None, "Gallery folder: GALLERY/<identity>/<face>.jpg", required=True)
_PROBE = flags.DEFINE_string("probe", None, "Probe folder: PROBE/<face>.jpg and/or PROBE/<identity>/<face>.jpg",
                             required=True)
_TOP_K = flags.DEFINE_integer("top_k", 5, "Gallery identities listed per probe.")
_STEP = cli.define(flags.DEFINE_integer, "step", None, "Checkpoint step (default: the latest).")
_OUT = cli.define(flags.DEFINE_string, "out", None, "The CSV (default: WORKDIR/identify/probes.csv).")

log = logging.getLogger(__name__)

FPIR_TARGETS = (1e-2, 1e-1)
UNLABELLED = ""


def _images(folder: Path, *, labelled_only: bool) -> list[tuple[Path, str]]:
  """(path, identity) of every face in `folder`: in identity subfolders, and loose ones as UNLABELLED."""
  from adaptface_jax.data.folders import is_image_file
  if not folder.is_dir():
    raise FileNotFoundError(f"{folder}: no such folder")
  faces = [(p, UNLABELLED) for p in sorted(folder.iterdir()) if is_image_file(p) and not labelled_only]
  for identity in sorted(p for p in folder.iterdir() if p.is_dir()):
    faces += [(p, identity.name) for p in sorted(identity.iterdir()) if is_image_file(p)]
  if not faces:
    layout = "<identity>/<face>.jpg" if labelled_only else "<face>.jpg or <identity>/<face>.jpg"
    raise ValueError(f"{folder}: no .jpg/.jpeg/.png faces found (expected {folder}/{layout})")
  return faces


def _check_face_size(path: Path, width: int, height: int) -> None:
  if (height, width) != (IMAGE_SIZE, IMAGE_SIZE):
    raise ValueError(f"{path}: face is {width}x{height}; identification takes aligned "
                     f"{IMAGE_SIZE}x{IMAGE_SIZE} faces, as training and verification do")


def _check_header(path: Path) -> None:
  """The face's size from its header alone (an oversized or unreadable image is refused, naming the file)."""
  from adaptface_jax.data import recordio
  with recordio.open_image(path, name=path) as image:
    _check_face_size(path, *image.size)


def _decode(path: Path) -> np.ndarray:
  from adaptface_jax.data import recordio
  array = recordio.decode_image(path.read_bytes(), name=path)
  _check_face_size(path, array.shape[1], array.shape[0])
  return array


def embed_faces(embed, paths: list[Path], images: np.ndarray | None = None) -> np.ndarray:
  """Unit embeddings [N, D] of the faces (image + flip, as verification); `images`, where given, are the faces
  already decoded."""
  from adaptface_jax import verification
  if images is None:
    images = np.stack([_decode(path) for path in paths])
  raw, raw_flip = embed(images)
  return verification.strict_l2_normalize(raw + raw_flip)


def templates(embeddings: np.ndarray, identities: list[str]) -> tuple[list[str], np.ndarray]:
  """(identity names in sorted order, unit templates [I, D]): the normalised mean of each identity's faces."""
  names = sorted(set(identities))
  index = {name: i for i, name in enumerate(names)}
  sums = np.zeros((len(names), embeddings.shape[1]), np.float64)
  np.add.at(sums, [index[name] for name in identities], embeddings)
  return names, sums / np.linalg.norm(sums, axis=1, keepdims=True)


def cmc(scores: np.ndarray, gallery_names: list[str], probe_identities: list[str], ranks=(1, 5)) -> dict[str, float]:
  """Closed-set CMC: the fraction of mated probes (identity in the gallery) whose identity is within the top r."""
  column = {name: i for i, name in enumerate(gallery_names)}
  mated = [(row, column[name]) for row, name in enumerate(probe_identities) if name in column]
  if not mated:
    return {}
  rows, truth = map(np.asarray, zip(*mated))
  # rank of the true identity: how many identities score strictly higher, plus one
  rank = 1 + (scores[rows] > scores[rows, truth][:, None]).sum(axis=1)
  return {f"cmc_rank{r}": float(np.mean(rank <= r)) for r in ranks}


def tpir_at_fpir(scores: np.ndarray, gallery_names: list[str], probe_identities: list[str],
                 fpir_targets=FPIR_TARGETS) -> dict[str, float]:
  """Open-set TPIR (rank 1) at each FPIR: labelled probes whose identity is not in the gallery are non-mated."""
  column = {name: i for i, name in enumerate(gallery_names)}
  labelled = [(row, name) for row, name in enumerate(probe_identities) if name != UNLABELLED]
  mated = [(row, column[name]) for row, name in labelled if name in column]
  non_mated = np.asarray([row for row, name in labelled if name not in column], int)
  if not mated or not len(non_mated):
    return {}
  best_non_mated = np.sort(scores[non_mated].max(axis=1))[::-1]
  rows, truth = map(np.asarray, zip(*mated))
  own = scores[rows, truth]
  first = own >= scores[rows].max(axis=1)
  out = {}
  for target in fpir_targets:
    allowed = int(np.floor(target * len(best_non_mated)))  # non-mated probes that may reach the threshold
    # the smallest threshold that lets at most `allowed` non-mated best scores reach it
    threshold = np.nextafter(best_non_mated[allowed], np.inf) if allowed < len(best_non_mated) else -np.inf
    out[f"tpir_at_fpir_{target:g}"] = float(np.mean(first & (own >= threshold)))
  out["non_mated_probes"] = len(non_mated)
  return out


def _gallery_key(workdir: Path, step: int, paths: list[Path], identities: list[str]) -> str:
  digest = hashlib.sha256(f"{workdir.resolve()}\n{step}\n".encode())
  for path, identity in zip(paths, identities):
    digest.update(f"{identity}/{path.name}\n".encode())
    digest.update(hashlib.sha256(path.read_bytes()).digest())
  return digest.hexdigest()[:16]


def _read_cache(cache: Path, count: int) -> np.ndarray | None:
  """The cached gallery embeddings [count, D], or None when there are none or they do not read back as such (a
  truncated file, of a run killed while writing it): a warning names the file, and the caller rebuilds it."""
  if not cache.exists():
    return None
  try:
    with np.load(cache) as archive:
      embeddings = archive["embeddings"]
    if embeddings.ndim != 2 or len(embeddings) != count or not np.issubdtype(embeddings.dtype, np.floating):
      raise ValueError(f"embeddings of shape {embeddings.shape} ({embeddings.dtype}) for {count} faces")
    if not np.isfinite(embeddings).all():
      raise ValueError("non-finite embeddings")
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
    log.warning("%s: the gallery cache does not read back (%s: %s); embedding the gallery again to replace it", cache,
                type(error).__name__, error)
    return None
  print(f"gallery embeddings from {cache}", file=sys.stderr)
  return embeddings


def _write_cache(cache: Path, embeddings: np.ndarray) -> None:
  """Written atomically, so that an interrupted run leaves no truncated cache; one that cannot be written (a full
  disk) is only a warning: the cache saves time, the results do not need it."""
  try:
    cli.write_atomically(cache, lambda f: np.savez(f, embeddings=embeddings), binary=True)
  except OSError as error:
    log.warning("%s; the gallery embeddings are not cached", error)


def identify(workdir: str, gallery: str, probe: str, *, top_k: int = 5, step: int | None = None,
             out: str | None = None) -> dict:
  """Writes the probes' top-k CSV (and metrics.json with labelled probes); returns {"csv", "metrics"}.

  Nothing is written before every input has been checked: the flags, --out, both folders' faces (the gallery's
  from their headers; the probes decoded), the run."""
  if top_k < 1:
    raise ValueError(f"--top_k must be >= 1, got {top_k}")
  workdir_path = Path(workdir).expanduser()
  out_path = Path(out).expanduser() if out else workdir_path / "identify" / "probes.csv"
  if out:  # the CSV, and metrics.json beside it
    for path in (out_path, out_path.parent / "metrics.json"):
      cli.refuse_run_files(path, flag="--out", workdirs=[workdir_path])
      if path.is_dir():
        raise ValueError(f"--out={out}: {path} is a folder; --out names the CSV file to write (metrics.json is "
                         "written beside it)")
  gallery_faces = _images(Path(gallery).expanduser(), labelled_only=True)
  probe_faces = _images(Path(probe).expanduser(), labelled_only=False)
  gallery_paths, gallery_ids = [p for p, _ in gallery_faces], [name for _, name in gallery_faces]
  probe_paths, probe_ids = [p for p, _ in probe_faces], [name for _, name in probe_faces]
  for path in gallery_paths:
    _check_header(path)
  probe_images = np.stack([_decode(path) for path in probe_paths])
  from adaptface_jax import embeddings, run_state  # JAX: only once the inputs are known to be good
  config, model, variables, meta = run_state.load_run(workdir, step=step)
  embed = embeddings.embedder(model, variables, batch_size=config.eval.batch_size)

  key = _gallery_key(workdir_path, int(meta["step"]), gallery_paths, gallery_ids)
  cache = workdir_path / "identify" / "cache" / f"{key}.npz"
  gallery_embeddings = _read_cache(cache, len(gallery_paths))
  if gallery_embeddings is None:
    gallery_embeddings = embed_faces(embed, gallery_paths)  # a face that does not decode stops here, unwritten
    _write_cache(cache, gallery_embeddings)
  names, gallery_templates = templates(gallery_embeddings, gallery_ids)
  scores = embed_faces(embed, probe_paths, probe_images) @ gallery_templates.T

  k = min(top_k, len(names))
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]

  def write_csv(f):
    writer = csv.writer(f)
    writer.writerow(["probe", "identity"] + [f"{field}{r}" for r in range(1, k + 1) for field in ("top", "score")])
    for row, (path, identity) in enumerate(zip(probe_paths, probe_ids)):
      ranked = [value for column in order[row] for value in (names[column], f"{scores[row, column]:.6f}")]
      writer.writerow([str(path), identity] + ranked)

  cli.write_atomically(out_path, write_csv)
  metrics = {**cmc(scores, names, probe_ids), **tpir_at_fpir(scores, names, probe_ids)}
  if metrics:
    metrics.update(step=int(meta["step"]), gallery_identities=len(names), probes=len(probe_paths))
    cli.write_atomically(out_path.parent / "metrics.json", lambda f: f.write(json.dumps(metrics, indent=2)))
  return {"csv": str(out_path), "metrics": metrics}


def main(argv):
  del argv
  result = identify(_WORKDIR.value, _GALLERY.value, _PROBE.value, top_k=_TOP_K.value, step=_STEP.value,
                    out=_OUT.value)
  print(f"wrote {result['csv']}", file=sys.stderr)
  for name, value in result["metrics"].items():
    print(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")


if __name__ == "__main__":
  from adaptface_jax import runtime
  runtime.use_tcmalloc()
  runtime.use_cpu_devices()
  cli.run(main)
