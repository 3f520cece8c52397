#!/usr/bin/env bash
# Check of one CUDA machine (H100 / H200), one run of at most 8 minutes: parity with transformers and peft on the
# GPU and the attention tests; which attention the bfloat16 and float32 train steps compile to (cuDNN's fused
# kernel expected in bfloat16); launch/benchmark.py in float32 and bfloat16 for dino224 and clip224, LoRA and
# DA-LoRA (with the torch + peft reference where torch has CUDA), and images/s and MFU against the card's
# published dense peak. Installs nothing: the venv with jax[cuda12] must be there (.venv/ of the repository, or
# an active one).
#
#   bash launch/gpu_check.sh                                  # everything, results in ${OUT:-/tmp}
#   bash launch/gpu_check.sh --peak-bf16 B --peak-fp32 F --peak-tf32 T   # a card not in the table (TFLOP/s)
#   bash launch/gpu_check.sh --skip-tests -- --settings dino112 --rounds 5   # after --: benchmark.py arguments,
#                                                     # over the defaults (dino224 and clip224, 2 rounds of 10 steps)
#
# Published dense peaks (TFLOP/s; no sparsity):    bf16   fp32 (no tensor cores)   tf32 (tensor cores)
#   H100 SXM (nvidia-smi: "H100 80GB HBM3")        989    67                       495
#   H200 (SXM)                                     989    67                       495
#   H100 PCIe                                      756    51                       378
#   A100 (SXM or PCIe)                             312    19.5                     156
# XLA computes float32 dots with TF32 on these cards by default, so the float32 run is shown against both the
# fp32 and the tf32 peak. --peak T sets all three to T. The parity tests run with float32 dots at full precision
# (JAX_DEFAULT_MATMUL_PRECISION=highest): they check the port, not TF32.
#
# Each stage has a time limit (seconds, below): together about 7 minutes, which leaves room in an 8-minute run for
# the command at the end. A stage over its limit is stopped and reported as failed. Compiled programs are cached in $OUT/jax_cache: the attention check
# compiles the first benchmark setting, whose compile time the benchmark then reports from the cache.
set -uo pipefail

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }

peak_bf16="" peak_fp32="" peak_tf32="" skip_tests=0
bench_args=()
tests_limit=120 attention_limit=120 bench_limit=140  # tests and the attention check run side by side
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
export HF_HUB_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR="$out/jax_cache"
failures=()
started=$SECONDS

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

# The tests and the attention check share the GPU (neither is timed): no preallocation of most of its memory.
if ((!skip_tests)); then
  echo "== tests (log: $out/tests.log), alongside the attention check"
  XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_DEFAULT_MATMUL_PRECISION=highest timeout -k 10 "$tests_limit" \
    python -m pytest -q -x tests/test_attention.py \
      tests/test_backbones.py::test_full_size_parity \
      tests/test_backbones.py::test_full_clip_model_loads_vision_tower_and_projection \
      tests/test_backbones.py::test_activation_values_and_derivatives_match_torch \
      tests/test_adapters.py::test_peft_parity_q_v_and_attention_output \
      tests/test_adapters.py::test_pooled_only_gives_the_same_pooled_output_and_gradients \
      tests/test_train_step.py::test_bfloat16_compute_keeps_float32_parameters_and_learns \
    >"$out/tests.log" 2>&1 &
  tests_pid=$!
fi

echo "== attention in the compiled train and embed steps (dino224/lora; log: $out/attention.log)"
# cuDNN's fused attention is a custom call __cudnn$fmhaSoftmax (forward) / ...Backward in the compiled HLO: expected
# in bfloat16 for every block but the last (a pooled forward runs the last block's attention for the CLS query
# alone, through XLA), absent in float32.
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -k 10 "$attention_limit" python - >"$out/attention.log" 2>&1 <<'EOF'
import collections
import re
import sys

sys.path.insert(0, "launch")
from benchmark import OursStack, Setting, make_batch

setting = Setting("dino224/lora", "dino", 224, 32, "lora")
ok = True
for dtype in ("bfloat16", "float32"):
  stack = OursStack(setting, quick=False, dtype=dtype, batch=make_batch(setting.batch_size))
  blocks = stack.vit.num_layers
  for kind, compiled in (("train", stack._step), ("embed", stack._embed)):
    targets = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', compiled.as_text()))
    fused = {t: n for t, n in targets.items() if t.startswith("__cudnn$fmha")}
    print(f"{dtype} {kind}: cuDNN fused attention {fused or 'none'}; all custom calls {dict(targets)}")
    if dtype == "bfloat16":
      backward = fused.get("__cudnn$fmhaSoftmaxBackward", 0) if kind == "train" else blocks - 1
      expected = min(fused.get("__cudnn$fmhaSoftmax", 0), backward) >= blocks - 1
    else:
      expected = not fused
    ok &= expected
    print(f"  {'as expected' if expected else 'NOT as expected'}: {blocks} blocks; bfloat16 should have at least "
          f"{blocks - 1} forward calls (and as many backward in training), float32 none")
sys.exit(0 if ok else 1)
EOF
attention_rc=$?
grep -v '^WARNING' "$out/attention.log" | tail -n 20
((attention_rc == 0)) || failures+=("attention path (log: $out/attention.log)")

if ((!skip_tests)); then
  wait "$tests_pid"
  tests_rc=$?
  tail -n 15 "$out/tests.log"
  ((tests_rc == 0)) || failures+=("pytest (rc $tests_rc; 124: over ${tests_limit} s; log: $out/tests.log)")
fi

for dtype in float32 bfloat16; do
  echo "== benchmark, our dtype $dtype"
  if timeout -k 10 "$bench_limit" python launch/benchmark.py --dtype "$dtype" --json \
      --settings dino224/lora,dino224/dalora_patch_mean,clip224 --rounds 2 --steps 10 \
      "${reference_args[@]}" "${bench_args[@]}" >"$out/benchmark_$dtype.json" 2>"$out/benchmark_$dtype.log"; then
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


echo "== class head on this GPU: padded to a multiple of the devices, Partial FC at rate 0.3 (a 4-step tiny run)"
# One GPU is a mesh of one device: the split along the classes needs several (tests/test_sharded_head.py checks it on
# 8 CPU devices and on 2 processes x 2); this runs the padded, sampled head's step on the GPU.
if timeout -k 10 90 python -m adaptface_jax.main --config configs/lora_dino.py:demo,tiny,steps=4 \
    --workdir "$out/partial_fc" --config.data.train=synthetic_faces/tiny --config.data.batch_size=8 \
    --config.model.image_size=56 --config.eval.max_pairs=40 --config.centers.shard=on \
    --config.centers.sample_rate=0.3 >"$out/partial_fc.log" 2>&1; then
  grep -E "class centres|synth_lfw: accuracy" "$out/partial_fc.log"
else
  tail -n 20 "$out/partial_fc.log"
  failures+=("Partial FC run (log: $out/partial_fc.log)")
fi

echo
echo "results: $out/benchmark_float32.json, $out/benchmark_bfloat16.json (and .log), $out/attention.log," \
     "$out/tests.log; $((SECONDS - started)) s after the checks began"
if ((${#failures[@]})); then
  printf 'FAILED: %s\n' "${failures[@]}" >&2
  exit 1
fi
echo "gpu_check: all stages passed"
