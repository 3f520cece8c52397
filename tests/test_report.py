"""launch/report.py on a hand-made runs folder: cells over seeds (mean, std over seeds, mean fold std), subset
evaluations of a run, a backbone evaluated alone, and the sweep plots."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
import report  # noqa: E402

BENCH = ("synth_lfw", "synth_cfp_fp")


def _write(directory: Path, accuracies, pairs, *, config=None, fold_std=0.01):
  directory.mkdir(parents=True)
  (directory / "results.json").write_text(json.dumps(
      {name: {"accuracy": acc, "accuracy_std": fold_std, "num_pairs": pairs} for name, acc in zip(BENCH, accuracies)}
      | {"mean_of_present": {"accuracy": 0.0}}))
  if config is not None:
    (directory / "config.json").write_text(json.dumps(config))


def _config(rank=16, seed=0):
  return {"experiment": "lora_dino", "seed": seed, "adapter": {"rank": rank, "num_domains": 1},
          "router": {"mode": "learned"}}


def test_seeds_subsets_and_untuned_rows(tmp_path):
  runs = tmp_path / "runs"
  for seed, accuracies in enumerate([(0.90, 0.80), (0.92, 0.81), (0.91, 0.85)]):
    _write(runs / ("lora_dino" + (f"-seed{seed}" if seed else "")), accuracies, 6000, config=_config(seed=seed),
           fold_std=0.01 * (seed + 1))
  _write(runs / "lora_dino" / "eval_step200", (0.88, 0.79), 1200)
  _write(runs / "lora_dino-rank4", (0.86, 0.78), 1200, config=_config(rank=4))
  _write(runs / "untuned_dino", (0.89, 0.75), 6000)

  rows = report.load_runs(runs)
  by_run = {row["run"]: row for row in rows}
  assert set(by_run) == {"lora_dino", "lora_dino-seed1", "lora_dino-seed2", "lora_dino/eval_step200",
                         "lora_dino-rank4", "untuned_dino"}
  assert by_run["lora_dino/eval_step200"]["cell"] == "lora_dino" and by_run["lora_dino/eval_step200"]["rank"] == 16
  assert by_run["lora_dino/eval_step200"]["pairs"] == 1200
  assert by_run["untuned_dino"]["experiment"] == "untuned"

  (summary,) = report.seed_summary(rows)  # the subset evaluation is not a fourth seed
  assert summary["cell"] == "lora_dino" and summary["seeds"] == [0, 1, 2] and summary["pairs"] == 6000
  mean, std, fold = summary["synth_cfp_fp"]
  assert mean == pytest.approx(82.0) and std == pytest.approx(2.6457513, rel=1e-6)  # 80, 81, 85: ddof 1
  assert fold == pytest.approx(2.0)  # fold stds 1, 2, 3 (%)

  report.main([str(runs), "--out", str(tmp_path / "out")])
  table = (tmp_path / "out" / "report.md").read_text()
  assert "| lora_dino | 6,000 | 0,1,2 | 91.00 ± 1.00 (fold 2.00) | 82.00 ± 2.65 (fold 2.00) |" in table
  assert "| lora_dino/eval_step200 | 1,200 | 88.00 ± 1.00 | 79.00 ± 1.00 |" in table
  assert {p.name for p in (tmp_path / "out").glob("*.png")} == {"accuracy_by_benchmark.png", "accuracy_vs_rank.png"}
