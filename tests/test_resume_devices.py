"""A run checkpointed on 2 devices resumes on 1: a checkpoint is restored into the placement of the run that reads
it, not the one that wrote it. The 2-device run shards its class centres (and their AdamW moments) over the two
devices (config.centers.shard=on); on 1 device they are whole."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import tiny_run_args

ROOT = Path(__file__).resolve().parents[1]
# Steps 3-4 run on 1 device instead of 2: the batch's reductions (loss mean, gradient sums) add up in another order,
# so the weights differ by float32 rounding, measured at most 6e-8 (the 2-layer ViT, DA-LoRA, 4 steps). Those two
# steps themselves move every leaf by 9e-4 or more: a resume at a wrong data position, rng or schedule step is seen.
ATOL = 1e-5


def train(workdir, cache_dir, devices: int, steps: int) -> str:
  args = tiny_run_args(**{"eval.benchmarks": "()", "checkpoint_every": 2, "centers.shard": "on"})
  cmd = [sys.executable, "-m", "adaptface_jax.main", f"--config=configs/dalora_dino.py:demo,tiny,steps={steps}",
         f"--workdir={workdir}", *args]
  env = dict(os.environ, ADAPTFACE_CACHE=str(cache_dir), ADAPTFACE_CPU_DEVICES=str(devices))
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"sharded over {devices} cpu device(s)" in out.stderr
  head = "sharded over 2 devices" if devices == 2 else "replicated"
  assert f"class centres of 16 identities {head}" in out.stderr
  return out.stderr


def trainable_leaves(workdir, step=None):
  from adaptface_jax import run_state, trainable_rules
  config, _, variables, meta = run_state.load_run(str(workdir), step=step)
  trainable, _ = trainable_rules.split(variables, config.trainable)
  return meta["step"], {k: np.asarray(v) for k, v in trainable_rules.flatten(trainable).items()}


def test_a_run_checkpointed_on_two_devices_resumes_on_one(tmp_path, cache_dir):
  steps = 4
  straight = tmp_path / "two_devices"
  train(straight, cache_dir, devices=2, steps=steps)

  # The workdir as a run stopped right after its step-2 checkpoint leaves it (what the SIGTERM test makes, without
  # the timing): the same run with its later checkpoint, summary and log lines taken away.
  resumed = tmp_path / "resumed"
  shutil.copytree(straight, resumed)
  shutil.rmtree(resumed / "checkpoints" / "last" / str(steps))
  (resumed / "summary.json").unlink()
  log = resumed / "metrics.jsonl"
  log.write_text("".join(line + "\n" for line in log.read_text().splitlines() if json.loads(line)["step"] <= 2))
  assert trainable_leaves(resumed)[0] == 2

  err = train(resumed, cache_dir, devices=1, steps=steps)
  assert "resumed from step 2" in err
  step_a, a = trainable_leaves(straight)
  step_b, b = trainable_leaves(resumed)
  assert step_a == step_b == steps and a.keys() == b.keys()
  assert json.loads((resumed / "summary.json").read_text())["steps"] == steps
  for key in a:
    np.testing.assert_allclose(b[key], a[key], rtol=0, atol=ATOL, err_msg=key)
  # The tolerance is far below what the resumed steps changed, in every leaf.
  _, at_2 = trainable_leaves(straight, step=2)
  assert min(np.abs(a[key] - at_2[key]).max() for key in a) > 10 * ATOL
