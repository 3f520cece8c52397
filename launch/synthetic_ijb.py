"""The synthetic IJB-style benchmark for raw pixels, the un-tuned synthetic-pretrained snapshots and the study's
seed-0 runs: one folder of IJB results per row and a table of them.

  python launch/synthetic_ijb.py [--runs runs/synthetic] [--out docs/synthetic_ijb]

Builds (or reuses) the default synthetic IJB-style benchmark (adaptface_jax.data.synthetic_ijb) and evaluates every
row with `python -m adaptface_jax.evaluate --ijb synthetic`'s code; a run missing from --runs is skipped with a
message. report.md gives TAR at FAR = 1e-4 / 1e-3 / 1e-2 and AUC for the main variant (N1D1F2) and for N0D0F0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaptface_jax import runtime  # noqa: E402

# (output folder = the run's name under --runs, row); "pixels" and "untuned_<family>" (the family's :demo backbone
# alone) are no runs.
ROWS = [("pixels", "pixels"), ("untuned_dino", "untuned DINOv2-family snapshot"), ("lora_dino", "LoRA, DINOv2 family"),
        ("dalora_dino", "DA-LoRA, DINOv2 family (the demo run)"), ("untuned_clip", "untuned CLIP-family snapshot"),
        ("lora_clip", "LoRA, CLIP family"), ("dalora_clip", "DA-LoRA, CLIP family")]
SHOWN = ("N1D1F2", "N0D0F0")
FARS = ("1e-4", "1e-3", "1e-2")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--runs", default="runs/synthetic")
  parser.add_argument("--out", default="docs/synthetic_ijb")
  args = parser.parse_args()
  runtime.use_cpu_devices()
  from adaptface_jax import evaluate, ijb
  from adaptface_jax.data import synthetic_ijb
  from configs import common

  root = synthetic_ijb.build_ijb()
  dataset = ijb.read(root)
  out = Path(args.out)
  lines = [f"Synthetic IJB-style benchmark `{root.name}`: {len(dataset.paths)} images, "
           f"{len(set(dataset.templates.tolist()))} templates, {int(dataset.labels.sum())} genuine and "
           f"{int((~dataset.labels).sum())} impostor template pairs. TAR (%) at FAR; `-`: not measurable.", "",
           "| row | variant | " + " | ".join(f"TAR@FAR={far}" for far in FARS) + " | AUC |",
           "|---|---|" + "---:|" * (len(FARS) + 1)]
  for name, label in ROWS:
    folder = out / name
    if name == "pixels":
      results = ijb.evaluate(*ijb.embed(dataset, ijb.pixel_embeddings), dataset, variants=SHOWN)
    elif name.startswith("untuned_"):
      results = evaluate.evaluate_untuned(common.experiment(name[len("untuned_"):], "dalora", "demo"), ijb=str(root))
    else:
      workdir = Path(args.runs) / name
      if not (workdir / "config.json").exists():
        print(f"skipping {label}: no run in {workdir}", file=sys.stderr)
        continue
      results, _ = evaluate.evaluate_run(str(workdir), ijb=str(root))
    ijb.write_results(folder, results, {"row": label})
    for variant in SHOWN:
      r = results["variants"][variant]
      cells = ["-" if r["tar_at_far"][far] is None else f"{100 * r['tar_at_far'][far]:.2f}" for far in FARS]
      lines.append(f"| {label} | {variant} | " + " | ".join(cells) + f" | {r['auc']:.4f} |")
    print("\n".join(lines[-2:]), flush=True)
  (out / "report.md").write_text("\n".join(lines) + "\n\n" + ijb.NOTES + "\n")
  (out / "benchmark.json").write_text(json.dumps(json.loads((root / "COMPLETE.json").read_text()), indent=1) + "\n")
  print(f"wrote {out / 'report.md'}")


if __name__ == "__main__":
  main()
