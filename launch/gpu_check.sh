#!/usr/bin/env bash
# Check of a CUDA machine: the GPU-relevant tests, then launch/benchmark.py in float32 and bfloat16, and images/s
# and MFU against the card's published dense peak. Installs nothing: the venv with jax[cuda12] must be there
# (.venv/ of the repository, or an active one).
#
#   bash launch/gpu_check.sh                                  # tests + both benchmarks, results in ${OUT:-/tmp}
#   bash launch/gpu_check.sh --peak-bf16 B --peak-fp32 F --peak-tf32 T   # a card not in the table (TFLOP/s)
#   bash launch/gpu_check.sh --skip-tests -- --settings dino112 --rounds 5   # after --: benchmark.py arguments
#
# Published dense peaks (TFLOP/s; no sparsity):    bf16   fp32 (no tensor cores)   tf32 (tensor cores)
#   H100 SXM (nvidia-smi: "H100 80GB HBM3")        989    67                       495
#   H200 (SXM)                                     989    67                       495
#   H100 PCIe                                      756    51                       378
#   A100 (SXM or PCIe)                             312    19.5                     156
# XLA computes float32 dots with TF32 on these cards by default, so the float32 run is shown against both the
# fp32 and the tf32 peak. --peak T sets all three to T.
set -uo pipefail

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }

peak_bf16="" peak_fp32="" peak_tf32="" skip_tests=0
bench_args=()
while (($#)); do
  case "$1" in
    --peak) peak_bf16=${2:?--peak needs TFLOP/s}; peak_fp32=$2; peak_tf32=$2; shift 2 ;;
    --peak-bf16) peak_bf16=${2:?--peak-bf16 needs TFLOP/s}; shift 2 ;;
    --peak-fp32) peak_fp32=${2:?--peak-fp32 needs TFLOP/s}; shift 2 ;;
    --peak-tf32) peak_tf32=${2:?--peak-tf32 needs TFLOP/s}; shift 2 ;;
    --skip-tests) skip_tests=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; bench_args=("$@"); break ;;
    *) echo "gpu_check.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
for value in "$peak_bf16" "$peak_fp32" "$peak_tf32"; do
  if [[ -n $value && ! $value =~ ^[0-9]+([.][0-9]+)?$ ]]; then
    echo "gpu_check.sh: a peak must be a number of TFLOP/s, got '$value'" >&2; exit 2
  fi
done

cd "$(dirname "$0")/.." || exit 1
out=${OUT:-/tmp}
mkdir -p "$out" || exit 1
if [[ -z ${VIRTUAL_ENV:-} && -f .venv/bin/activate ]]; then
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
export HF_HUB_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1
failures=()

echo "== nvidia-smi"
if ! nvidia-smi; then
  echo "gpu_check.sh: nvidia-smi failed: no NVIDIA driver or GPU here" >&2; exit 1
fi
gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)

# Published peaks by name; NVL and other variants are not guessed (they differ): pass --peak-* for them.
case "$gpu_name" in
  *NVL*) known=() ;;
  *H200*|*"H100 80GB HBM3"*|*"H100 SXM"*) known=(989 67 495) ;;
  *"H100 PCIe"*) known=(756 51 378) ;;
  *A100*) known=(312 19.5 156) ;;
  *) known=() ;;
esac
if ((${#known[@]})); then
  peak_bf16=${peak_bf16:-${known[0]}} peak_fp32=${peak_fp32:-${known[1]}} peak_tf32=${peak_tf32:-${known[2]}}
fi
if [[ -z $peak_bf16 || -z $peak_fp32 || -z $peak_tf32 ]]; then
  echo "gpu_check.sh: no published peak on record for '$gpu_name'; pass --peak T or --peak-bf16, --peak-fp32" \
       "and --peak-tf32 (dense TFLOP/s from the card's datasheet)" >&2
  exit 2
fi
echo "GPU: $gpu_name; published dense peaks (TFLOP/s): bf16 $peak_bf16, fp32 $peak_fp32, tf32 $peak_tf32"

echo "== jax"
if ! python -c 'import jax; print(jax.__version__, jax.devices()); assert jax.devices()[0].platform == "gpu", "JAX sees no GPU: install jax[cuda12] in the venv"'; then
  echo "gpu_check.sh: JAX has no GPU backend here; nothing else is worth running" >&2; exit 1
fi
# A CPU-only torch would compare a GPU with a CPU: then time ours alone.
torch_cuda=$(python -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null || echo "absent")
reference_args=()
if [[ $torch_cuda != True ]]; then
  echo "torch with CUDA: $torch_cuda -> the PyTorch reference is skipped (--no-reference)"
  reference_args=(--no-reference)
fi

if ((!skip_tests)); then
  echo "== tests"
  python -m pytest -q tests/test_train_step.py tests/test_adapters.py tests/test_backbones.py \
    || failures+=("pytest")
fi

for dtype in float32 bfloat16; do
  echo "== benchmark, our dtype $dtype"
  if python launch/benchmark.py --dtype "$dtype" --json "${reference_args[@]}" "${bench_args[@]}" \
      >"$out/benchmark_$dtype.json" 2>"$out/benchmark_$dtype.log"; then
    # The table is the end of the log (progress lines come before it).
    sed -n '/^device: /,$p' "$out/benchmark_$dtype.log"
  else
    tail -n 30 "$out/benchmark_$dtype.log"
    failures+=("benchmark $dtype (log: $out/benchmark_$dtype.log)")
  fi
done

echo "== against the published peaks of $gpu_name"
python - "$out" "$peak_bf16" "$peak_fp32" "$peak_tf32" <<'EOF'
import json
import os
import sys

out, peak_bf16, peak_fp32, peak_tf32 = sys.argv[1], *(float(v) * 1e12 for v in sys.argv[2:])
for dtype in ("float32", "bfloat16"):
  path = os.path.join(out, f"benchmark_{dtype}.json")
  if not os.path.exists(path) or not os.path.getsize(path):
    print(f"{dtype}: no results ({path} is missing or empty)")
    continue
  report = json.load(open(path))
  peaks = {"fp32": peak_fp32, "tf32": peak_tf32} if dtype == "float32" else {"bf16": peak_bf16}
  measured = report["matmul_peak_flops"][dtype]["used"]
  print(f"\nour dtype {dtype}; measured matmul peak {measured / 1e12:.1f} TFLOP/s; "
        + ", ".join(f"published {k} {v / 1e12:g}" for k, v in peaks.items()))
  columns = "".join(f" {'MFU ' + k + ' ours':>14} {'ref':>7}" for k in peaks)
  print(f"{'setting':<26} {'kind':<5} {'ours img/s':>11} {'ref img/s':>10} {'ours/ref':>8}{columns}")
  for name, result in report["settings"].items():
    for kind in ("train", "embed"):
      f = result[kind]
      ours, ref = f["ours"], f.get("reference")
      row = f"{name:<26} {kind:<5} {ours['images_per_s']:>11.1f} "
      row += f"{ref['images_per_s']:>10.1f} {f['ours_over_reference']:>8.2f}" if ref else f"{'-':>10} {'-':>8}"
      for peak in peaks.values():
        row += f" {ours['achieved_flops_per_s'] / peak:>14.1%}"
        row += f" {ref['achieved_flops_per_s'] / peak:>7.1%}" if ref else f" {'-':>7}"
      print(row)
EOF

echo
echo "results: $out/benchmark_float32.json, $out/benchmark_bfloat16.json (and .log)"
if ((${#failures[@]})); then
  printf 'FAILED: %s\n' "${failures[@]}" >&2
  exit 1
fi
echo "gpu_check: all stages passed"
