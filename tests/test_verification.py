"""The verification protocol on hand-built embeddings whose every number is derived by hand below."""

import json
import math
import warnings

import numpy as np
import pytest
from scipy.interpolate import BSpline

from adaptface_jax import verification

# Distances sit between grid points of both the 0.01 and the 0.001 threshold grids, so float rounding of the
# embeddings can never move a pair across a threshold.
SAME, DIFF, HARD_SAME, HARD_DIFF = 0.3055, 1.5055, 0.7055, 0.2055


def embeddings_at_distances(distances, seed=0):
  """Raw 2-D embeddings [2P, 2] (pair order a0, b0, ...) whose normalised pairs are at the given squared-L2
  distances (= 2 - 2 cos angle); random directions and random norms, so the code must normalise."""
  rng = np.random.default_rng(seed)
  distances = np.asarray(distances, np.float64)
  base = rng.uniform(0, 2 * np.pi, len(distances))
  other = base + np.arccos(1 - distances / 2) * rng.choice([-1, 1], len(distances))
  angles = np.stack([base, other], 1).reshape(-1)
  norms = rng.uniform(0.5, 20, len(angles))
  return np.stack([np.cos(angles), np.sin(angles)], 1) * norms[:, None]


def hand_built_benchmark():
  """100 pairs, 10 folds of 10 (5 same then 5 different each); a hard same pair (pair 0, fold 0) and a hard
  different pair (pair 35, fold 3)."""
  issame = np.tile(np.r_[np.ones(5, bool), np.zeros(5, bool)], 10)
  distances = np.where(issame, SAME, DIFF)
  distances[0] = HARD_SAME
  distances[35] = HARD_DIFF
  return embeddings_at_distances(distances), issame


def test_fold_thresholds_accuracies_val_by_hand():
  embeddings, issame = hand_built_benchmark()
  result = verification.evaluate_pairs(embeddings, issame)

  # Fold 0 trains on folds 1-9: the hard different pair (0.2055) is wrong for every threshold above it, so only the
  # same pairs (0.3055) decide: first best threshold 0.31. Its own hard same pair (0.7055) is then rejected: 9/10.
  # Folds 1-9 train with the hard same pair: thresholds above 0.7055 (up to 1.5055) get it right too: 0.71.
  # Fold 3 tests the hard different pair at 0.2055 < 0.71: accepted, 9/10. The rest: 10/10.
  assert result["fold_sizes"] == [10] * 10
  np.testing.assert_allclose(result["fold_thresholds"], [0.31] + [0.71] * 9, atol=1e-12)
  np.testing.assert_allclose(result["fold_accuracies"], [0.9, 1, 1, 0.9, 1, 1, 1, 1, 1, 1], atol=1e-12)
  assert result["accuracy"] == pytest.approx(0.98, abs=1e-12)
  # std (ddof=0) = sqrt((2 * 0.08^2 + 8 * 0.02^2) / 10) = sqrt(0.0016)
  assert result["accuracy_std"] == pytest.approx(0.04, abs=1e-12)

  # VAL@FAR=1e-3 on the 0.001 grid. Folds != 3: 45 training different pairs, one at 0.2055: FAR is 0 up to
  # threshold 0.205 (index 205) and 1/45 from 0.206. Interpolating FAR=1e-3 between them gives
  # 0.205 + 1e-3 * 0.001 / (1/45) = 0.205045: no pair of the held-out fold is that close: VAL 0, FAR 0.
  # Fold 3 trains without the hard pair: FAR 0 up to 1.505, 1 from 1.506: threshold 1.505 + 1e-3 * 0.001 = 1.505001;
  # its 5 same pairs (0.3055) pass: VAL 1; of its 5 different pairs the hard one passes: FAR 1/5.
  expected_thresholds = [0.205045] * 10
  expected_thresholds[3] = 1.505001
  np.testing.assert_allclose(result["fold_val_thresholds"], expected_thresholds, atol=1e-12)
  np.testing.assert_allclose(result["fold_vals"], [0, 0, 0, 1, 0, 0, 0, 0, 0, 0])
  np.testing.assert_allclose(result["fold_fars"], [0, 0, 0, 0.2, 0, 0, 0, 0, 0, 0])
  assert result["val_at_far_1e-3"] == result["val"] == pytest.approx(0.1)
  assert result["val_std"] == pytest.approx(0.3)  # sqrt((0.9^2 + 9 * 0.1^2) / 10)
  assert result["far"] == pytest.approx(0.02)

  # AUC: 50 same x 50 different = 2500 comparisons; every same pair is closer than the 49 ordinary different pairs
  # and farther than the hard one: 50 * 49 / 2500.
  assert result["auc"] == pytest.approx(0.98)
  # One threshold on all pairs: above 0.7055 only the hard different pair is wrong: 99/100 at 0.71 (optimistic).
  assert result["best_threshold_accuracy"] == pytest.approx(0.99)
  assert result["best_threshold"] == pytest.approx(0.71)
  assert "optimistic" in result["best_threshold_note"]
  assert result["accuracy_noflip"] is None and result["flip"] is False
  assert result["num_pairs"] == 100 and result["num_same"] == 50


