"""The whole loop through `python -m adaptface_jax.main`: demo config, exact resume after SIGTERM, another backbone
refused on a finished workdir, export to transformers, and the ablation runner + report."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_run_args

ROOT = Path(__file__).resolve().parents[1]


def main_cmd(config, workdir, *overrides):
  return [sys.executable, "-m", "adaptface_jax.main", f"--config={config}", f"--workdir={workdir}", *overrides]


def run(cmd, cache_dir, check=True):
  env = dict(os.environ, ADAPTFACE_CACHE=str(cache_dir))
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=check)


def trainable_leaves(workdir):
  from adaptface_jax import run_state, trainable_rules
  config, _, variables, meta = run_state.load_run(str(workdir))
  trainable, _ = trainable_rules.split(variables, config.trainable)
  return meta["step"], {k: np.asarray(v) for k, v in trainable_rules.flatten(trainable).items()}


def test_demo_config_completes_from_fresh_workdir(tmp_path, cache_dir):
  # The real :demo backbone (the shipped synthetic-pretrained DINOv2 at 112 px), with the step count and data shrunk.
  workdir = tmp_path / "demo"
  args = tiny_run_args(**{"data.batch_size": 16, "model.image_size": 112})
  run(main_cmd("configs/dalora_dino.py:demo,steps=2", workdir, *args), cache_dir)
  results = json.loads((workdir / "results.json").read_text())
  for name in ("synth_lfw", "synth_cfp_fp", "synth_agedb"):
    assert 0.0 <= results[name]["accuracy"] <= 1.0 and results[name]["num_pairs"] == 40
    assert len(results[name]["domain_weights"]["a"]) == 3
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["steps"] == 2 and summary["frozen_params"] == 2_797_632
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert {"loss/margin", "loss/domain_entropy", "loss/domain_balance", "lr", "grad_norm", "images_per_sec",
          "routing/mean_w0"} <= set(lines[0])
  assert list((workdir / "tensorboard").iterdir())


def test_sigterm_then_resume_is_bit_identical(tmp_path, cache_dir):
  steps = 30
  config = f"configs/dalora_dino.py:demo,tiny,steps={steps}"
  args = tiny_run_args(**{"eval.benchmarks": "()", "checkpoint_every": 1000})
  straight = tmp_path / "straight"
  run(main_cmd(config, straight, *args), cache_dir)

  resumed = tmp_path / "resumed"
  env = dict(os.environ, ADAPTFACE_CACHE=str(cache_dir))
  proc = subprocess.Popen(main_cmd(config, resumed, *args), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  metrics = resumed / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.02)
  _, err = proc.communicate(timeout=240)
  assert proc.returncode == 0, err[-2000:]
  interrupted_step, _ = trainable_leaves(resumed)
  assert 3 <= interrupted_step < steps, interrupted_step
  assert not (resumed / "summary.json").exists()

  run(main_cmd(config, resumed, *args), cache_dir)  # the same command resumes
  step_a, a = trainable_leaves(straight)
  step_b, b = trainable_leaves(resumed)
  assert step_a == step_b == steps
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_another_backbone_on_a_finished_workdir_is_refused_and_leaves_it_untouched(tmp_path, cache_dir):
  """The other bad inputs are catalogued in test_bad_inputs.py; this one needs a run in the workdir first."""
  args = tiny_run_args(**{"eval.benchmarks": "()"})
  workdir = tmp_path / "run"
  run(main_cmd("configs/lora_dino.py:demo,tiny,steps=2", workdir, *args), cache_dir)
  before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}
  # Another backbone (another seed of the random init) on the same workdir.
  out = run(main_cmd("configs/lora_dino.py:demo,tiny,steps=4", workdir, *args, "--config.seed=7"), cache_dir,
            check=False)
  assert out.returncode != 0 and "other frozen (backbone) weights" in out.stderr
  assert "Traceback" not in out.stderr
  assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()} == before


def test_export_lora_loads_in_transformers(tmp_path, cache_dir):
  import torch
  from transformers import Dinov2Model

  from adaptface_jax import run_state
  from adaptface_jax.models import face_model
  from adaptface_jax.models.preprocess import preprocess
  workdir = tmp_path / "lora"
  args = tiny_run_args(**{"eval.benchmarks": "()", "optim.lr": 0.05, "adapter.targets": "('q','v','proj','fc2')"})
  run(main_cmd("configs/lora_dino.py:demo,tiny,steps=3", workdir, *args), cache_dir)
  out = tmp_path / "export"
  run([sys.executable, "-m", "adaptface_jax.export", f"--workdir={workdir}", f"--out={out}"], cache_dir)

  config, model, variables, _ = run_state.load_run(str(workdir))
  images = np.random.RandomState(0).randint(0, 256, (2, 112, 112, 3)).astype(np.uint8)
  ours = np.asarray(model.apply(face_model.split_margin(variables)[0], images)["feature"])
  pixels = np.asarray(preprocess(images, image_size=56, family="dinov2"))
  hf = Dinov2Model.from_pretrained(out).eval()
  with torch.no_grad():
    theirs = hf(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).pooler_output.numpy()
  assert np.abs(ours - theirs).max() < 1e-4
  # The adapters were trained: the export differs from the un-adapted backbone.
  base = np.asarray(model.apply(face_model.split_margin(variables)[0], images,
                                method=lambda m, x: m.backbone(preprocess(x, image_size=56, family="dinov2"),
                                                               adapters_enabled=False)["pooler_output"]))
  assert np.abs(base - theirs).max() > 1e-3


def test_ablation_two_cells_and_report(tmp_path, cache_dir):
  runs = tmp_path / "runs"
  cmd = [sys.executable, "launch/ablation.py", "--sweep", "smoke", "--base", "demo,tiny,steps=2",
         "--runs_dir", str(runs), "--", *tiny_run_args()]
  first = run(cmd, cache_dir)
  assert first.stdout.count("[run]") == 2
  again = run(cmd, cache_dir)
  assert again.stdout.count("[done]") == 2 and "[run]" not in again.stdout
  run([sys.executable, "launch/report.py", str(runs)], cache_dir)
  table = (runs / "report.md").read_text().splitlines()
  rows = [line for line in table if line.startswith("| lora_dino") or line.startswith("| dalora_dino")]
  assert len(rows) == 2
  for name in ("lora_dino-rank2", "dalora_dino-domains2"):
    results = json.loads((runs / name / "results.json").read_text())
    row = next(r for r in rows if r.startswith(f"| {name} "))
    assert f"{round(100 * results['synth_lfw']['accuracy'], 2):.2f}" in row
  assert (runs / "accuracy_by_benchmark.png").exists()
  # A finished run's checkpoint evaluated again from the command line gives the same numbers.
  out = run([sys.executable, "-m", "adaptface_jax.evaluate", f"--workdir={runs / 'dalora_dino-domains2'}",
             "--max_pairs=40", "--json"], cache_dir)
  lines = [json.loads(line) for line in out.stdout.splitlines()]
  assert [line["name"] for line in lines] == ["synth_lfw", "synth_cfp_fp", "synth_agedb"]
  results = json.loads((runs / "dalora_dino-domains2" / "results.json").read_text())
  for line in lines:
    assert line["accuracy"] == pytest.approx(results[line["name"]]["accuracy"], abs=1e-9)
  script = tmp_path / "job.sh"
  run([sys.executable, "launch/ablation.py", "--sweep", "matrix", "--runs_dir", str(runs), "--slurm", str(script)],
      cache_dir)
  subprocess.run(["bash", "-n", str(script)], check=True)
  assert script.read_text().count("adaptface_jax.main") == 4
