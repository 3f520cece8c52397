"""TFDS builders of the face-recognition training sets, registered by importing this module.

- `synthetic_faces/{tiny,demo,large}`: the embedded synthetic face world (`synthetic.build_world`), generated
  locally into `<data_dir>/synthetic/`; nothing is downloaded. `synthetic_faces/pretrain`: its general domain
  only, on identities of its own, for pretraining backbones (`configs/pretrain.py`).
- `casia_webface`: an InsightFace (or im2rec) `train.rec` + `train.idx` from the manual directory.
- `face_folder`: an image folder `<manual_dir>/<identity>/<image>.jpg|png`.

Every example holds `image` (the original encoded 112x112 RGB bytes, never re-encoded), `label` (int64 class
id) and `domain` (int64: 0 general, 1 pose, 2 age for the synthetic world; -1 when unknown). The number of
classes is in `info.metadata['num_classes']`.

The two builders of a manual directory keep their prepared data per source: the builder config
`src-<12 hex>` (`source_config_name`) is a digest of the directory's resolved path and its files' sizes and
modification times, so `<data_dir>/casia_webface/src-<key>/` holds the data of one `.rec`, and another `.rec`
(or the same one rewritten) is prepared afresh instead of silently reusing the first. Every image is decoded
once while the data is prepared: a corrupt one is refused there, with its file and key.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from adaptface_jax.data import common, recordio


def hide_gpus_from_tensorflow() -> None:
  """TensorFlow only feeds data here: it must not reserve GPU memory that JAX needs."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError as error:  # raised once TensorFlow has initialised its devices
    if tf.config.get_visible_devices("GPU"):
      raise RuntimeError("TensorFlow was initialised (and sees a GPU) before adaptface_jax.data could hide the GPUs "
                         "from it; import adaptface_jax.data.pipeline before running any TensorFlow op") from error


hide_gpus_from_tensorflow()

IMAGE_SIZE = common.IMAGE_SIZE
PRETRAIN_IDENTITIES, PRETRAIN_IMAGES = 2000, 24
_VERSION = tfds.core.Version("1.0.0")


def default_data_dir() -> Path:
  """Where TFDS data lives when no data_dir is given: `$ADAPTFACE_CACHE/tfds` (or ~/.cache/adaptface_jax/tfds)."""
  return common.default_cache_dir() / "tfds"


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
  return Path(data_dir).expanduser() if data_dir else default_data_dir()


def _features(encoding_format: str | None = "jpeg") -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format=encoding_format),
      "label": tfds.features.Scalar(dtype=np.int64, doc="class id 0..num_classes-1"),
      "domain": tfds.features.Scalar(dtype=np.int64, doc="0 general, 1 pose, 2 age; -1 unknown"),
  })


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder that downloads nothing, so it has no checksums file next to its code.

  (TFDS looks that file up through `code_path`, which for a builder outside the TFDS package imports the
  `importlib_resources` backport; answering None skips both.)
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return None


def _check_image(image_bytes: bytes, where: str) -> None:
  """A full decode: a truncated or corrupt image fails here, named, rather than as a TensorFlow error mid-training."""
  try:
    with recordio.open_image(image_bytes) as image:  # one over recordio.MAX_IMAGE_PIXELS: refused undecoded
      width, height = image.size
      image.load()
  except recordio.ImageTooLarge as error:
    raise recordio.ImageTooLarge(f"{where}: {error}") from None
  except Exception as error:  # PIL raises several types for unreadable data
    raise ValueError(f"{where}: not a readable JPEG/PNG image ({type(error).__name__}: {error}); remove or "
                     "replace it and prepare the data again") from None
  if (height, width) != (IMAGE_SIZE, IMAGE_SIZE):
    raise ValueError(f"{where}: image is {height}x{width}; these builders hold aligned {IMAGE_SIZE}x{IMAGE_SIZE} "
                     f"faces (align and crop the faces first)")


# ---------------------------------------------------------------------------------------------------------------
# synthetic_faces


@dataclasses.dataclass
class SyntheticFacesConfig(tfds.core.BuilderConfig):
  num_train_identities: int = 300
  images_per_identity: int = 20
  num_pairs: int = 6000
  world_seed: int = 0
  train_kind: str = "train"  # "pretrain": the general domain only
  identity_offset: int = 0

  def world_options(self) -> dict:
    return dict(seed=self.world_seed, num_train_identities=self.num_train_identities,
                images_per_identity=self.images_per_identity, num_pairs=self.num_pairs, image_size=IMAGE_SIZE,
                train_kind=self.train_kind, identity_offset=self.identity_offset)


