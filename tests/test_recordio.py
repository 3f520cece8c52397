"""RecordIO / InsightFace .rec reading and writing, checked against the byte layout parsed independently."""

import logging
import pickle
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from adaptface_jax.data import recordio
from adaptface_jax.data.recordio import (
  MAGIC,
  InsightFaceRecord,
  RecordIOError,
  RecordIOReader,
  RecordIOWriter,
  pack_image_record,
  unpack_image_record,
  write_insightface_record,
)

MAGIC_BYTES = struct.pack("<I", 0xCED7230A)


def smooth_image(seed: int, size: int = 32) -> np.ndarray:
  """Low-frequency colour pattern: JPEG q95 reproduces it within a few grey levels."""
  rng = np.random.RandomState(seed)
  yy, xx = np.mgrid[0:size, 0:size] / size
  channels = [128 + 90 * np.sin(2 * np.pi * (rng.uniform(0.3, 1.2) * xx + rng.uniform(0.3, 1.2) * yy)
                                + rng.uniform(0, 6)) for _ in range(3)]
  return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


def parse_rec_by_hand(data: bytes) -> list[tuple[int, list[tuple[int, bytes]]]]:
  """Independent parser: [(record offset, [(cflag, part bytes), ...]), ...], asserting magic and zero padding."""
  records = []
  position = 0
  while position < len(data):
    start = position
    parts = []
    while True:
      magic, lrec = struct.unpack_from("<II", data, position)
      assert magic == 0xCED7230A
      cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
      part = data[position + 8:position + 8 + length]
      assert len(part) == length
      padding = (4 - length % 4) % 4
      assert data[position + 8 + length:position + 8 + length + padding] == b"\0" * padding
      parts.append((cflag, part))
      position += 8 + length + padding
      if cflag in (0, 3):
        break
    records.append((start, parts))
  return records


def test_magic_constant_and_header_layout():
  assert MAGIC == 0xCED7230A
  payload = pack_image_record(7, b"IMG", id=5, id2=9)
  assert payload == struct.pack("<IfQQ", 0, 7.0, 5, 9) + b"IMG"
  header, image = unpack_image_record(payload)
  assert header == (0, 7.0, 5, 9) and image == b"IMG"


def test_array_labels_round_trip_and_float32_label_field():
  labels = np.array([3.0, 0.25, -1.5], dtype=np.float32)
  payload = pack_image_record(labels, b"xyz", id=1)
  flag, label, _, _ = struct.unpack_from("<IfQQ", payload)
  assert (flag, label) == (3, 0.0)
  assert np.array_equal(np.frombuffer(payload[24:36], "<f4"), labels)
  header, image = unpack_image_record(payload)
  assert header.flag == 3 and header.label.dtype == np.float32 and np.array_equal(header.label, labels)
  assert image == b"xyz"
  # The scalar label is a float32 field: 2**24 + 1 is not representable and comes back rounded.
  header, _ = unpack_image_record(pack_image_record(2**24 + 1, b""))
  assert header.label == 2**24
  with pytest.raises(ValueError, match="announces 4 float32 labels"):
    unpack_image_record(struct.pack("<IfQQ", 4, 0, 0, 0) + b"\0" * 8)


def test_writer_bytes_match_the_layout_exactly(tmp_path):
  # These exact bytes are also what MXNet 1.9.1's MXIndexedRecordIO writes for the same payloads.
  unaligned = b"ab" + MAGIC_BYTES + b"cd"
  split = b"abcd" + MAGIC_BYTES + b"e"
  with RecordIOWriter(tmp_path / "a.rec", tmp_path / "a.idx") as writer:
    writer.write(10, unaligned)
    writer.write(11, split)
  expected = (MAGIC_BYTES + struct.pack("<I", 8) + unaligned
              + MAGIC_BYTES + struct.pack("<I", (1 << 29) | 4) + b"abcd"
              + MAGIC_BYTES + struct.pack("<I", (3 << 29) | 1) + b"e\0\0\0")
  assert (tmp_path / "a.rec").read_bytes() == expected
  assert (tmp_path / "a.idx").read_text() == "10\t0\n11\t16\n"


