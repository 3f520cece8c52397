"""The attention implementations of adaptface_jax/models/attention.py side by side on this machine's backend, and
PyTorch's fused `scaled_dot_product_attention` beside them when torch is installed (CPU only).

  python launch/bench_attention.py [--repeats 10] [--dtype bfloat16] [--implementations grouped,xla]

Settings: ViT-S/14 at 112 px (T = 65, batch 64) and 224 px (T = 257, batch 32), ViT-B/16 at 224 px (T = 197,
batch 16). Inputs are [B, T, N, H], as the model passes them. Prints GFLOP/s of the two score matmuls (forward;
x3 for forward + backward) for each implementation and its speed over the first one listed: the choice of
`attention.default_implementation` for a backend should be the fastest there. As in training, the batch is
sharded over the JAX devices (on CPU one per core, see adaptface_jax/runtime.py) and the process runs under
tcmalloc when it is installed.
"""

import argparse
import functools
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


def torch_sdpa_seconds(q, k, v, backward: bool, repeats: int, scale: float) -> float | None:
  """Median seconds of torch's scaled_dot_product_attention (forward, or forward + backward); None without torch."""
  try:
    import torch
  except ImportError:
    return None
  torch.set_num_threads(runtime.usable_cpus())
  # torch wants heads-major [B, N, T, H].
  dtype = torch.bfloat16 if q.dtype == jnp.bfloat16 else torch.float32
  q, k, v = (torch.from_numpy(np.array(x, np.float32)).to(dtype).transpose(1, 2).contiguous().requires_grad_(backward)
             for x in (q, k, v))

  def run():
    if backward:
      (torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale).float() ** 2).sum().backward()
    else:
      with torch.no_grad():
        torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)

  return timed(run, repeats=repeats)  # run() returns None, which timed's jax.block_until_ready passes through


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--implementations", default=None,
                      help="comma-separated, from attention.IMPLEMENTATIONS (default: grouped,xla; on GPU also cudnn)")
  args = parser.parse_args()
  runtime.use_tcmalloc()
  runtime.use_cpu_devices(math.gcd(*(batch for batch, *_ in SETTINGS.values())))
  batch_sharding = sharding.shardings(sharding.data_mesh())[1]
  on_cpu = jax.default_backend() == "cpu"
  implementations = (args.implementations.split(",") if args.implementations
                     else ["grouped", "xla"] + ([] if on_cpu else ["cudnn"]))
  dtype = jnp.dtype(args.dtype)
  print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}; {args.dtype}")
  print(f"{'setting':<12} {'pass':<9}" + "".join(f" {name + ' GFLOP/s':>16} {'x':>6}" for name in implementations)
        + (f" {'torch sdpa GFLOP/s':>19}" if on_cpu else ""))
  for name, (batch, heads, tokens, dim) in SETTINGS.items():
    q, k, v = (jax.device_put(np.asarray(np.random.RandomState(i).randn(batch, tokens, heads, dim) * 0.5, dtype),
                              batch_sharding) for i in range(3))
    flops = 4 * batch * heads * tokens * tokens * dim
    for kind, factor in (("forward", 1), ("fwd+bwd", 3)):
      row, first = f"{name:<12} {kind:<9}", None
      for implementation in implementations:
        fn = functools.partial(attention.attention, scale=dim ** -0.5, implementation=implementation)
        if kind == "fwd+bwd":
          # A loss whose gradient needs the output, so that the forward pass cannot be pruned away.
          fn = jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2), argnums=(0, 1, 2))
        speed = factor * flops / timed(jax.jit(fn), q, k, v, repeats=args.repeats) / 1e9
        first = first or speed
        row += f" {speed:16.1f} {speed / first:5.2f}x"
      if on_cpu:
        torch_s = torch_sdpa_seconds(q, k, v, kind == "fwd+bwd", args.repeats, dim ** -0.5)
        row += f" {factor * flops / torch_s / 1e9:19.1f}" if torch_s else f" {'-':>19}"
      print(row)


if __name__ == "__main__":
  main()
