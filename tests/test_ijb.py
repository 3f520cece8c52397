"""IJB-B / IJB-C 1:1 template verification: the protocol on a hand-worked case, the alignment, the synthetic
IJB-style benchmark (landmarks, snapshot vs pixels) and the `evaluate --ijb` command."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from adaptface_jax import ijb
from adaptface_jax.data import synthetic, synthetic_ijb


def _write_release(root, landmarks, scores, tid_mid, pairs, prefix="ijbc"):
  """An IJB release folder with black 112 px loose crops named 0.jpg, 1.jpg, ..."""
  (root / "loose_crop").mkdir(parents=True)
  (root / "meta").mkdir()
  for index in range(len(scores)):
    Image.new("RGB", (112, 112)).save(root / "loose_crop" / f"{index}.jpg")
  (root / "meta" / f"{prefix}_name_5pts_score.txt").write_text("".join(
      f"{i}.jpg " + " ".join(map(str, np.ravel(points))) + f" {score}\n"
      for i, (points, score) in enumerate(zip(landmarks, scores))))
  (root / "meta" / f"{prefix}_face_tid_mid.txt").write_text("".join(f"{i}.jpg {t} {m}\n" for i, (t, m) in
                                                                    enumerate(tid_mid)))
  (root / "meta" / f"{prefix}_template_pair_label.txt").write_text("".join(f"{a} {b} {label}\n" for a, b, label in
                                                                           pairs))
  return root


def test_template_pooling_and_tar_at_far_match_a_hand_worked_case(tmp_path):
  # Template 10: a still (image 0) and a two-frame video (images 1, 2); templates 20 and 30: one image each.
  tid_mid = [(10, 1), (10, 2), (10, 2), (20, 3), (30, 4)]
  emb = np.array([[1, 0], [0, 1], [0, 3], [1, 2], [2, -1]], np.float64)
  flip = np.array([[1, 0], [0, 1], [0, 1], [1, 2], [0, -1]], np.float64)
  scores = np.array([0.5, 1.0, 1.0, 0.9, 0.8])
  root = _write_release(tmp_path / "IJBC", [ijb.ARCFACE_TEMPLATE] * 5, scores, tid_mid,
                        [(10, 20, 1), (10, 30, 0), (20, 30, 0)])
  dataset = ijb.read(root)
  assert dataset.name == "IJBC" and dataset.template_source == "ArcFace five-point template"
  np.testing.assert_array_equal(dataset.templates, [10, 10, 10, 20, 30])
  np.testing.assert_array_equal(dataset.labels, [True, False, False])

  # N1D0F0: the video's mean (0, 2) plus the still (1, 0) -> (1, 2), not the mean of the three images (1/3, 4/3).
  ids, features = ijb.template_features(ijb.image_features(emb, flip, scores, "N1D0F0"), dataset.templates,
                                        dataset.medias)
  np.testing.assert_array_equal(ids, [10, 20, 30])
  np.testing.assert_allclose(features, [[1 / 5 ** 0.5, 2 / 5 ** 0.5], [1 / 5 ** 0.5, 2 / 5 ** 0.5],
                                        [2 / 5 ** 0.5, -1 / 5 ** 0.5]])
  np.testing.assert_allclose(ijb.pair_scores(ids, features, dataset.pairs), [1.0, 0.0, 0.0], atol=1e-12)
  # N1D1F2: image + flip weighted by the score: 0.5 (2, 0) + mean((0, 2), (0, 4)) = (1, 3); (2, 4) * 0.9; (2, -2) * 0.8
  ids, features = ijb.template_features(ijb.image_features(emb, flip, scores, "N1D1F2"), dataset.templates,
                                        dataset.medias)
  expected = np.array([[1, 3], [1, 2], [1, -1]]) / np.sqrt([[10], [5], [2]])
  np.testing.assert_allclose(features, expected)
  np.testing.assert_allclose(ijb.pair_scores(ids, features, dataset.pairs),
                             [7 / 50 ** 0.5, -2 / 20 ** 0.5, -1 / 10 ** 0.5])
  # N0D0F0: every image normalised first: (1, 0) + mean((0, 1), (0, 1)) = (1, 1) for template 10.
  _, features = ijb.template_features(ijb.image_features(emb, flip, scores, "N0D0F0"), dataset.templates,
                                      dataset.medias)
  np.testing.assert_allclose(features[0], [0.5 ** 0.5, 0.5 ** 0.5])
  # F1 concatenates: template 10 = 0.5 * [1, 0, 1, 0] + ... with D0: [1, 0, 1, 0] + [0, 2, 0, 1] = [1, 2, 1, 1]
  _, features = ijb.template_features(ijb.image_features(emb, flip, scores, "N1D0F1"), dataset.templates,
                                      dataset.medias)
  np.testing.assert_allclose(features[0], np.array([1, 2, 1, 1]) / 7 ** 0.5)

  # TAR at FAR on 10 impostors and 4 genuine pairs, worked out by hand.
  pair_scores = np.array([0.9, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -0.1, -0.2, -0.3, 0.95, 0.6, 0.45, 0.35])
  labels = np.arange(14) >= 10
  # FAR 0.1: one impostor may pass (0.9), the threshold is the next one (0.5): genuine 0.95 and 0.6 pass.
  # FAR 0.2: two may pass, threshold 0.4: 0.95, 0.6, 0.45. FAR 1e-2 needs 100 impostors: not measurable.
  assert ijb.tar_at_far(pair_scores, labels, [1e-2, 0.1, 0.2, 1.0]) == [None, 0.5, 0.75, 1.0]


def test_read_names_what_is_wrong(tmp_path):
  with pytest.raises(FileNotFoundError, match="ijbc_face_tid_mid.txt"):
    ijb.read(tmp_path)
  root = _write_release(tmp_path / "IJBB", [ijb.ARCFACE_TEMPLATE] * 2, [1, 1], [(1, 1), (2, 2)], [(1, 2, 0)],
                        prefix="ijbb")
  with pytest.raises(ValueError, match="both present"):
    ijb.read(root)
  (root / "meta" / "ijbb_template_pair_label.txt").write_text("1 3 1\n1 2 0\n")
  with pytest.raises(ValueError, match=r"template\(s\) \[3\]"):
    ijb.read(root)
  (root / "meta" / "ijbb_face_tid_mid.txt").write_text("0.jpg 1 1\nother.jpg 2 2\n")
  with pytest.raises(ValueError, match="same images"):
    ijb.read(root)


def test_alignment_puts_the_landmarks_on_the_template_within_a_pixel():
  rng = np.random.default_rng(0)
  for _ in range(5):
    # A loose crop whose five landmarks are the template moved by a random similarity, each marked by a bright dot.
    angle, scale, shift = rng.uniform(-0.5, 0.5), rng.uniform(0.7, 1.6), rng.uniform(10, 40, 2)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = ijb.ARCFACE_TEMPLATE @ (scale * rotation).T + shift
    yy, xx = np.mgrid[:240, :240]
    image = np.zeros((240, 240, 3), np.float64)
    for x, y in points:
      image += 255 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.5 ** 2))[..., None]
    aligned = ijb.align(np.clip(image, 0, 255).astype(np.uint8), points).astype(np.float64)[..., 0]
    np.testing.assert_allclose(ijb.similarity(points, ijb.ARCFACE_TEMPLATE)(points), ijb.ARCFACE_TEMPLATE,
                               atol=1e-3)
    ay, ax = np.mgrid[:112, :112]
    for tx, ty in ijb.ARCFACE_TEMPLATE:  # each dot's centre of mass in the aligned face
      window = aligned * (((ax - tx) ** 2 + (ay - ty) ** 2) < 5 ** 2)
      centre = np.array([(window * ax).sum(), (window * ay).sum()]) / window.sum()
      assert np.abs(centre - [tx, ty]).max() < 1.0, (centre, (tx, ty))


def test_synthetic_landmarks_sit_on_the_rendered_eyes():
  """The eye landmarks of frontal faces fall on the pupil: the darkest pixel within 4 px of each is within 1.5 px."""
  renderer = synthetic.FaceRenderer(224)
  for identity_id in range(6):
    identity = synthetic.make_identity(0, 200_000 + identity_id)
    rng = np.random.default_rng(identity_id)
    nuisance = dict(synthetic.sample_nuisance(rng, "frontal"), noise=0.0, light_azimuth=0.0, light_elevation=10.0)
    image = renderer.render(identity, nuisance, rng).astype(np.float64).sum(-1)
    for x, y in synthetic.landmarks(identity.geometry, nuisance, 224)[:2]:
      x0, y0 = int(round(x)) - 4, int(round(y)) - 4
      window = image[y0:y0 + 9, x0:x0 + 9]
      dy, dx = np.unravel_index(np.argmin(window), window.shape)
      assert np.hypot(x0 + dx - x, y0 + dy - y) <= 1.5, (identity_id, (x, y), (x0 + dx, y0 + dy))


@pytest.fixture(scope="module")
def synthetic_release(cache_dir):
  return synthetic_ijb.build_ijb(cache_dir, num_identities=16, templates_per_identity=3)


def test_synthetic_release_layout_and_the_snapshot_beats_pixels(synthetic_release):
  dataset = ijb.read(synthetic_release)
  marker = json.loads((synthetic_release / synthetic.COMPLETE_MARKER).read_text())
  assert len(dataset.paths) == marker["images"] and dataset.template_source.endswith("alignment_template.txt")
  assert len(np.unique(dataset.templates)) == 48 and dataset.labels.sum() == 16 * 3  # all pairs within identities
  assert len(dataset.pairs) == 48 * 47 // 2
  np.testing.assert_allclose(dataset.template, synthetic_ijb.alignment_template(0), atol=1e-3)
  assert (np.bincount(np.unique(np.stack([dataset.templates, dataset.medias]), axis=1)[0]) > 1).any()  # multi-media

  variants = ("N1D1F2", "N0D0F0")
  pixels = ijb.evaluate(*ijb.embed(dataset, ijb.pixel_embeddings), dataset, variants=variants)
  from adaptface_jax import evaluate
  from configs import dalora_dino
  config = dalora_dino.get_config("demo")
  config.eval.batch_size = 64
  snapshot = evaluate.evaluate_untuned(config, ijb=str(synthetic_release))
  for variant in variants:
    ours, raw = snapshot["variants"][variant], pixels["variants"][variant]
    assert ours["auc"] > raw["auc"] + 0.2, (variant, ours["auc"], raw["auc"])
    assert ours["tar_at_far"]["1e-1"] > raw["tar_at_far"]["1e-1"] + 0.3, (variant, ours, raw)


def test_evaluate_ijb_command_on_a_run(finished_run, synthetic_release, tmp_path):
  workdir, _ = finished_run
  out = tmp_path / "out"
  result = subprocess.run([sys.executable, "-m", "adaptface_jax.evaluate", f"--workdir={workdir}",
                           f"--ijb={synthetic_release}", f"--out_dir={out}", "--json"],
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  printed = json.loads(result.stdout.strip().splitlines()[-1])
  written = json.loads((out / "ijb_results.json").read_text())
  assert set(written["variants"]) == set(ijb.VARIANTS) and written["step"] == 4
  assert printed["variants"]["N1D1F2"] == {k: written["variants"]["N1D1F2"][k] for k in ("tar_at_far", "auc")}
  assert written["num_genuine"] == 48 and (out / "ijb_roc.png").stat().st_size > 0
  assert "| N1D1F2 |" in (out / "ijb_results.md").read_text()

  refused = subprocess.run([sys.executable, "-m", "adaptface_jax.evaluate", f"--ijb={synthetic_release}"],
                           capture_output=True, text=True, timeout=120)
  assert refused.returncode != 0 and "--ijb evaluates a model" in refused.stderr


# Hostile or broken release folders: `ijb.read` refuses each before anything is embedded, naming the file and line
# (or the image). A release of four black 112 px crops, templates 1 (images 0, 1), 2 and 3.
POINTS, TID_MID, PAIRS = "ijbc_name_5pts_score.txt", "ijbc_face_tid_mid.txt", "ijbc_template_pair_label.txt"


@pytest.fixture
def release(tmp_path):
  return _write_release(tmp_path / "IJBC", [ijb.ARCFACE_TEMPLATE] * 4, [0.9, 0.8, 0.7, 0.6],
                        [(1, 1), (1, 2), (2, 3), (3, 4)], [(1, 2, 1), (1, 3, 0), (2, 3, 0)])


def _set_line(root, name, number, text):
  """Replaces line `number` (1-based) of meta/`name` with `text`."""
  path = root / "meta" / name
  lines = path.read_text().splitlines()
  lines[number - 1] = text
  path.write_text("\n".join(lines) + "\n")
  return path


def _points_line(name, points=ijb.ARCFACE_TEMPLATE, score=0.5):
  return f"{name} " + " ".join(map(str, np.ravel(points))) + f" {score}"


def _refused(root, *expected):
  with pytest.raises(ijb.ReleaseError) as error:
    ijb.read(root)
  assert isinstance(error.value, ValueError)  # a user error: one `error:` paragraph from the command line
  message = str(error.value)
  for text in expected:
    assert text in message, (text, message)
  return message


@pytest.mark.parametrize("how", ["relative", "absolute", "symlink", "in the template file"])
def test_read_refuses_images_outside_loose_crop(release, tmp_path, how):
  secret = tmp_path / "secret.txt"
  secret.write_text("TOP-SECRET-CONTENT\n")
  if how == "symlink":  # inside the release by name, outside by target: refused, the target never read
    (release / "loose_crop" / "link.jpg").symlink_to(secret)
    path = _set_line(release, POINTS, 2, _points_line("link.jpg"))
    _set_line(release, TID_MID, 2, "link.jpg 1 2")
    message = _refused(release, f"{path}:2", "link.jpg", "outside")
    assert "TOP-SECRET" not in message
  elif how == "in the template file":
    path = _set_line(release, TID_MID, 3, "../../../x.jpg 2 3")
    _refused(release, f"{path}:3", "../../../x.jpg")
  else:
    name = "../../../x.jpg" if how == "relative" else str(secret)
    path = _set_line(release, POINTS, 2, _points_line(name))
    _refused(release, f"{path}:2", name)


def test_read_follows_symlinks_that_stay_inside_loose_crop(release, tmp_path):
  (release / "loose_crop" / "faces").mkdir()
  (release / "loose_crop" / "faces" / "link.jpg").symlink_to(release / "loose_crop" / "1.jpg")
  _set_line(release, POINTS, 2, _points_line("faces/link.jpg"))
  _set_line(release, TID_MID, 2, "faces/link.jpg 1 2")
  # loose_crop/ itself may be a symlink (the images on another disk)
  (release / "loose_crop").rename(tmp_path / "elsewhere")
  (release / "loose_crop").symlink_to(tmp_path / "elsewhere")
  assert ijb.read(release).paths[1] == release / "loose_crop" / "faces" / "link.jpg"


@pytest.mark.parametrize("score", ["nan", "inf", "-5"])
def test_read_refuses_detector_scores_that_are_not_finite_and_non_negative(release, score):
  path = _set_line(release, POINTS, 3, _points_line("2.jpg", score=score))
  _refused(release, f"{path}:3", "'2.jpg'", "detector score", score)


def test_a_template_scored_0_everywhere_is_scored_with_a_warning(release, caplog):
  for number, name in ((1, "0.jpg"), (2, "1.jpg")):  # both images of template 1
    _set_line(release, POINTS, number, _points_line(name, score=0))
  with caplog.at_level("WARNING", logger="adaptface_jax.ijb"):
    dataset = ijb.read(release)
  assert "1 template(s) (e.g. [1])" in caplog.text
  emb = np.random.default_rng(0).normal(size=(4, 8))
  ids, features = ijb.template_features(ijb.image_features(emb, emb, dataset.scores, "N1D1F2"), dataset.templates,
                                        dataset.medias)
  np.testing.assert_array_equal(features[0], 0)  # D1: a zero feature, so its pairs score 0
  np.testing.assert_array_equal(ijb.pair_scores(ids, features, dataset.pairs)[:2], 0)
  for number in (3, 4):
    _set_line(release, POINTS, number, _points_line(f"{number - 1}.jpg", score=0))
  caplog.clear()
  with caplog.at_level("WARNING", logger="adaptface_jax.ijb"):
    ijb.read(release)
  assert "every detector score is 0" in caplog.text


def test_read_refuses_landmarks_far_outside_the_crop(release):
  # Up to 50 % of the crop outside is accepted (a face cut by the crop's edge) ...
  _set_line(release, POINTS, 2, _points_line("1.jpg", ijb.ARCFACE_TEMPLATE - [60, 0]))
  ijb.read(release)
  # ... 5,000 px is not.
  path = _set_line(release, POINTS, 4, _points_line("3.jpg", ijb.ARCFACE_TEMPLATE + [0, 5000]))
  _refused(release, f"{path}:4", "'3.jpg'", "112x112 crop", "px outside")
  path = _set_line(release, POINTS, 4, _points_line("3.jpg", ijb.ARCFACE_TEMPLATE * [1, np.nan]))
  _refused(release, f"{path}:4", "'3.jpg'", "finite")


def test_read_refuses_an_image_listed_in_two_templates(release):
  path = _set_line(release, TID_MID, 4, "1.jpg 3 4")  # image 1 is in template 1 (line 2)
  _refused(release, f"{path}:4", "line 2", "'1.jpg'", "template 3", "template 1")


@pytest.mark.parametrize("name", [TID_MID, PAIRS])
def test_read_refuses_an_oversized_template_id(release, name):
  text = "3.jpg 99999999999999999999 4" if name == TID_MID else "1 99999999999999999999 0"
  path = _set_line(release, name, 3, text)
  _refused(release, f"{path}:3", "99999999999999999999", "out of range")


@pytest.mark.parametrize("case", ["int", "float", "utf-8", "pair int", "alignment template", "coinciding landmarks"])
def test_read_names_the_line_of_unparseable_text(release, case):
  if case == "int":
    _refused(release, f"{_set_line(release, TID_MID, 2, '1.jpg abc 2')}:2", "template id", "'abc' is not an integer")
  elif case == "float":
    text = _points_line("1.jpg").replace(" 0.5", " abc")
    _refused(release, f"{_set_line(release, POINTS, 2, text)}:2", "detector score", "'abc' is not a number")
  elif case == "utf-8":  # a gzipped meta file
    import gzip
    path = release / "meta" / POINTS
    path.write_bytes(gzip.compress(path.read_bytes()))
    _refused(release, f"{path}:1", "not UTF-8", "gzip")
  elif case == "pair int":
    _refused(release, f"{_set_line(release, PAIRS, 2, '1 3 x')}:2", "label", "'x' is not an integer")
  elif case == "alignment template":
    path = release / "meta" / ijb.TEMPLATE_FILE
    path.write_text("38.3 51.7\n7e.3 51.5\n56.0 71.7\n41.5 92.4\n70.7 92.2\n")
    _refused(release, f"{path}:2", "'7e.3' is not a number")
  else:
    path = _set_line(release, POINTS, 3, _points_line("2.jpg", np.full((5, 2), 40.0)))
    _refused(release, f"{path}:3", "'2.jpg'", "coincide")


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_an_alignment_failure_names_the_image(release):
  dataset = ijb.read(release)
  dataset.landmarks[2] = np.nan  # past the reader's checks: the similarity's SVD does not converge
  with pytest.raises(ValueError) as error:
    ijb.embed(dataset, ijb.pixel_embeddings)
  message = str(error.value)
  assert str(release / "loose_crop" / "2.jpg") in message and f"{dataset.points_file}:3" in message, message
