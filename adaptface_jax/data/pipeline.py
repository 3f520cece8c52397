"""tf.data training input: deterministic, resumable, per-process batches of uint8 faces.

Batches hold decoded, flipped / augmented images that are neither resized nor normalised: the model does both
on device with the same function at training and evaluation time.

Order. Epoch e is a pure function of (seed, e): the training split is rotated by a random offset, cut into
windows of `shuffle_buffer` examples and each window permuted with a stateless shuffle. Augmentation randomness is
keyed by the example's position in the stream. So the same seed gives the same batches whatever the thread count,
and `start_step=n` gives exactly the batches a fresh iterator gives after n batches (it skips at most one epoch of
undecoded records). Across processes, every process walks that one stream of undecoded records and decodes only
its slice of each global batch: the global batches, and so the training run, are the same whatever the number
of processes (a run may resume on another number of hosts), at the cost of each process reading all the record
bytes.
TFDS already shuffles examples when it writes a dataset, so windows are random subsets of the data; the
rotation changes window membership from epoch to epoch.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from adaptface_jax.data import tfds_builders  # hides the GPUs from TensorFlow before any op runs

MAX_RANDAUGMENT_MAGNITUDE = 30  # the 31-bin scale of torchvision's RandAugment (FRoundation's (4, 16))
_INT64_MAX = np.iinfo(np.int64).max
# Fold-in constants that separate the random streams derived from one seed.
_ROTATION_STREAM, _WINDOW_STREAM, _AUGMENT_STREAM = 0x5EED01, 0x5EED02, 0x5EED03

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Builders


def _download_config(manual_dir, download_config) -> tfds.download.DownloadConfig | None:
  if manual_dir is None:
    return download_config
  if download_config is not None:
    raise ValueError("give manual_dir or download_config (with its manual_dir), not both")
  manual_dir = os.path.expanduser(str(manual_dir))
  if not os.path.isdir(manual_dir):
    raise FileNotFoundError(f"manual_dir {manual_dir} does not exist; put the dataset's files there (for "
                            "casia_webface: train.rec and train.idx of InsightFace's faces_webface_112x112)")
  return tfds.download.DownloadConfig(manual_dir=manual_dir)


def _keyed_by_source(builder_name: str, data_dir: Path,
                     download_config: tfds.download.DownloadConfig | None) -> tuple[str, Path | None]:
  """(`name/src-<key>`, manual dir) for a builder of a manual directory, so that its prepared data is that of this
  source (see tfds_builders); the name unchanged (and None) otherwise, or when a config is named explicitly."""
  name, _, version = builder_name.partition(":")
  if "/" in name:
    return builder_name, None
  builder_cls = tfds.builder_cls(name)
  if not issubclass(builder_cls, tfds_builders.ManualSourceBuilder):
    return builder_name, None
  manual_dir = Path(download_config.manual_dir) if download_config is not None and download_config.manual_dir \
      else data_dir / "downloads" / "manual"  # TFDS's own default
  config_name = builder_cls.source_config_name(manual_dir)
  if config_name is None:  # nothing there: the builder itself says what is missing
    return builder_name, None
  return f"{name}/{config_name}" + (f":{version}" if version else ""), manual_dir


def prepared_builder(builder_name: str, *, data_dir=None, manual_dir=None,
                     download_config: tfds.download.DownloadConfig | None = None) -> tfds.core.DatasetBuilder:
  """The TFDS builder, prepared (generated or converted) first if it is not yet in data_dir.

  casia_webface and face_folder are keyed by their manual directory (`tfds_builders.source_config_name`): the
  same source reuses its prepared data, another one is prepared into a directory of its own."""
  data_dir = tfds_builders.resolve_data_dir(data_dir)
  download_config = _download_config(manual_dir, download_config)
  keyed_name, source = _keyed_by_source(builder_name, data_dir, download_config)
  builder = tfds.builder(keyed_name, data_dir=str(data_dir))
  if source is not None:
    source = source.expanduser().resolve()
    if builder.is_prepared():
      log.info("%s: reusing %s, prepared from %s", builder_name, builder.data_dir, source)
    else:
      log.info("%s: preparing %s from %s", builder_name, builder.data_dir, source)
  try:
    builder.download_and_prepare(download_config=download_config)
  except FileExistsError:  # another process (one per host) prepared it meanwhile, and renamed its copy first
    builder = tfds.builder(keyed_name, data_dir=str(data_dir))
    if not builder.is_prepared():
      raise
    log.info("%s was prepared by another process meanwhile; using it", builder.data_dir)
  return builder


def _num_classes(builder: tfds.core.DatasetBuilder) -> int:
  if "num_classes" in (builder.info.metadata or {}):
    return int(builder.info.metadata["num_classes"])
  label = builder.info.features["label"]
  if isinstance(label, tfds.features.ClassLabel):
    return int(label.num_classes)
  raise ValueError(f"{builder.name}: neither metadata['num_classes'] nor a ClassLabel 'label' feature tells the "
                   "number of classes")


def dataset_info(builder_name: str, data_dir=None, *, manual_dir=None,
                 download_config: tfds.download.DownloadConfig | None = None) -> dict[str, int]:
  """{'num_examples', 'num_classes'} of the training split (preparing the dataset if needed)."""
  builder = prepared_builder(builder_name, data_dir=data_dir, manual_dir=manual_dir, download_config=download_config)
  return {"num_examples": int(builder.info.splits["train"].num_examples), "num_classes": _num_classes(builder)}


# ---------------------------------------------------------------------------------------------------------------
# RandAugment (the torchvision variant: 14 ops, magnitude on a 0..30 scale, random sign for signed ops)


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor) -> tf.Tensor:
  """factor 0 gives `degenerate`, 1 the image, beyond 1 extrapolates; float32 in, float32 0..255 out."""
  return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0)


def _grayscale(image: tf.Tensor) -> tf.Tensor:
  """torchvision's rgb_to_grayscale of a uint8 image (its weights, truncated to whole grey levels), as float32."""
  return tf.floor(tf.reduce_sum(image * tf.constant([0.2989, 0.587, 0.114]), axis=-1, keepdims=True))


