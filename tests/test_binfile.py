"""Verification .bin files: round trip, Python-2 pickles, numpy entries, and refusal of anything else."""

import builtins
import collections
import os
import pickle
import struct

import numpy as np
import pytest

from adaptface_jax.data import binfile, recordio
from adaptface_jax.data.binfile import load_pairs, read_bin, write_bin


def images(count, size=16, seed=0):
  rng = np.random.RandomState(seed)
  return [rng.randint(0, 256, (size, size, 3)).astype(np.uint8) for _ in range(count)]


def test_round_trip_arrays_and_bytes(tmp_path):
  arrays = images(6)
  write_bin(tmp_path / "p.bin", arrays, [True, False, True], image_format="png")
  decoded, issame = load_pairs(tmp_path / "p.bin")
  assert decoded.dtype == np.uint8 and decoded.shape == (6, 16, 16, 3)
  assert np.array_equal(decoded, np.stack(arrays))  # PNG: lossless, pair order kept
  assert issame.dtype == bool and issame.tolist() == [True, False, True]

  encoded = [recordio.encode_image(image, "jpg") for image in arrays[:4]]
  write_bin(tmp_path / "j.bin", encoded, np.array([False, True]))
  bins, issame = read_bin(tmp_path / "j.bin")
  assert bins == encoded and issame.tolist() == [False, True]
  with open(tmp_path / "j.bin", "rb") as handle:
    assert handle.read(2) == b"\x80\x04"  # protocol 4
  with pytest.raises(ValueError, match="3 images for 2 pairs"):
    write_bin(tmp_path / "bad.bin", encoded[:3], [True, False])


def python2_pickle(bins: list[bytes], issame: list[bool]) -> bytes:
  """What Python 2's cPickle.dump((bins, issame), f, protocol=2) writes: bytes are `str` (BINSTRING)."""
  out = [b"\x80\x02", b"]", b"("]  # PROTO 2, EMPTY_LIST, MARK
  for data in bins:
    out.append(b"T" + struct.pack("<i", len(data)) + data)  # BINSTRING
  out += [b"e", b"]", b"("]  # APPENDS, EMPTY_LIST, MARK
  out += [b"\x88" if value else b"\x89" for value in issame]  # NEWTRUE / NEWFALSE
  out += [b"e", b"\x86", b"."]  # APPENDS, TUPLE2, STOP
  return b"".join(out)


def test_python2_pickle_loads(tmp_path):
  encoded = [recordio.encode_image(image, "jpg") for image in images(4)]
  data = python2_pickle(encoded, [True, False])
  with pytest.raises(UnicodeDecodeError):
    pickle.loads(data)  # the default ASCII decoding of Python-2 strings fails on image bytes
  (tmp_path / "py2.bin").write_bytes(data)
  bins, issame = read_bin(tmp_path / "py2.bin")
  assert bins == encoded and issame.tolist() == [True, False]
  # Python 3 protocol-2 pickles write bytes through _codecs.encode(..., 'latin1').
  (tmp_path / "py3p2.bin").write_bytes(pickle.dumps((encoded, [True, False]), protocol=2))
  assert read_bin(tmp_path / "py3p2.bin")[0] == encoded


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_uint8_entries_load(tmp_path, protocol):
  encoded = [recordio.encode_image(image, "png") for image in images(2)]
  as_arrays = [np.frombuffer(data, np.uint8) for data in encoded]
  (tmp_path / "n.bin").write_bytes(pickle.dumps((as_arrays, np.array([True])), protocol=protocol))
  bins, issame = read_bin(tmp_path / "n.bin")
  assert bins == encoded and issame.tolist() == [True]
  assert np.array_equal(load_pairs(tmp_path / "n.bin")[0][1], images(2)[1])


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_float_array_is_refused(tmp_path, protocol):
  (tmp_path / "f.bin").write_bytes(pickle.dumps(([np.zeros(4, np.float32), b"x"], [True]), protocol=protocol))
  with pytest.raises(pickle.UnpicklingError, match=r"f\.bin: refused numpy dtype float32"):
    read_bin(tmp_path / "f.bin")


class _RunsCommand:
  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


class _OpensFile:
  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return builtins.open, (self.path, "w")


@pytest.mark.parametrize("payload_kind", ["os.system", "builtins.open"])
def test_code_in_the_pickle_never_runs(tmp_path, payload_kind):
  def payload(marker):
    return _RunsCommand(f"touch {marker}") if payload_kind == "os.system" else _OpensFile(str(marker))

  # The payload is real: an ordinary unpickler creates the file.
  control = tmp_path / "control"
  pickle.loads(pickle.dumps(([payload(control), b"x"], [True])))
  assert control.exists()

  marker = tmp_path / "created_by_pickle"
  evil = tmp_path / "evil.bin"
  evil.write_bytes(pickle.dumps(([payload(marker), b"x"], [True]), protocol=4))
  refused_global = "system" if payload_kind == "os.system" else "open"
  with pytest.raises(pickle.UnpicklingError, match=rf"evil\.bin: refused to load global .*{refused_global}"):
    read_bin(evil)
  evil.write_bytes(pickle.dumps(([payload(marker), b"x"], [True]), protocol=2))
  with pytest.raises(pickle.UnpicklingError, match="refused to load global"):
    read_bin(evil)
  assert not marker.exists()


def test_other_globals_and_bad_structure_are_refused(tmp_path):
  path = tmp_path / "o.bin"
  path.write_bytes(pickle.dumps((collections.OrderedDict(a=b"x"), [True])))
  with pytest.raises(binfile.RefusedPickleError, match="refused to load global collections.OrderedDict"):
    read_bin(path)
  path.write_bytes(pickle.dumps(([b"a", b"b", b"c"], [True])))
  with pytest.raises(ValueError, match="3 images for 1 pairs"):
    read_bin(path)
  path.write_bytes(pickle.dumps(([b"a", "text"], [True])))
  with pytest.raises(ValueError, match="image 1 is a str"):
    read_bin(path)
  path.write_bytes(pickle.dumps(([b"a", b"b"], ["yes"])))
  with pytest.raises(ValueError, match=r"issame_list\[0\] = 'yes'"):
    read_bin(path)
  path.write_bytes(pickle.dumps(([b"a", b"b"], [True]))[:-5])
  with pytest.raises(pickle.UnpicklingError, match=r"o\.bin: not a readable"):
    read_bin(path)
  path.write_bytes(pickle.dumps(([b"not an image", b"b"], [True])))
  with pytest.raises(ValueError, match=r"image 0 \(pair 0\) is corrupt"):
    load_pairs(path)
  assert binfile._ALLOWED_DTYPES == (np.dtype(np.uint8), np.dtype(np.bool_))
