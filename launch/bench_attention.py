"""Attention as the model computes it (softmax normalised after the matmul) vs softmax-then-matmul, in one run,
and PyTorch's fused `scaled_dot_product_attention` beside them when torch is installed.

  python launch/bench_attention.py [--repeats 10]

Settings: ViT-S/14 at 112 px (T = 65, batch 64) and 224 px (T = 257, batch 32), ViT-B/16 at 224 px (T = 197,
batch 16). Prints GFLOP/s of the two score matmuls (forward; x3 for forward + backward) for each form and the
ratio ours / textbook. As in training, the batch is sharded over the JAX devices (on CPU one per core, see
adaptface_jax/runtime.py) and the process runs under tcmalloc when it is installed.
"""

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import jax
import jax.numpy as jnp
import numpy as np

from adaptface_jax import runtime, sharding
from adaptface_jax.models import attention
from launch.bench_adapter import timed

SETTINGS = {"vit_s14_112": (64, 6, 65, 64), "vit_s14_224": (32, 6, 257, 64), "vit_b16_224": (16, 12, 197, 64)}


def torch_sdpa_seconds(q, k, v, backward: bool, repeats: int) -> float | None:
  """Median seconds of torch's scaled_dot_product_attention (forward, or forward + backward); None without torch."""
  try:
    import torch
  except ImportError:
    return None
  torch.set_num_threads(runtime.usable_cpus())
  q, k, v = (torch.from_numpy(np.array(x)).requires_grad_(backward) for x in (q, k, v))

  def run():
    if backward:
      (torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=1.0) ** 2).sum().backward()
    else:
      with torch.no_grad():
        torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=1.0)

  return timed(run, repeats=repeats)  # run() returns None, which timed's jax.block_until_ready passes through


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args()
  runtime.use_tcmalloc()
  runtime.use_cpu_devices(math.gcd(*(batch for batch, *_ in SETTINGS.values())))
  batch_sharding = sharding.shardings(sharding.data_mesh())[1]
  print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}")
  print(f"{'setting':<12} {'pass':<9} {'textbook GFLOP/s':>17} {'ours GFLOP/s':>13} {'speed-up':>9} "
        f"{'torch sdpa GFLOP/s':>19}")
  for name, (batch, heads, tokens, dim) in SETTINGS.items():
    q, k, v = (jax.device_put(np.asarray(np.random.RandomState(i).randn(batch, heads, tokens, dim) * 0.5,
                                         np.float32), batch_sharding) for i in range(3))
    forms = {"textbook": attention.softmax_attention, "ours": attention.attention}
    flops = 4 * batch * heads * tokens * tokens * dim
    for kind, factor in (("forward", 1), ("fwd+bwd", 3)):
      speed = {}
      for form, fn in forms.items():
        if kind == "fwd+bwd":
          # A loss whose gradient needs the output, so that the forward pass cannot be pruned away.
          fn = jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2))
        speed[form] = factor * flops / timed(jax.jit(fn), q, k, v, repeats=args.repeats) / 1e9
      torch_s = torch_sdpa_seconds(q, k, v, kind == "fwd+bwd", args.repeats)
      torch_speed = f"{factor * flops / torch_s / 1e9:19.1f}" if torch_s else f"{'-':>19}"
      print(f"{name:<12} {kind:<9} {speed['textbook']:17.1f} {speed['ours']:13.1f} "
            f"{speed['ours'] / speed['textbook']:8.2f}x {torch_speed}")


if __name__ == "__main__":
  main()