def _affine(image: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
  """Warps with the 2x3 matrix that maps output pixel (x, y, 1) to input coordinates; black outside."""
  transform = tf.concat([tf.reshape(matrix, [6]), tf.zeros([2])], axis=0)[None]
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  warped = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=transform, output_shape=tf.stack([height, width]),
      fill_value=tf.constant(0.0), interpolation="NEAREST", fill_mode="CONSTANT")
  return warped[0]


def _centred(image: tf.Tensor, linear: tf.Tensor) -> tf.Tensor:
  """A linear map about the image centre (2x2, output -> input)."""
  shape = tf.cast(tf.shape(image), tf.float32)
  centre = tf.stack([(shape[1] - 1) / 2, (shape[0] - 1) / 2])
  offset = centre - tf.linalg.matvec(linear, centre)
  return _affine(image, tf.concat([linear, offset[:, None]], axis=1))


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
  """Histogram equalisation of one uint8 channel (the PIL ImageOps.equalize rule)."""
  histogram = tf.histogram_fixed_width(tf.cast(channel, tf.int32), [0, 255], nbins=256)
  nonzero = tf.boolean_mask(histogram, histogram > 0)
  step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255

  def equalized():
    lut = (tf.cumsum(histogram) - histogram + step // 2) // step
    return tf.gather(tf.clip_by_value(lut, 0, 255), tf.cast(channel, tf.int32))

  return tf.cast(tf.cond(step > 0, equalized, lambda: tf.cast(channel, tf.int32)), tf.uint8)


def _randaugment_ops(image: tf.Tensor, level: tf.Tensor, sign: tf.Tensor) -> list:
  """The ops as zero-argument branches; `level` = magnitude / 30 in [0, 1], `sign` = +-1."""
  pixels = tf.cast(image, tf.float32)
  height, width = tf.unstack(tf.cast(tf.shape(image)[:2], tf.float32))
  signed = level * sign

  def as_uint8(values):
    return tf.cast(values, tf.uint8)  # truncation, as torchvision does for uint8 images

  # Shears are about the image's top-left corner (the outer corner of its first pixel, at -0.5, -0.5), not its
  # centre: torchvision's RandAugment shears with center=[0, 0], as the official AutoAugment does.
  def shear_x():
    return _affine(image, tf.stack([[1.0, 0.3 * signed, 0.15 * signed], [0.0, 1.0, 0.0]]))

  def shear_y():
    return _affine(image, tf.stack([[1.0, 0.0, 0.0], [0.3 * signed, 1.0, 0.15 * signed]]))

  def whole_pixels(shift):  # truncated toward zero, as torchvision's int(magnitude)
    return tf.cast(tf.cast(shift, tf.int32), tf.float32)

  def translate_x():
    return _affine(image, tf.stack([[1.0, 0.0, -whole_pixels(150.0 / 331.0 * width * signed)], [0.0, 1.0, 0.0]]))

  def translate_y():
    return _affine(image, tf.stack([[1.0, 0.0, 0.0], [0.0, 1.0, -whole_pixels(150.0 / 331.0 * height * signed)]]))

  def rotate():
    angle = np.pi / 6 * signed  # up to 30 degrees
    cos, sin = tf.cos(angle), tf.sin(angle)
    return _centred(image, tf.stack([[cos, -sin], [sin, cos]]))

  def brightness():
    return as_uint8(_blend(tf.zeros_like(pixels), pixels, 1.0 + 0.9 * signed))

  def color():
    return as_uint8(_blend(_grayscale(pixels), pixels, 1.0 + 0.9 * signed))

  def contrast():
    return as_uint8(_blend(tf.reduce_mean(_grayscale(pixels)), pixels, 1.0 + 0.9 * signed))

  def sharpness():
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(pixels[None], kernel, [1, 1, 1, 1], "VALID")[0]
    smooth = tf.pad(tf.round(smooth), [[1, 1], [1, 1], [0, 0]])
    border = tf.pad(tf.zeros_like(smooth[1:-1, 1:-1]), [[1, 1], [1, 1], [0, 0]], constant_values=1.0)
    smooth = border * pixels + (1 - border) * smooth  # the border keeps its pixels, as in PIL
    return as_uint8(_blend(smooth, pixels, 1.0 + 0.9 * signed))

  def posterize():
    dropped_bits = tf.cast(tf.round(4.0 * level), tf.uint8)
    return tf.bitwise.left_shift(tf.bitwise.right_shift(image, dropped_bits), dropped_bits)

  def solarize():
    threshold = 255.0 * (1.0 - level)
    return as_uint8(tf.where(pixels >= threshold, 255.0 - pixels, pixels))

  def autocontrast():
    low = tf.reduce_min(pixels, axis=[0, 1], keepdims=True)
    high = tf.reduce_max(pixels, axis=[0, 1], keepdims=True)
    spread = tf.where(high > low, high - low, 255.0)
    offset = tf.where(high > low, low, 0.0)
    # (v - low) * 255 is exact, so the division rounds once and whole levels stay whole: v = high gives 255, where
    # (v - low) * (255 / spread) can give 254.99998 (spread 252), truncated to 254
    return as_uint8(tf.clip_by_value((pixels - offset) * 255.0 / spread, 0.0, 255.0))

  def equalize():
    return tf.stack([_equalize_channel(image[..., channel]) for channel in range(3)], axis=-1)

  return [lambda: image, shear_x, shear_y, translate_x, translate_y, rotate, brightness, color, contrast,
          sharpness, posterize, solarize, autocontrast, equalize]


RANDAUGMENT_OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color",
                   "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")