def test_repeated_far_values_take_the_last_threshold():
  # With far_target = 1/45 the training FAR of folds != 3 sits exactly at the target from 0.206 to 1.505 (the hard
  # different pair accepted, no other): the reference's interpolation takes the LAST threshold at that FAR, 1.505,
  # so every same pair (up to 0.7055) passes: VAL 1, FAR 0. Taking the first (0.206) would give VAL 0.
  embeddings, issame = hand_built_benchmark()
  result = verification.evaluate_pairs(embeddings, issame, far_target=1 / 45)
  np.testing.assert_allclose(result["fold_val_thresholds"][:3], [1.505] * 3, atol=1e-12)
  assert result["fold_val_thresholds"][3] == pytest.approx(1.505 + (1 / 45) * 0.001)
  assert result["fold_vals"] == [1.0] * 10
  np.testing.assert_allclose(result["fold_fars"], [0, 0, 0, 0.2, 0, 0, 0, 0, 0, 0])
  assert result["val_at_far_2e-2"] == result["val"] == 1.0


def old_scipy_slinear(far, thresholds, target):
  """What scipy < 1.9 `interp1d(far, thresholds, kind='slinear')(target)` evaluated: a stable sort, then the
  degree-1 B-spline with knots (far[0], far..., far[-1]) and coefficients `thresholds` (repeated knots allowed)."""
  order = np.argsort(far, kind="mergesort")
  far, thresholds = far[order], thresholds[order]
  return float(BSpline.construct_fast(np.r_[far[0], far, far[-1]], thresholds, 1)(target))


