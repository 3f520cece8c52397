"""1:N identification: the metrics on a hand-worked case, and `python -m adaptface_jax.identify` on a small gallery."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adaptface_jax import identify

ROOT = Path(__file__).resolve().parents[1]


def test_cmc_and_tpir_on_a_hand_worked_case():
  gallery = ["ann", "bob", "cat"]
  # rows: probes; columns: gallery identities
  scores = np.array([[0.9, 0.2, 0.1],   # ann: rank 1
                     [0.5, 0.4, 0.3],   # bob: rank 2
                     [0.2, 0.3, 0.1],   # cat: rank 3
                     [0.6, 0.1, 0.0],   # dan (not in the gallery): best 0.6
                     [0.1, 0.35, 0.2],  # eve (not in the gallery): best 0.35
                     [0.0, 0.0, 0.7]])  # unlabelled: ignored by the metrics
  probes = ["ann", "bob", "cat", "dan", "eve", identify.UNLABELLED]
  assert identify.cmc(scores, gallery, probes, ranks=(1, 2, 5)) == pytest.approx(
      {"cmc_rank1": 1 / 3, "cmc_rank2": 2 / 3, "cmc_rank5": 1.0})
  # FPIR 0.5 of 2 non-mated probes: one may pass, so the threshold sits just above 0.35; ann (0.9, first) passes.
  # FPIR 0.1: none may pass, the threshold sits just above 0.6; ann still passes. bob and cat are never first.
  out = identify.tpir_at_fpir(scores, gallery, probes, fpir_targets=(0.1, 0.5))
  assert out == {"tpir_at_fpir_0.1": pytest.approx(1 / 3), "tpir_at_fpir_0.5": pytest.approx(1 / 3),
                 "non_mated_probes": 2}
  scores[0, 0] = 0.5  # ann: first with 0.5, below the 0.6 of dan but above eve's 0.35
  out = identify.tpir_at_fpir(scores, gallery, probes, fpir_targets=(0.1, 0.5))
  assert out["tpir_at_fpir_0.1"] == 0.0 and out["tpir_at_fpir_0.5"] == pytest.approx(1 / 3)
  assert identify.tpir_at_fpir(scores, gallery, ["ann", "bob", "cat", "ann", "bob", ""]) == {}  # no non-mated


def test_templates_are_normalised_means_per_identity():
  embeddings = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
  names, templates = identify.templates(embeddings, ["b", "b", "a"])
  assert names == ["a", "b"]
  np.testing.assert_allclose(templates, [[0.6, 0.8], [np.sqrt(0.5), np.sqrt(0.5)]])


def _write_faces(folder: Path, identity_seed: int, count: int, kind: str, seed: int) -> list[Path]:
  from adaptface_jax.data import synthetic
  renderer = synthetic.FaceRenderer(112)
  identity = synthetic.make_identity(7, identity_seed)
  folder.mkdir(parents=True, exist_ok=True)
  paths = []
  for index in range(count):
    rng = np.random.default_rng(seed * 100 + index)
    path = folder / f"{kind}{index}.png"
    Image.fromarray(renderer.render(identity, synthetic.sample_nuisance(rng, kind), rng)).save(path)
    paths.append(path)
  return paths


def test_identify_command_on_a_small_gallery(tmp_path, finished_run, cache_dir):
  workdir = tmp_path / "run"  # the gallery cache is written into the workdir: a copy of the shared run
  shutil.copytree(finished_run[0], workdir)
  gallery, probe = tmp_path / "gallery", tmp_path / "probe"
  for identity in range(3):
    _write_faces(gallery / f"id{identity}", identity, 2, "general", seed=identity)
    _write_faces(probe / f"id{identity}", identity, 1, "profile", seed=10 + identity)
  single = _write_faces(gallery / "id3", 3, 1, "general", seed=3)[0]
  (probe / "id3").mkdir()
  (probe / "id3" / "same.png").write_bytes(single.read_bytes())  # the gallery's only face of id3: score 1
  _write_faces(probe / "stranger", 50, 2, "general", seed=50)  # not in the gallery: open set
  _write_faces(probe, 60, 1, "general", seed=60)  # loose: unlabelled
  out = tmp_path / "out" / "probes.csv"
  command = [sys.executable, "-m", "adaptface_jax.identify", f"--workdir={workdir}", f"--gallery={gallery}",
             f"--probe={probe}", "--top_k=3", f"--out={out}"]
  env = dict(os.environ, ADAPTFACE_CACHE=str(cache_dir))
  first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
  assert first.returncode == 0, first.stderr[-3000:]
  rows = list(csv.DictReader(out.open()))
  assert len(rows) == 3 + 1 + 2 + 1
  assert list(rows[0]) == ["probe", "identity", "top1", "score1", "top2", "score2", "top3", "score3"]
  same = next(row for row in rows if row["probe"].endswith("same.png"))
  assert same["top1"] == "id3" and float(same["score1"]) == pytest.approx(1.0, abs=1e-5)
  assert all(float(row["score1"]) >= float(row["score2"]) >= float(row["score3"]) for row in rows)
  assert sum(row["identity"] == "" for row in rows) == 1
  metrics = json.loads((out.parent / "metrics.json").read_text())
  assert set(metrics) >= {"cmc_rank1", "cmc_rank5", "tpir_at_fpir_0.01", "tpir_at_fpir_0.1"}
  assert metrics["non_mated_probes"] == 2 and metrics["gallery_identities"] == 4 and metrics["cmc_rank5"] == 1.0
  assert "cmc_rank1: " in first.stdout
  caches = list((workdir / "identify" / "cache").glob("*.npz"))
  assert len(caches) == 1
  again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
  assert again.returncode == 0 and "gallery embeddings from" in again.stderr, again.stderr[-3000:]
  assert list(csv.DictReader(out.open())) == rows
  (gallery / "id3" / "general0.png").write_bytes((probe / "id0" / "profile0.png").read_bytes())  # other contents
  assert subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True).returncode == 0
  assert len(list((workdir / "identify" / "cache").glob("*.npz"))) == 2


def test_identify_refuses_faces_that_are_not_112(tmp_path, finished_run):
  gallery = tmp_path / "gallery" / "a"
  gallery.mkdir(parents=True)
  Image.fromarray(np.zeros((100, 90, 3), np.uint8)).save(gallery / "x.png")
  with pytest.raises(ValueError, match="x.png: face is 90x100"):
    identify.identify(str(finished_run[0]), str(tmp_path / "gallery"), str(tmp_path / "gallery"))
