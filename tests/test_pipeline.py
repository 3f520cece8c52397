"""TFDS builders (synthetic_faces, casia_webface, face_folder) and the tf.data training iterator."""

import hashlib
import itertools
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf  # noqa: E402  (after pipeline, which hides the GPUs first)
import tensorflow_datasets as tfds  # noqa: E402
from PIL import Image, ImageEnhance, ImageOps

from adaptface_jax.data import pipeline, recordio, synthetic, tfds_builders

TINY = "synthetic_faces/tiny"
NUM_EXAMPLES, NUM_CLASSES = 16 * 8, 16


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  tfds.builder(TINY, data_dir=str(root)).download_and_prepare()
  return str(root)


def _batches(data_dir, count, **options):
  options = {"batch_size": 16, "seed": 0, **options}
  return list(itertools.islice(pipeline.train_iterator(TINY, data_dir=data_dir, **options), count))


def _digest(image):
  return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


def test_tfds_load_by_name_keeps_the_original_bytes(data_dir):
  dataset = tfds.load(TINY, data_dir=data_dir, split="train", decoders={"image": tfds.decode.SkipDecoding()})
  examples = list(dataset.as_numpy_iterator())
  assert len(examples) == NUM_EXAMPLES
  world = tfds_builders.synthetic_world_for(TINY, data_dir=data_dir)
  record = recordio.InsightFaceRecord(world["train"])
  original = {record.read(key)[0]: record.read(key)[1] for key in record.image_keys.tolist()}
  assert {example["image"]: int(example["label"]) for example in examples} == original
  assert {int(example["domain"]) for example in examples} <= {0, 1, 2}
  decoded = next(iter(tfds.load(TINY, data_dir=data_dir, split="train").take(1)))
  assert decoded["image"].shape == (112, 112, 3) and decoded["image"].dtype == tf.uint8
  assert tfds.builder(TINY, data_dir=data_dir).info.metadata["num_classes"] == NUM_CLASSES
  assert pipeline.dataset_info(TINY, data_dir=data_dir) == {"num_examples": NUM_EXAMPLES, "num_classes": NUM_CLASSES}
  assert set(world["benchmarks"]) == set(synthetic.BENCHMARKS)
  with pytest.raises(ValueError, match="not a synthetic_faces"):
    tfds_builders.synthetic_world_for("casia_webface", data_dir=data_dir)


def test_batches_have_the_promised_shapes_and_types(data_dir):
  batch = _batches(data_dir, 1)[0]
  assert set(batch) == {"image", "label", "domain"}
  assert batch["image"].shape == (16, 112, 112, 3) and batch["image"].dtype == np.uint8
  assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
  assert batch["domain"].shape == (16,) and batch["domain"].dtype == np.int32
  assert batch["label"].min() >= 0 and batch["label"].max() < NUM_CLASSES


def test_every_epoch_is_a_new_permutation_of_the_data(data_dir):
  steps_per_epoch = NUM_EXAMPLES // 16
  batches = _batches(data_dir, 2 * steps_per_epoch, flip=False)
  epochs = [[_digest(image) for batch in batches[e * steps_per_epoch:(e + 1) * steps_per_epoch]
             for image in batch["image"]] for e in range(2)]
  assert len(set(epochs[0])) == NUM_EXAMPLES and set(epochs[0]) == set(epochs[1])
  assert epochs[0] != epochs[1]


def test_same_seed_same_batches_other_seed_other_batches(data_dir):
  first, second = _batches(data_dir, 3, seed=7), _batches(data_dir, 3, seed=7)
  other = _batches(data_dir, 3, seed=8)
  for a, b in zip(first, second):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(first[0]["label"], other[0]["label"])


