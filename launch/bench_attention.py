"""Batched vs chunked attention (adaptface_jax.attention), forward and forward + backward, in one run.

  python launch/bench_attention.py [--repeats 10]

Settings: ViT-S/14 at 112 px (T = 65, batch 64) and 224 px (T = 257, batch 32), ViT-B/16 at 224 px (T = 197,
batch 16). Prints GFLOP/s (the two score matmuls; the chunked backward's recomputation is not counted) and the
chunked / batched speed ratio. The model picks the chunked form on CPU from T >= 128.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import jax
import jax.numpy as jnp
import numpy as np

from adaptface_jax import attention
from launch.bench_adapter import timed

SETTINGS = {"vit_s14_112": (64, 6, 65, 64), "vit_s14_224": (32, 6, 257, 64), "vit_b16_224": (16, 12, 197, 64)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args()
  print(f"device: {jax.devices()[0].device_kind}")
  print(f"{'setting':<12} {'pass':<9} {'batched GFLOP/s':>16} {'chunked GFLOP/s':>16} {'speed-up':>9}")
  for name, (batch, heads, tokens, dim) in SETTINGS.items():
    q, k, v = (jnp.asarray(np.random.RandomState(i).randn(batch, heads, tokens, dim) * 0.5, jnp.float32)
               for i in range(3))
    size = attention.chunk_size(batch, heads, tokens)
    forms = {"batched": attention.batched_attention,
             "chunked": lambda q, k, v: attention.chunked_attention(q, k, v, size)}
    flops = 4 * batch * heads * tokens * tokens * dim
    for kind, factor in (("forward", 1), ("fwd+bwd", 3)):
      speed = {}
      for form, fn in forms.items():
        if kind == "fwd+bwd":
          fn = jax.grad(lambda q, k, v, fn=fn: fn(q, k, v).sum(), argnums=(0, 1, 2))
        speed[form] = factor * flops / timed(jax.jit(fn), q, k, v, repeats=args.repeats) / 1e9
      print(f"{name:<12} {kind:<9} {speed['batched']:16.1f} {speed['chunked']:16.1f} "
            f"{speed['chunked'] / speed['batched']:8.2f}x")


if __name__ == "__main__":
  main()
