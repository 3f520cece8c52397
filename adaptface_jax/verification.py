"""Face-verification protocol of the published tables (InsightFace `verification.py`), result files and plots.

The protocol, for P pairs of embeddings in pair order a0, b0, a1, b1, ...:

- Flip test-time augmentation: the embedding of an image is l2norm(raw(image) + raw(flipped image)), the SUM of
  the raw embeddings normalised afterwards (normalising each first, or concatenating, gives other numbers).
- Distance = squared L2 of the unit vectors (= 2 - 2 cos); "same" when distance < threshold.
- Accuracy: 10 contiguous, unshuffled folds (sizes as sklearn `KFold(10)`: the first P % 10 folds hold one pair
  more). Each fold gets the threshold of the grid 0.00, 0.01, ..., 3.99 with the best accuracy on the other nine
  folds (the lowest such threshold on ties) and reports its accuracy with it; mean and std (ddof=0) over folds.
- VAL@FAR=1e-3: per fold, on the grid 0.000, 0.001, ..., 3.999, the training folds' FAR curve is inverted at the
  target FAR by piecewise-linear interpolation (see `threshold_at_far` for repeated FAR values); VAL and FAR are
  measured on the held-out fold with that threshold; mean and std over folds.
- The ROC curve is the reference's: per-threshold TPR / FPR on each held-out fold, averaged over folds.

Numbers are computed in the embeddings' own float dtype, as the reference does (float32 stays float32), so a
distance that lands within rounding of a grid threshold is classified the same way.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

STANDARD_BENCHMARKS = ("lfw", "cfp_fp", "agedb_30", "calfw", "cplfw")
ACCURACY_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
OPTIMISTIC_LABEL = "best single threshold on all pairs (optimistic: threshold chosen on the test pairs)"
PROTOCOL = ("InsightFace verification protocol: flip = l2norm(raw + raw_flipped); squared-L2 distance of unit "
            "vectors, same if < threshold; 10 contiguous unshuffled folds, threshold (0.01 grid) chosen on the other "
            "9 folds; VAL at FAR=1e-3 on a 0.001 grid; std over folds with ddof=0.")
# Keys of results.json that are not benchmark names.
_RESERVED_KEYS = ("mean", "mean_of_present", "protocol")
# What the mean rows average (accuracy_std is not averaged: a mean of per-benchmark fold spreads means nothing).
_MEAN_FIELDS = ("accuracy", "accuracy_noflip", "val", "auc", "best_threshold_accuracy")


def fold_slices(num_pairs: int, num_folds: int) -> list[slice]:
  """Contiguous folds as sklearn `KFold(num_folds, shuffle=False)`; one fold is the whole set (train = test)."""
  if num_folds < 1:
    raise ValueError(f"num_folds must be >= 1, got {num_folds}")
  if num_pairs < num_folds:
    raise ValueError(f"{num_pairs} pairs cannot be split into {num_folds} folds: need at least one pair per fold")
  sizes = np.full(num_folds, num_pairs // num_folds)
  sizes[:num_pairs % num_folds] += 1
  ends = np.cumsum(sizes)
  return [slice(int(end - size), int(end)) for end, size in zip(ends, sizes)]


def strict_l2_normalize(embeddings: np.ndarray) -> np.ndarray:
  """Rows divided by their norms; a zero row is an error (training's losses.safe_l2_normalize maps it to zero)."""
  norms = np.sqrt(np.einsum("ij,ij->i", embeddings, embeddings))
  zero_rows = np.flatnonzero(norms == 0)
  if zero_rows.size:
    raise ValueError(f"{zero_rows.size} embedding(s) have norm 0 (rows {zero_rows[:10].tolist()}...); a zero vector "
                     "has no direction to compare: check the model output")
  return embeddings / norms[:, None]


def pair_distances(unit_embeddings: np.ndarray) -> np.ndarray:
  """Squared L2 distance of each pair (rows 2i, 2i+1), computed in the embeddings' dtype, returned as float64:
  the reference compares its float32 distances with float64 thresholds, i.e. in float64."""
  diff = unit_embeddings[0::2] - unit_embeddings[1::2]
  return np.sum(np.square(diff), axis=1).astype(np.float64)


def threshold_at_far(far: np.ndarray, thresholds: np.ndarray, far_target: float) -> float:
  """The threshold at which the (non-decreasing) FAR curve reaches `far_target`, as the reference computes it.

  The reference calls `scipy.interpolate.interp1d(far, thresholds, kind='slinear')(far_target)` on a curve where
  many thresholds share a FAR value. SciPy >= 1.9 refuses repeated x values; the SciPy versions behind the
  published numbers built a degree-1 B-spline with knots (far[0], far..., far[-1]) and coefficients `thresholds`
  (after a stable sort), whose value is the straight line between

    - the LAST threshold whose FAR is <= far_target (the largest threshold still at that FAR), and
    - the FIRST threshold whose FAR is > far_target,

  evaluated at far_target; a target equal to a repeated FAR value gives the last threshold with that FAR. That is
  what this computes. One corner differs: when far_target equals the largest FAR and that value is repeated, old
  SciPy divided 0 by 0 on an empty knot span (it returned 0.0); here it is the last threshold.
  """
  far = np.asarray(far, np.float64)
  thresholds = np.asarray(thresholds, np.float64)
  if far.shape != thresholds.shape or far.ndim != 1:
    raise ValueError(f"far {far.shape} and thresholds {thresholds.shape} must be 1-D of equal length")
  order = np.argsort(far, kind="stable")
  far, thresholds = far[order], thresholds[order]
  if not far[0] <= far_target <= far[-1]:
    raise ValueError(f"far_target {far_target} is outside the FAR range [{far[0]}, {far[-1]}]")
  lower = int(np.searchsorted(far, far_target, side="right")) - 1
  if lower == len(far) - 1:
    return float(thresholds[lower])
  upper = lower + 1
  slope = (thresholds[upper] - thresholds[lower]) / (far[upper] - far[lower])
  return float(thresholds[lower] + (far_target - far[lower]) * slope)


def _count_below(sorted_values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
  """How many values are < each threshold (the protocol's strict `distance < threshold`)."""
  return np.searchsorted(sorted_values, thresholds, side="left")


def _fold_counts(dist: np.ndarray, issame: np.ndarray, folds: Sequence[slice], thresholds: np.ndarray):
  """Per fold and threshold: accepted same pairs, accepted different pairs; and each fold's class sizes."""
  accepted_same = np.zeros((len(folds), len(thresholds)), np.int64)
  accepted_diff = np.zeros_like(accepted_same)
  num_same = np.zeros(len(folds), np.int64)
  for k, fold in enumerate(folds):
    fold_dist, fold_same = dist[fold], issame[fold]
    accepted_same[k] = _count_below(np.sort(fold_dist[fold_same]), thresholds)
    accepted_diff[k] = _count_below(np.sort(fold_dist[~fold_same]), thresholds)
    num_same[k] = fold_same.sum()
  sizes = np.array([f.stop - f.start for f in folds], np.int64)
  return accepted_same, accepted_diff, num_same, sizes - num_same, sizes


def _train_split(per_fold: np.ndarray, k: int, num_folds: int) -> np.ndarray:
  """Sum over the training folds of fold k (with one fold, train = test as in the reference's LFold)."""
  return per_fold[k] if num_folds == 1 else per_fold.sum(0) - per_fold[k]


def _safe_ratio(numerator: np.ndarray, denominator) -> np.ndarray:
  """numerator / denominator, 0 where the denominator is 0 (the reference's TPR / FPR convention)."""
  denominator = np.asarray(denominator, np.float64)
  return np.divide(numerator, denominator, out=np.zeros(np.shape(numerator)), where=denominator > 0)


def kfold_accuracy(dist: np.ndarray, issame: np.ndarray, num_folds: int = 10) -> dict[str, Any]:
  """10-fold accuracy on the 0.01 grid, the fold thresholds, and the fold-averaged ROC curve."""
  folds = fold_slices(len(dist), num_folds)
  thresholds = ACCURACY_THRESHOLDS
  accepted_same, accepted_diff, num_same, num_diff, sizes = _fold_counts(dist, issame, folds, thresholds)
  correct = accepted_same + (num_diff[:, None] - accepted_diff)  # [folds, thresholds]
  fold_accuracies, fold_thresholds = [], []
  for k in range(len(folds)):
    best = int(np.argmax(_train_split(correct, k, len(folds))))  # argmax: first best = lowest threshold
    fold_thresholds.append(float(thresholds[best]))
    fold_accuracies.append(float(correct[k, best] / sizes[k]))
  tpr = _safe_ratio(accepted_same, num_same[:, None]).mean(0)
  fpr = _safe_ratio(accepted_diff, num_diff[:, None]).mean(0)
  return {"accuracy": float(np.mean(fold_accuracies)), "accuracy_std": float(np.std(fold_accuracies)),
          "fold_accuracies": fold_accuracies, "fold_thresholds": fold_thresholds,
          "fold_sizes": sizes.tolist(), "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist(),
                                                "thresholds": thresholds.tolist()}}


def kfold_val_at_far(dist: np.ndarray, issame: np.ndarray, num_folds: int = 10,
                     far_target: float = 1e-3) -> dict[str, Any]:
  """VAL (TAR) at `far_target`: threshold from the training folds' FAR curve, VAL / FAR on the held-out fold."""
  folds = fold_slices(len(dist), num_folds)
  thresholds = VAL_THRESHOLDS
  accepted_same, accepted_diff, num_same, num_diff, _ = _fold_counts(dist, issame, folds, thresholds)
  vals, fars, fold_thresholds, undefined = [], [], [], []
  for k, fold in enumerate(folds):
    far_train = _safe_ratio(_train_split(accepted_diff, k, len(folds)), _train_split(num_diff, k, len(folds)))
    # The reference falls back to threshold 0 (accept nothing) when the training FAR never reaches the target.
    threshold = threshold_at_far(far_train, thresholds, far_target) if far_train.max() >= far_target else 0.0
    fold_dist, fold_same = dist[fold], issame[fold]
    accepted = fold_dist < threshold
    if num_same[k] == 0 or num_diff[k] == 0:
      undefined.append(k)
    vals.append(float(np.sum(accepted & fold_same) / num_same[k]) if num_same[k] else math.nan)
    fars.append(float(np.sum(accepted & ~fold_same) / num_diff[k]) if num_diff[k] else math.nan)
    fold_thresholds.append(threshold)
  if undefined:
    warnings.warn(f"fold(s) {undefined} hold only same or only different pairs, so VAL or FAR is undefined there and "
                  "left out of the mean; the benchmarks' files mix both classes in every fold: is the pair list "
                  "sorted by label?", UserWarning, stacklevel=3)
  return {"val": float(np.nanmean(vals)), "val_std": float(np.nanstd(vals)), "far": float(np.nanmean(fars)),
          "far_target": far_target, "fold_vals": vals, "fold_fars": fars, "fold_val_thresholds": fold_thresholds}


def roc_auc(dist: np.ndarray, issame: np.ndarray) -> float:
  """AUC of the score -distance: P(same pair closer than different pair), ties counted one half."""
  same, diff = np.asarray(dist[issame], np.float64), np.sort(np.asarray(dist[~issame], np.float64))
  farther = len(diff) - np.searchsorted(diff, same, side="right")
  tied = np.searchsorted(diff, same, side="right") - np.searchsorted(diff, same, side="left")
  return float((farther.sum() + 0.5 * tied.sum()) / (len(same) * len(diff)))


def best_threshold_accuracy(dist: np.ndarray, issame: np.ndarray) -> tuple[float, float]:
  """(accuracy, threshold) of the single 0.01-grid threshold that does best on ALL pairs: optimistic, since the
  threshold is fitted on the pairs it is scored on. Same grid as the 10-fold protocol, so the gap between the two
  is the selection bias alone."""
  thresholds = ACCURACY_THRESHOLDS
  correct = _count_below(np.sort(dist[issame]), thresholds) + (
      np.sum(~issame) - _count_below(np.sort(dist[~issame]), thresholds))
  best = int(np.argmax(correct))
  return float(correct[best] / len(dist)), float(thresholds[best])


def far_label(far_target: float) -> str:
  return f"{far_target:.0e}".replace("e-0", "e-")  # 1e-3 -> "1e-3"


def _check_inputs(embeddings, issame, embeddings_flip, num_folds) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  for name, array in (("embeddings", embeddings), ("embeddings_flip", embeddings_flip)):
    dtype = np.asarray(array).dtype
    if array is not None and not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
      raise ValueError(f"{name} must be real numbers (float or integer), got dtype {dtype}")
  embeddings = np.asarray(embeddings)
  if embeddings.ndim != 2:
    raise ValueError(f"embeddings must be [2P, D] (rows a0, b0, a1, b1, ...), got shape {embeddings.shape}")
  if not np.issubdtype(embeddings.dtype, np.floating):
    embeddings = embeddings.astype(np.float64)
  issame = np.asarray(issame)
  if issame.ndim != 1:
    raise ValueError(f"issame must be 1-D [P], got shape {issame.shape}")
  if issame.dtype != bool:
    if not np.issubdtype(issame.dtype, np.integer) or not np.isin(issame, (0, 1)).all():
      raise ValueError(f"issame must be bool (or 0/1 integers), got dtype {issame.dtype} with values "
                       f"{np.unique(issame)[:10].tolist()}")
    issame = issame.astype(bool)
  if embeddings.shape[0] != 2 * len(issame):
    raise ValueError(f"embeddings has {embeddings.shape[0]} rows but issame has {len(issame)} pairs: need 2 rows "
                     "per pair, in pair order a0, b0, a1, b1, ...")
  if issame.all() or not issame.any():
    raise ValueError(f"all {len(issame)} pairs are {'same' if issame.all() else 'different'}-identity pairs: "
                     "verification needs both kinds")
  fold_slices(len(issame), num_folds)  # validates the fold count against P
  if embeddings_flip is not None:
    embeddings_flip = np.asarray(embeddings_flip, embeddings.dtype)
    if embeddings_flip.shape != embeddings.shape:
      raise ValueError(f"embeddings_flip has shape {embeddings_flip.shape}, embeddings {embeddings.shape}: the "
                       "flipped images' embeddings must match row for row")
  for name, array in (("embeddings", embeddings), ("embeddings_flip", embeddings_flip)):
    if array is not None and not np.isfinite(array).all():
      rows = np.flatnonzero(~np.isfinite(array).all(1))
      raise ValueError(f"{name} has non-finite values in {rows.size} row(s), e.g. rows {rows[:10].tolist()}")
  return embeddings, issame, embeddings_flip


def evaluate_pairs(embeddings, issame, *, embeddings_flip=None, num_folds: int = 10, far_target: float = 1e-3,
                   name: str | None = None) -> dict[str, Any]:
  """Runs the protocol (module docstring) on raw embeddings [2P, D] in pair order and issame [P].

  embeddings_flip: raw embeddings of the horizontally flipped images, same order; the reported `accuracy` then
  uses l2norm(embeddings + embeddings_flip) and `accuracy_noflip` the embeddings alone.
  name: the benchmark, for messages only.
  """
  embeddings, issame, embeddings_flip = _check_inputs(embeddings, issame, embeddings_flip, num_folds)
  combined = embeddings if embeddings_flip is None else embeddings + embeddings_flip
  dist = pair_distances(strict_l2_normalize(combined))

  result: dict[str, Any] = {"num_pairs": int(len(issame)), "num_same": int(issame.sum()), "num_folds": num_folds,
                            "flip": embeddings_flip is not None}
  result.update(kfold_accuracy(dist, issame, num_folds))
  val = kfold_val_at_far(dist, issame, num_folds, far_target)
  result.update(val)
  result[f"val_at_far_{far_label(far_target)}"] = val["val"]
  result["auc"] = roc_auc(dist, issame)
  result["best_threshold_accuracy"], result["best_threshold"] = best_threshold_accuracy(dist, issame)
  result["best_threshold_note"] = OPTIMISTIC_LABEL
  result["accuracy_noflip"] = result["accuracy_noflip_std"] = None
  if embeddings_flip is not None:
    noflip = kfold_accuracy(pair_distances(strict_l2_normalize(embeddings)), issame, num_folds)
    result["accuracy_noflip"], result["accuracy_noflip_std"] = noflip["accuracy"], noflip["accuracy_std"]

  if result["auc"] < 0.5:
    where = f" on {name}" if name else ""
    warnings.warn(
        f"ROC AUC {result['auc']:.4f} < 0.5{where}: same-identity pairs are FARTHER apart than different ones. "
        "The pair labels are probably swapped (issame inverted) or the embeddings are not in pair order a0, b0, a1, "
        "b1, ...; a below-chance AUC is a bug in the evaluation, not a hard benchmark.", UserWarning, stacklevel=2)
  return result


# ---------------------------------------------------------------------------------------------------------------
# Result files


def _mean_entry(results: Mapping[str, dict], names: Sequence[str]) -> dict[str, Any]:
  entry: dict[str, Any] = {"benchmarks": list(names)}
  for field in _MEAN_FIELDS:
    values = [results[n].get(field) for n in names]
    entry[field] = None if any(v is None for v in values) else float(np.mean(values))
  far_targets = {results[n].get("far_target") for n in names}
  if len(far_targets) == 1 and None not in far_targets:
    target = far_targets.pop()
    entry["far_target"] = target
    entry[f"val_at_far_{far_label(target)}"] = entry["val"]
  return entry


def summarize(results: Mapping[str, dict]) -> dict[str, Any]:
  """`mean` over the five standard benchmarks (None unless all are present) and `mean_of_present` over all."""
  names = list(results)
  standard = [n for n in STANDARD_BENCHMARKS if n in results]
  return {"mean": _mean_entry(results, standard) if len(standard) == len(STANDARD_BENCHMARKS) else None,
          "mean_of_present": _mean_entry(results, names) if names else None}


def _pct(value, std=None) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "—"
  text = f"{100 * value:.2f}"
  return text if std is None else f"{text} ± {100 * std:.2f}"


def format_table(results: Mapping[str, dict]) -> str:
  """Markdown table: one row per benchmark, then the mean row(s). Accuracies in percent."""
  if not results:
    raise ValueError("no benchmark results to tabulate")
  far_targets = {r.get("far_target", 1e-3) for r in results.values()}
  far_text = "/".join(far_label(t) for t in sorted(far_targets))
  header = ["Benchmark", "Pairs", "Accuracy % (flip, 10-fold, ± std)", "No-flip accuracy %",
            f"VAL@FAR={far_text} %", "AUC", "Best-threshold accuracy % (optimistic: fitted on the test pairs)"]
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
  for name, r in results.items():
    accuracy = _pct(r["accuracy"], r["accuracy_std"])
    if not r.get("flip", True):
      accuracy += " (no flip given)"
    cells = [name, str(r["num_pairs"]), accuracy, _pct(r.get("accuracy_noflip")), _pct(r["val"], r["val_std"]),
             f"{r['auc']:.4f}", f"{_pct(r['best_threshold_accuracy'])} @ {r['best_threshold']:.2f}"]
    lines.append("| " + " | ".join(cells) + " |")
  summary = summarize(results)
  mean_rows = []
  if summary["mean"] is not None:
    mean_rows.append(("mean (5 standard)", summary["mean"]))
  if summary["mean"] is None or len(results) != len(STANDARD_BENCHMARKS):
    mean_rows.append((f"mean of the {len(results)} present", summary["mean_of_present"]))
  for label, m in mean_rows:
    auc = "—" if m["auc"] is None else f"{m['auc']:.4f}"
    cells = [f"**{label}**", "", _pct(m["accuracy"]), _pct(m["accuracy_noflip"]), _pct(m["val"]), auc,
             _pct(m["best_threshold_accuracy"])]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def to_jsonable(value):
  """numpy scalars / arrays to Python; NaN and inf to null (strict JSON)."""
  if isinstance(value, Mapping):
    return {str(k): to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(v) for v in value]
  if isinstance(value, np.ndarray):
    return to_jsonable(value.tolist())
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def _plot_roc(path: Path, results: Mapping[str, dict]) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(6, 5))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for name, r in results.items():
    fpr, tpr = np.asarray(r["roc"]["fpr"]), np.asarray(r["roc"]["tpr"])
    keep = fpr > 0  # log axis: FPR 0 cannot be drawn
    ax.plot(fpr[keep], tpr[keep], label=f"{name} (AUC {r['auc']:.4f})")
  ax.set_xscale("log")
  ax.set_xlim(1e-4, 1)
  ax.set_ylim(0, 1.01)
  ax.set_xlabel("false accept rate (mean over held-out folds)")
  ax.set_ylabel("true accept rate")
  ax.set_title("Verification ROC")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(loc="lower right", fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def _plot_domain_weights(path: Path, results: Mapping[str, dict]) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  routed = {name: r for name, r in results.items() if r.get("domain_weights")}
  fig = Figure(figsize=(3.2 * len(routed) + 1, 3.6))
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(routed), sharey=True, squeeze=False)[0]
  for ax, (name, r) in zip(axes, routed.items()):
    sides = list(r["domain_weights"])
    weights = np.asarray([r["domain_weights"][side] for side in sides], np.float64)  # [sides, K]
    num_domains = weights.shape[1]
    domain_names = r.get("domain_names") or [f"domain {k}" for k in range(num_domains)]
    width = 0.8 / num_domains
    for k in range(num_domains):
      ax.bar(np.arange(len(sides)) + (k - (num_domains - 1) / 2) * width, weights[:, k], width,
             label=domain_names[k], color=f"C{k}")
    ax.set_xticks(np.arange(len(sides)), [{"a": "image a", "b": "image b"}.get(s, s) for s in sides])
    ax.set_title(name)
  axes[0].set_ylabel("mean routing weight")
  axes[-1].legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def write_results(out_dir, results: dict[str, dict], *, extra: Mapping[str, Any] | None = None) -> dict[str, Path]:
  """Writes results.json, results.md, roc.png (and domain_weights.png when results carry routing weights).

  results.json: one key per benchmark (its `evaluate_pairs` dict), `mean` (the five standard benchmarks, null
  unless all five are present), `mean_of_present` (every benchmark given, listed in its `benchmarks`), `protocol`,
  and the keys of `extra` (run metadata such as the step).
  """
  if not results:
    raise ValueError("no benchmark results to write")
  clash = [name for name in results if name in _RESERVED_KEYS]
  if clash:
    raise ValueError(f"benchmark name(s) {clash} collide with results.json keys {_RESERVED_KEYS}; rename them")
  extra = dict(extra or {})
  clash = [key for key in extra if key in results or key in _RESERVED_KEYS]
  if clash:
    raise ValueError(f"extra key(s) {clash} collide with benchmark names or results.json keys {_RESERVED_KEYS}")
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md", "roc": out_dir / "roc.png"}

  document = {**results, **summarize(results), "protocol": PROTOCOL, **extra}
  paths["json"].write_text(json.dumps(to_jsonable(document), indent=1) + "\n")
  notes = ("Accuracy: mean ± std over 10 contiguous folds, each with the threshold chosen on the other nine "
           "(flip: l2norm(raw + raw_flipped)). The best-threshold column fits one threshold on all pairs, scoring "
           "it on the same pairs: optimistic, not comparable with published accuracies.")
  paths["markdown"].write_text(format_table(results) + "\n\n" + notes + "\n")
  _plot_roc(paths["roc"], results)
  if any(r.get("domain_weights") for r in results.values()):
    paths["domain_weights"] = out_dir / "domain_weights.png"
    _plot_domain_weights(paths["domain_weights"], results)
  return paths
