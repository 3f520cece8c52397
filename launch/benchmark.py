"""Side-by-side speed of this project's train step and of a PyTorch + peft reference, with FLOPs and MFU.

  python launch/benchmark.py                          # every setting, 3 rounds, float32: a table
  python launch/benchmark.py --quick                  # tiny 2-layer ViTs, 1 round: a smoke check (a minute;
                                                      # its speeds measure overheads, not the models)
  python launch/benchmark.py --settings dino112,clip224 --rounds 5
  python launch/benchmark.py --dtype bfloat16 --json > bench_bf16.json   # one JSON object on stdout
  python launch/benchmark.py --threads 1              # both runtimes on one CPU (a machine shared with other jobs)
  bash launch/gpu_check.sh                            # on a CUDA machine: tests, float32 and bfloat16 runs, MFU

Settings (`--settings` takes names or their prefix before the '/'):
  dino112/lora, dino112/dalora_patch_mean, dino112/dalora_frozen_cls    DINOv2 ViT-S/14, 112 px, batch 64
  dino224/lora, dino224/dalora_patch_mean, dino224/dalora_frozen_cls    DINOv2 ViT-S/14, 224 px, batch 32
  clip224/lora, clip224/dalora_patch_mean                               CLIP ViT-B/16, 224 px, batch 16
The reference (`TorchReference`, launch/torch_reference.py) exists for the LoRA settings only; DA-LoRA (K=3) is
ours alone.

Threads: by default both runtimes use every CPU the process may use (torch.set_num_threads; XLA sizes its pool
from the CPU affinity). On a machine shared with other jobs, a worker thread that the OS deschedules stalls
every parallel region of torch's OpenMP pool much more than XLA's work-stealing pool, so with N threads on N busy
cores the reference is slowed far more than ours; `--threads 1` pins both to one CPU. The JSON records the load
average before and after the run.

Allocator: the script re-executes itself under tcmalloc when it is installed (adaptface_jax/runtime.py), so both
stacks share it; the report says which malloc ran. With glibc's, XLA:CPU page-faults its step buffers in again
every step (the ViT-S/14 224 px train step ran at 0.35x of the reference instead of 0.66x).

What is timed, per setting, in one process, alternating ours / reference (A B A B ...) round after round, the
median over rounds reported:
  train  one optimizer step on a batch already on the device: uint8 [B, 112, 112, 3] -> /255 -> bicubic resize to
         the setting's size (inside the step, on both sides) -> normalise -> ViT with LoRA r=16 alpha=16 on the
         attention projections -> Linear d->512 -> CosFace (s=64, m=0.35, normalised centres, 1000 classes) ->
         backward -> global-norm clipping at 5 -> AdamW (lr 1e-4, weight decay 0.05 on matrices only) over the
         trainable parameters only. (The bicubic kernels differ slightly, a = -0.5 in jax.image.resize and
         -0.75 in torch; the cost is the same.) At 112 px DINOv2 needs no resize; both sides interpolate its
         37x37 position table to the 8x8 grid inside the step.
  embed  forward-only embedding extraction as in verification: the batch and its horizontal flip (2B images),
         eval mode, no gradient, raw 512-d head outputs.
Ours is `train.jit_train_step` (state donated) and `embeddings.make_embed_fn`, the batch sharded over every JAX
device as in training: on CPU one device per core (`runtime.use_cpu_devices`; ADAPTFACE_CPU_DEVICES=1 runs ours
on a single device). Compile time (trace, lower and compile) and the first call are reported apart from the
steady state. The reference runs eagerly (no torch.compile): its first call is reported, it has no compile step.

LoRA targets: ours adapts the fused qkv kernel (one A [d, r] and one B [r, 3d]) and the attention output; peft
adapts HF's separate q, k, v and output projections (q_proj, k_proj, v_proj and o_proj / out_proj), i.e. three A
matrices where ours has one: 36,864 vs 49,152 LoRA parameters per ViT-S block, and slightly fewer FLOPs for ours
(counted below for each side's own layout).

Model FLOPs (2 per multiply-add; matmuls and attention only: LayerNorm, softmax, GELU, biases, the resize, the
normalisation and the optimizer update are elementwise and left out). Per image, N = (S/p)^2 patches, T = N + 1
tokens, width d, MLP width m, L blocks, LoRA rank R = K*r (K = 1 for LoRA), embedding E = 512, C classes:
  patch embedding   2 N (3 p^2) d
  frozen linears    L * 2T (3d^2 + d^2 + 2dm)              qkv, output projection, fc1, fc2
  attention         L * 4 T^2 d                             QK^T and PV
  LoRA              L * 12 T d R  (ours: fused qkv 2T(dR + 3dR), proj 2T(2dR))
                    L * 16 T d R  (peft: q, k, v, o each 2T(2dR))
  head, margin      2 d E, 2 E C
  DA-LoRA router    2(d H + H K), H = 256; router input frozen_cls adds a whole frozen forward (patch embedding,
                    frozen linears and attention, no LoRA, no backward); patch_mean reuses the patch embedding
                    (counted once, as the backbone needs it anyway)
The backward that is needed (frozen weights get no gradient): input gradients through every frozen linear
(1x its forward) and through attention (2x: dQ, dK, dP, dV), LoRA weight and input gradients (2x the LoRA
forward), except the input gradient of block 0's qkv (frozen and LoRA A: nothing trainable lies below it); the
head and the margin 2x their forward (weights and inputs); the router's weight gradients. Train FLOPs per step
= B x (forward + backward); embed FLOPs = 2B x forward (no margin).
MFU = model FLOPs / step time / matmul peak, the peak measured here in the same run for the compute dtype
(a large jnp matmul and a large torch matmul, the best of either). On NVIDIA GPUs XLA computes float32 dots
with TF32 by default; the reference is set to do the same (torch.backends.cuda.matmul.allow_tf32).
With --dtype bfloat16 ours computes in bfloat16 (parameters stay float32) and the reference runs under
torch.autocast(bfloat16), the same mixed-precision scheme.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# On a GPU, JAX would take 75% of its memory at start; the reference shares the card in this process.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if __name__ == "__main__":  # both stacks run under tcmalloc when it is installed (see adaptface_jax/runtime.py)
  from adaptface_jax import runtime  # noqa: E402
  runtime.use_tcmalloc()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch_reference import (  # noqa: E402
  COSFACE_MARGIN,
  COSFACE_SCALE,
  EMBEDDING_DIM,
  LORA_ALPHA,
  LORA_RANK,
  NUM_CLASSES,
  TorchReference,
)

from adaptface_jax import embeddings, run_state, runtime, sharding, train, trainable_rules  # noqa: E402
from adaptface_jax.models import face_model, hf_weights  # noqa: E402
from adaptface_jax.models.vit import ViTConfig  # noqa: E402
from configs import common  # noqa: E402

INPUT_SIZE = 112  # faces arrive at 112 px on both sides; each step resizes on the device
NUM_DOMAINS = 3
ROUTER_HIDDEN = 256


@dataclasses.dataclass(frozen=True)
class Setting:
  name: str  # "<group>/<variant>", e.g. "dino112/lora"
  backbone: str  # "dino" | "clip"
  image_size: int
  batch_size: int
  adapter: str  # "lora" | "dalora"
  router_input: str | None = None  # DA-LoRA only: "patch_mean" | "frozen_cls"

  @property
  def group(self) -> str:
    return self.name.split("/")[0]

  @property
  def has_reference(self) -> bool:
    return self.adapter == "lora"


def all_settings(quick: bool) -> list[Setting]:
  out = []
  for backbone, size, batch in (("dino", 112, 64), ("dino", 224, 32), ("clip", 224, 16)):
    batch = 4 if quick else batch
    group = f"{backbone}{size}"
    out.append(Setting(f"{group}/lora", backbone, size, batch, "lora"))
    # CLIP with the default router input only: the dino settings show what frozen_cls (a frozen forward) adds.
    for router_input in ("patch_mean", "frozen_cls") if backbone == "dino" else ("patch_mean",):
      out.append(Setting(f"{group}/dalora_{router_input}", backbone, size, batch, "dalora", router_input))
  return out


def select_settings(settings: list[Setting], spec: str | None) -> list[Setting]:
  if not spec:
    return settings
  wanted = [s.strip() for s in spec.split(",") if s.strip()]
  known = {s.name for s in settings} | {s.group for s in settings}
  unknown = [w for w in wanted if w not in known]
  if unknown:
    raise SystemExit(f"--settings: unknown {unknown}; choose among {sorted(known)}")
  return [s for s in settings if s.name in wanted or s.group in wanted]


# ------------------------------------------------------------------------------------------------- FLOP count


def vit_flops(vit: ViTConfig, *, image_size: int, batch: int, train_step: bool, lora_layout: str,
              num_domains: int = 1, router_input: str | None = None) -> dict[str, float]:
  """Model FLOPs of one call (formula in the module docstring). lora_layout: "fused_qkv" (ours) or
  "separate_qkv" (peft). Returns {"forward", "backward", "total"} for the whole batch."""
  p, d, m, depth = vit.patch_size, vit.hidden_size, vit.mlp_dim, vit.num_layers
  patches = (image_size // p) ** 2
  tokens = patches + 1
  rank = num_domains * LORA_RANK
  patch = 2 * patches * 3 * p * p * d
  frozen_linear = 2 * tokens * (4 * d * d + 2 * d * m)
  attention = 4 * tokens * tokens * d
  if lora_layout == "fused_qkv":
    lora = 2 * tokens * (d * rank + rank * 3 * d) + 2 * tokens * 2 * d * rank
    lora_below_block0 = 2 * tokens * rank * d  # block 0's x @ A input gradient: one A
  elif lora_layout == "separate_qkv":
    lora = 4 * 2 * tokens * 2 * d * rank
    lora_below_block0 = 3 * 2 * tokens * rank * d  # three A's (q, k, v)
  else:
    raise ValueError(f"lora_layout {lora_layout!r}: use 'fused_qkv' or 'separate_qkv'")
  head = 2 * d * EMBEDDING_DIM
  margin = 2 * EMBEDDING_DIM * NUM_CLASSES if train_step else 0
  router = router_backward = 0
  if num_domains > 1:
    router = 2 * (d * ROUTER_HIDDEN + ROUTER_HIDDEN * num_domains)
    router_backward = 2 * d * ROUTER_HIDDEN + 4 * ROUTER_HIDDEN * num_domains
    if router_input == "frozen_cls":
      router += patch + depth * (frozen_linear + attention)

  forward = patch + depth * (frozen_linear + attention + lora) + router + head + margin
  backward = 0
  if train_step:
    backward = (depth * (frozen_linear + 2 * attention + 2 * lora) - 2 * tokens * 3 * d * d - lora_below_block0
                + router_backward + 2 * head + 2 * margin)
  images = batch if train_step else 2 * batch  # embedding extraction also embeds the flips
  return {"forward": float(images * forward), "backward": float(images * backward),
          "total": float(images * (forward + backward))}


# ------------------------------------------------------------------------------------------------ matmul peak


def matmul_peak(dtype: str, size: int, torch_device: torch.device | None, repeats: int = 5) -> dict[str, float]:
  """FLOP/s of the best of `repeats` [size x size] @ [size x size] matmuls, for jnp and torch."""
  flops = 2.0 * size ** 3
  out = {}
  rng = np.random.RandomState(0)
  a_np, b_np = rng.randn(size, size).astype(np.float32), rng.randn(size, size).astype(np.float32)
  jax_dtype = face_model.DTYPES[dtype]
  a, b = jnp.asarray(a_np, jax_dtype), jnp.asarray(b_np, jax_dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(matmul(a, b))
  out["jax"] = flops / best_time(lambda: jax.block_until_ready(matmul(a, b)), repeats)
  if torch_device is not None:
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    ta = torch.from_numpy(a_np).to(torch_device, torch_dtype)
    tb = torch.from_numpy(b_np).to(torch_device, torch_dtype)
    sync = lambda: torch.cuda.synchronize() if torch_device.type == "cuda" else None
    with torch.inference_mode():
      torch.matmul(ta, tb)
      sync()

      def call():
        torch.matmul(ta, tb)
        sync()
      out["torch"] = flops / best_time(call, repeats)
  return out


def best_time(fn: Callable[[], Any], repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


# ------------------------------------------------------------------------------------------------- our stack


def xla_flops(compiled) -> float | None:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
    analysis = analysis[0] if analysis else {}
  return float(analysis["flops"]) if analysis and "flops" in analysis else None


class OursStack:
  """This project's jitted train step and embedding function for one setting."""

  def __init__(self, setting: Setting, *, quick: bool, dtype: str, batch: dict[str, np.ndarray]):
    arg = "tiny" if quick else ""
    if setting.router_input:
      arg = ",".join(filter(None, [arg, f"router_input={setting.router_input}"]))
    config = common.experiment(setting.backbone, setting.adapter, arg)
    config.model.random_init = True
    config.model.image_size = setting.image_size
    config.model.dtype = dtype
    if setting.adapter == "dalora":
      assert config.adapter.num_domains == NUM_DOMAINS
    # The figures below (rank, alpha, margin, optimizer) are the recipe's; fail loudly if the config drifts.
    assert (config.adapter.rank, config.adapter.alpha) == (LORA_RANK, LORA_ALPHA)
    assert (config.loss.scale, config.loss.m3, config.model.embedding_dim) == (COSFACE_SCALE, COSFACE_MARGIN,
                                                                               EMBEDDING_DIM)
    model, state, frozen, tx, schedule = run_state.setup(config, NUM_CLASSES, steps=1000)
    # As in training: parameters replicated and the batch sharded over every device (on CPU, one per core).
    mesh = sharding.data_mesh()
    replicated, batch_sharding = sharding.shardings(mesh)
    state, frozen = jax.device_put((state, frozen), replicated)
    self.vit: ViTConfig = model.vit
    self.backbone_source = config.model.backbone  # the preset name; the reference is built from the same one
    self.num_domains = model.num_domains
    self.trainable_params = int(sum(np.size(x) for x in jax.tree.leaves(state.trainable)))
    self.batch = jax.device_put(batch, batch_sharding)
    self.frozen = frozen
    # Separate copies: the train step donates (and so deletes) the state's buffers.
    self.embed_variables, _ = face_model.split_margin(trainable_rules.merge(jax.tree.map(jnp.copy, state.trainable),
                                                                            frozen))
    self.state = state

    start = time.perf_counter()
    step = train.jit_train_step(model, tx, schedule, config.loss, mesh)
    self._step = step.lower(self.state, self.frozen, self.batch).compile()
    self.train_compile_s = time.perf_counter() - start
    start = time.perf_counter()
    embed = embeddings.make_embed_fn(model)
    self._embed = embed.lower(self.embed_variables, self.batch["image"], self.batch["domain"]).compile()
    self.embed_compile_s = time.perf_counter() - start
    # XLA's own count for the compiled programs (dots and elementwise ops): a check on the analytic count. It
    # counts one device's program; each device runs its share of the batch.
    self.xla_flops = {kind: flops and flops * mesh.size
                      for kind, flops in (("train", xla_flops(self._step)), ("embed", xla_flops(self._embed)))}

  def train(self, steps: int) -> None:
    for _ in range(steps):
      self.state, metrics = self._step(self.state, self.frozen, self.batch)
    jax.block_until_ready((self.state, metrics))

  def embed(self, steps: int) -> None:
    for _ in range(steps):
      jax.block_until_ready(self._embed(self.embed_variables, self.batch["image"], self.batch["domain"]))