class SyntheticFaces(_LocalBuilder):
  """The embedded synthetic face world (identities rendered under pose / age / illumination nuisances)."""

  # The major version follows the renderer, so that data prepared by an older renderer is not reused.
  VERSION = tfds.core.Version(f"{common.RENDERER_VERSION}.0.0")
  RELEASE_NOTES = {f"{common.RENDERER_VERSION}.0.0": "Synthetic face world, renderer version "
                                                        f"{common.RENDERER_VERSION}."}
  BUILDER_CONFIGS = [
      SyntheticFacesConfig(name="tiny", description="16 identities x 8 images, 200 pairs per benchmark (tests)",
                           num_train_identities=16, images_per_identity=8, num_pairs=200),
      SyntheticFacesConfig(name="demo", description="300 identities x 20 images, 6000 pairs per benchmark",
                           num_train_identities=300, images_per_identity=20, num_pairs=6000),
      SyntheticFacesConfig(name="large", description="2000 identities x 30 images, 6000 pairs per benchmark",
                           num_train_identities=2000, images_per_identity=30, num_pairs=6000),
      # Identities from 100,000 on: disjoint from every adaptation world's training and benchmark identities.
      SyntheticFacesConfig(name="pretrain", description=(
          f"{PRETRAIN_IDENTITIES} identities x {PRETRAIN_IMAGES} images of the general domain only (near-frontal, "
          "young, ordinary light), for pretraining backbones; 600 in-domain pairs per benchmark"),
                           num_train_identities=PRETRAIN_IDENTITIES, images_per_identity=PRETRAIN_IMAGES,
                           num_pairs=600, train_kind="pretrain", identity_offset=100_000),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "demo"

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__, features=_features(), supervised_keys=("image", "label"),
        metadata=tfds.core.MetadataDict(num_classes=self.builder_config.num_train_identities))

  def world(self) -> dict:
    """Generates (or reuses) the world under `<data_dir>/synthetic/`; see synthetic.build_world."""
    from adaptface_jax.data import synthetic  # the renderer is imported only where a world is built
    return synthetic.build_world(self.data_dir_root, **self.builder_config.world_options())

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {"train": self._generate_examples(self.world())}

  def _generate_examples(self, world):
    meta = np.load(Path(world["train"]) / "meta.npz")
    record = recordio.InsightFaceRecord(world["train"])
    domains = meta["domain"]
    if len(domains) != record.num_images:
      raise ValueError(f"{world['train']}: meta.npz describes {len(domains)} images but train.rec holds "
                       f"{record.num_images}; delete {world['root']} to regenerate the world")
    for position, key in enumerate(record.image_keys.tolist()):
      image_bytes, label = record.read(key)
      yield key, {"image": image_bytes, "label": label, "domain": int(domains[position])}


def synthetic_world_for(builder_name: str, data_dir: str | os.PathLike | None = None) -> dict:
  """The synthetic world behind a `synthetic_faces/<config>` training set (generated if needed): its benchmark
  `.bin` files live next to the training data, under `<data_dir>/synthetic/`."""
  name, _, config_name = builder_name.partition(":")[0].partition("/")
  if name != "synthetic_faces":
    raise ValueError(f"{builder_name!r} is not a synthetic_faces/<config> dataset, so it has no synthetic "
                     "benchmarks; give the verification .bin files instead (config.eval.bin_dir)")
  configs = {config.name: config for config in SyntheticFaces.BUILDER_CONFIGS}
  config = configs.get(config_name or SyntheticFaces.DEFAULT_BUILDER_CONFIG_NAME)
  if config is None:
    raise ValueError(f"synthetic_faces has no config {config_name!r}; choose one of {sorted(configs)}")
  from adaptface_jax.data import synthetic
  return synthetic.build_world(resolve_data_dir(data_dir), **config.world_options())


# ---------------------------------------------------------------------------------------------------------------
# Builders of a manual directory: prepared data kept per source


_SOURCE_CONFIG_NAME = re.compile(r"^src-[0-9a-f]{12}$")
_SOURCE_DESCRIPTIONS: dict[str, str] = {}


@functools.cache
def _source_config(name: str) -> tfds.core.BuilderConfig:
  description = _SOURCE_DESCRIPTIONS.get(name, "data prepared from one manual directory (see the module docstring)")
  return tfds.core.BuilderConfig(name=name, description=description)


def _file_stamps(root: Path, paths) -> list[tuple[str, int, int]]:
  stamps = []
  for path in paths:
    stat = path.stat()
    stamps.append((path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns))
  return stamps