def apply_randaugment_op(image: tf.Tensor, op_index, magnitude, sign=1.0) -> tf.Tensor:
  """One RandAugment op on a uint8 [H, W, 3] image (op_index into RANDAUGMENT_OPS)."""
  level = tf.cast(magnitude, tf.float32) / MAX_RANDAUGMENT_MAGNITUDE
  branches = _randaugment_ops(image, level, tf.cast(sign, tf.float32))
  augmented = tf.switch_case(tf.cast(op_index, tf.int32), branches)
  return tf.ensure_shape(augmented, image.shape)


def apply_randaugment(image: tf.Tensor, seed: tf.Tensor, num_layers: int, magnitude: int) -> tf.Tensor:
  """RandAugment(num_layers, magnitude) of a uint8 [H, W, 3] image, stateless in `seed` (int64 [2])."""
  seeds = tf.random.experimental.stateless_split(seed, num=2 * max(num_layers, 1))
  for layer in range(num_layers):
    op_index = tf.random.stateless_uniform([], seeds[2 * layer], minval=0, maxval=len(RANDAUGMENT_OPS),
                                           dtype=tf.int32)
    sign = tf.where(tf.random.stateless_uniform([], seeds[2 * layer + 1]) < 0.5, -1.0, 1.0)
    image = apply_randaugment_op(image, op_index, magnitude, sign)
  return image


def _check_randaugment(randaugment_option) -> tuple[int, int] | None:
  if randaugment_option is None:
    return None
  try:
    num_layers, magnitude = (int(value) for value in randaugment_option)
    if (num_layers, magnitude) != tuple(randaugment_option):
      raise ValueError
  except (TypeError, ValueError):
    raise ValueError(f"randaugment must be None or (num_layers, magnitude) integers, got {randaugment_option!r}") \
        from None
  if num_layers < 0 or not 0 <= magnitude <= MAX_RANDAUGMENT_MAGNITUDE:
    raise ValueError(f"randaugment (num_layers, magnitude) needs num_layers >= 0 and 0 <= magnitude <= "
                     f"{MAX_RANDAUGMENT_MAGNITUDE}, got {randaugment_option!r}")
  return num_layers, magnitude


# ---------------------------------------------------------------------------------------------------------------
# The iterator