@pytest.mark.parametrize("start_step", [5, 11])  # inside the first epoch, and in the second (8 steps per epoch)
def test_resuming_gives_the_batches_a_fresh_iterator_gives_later(data_dir, start_step):
  fresh = _batches(data_dir, start_step + 4, seed=3, randaugment=(2, 9))
  resumed = _batches(data_dir, 4, seed=3, randaugment=(2, 9), start_step=start_step)
  for a, b in zip(fresh[start_step:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("start_step", [0, 7])
def test_process_slices_concatenate_to_the_single_process_batches(data_dir, start_step):
  # So a run trains on the same batches on any number of hosts, and can resume on another number.
  options = dict(seed=5, randaugment=(2, 9), start_step=start_step)
  single = _batches(data_dir, 3, **options)
  slices = [_batches(data_dir, 3, process_index=index, process_count=2, **options) for index in range(2)]
  for step, batch in enumerate(single):
    assert slices[0][step]["image"].shape[0] == 8
    for key in batch:
      np.testing.assert_array_equal(np.concatenate([slices[0][step][key], slices[1][step][key]]), batch[key])


def test_flip_mirrors_some_images_and_leaves_the_others(data_dir):
  plain = np.concatenate([b["image"] for b in _batches(data_dir, 2, flip=False)])
  flipped = np.concatenate([b["image"] for b in _batches(data_dir, 2, flip=True)])
  mirrored = np.array([np.array_equal(f, p[:, ::-1]) for f, p in zip(flipped, plain)])
  unchanged = np.array([np.array_equal(f, p) for f, p in zip(flipped, plain)])
  assert np.all(mirrored | unchanged) and mirrored.sum() >= 4 and unchanged.sum() >= 4


def test_randaugment_changes_images_and_keeps_their_type(data_dir):
  plain = _batches(data_dir, 1, flip=False)[0]
  augmented = _batches(data_dir, 1, flip=False, randaugment=(2, 9))[0]
  np.testing.assert_array_equal(plain["label"], augmented["label"])  # same order: only the pixels change
  assert augmented["image"].dtype == np.uint8 and augmented["image"].shape == plain["image"].shape
  changed = [not np.array_equal(a, p) for a, p in zip(augmented["image"], plain["image"])]
  assert sum(changed) >= 10


def test_each_randaugment_op_keeps_shape_and_dtype_and_acts(data_dir):
  image = tf.constant(_batches(data_dir, 1, flip=False)[0]["image"][0])
  for index, name in enumerate(pipeline.RANDAUGMENT_OPS):
    for sign in (1.0, -1.0):
      result = pipeline.apply_randaugment_op(image, index, 15, sign)
      assert result.dtype == tf.uint8 and result.shape == image.shape, name
      assert np.array_equal(result.numpy(), image.numpy()) == (name == "identity"), (name, sign)
  assert np.array_equal(pipeline.apply_randaugment_op(image, pipeline.RANDAUGMENT_OPS.index("rotate"), 0).numpy(),
                        image.numpy())  # magnitude 0 of a geometric op is the identity


# RandAugment against a reference built with PIL, with the magnitudes of torchvision's RandAugment (31 bins) and the
# semantics of its ops (F.affine / F.rotate with nearest interpolation and fill 0 for the geometric ones). Where PIL
# and torchvision differ, the degenerate images of the blending ops follow torchvision, and the blend is PIL's
# Image.blend, d + f * (x - d) in float32, truncated: torchvision's own f * x + (1 - f) * d lands a hair under a whole
# level on some pixels and truncates one level lower (up to 3% of them at magnitude 9).

_SIGNED_OPS = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color", "contrast",
               "sharpness")


def _torchvision_magnitude(name: str, magnitude: int, height: int, width: int) -> float:
  """Bin `magnitude` of op `name` in torchvision's RandAugment._augmentation_space(31, (height, width))."""
  def bins(top):
    return float(np.linspace(0.0, top, 31, dtype=np.float32)[magnitude])

  return {"shear_x": bins(0.3), "shear_y": bins(0.3), "translate_x": bins(150.0 / 331.0 * width),
          "translate_y": bins(150.0 / 331.0 * height), "rotate": bins(30.0), "brightness": bins(0.9),
          "color": bins(0.9), "contrast": bins(0.9), "sharpness": bins(0.9),
          "posterize": 8 - round(magnitude / ((31 - 1) / 4)), "solarize": 255.0 - bins(255.0)}.get(name, 0.0)


def _torchvision_grayscale(face: np.ndarray) -> np.ndarray:
  """torchvision's rgb_to_grayscale of a uint8 image: its weights, truncated to uint8 (PIL's "L" has 0.299 for red,
  and rounds)."""
  return (face.astype(np.float32) @ np.array([0.2989, 0.587, 0.114], np.float32)).astype(np.uint8)


def _reference_op(face: np.ndarray, name: str, value: float) -> np.ndarray:
  """What torchvision's RandAugment does to a uint8 image with op `name` at (signed) magnitude `value`."""
  image = Image.fromarray(face)

  def affine(*coefficients):  # PIL's affine maps output to input coordinates, the origin at the top-left corner
    return image.transform(image.size, Image.Transform.AFFINE, coefficients, resample=Image.Resampling.NEAREST,
                           fillcolor=(0, 0, 0))

  if name == "contrast":
    # torchvision's degenerate image is the mean of its grayscale, unrounded (ImageEnhance.Contrast rounds the mean
    # of "L" to an integer); it is blended as Image.blend blends (float32, then truncated).
    mean = _torchvision_grayscale(face).astype(np.float32).mean()
    factor = np.float32(1.0 + value)
    return np.clip(mean + factor * (face.astype(np.float32) - mean), 0, 255).astype(np.uint8)
  operations = {
      "identity": lambda: image,
      "shear_x": lambda: affine(1, value, 0, 0, 1, 0),  # about the corner: torchvision's center=[0, 0]
      "shear_y": lambda: affine(1, 0, 0, value, 1, 0),
      "translate_x": lambda: affine(1, 0, -int(value), 0, 1, 0),  # whole pixels: torchvision's int(magnitude)
      "translate_y": lambda: affine(1, 0, 0, 0, 1, -int(value)),
      "rotate": lambda: image.rotate(value, resample=Image.Resampling.NEAREST, fillcolor=(0, 0, 0)),
      "brightness": lambda: ImageEnhance.Brightness(image).enhance(1.0 + value),
      # ImageEnhance.Color blended with torchvision's grayscale rather than PIL's "L"
      "color": lambda: Image.blend(Image.fromarray(_torchvision_grayscale(face)).convert("RGB"), image, 1.0 + value),
      "sharpness": lambda: ImageEnhance.Sharpness(image).enhance(1.0 + value),  # the 3x3 kernel of torchvision
      "posterize": lambda: ImageOps.posterize(image, int(value)),
      "solarize": lambda: ImageOps.solarize(image, value),
      "autocontrast": lambda: ImageOps.autocontrast(image),
      "equalize": lambda: ImageOps.equalize(image),
  }
  return np.asarray(operations[name]())


@pytest.fixture(scope="module")
def face():
  return _faces(1)[0]


@pytest.mark.parametrize("magnitude", [9, 15])
@pytest.mark.parametrize("name, sign", [(name, sign) for name in pipeline.RANDAUGMENT_OPS
                                        for sign in ((1, -1) if name in _SIGNED_OPS else (1,))])
def test_randaugment_op_matches_the_torchvision_reference(face, name, sign, magnitude):
  for image in (face, face[:, 8:104]):  # and a crop whose height and width differ
    height, width = image.shape[:2]
    value = sign * _torchvision_magnitude(name, magnitude, height, width)
    expected = _reference_op(image, name, value)
    ours = pipeline.apply_randaugment_op(tf.constant(image), pipeline.RANDAUGMENT_OPS.index(name), magnitude,
                                         float(sign)).numpy()
    differ = np.any(ours != expected, axis=-1)
    if name == "rotate":
      # PIL's nearest-neighbour affine runs in 16.16 fixed point, its source coordinates off by up to
      # (1 + width + height) / 2 ** 17 = 0.0017 pixel: where that crosses a pixel edge it takes the neighbouring
      # pixel (ours, and torchvision's tensor version, compute in floating point). Measured: at most 3 of 10752
      # pixels (0.03%), each within 0.0002 pixel of an edge.
      y, x = np.nonzero(differ)
      angle = -np.radians(value)
      dx, dy = x + 0.5 - width / 2, y + 0.5 - height / 2  # PIL samples at pixel centres, rotates about w/2, h/2
      source = np.stack([np.cos(angle) * dx + np.sin(angle) * dy + width / 2,
                         -np.sin(angle) * dx + np.cos(angle) * dy + height / 2])
      assert differ.mean() < 0.0005, (differ.sum(), image.shape)
      assert np.all(np.abs(source - np.round(source)).min(axis=0) < 0.002)
    elif name == "autocontrast":
      # ImageOps.autocontrast's table is ix * scale - low * scale in double precision: one level low where that
      # lands a hair under a whole level (red 200 here, the channel's maximum: 254, not 255). torchvision's tensor
      # version, and ours, give the exact level. Measured: 1 pixel in either image.
      low, high = image.min(axis=(0, 1)).astype(int), image.max(axis=(0, 1)).astype(int)
      exact = (image - low) * 255 // (high - low)
      np.testing.assert_array_equal(ours, exact)
      assert np.all((expected == exact) | (expected == exact - 1)) and differ.mean() < 0.001
    else:
      np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("options, message", [
    (dict(batch_size=15, process_count=2), "divisible"),
    (dict(randaugment=(2, 31)), "magnitude"),
    (dict(randaugment="strong"), "num_layers, magnitude"),
    (dict(process_index=2, process_count=2), "process_index"),
    (dict(batch_size=NUM_EXAMPLES + 16), "fewer than"),
])
def test_bad_options_are_refused(data_dir, options, message):
  with pytest.raises(ValueError, match=message):
    next(pipeline.train_iterator(TINY, data_dir=data_dir, **{"batch_size": 16, "seed": 0, **options}))


def _faces(count):
  renderer = synthetic.FaceRenderer(112)
  return [renderer.render(synthetic.make_identity(1, index % 3), synthetic.sample_nuisance(
      np.random.default_rng(index), "train"), np.random.default_rng(index)) for index in range(count)]


def test_casia_webface_from_a_manual_record(tmp_path):
  manual = tmp_path / "manual"
  faces = _faces(9)
  samples = [(recordio.encode_image(face), index % 3) for index, face in enumerate(faces)]
  recordio.write_insightface_record(manual, samples)
  data_dir = str(tmp_path / "tfds")
  assert pipeline.dataset_info("casia_webface", data_dir=data_dir, manual_dir=manual) == {
      "num_examples": 9, "num_classes": 3}
  dataset = pipeline.prepared_builder("casia_webface", data_dir=data_dir, manual_dir=manual).as_dataset(
      split="train", decoders={"image": tfds.decode.SkipDecoding()})
  stored = sorted((example["image"], int(example["label"]), int(example["domain"]))
                  for example in dataset.as_numpy_iterator())
  assert stored == sorted((data, label, -1) for data, label in samples)
  batch = next(pipeline.train_iterator("casia_webface", data_dir=data_dir, manual_dir=manual, batch_size=4, seed=0))
  assert batch["image"].shape == (4, 112, 112, 3) and np.all(batch["domain"] == -1)


def test_casia_webface_says_which_file_is_missing(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "lfw.bin").write_bytes(b"not the training set")
  with pytest.raises(FileNotFoundError, match=str(manual / "train.rec")):
    pipeline.dataset_info("casia_webface", data_dir=str(tmp_path / "tfds"), manual_dir=manual)
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
    pipeline.dataset_info("casia_webface", data_dir=str(tmp_path / "tfds"), manual_dir=tmp_path / "nowhere")
  builder = tfds.builder("casia_webface", data_dir=str(tmp_path / "tfds"))
  assert "train.rec" in builder.MANUAL_DOWNLOAD_INSTRUCTIONS
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="train.rec"):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(empty)))