def test_payloads_containing_the_magic_survive(tmp_path):
  rng = np.random.RandomState(0)
  payloads = {
      0: b"",
      1: MAGIC_BYTES,
      2: MAGIC_BYTES + b"abcd" + MAGIC_BYTES,  # at the start and at the end
      3: MAGIC_BYTES * 5,  # consecutive
      4: b"12345678" + MAGIC_BYTES + rng.bytes(37) + MAGIC_BYTES[:3],  # aligned, then a partial magic at the end
      5: b"x" + MAGIC_BYTES + b"yyy",  # unaligned: not split
      6: rng.bytes(4000),
      7: b"".join(rng.bytes(4 * rng.randint(0, 5)) + MAGIC_BYTES for _ in range(20)) + b"tail",
  }
  with RecordIOWriter(tmp_path / "m.rec", tmp_path / "m.idx") as writer:
    for key, payload in payloads.items():
      writer.write(key, payload)

  records = parse_rec_by_hand((tmp_path / "m.rec").read_bytes())
  assert len(records) == len(payloads)
  idx_offsets = [int(line.split("\t")[1]) for line in (tmp_path / "m.idx").read_text().splitlines()]
  assert idx_offsets == [offset for offset, _ in records]
  for (_, parts), payload in zip(records, payloads.values()):
    assert MAGIC_BYTES.join(part for _, part in parts) == payload
    aligned_hits = sum(1 for i in range(0, len(payload) - 3, 4) if payload[i:i + 4] == MAGIC_BYTES)
    assert len(parts) == aligned_hits + 1
    flags = [cflag for cflag, _ in parts]
    assert flags == ([0] if len(parts) == 1 else [1] + [2] * (len(parts) - 2) + [3])
    assert all(MAGIC_BYTES not in part[i:i + 4] for _, part in parts for i in range(0, len(part) - 3, 4))
  assert [len(parts) for _, parts in records][:4] == [1, 2, 3, 6]

  indexed = RecordIOReader(tmp_path / "m.rec", tmp_path / "m.idx")
  assert indexed.keys == list(payloads)
  for key, payload in payloads.items():
    assert indexed.read(key) == payload
    assert indexed.read_at(indexed.offset_of(key)) == payload
  sequential = RecordIOReader(tmp_path / "m.rec")
  assert list(sequential) == list(enumerate(payloads.values()))


def test_reads_from_several_threads_agree(tmp_path):
  rng = np.random.RandomState(1)
  payloads = [rng.bytes(rng.randint(1, 3000)) for _ in range(64)]
  with RecordIOWriter(tmp_path / "t.rec", tmp_path / "t.idx") as writer:
    for key, payload in enumerate(payloads):
      writer.write(key, payload)
  reader = RecordIOReader(tmp_path / "t.rec", tmp_path / "t.idx")
  keys = list(rng.randint(0, 64, size=2000))
  with ThreadPoolExecutor(8) as pool:
    results = list(pool.map(reader.read, keys))
  assert all(result == payloads[key] for key, result in zip(keys, results))
  clone = pickle.loads(pickle.dumps(reader))  # e.g. shipped to a worker process
  assert clone.read(5) == payloads[5]


def test_truncated_rec_and_bad_idx_errors_name_file_and_offset(tmp_path):
  rec, idx = tmp_path / "x.rec", tmp_path / "x.idx"
  with RecordIOWriter(rec, idx) as writer:
    for key in range(3):
      writer.write(key, bytes([key]) * 100)
  data = rec.read_bytes()
  rec.write_bytes(data[:-50])  # cut inside record 2 (at offset 216)
  reader = RecordIOReader(rec, idx)
  assert reader.read(1) == b"\1" * 100
  with pytest.raises(RecordIOError, match=r"x\.rec: truncated record at byte offset 216"):
    reader.read(2)
  with pytest.raises(RecordIOError, match=r"x\.rec: truncated record at byte offset 216"):
    RecordIOReader(rec)  # the header walk without .idx
  rec.write_bytes(data[:220])  # cut inside record 2's header
  with pytest.raises(RecordIOError, match=r"truncated record at byte offset 216"):
    RecordIOReader(rec, idx).read(2)

  rec.write_bytes(data)
  idx.write_text("0\t0\n1\t108\n2\t5000\n")
  with pytest.raises(RecordIOError, match=r"x\.idx: key 2 points to byte offset 5000, past the end of .*x\.rec"):
    RecordIOReader(rec, idx)
  idx.write_text("0\t0\n1\t152\n")  # inside record 1's payload
  with pytest.raises(RecordIOError, match=r"x\.rec: bad magic 0x01010101 at byte offset 152"):
    RecordIOReader(rec, idx).read(1)
  idx.write_text("0\t0\n1 x\n")
  with pytest.raises(RecordIOError, match=r"x\.idx:2"):
    RecordIOReader(rec, idx)


