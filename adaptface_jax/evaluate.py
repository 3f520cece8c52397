"""Face-verification evaluation from the command line.

  python -m adaptface_jax.evaluate --workdir DIR [--step N | --best] [--benchmarks lfw,cfp_fp] [--bin_dir PATH]
  python -m adaptface_jax.evaluate --config configs/lora_dino.py [--backbone HUB_ID_OR_SNAPSHOT] [--out_dir DIR]
  python -m adaptface_jax.evaluate --embeddings pairs.npz [--name lfw] [--json] [--out_dir DIR]
  python -m adaptface_jax.evaluate --workdir DIR --ijb IJB_FOLDER|synthetic    (or --config FILE --ijb ...)

--workdir evaluates a training run's checkpoint (latest by default) and writes the result files into
WORKDIR/eval_step{N} (N: the checkpoint's step; results.json records it), never over the run's own results.json.
--config (no training) evaluates the un-tuned backbone's own feature (the pooled output, no head, no adapters):
the "no fine-tuning" baseline row; --backbone replaces the config's backbone source.

The .npz holds `embeddings` [2P, D] (raw, rows in pair order a0, b0, a1, b1, ...), `issame` [P] (bool or 0/1) and
optionally `embeddings_flip` [2P, D] (raw embeddings of the horizontally flipped images, same order). The
protocol is `adaptface_jax.verification`'s (the published tables' one). Prints the Markdown table; `--json` prints
one JSON object per benchmark instead (one line each; the table then goes to stderr); `--out_dir` also writes
results.json, results.md and roc.png there.

--ijb runs IJB-B / IJB-C 1:1 template verification (adaptface_jax.ijb) on a release folder (IJBB/ or IJBC/, with
meta/ and loose_crop/), or on the synthetic world's IJB-style benchmark with `--ijb synthetic`, instead of the
.bin benchmarks: it prints TAR at FAR = 1e-6 ... 1e-1 and AUC for every norm / detector-score / flip variant and
writes ijb_results.json, ijb_results.md and ijb_roc.png to the output folder.
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from adaptface_jax import cli, peers, verification

_EMBEDDINGS = flags.DEFINE_string("embeddings", None, "An .npz with embeddings [2P, D], issame [P] and optionally "
                                  "embeddings_flip [2P, D]: evaluate these precomputed embeddings.")
_NAME = flags.DEFINE_string("name", None, "Benchmark name for --embeddings (default: the file's stem).")
_JSON = cli.define(flags.DEFINE_bool, "json", False,
                   "Print one JSON object per benchmark (a line each) instead of the table.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Also write results.json, results.md and roc.png here (with "
                               "--workdir, by default WORKDIR/eval_step{N}).")
_WORKDIR = cli.define(flags.DEFINE_string, "workdir", None, "A training workdir: evaluate its checkpoint.")
_STEP = cli.define(flags.DEFINE_integer, "step", None, "Checkpoint step (default: the latest).")
_BEST = flags.DEFINE_bool("best", False, "Evaluate the best checkpoint (by config.eval.best_metric).")
_CONFIG = cli.define(config_flags.DEFINE_config_file, "config", None,
                     "Experiment config: evaluate its un-tuned backbone.")
_BACKBONE = flags.DEFINE_string("backbone", None, "With --config: the backbone to evaluate (hub id or snapshot "
                                "directory; sets model.backbone).")
_BENCHMARKS = flags.DEFINE_list("benchmarks", None, "Benchmarks (default: the config's eval.benchmarks).")
_BIN_DIR = flags.DEFINE_string("bin_dir", None, "Folder of the .bin files (default: the config's eval.bin_dir).")
_IJB = flags.DEFINE_string("ijb", None, "IJB-B / IJB-C 1:1 template verification on this release folder (IJBB/ or "
                           "IJBC/, holding meta/ and loose_crop/), or `synthetic` for the synthetic world's "
                           "IJB-style benchmark, instead of the .bin benchmarks.")
_MAX_PAIRS = flags.DEFINE_integer("max_pairs", None, "Evaluate a balanced subset of this many pairs.")
_PROCESSES = cli.MultihostFlags()  # --workdir or --config over several processes (and their devices)

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
    archive = np.load(path, allow_pickle=False)
    if not isinstance(archive, np.lib.npyio.NpzFile):
      raise ValueError(f"a single array ({'.npy' if isinstance(archive, np.ndarray) else 'not .npz'}); "
                       "np.savez(path, embeddings=..., issame=...) writes the .npz this needs")
    with archive:
      arrays = {key: archive[key] for key in archive.files}
  except (ValueError, OSError, zipfile.BadZipFile) as error:
    raise ValueError(f"{path}: not a readable .npz of numeric arrays: {error}") from error
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


def report(results: dict[str, dict], *, as_json: bool, out_dir: str | None, extra: dict | None = None) -> None:
  """Prints the table (or JSON lines) and writes the result files."""
  table = verification.format_table(results)
  if as_json:
    for name, result in results.items():
      print(json.dumps(verification.to_jsonable({"name": name, **{k: result.get(k) for k in JSON_FIELDS}})))
    print(table, file=sys.stderr)
  else:
    print(table)
  if out_dir:
    paths = verification.write_results(out_dir, results, extra=extra)
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _IJB.value and (_EMBEDDINGS.value or not (_WORKDIR.value or _CONFIG.value is not None)):
    raise app.UsageError("--ijb evaluates a model: give it with --workdir DIR or --config FILE")
  if _PROCESSES.multihost.value and (_IJB.value or _EMBEDDINGS.value):
    raise app.UsageError("--multihost evaluates the .bin benchmarks of --workdir or --config; run --ijb and "
                         "--embeddings in one process")
  _PROCESSES.join()  # batches are padded to a multiple of the device count
  with peers.watching():
    _evaluate()


def _evaluate():
  # One mode per source of embeddings; each returns {benchmark: result} (with --ijb, the IJB result).
  out_dir, extra = _OUT_DIR.value, None
  if out_dir:  # never over a training workdir's own results.json, config.json, ...
    cli.refuse_run_files(out_dir, flag="--out_dir", workdirs=[_WORKDIR.value] if _WORKDIR.value else [])
  if _EMBEDDINGS.value:
    results = evaluate_embeddings_file(_EMBEDDINGS.value, _NAME.value)
  elif _WORKDIR.value:
    results, step = evaluate_run(_WORKDIR.value, step=_STEP.value, which="best" if _BEST.value else "last",
                                 overrides=_eval_overrides(), ijb=_IJB.value)
    out_dir, extra = out_dir or str(Path(_WORKDIR.value).expanduser() / f"eval_step{step}"), {"step": step}
  elif _CONFIG.value is not None:
    results = evaluate_untuned(_CONFIG.value, _BACKBONE.value, _eval_overrides(), ijb=_IJB.value)
  else:
    raise app.UsageError("nothing to evaluate: give --workdir DIR, --config FILE or --embeddings FILE.npz")
  if _IJB.value:
    report_ijb(results, as_json=_JSON.value, out_dir=out_dir, extra=extra)
  elif _is_first_process():  # every process has the results; one reports them
    report(results, as_json=_JSON.value, out_dir=out_dir, extra=extra)


def _is_first_process() -> bool:
  if not _PROCESSES.multihost.value:  # no need to start JAX (--embeddings)
    return True
  import jax
  return jax.process_index() == 0


def report_ijb(results: dict, *, as_json: bool, out_dir: str | None, extra: dict | None = None) -> None:
  from adaptface_jax import ijb
  table = ijb.format_table(results)
  if as_json:  # the ROC curves stay in ijb_results.json
    variants = {name: {"tar_at_far": r["tar_at_far"], "auc": r["auc"]} for name, r in results["variants"].items()}
    print(json.dumps(verification.to_jsonable({**results, "variants": variants})))
  print(table, file=sys.stderr if as_json else sys.stdout)
  if out_dir:
    paths = ijb.write_results(out_dir, results, extra)
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)


def evaluate_ijb(source: str, embed) -> dict:
  """`ijb.evaluate` of the IJB release folder `source` ("synthetic": the synthetic IJB-style benchmark, built on
  first use) with `embed`: uint8 faces -> (raw embeddings, of the flips)."""
  from adaptface_jax import ijb
  if source == "synthetic":
    from adaptface_jax.data import synthetic_ijb
    source = synthetic_ijb.build_ijb()
  dataset = ijb.read(source)
  print(f"{dataset.name}: {len(dataset.paths)} images, {len(dataset.pairs)} template pairs, aligned to the "
        f"{dataset.template_source}", file=sys.stderr)
  return ijb.evaluate(*ijb.embed(dataset, embed), dataset)


def _eval_overrides() -> dict:
  """The eval.* fields that --benchmarks, --bin_dir and --max_pairs set."""
  given = {"eval.benchmarks": tuple(_BENCHMARKS.value) if _BENCHMARKS.value else None,
           "eval.bin_dir": _BIN_DIR.value or None, "eval.max_pairs": _MAX_PAIRS.value}
  return {field: value for field, value in given.items() if value is not None}


def evaluate_run(workdir: str, *, step: int | None = None, which: str = "last", overrides: dict | None = None,
                 ijb: str | None = None) -> tuple[dict, int]:
  """({benchmark: result}, the checkpoint's step); `overrides`: {dotted config field: value}, e.g. eval.max_pairs;
  with `ijb` (a release folder or "synthetic"), the IJB result instead of the benchmarks'."""
  from adaptface_jax import embeddings, run_state, sharding, trainable_rules
  config, model, variables, meta = run_state.load_run(workdir, step=step, which=which)
  with config.unlocked():
    config.update_from_flattened_dict(overrides or {})
  print(f"evaluating {workdir} at step {meta['step']}", file=sys.stderr)
  if ijb:
    embed = embeddings.embedder(model, variables, batch_size=config.eval.batch_size, mesh=sharding.data_mesh())
    return evaluate_ijb(ijb, embed), int(meta["step"])
  trainable, frozen = trainable_rules.split(variables, config.trainable)
  return embeddings.Evaluator(config, model, frozen, sharding.data_mesh())(trainable), int(meta["step"])


def evaluate_untuned(config, backbone: str | None = None, overrides: dict | None = None,
                     ijb: str | None = None) -> dict:
  """{benchmark: result} of the config's backbone alone (or of `backbone`): its pooled feature; with `ijb`, the
  IJB result instead."""
  from adaptface_jax import embeddings, run_state, sharding, trainable_rules
  with config.unlocked():
    if backbone:
      config.model.backbone, config.model.random_init = backbone, False
    config.update_from_flattened_dict(overrides or {})
  model, state, frozen, _, _ = run_state.setup(config, num_classes=None, steps=1)
  if ijb:
    variables = trainable_rules.merge(state.trainable, frozen)
    return evaluate_ijb(ijb, embeddings.embedder(model, variables, batch_size=config.eval.batch_size,
                                                 mesh=sharding.data_mesh(), output="feature"))
  return embeddings.Evaluator(config, model, frozen, sharding.data_mesh(), output="feature")(state.trainable)


if __name__ == "__main__":
  from adaptface_jax import runtime
  runtime.use_tcmalloc()
  cli.run(main)