def _stream_seed(seed: int) -> int:
  """One 63-bit key per seed. The 0 was the process index when each process drew its own stream: it keeps the
  batches of one-process runs as they were."""
  return int(np.random.SeedSequence([seed, 0]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def _check_positive_int(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return int(value)


def train_iterator(builder_name: str, *, data_dir=None, manual_dir=None, batch_size: int, seed: int,
                   flip: bool = True, randaugment: Sequence[int] | None = None, shuffle_buffer: int = 10_000,
                   process_index: int = 0, process_count: int = 1, start_step: int = 0,
                   download_config: tfds.download.DownloadConfig | None = None,
                   num_threads: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Infinite iterator of this process's batches: {'image': uint8 [b, H, W, 3], 'label': int32 [b],
  'domain': int32 [b]} with b = batch_size // process_count, the process_index-th slice of each global batch.

  randaugment: None (off) or (num_layers, magnitude), magnitude on the 0..30 scale. num_threads: the size of
  tf.data's thread pool (None: one per core). See the module docstring for the order and resumption.
  """
  batch_size = _check_positive_int("batch_size", batch_size, 1)
  process_count = _check_positive_int("process_count", process_count, 1)
  process_index = _check_positive_int("process_index", process_index, 0)
  start_step = _check_positive_int("start_step", start_step, 0)
  shuffle_buffer = _check_positive_int("shuffle_buffer", shuffle_buffer, 1)
  seed = _check_positive_int("seed", seed, 0)
  if process_index >= process_count:
    raise ValueError(f"process_index {process_index} must be < process_count {process_count}")
  if batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} must be divisible by process_count {process_count}")
  augment = _check_randaugment(randaugment)
  local_batch = batch_size // process_count

  builder = prepared_builder(builder_name, data_dir=data_dir, manual_dir=manual_dir, download_config=download_config)
  total = int(builder.info.splits["train"].num_examples)
  if total < batch_size:
    raise ValueError(f"{builder_name}: {total} training examples, fewer than the batch of {batch_size}")
  has_domain = "domain" in builder.info.features
  image_shape = builder.info.features["image"].shape
  if None in image_shape:
    raise ValueError(f"{builder_name}: images have no fixed shape ({image_shape}); batches need one size")

  read_config = tfds.ReadConfig(shuffle_seed=None, interleave_cycle_length=1, add_tfds_id=False)
  raw = builder.as_dataset(split="train", shuffle_files=False, read_config=read_config,
                           decoders={"image": tfds.decode.SkipDecoding()})
  raw = raw.map(lambda example: (example["image"], tf.cast(example["label"], tf.int32),
                                 tf.cast(example["domain"], tf.int32) if has_domain else tf.constant(-1, tf.int32)))
  key = _stream_seed(seed)
  window = min(shuffle_buffer, total)
  windows_per_epoch = math.ceil(total / window)

  def epoch(epoch_index):
    rotation = tf.random.stateless_uniform([], seed=tf.stack([tf.constant(key ^ _ROTATION_STREAM, tf.int64),
                                                              epoch_index]),
                                           minval=0, maxval=total, dtype=tf.int64)
    rotated = raw.skip(rotation).concatenate(raw.take(rotation))

    def permute(window_index, elements):
      order = tf.random.experimental.stateless_shuffle(
          tf.range(tf.shape(elements[1])[0]),
          seed=tf.stack([tf.constant(key ^ _WINDOW_STREAM, tf.int64), epoch_index * windows_per_epoch + window_index]))
      return tuple(tf.gather(values, order) for values in elements)

    return rotated.batch(window).enumerate().map(permute).unbatch()

  first_epoch, offset = divmod(start_step * batch_size, total)
  stream = tf.data.Dataset.range(first_epoch, _INT64_MAX).flat_map(epoch).skip(offset)
  positions = tf.data.Dataset.range(start_step * batch_size, _INT64_MAX)
  augment_key = tf.constant(key ^ _AUGMENT_STREAM, tf.int64)

  def decode_and_augment(position, example):
    image_bytes, label, domain = example
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False, dtype=tf.uint8)
    image = tf.ensure_shape(image, image_shape)
    flip_seed, augment_seed = tf.unstack(tf.random.experimental.stateless_split(tf.stack([augment_key, position]), 2))
    if flip:
      image = tf.cond(tf.random.stateless_uniform([], flip_seed) < 0.5, lambda: tf.reverse(image, axis=[1]),
                      lambda: image)
    if augment is not None:
      image = apply_randaugment(image, augment_seed, *augment)
    return {"image": image, "label": label, "domain": domain}

  dataset = tf.data.Dataset.zip((positions, stream))
  if process_count > 1:  # before decoding: a process decodes only its own examples
    dataset = dataset.filter(lambda position, _: position // local_batch % process_count == process_index)
  dataset = dataset.map(decode_and_augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  dataset = dataset.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = True
  if num_threads is not None:
    options.threading.private_threadpool_size = _check_positive_int("num_threads", num_threads, 1)
    options.threading.max_intra_op_parallelism = 1
  dataset = dataset.with_options(options)
  return _numpy_batches(dataset)


def _numpy_batches(dataset: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
  yield from dataset.as_numpy_iterator()
