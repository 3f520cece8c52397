"""Forward time of one adapted Dense layer relative to the plain frozen Dense (prints figures and ratios).

  python launch/bench_adapter.py [--batch 64 --tokens 65 --width 384 --rank 16 --domains 3]

Layers timed in one run, interleaved, median of repeats: the frozen Dense, LoRA (K=1) and DA-LoRA (K domains
mixed per image as one rank-K*r product), for the fused qkv (d -> 3d) and the attention output proj (d -> d).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import jax
import jax.numpy as jnp
import numpy as np

from adaptface_jax.models.lora import AdaptedDense, AdapterSpec


def timed(fn, *args, repeats):
  jax.block_until_ready(fn(*args))  # compile + warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--tokens", type=int, default=65)
  parser.add_argument("--width", type=int, default=384)
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--domains", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=50)
  args = parser.parse_args()
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(args.batch, args.tokens, args.width), jnp.float32)
  w = jnp.asarray(rng.dirichlet(np.ones(args.domains), size=args.batch), jnp.float32)
  print(f"device: {jax.devices()[0].device_kind}; x = [{args.batch}, {args.tokens}, {args.width}], "
        f"rank {args.rank}, K = {args.domains}")
  print(f"{'layer':<6} {'variant':<12} {'ms':>8} {'vs frozen':>10}")
  for name, features in (("qkv", 3 * args.width), ("proj", args.width)):
    variants = {"frozen": (None, ()), "lora": (AdapterSpec(rank=args.rank, alpha=args.rank, targets=(name,)), (None,)),
                f"dalora_k{args.domains}": (AdapterSpec(rank=args.rank, alpha=args.rank, num_domains=args.domains,
                                                        targets=(name,)), (None,))}
    fns = {}
    for variant, (spec, slices) in variants.items():
      layer = AdaptedDense(features, spec=spec, adapted_slices=slices)
      variables = layer.init(jax.random.key(0), x, w)
      # Non-zero B so that nothing is constant-folded away.
      variables = jax.tree.map(lambda v: v + 0.01, variables)
      fns[variant] = (jax.jit(lambda v, x, w, layer=layer: layer.apply(v, x, w)), variables)
    results = {variant: [] for variant in fns}
    for _ in range(3):  # interleave so that machine noise hits all variants alike
      for variant, (fn, variables) in fns.items():
        results[variant].append(timed(fn, variables, x, w, repeats=args.repeats))
    base = np.median(results["frozen"])
    for variant, times in results.items():
      t = np.median(times)
      print(f"{name:<6} {variant:<12} {1e3 * t:8.3f} {t / base:9.2f}x")


if __name__ == "__main__":
  main()