class ManualSourceBuilder(_LocalBuilder, skip_registration=True):
  """A builder converting a manual directory; any config named `src-<12 hex>` is valid (see the module docstring)."""

  @classmethod
  def get_builder_config(cls, name: str, version=None) -> tfds.core.BuilderConfig | None:
    if _SOURCE_CONFIG_NAME.match(name):
      return _source_config(name)
    return super().get_builder_config(name, version)

  @classmethod
  def source_files(cls, manual_dir: Path) -> list[Path]:
    """The files the prepared data is made from; empty when the directory does not hold the dataset."""
    raise NotImplementedError

  @classmethod
  def source_config_name(cls, manual_dir: str | os.PathLike) -> str | None:
    """`src-<digest of the resolved path, sizes and modification times of source_files>`; None without files (the
    builder then reports what is missing)."""
    root = Path(manual_dir).expanduser().resolve()
    files = cls.source_files(root) if root.is_dir() else []
    if not files:
      return None
    stamps = _file_stamps(root, files)
    digest = hashlib.sha256(json.dumps([str(root), stamps]).encode()).hexdigest()
    name = f"src-{digest[:12]}"
    total = sum(size for _, size, _ in stamps)
    _SOURCE_DESCRIPTIONS.setdefault(name, f"prepared from {root} ({len(files)} file(s), {total:,} bytes)")
    return name


# ---------------------------------------------------------------------------------------------------------------
# casia_webface


class CasiaWebface(ManualSourceBuilder):
  """CASIA-WebFace as packaged by InsightFace (faces_webface_112x112), read from its RecordIO files."""

  VERSION = _VERSION
  RELEASE_NOTES = {"1.0.0": "Examples read from train.rec / train.idx; images kept byte for byte."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Put `train.rec` and `train.idx` (and `property`) of InsightFace's `faces_webface_112x112` package (CASIA-WebFace,
aligned 112x112, 10,572 identities) in the manual directory: `download_config.manual_dir`, default
`<data_dir>/downloads/manual/` (in this project: `--config.data.manual_dir`). A `.rec` written by im2rec (no header
record) works too. Nothing is downloaded.
"""

  @classmethod
  def source_files(cls, manual_dir: Path) -> list[Path]:
    if not (manual_dir / "train.rec").is_file():
      return []
    return [manual_dir / name for name in ("train.rec", "train.idx", "property") if (manual_dir / name).is_file()]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(description=self.__doc__, features=_features(),
                                          supervised_keys=("image", "label"), metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    try:
      manual_dir = Path(dl_manager.manual_dir)
    except AssertionError as error:  # TFDS's way of saying the manual directory is missing or empty
      raise FileNotFoundError(f"casia_webface needs train.rec and train.idx in its manual directory: {error}") \
          from None
    rec_path = manual_dir / "train.rec"
    if not rec_path.is_file():
      raise FileNotFoundError(f"casia_webface: expected {rec_path} (with train.idx next to it) from InsightFace's "
                              f"faces_webface_112x112 package; found {sorted(p.name for p in manual_dir.iterdir())}")
    record = recordio.InsightFaceRecord(rec_path)
    if record.num_images == 0:
      raise ValueError(f"{rec_path}: holds no images")
    first_bytes, _ = record.read(int(record.image_keys[0]))
    _check_image(first_bytes, f"{rec_path} key {int(record.image_keys[0])}")
    self.info.metadata["num_classes"] = int(record.num_classes)
    return {"train": self._generate_examples(rec_path)}

  def _generate_examples(self, rec_path):
    record = recordio.InsightFaceRecord(rec_path)
    for key in record.image_keys.tolist():
      image_bytes, label = record.read(key)
      _check_image(image_bytes, f"{rec_path} key {key}")
      yield key, {"image": image_bytes, "label": label, "domain": common.UNKNOWN_DOMAIN}


# ---------------------------------------------------------------------------------------------------------------
# face_folder


class FaceFolder(ManualSourceBuilder):
  """Aligned 112x112 faces in `<manual_dir>/<identity>/<image>.jpg|png`; labels in sorted identity order."""

  VERSION = _VERSION
  RELEASE_NOTES = {"1.0.0": "One class per identity folder; files kept byte for byte."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Point `download_config.manual_dir` at a folder holding one sub-folder per identity, each with that identity's
aligned 112x112 face crops as .jpg / .jpeg / .png files. Labels are assigned in sorted folder-name order.
"""

  @classmethod
  def source_files(cls, manual_dir: Path) -> list[Path]:
    # Every file below the identity folders: an image added, removed or replaced changes the key.
    return sorted(path for path in manual_dir.rglob("*") if path.is_file())

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(description=self.__doc__, features=_features(encoding_format=None),
                                          supervised_keys=("image", "label"), metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    from adaptface_jax.data import folders

    try:
      manual_dir = Path(dl_manager.manual_dir)
    except AssertionError as error:
      raise FileNotFoundError(f"face_folder needs identity folders in its manual directory: {error}") from None
    identities = folders.scan_image_folder(manual_dir)
    self.info.metadata["num_classes"] = len(identities)
    self.info.metadata["identity_names"] = list(identities)
    return {"train": self._generate_examples(identities)}

  def _generate_examples(self, identities):
    for label, (name, paths) in enumerate(identities.items()):
      for path in paths:
        image_bytes = path.read_bytes()
        _check_image(image_bytes, str(path))
        yield f"{name}/{path.name}", {"image": image_bytes, "label": label, "domain": common.UNKNOWN_DOMAIN}
