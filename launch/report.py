"""Collects the runs of a study into one table (Markdown + CSV) and plots (PNG).

  python launch/report.py RUNS_DIR [--out DIR] [--published]

Reads each run's config.json, summary.json and results.json. Accuracy is the 10-fold verification accuracy
with flip test-time augmentation. --published adds the reference rows from the literature (marked as such).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# Published numbers (recipe notes): not runs of this project.
PUBLISHED = [
    {"run": "published: AdaptFace EXP-001 DINOv2 ViT-S + LoRA (CASIA, 40 ep)", "lfw": 90.45, "cfp_fp": 71.81,
     "agedb_30": 52.30, "calfw": 69.27, "cplfw": 68.67},
    {"run": "published: AdaptFace EXP-003 DINOv2 ViT-S + DA-LoRA K=3", "lfw": 89.50, "cfp_fp": 72.73,
     "agedb_30": 54.17, "calfw": 68.45, "cplfw": 68.82},
    {"run": "published: FRoundation DINOv2 ViT-S + LoRA, 1K ids (5-benchmark mean)", "mean": 87.10},
    {"run": "published: FRoundation CLIP ViT-B + LoRA, 10K ids (5-benchmark mean)", "mean": 92.1},
]


SEED_SUFFIX = re.compile(r"-seed\d+$")
RUN_FIELDS = ("run", "cell", "seed", "pairs", "experiment", "rank", "domains", "routing", "trainable_params", "steps",
              "wall_time_s", "images_per_sec", "mean")


def _row(name: str, results: dict, config: dict, summary: dict, metrics: list[dict]) -> dict:
  speeds = [m["images_per_sec"] for m in metrics if "images_per_sec" in m]
  adapter, router = config.get("adapter", {}), config.get("router", {})
  row = {"run": name, "cell": SEED_SUFFIX.sub("", name.split("/")[0]), "seed": config.get("seed", 0),
         "experiment": config.get("experiment", "untuned"), "rank": adapter.get("rank"),
         "domains": adapter.get("num_domains"), "routing": router.get("mode"),
         "trainable_params": summary.get("trainable_params"), "steps": summary.get("steps"),
         "wall_time_s": summary.get("wall_time_s_last_session"),
         "images_per_sec": round(sum(speeds) / len(speeds), 1) if speeds else None}
  benchmarks = {k: v for k, v in results.items()
                if isinstance(v, dict) and "accuracy" in v and k not in ("mean", "mean_of_present")}
  for bench, result in benchmarks.items():
    row[bench] = round(100 * result["accuracy"], 2)
    row[f"_fold_std/{bench}"] = 100 * result["accuracy_std"]
    if "domain_weights" in result:
      row.setdefault("_routing", {})[bench] = result["domain_weights"]
  row["pairs"] = min((r["num_pairs"] for r in benchmarks.values()), default=None)
  row["mean"] = round(sum(row[n] for n in benchmarks) / len(benchmarks), 2) if benchmarks else None
  return row


def load_runs(runs_dir: Path) -> list[dict]:
  """One row per results.json: a run's own (RUN/results.json), a later evaluation of it, e.g. on a subset
  (RUN/eval_stepN/results.json, named RUN/eval_stepN), or a backbone evaluated alone (`evaluate --config ...
  --out_dir RUNS_DIR/NAME`: no config.json, experiment `untuned`)."""
  rows = []
  for path in sorted(runs_dir.glob("*/results.json")) + sorted(runs_dir.glob("*/eval_step*/results.json")):
    workdir = path.parent if path.parent.parent == runs_dir else path.parent.parent

    def read(name, workdir=workdir):
      return json.loads((workdir / name).read_text()) if (workdir / name).exists() else {}

    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()] if (
        workdir / "metrics.jsonl").exists() else []
    rows.append(_row(str(path.parent.relative_to(runs_dir)), json.loads(path.read_text()), read("config.json"),
                     read("summary.json"), metrics))
  return rows


def seed_summary(rows: list[dict]) -> list[dict]:
  """Cells run with several seeds (on the same pairs): per benchmark the mean over seeds, their standard deviation
  (ddof=1) and the mean 10-fold standard deviation."""
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    if "/" not in row["run"]:
      groups.setdefault((row["cell"], row["pairs"]), []).append(row)
  out = []
  for (cell, pairs), members in groups.items():
    if len(members) < 2:
      continue
    entry = {"cell": cell, "pairs": pairs, "seeds": sorted(m["seed"] for m in members)}
    for bench in benchmark_columns(members):
      values = np.array([m[bench] for m in members])
      entry[bench] = (float(values.mean()), float(values.std(ddof=1)),
                      float(np.mean([m[f"_fold_std/{bench}"] for m in members])))
    out.append(entry)
  return out


def benchmark_columns(rows):
  seen = []
  for row in rows:
    for key in row:
      if key not in seen and key not in RUN_FIELDS and not key.startswith("_"):
        seen.append(key)
  return seen


def _fmt(value) -> str:
  if value is None:
    return ""
  if isinstance(value, tuple):  # (mean over seeds, their std, mean fold std)
    return f"{value[0]:.2f} ± {value[1]:.2f} (fold {value[2]:.2f})"
  return f"{value:,}" if isinstance(value, int) else (f"{value:.2f}" if isinstance(value, float) else str(value))


def write_tables(rows, out: Path) -> tuple[Path, Path]:
  bench = benchmark_columns(rows)
  lines = []
  summary = seed_summary(rows)
  if summary:
    lines += ["## Cells over seeds", "",
              "Mean over seeds ± their standard deviation (ddof 1), and the mean 10-fold standard deviation.", "",
              "| cell | pairs | seeds | " + " | ".join(bench) + " |", "|" + "---|" * (3 + len(bench))]
    lines += ["| " + " | ".join([entry["cell"], _fmt(entry["pairs"]), ",".join(map(str, entry["seeds"]))]
                                + [_fmt(entry.get(b)) for b in bench]) + " |" for entry in summary]
    lines += ["", "## Runs", ""]
  columns = ["run", "pairs", *bench, "mean", "trainable_params", "steps", "wall_time_s", "images_per_sec"]
  lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for row in rows:
    cells = [_fmt(row.get(c)) + (f" ± {row[f'_fold_std/{c}']:.2f}" if f"_fold_std/{c}" in row else "")
             for c in columns]
    lines.append("| " + " | ".join(cells) + " |")
  md = out / "report.md"
  md.write_text("\n".join(lines) + "\n")
  csv_path = out / "report.csv"
  with open(csv_path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  return md, csv_path


def _save(fig, path: Path) -> Path:
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot(rows, out: Path) -> list[Path]:
  paths = []
  runs = [r for r in rows if not r["run"].startswith("published")]
  bench = benchmark_columns(runs)
  # Per benchmark: the cells over seeds (error bar: std over seeds) and the single runs on the same pairs.
  summary = seed_summary(runs)
  pairs = max((r["pairs"] for r in runs if r["pairs"]), default=None)
  seeded = {entry["cell"] for entry in summary}
  bars = [(e["cell"], [e[b][0] for b in bench], [e[b][1] for b in bench]) for e in summary if e["pairs"] == pairs]
  bars += [(r["run"], [r.get(b, 0) for b in bench], None) for r in runs
           if r["pairs"] == pairs and r["cell"] not in seeded and "/" not in r["run"]]
  if bars and bench:
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(bars) * len(bench)), 4))
    width = 0.8 / len(bars)
    for i, (label, values, errors) in enumerate(bars):
      ax.bar([j + i * width for j in range(len(bench))], values, width, yerr=errors, capsize=2, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(bench))], bench)
    ax.set_ylabel(f"verification accuracy (%), {pairs:,} pairs")
    ax.set_ylim(bottom=50)
    ax.legend(fontsize=6, ncol=2)
    paths.append(_save(fig, out / "accuracy_by_benchmark.png"))
  # Sweeps: seed 0, on the sweep's own pairs; the matrix cell is the sweep's default point.
  for key, label, reference in (("rank", "LoRA rank", "lora_dino"), ("domains", "DA-LoRA domains K", "dalora_dino")):
    sweep = [r for r in runs if f"-{key}" in r["cell"]]
    if not sweep:
      continue
    sweep += [r for r in runs if r["cell"] == reference and r["seed"] == 0 and r["pairs"] == sweep[0]["pairs"]]
    sweep.sort(key=lambda r: r[key])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for b in bench + ["mean"]:
      ax.plot([r[key] for r in sweep], [r.get(b) for r in sweep], marker="o", label=b)
    ax.set_xlabel(label)
    ax.set_ylabel(f"accuracy (%), {sweep[0]['pairs']:,} pairs")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out / f"accuracy_vs_{key}.png"))
  routed = [r for r in runs if r.get("_routing") and r["seed"] == 0 and "/" not in r["run"]]
  if routed:
    fig, axes = plt.subplots(1, len(routed), figsize=(4 * len(routed), 3.5), squeeze=False)
    for ax, row in zip(axes[0], routed):
      names = list(row["_routing"])
      k = len(row["_routing"][names[0]]["all"])
      for d in range(k):
        ax.bar([j + d * 0.8 / k for j in range(len(names))], [row["_routing"][n]["all"][d] for n in names],
               0.8 / k, label=f"domain {d}")
      ax.set_xticks([j + 0.4 - 0.4 / k for j in range(len(names))], names, fontsize=7)
      ax.set_title(row["run"], fontsize=8)
      ax.set_ylabel("mean routing weight")
      ax.legend(fontsize=6)
    paths.append(_save(fig, out / "routing.png"))
  return paths


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("runs_dir", type=Path)
  parser.add_argument("--out", type=Path, default=None)
  parser.add_argument("--published", action="store_true", help="add published reference rows")
  args = parser.parse_args(argv)
  out = args.out or args.runs_dir
  out.mkdir(parents=True, exist_ok=True)
  rows = load_runs(args.runs_dir)
  if not rows:
    raise SystemExit(f"no finished run with results.json under {args.runs_dir}")
  table_rows = rows + (PUBLISHED if args.published else [])
  md, csv_path = write_tables(table_rows, out)
  pngs = plot(rows, out)
  print(md.read_text())
  print("wrote", md, csv_path, *pngs)


if __name__ == "__main__":
  main()
