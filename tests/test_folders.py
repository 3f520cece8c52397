"""Image folders -> identity subsets -> .rec / .bin."""

import logging

import numpy as np
import pytest
from PIL import Image

from adaptface_jax.data import folders
from adaptface_jax.data.binfile import load_pairs, read_bin
from adaptface_jax.data.recordio import InsightFaceRecord


def smooth_image(seed: int, size: int = 24) -> np.ndarray:
  rng = np.random.RandomState(seed)
  yy, xx = np.mgrid[0:size, 0:size] / size
  channels = [128 + 90 * np.sin(2 * np.pi * (rng.uniform(0.3, 1.2) * xx + rng.uniform(0.3, 1.2) * yy)
                                + rng.uniform(0, 6)) for _ in range(3)]
  return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


@pytest.fixture
def face_folder(tmp_path):
  """carol: 3 images, alice: 1, bob: 3 (bob's first is a .JPG), dave: none; plus a stray text file."""
  root = tmp_path / "faces"
  layout = {"carol": ["c2.png", "c0.png", "c1.png"], "alice": ["a0.png"], "bob": ["b1.png", "B0.JPG", "b2.png"]}
  pixels = {}
  seed = 0
  for identity, names in layout.items():
    (root / identity).mkdir(parents=True)
    for name in names:
      image = smooth_image(seed)
      seed += 1
      Image.fromarray(image).save(root / identity / name, format="JPEG" if name.endswith(".JPG") else "PNG")
      pixels[f"{identity}/{name}"] = np.asarray(Image.open(root / identity / name).convert("RGB"))
  (root / "dave").mkdir()
  (root / "bob" / "notes.txt").write_text("not an image")
  return root, pixels


def test_scan_sorted_identities_and_images(face_folder, caplog):
  root, _ = face_folder
  with caplog.at_level(logging.WARNING):
    identities = folders.scan_image_folder(root)
  assert list(identities) == ["alice", "bob", "carol"]
  assert [p.name for p in identities["bob"]] == ["B0.JPG", "b1.png", "b2.png"]
  assert [p.name for p in identities["carol"]] == ["c0.png", "c1.png", "c2.png"]
  assert "1 identity folders hold no" in caplog.text and "dave" in caplog.text


def test_scan_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    folders.scan_image_folder(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no identity folder"):
    folders.scan_image_folder(tmp_path / "empty")
  (tmp_path / "flat").mkdir()
  Image.fromarray(smooth_image(0)).save(tmp_path / "flat" / "x.png")
  with pytest.raises(ValueError, match="1 images lie directly in the root"):
    folders.scan_image_folder(tmp_path / "flat")


def test_select_identities_first_and_most():
  identities = {"d": [1, 2], "a": [1], "c": [1, 2, 3], "b": [1, 2]}
  assert list(folders.select_identities(identities, None)) == ["a", "b", "c", "d"]
  assert list(folders.select_identities(identities, 2, "first")) == ["a", "b"]
  # Most images: c (3), then the tie b/d (2) broken by name -> b; returned in sorted order.
  assert list(folders.select_identities(identities, 2, "most")) == ["b", "c"]
  assert list(folders.select_identities(identities, 3, "most")) == ["b", "c", "d"]
  with pytest.raises(ValueError, match="num_identities=5 but the folder has 4"):
    folders.select_identities(identities, 5)
  with pytest.raises(ValueError, match="mode must be"):
    folders.select_identities(identities, 1, "random")


def test_folder_to_record_png_is_pixel_identical(face_folder, tmp_path):
  root, pixels = face_folder
  info = folders.folder_to_record(root, tmp_path / "rec", image_format="png")
  assert info["images"] == 7 and info["identities"] == 3
  assert info["identity_names"] == ["alice", "bob", "carol"]
  record = InsightFaceRecord(tmp_path / "rec")
  assert record.labels().tolist() == [0, 1, 1, 1, 2, 2, 2]
  expected = ["alice/a0.png", "bob/B0.JPG", "bob/b1.png", "bob/b2.png", "carol/c0.png", "carol/c1.png",
              "carol/c2.png"]
  for key, name in zip(record.image_keys, expected):
    image, _ = record.decode(key)
    assert np.array_equal(image, pixels[name]), name
  # PNG files are stored byte for byte.
  assert record.read(1)[0] == (root / "alice" / "a0.png").read_bytes()


def test_folder_to_record_jpeg_within_tolerance_and_subsets(face_folder, tmp_path):
  root, pixels = face_folder
  folders.folder_to_record(root, tmp_path / "jpg", image_format="jpg")
  record = InsightFaceRecord(tmp_path / "jpg")
  assert record.read(2)[0] == (root / "bob" / "B0.JPG").read_bytes()  # already JPEG: stored as is
  image, label = record.decode(5)
  assert label == 2 and np.abs(image.astype(int) - pixels["carol/c0.png"]).mean() < 2.0

  info = folders.folder_to_record(root, tmp_path / "most", num_identities=2, mode="most")
  assert info["identity_names"] == ["bob", "carol"] and info["images"] == 6
  assert InsightFaceRecord(tmp_path / "most").labels().tolist() == [0, 0, 0, 1, 1, 1]
  info = folders.folder_to_record(root, tmp_path / "first", num_identities=2)
  assert info["identity_names"] == ["alice", "bob"] and info["images"] == 4


def test_folder_to_record_names_a_corrupt_file(face_folder, tmp_path):
  root, _ = face_folder
  (root / "alice" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
  with pytest.raises(ValueError, match=r"alice/broken\.png: not a readable image"):
    folders.folder_to_record(root, tmp_path / "rec")


def test_pairs_to_bin(face_folder, tmp_path):
  root, pixels = face_folder
  pairs = tmp_path / "pairs.txt"
  pairs.write_text("# a comment\nalice/a0.png bob/b1.png 0\n\ncarol/c0.png carol/c2.png 1\n")
  info = folders.pairs_to_bin(pairs, root, tmp_path / "out.bin")
  assert info == {"pairs": 2, "same": 1, "different": 1, "path": str(tmp_path / "out.bin")}
  bins, issame = read_bin(tmp_path / "out.bin")
  assert bins[0] == (root / "alice" / "a0.png").read_bytes() and issame.tolist() == [False, True]
  decoded, _ = load_pairs(tmp_path / "out.bin")
  assert np.array_equal(decoded[3], pixels["carol/c2.png"])

  pairs.write_text("alice/a0.png bob/b1.png\n")
  with pytest.raises(ValueError, match=r"pairs\.txt:1: expected 'path_a path_b 1\|0'"):
    folders.pairs_to_bin(pairs, root, tmp_path / "bad.bin")
  pairs.write_text("alice/a0.png bob/missing.png 1\n")
  with pytest.raises(FileNotFoundError, match=r"pairs\.txt:1: .*missing\.png does not exist"):
    folders.pairs_to_bin(pairs, root, tmp_path / "bad.bin")
