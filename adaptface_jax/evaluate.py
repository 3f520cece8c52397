"""Face-verification evaluation from the command line.

  python -m adaptface_jax.evaluate --embeddings pairs.npz [--name lfw] [--json] [--out_dir DIR]

The .npz holds `embeddings` [2P, D] (raw, rows in pair order a0, b0, a1, b1, ...), `issame` [P] (bool or 0/1) and
optionally `embeddings_flip` [2P, D] (raw embeddings of the horizontally flipped images, same order). The
protocol is `adaptface_jax.verification`'s (the published tables' one). Prints the Markdown table; `--json` prints
one JSON object per benchmark instead (one line each; the table then goes to stderr); `--out_dir` also writes
results.json, results.md and roc.png there.
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import numpy as np
from absl import app, flags

from adaptface_jax import verification

_EMBEDDINGS = flags.DEFINE_string("embeddings", None, "An .npz with embeddings [2P, D], issame [P] and optionally "
                                  "embeddings_flip [2P, D]: evaluate these precomputed embeddings.")
_NAME = flags.DEFINE_string("name", None, "Benchmark name for --embeddings (default: the file's stem).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object per benchmark (a line each) instead of the table.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Also write results.json, results.md and roc.png here.")

# Printed per benchmark with --json (the full result, ROC curve included, goes to results.json via --out_dir).
JSON_FIELDS = ("num_pairs", "accuracy", "accuracy_std", "accuracy_noflip", "val_at_far_1e-3", "val_std", "far",
               "auc", "best_threshold_accuracy", "best_threshold", "fold_accuracies", "fold_thresholds")
_NPZ_KEYS = ("embeddings", "issame", "embeddings_flip")


def load_embeddings_file(path: str | Path) -> dict[str, np.ndarray]:
  """Reads and checks an embeddings .npz; errors name the file and what is wrong in it."""
  path = Path(path).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such embeddings file")
  try:
    with np.load(path, allow_pickle=False) as archive:
      arrays = {key: archive[key] for key in archive.files}
  except (ValueError, OSError, zipfile.BadZipFile) as error:
    raise ValueError(f"{path}: not a readable .npz of numeric arrays ({error})") from error
  missing = [key for key in ("embeddings", "issame") if key not in arrays]
  if missing:
    raise ValueError(f"{path}: missing array(s) {missing}; it has {sorted(arrays)}. Expected `embeddings` [2P, D], "
                     "`issame` [P] and optionally `embeddings_flip` [2P, D] (np.savez(path, embeddings=..., "
                     "issame=...)).")
  unknown = sorted(set(arrays) - set(_NPZ_KEYS))
  if unknown:
    raise ValueError(f"{path}: unexpected array(s) {unknown}; only {list(_NPZ_KEYS)} are read (is one misspelled?)")
  embeddings, issame = arrays["embeddings"], arrays["issame"]
  if embeddings.ndim != 2:
    raise ValueError(f"{path}: `embeddings` must be [2P, D], got shape {embeddings.shape}")
  if issame.ndim != 1:
    raise ValueError(f"{path}: `issame` must be [P], got shape {issame.shape}")
  if embeddings.shape[0] != 2 * issame.shape[0]:
    raise ValueError(f"{path}: `embeddings` has {embeddings.shape[0]} rows for {issame.shape[0]} pairs in `issame`; "
                     "need exactly 2 rows per pair (a0, b0, a1, b1, ...)")
  if "embeddings_flip" in arrays and arrays["embeddings_flip"].shape != embeddings.shape:
    raise ValueError(f"{path}: `embeddings_flip` has shape {arrays['embeddings_flip'].shape}, `embeddings` "
                     f"{embeddings.shape}; they must match row for row")
  return arrays


def evaluate_embeddings_file(path: str | Path, name: str | None = None) -> dict[str, dict]:
  """{benchmark name: `verification.evaluate_pairs` result} for one embeddings .npz."""
  arrays = load_embeddings_file(path)
  name = name or Path(path).stem
  try:
    result = verification.evaluate_pairs(arrays["embeddings"], arrays["issame"],
                                         embeddings_flip=arrays.get("embeddings_flip"), name=name)
  except ValueError as error:
    raise ValueError(f"{path}: {error}") from error
  return {name: result}


def report(results: dict[str, dict], *, as_json: bool, out_dir: str | None) -> None:
  """Prints the table (or JSON lines) and writes the result files."""
  table = verification.format_table(results)
  if as_json:
    for name, result in results.items():
      print(json.dumps(verification.to_jsonable({"name": name, **{k: result.get(k) for k in JSON_FIELDS}})))
    print(table, file=sys.stderr)
  else:
    print(table)
  if out_dir:
    paths = verification.write_results(out_dir, results)
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # One mode per source of embeddings; each returns {benchmark: result}.
  if _EMBEDDINGS.value:
    try:
      results = evaluate_embeddings_file(_EMBEDDINGS.value, _NAME.value)
    except (ValueError, FileNotFoundError) as error:
      sys.exit(f"error: {error}")
  else:
    raise app.UsageError("nothing to evaluate: give --embeddings FILE.npz")
  report(results, as_json=_JSON.value, out_dir=_OUT_DIR.value)


if __name__ == "__main__":
  app.run(main)
