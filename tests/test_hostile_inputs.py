"""Hostile inputs to identify and export, in this process: oversized images refused from their header, a damaged
gallery cache rebuilt, outputs kept off a training workdir's own files, an --out folder that holds files kept unless
--overwrite, a run's config.json that is no config, and PIL's and the disk's errors named. The commands' exit status
and one-paragraph messages for some of these are checked in tests/test_bad_inputs.py."""

import errno
import hashlib
import json
import logging
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adaptface_jax import cli, export, identify, run_state
from adaptface_jax.data import folders, recordio


def png_header(width: int, height: int) -> bytes:
  """A PNG that declares width x height RGB pixels but holds almost no data: decoding it would fail (truncated), so
  a refusal that names the size shows the header alone was read. 30000x30000 is what a decompression bomb declares."""
  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))


def write_faces(folder: Path, names, seed: int = 0, size: int = 112) -> list[Path]:
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  for name in names:
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / name)
  return [folder / name for name in names]


def snapshot(folder: Path) -> dict:
  """Every file under `folder` (hidden ones too) -> its sha256: to check that nothing was written or changed."""
  return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def workdir(tmp_path, finished_run):
  """A copy of the shared finished run: a command that wrongly wrote into it would damage no other test."""
  shutil.copytree(finished_run[0], tmp_path / "run")
  return tmp_path / "run"


@pytest.fixture
def faces(tmp_path):
  """(gallery, probe) folders of 112x112 faces: two identities of two faces, two loose probes."""
  gallery, probe = tmp_path / "gallery", tmp_path / "probe"
  write_faces(gallery / "ann", ["0.png", "1.png"], seed=1)
  write_faces(gallery / "bob", ["0.png", "1.png"], seed=2)
  write_faces(probe, ["p0.png", "p1.png"], seed=3)
  return gallery, probe


# ------------------------------------------------------------------------------------------------------------------
# 6. Oversized images: refused from the header, before any pixel is decoded


@pytest.mark.parametrize("side", [30000, 12000, 7000])  # over PIL's refusal, over its warning, over ours alone
def test_an_oversized_image_is_refused_from_its_header(side):
  data = png_header(side, side)
  with pytest.raises(recordio.ImageTooLarge, match=f"^gallery/ann/bomb.png: .*{side * side:,} pixels.* over the "
                                                   "40-Mpixel bound"):
    recordio.decode_image(data, name="gallery/ann/bomb.png")
  with pytest.raises(recordio.ImageTooLarge, match="40-Mpixel bound"):
    recordio.decode_image(data)
  with pytest.raises(recordio.ImageTooLarge):
    recordio.image_size_of(data)
  with recordio.open_image(png_header(6000, 6000)) as image:  # 36 Mpixel: under the bound, opened
    assert image.size == (6000, 6000)


def test_a_bomb_in_identifys_gallery_is_refused_naming_it(tmp_path, workdir, faces):
  gallery, probe = faces
  (gallery / "bob" / "bomb.png").write_bytes(png_header(30000, 30000))
  before = snapshot(workdir)
  with pytest.raises(recordio.ImageTooLarge, match=re.escape(str(gallery / "bob" / "bomb.png"))):
    identify.identify(str(workdir), str(gallery), str(probe), out=str(tmp_path / "out" / "probes.csv"))
  assert snapshot(workdir) == before and not (tmp_path / "out").exists()


def test_the_folder_converters_refuse_an_oversized_image_naming_it(tmp_path):
  write_faces(tmp_path / "faces" / "ann", ["0.png"], size=24)
  (tmp_path / "faces" / "ann" / "bomb.png").write_bytes(png_header(12000, 12000))
  with pytest.raises(recordio.ImageTooLarge, match=re.escape(str(tmp_path / "faces" / "ann" / "bomb.png"))):
    folders.folder_to_record(tmp_path / "faces", tmp_path / "rec")
  (tmp_path / "pairs.txt").write_text("ann/0.png ann/bomb.png 1\n")
  with pytest.raises(recordio.ImageTooLarge, match=re.escape(f"{tmp_path / 'pairs.txt'}:1: ")):
    folders.pairs_to_bin(tmp_path / "pairs.txt", tmp_path / "faces", tmp_path / "pairs.bin")
  assert not (tmp_path / "pairs.bin").exists()


# ------------------------------------------------------------------------------------------------------------------
# 7. The gallery cache: written atomically, an unreadable one rebuilt