@pytest.mark.parametrize("seed", range(20))
def test_threshold_at_far_matches_the_old_scipy_spline(seed):
  rng = np.random.default_rng(seed)
  thresholds = np.arange(0, 4, 0.001)
  num_diff = int(rng.integers(200, 3000))
  diff_distances = np.sort(rng.uniform(0.3, 4.5, num_diff))
  far = np.searchsorted(diff_distances, thresholds, side="left") / num_diff  # non-decreasing, many repeats
  targets = [1e-3, far[far > 0][0], far[len(far) // 2], 0.0]  # in-between values, and exactly repeated ones
  for target in targets:
    assert verification.threshold_at_far(far, thresholds, target) == pytest.approx(
        old_scipy_slinear(far, thresholds, target), abs=1e-12)


def test_flip_sums_raw_embeddings_before_normalising():
  # Raw image embeddings are long (norm 10) along +-e1, the flips' short (norm 1) along +-e2.
  # Same pairs: images (10, 0) and (10, 0), flips (0, 1) and (0, -1).
  # Different pairs: images (10, 0) and (-10, 0), flips (0, 1) and (0, 1).
  # Sum then normalise: same pairs (10, 1) vs (10, -1): distance 2 - 2 * 99/101 = 0.0396; different pairs
  # (10, 1) vs (-10, 1): 2 + 2 * 99/101 = 3.96: all right, accuracy 1.
  # Normalise then sum: (1, 1) vs (1, -1) and (1, 1) vs (-1, 1): both distance 2: no threshold separates them.
  # Concatenation [image, flip] normalised: [1, 0, 0, 1] vs [1, 0, 0, -1] and vs [-1, 0, 0, 1]: both 2 as well.
  num_pairs = 40
  issame = np.tile([True, False], num_pairs // 2)
  images = np.zeros((2 * num_pairs, 2))
  flips = np.zeros((2 * num_pairs, 2))
  images[0::2, 0] = 10
  images[1::2, 0] = np.where(issame, 10, -10)
  flips[0::2, 1] = 1
  flips[1::2, 1] = np.where(issame, -1, 1)

  result = verification.evaluate_pairs(images, issame, embeddings_flip=flips)
  assert result["accuracy"] == 1.0
  assert result["flip"] is True

  def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)

  normalise_then_sum = verification.evaluate_pairs(unit(images) + unit(flips), issame)
  concatenated = verification.evaluate_pairs(np.concatenate([unit(images), unit(flips)], 1), issame)
  # All distances equal 2 (up to rounding): a threshold accepts all pairs or none: half right at best.
  assert normalise_then_sum["accuracy"] <= 0.6 and concatenated["accuracy"] <= 0.6
  # Without flips the images alone are separable (distance 0 vs 4).
  assert result["accuracy_noflip"] == 1.0


def brute_force_auc(distances, issame):
  same, diff = distances[issame], distances[~issame]
  closer = (same[:, None] < diff[None, :]).sum()
  tied = (same[:, None] == diff[None, :]).sum()
  return (closer + 0.5 * tied) / (len(same) * len(diff))


def test_swapped_labels_flip_auc_and_warn():
  rng = np.random.default_rng(3)
  num_pairs = 300
  issame = rng.random(num_pairs) < 0.5
  # Overlapping classes on a few distinct distances, so that ties count: pairs at the same distance reuse the same
  # two rows, so their computed distances are bitwise equal.
  levels = np.arange(0.2055, 2.4, 0.1)
  level = np.where(issame, rng.integers(0, 15, num_pairs), rng.integers(8, len(levels), num_pairs))
  distances = levels[level]
  templates = embeddings_at_distances(levels, seed=4).reshape(len(levels), 2, 2)
  embeddings = templates[level].reshape(2 * num_pairs, 2)

  with warnings.catch_warnings():
    warnings.simplefilter("error")  # a correct benchmark must not warn
    right = verification.evaluate_pairs(embeddings, issame)
  assert 0.5 < right["auc"] < 1
  assert right["auc"] == pytest.approx(brute_force_auc(distances, issame), abs=1e-12)

  with pytest.warns(UserWarning, match="swapped.*pair order"):
    swapped = verification.evaluate_pairs(embeddings, ~issame, name="agedb_30")
  assert swapped["auc"] == pytest.approx(1 - right["auc"], abs=1e-12)


@pytest.mark.parametrize("num_pairs, expected_sizes", [(70, [7] * 10), (123, [13] * 3 + [12] * 7),
                                                       (6000, [600] * 10)])
def test_fold_sizes_like_kfold(num_pairs, expected_sizes):
  issame = np.arange(num_pairs) % 2 == 0
  distances = np.where(issame, SAME, DIFF)
  last_of_first_fold = expected_sizes[0] - 1
  # A same pair farther than every different pair is wrong under any threshold <= 1.5055: one error, and only in
  # the fold that holds it: the first fold when the folds are as KFold cuts them.
  hard = last_of_first_fold if issame[last_of_first_fold] else last_of_first_fold - 1
  distances[hard] = 1.9055
  result = verification.evaluate_pairs(embeddings_at_distances(distances), issame)
  assert result["fold_sizes"] == expected_sizes
  assert result["fold_accuracies"][0] == pytest.approx(1 - 1 / expected_sizes[0])
  assert result["fold_accuracies"][1:] == [1.0] * 9
  np.testing.assert_allclose(result["fold_thresholds"], [0.31] * 10, atol=1e-12)
  assert result["num_pairs"] == num_pairs


def test_bad_inputs_raise_clear_errors():
  embeddings, issame = hand_built_benchmark()
  with pytest.raises(ValueError, match="2 rows per pair"):
    verification.evaluate_pairs(embeddings[:-2], issame)
  with pytest.raises(ValueError, match="cannot be split into 10 folds"):
    verification.evaluate_pairs(embeddings[:12], issame[:6])
  with pytest.raises(ValueError, match="embeddings_flip"):
    verification.evaluate_pairs(embeddings, issame, embeddings_flip=embeddings[:, :1])
  with pytest.raises(ValueError, match="both kinds"):
    verification.evaluate_pairs(embeddings, np.ones_like(issame))
  with pytest.raises(ValueError, match="norm 0"):
    verification.evaluate_pairs(np.zeros_like(embeddings), issame)
  with pytest.raises(ValueError, match="non-finite"):
    verification.evaluate_pairs(np.where(np.arange(200)[:, None] == 7, np.nan, embeddings), issame)
  with pytest.raises(ValueError, match="bool"):
    verification.evaluate_pairs(embeddings, issame.astype(int) * 2)


def fake_result(accuracy, *, flip=True, domain_weights=None):
  embeddings, issame = hand_built_benchmark()
  result = verification.evaluate_pairs(embeddings, issame, embeddings_flip=embeddings if flip else None)
  result["accuracy"] = accuracy  # distinct per benchmark, to check the means
  if domain_weights is not None:
    result["domain_weights"] = domain_weights
    result["domain_names"] = ["general", "pose", "age"]
  return result


def test_write_results_files_and_rows(tmp_path):
  weights = {"a": [0.5, 0.3, 0.2], "b": [0.2, 0.5, 0.3], "all": [0.35, 0.4, 0.25]}
  results = {name: fake_result(0.90 + 0.01 * i, domain_weights=weights if name == "cfp_fp" else None)
             for i, name in enumerate(verification.STANDARD_BENCHMARKS)}
  results["synthetic_pose"] = fake_result(0.5, flip=False)
  paths = verification.write_results(tmp_path, results, extra={"step": 1200})

  assert set(paths) == {"json", "markdown", "roc", "domain_weights"}
  for key in ("roc", "domain_weights"):
    assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[key].stat().st_size > 5000

  saved = json.loads(paths["json"].read_text())
  assert saved["step"] == 1200
  assert saved["mean"]["benchmarks"] == list(verification.STANDARD_BENCHMARKS)
  assert saved["mean"]["accuracy"] == pytest.approx(0.92)  # (0.90 + ... + 0.94) / 5
  assert saved["mean_of_present"]["benchmarks"] == list(verification.STANDARD_BENCHMARKS) + ["synthetic_pose"]
  assert saved["mean_of_present"]["accuracy"] == pytest.approx((0.90 + 0.91 + 0.92 + 0.93 + 0.94 + 0.5) / 6)
  assert saved["mean_of_present"]["accuracy_noflip"] is None  # one benchmark has no flip
  assert saved["cfp_fp"]["domain_weights"] == weights and saved["cfp_fp"]["domain_names"][1] == "pose"
  assert len(saved["lfw"]["roc"]["fpr"]) == 400 and saved["lfw"]["val_at_far_1e-3"] == pytest.approx(0.1)

  table = paths["markdown"].read_text()
  lines = [line for line in table.splitlines() if line.startswith("|")]
  assert "optimistic" in lines[0] and "VAL@FAR=1e-3" in lines[0]
  rows = [line.split("|")[1].strip() for line in lines[2:]]
  assert rows == list(verification.STANDARD_BENCHMARKS) + ["synthetic_pose", "**mean (5 standard)**",
                                                           "**mean of the 6 present**"]
  lfw_cells = [cell.strip() for cell in lines[2].split("|")[1:-1]]
  assert lfw_cells[1:] == ["100", "90.00 ± 4.00", "98.00", "10.00 ± 30.00", "0.9800", "99.00 @ 0.71"]
  assert lines[-2].split("|")[3].strip() == "92.00"
  assert table == verification.format_table(results) + "\n\n" + table.split("\n\n", 1)[1]


def test_write_results_without_all_standard_benchmarks(tmp_path):
  results = {"lfw": fake_result(0.99), "agedb_30": fake_result(0.95)}
  paths = verification.write_results(tmp_path, results)
  assert "domain_weights" not in paths and not (tmp_path / "domain_weights.png").exists()
  saved = json.loads(paths["json"].read_text())
  assert saved["mean"] is None
  assert saved["mean_of_present"]["accuracy"] == pytest.approx(0.97)
  last_row = paths["markdown"].read_text().split("\n\n")[0].splitlines()[-1]
  assert last_row.startswith("| **mean of the 2 present** |")
  with pytest.raises(ValueError, match="collide"):
    verification.write_results(tmp_path, {"mean": fake_result(0.9)})


def test_float32_embeddings_give_float_results():
  embeddings, issame = hand_built_benchmark()
  result = verification.evaluate_pairs(embeddings.astype(np.float32), issame)
  np.testing.assert_allclose(result["fold_thresholds"], [0.31] + [0.71] * 9, atol=1e-12)
  assert all(isinstance(v, float) and math.isfinite(v) for v in result["fold_accuracies"])
  json.dumps(verification.to_jsonable(result))


def test_folds_with_one_class_warn_and_skip_undefined_val():
  # Pairs sorted by label: folds 0-4 hold only same pairs (FAR undefined), folds 5-9 only different (VAL undefined).
  issame = np.r_[np.ones(50, bool), np.zeros(50, bool)]
  embeddings = embeddings_at_distances(np.where(issame, SAME, DIFF))
  with pytest.warns(UserWarning, match=r"fold\(s\) \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9\]"):
    result = verification.evaluate_pairs(embeddings, issame)
  assert all(math.isnan(v) for v in result["fold_vals"][5:]) and all(math.isnan(f) for f in result["fold_fars"][:5])
  assert not math.isnan(result["val"]) and not math.isnan(result["far"])
  saved = json.loads(json.dumps(verification.to_jsonable(result)))
  assert saved["fold_vals"][5:] == [None] * 5


def test_val_threshold_zero_when_training_far_never_reaches_the_target():
  # Different pairs antipodal (distance 4 > every grid threshold): the training FAR stays 0 < 1e-3, so the
  # reference falls back to threshold 0, which accepts nothing: VAL 0 although the classes are perfectly apart.
  issame = np.tile([True, False], 20)
  result = verification.evaluate_pairs(embeddings_at_distances(np.where(issame, SAME, 4.0)), issame)
  assert result["fold_val_thresholds"] == [0.0] * 10
  assert result["val"] == 0.0 and result["far"] == 0.0
  assert result["accuracy"] == 1.0 and result["auc"] == 1.0
