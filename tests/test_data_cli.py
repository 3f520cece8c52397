"""`python -m adaptface_jax.data` commands."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import adaptface_jax.data
from adaptface_jax.data import __main__ as cli
from adaptface_jax.data import recordio
from adaptface_jax.data.binfile import write_bin

REPO_ROOT = Path(__file__).resolve().parents[1]


def noise_images(count, size=20, seed=0):
  rng = np.random.RandomState(seed)
  return [rng.randint(0, 256, (size, size, 3)).astype(np.uint8) for _ in range(count)]


def run_main_json(capsys, *argv) -> dict:
  assert cli.main(["info", *map(str, argv), "--json"]) == 0
  return json.loads(capsys.readouterr().out)


def test_info_on_insightface_rec_through_subprocess(tmp_path):
  encoded = [recordio.encode_image(image) for image in noise_images(5)]
  truncated = encoded[4][:-300]  # header intact, pixel data missing
  write_insightface_record_samples = [(encoded[0], 0), (encoded[1], 1), (truncated, 1), (encoded[2], 2),
                                      (encoded[3], 2)]
  recordio.write_insightface_record(tmp_path / "pkg", write_insightface_record_samples)
  environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  result = subprocess.run([sys.executable, "-m", "adaptface_jax.data", "info", str(tmp_path / "pkg"), "--json"],
                          capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=120)
  assert result.returncode == 0, result.stderr
  summary = json.loads(result.stdout)
  assert summary["layout"] == "insightface"
  assert (summary["images"], summary["identities"], summary["corrupt"]) == (5, 3, 1)
  assert summary["corrupt_keys"] == ["3"] and summary["image_size"] == [20, 20] and summary["bad_labels"] == 0
  assert summary["images_per_identity"] == {"min": 1, "mean": 1.67, "max": 2}
  assert summary["property"] == "3,20,20"


def test_info_on_im2rec_bin_and_folder(tmp_path, capsys):
  images = noise_images(6)
  recordio.write_insightface_record(tmp_path / "im2rec", zip(images, [3, 0, 1, 1, 2, 3]), with_header=False)
  summary = run_main_json(capsys, tmp_path / "im2rec" / "train.rec")
  assert summary["layout"] == "im2rec"
  assert (summary["images"], summary["identities"], summary["corrupt"], summary["bad_labels"]) == (6, 4, 0, 0)

  write_bin(tmp_path / "v.bin", images[:4] + [b"garbage", recordio.encode_image(images[5])], [True, False, True])
  summary = run_main_json(capsys, tmp_path / "v.bin")
  assert summary["layout"] == "bin"
  assert (summary["pairs"], summary["same"], summary["different"], summary["images"]) == (3, 2, 1, 6)
  assert summary["corrupt"] == 1 and summary["corrupt_images"] == ["4"] and summary["image_size"] == [20, 20]

  root = tmp_path / "faces"
  for index, image in enumerate(images):
    (root / f"id{index % 2}").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / f"id{index % 2}" / f"{index}.png")
  Image.fromarray(noise_images(1, size=12)[0]).save(root / "id0" / "small.png")
  summary = run_main_json(capsys, root)
  assert summary["layout"] == "folder"
  assert (summary["images"], summary["identities"], summary["corrupt"]) == (7, 2, 0)
  assert summary["image_sizes"] == {"20x20": 6, "12x12": 1}

  assert cli.main(["info", str(tmp_path / "v.bin")]) == 0
  human = capsys.readouterr().out
  assert "pairs: 3" in human and "image_size: 20x20" in human
  assert cli.main(["info", str(tmp_path / "im2rec" / "property")]) == 1
  assert "error: " in capsys.readouterr().err
  with pytest.raises(ValueError, match=r"expected a \.rec file, a \.bin file"):
    cli.info(tmp_path / "im2rec" / "property")
  (tmp_path / "im2rec" / "train.idx").write_text("0\t0\n1\t999999\n")
  assert cli.main(["info", str(tmp_path / "im2rec")]) == 1
  assert "key 1 points to byte offset 999999, past the end" in capsys.readouterr().err


def test_folder2rec_and_pairs2bin_commands(tmp_path, capsys):
  root = tmp_path / "faces"
  for identity, count in [("x", 1), ("y", 3), ("z", 2)]:
    (root / identity).mkdir(parents=True)
    for index, image in enumerate(noise_images(count, seed=count)):
      Image.fromarray(image).save(root / identity / f"{index}.png")
  assert cli.main(["folder2rec", str(root), str(tmp_path / "rec"), "--num-identities", "2", "--mode", "most"]) == 0
  assert "images: 5" in capsys.readouterr().out
  record = recordio.InsightFaceRecord(tmp_path / "rec")
  assert record.num_classes == 2 and record.labels().tolist() == [0, 0, 0, 1, 1]

  (tmp_path / "pairs.txt").write_text("y/0.png y/1.png 1\nx/0.png z/1.png 0\n")
  assert cli.main(["pairs2bin", str(tmp_path / "pairs.txt"), str(root), str(tmp_path / "p.bin")]) == 0
  capsys.readouterr()
  summary = run_main_json(capsys, tmp_path / "p.bin")
  assert (summary["pairs"], summary["same"], summary["different"], summary["corrupt"]) == (2, 1, 1, 0)


def test_synth_forwards_only_the_given_options(tmp_path, capsys, monkeypatch):
  calls = []

  def build_world(cache_dir=None, **options):
    calls.append((cache_dir, options))
    return {"train": str(tmp_path / "train"), "num_classes": 7}

  fake = types.ModuleType("adaptface_jax.data.synthetic")
  fake.build_world = build_world
  monkeypatch.setitem(sys.modules, "adaptface_jax.data.synthetic", fake)
  monkeypatch.setattr(adaptface_jax.data, "synthetic", fake, raising=False)
  assert cli.main(["synth", "--cache-dir", str(tmp_path), "--train-identities", "12", "--seed", "3"]) == 0
  assert calls == [(str(tmp_path), {"seed": 3, "num_train_identities": 12})]
  assert "num_classes: 7" in capsys.readouterr().out
  assert cli.main(["synth"]) == 0
  assert calls[-1] == (None, {})
