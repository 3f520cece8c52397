"""An IJB-style template benchmark of the synthetic world, in the IJB-C release layout (read by adaptface_jax.ijb).

Identities are numbered from 200,000 on, disjoint from every adaptation and pretraining world. Each identity has
`templates_per_identity` templates; a template holds 1-3 media, each a still image or a video of 2-4 frames, and
each media its own conditions drawn from the benchmark kinds (mixed, frontal, profile, young, old), so that
templates mix pose and age as IJB-C's do. Images are loose crops: 128-160 px, the face at 55-80 % of the
renderer's framing, rolled by up to 20 degrees and shifted, with the five landmarks worked out from the renderer's
geometry (`synthetic.landmarks`) and a detector score that falls with the yaw. Every pair of templates is listed
(genuine when both hold the same identity). meta/alignment_template.txt holds the world's own five-point template:
the mean landmarks of frontal, young, unrolled faces of the training identities, in the 112 px framing the models
were trained on.
"""

from __future__ import annotations

import functools
import itertools
import time
from pathlib import Path

import numpy as np

from adaptface_jax.data import synthetic
from adaptface_jax.data.common import IMAGE_SIZE, default_cache_dir

IDENTITY_OFFSET = 200_000
PREFIX = "ijbc"
_MEDIA_STREAM = 5  # SeedSequence stream of the benchmark's media plan and nuisances
_MEDIA_KINDS = ("general", "frontal", "profile", "young", "old")
_MEDIA_KIND_P = (0.3, 0.15, 0.25, 0.1, 0.2)
_CROP_SIZES = (128, 144, 160)
_TEMPLATE_IDENTITIES = 1000  # identities whose frontal landmarks make the alignment template


def alignment_template(seed: int = 0) -> np.ndarray:
  """float32 [5, 2]: mean landmarks (112 px) of identities 0-999 of world `seed` seen frontal, young and unrolled."""
  neutral = dict(yaw=0.0, age=0.0, roll=0.0, scale=1.0, shift_x=0.0, shift_y=0.0)
  points = [synthetic.landmarks(synthetic.make_geometry(seed, identity), neutral, IMAGE_SIZE)
            for identity in range(_TEMPLATE_IDENTITIES)]
  return np.mean(points, axis=0).astype(np.float32)


def _plan(seed: int, num_identities: int, templates_per_identity: int) -> list[tuple]:
  """[(identity, template id, media id, nuisance, crop size, noise stream)] for every image, grouped by identity."""
  jobs, template_id, media_id = [], 0, 0
  for identity in range(IDENTITY_OFFSET, IDENTITY_OFFSET + num_identities):
    rng = np.random.default_rng([seed, _MEDIA_STREAM, identity])
    for _ in range(templates_per_identity):
      template_id += 1
      for _ in range(int(rng.integers(1, 4))):
        media_id += 1
        base = synthetic.sample_nuisance(rng, str(rng.choice(_MEDIA_KINDS, p=_MEDIA_KIND_P)))
        base.update(scale=rng.uniform(0.55, 0.8), roll=rng.uniform(-20, 20), shift_x=rng.uniform(-0.12, 0.12),
                    shift_y=rng.uniform(-0.12, 0.12))
        size = int(rng.choice(_CROP_SIZES))
        frames = 1 if rng.random() < 0.5 else int(rng.integers(2, 5))
        for frame in range(frames):
          nuisance = dict(base)
          if frame:  # the frames of a video: the head and the camera move a little
            nuisance.update(yaw=base["yaw"] + rng.uniform(-5, 5), roll=base["roll"] + rng.uniform(-3, 3),
                            shift_x=base["shift_x"] + rng.uniform(-0.02, 0.02),
                            shift_y=base["shift_y"] + rng.uniform(-0.02, 0.02),
                            scale=base["scale"] * rng.uniform(0.97, 1.03))
          jobs.append((identity, template_id, media_id, nuisance, size, [seed, _MEDIA_STREAM, identity, len(jobs)]))
  return jobs


def _render_chunk(seed: int, jobs: list[tuple]) -> list[tuple[bytes, np.ndarray, float]]:
  """[(JPEG bytes, landmarks [5, 2], detector score)] of each job of `_plan`, in order."""
  from adaptface_jax.data import recordio

  out, identity = [], None
  for identity_id, _, _, nuisance, size, stream in jobs:
    if identity is None or identity.identity_id != identity_id:
      identity = synthetic.make_identity(seed, identity_id)
    rng = np.random.default_rng(stream)
    image = synthetic.cached_renderer(size).render(identity, nuisance, rng)
    score = float(np.clip(0.995 - 0.3 * (abs(nuisance["yaw"]) / 90) ** 2 - rng.uniform(0, 0.04), 0.5, 1.0))
    out.append((recordio.encode_image(image, "jpg", 95), synthetic.landmarks(identity.geometry, nuisance, size), score))
  return out


def build_ijb(cache_dir: str | Path | None = None, *, seed: int = 0, num_identities: int = 200,
              templates_per_identity: int = 4) -> Path:
  """Writes the benchmark once into `cache_dir/synthetic/<name>/` (reused when complete) and returns that folder,
  an IJB release folder: loose_crop/, meta/ijbc_face_tid_mid.txt, meta/ijbc_name_5pts_score.txt,
  meta/ijbc_template_pair_label.txt (every template pair) and meta/alignment_template.txt."""
  for name, value, minimum in (("seed", seed, 0), ("num_identities", num_identities, 2),
                               ("templates_per_identity", templates_per_identity, 2)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
      raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
  root = (cache_root / "synthetic" /
          f"ijb-seed{seed}-ids{num_identities}x{templates_per_identity}-r{synthetic.RENDERER_VERSION}")

  def generate(scratch: Path) -> dict:
    from adaptface_jax import runtime

    start = time.perf_counter()
    jobs = _plan(seed, num_identities, templates_per_identity)
    (scratch / "loose_crop").mkdir()
    meta = scratch / "meta"
    meta.mkdir()
    processes = runtime.usable_cpus()
    rendered = synthetic.render_jobs(functools.partial(_render_chunk, seed), jobs, "synthetic IJB", processes)
    with open(meta / f"{PREFIX}_face_tid_mid.txt", "w") as tid_mid, \
         open(meta / f"{PREFIX}_name_5pts_score.txt", "w") as points:
      for index, (job, (image, landmarks, score)) in enumerate(zip(jobs, rendered), 1):
        name = f"{index}.jpg"
        (scratch / "loose_crop" / name).write_bytes(image)
        tid_mid.write(f"{name} {job[1]} {job[2]}\n")
        points.write(name + " " + " ".join(f"{v:.3f}" for v in landmarks.reshape(-1)) + f" {score:.4f}\n")
    template_identity = {job[1]: job[0] for job in jobs}
    pairs = np.asarray([(a, b, int(template_identity[a] == template_identity[b]))
                        for a, b in itertools.combinations(sorted(template_identity), 2)], np.int64)
    np.savetxt(meta / f"{PREFIX}_template_pair_label.txt", pairs, fmt="%d")
    np.savetxt(meta / "alignment_template.txt", alignment_template(seed), fmt="%.4f")
    seconds = time.perf_counter() - start
    return {"seed": seed, "num_identities": num_identities, "templates_per_identity": templates_per_identity,
            "num_templates": len(template_identity), "num_pairs": len(pairs), "num_genuine": int(pairs[:, 2].sum()),
            "images": len(jobs), "seconds": round(seconds, 2), "images_per_second": round(len(jobs) / seconds, 1),
            "processes": processes}

  synthetic.build_once(root, generate, "synthetic IJB benchmark")
  return root