def test_face_folder_builder(tmp_path):
  root = tmp_path / "faces"
  faces = _faces(5)
  for index, (name, suffix) in enumerate([("bob", "jpg"), ("bob", "png"), ("amy", "jpg"), ("cid", "png"),
                                          ("cid", "jpg")]):
    (root / name).mkdir(parents=True, exist_ok=True)
    Image.fromarray(faces[index]).save(root / name / f"{index}.{suffix}")
  data_dir = str(tmp_path / "tfds")
  assert pipeline.dataset_info("face_folder", data_dir=data_dir, manual_dir=root) == {
      "num_examples": 5, "num_classes": 3}
  # The prepared data is loadable by name too: its config is the source key.
  name = "face_folder/" + tfds_builders.FaceFolder.source_config_name(root)
  dataset = tfds.load(name, data_dir=data_dir, split="train", decoders={"image": tfds.decode.SkipDecoding()})
  stored = {example["image"]: int(example["label"]) for example in dataset.as_numpy_iterator()}
  expected = {path.read_bytes(): ["amy", "bob", "cid"].index(path.parent.name) for path in root.glob("*/*")}
  assert stored == expected
  Image.fromarray(faces[0][:100]).save(root / "amy" / "small.png")
  with pytest.raises(ValueError, match="small.png.*100x112"):
    tfds.builder("face_folder", data_dir=str(tmp_path / "other")).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(root)))