def _write_png_world(out_dir, labels, size=24, **kwargs):
  images = [smooth_image(i, size) for i in range(len(labels))]
  info = write_insightface_record(out_dir, zip(images, labels), image_format="png", **kwargs)
  return images, info


def test_insightface_layout_written_grouped_and_read_back(tmp_path):
  labels = [2, 0, 1, 0, 2, 2, 1]
  images, info = _write_png_world(tmp_path, labels)
  assert info == {"images": 7, "identities": 3, "rec": str(tmp_path / "train.rec"),
                  "idx": str(tmp_path / "train.idx"), "property": str(tmp_path / "property")}
  assert (tmp_path / "property").read_text().strip() == "3,24,24"

  # Independent check of the layout: header record, images grouped by label, identity records.
  records = parse_rec_by_hand((tmp_path / "train.rec").read_bytes())
  payloads = [MAGIC_BYTES.join(part for _, part in parts) for _, parts in records]
  assert len(payloads) == 1 + 7 + 3
  flag, _, _, _ = struct.unpack_from("<IfQQ", payloads[0])
  assert flag == 2 and struct.unpack_from("<2f", payloads[0], 24) == (8.0, 11.0)
  assert [struct.unpack_from("<IfQQ", p)[1] for p in payloads[1:8]] == [0, 0, 1, 1, 2, 2, 2]
  assert [struct.unpack_from("<2f", p, 24) for p in payloads[8:]] == [(1, 3), (3, 5), (5, 8)]

  record = InsightFaceRecord(tmp_path)
  assert record.layout == "insightface"
  assert record.num_images == 7 and record.num_classes == 3
  assert record.image_keys.dtype == np.int64 and record.image_keys.tolist() == list(range(1, 8))
  assert record.identity_ranges == {0: (1, 3), 1: (3, 5), 2: (5, 8)}
  assert record.labels().tolist() == [0, 0, 1, 1, 2, 2, 2]
  stable_order = sorted(range(7), key=lambda i: labels[i])
  for key, source_index in zip(record.image_keys, stable_order):
    image, label = record.decode(key)
    assert label == labels[source_index]
    assert image.dtype == np.uint8 and np.array_equal(image, images[source_index])  # PNG: lossless
  assert InsightFaceRecord(tmp_path / "train.rec").num_images == 7
  with pytest.raises(KeyError, match="not an image key"):
    record.read(8)


def test_jpeg_records_within_tolerance_and_encoded_bytes_stored_as_given(tmp_path):
  images = [smooth_image(i, 32) for i in range(4)]
  custom = recordio.encode_image(images[3], "jpg", quality=50)
  write_insightface_record(tmp_path, [(images[0], 0), (images[1], 1), (images[2], 1), (custom, 2)])
  record = InsightFaceRecord(tmp_path)
  for key, source in zip(record.image_keys[:3], images):
    decoded, _ = record.decode(key)
    assert np.abs(decoded.astype(int) - source).mean() < 2.0
  assert record.read(4) == (custom, 2)


def test_im2rec_file_without_header(tmp_path):
  images, _ = _write_png_world(tmp_path / "a", [1, 0, 1], with_header=False)
  record = InsightFaceRecord(tmp_path / "a")
  assert record.layout == "im2rec"
  assert record.image_keys.tolist() == [0, 1, 2] and record.num_classes == 2
  assert record.labels().tolist() == [0, 1, 1]
  with pytest.raises(ValueError, match="im2rec file has no identity records"):
    record.identity_ranges

  # Hand-built im2rec file with array labels (class id first), keys in a shuffled order and no .idx beside it.
  with RecordIOWriter(tmp_path / "b.rec", tmp_path / "b.idx") as writer:
    for key, label in [(3, 2), (0, 0), (1, 2), (2, 1)]:
      writer.write(key, pack_image_record(np.array([label, 0.5]), recordio.encode_image(images[0], "png"), key))
  record = InsightFaceRecord(tmp_path / "b.rec")
  assert record.layout == "im2rec" and record.image_keys.tolist() == [3, 0, 1, 2]
  assert record.num_classes == 3 and record.labels().tolist() == [2, 0, 2, 1]
  assert np.array_equal(record.decode(1)[0], images[0])
  (tmp_path / "b.idx").unlink()
  record = InsightFaceRecord(tmp_path / "b.rec")
  assert record.image_keys.tolist() == [0, 1, 2, 3] and record.labels().tolist() == [2, 0, 2, 1]


