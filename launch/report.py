"""Collects the runs of a study into one table (Markdown + CSV) and plots (PNG).

  python launch/report.py RUNS_DIR [--out DIR] [--published]

Reads each run's config.json, summary.json and results.json. Accuracy is the 10-fold verification accuracy
with flip test-time augmentation. --published adds the reference rows from the literature (marked as such).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STANDARD = ("lfw", "cfp_fp", "agedb_30", "calfw", "cplfw")
# Published numbers (recipe notes): not runs of this project.
PUBLISHED = [
    {"run": "published: AdaptFace EXP-001 DINOv2 ViT-S + LoRA (CASIA, 40 ep)", "lfw": 90.45, "cfp_fp": 71.81,
     "agedb_30": 52.30, "calfw": 69.27, "cplfw": 68.67},
    {"run": "published: AdaptFace EXP-003 DINOv2 ViT-S + DA-LoRA K=3", "lfw": 89.50, "cfp_fp": 72.73,
     "agedb_30": 54.17, "calfw": 68.45, "cplfw": 68.82},
    {"run": "published: FRoundation DINOv2 ViT-S + LoRA, 1K ids (5-benchmark mean)", "mean": 87.10},
    {"run": "published: FRoundation CLIP ViT-B + LoRA, 10K ids (5-benchmark mean)", "mean": 92.1},
]


def load_runs(runs_dir: Path) -> list[dict]:
  rows = []
  for workdir in sorted(p.parent for p in runs_dir.glob("*/results.json")):
    results = json.loads((workdir / "results.json").read_text())
    config = json.loads((workdir / "config.json").read_text())
    summary = json.loads((workdir / "summary.json").read_text()) if (workdir / "summary.json").exists() else {}
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()] if (
        workdir / "metrics.jsonl").exists() else []
    speeds = [m["images_per_sec"] for m in metrics if "images_per_sec" in m]
    row = {"run": workdir.name, "experiment": config.get("experiment", ""), "rank": config["adapter"]["rank"],
           "domains": config["adapter"]["num_domains"], "routing": config["router"]["mode"],
           "trainable_params": summary.get("trainable_params"), "steps": summary.get("steps"),
           "wall_time_s": summary.get("wall_time_s_last_session"),
           "images_per_sec": round(sum(speeds) / len(speeds), 1) if speeds else None}
    benchmarks = {k: v for k, v in results.items()
                  if isinstance(v, dict) and "accuracy" in v and k not in ("mean", "mean_of_present")}
    for name, result in benchmarks.items():
      row[name] = round(100 * result["accuracy"], 2)
      if "domain_weights" in result:
        row.setdefault("_routing", {})[name] = result["domain_weights"]
    names = [n for n in benchmarks]
    row["mean"] = round(sum(row[n] for n in names) / len(names), 2) if names else None
    rows.append(row)
  return rows


def benchmark_columns(rows):
  seen = []
  for row in rows:
    for key in row:
      if key not in seen and key not in ("run", "experiment", "rank", "domains", "routing", "trainable_params",
                                         "steps", "wall_time_s", "images_per_sec", "mean") and not key.startswith("_"):
        seen.append(key)
  return seen


def write_tables(rows, out: Path) -> tuple[Path, Path]:
  bench = benchmark_columns(rows)
  columns = ["run", *bench, "mean", "trainable_params", "steps", "wall_time_s", "images_per_sec"]
  fmt = lambda v: "" if v is None else (f"{v:,}" if isinstance(v, int) else (f"{v:.2f}" if isinstance(v, float)
                                                                             else str(v)))
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for row in rows:
    lines.append("| " + " | ".join(fmt(row.get(c)) for c in columns) + " |")
  md = out / "report.md"
  md.write_text("\n".join(lines) + "\n")
  csv_path = out / "report.csv"
  with open(csv_path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  return md, csv_path


def plot(rows, out: Path) -> list[Path]:
  paths = []
  runs = [r for r in rows if not r["run"].startswith("published")]
  bench = [b for b in benchmark_columns(runs)]
  if runs and bench:
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(runs) * len(bench) / 3), 4))
    width = 0.8 / len(runs)
    for i, row in enumerate(runs):
      ax.bar([j + i * width for j in range(len(bench))], [row.get(b, 0) for b in bench], width, label=row["run"])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(bench))], bench)
    ax.set_ylabel("verification accuracy (%)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    paths.append(out / "accuracy_by_benchmark.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
  for key, label in (("rank", "LoRA rank"), ("domains", "DA-LoRA domains K")):
    sweep = sorted((r for r in runs if f"-{key}" in r["run"] or (key == "rank" and r["run"] == "lora_dino")
                    or (key == "domains" and r["run"] == "dalora_dino")), key=lambda r: r[key])
    if len(sweep) > 1:
      fig, ax = plt.subplots(figsize=(5, 3.5))
      for b in bench + ["mean"]:
        ax.plot([r[key] for r in sweep], [r.get(b) for r in sweep], marker="o", label=b)
      ax.set_xlabel(label)
      ax.set_ylabel("accuracy (%)")
      ax.legend(fontsize=7)
      fig.tight_layout()
      paths.append(out / f"accuracy_vs_{key}.png")
      fig.savefig(paths[-1], dpi=120)
      plt.close(fig)
  routed = [r for r in runs if r.get("_routing")]
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
    fig.tight_layout()
    paths.append(out / "routing.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
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
