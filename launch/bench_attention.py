"""Attention as the model computes it (softmax normalised after the matmul) vs softmax-then-matmul, in one run.

  python launch/bench_attention.py [--repeats 10]

Settings: ViT-S/14 at 112 px (T = 65, batch 64) and 224 px (T = 257, batch 32), ViT-B/16 at 224 px (T = 197,
batch 16). Prints GFLOP/s of the two score matmuls (forward; x3 for forward + backward) for each form and the
ratio ours / textbook.
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
  print(f"{'setting':<12} {'pass':<9} {'textbook GFLOP/s':>17} {'ours GFLOP/s':>13} {'speed-up':>9}")
  for name, (batch, heads, tokens, dim) in SETTINGS.items():
    q, k, v = (jnp.asarray(np.random.RandomState(i).randn(batch, heads, tokens, dim) * 0.5, jnp.float32)
               for i in range(3))
    forms = {"textbook": attention.softmax_attention, "ours": attention.attention}
    flops = 4 * batch * heads * tokens * tokens * dim
    for kind, factor in (("forward", 1), ("fwd+bwd", 3)):
      speed = {}
      for form, fn in forms.items():
        if kind == "fwd+bwd":
          # A loss whose gradient needs the output, so that the forward pass cannot be pruned away.
          fn = jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2))
        speed[form] = factor * flops / timed(jax.jit(fn), q, k, v, repeats=args.repeats) / 1e9
      print(f"{name:<12} {kind:<9} {speed['textbook']:17.1f} {speed['ours']:13.1f} "
            f"{speed['ours'] / speed['textbook']:8.2f}x")


if __name__ == "__main__":
  main()
