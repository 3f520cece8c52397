"""Input pipeline throughput (images/s) at 112 px: flip only and flip + RandAugment, on all cores and on one core.

  python launch/bench_input.py                        # the synthetic demo world (generated on first use)
  python launch/bench_input.py --dataset casia_webface --manual_dir ~/data/faces_webface_112x112

Each measurement runs in its own process, so that the one-core run can pin itself to one CPU and restrict
TensorFlow's intra-op, inter-op and tf.data thread pools to one thread before TensorFlow starts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

AUGMENTATIONS = {"flip": None, "flip + RandAugment(2, 9)": (2, 9)}


def _parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dataset", default="synthetic_faces/demo", help="TFDS builder name")
  parser.add_argument("--data_dir", default=None, help="TFDS data_dir (default: $ADAPTFACE_CACHE/tfds)")
  parser.add_argument("--manual_dir", default=None, help="manual directory of casia_webface / face_folder")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--seconds", type=float, default=10.0, help="measured time per configuration")
  parser.add_argument("--warmup_batches", type=int, default=5)
  parser.add_argument("--one_core_only", action="store_true", help="skip the all-cores runs")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # JSON options of one measurement
  return parser.parse_args(argv)


def _measure(args: argparse.Namespace, randaugment, threads: int | None) -> dict:
  """Runs in a fresh process: pins it to one core first when threads == 1."""
  if threads == 1:
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
  import tensorflow as tf

  if threads == 1:
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
  from adaptface_jax.data import pipeline

  batches = pipeline.train_iterator(args.dataset, data_dir=args.data_dir, manual_dir=args.manual_dir,
                                    batch_size=args.batch_size, seed=0, flip=True, randaugment=randaugment,
                                    num_threads=threads)
  for _ in range(args.warmup_batches):
    next(batches)
  images, start = 0, time.perf_counter()
  while time.perf_counter() - start < args.seconds:
    images += next(batches)["image"].shape[0]
  seconds = time.perf_counter() - start
  return {"images": images, "seconds": seconds, "images_per_second": images / seconds}


def _run_worker(args: argparse.Namespace, randaugment, threads: int | None) -> float:
  options = json.dumps({"randaugment": randaugment, "threads": threads})
  command = [sys.executable, os.path.abspath(__file__), "--worker", options, "--dataset", args.dataset,
             "--batch_size", str(args.batch_size), "--seconds", str(args.seconds),
             "--warmup_batches", str(args.warmup_batches)]
  for flag, value in (("--data_dir", args.data_dir), ("--manual_dir", args.manual_dir)):
    if value is not None:
      command += [flag, value]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
  result = subprocess.run(command, env=env, capture_output=True, text=True)
  if result.returncode:
    raise RuntimeError(f"measurement {options} failed:\n{result.stderr[-4000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])["images_per_second"]


def main(argv=None) -> None:
  args = _parse_args(argv)
  if args.worker is not None:
    options = json.loads(args.worker)
    print(json.dumps(_measure(args, options["randaugment"], options["threads"])))
    return
  from adaptface_jax.data import pipeline

  info = pipeline.dataset_info(args.dataset, data_dir=args.data_dir, manual_dir=args.manual_dir)  # prepare once
  cores = len(os.sched_getaffinity(0))
  columns = [("one core", 1)] if args.one_core_only else [(f"all cores ({cores})", None), ("one core", 1)]
  print(f"input pipeline throughput, images/s: {args.dataset} ({info['num_examples']} images), 112 px, "
        f"batch {args.batch_size}, {args.seconds:g} s per run")
  print(f"{'augmentation':<26}" + "".join(f"{name:>18}" for name, _ in columns))
  for label, randaugment in AUGMENTATIONS.items():
    rates = [_run_worker(args, randaugment, threads) for _, threads in columns]
    print(f"{label:<26}" + "".join(f"{rate:>18.0f}" for rate in rates), flush=True)


if __name__ == "__main__":
  main()
