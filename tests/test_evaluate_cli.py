"""`python -m adaptface_jax.evaluate` end to end, through a subprocess: --embeddings FILE.npz and --workdir DIR."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=120):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "adaptface_jax.evaluate", *args], capture_output=True, text=True,
                        cwd=REPO, env=env, timeout=timeout)


def write_pairs(path, *, with_flip=True, **overrides):
  """60 pairs, 10 folds of 6 (3 same, 3 different); same pairs at squared distance 0.3055 from each other,
  different pairs at 1.5055, except pair 4 (different, fold 0) at 0.2055: fold 0 trains without it and takes
  threshold 0.31, which accepts it: fold 0 scores 5/6, the others 6/6; accuracy = (5/6 + 9) / 10."""
  issame = np.tile([True, True, True, False, False, False], 10)
  distances = np.where(issame, 0.3055, 1.5055)
  distances[4] = 0.2055
  angles = np.stack([np.zeros(60), np.arccos(1 - distances / 2)], 1).reshape(-1)
  embeddings = 3.0 * np.stack([np.cos(angles), np.sin(angles)], 1)
  arrays = {"embeddings": embeddings.astype(np.float32), "issame": issame}
  if with_flip:
    arrays["embeddings_flip"] = (0.5 * embeddings).astype(np.float32)  # same directions: same distances
  arrays.update(overrides)
  np.savez(path, **arrays)
  return path


def test_json_lines_and_result_files(tmp_path):
  npz = write_pairs(tmp_path / "toy_bench.npz")
  out_dir = tmp_path / "out"
  proc = run_cli("--embeddings", str(npz), "--json", "--out_dir", str(out_dir))
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 1
  record = json.loads(lines[0])
  assert record["name"] == "toy_bench"  # the file's stem by default
  expected = (5 / 6 + 9) / 10
  assert record["accuracy"] == pytest.approx(expected)
  assert record["accuracy_noflip"] == pytest.approx(expected)
  # std (ddof=0) over folds [5/6, 1, ..., 1].
  assert record["accuracy_std"] == pytest.approx(np.std([5 / 6] + [1.0] * 9))
  assert record["best_threshold_accuracy"] == pytest.approx(59 / 60)  # 0.31 < t <= 1.5055: pair 4 wrong
  # 30 same x 30 different: each same pair is closer than 29 different pairs and farther than pair 4.
  assert record["auc"] == pytest.approx(29 / 30)
  assert 0 <= record["val_at_far_1e-3"] <= 1 and record["num_pairs"] == 60
  assert "| toy_bench | 60 |" in proc.stderr  # the table still shows, on stderr

  saved = json.loads((out_dir / "results.json").read_text())
  assert saved["toy_bench"]["accuracy"] == pytest.approx(expected)
  assert saved["mean"] is None and saved["mean_of_present"]["benchmarks"] == ["toy_bench"]
  assert "optimistic" in (out_dir / "results.md").read_text()
  assert (out_dir / "roc.png").read_bytes()[:4] == b"\x89PNG"


def test_table_with_name_and_no_flip(tmp_path):
  npz = write_pairs(tmp_path / "pairs.npz", with_flip=False)
  proc = run_cli("--embeddings", str(npz), "--name", "lfw")
  assert proc.returncode == 0, proc.stderr
  table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
  assert "optimistic" in table[0]
  assert table[2].startswith("| lfw | 60 | 98.33 ± 5.00 (no flip given) | — |")
  assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"issame": None}, "missing array(s) ['issame']"),
    ({"embeddings": np.zeros((120, 2, 1))}, "must be [2P, D]"),
    ({"embeddings": np.ones((100, 2))}, "100 rows for 60 pairs"),
    ({"embeddings_flip": np.ones((120, 3))}, "`embeddings_flip` has shape (120, 3)"),
    ({"issame": np.full(60, 2)}, "bool"),
    ({"extra_thing": np.ones(3)}, "unexpected array(s) ['extra_thing']"),
])
def test_bad_files_fail_with_a_clear_message(tmp_path, overrides, message):
  path = tmp_path / "bad.npz"
  write_pairs(path, **{k: v for k, v in overrides.items() if v is not None})
  if any(v is None for v in overrides.values()):
    arrays = dict(np.load(path))
    for key in [k for k, v in overrides.items() if v is None]:
      del arrays[key]
    np.savez(path, **arrays)
  proc = run_cli("--embeddings", str(path), "--json")
  assert proc.returncode != 0
  assert message in proc.stderr and str(path) in proc.stderr
  assert "Traceback" not in proc.stderr
  assert proc.stdout == ""


def test_missing_file_and_no_mode(tmp_path):
  proc = run_cli("--embeddings", str(tmp_path / "nope.npz"))
  assert proc.returncode != 0 and "no such embeddings file" in proc.stderr
  proc = run_cli()
  assert proc.returncode != 0 and "--embeddings" in proc.stderr


def test_workdir_step_is_written_beside_the_runs_own_results(tmp_path, finished_run):
  workdir = tmp_path / "run"
  shutil.copytree(finished_run[0], workdir)
  own = (workdir / "results.json").read_bytes()
  assert json.loads(own)["step"] == 4
  proc = run_cli("--workdir", str(workdir), "--step", "2", timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (workdir / "results.json").read_bytes() == own
  saved = json.loads((workdir / "eval_step2" / "results.json").read_text())
  assert saved["step"] == 2 and saved["synth_lfw"]["num_pairs"] == 40
  assert (workdir / "eval_step2" / "roc.png").exists()
