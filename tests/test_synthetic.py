"""The synthetic face world: determinism, caching, benchmark layout, and that it is hard in pixel space while
identities stay recognisable."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from adaptface_jax import runtime
from adaptface_jax.data import binfile, common, recordio, synthetic

TRAIN_IDS, IMAGES_PER_ID, PAIRS = 12, 4, 600


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return synthetic.build_world(tmp_path_factory.mktemp("cache"), seed=0, num_train_identities=TRAIN_IDS,
                               images_per_identity=IMAGES_PER_ID, num_pairs=PAIRS)


def _files(root):
  return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


def test_same_seed_gives_identical_files_in_one_process_or_several_and_another_seed_does_not(tmp_path, monkeypatch):
  options = dict(num_train_identities=3, images_per_identity=2, num_pairs=20)
  first = synthetic.build_world(tmp_path / "a", seed=5, **options)
  # The second one is rendered by 2 worker processes.
  monkeypatch.setattr(synthetic, "_POOL_MIN_IMAGES", 0)
  monkeypatch.setattr(runtime, "usable_cpus", lambda: 2)
  second = synthetic.build_world(tmp_path / "b", seed=5, **options)
  assert json.loads((Path(second["root"]) / synthetic.COMPLETE_MARKER).read_text())["processes"] == 2
  other = synthetic.build_world(tmp_path / "c", seed=6, **options)
  assert _files(first["root"]) == _files(second["root"])
  for name in _files(first["root"]):
    if name.endswith(".npz"):
      a, b = np.load(os.path.join(first["root"], name)), np.load(os.path.join(second["root"], name))
      assert sorted(a.files) == sorted(b.files)
      for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}:{key}")
    elif name != synthetic.COMPLETE_MARKER:  # the marker records the generation time
      with open(os.path.join(first["root"], name), "rb") as fa, open(os.path.join(second["root"], name), "rb") as fb:
        assert fa.read() == fb.read(), name
  with open(os.path.join(first["root"], "train", "train.rec"), "rb") as fa, \
       open(os.path.join(other["root"], "train", "train.rec"), "rb") as fc:
    assert fa.read() != fc.read()


def test_a_complete_world_is_reused_without_regenerating(world, monkeypatch):
  rec = os.path.join(world["train"], "train.rec")
  before = os.stat(rec).st_mtime_ns

  def fail(*args, **kwargs):
    raise AssertionError("the cached world was regenerated")

  monkeypatch.setattr(synthetic, "_generate", fail)
  again = synthetic.build_world(os.path.dirname(os.path.dirname(world["root"])), seed=0,
                                num_train_identities=TRAIN_IDS, images_per_identity=IMAGES_PER_ID, num_pairs=PAIRS)
  assert again == world
  assert os.stat(rec).st_mtime_ns == before


def test_an_interrupted_generation_leaves_nothing_and_is_redone(tmp_path, monkeypatch):
  real_generate = synthetic._generate

  def interrupted(root, *args, **kwargs):
    (root / "train").mkdir()
    (root / "train" / "train.rec").write_bytes(b"half")
    raise KeyboardInterrupt

  monkeypatch.setattr(synthetic, "_generate", interrupted)
  options = dict(seed=1, num_train_identities=2, images_per_identity=1, num_pairs=20)
  with pytest.raises(KeyboardInterrupt):
    synthetic.build_world(tmp_path, **options)
  assert os.listdir(tmp_path / "synthetic") == []  # no world and no scratch folder
  # A folder of the right name without the completion marker (an older, non-atomic writer) is redone too.
  stale = tmp_path / "synthetic" / synthetic.world_name(image_size=112, **options)
  stale.mkdir()
  (stale / "junk").write_text("x")
  monkeypatch.setattr(synthetic, "_generate", real_generate)
  world = synthetic.build_world(tmp_path, **options)
  assert world["root"] == str(stale)
  assert not (stale / "junk").exists() and (stale / synthetic.COMPLETE_MARKER).exists()
  assert recordio.InsightFaceRecord(world["train"]).num_images == 2


def test_bad_sizes_are_refused(tmp_path):
  with pytest.raises(ValueError, match="multiple of 20"):
    synthetic.build_world(tmp_path, num_pairs=30)
  with pytest.raises(ValueError, match="num_train_identities"):
    synthetic.build_world(tmp_path, num_train_identities=0)


def test_training_record_and_its_metadata(world):
  record = recordio.InsightFaceRecord(world["train"])
  meta = np.load(os.path.join(world["train"], "meta.npz"))
  assert world["num_classes"] == record.num_classes == TRAIN_IDS
  assert world["num_train_images"] == record.num_images == TRAIN_IDS * IMAGES_PER_ID
  np.testing.assert_array_equal(record.labels(), meta["label"])
  for key in ("domain", "yaw", "age", "light_azimuth", "light_elevation", "light_intensity", "ambient"):
    assert meta[key].shape == (record.num_images,), key
  assert meta["color_cast"].shape == (record.num_images, 3)
  np.testing.assert_array_equal(meta["domain"], synthetic.domain_of(meta["yaw"], meta["age"]))
  image, label = record.decode(int(record.image_keys[-1]))
  assert image.shape == (112, 112, 3) and image.dtype == np.uint8 and label == TRAIN_IDS - 1
  assert common.DOMAIN_NAMES == ("general", "pose", "age")  # domain_of's labels index these names


@pytest.mark.parametrize("name", synthetic.BENCHMARKS)
def test_benchmark_folds_and_pair_identities(world, name):
  images, issame = binfile.read_bin(world["benchmarks"][name])
  meta = np.load(world["benchmarks"][name].replace(".bin", ".meta.npz"))
  assert len(images) == 2 * PAIRS and issame.shape == (PAIRS,)
  per_fold = PAIRS // 10
  expected_fold = np.array([True] * (per_fold // 2) + [False] * (per_fold // 2))
  np.testing.assert_array_equal(issame, np.tile(expected_fold, 10))  # 10 contiguous folds, half same / half not
  identity = meta["identity"]
  assert np.all((identity[0::2] == identity[1::2]) == issame)
  fold_ids = [set(identity[2 * per_fold * f:2 * per_fold * (f + 1)].tolist()) for f in range(10)]
  assert all(fold_ids[i].isdisjoint(fold_ids[j]) for i in range(10) for j in range(i))
  train_ids = set(np.load(os.path.join(world["train"], "meta.npz"))["identity"].tolist())
  assert train_ids.isdisjoint(identity.tolist())
  np.testing.assert_array_equal(meta["domain"], synthetic.domain_of(meta["yaw"], meta["age"]))


def test_cfp_pairs_are_frontal_against_profile_and_agedb_young_against_old(world):
  cfp = np.load(world["benchmarks"]["synth_cfp_fp"].replace(".bin", ".meta.npz"))
  assert np.abs(cfp["yaw"][0::2]).max() <= 10 and np.abs(cfp["yaw"][1::2]).min() >= 65
  assert np.all(cfp["domain"][1::2] == 1)
  assert (cfp["yaw"][1::2] > 0).any() and (cfp["yaw"][1::2] < 0).any()  # both profile sides
  agedb = np.load(world["benchmarks"]["synth_agedb"].replace(".bin", ".meta.npz"))
  assert agedb["age"][0::2].max() <= 0.2 and agedb["age"][1::2].min() >= 0.8
  assert np.all(agedb["domain"][0::2] == 0) and np.all(agedb["domain"][1::2] == 2)


@pytest.mark.parametrize("name", synthetic.BENCHMARKS)
def test_raw_pixels_verify_poorly(world, name):
  images, issame = binfile.load_pairs(world["benchmarks"][name])
  result = synthetic.pixel_baseline(images, issame)
  assert 0.45 <= result["accuracy"] <= 0.70, result
  assert result["best_threshold_accuracy"] <= 0.70, result


def _neutral_conditions(**changes):
  nuisance = synthetic.sample_nuisance(np.random.default_rng(0), "frontal")
  nuisance.update(yaw=0.0, age=0.3, roll=0.0, shift_x=0.0, shift_y=0.0, scale=1.0, noise=0.0, light_azimuth=0.0,
                  light_elevation=20.0, light_intensity=0.8, ambient=0.4, cast_r=1.0, cast_g=1.0, cast_b=1.0,
                  exposure=1.0)
  nuisance.update(changes)
  return nuisance


def _identification_accuracy(gallery, probes):
  """Nearest neighbour (cosine of mean-centred pixels): how often probe i finds gallery i."""
  centre = np.concatenate([gallery, probes]).mean(axis=0)
  gallery, probes = gallery - centre, probes - centre
  gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
  probes /= np.linalg.norm(probes, axis=1, keepdims=True)
  return float(np.mean(np.argmax(probes @ gallery.T, axis=1) == np.arange(len(probes))))


def test_identity_survives_each_condition_while_nuisances_dominate_pixels():
  renderer = synthetic.FaceRenderer(112)
  identities = [synthetic.make_identity(0, 90_000 + index) for index in range(32)]

  def render_all(**changes):
    return np.stack([renderer.render(identity, _neutral_conditions(**changes), np.random.default_rng(0))
                     for identity in identities]).reshape(len(identities), -1).astype(np.float32)

  frontal = render_all()
  # With every other factor held fixed, raw pixels re-identify the 32 identities (chance: 1/32) across each
  # domain change: identity information survives age, turning and lighting.
  assert _identification_accuracy(render_all(age=0.05), render_all(age=0.95)) >= 0.25
  assert _identification_accuracy(render_all(yaw=70.0), render_all(yaw=85.0)) >= 0.75
  assert _identification_accuracy(frontal, render_all(yaw=30.0)) >= 0.75
  assert _identification_accuracy(render_all(light_azimuth=-50.0), render_all(light_azimuth=50.0)) >= 0.75
  # Under random conditions two images of one identity differ more than two identities under the same ones.
  within = []
  for index, identity in enumerate(identities):
    pair = [renderer.render(identity, synthetic.sample_nuisance(np.random.default_rng([index, k]), "train"),
                            np.random.default_rng(k)).astype(np.float32) for k in range(2)]
    within.append(np.linalg.norm(pair[0] - pair[1]))
  between = [np.linalg.norm(frontal[i] - frontal[j]) for i in range(32) for j in range(i)]
  assert np.mean(within) > 1.3 * np.mean(between)


def test_pose_moves_and_foreshortens_features_and_hides_the_far_eye():
  renderer = synthetic.FaceRenderer(112)
  identity = synthetic.make_identity(0, 123)
  geometry = identity.geometry
  # Paint the two eyes with marker colours in the head-surface texture (young and old layers).
  texture = identity.texture.reshape(synthetic._TEX_V, synthetic._TEX_T, -1)
  theta, v = synthetic._TEX_THETA, synthetic._TEX_VGRID
  markers = {+1: (0.0, 1.0, 0.0), -1: (0.0, 0.0, 1.0)}
  for side, colour in markers.items():
    eye = ((np.abs(theta - side * geometry["eye_sep"]) < geometry["eye_w"])
           & (np.abs(v - geometry["eye_v"]) < geometry["eye_h"]))
    texture[eye, 0:3] = colour
    texture[eye, 3:6] = colour
    texture[eye, 6:8] = 0

  def eye_pixels(yaw):
    image = renderer.render(identity, _neutral_conditions(yaw=yaw, ambient=1.0, light_intensity=0.0),
                            np.random.default_rng(0)).astype(int)
    found = {}
    for side, colour in markers.items():
      channel = 1 if colour[1] else 2
      mask = (image[..., channel] > 200) & (image[..., 0] < 60) & (image[..., 3 - channel] < 60)
      found[side] = (int(mask.sum()), np.argwhere(mask)[:, 1].mean() if mask.any() else None)
    return found

  frontal, turned, other_way = eye_pixels(0.0), eye_pixels(80.0), eye_pixels(-80.0)
  assert frontal[+1][0] > 10 and frontal[-1][0] > 10
  assert abs(frontal[+1][0] - frontal[-1][0]) <= 0.3 * frontal[+1][0]  # symmetric at frontal
  assert frontal[+1][1] > frontal[-1][1]  # the +theta eye is on the image's right
  # Turned by 80 degrees, the eye on the far side is gone and the near one is narrower and moved along.
  assert turned[+1][0] == 0 and 0 < turned[-1][0] < frontal[-1][0]
  assert turned[-1][1] > frontal[-1][1]
  assert other_way[-1][0] == 0 and 0 < other_way[+1][0] < frontal[+1][0]
  assert other_way[+1][1] < frontal[+1][1]


def test_renderer_is_deterministic_and_respects_the_size():
  renderer = synthetic.FaceRenderer(64)
  identity = synthetic.make_identity(3, 7)
  nuisance = synthetic.sample_nuisance(np.random.default_rng(1), "train")
  first = renderer.render(identity, nuisance, np.random.default_rng(2))
  again = synthetic.FaceRenderer(64).render(synthetic.make_identity(3, 7), dict(nuisance), np.random.default_rng(2))
  assert first.shape == (64, 64, 3) and first.dtype == np.uint8
  np.testing.assert_array_equal(first, again)
  with pytest.raises(ValueError, match="nuisance kind"):
    synthetic.sample_nuisance(np.random.default_rng(0), "sideways")