def _write_rec(manual, num_classes, count):
  faces = _faces(count)
  recordio.write_insightface_record(manual, [(recordio.encode_image(face), index % num_classes)
                                             for index, face in enumerate(faces)])


def _source_log(caplog):
  return [record.getMessage() for record in caplog.records if record.name == "adaptface_jax.data.pipeline"]


def _files_and_mtimes(directory):
  return {path: path.stat().st_mtime_ns for path in Path(directory).rglob("*") if path.is_file()}


def test_prepared_data_is_keyed_by_its_source(tmp_path, caplog):
  first, second = tmp_path / "first", tmp_path / "second"
  _write_rec(first, 3, 6)
  _write_rec(second, 2, 4)
  data_dir = str(tmp_path / "tfds")
  caplog.set_level(logging.INFO, logger="adaptface_jax.data.pipeline")
  assert pipeline.dataset_info("casia_webface", data_dir=data_dir, manual_dir=first) == {
      "num_examples": 6, "num_classes": 3}
  assert pipeline.dataset_info("casia_webface", data_dir=data_dir, manual_dir=second) == {
      "num_examples": 4, "num_classes": 2}
  messages = _source_log(caplog)
  assert len(messages) == 2 and all(m.startswith("casia_webface: preparing ") for m in messages)
  assert messages[0].endswith(f"from {first.resolve()}") and messages[1].endswith(f"from {second.resolve()}")
  prepared = {path.name for path in (tmp_path / "tfds" / "casia_webface").iterdir()}
  assert len(prepared) == 2 and all(name.startswith("src-") for name in prepared)

  # The same source again (from dataset_info, then train_iterator): reused, not prepared again.
  before = _files_and_mtimes(tmp_path / "tfds" / "casia_webface")
  caplog.clear()
  builder = pipeline.prepared_builder("casia_webface", data_dir=data_dir, manual_dir=first)
  batch = next(pipeline.train_iterator("casia_webface", data_dir=data_dir, manual_dir=first, batch_size=6, seed=0))
  assert sorted(batch["label"].tolist()) == [0, 0, 1, 1, 2, 2]
  assert _files_and_mtimes(tmp_path / "tfds" / "casia_webface") == before
  messages = _source_log(caplog)
  assert len(messages) == 2 and all(m.startswith("casia_webface: reusing ") for m in messages)
  assert builder.info.config_description.startswith(f"prepared from {first.resolve()}")

  # The first source rewritten in place (another identity): prepared afresh.
  _write_rec(first, 4, 8)
  assert pipeline.dataset_info("casia_webface", data_dir=data_dir, manual_dir=first) == {
      "num_examples": 8, "num_classes": 4}
  assert len(list((tmp_path / "tfds" / "casia_webface").iterdir())) == 3


def test_corrupt_image_is_refused_when_the_data_is_prepared(tmp_path):
  faces = _faces(6)
  encoded = [recordio.encode_image(face) for face in faces]
  encoded[4] = encoded[4][:len(encoded[4]) // 2]  # a truncated JPEG: its header still reads 112x112
  manual = tmp_path / "manual"
  recordio.write_insightface_record(manual, [(data, index // 2) for index, data in enumerate(encoded)])
  with pytest.raises(ValueError, match=re.escape(f"{manual / 'train.rec'} key 5: not a readable JPEG/PNG image")):
    pipeline.dataset_info("casia_webface", data_dir=str(tmp_path / "tfds"), manual_dir=manual)

  root = tmp_path / "faces"
  for index, data in enumerate(encoded):
    (root / f"id{index // 2}").mkdir(parents=True, exist_ok=True)
    (root / f"id{index // 2}" / f"{index}.jpg").write_bytes(data)
  with pytest.raises(ValueError, match=re.escape(f"{root / 'id2' / '4.jpg'}: not a readable JPEG/PNG image")):
    pipeline.dataset_info("face_folder", data_dir=str(tmp_path / "tfds"), manual_dir=root)
