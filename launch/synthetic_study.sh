#!/usr/bin/env bash
# The synthetic study on the synthetic-pretrained backbones, end to end and resumable (finished runs and
# evaluations are skipped; an interrupted run resumes from its checkpoint):
#   - the 2x2 matrix (DINOv2 / CLIP family x LoRA / DA-LoRA), 3 seeds, on the full 6,000-pair benchmarks;
#   - DA-LoRA with uniform and oracle routing, the rank and the K sweeps (seed 0) on balanced 1,200-pair subsets,
#     and the matrix's DINOv2 cells evaluated on the same subsets (their default point);
#   - the un-tuned backbones (pooled feature, no adapter, no head), full benchmarks;
#   - the report and plots.
#
#   bash launch/synthetic_study.sh [RUNS_DIR [REPORT_DIR]]     # defaults: runs/synthetic, docs/synthetic_study
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs/synthetic}
report=${2:-docs/synthetic_study}

python launch/ablation.py --sweep seeds --base demo --runs_dir "$runs" -- --config.eval.max_pairs=0
python launch/ablation.py --sweep study --base demo --runs_dir "$runs"   # the sweeps (the seeds are done)
for cell in lora_dino dalora_dino; do
  [ -f "$runs/$cell/eval_step200/results.json" ] ||
    python -m adaptface_jax.evaluate --workdir "$runs/$cell" --max_pairs 1200
done
for family in dino clip; do
  [ -f "$runs/untuned_$family/results.json" ] ||
    python -m adaptface_jax.evaluate --config "configs/lora_$family.py:demo" --max_pairs 0 --out_dir "$runs/untuned_$family"
done
python launch/report.py "$runs" --out "$report"