def test_an_unreadable_gallery_cache_reads_as_absent_with_a_warning(tmp_path, caplog):
  cache = tmp_path / "cache" / "0123.npz"
  embeddings = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
  identify._write_cache(cache, embeddings)
  np.testing.assert_array_equal(identify._read_cache(cache, 4), embeddings)
  assert list(cache.parent.iterdir()) == [cache]  # no temporary file left
  whole = cache.read_bytes()
  for damaged, count in [(whole[:len(whole) // 2], 4), (whole, 5), (b"", 4)]:  # killed mid-write; another gallery
    cache.write_bytes(damaged)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="adaptface_jax.identify"):
      assert identify._read_cache(cache, count) is None
    assert f"{cache}: the gallery cache does not read back" in caplog.text
    assert "embedding the gallery again" in caplog.text


def test_a_cache_write_that_fails_or_is_killed_leaves_the_old_cache(tmp_path, monkeypatch, caplog):
  cache = tmp_path / "cache" / "0123.npz"
  identify._write_cache(cache, np.ones((2, 3), np.float32))
  before = cache.read_bytes()

  def full_disk(file, **arrays):
    file.write(b"PK\x03\x04 half an archive")
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(np, "savez", full_disk)
  with caplog.at_level(logging.WARNING, logger="adaptface_jax.identify"):
    identify._write_cache(cache, np.zeros((2, 3), np.float32))  # a warning: the results do not need the cache
  assert f"cannot write {cache}: [Errno 28] No space left on device" in caplog.text
  assert "not cached" in caplog.text
  assert cache.read_bytes() == before and list(cache.parent.iterdir()) == [cache]

  def killed(file, **arrays):
    file.write(b"PK\x03\x04 half an archive")
    raise KeyboardInterrupt

  monkeypatch.setattr(np, "savez", killed)
  with pytest.raises(KeyboardInterrupt):
    identify._write_cache(cache, np.zeros((2, 3), np.float32))
  assert cache.read_bytes() == before and list(cache.parent.iterdir()) == [cache]


def test_a_full_disk_names_the_file_it_could_not_write(tmp_path):
  target = tmp_path / "out" / "probes.csv"
  target.parent.mkdir()
  target.write_text("old\n")

  def full_disk(file):
    file.write("probe,identity\n")
    raise OSError(errno.ENOSPC, "No space left on device")

  with pytest.raises(OSError, match=re.escape(f"cannot write {target}: [Errno 28] No space left on device")):
    cli.write_atomically(target, full_disk)
  assert target.read_text() == "old\n" and list(target.parent.iterdir()) == [target]
  (tmp_path / "file").write_text("")
  with pytest.raises(OSError, match=re.escape(f"cannot write {tmp_path / 'file' / 'x.csv'}: ")):
    cli.write_atomically(tmp_path / "file" / "x.csv", full_disk)  # its parent is a file


# ------------------------------------------------------------------------------------------------------------------
# 8. No output on a training workdir's own files


def test_outputs_are_kept_off_a_training_workdirs_own_files(tmp_path):
  run = tmp_path / "run"
  (run / "checkpoints").mkdir(parents=True)
  (run / "config.json").write_text("{}")
  for refused in [run, run / "config.json", run / "checkpoints", run / "checkpoints" / "last" / "x.csv",
                  run / "summary.json", run / "results.json", run / "metrics.jsonl", run / "tensorboard" / "a"]:
    with pytest.raises(ValueError, match=re.escape(f"--out={refused}: ")):  # found without being told of it
      cli.refuse_run_files(refused, flag="--out")
  for fine in [run / "identify" / "probes.csv", run / "export" / "model.onnx", run / "eval_step4",
               run / "probes.csv", tmp_path / "elsewhere" / "config.json"]:
    cli.refuse_run_files(fine, flag="--out")
  # a run the command reads counts even when it lacks its checkpoints
  (tmp_path / "bare").mkdir()
  with pytest.raises(ValueError, match="belongs to the training run in"):
    cli.refuse_run_files(tmp_path / "bare" / "config.json", flag="--out", workdirs=[str(tmp_path / "bare")])
  with pytest.raises(ValueError, match="is the training workdir .* itself"):
    cli.refuse_run_files(str(run / "." / "checkpoints" / ".."), flag="--out_dir")


def test_identify_refuses_an_out_on_the_runs_config(workdir, faces):
  gallery, probe = faces
  before = snapshot(workdir)
  with pytest.raises(ValueError, match=re.escape(f"--out={workdir / 'config.json'}: {workdir / 'config.json'} "
                                                 "belongs to the training run in")):
    identify.identify(str(workdir), str(gallery), str(probe), out=str(workdir / "config.json"))
  with pytest.raises(ValueError, match="is a folder; --out names the CSV file"):
    identify.identify(str(workdir), str(gallery), str(probe), out=str(faces[1]))
  assert snapshot(workdir) == before


# ------------------------------------------------------------------------------------------------------------------
# 9. export: not onto a run, not over other files without --overwrite


def test_export_refuses_the_workdir_and_its_files(workdir, tmp_path):
  before = snapshot(workdir)
  with pytest.raises(ValueError, match=re.escape(f"--out={workdir}: that is the training workdir {workdir} itself")):
    export.export_run(str(workdir), str(workdir), overwrite=True)
  with pytest.raises(ValueError, match=re.escape(f"{workdir / 'checkpoints'} belongs to the training run")):
    export.export_run(str(workdir), str(workdir / "checkpoints" / "hf"))
  with pytest.raises(ValueError, match=re.escape(f"{workdir / 'config.json'} belongs to the training run")):
    export.export_onnx(str(workdir), str(workdir / "config.json"))
  assert snapshot(workdir) == before


def test_export_into_a_folder_that_holds_files_needs_overwrite(workdir, tmp_path):
  out = tmp_path / "hf"
  out.mkdir()
  (out / "config.json").write_text('{"mine": true}')
  (out / "notes.txt").write_text("keep me")
  with pytest.raises(ValueError, match=re.escape(f"--out={out}: {out} already holds config.json, notes.txt; pass "
                                                 "--overwrite")):
    export.export_run(str(workdir), str(out))
  assert json.loads((out / "config.json").read_text()) == {"mine": True}
  export.export_run(str(workdir), str(out), overwrite=True)
  assert json.loads((out / "config.json").read_text())["architectures"] == ["Dinov2Model"]
  assert (out / "notes.txt").read_text() == "keep me" and (out / "model.safetensors").stat().st_size > 0
  assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left


# ------------------------------------------------------------------------------------------------------------------
# 10. A run's config.json that is no config


@pytest.mark.parametrize("text,says", [
    ("{}", "not a run's config: no seed, model, adapter, router, loss, eval, optim, trainable"),
    ("[1, 2]", "holds a JSON list, not an object of config sections"),
    ('{"model": ', "not valid JSON"),
    ('{"seed": 0, "model": 3, "adapter": {}, "router": {}, "loss": {}, "eval": {}, "optim": {}, "trainable": {}}',
     r"not a run's config: model \(not a section\), trainable \(not a list of rules\)"),
])
def test_a_config_json_that_is_no_config_is_refused_naming_it(tmp_path, text, says):
  run = tmp_path / "run"
  (run / "checkpoints").mkdir(parents=True)
  (run / "config.json").write_text(text)
  with pytest.raises(ValueError, match=re.escape(f"{run / 'config.json'}: ") + says):
    run_state.load_run(str(run))
  with pytest.raises(ValueError, match=re.escape(f"--config.init_from={run}: {run / 'config.json'}: ") + says):
    run_state.init_from_run(None, None, None, str(run))


def test_a_config_field_the_run_lacks_is_named(tmp_path, finished_run):
  run = tmp_path / "run"
  (run / "checkpoints").mkdir(parents=True)
  config = json.loads((finished_run[0] / "config.json").read_text())
  del config["eval"]["best_metric"]
  (run / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=re.escape(f"{run / 'config.json'}: the run's config has no field "
                                                 "`best_metric`")):
    run_state.load_run(str(run))
  del config["adapter"]["rank"]
  (run / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=re.escape(f"{run / 'config.json'}: the run's config has no field `rank`")):
    run_state.init_from_run(None, None, None, str(run))


# ------------------------------------------------------------------------------------------------------------------
# PIL's errors name the file; the probes are checked before the gallery cache is written


def test_identify_names_an_image_pil_cannot_read(workdir, faces):
  gallery, probe = faces
  (gallery / "bob" / "2.png").write_bytes(b"these are not the faces you are looking for")
  with pytest.raises(ValueError, match=re.escape(f"{gallery / 'bob' / '2.png'}: not a readable image: not an image "
                                                 "file PIL can read")):
    identify.identify(str(workdir), str(gallery), str(probe))


def test_a_truncated_probe_is_named_before_anything_is_written(workdir, faces):
  gallery, probe = faces
  data = (probe / "p1.png").read_bytes()
  (probe / "p1.png").write_bytes(data[:len(data) // 2])
  before = snapshot(workdir)
  with pytest.raises(ValueError, match=re.escape(f"{probe / 'p1.png'}: not a readable image: ")) as error:
    identify.identify(str(workdir), str(gallery), str(probe))
  assert "BytesIO" not in str(error.value)
  assert snapshot(workdir) == before  # no gallery cache, no CSV