def test_label_outside_num_classes_is_an_error(tmp_path):
  encoded = recordio.encode_image(smooth_image(0), "png")
  with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
    writer.write(0, pack_image_record(np.array([3, 5]), b""))  # 2 images, 2 identities
    writer.write(1, pack_image_record(0, encoded, 1))
    writer.write(2, pack_image_record(2, encoded, 2))  # label 2 with K = 2
    writer.write(3, pack_image_record(np.array([1, 2]), b""))
    writer.write(4, pack_image_record(np.array([2, 3]), b""))
  record = InsightFaceRecord(tmp_path)
  assert record.num_classes == 2 and record.read(1)[1] == 0
  with pytest.raises(ValueError, match=r"key 2 has label 2, outside \[0, 2\)"):
    record.read(2)
  with pytest.raises(ValueError, match=r"key 2 has label 2"):
    record.decode(2, on_error="skip")  # skipping covers corrupt images only, never wrong labels
  with pytest.raises(ValueError, match=r"key 2 has label 2"):
    record.labels()

  # im2rec labels that skip a class: 2 distinct labels, so label 5 is out of range.
  with RecordIOWriter(tmp_path / "gap.rec", tmp_path / "gap.idx") as writer:
    writer.write(0, pack_image_record(0, encoded))
    writer.write(1, pack_image_record(5, encoded))
  with pytest.raises(ValueError, match=r"key 1 has label 5, outside \[0, 2\).*0\.\.K-1"):
    InsightFaceRecord(tmp_path / "gap.rec").read(1)


def test_corrupt_image_raises_by_default_and_is_skipped_on_request(tmp_path, caplog):
  good = recordio.encode_image(smooth_image(0), "jpg")
  truncated = good[:-200]  # a readable JPEG header, missing pixel data
  write_insightface_record(tmp_path, [(good, 0), (truncated, 1)])
  record = InsightFaceRecord(tmp_path)
  assert record.decode(1)[1] == 0
  with pytest.raises(ValueError, match=r"train\.rec: key 2: corrupt image"):
    record.decode(2)
  with caplog.at_level(logging.WARNING, logger="adaptface_jax.data.recordio"):
    assert record.decode(2, on_error="skip") is None
  assert "key 2: corrupt image" in caplog.text and "skipped" in caplog.text


def test_write_rejects_bad_samples(tmp_path):
  image = smooth_image(0, 16)
  with pytest.raises(ValueError, match=r"labels \[1\] \(of K=3\) have no image"):
    write_insightface_record(tmp_path / "a", [(image, 0), (image, 2)])
  with pytest.raises(ValueError, match="sample 1 .* is 8x8 but earlier images are 16x16"):
    write_insightface_record(tmp_path / "b", [(image, 0), (smooth_image(1, 8), 0)])
  with pytest.raises(ValueError, match="sample 0: label must be an integer"):
    write_insightface_record(tmp_path / "c", [(image, 1.5)])
  with pytest.raises(ValueError, match="sample 0: expected a uint8 HxWx3"):
    write_insightface_record(tmp_path / "d", [(image.astype(np.float32), 0)])
  with pytest.raises(ValueError, match="written twice"):
    with RecordIOWriter(tmp_path / "e.rec") as writer:
      writer.write(1, b"")
      writer.write(1, b"")


def test_header_without_identity_records_counts_distinct_labels(tmp_path):
  encoded = recordio.encode_image(smooth_image(0, 8), "png")
  with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
    writer.write(0, pack_image_record(np.array([4, 4]), b""))  # 3 images, no identity records
    for key, label in [(1, 0), (2, 1), (3, 1)]:
      writer.write(key, pack_image_record(label, encoded, key))
  record = InsightFaceRecord(tmp_path)
  assert record.layout == "insightface" and record.num_images == 3
  assert record.num_classes == 2 and record.identity_ranges == {}
  assert record.labels().tolist() == [0, 1, 1]