# ----------------------------------------------------------------------------------------------------- driver


def make_batch(batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.RandomState(seed)
  return {"image": rng.randint(0, 256, (batch_size, INPUT_SIZE, INPUT_SIZE, 3), dtype=np.uint8),
          "label": rng.randint(0, NUM_CLASSES, (batch_size,)).astype(np.int32),
          "domain": rng.randint(0, NUM_DOMAINS, (batch_size,)).astype(np.int32)}


def log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def timed(fn: Callable[[int], None], steps: int) -> float:
  start = time.perf_counter()
  fn(steps)
  return (time.perf_counter() - start) / steps


def pin_threads(threads: int | None) -> int:
  """Restricts the process to `threads` of its CPUs (XLA sizes its pool from the affinity when its CPU client
  starts, so this must run before the first JAX computation) and gives torch as many threads. Returns the count."""
  allowed = sorted(os.sched_getaffinity(0))
  if threads is not None:
    if not 1 <= threads <= len(allowed):
      raise SystemExit(f"--threads {threads}: this process may use {len(allowed)} CPU(s) ({allowed})")
    allowed = allowed[:threads]
    os.sched_setaffinity(0, allowed)
  torch.set_num_threads(len(allowed))
  return len(allowed)


def run(args) -> dict:
  threads = pin_threads(args.threads)
  settings = select_settings(all_settings(args.quick), args.settings)
  runtime.use_cpu_devices(math.gcd(*(s.batch_size for s in settings)))
  load_before = os.getloadavg()
  torch_device = None
  if args.reference:
    torch_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch_device.type == "cuda":
      torch.backends.cuda.matmul.allow_tf32 = True  # XLA's default for float32 dots on NVIDIA GPUs
      torch.backends.cudnn.allow_tf32 = True
  jax_device = jax.devices()[0]
  on_gpu = jax_device.platform == "gpu"
  if args.reference and on_gpu and torch_device.type != "cuda":
    raise SystemExit("JAX runs on a GPU but this torch build has no CUDA: a GPU-vs-CPU ratio means nothing. "
                     "Install a CUDA torch, or pass --no-reference")
  if args.steps is None:
    args.steps = 20 if on_gpu else 1
  autocast_dtype = torch.bfloat16 if args.dtype == "bfloat16" else None
  log(f"jax {jax.__version__} on {jax_device.device_kind} ({jax_device.platform}); torch {torch.__version__} "
      f"on {torch_device}; {threads} CPU thread(s), {len(jax.devices())} JAX device(s), load average "
      f"{load_before[0]:.2f}; our dtype {args.dtype}; {len(settings)} settings, "
      f"{args.rounds} round(s) of {args.steps} step(s)")

  peak_size = 8192 if on_gpu else 2048
  peak_dtypes = sorted({"float32", args.dtype})
  peaks = {dt: matmul_peak(dt, peak_size, torch_device) for dt in peak_dtypes}

  stacks: dict[str, dict[str, Any]] = {}
  for setting in settings:
    batch = make_batch(setting.batch_size)
    log(f"building {setting.name} (batch {setting.batch_size}, {setting.image_size} px)")
    ours = OursStack(setting, quick=args.quick, dtype=args.dtype, batch=batch)
    entry = {"ours": ours, "reference": None}
    if setting.has_reference and args.reference:
      entry["reference"] = TorchReference(hf_weights.PRESETS[ours.backbone_source],
                                          image_size=setting.image_size, batch=batch, device=torch_device,
                                          autocast_dtype=autocast_dtype)
    stacks[setting.name] = entry
    log(f"  compiled: train {ours.train_compile_s:.1f} s, embed {ours.embed_compile_s:.1f} s")

  first_call: dict[tuple[str, str, str], float] = {}
  times: dict[tuple[str, str, str], list[float]] = {}
  for name, entry in stacks.items():  # first calls, reported apart; also warms caches before the rounds
    for kind in ("train", "embed"):
      for side in ("ours", "reference"):
        if entry[side] is not None:
          first_call[(name, kind, side)] = timed(getattr(entry[side], kind), 1)
          times[(name, kind, side)] = []
  for round_index in range(args.rounds):
    for name, entry in stacks.items():
      for kind in ("train", "embed"):
        for side in ("ours", "reference"):  # A then B, every round: drifts of a shared machine hit both
          if entry[side] is not None:
            times[(name, kind, side)].append(timed(getattr(entry[side], kind), args.steps))
        line = " ".join(f"{side} {times[(name, kind, side)][-1]:.3f}s" for side in ("ours", "reference")
                        if (name, kind, side) in times)
        log(f"[round {round_index + 1}/{args.rounds}] {name} {kind}: {line}")
  peaks_after = {dt: matmul_peak(dt, peak_size, torch_device) for dt in peak_dtypes}
  peak = {dt: max(list(peaks[dt].values()) + list(peaks_after[dt].values())) for dt in peak_dtypes}

  results = {}
  for setting in settings:
    entry = stacks[setting.name]
    ours = entry["ours"]
    result: dict[str, Any] = {"backbone": setting.backbone, "image_size": setting.image_size,
                              "batch_size": setting.batch_size, "adapter": setting.adapter,
                              "router_input": setting.router_input,
                              "trainable_params": {"ours": ours.trainable_params}}
    if entry["reference"] is not None:
      result["trainable_params"]["reference"] = entry["reference"].trainable_params
    for kind in ("train", "embed"):
      images = setting.batch_size
      figures: dict[str, Any] = {}
      for side, layout in (("ours", "fused_qkv"), ("reference", "separate_qkv")):
        if entry[side] is None:
          continue
        step_s = statistics.median(times[(setting.name, kind, side)])
        flops = vit_flops(ours.vit, image_size=setting.image_size, batch=setting.batch_size,
                          train_step=kind == "train", lora_layout=layout, num_domains=ours.num_domains,
                          router_input=setting.router_input)
        side_peak = peak[args.dtype]
        figures[side] = {"step_s": step_s, "images_per_s": images / step_s, "first_call_s":
                         first_call[(setting.name, kind, side)], "flops_per_step": flops["total"],
                         "flops_forward": flops["forward"], "flops_backward": flops["backward"],
                         "achieved_flops_per_s": flops["total"] / step_s,
                         "mfu": flops["total"] / step_s / side_peak,
                         "all_step_s": times[(setting.name, kind, side)]}
      figures["ours"]["compile_s"] = ours.train_compile_s if kind == "train" else ours.embed_compile_s
      figures["ours"]["xla_cost_analysis_flops"] = ours.xla_flops[kind]
      if "reference" in figures:
        figures["ours_over_reference"] = figures["ours"]["images_per_s"] / figures["reference"]["images_per_s"]
      result[kind] = figures
    results[setting.name] = result

  dalora_ratios = {}
  for setting in settings:
    lora_name = f"{setting.group}/lora"
    if setting.adapter != "dalora" or lora_name not in results:
      continue
    ratio = {}
    for kind in ("train", "embed"):
      mine, base = results[setting.name][kind]["ours"], results[lora_name][kind]["ours"]
      ratio[kind] = {"time": mine["step_s"] / base["step_s"], "flops": mine["flops_per_step"] / base["flops_per_step"]}
    dalora_ratios[setting.name] = ratio

  return {"device": {"jax": f"{jax_device.device_kind} ({jax_device.platform})",
                     "torch": str(torch_device) if torch_device else None, "cpu_threads": threads,
                     "jax_devices": len(jax.devices()),
                     "cpu_count": os.cpu_count(),
                     "allocator": "tcmalloc" if runtime.tcmalloc_preloaded() else "system"},
          # 1-minute load averages: other jobs on the machine (each side suffers from them differently).
          "load_average": {"start": load_before[0], "end": os.getloadavg()[0]},
          "versions": {"jax": jax.__version__, "torch": torch.__version__},
          "dtype": args.dtype, "rounds": args.rounds, "steps_per_timing": args.steps, "quick": args.quick,
          "matmul_peak_flops": {dt: {"measured_start": peaks[dt], "measured_end": peaks_after[dt], "used": peak[dt]}
                                for dt in peak_dtypes},
          "peak_matrix_size": peak_size,
          "settings": results, "dalora_over_lora": dalora_ratios}


def _fmt(value: float | None, spec: str, factor: float = 1.0) -> str:
  return "-" if value is None else format(value * factor, spec)


def format_table(report: dict) -> str:
  peak = report["matmul_peak_flops"][report["dtype"]]["used"]
  measured = report["matmul_peak_flops"][report["dtype"]]
  by_stack = ", ".join(f"{stack} {max(measured['measured_start'][stack], measured['measured_end'][stack]) / 1e9:.1f}"
                       for stack in measured["measured_start"])
  device, load = report["device"], report["load_average"]
  lines = [f"device: jax {device['jax']}, torch {device['torch']}; our dtype {report['dtype']}; "
           f"median of {report['rounds']} round(s) x {report['steps_per_timing']} step(s); {device['cpu_threads']} "
           f"CPU thread(s), {device['jax_devices']} JAX device(s), {device['allocator']} malloc, load average "
           f"{load['start']:.2f} at start, {load['end']:.2f} at end",
           f"{report['dtype']} matmul peak used for MFU: {peak / 1e9:.1f} GFLOP/s (measured, "
           f"{report['peak_matrix_size']}^2: {by_stack})"]
  header = (f"{'setting':<26} {'kind':<5} {'ours img/s':>10} {'ref img/s':>10} {'ours/ref':>8} {'compile s':>9} "
            f"{'1st ours':>8} {'1st ref':>8} {'GFLOP ours':>10} {'GFLOP ref':>10} {'MFU ours':>8} {'MFU ref':>8}")
  lines += [header, "-" * len(header)]
  for name, result in report["settings"].items():
    for kind in ("train", "embed"):
      f = result[kind]
      ours, ref = f["ours"], f.get("reference") or {}
      lines.append(
          f"{name:<26} {kind:<5} {ours['images_per_s']:>10.2f} {_fmt(ref.get('images_per_s'), '.2f'):>10} "
          f"{_fmt(f.get('ours_over_reference'), '.2f'):>8} {ours['compile_s']:>9.1f} {ours['first_call_s']:>8.2f} "
          f"{_fmt(ref.get('first_call_s'), '.2f'):>8} {ours['flops_per_step'] / 1e9:>10.1f} "
          f"{_fmt(ref.get('flops_per_step'), '.1f', 1e-9):>10} {_fmt(ours['mfu'], '.1%'):>8} "
          f"{_fmt(ref.get('mfu'), '.1%'):>8}")
  lines.append("(img/s: images of the batch per second; embed also embeds each flip, so it processes 2x img/s)")
  deviations = [f[k]["ours"]["xla_cost_analysis_flops"] / f[k]["ours"]["flops_per_step"] - 1
                for f in report["settings"].values() for k in ("train", "embed")
                if f[k]["ours"]["xla_cost_analysis_flops"]]
  if deviations:
    lines.append(f"(XLA's cost analysis of our compiled programs, elementwise ops included, counts "
                 f"{min(deviations):+.1%} to {max(deviations):+.1%} FLOPs against the analytic model count)")
  if report["dalora_over_lora"]:
    lines += ["", f"{'DA-LoRA K=3 / LoRA (ours)':<26} {'train time':>10} {'train FLOP':>10} {'embed time':>10} "
                  f"{'embed FLOP':>10}"]
    for name, ratio in report["dalora_over_lora"].items():
      lines.append(f"{name:<26} {ratio['train']['time']:>10.2f} {ratio['train']['flops']:>10.2f} "
                   f"{ratio['embed']['time']:>10.2f} {ratio['embed']['flops']:>10.2f}")
  params = {name: r["trainable_params"] for name, r in report["settings"].items() if r["adapter"] == "lora"}
  if params:
    lines += ["", "trainable parameters (LoRA + head + centres): " + "; ".join(
        f"{name}: ours {p['ours']:,}" + (f", reference {p['reference']:,}" if "reference" in p else "")
        for name, p in params.items())]
  return "\n".join(lines)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--settings", help="comma-separated setting names or groups (dino112, dino224, clip224, "
                                         "dino112/dalora_frozen_cls, ...); default: all")
  parser.add_argument("--rounds", type=int, default=None, help="A/B rounds (default 3, --quick 1)")
  parser.add_argument("--steps", type=int, default=None,
                      help="calls per timing (default 1 on CPU, 20 on a GPU, where one step takes milliseconds)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="our compute dtype (config.model.dtype); the reference uses autocast to match")
  parser.add_argument("--quick", action="store_true", help="tiny 2-layer ViTs, batch 4, 1 round: a smoke check")
  parser.add_argument("--no-reference", dest="reference", action="store_false",
                      help="time ours only (e.g. on a GPU whose torch build has no CUDA)")
  parser.add_argument("--threads", type=int, default=None,
                      help="pin the process to N CPUs, N torch threads (default: every CPU it may use). On a "
                           "shared machine, 1 keeps both runtimes from waiting on a descheduled worker thread")
  parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (the table goes to stderr)")
  args = parser.parse_args(argv)
  if args.rounds is None:
    args.rounds = 1 if args.quick else 3
  if args.rounds < 1 or (args.steps is not None and args.steps < 1):
    parser.error(f"--rounds and --steps must be >= 1, got {args.rounds} and {args.steps}")
  return args


def main(argv=None):
  args = parse_args(argv)
  report = run(args)
  table = format_table(report)
  if args.json:
    print(table, file=sys.stderr)
    print(json.dumps(report, indent=2))
  else:
    print(table)


if __name__ == "__main__":
  main()
