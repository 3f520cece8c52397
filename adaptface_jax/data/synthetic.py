"""A deterministic synthetic face world, rendered with numpy (no download).

Every identity is a set of facial parameters: head shape, jaw, skin tone, eye / brow / nose / mouth geometry,
eye colour, hair style and colour, beard, moles and freckles. They are painted once per identity into a
texture over the head surface (longitude `theta` in radians, `theta = 0` facing the camera at yaw 0; latitude
`v` in [-1, 1], top to bottom), in a young and an old version, together with a height map whose slopes shade
the nose, brow ridge and eye sockets. An image looks the head up through an ellipsoid whose silhouette is
fixed while the surface turns by the yaw angle, so features shift and foreshorten and the far eye leaves the
view near profile; the nose, the ears and the hair mass are drawn as image-space layers on top.

Nuisance factors with ground truth: yaw (frontal to profile), age (young to old: wrinkles, grey and receding
hair, sagging, paler and lower-contrast features), illumination (direction, intensity, ambient, colour cast,
exposure) and jitter (shift, scale, roll, sensor noise), plus random background and clothes. The world is hard
in pixel space (cosine similarity of raw pixels verifies about 60% of the benchmark pairs right, 50% being
chance) while identities stay recognisable: the identity parameters never change, only the conditions do.
Rendering takes about 10 ms per image on one core (numpy, vectorised over the pixels of one image); `build_world`
spreads it over worker processes, one per usable core.

`build_world` writes the InsightFace training `.rec`, three verification `.bin` files (mixed conditions,
frontal vs profile, young vs old) over identities disjoint from the training ones, and per-image metadata.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adaptface_jax.data.common import RENDERER_VERSION, default_cache_dir
from adaptface_jax.data.common import SYNTHETIC_BENCHMARKS as BENCHMARKS

log = logging.getLogger(__name__)

# A pose-domain image turns at least this far (degrees); otherwise an age-domain image is at least this old.
POSE_DOMAIN_MIN_YAW = 45.0
AGE_DOMAIN_MIN_AGE = 0.65

# Nuisance kinds of the a and b image of every pair.
_BENCHMARK_SIDES = {"synth_lfw": ("general", "general"), "synth_cfp_fp": ("frontal", "profile"),
                    "synth_agedb": ("young", "old")}
NUM_FOLDS = 10
COMPLETE_MARKER = "COMPLETE.json"

# Random streams of the world (SeedSequence entropy = [seed, stream, ...]).
_IDENTITY_STREAM, _TRAIN_NUISANCE_STREAM, _PAIR_PLAN_STREAM, _PAIR_NUISANCE_STREAM = 1, 2, 3, 4

# Head-surface texture resolution: about 40 texels per radian, a little above the pixel density of the face
# centre at 112 px.
_TEX_V, _TEX_T = 128, 256
_TEX_THETA = ((np.arange(_TEX_T) + 0.5) / _TEX_T * 2 - 1).astype(np.float32)[None, :] * np.float32(np.pi)
_TEX_VGRID = ((np.arange(_TEX_V) + 0.5) / _TEX_V * 2 - 1).astype(np.float32)[:, None]
_TEXTURE_CHANNELS = 8  # young RGB, old RGB, height slope along theta, height slope along v

_SKIN_PALETTE = np.array([[0.96, 0.80, 0.70], [0.88, 0.68, 0.54], [0.76, 0.55, 0.40], [0.58, 0.40, 0.28],
                          [0.40, 0.26, 0.18], [0.27, 0.17, 0.12]], np.float32)
_HAIR_PALETTE = np.array([[0.06, 0.05, 0.05], [0.16, 0.10, 0.07], [0.30, 0.19, 0.11], [0.45, 0.30, 0.17],
                          [0.55, 0.24, 0.10], [0.78, 0.62, 0.38], [0.90, 0.80, 0.55]], np.float32)
_EYE_PALETTE = np.array([[0.22, 0.12, 0.06], [0.38, 0.22, 0.10], [0.45, 0.38, 0.18], [0.30, 0.45, 0.25],
                         [0.30, 0.50, 0.72], [0.50, 0.58, 0.62]], np.float32)
_GREY_HAIR = np.array([0.80, 0.79, 0.77], np.float32)


def _ramp(x, width):
  """0 -> 1 soft step of the given width centred on x = 0 (a cheap, clipped linear edge)."""
  return np.clip(0.5 + x / width, 0.0, 1.0)


def _over(colour, alpha, rgb):
  """Composites `rgb` with coverage `alpha` over `colour` in place."""
  alpha = alpha[..., None]
  colour += alpha * (np.asarray(rgb, np.float32) - colour)


def _gauss(d2, radius):
  return np.exp(-d2 / np.float32(radius * radius))


@dataclass
class Identity:
  """One identity: scalar geometry used at render time and its head-surface texture (flattened)."""
  identity_id: int
  geometry: dict[str, float]
  skin_rgb: np.ndarray
  hair_rgb: np.ndarray
  texture: np.ndarray  # float32 [_TEX_V * _TEX_T, 8]


# ---------------------------------------------------------------------------------------------------------------
# Identities


def _sample_identity_parameters(rng: np.random.Generator) -> dict:
  u = rng.random
  masculinity = float(u())
  tone = float(np.clip(rng.beta(1.4, 1.6), 0, 0.999)) * (len(_SKIN_PALETTE) - 1)
  low = int(tone)
  skin = _SKIN_PALETTE[low] + (tone - low) * (_SKIN_PALETTE[low + 1] - _SKIN_PALETTE[low])
  skin = np.clip(skin * (1 + rng.uniform(-0.05, 0.05, 3)), 0.05, 1).astype(np.float32)
  # Darker skin tones come with darker hair more often, as in most populations.
  hair_weights = np.array([4, 3, 3, 2, 1, 1.5, 1.0]) if tone <= 2.5 else np.array([8, 4, 1.5, 0.5, 0.2, 0.1, 0.1])
  hair = _HAIR_PALETTE[rng.choice(len(_HAIR_PALETTE), p=hair_weights / hair_weights.sum())]
  hair = np.clip(hair * (1 + rng.uniform(-0.12, 0.12, 3)), 0.02, 1).astype(np.float32)
  eye_weights = np.array([5, 3, 1.5, 1, 1.5, 0.7]) if tone < 2.0 else np.array([6, 4, 0.6, 0.1, 0.1, 0.1])
  eye_rgb = _EYE_PALETTE[rng.choice(len(_EYE_PALETTE), p=eye_weights / eye_weights.sum())]

  p = dict(masculinity=masculinity, skin_rgb=skin, hair_rgb=hair,
           eye_rgb=np.clip(eye_rgb * (1 + rng.uniform(-0.1, 0.1, 3)), 0, 1).astype(np.float32))
  p.update(
      head_width=0.58 + 0.10 * u() + 0.03 * masculinity, head_height=0.86 + 0.10 * u(),
      head_offset_y=0.02 + 0.05 * (u() - 0.5), jaw_taper=0.42 + 0.30 * u() - 0.18 * masculinity,
      sag_rate=0.5 + 0.5 * u(),
      eye_sep=0.32 + 0.13 * u(), eye_v=-0.24 + 0.10 * u(), eye_w=0.11 + 0.06 * u(), eye_h=0.032 + 0.026 * u(),
      eye_tilt=0.12 * (u() - 0.5), iris_frac=0.75 + 0.2 * u(),
      brow_gap=0.08 + 0.07 * u(), brow_w=0.15 + 0.08 * u(), brow_thick=0.012 + 0.012 * u() + 0.014 * masculinity,
      brow_arch=-0.01 + 0.05 * u(), brow_tilt=0.06 * (u() - 0.5), brow_shift=0.04 * (u() - 0.3),
      nose_tip_v=0.10 + 0.14 * u(), nose_depth=0.10 + 0.10 * u(), nose_ridge=0.05 + 0.04 * u(),
      nostril_sep=0.06 + 0.06 * u(),
      mouth_gap=0.17 + 0.12 * u(), mouth_w=0.17 + 0.13 * u(), upper_lip=0.015 + 0.02 * u(),
      lower_lip=0.022 + 0.03 * u(), lip_redness=0.2 + 0.6 * u() - 0.25 * masculinity, smile=0.04 * (u() - 0.5),
      blush=0.12 * u() * (1.2 - masculinity),
      ear_v=-0.10 + 0.10 * u(), ear_h=0.16 + 0.08 * u(), ear_w=0.06 + 0.06 * u(),
      hairline_v=-0.74 + 0.26 * u(), hairline_curve=0.25 * u(), part=0.06 * (u() - 0.5),
      bangs=float(u() < 0.3 * (1.3 - masculinity)), bangs_v=-0.50 + 0.15 * u(),
      long_hair=float(u() < 0.9 * (1 - masculinity) ** 1.2), hair_volume=0.02 + 0.10 * u(),
      hair_bottom=0.55 + 0.45 * u(), strand_freq=40 + 50 * u(), strand_phase=6.3 * u(),
      greying=0.55 + 0.45 * u(), baldness=float(masculinity > 0.5 and u() < 0.5) * (0.3 + 0.7 * u()),
      beard_style=int(rng.choice(5, p=[0.4, 0.15, 0.15, 0.1, 0.2])) if masculinity > 0.55 else 0,
      beard_density=0.45 + 0.5 * u(),
      wrinkle_strength=0.6 + 0.5 * u(), wrinkle_spacing=0.045 + 0.03 * u(), wrinkle_phase=6.3 * u(),
      freckles=float(u() < 0.25) * (0.03 + 0.1 * u()),
  )
  p["mouth_v"] = min(p["nose_tip_v"] + p["mouth_gap"], 0.62)
  num_moles = int(min(rng.poisson(1.3), 5))
  p["moles"] = np.stack([rng.uniform(-1.1, 1.1, num_moles), rng.uniform(-0.45, 0.85, num_moles),
                         rng.uniform(0.008, 0.02, num_moles)], 1).astype(np.float32)
  num_spots = int(rng.integers(3, 9))
  p["age_spots"] = np.stack([rng.uniform(-1.0, 1.0, num_spots), rng.uniform(-0.7, 0.5, num_spots),
                             rng.uniform(0.01, 0.025, num_spots)], 1).astype(np.float32)
  p["grain"] = rng.random((_TEX_V, _TEX_T), dtype=np.float32)  # per-identity hair / brow / beard density noise
  p["freckle_seed"] = rng.random((_TEX_V, _TEX_T), dtype=np.float32)
  p["mottle"] = rng.normal(0, 1, 4).astype(np.float32)  # low-frequency skin unevenness
  return p


def _hair_boundary(p: dict, age: float) -> np.ndarray:
  """v of the lower edge of the hair for every texture column (hair where v < boundary)."""
  theta = np.abs(_TEX_THETA[0])
  front = p["hairline_v"] + p["hairline_curve"] * theta ** 2
  ear_top = p["ear_v"] - 0.6 * p["ear_h"]
  if p["long_hair"]:
    side, back = 1.05, 1.05
  else:
    side, back = ear_top, 0.35 + 0.2 * p["hair_bottom"]
  knots_theta = [0.0, 0.95, 1.25, 1.85, np.pi]
  knots_v = [p["hairline_v"], p["hairline_v"] + p["hairline_curve"] * 0.9 + 0.05, side, back, back]
  boundary = np.where(theta < 0.95, front, np.interp(theta, knots_theta, knots_v)).astype(np.float32)
  boundary += p["part"] * np.sign(_TEX_THETA[0]) * (theta < 1.0)
  if p["bangs"]:
    wave = 0.025 * np.sin(_TEX_THETA[0] * 23 + p["strand_phase"])
    boundary = np.where(theta < 0.9, np.maximum(boundary, p["bangs_v"] + wave), boundary)
  if age > 0 and p["baldness"] > 0:
    # Recession from the temples and the crown: the front of the hair moves towards the top of the head.
    recede = p["baldness"] * np.clip(1.6 - theta, 0, 1)
    boundary = boundary - recede * (boundary + 1.05)
  return boundary


def _albedo(p: dict, age: float) -> np.ndarray:
  """Head-surface colour [_TEX_V, _TEX_T, 3] of the identity at age 0 (young) or 1 (old)."""
  T, V = _TEX_THETA, _TEX_VGRID
  ax, ay = p["head_width"], p["head_height"]
  old = age > 0
  skin = p["skin_rgb"].copy()
  if old:  # paler, greyer, slightly sallow skin
    grey = skin.mean()
    skin = (0.78 * skin + 0.22 * grey) * np.array([1.02, 1.0, 0.93], np.float32)
  m = p["mottle"]
  mottle = 1 + 0.035 * (m[0] * np.sin(T * 2.1 + m[1]) * np.cos(V * 3.3 + m[2]) + m[3] * np.sin(V * 5.7 + T * 1.3))
  colour = (skin * mottle[..., None]).astype(np.float32)
  contrast = 0.8 if old else 1.0  # features fade with age

  for side in (-1.0, 1.0):
    # cheeks
    blush = p["blush"] * (0.5 if old else 1.0)
    colour *= 1 + (blush * _gauss((T - side * 0.62) ** 2 + (V - p["eye_v"] - 0.3) ** 2, 0.14)[..., None]
                   * np.array([0.25, -0.05, -0.05], np.float32))
    # ear: darker concha inside a lighter rim
    ear_q = ((T - side * np.pi / 2) / 0.17) ** 2 + ((V - p["ear_v"]) / (0.5 * p["ear_h"])) ** 2
    _over(colour, 0.35 * _ramp(0.55 - ear_q, 0.3), skin * 0.55)

  # moles and freckles
  for theta0, v0, radius in p["moles"]:
    d2 = ((T - theta0) * ax) ** 2 + ((V - v0) * ay) ** 2
    _over(colour, 0.85 * _ramp(1 - d2 / radius ** 2, 0.6), skin * np.array([0.35, 0.24, 0.2], np.float32))
  if p["freckles"] > 0:
    weight = (_gauss((np.abs(T) - 0.45) ** 2 + (V - 0.02) ** 2, 0.22) + _gauss(T ** 2 + (V - 0.0) ** 2, 0.12))
    spots = (p["freckle_seed"] < p["freckles"] * weight).astype(np.float32)
    spots = 0.5 * spots + 0.125 * (np.roll(spots, 1, 0) + np.roll(spots, -1, 0) + np.roll(spots, 1, 1)
                                   + np.roll(spots, -1, 1))
    colour *= 1 - (0.45 * contrast * np.clip(spots, 0, 1))[..., None] * np.array([0.6, 0.75, 0.85], np.float32)

  if old:
    w = p["wrinkle_strength"]
    # forehead lines
    band = _ramp(V - (p["hairline_v"] + 0.08), 0.04) * _ramp(p["eye_v"] - p["brow_gap"] - 0.07 - V, 0.04)
    band = band * _ramp(0.75 - np.abs(T), 0.2)
    lines = np.abs(np.sin(np.pi * (V - 0.03 * np.sin(T * 3 + p["wrinkle_phase"])) / p["wrinkle_spacing"]))
    colour *= 1 - (0.22 * w * band * _ramp(0.3 - lines, 0.2))[..., None]
    for side in (-1.0, 1.0):
      # crow's feet at the outer eye corners
      dt = side * (T - side * (p["eye_sep"] + p["eye_w"] + 0.05))
      dv = V - p["eye_v"]
      radius = np.sqrt((dt * ax) ** 2 + (dv * ay) ** 2)
      fan = np.abs(np.sin(7 * np.arctan2(dv, np.abs(dt) + 1e-3) + p["wrinkle_phase"]))
      ring = _ramp(radius - 0.012, 0.01) * _ramp(0.07 - radius, 0.02) * (dt > -0.02)
      colour *= 1 - (0.28 * w * ring * _ramp(0.25 - fan, 0.2))[..., None]
      # nasolabial fold from the nose wing to below the mouth corner
      v0, v1 = p["nose_tip_v"] + 0.02, p["mouth_v"] + 0.08
      t_fold = side * (p["nostril_sep"] + 0.08 + (V - v0) / (v1 - v0) * (p["mouth_w"] - p["nostril_sep"] - 0.03))
      fold = _ramp(0.025 - np.abs(T - t_fold), 0.02) * _ramp(V - v0, 0.03) * _ramp(v1 - V, 0.03)
      colour *= 1 - (0.3 * w * fold)[..., None]
      # under-eye bags
      dt = T - side * p["eye_sep"]
      bag = ((dt / (p["eye_w"] * 1.1)) ** 2 + ((V - p["eye_v"] - p["eye_h"] - 0.035) / 0.03) ** 2)
      colour *= 1 - (0.18 * w * _ramp(1 - bag, 0.4) * (V > p["eye_v"] + p["eye_h"]))[..., None]
    for theta0, v0, radius in p["age_spots"]:
      d2 = ((T - theta0) * ax) ** 2 + ((V - v0) * ay) ** 2
      colour *= 1 - (0.25 * _ramp(1 - d2 / radius ** 2, 0.8))[..., None] * np.array([0.5, 0.7, 0.9], np.float32)

  # eyes
  eye_h = p["eye_h"] * (0.85 if old else 1.0)  # hooded lids
  for side in (-1.0, 1.0):
    dt = T - side * p["eye_sep"]
    dv = V - p["eye_v"] + p["eye_tilt"] * side * dt
    socket = _gauss((dt * ax) ** 2 + (dv * ay * 1.3) ** 2, 0.09)
    colour *= 1 - (0.12 * socket)[..., None]
    q = (dt / p["eye_w"]) ** 2 + (dv / eye_h) ** 2
    sclera = _ramp(1 - q, 0.35)
    _over(colour, sclera * contrast, np.array([0.93, 0.91, 0.88], np.float32))
    iris_r2 = (p["iris_frac"] * eye_h * ay) ** 2 * 1.6
    d2 = (dt * ax) ** 2 + (dv * ay) ** 2
    iris = _ramp(1 - d2 / iris_r2, 0.3) * sclera
    _over(colour, iris * contrast, p["eye_rgb"])
    _over(colour, _ramp(1 - d2 / (0.16 * iris_r2), 0.4) * sclera, np.array([0.04, 0.03, 0.03], np.float32))
    lash = _ramp(0.35 - np.abs(q - 1.0), 0.3) * (dv < 0.25 * eye_h)
    _over(colour, 0.9 * contrast * lash, np.array([0.08, 0.06, 0.05], np.float32))

  # brows
  brow_rgb = p["hair_rgb"] * 0.8 + 0.02
  if old:
    brow_rgb = brow_rgb + 0.5 * p["greying"] * (_GREY_HAIR - brow_rgb)
  for side in (-1.0, 1.0):
    across = side * (T - side * (p["eye_sep"] + p["brow_shift"])) / p["brow_w"]
    centre = p["eye_v"] - p["brow_gap"] - p["brow_arch"] * (1 - across ** 2) - p["brow_tilt"] * across
    half = p["brow_thick"] * (1.05 - 0.35 * np.clip(across, -1, 1)) * (0.85 if old else 1.0)
    brow = _ramp(1 - np.abs(across), 0.2) * _ramp(half - np.abs(V - centre), 0.012)
    _over(colour, brow * (0.65 + 0.35 * p["grain"]) * contrast, brow_rgb)

  # nose: nostrils and a slightly redder tip
  tip = p["nose_tip_v"]
  colour *= 1 + (0.06 * _gauss((T * ax) ** 2 + ((V - tip) * ay) ** 2, 0.04)[..., None]
                 * np.array([1.0, -0.3, -0.3], np.float32))
  for side in (-1.0, 1.0):
    q = ((T - side * p["nostril_sep"]) / 0.035) ** 2 + ((V - tip - 0.035) / 0.016) ** 2
    _over(colour, 0.8 * _ramp(1 - q, 0.6), skin * 0.3)

  # mouth
  across = T / p["mouth_w"]
  envelope = np.sqrt(np.clip(1 - across ** 2, 0, 1))
  line_v = p["mouth_v"] - p["smile"] * across ** 2
  lip_scale = 0.7 if old else 1.0
  top = line_v - p["upper_lip"] * lip_scale * envelope * (1 - 0.35 * _gauss(T ** 2, 0.05))
  bottom = line_v + p["lower_lip"] * lip_scale * envelope
  lips = _ramp(V - top, 0.012) * _ramp(bottom - V, 0.012) * _ramp(1 - np.abs(across), 0.1)
  lip_rgb = skin * np.array([0.85, 0.55, 0.55], np.float32) + p["lip_redness"] * np.array([0.12, 0.0, 0.02],
                                                                                           np.float32)
  if old:
    lip_rgb = 0.6 * lip_rgb + 0.4 * skin
  _over(colour, lips, lip_rgb)
  _over(colour, 0.8 * _ramp(0.006 - np.abs(V - line_v), 0.006) * _ramp(1 - np.abs(across), 0.15),
        skin * 0.25)

  # beard (0 none, 1 stubble, 2 moustache, 3 goatee + moustache, 4 full)
  style = p["beard_style"]
  if style:
    beard_rgb = p["hair_rgb"] * 0.9
    if old:
      beard_rgb = beard_rgb + 0.8 * p["greying"] * (_GREY_HAIR - beard_rgb)
    not_lips = 1 - lips
    moustache = (_ramp(V - tip - 0.06, 0.02) * _ramp(top - 0.005 - V, 0.015)
                 * _ramp(p["mouth_w"] + 0.05 - np.abs(T), 0.04))
    chin = _ramp(V - bottom - 0.01, 0.02) * _ramp(0.35 - np.abs(T), 0.08) * _ramp(0.98 - V, 0.05)
    jaw = (_ramp(V - (p["mouth_v"] - 0.1 - 0.3 * np.clip(np.abs(T) - 0.35, 0, 1)), 0.05)
           * _ramp(1.45 - np.abs(T), 0.1) * _ramp(0.99 - V, 0.03))
    coverage = {1: jaw * 0.35, 2: moustache, 3: np.maximum(moustache, chin), 4: np.maximum(jaw, moustache)}[style]
    _over(colour, coverage * not_lips * p["beard_density"] * (0.55 + 0.45 * p["grain"]), beard_rgb)

  # hair on the head, over everything it covers
  hair_rgb = p["hair_rgb"]
  if old:
    hair_rgb = hair_rgb + p["greying"] * (_GREY_HAIR - hair_rgb)
  boundary = _hair_boundary(p, age)[None, :]
  hair = _ramp(boundary - V + 0.03 * (p["grain"] - 0.5), 0.035)
  strands = 0.9 + 0.12 * np.sin(T * p["strand_freq"] + 3 * np.sin(V * 4 + p["strand_phase"]))
  strands = strands * (0.85 + 0.3 * p["grain"])
  _over(colour, hair, np.float32(0))
  colour += (hair * strands)[..., None] * hair_rgb
  return np.clip(colour, 0, 1)


def _height_slopes(p: dict) -> tuple[np.ndarray, np.ndarray]:
  """Slopes of the identity's relief (nose, brow ridge, eye sockets, cheekbones, lips, chin, ears)."""
  T, V = _TEX_THETA, _TEX_VGRID
  ax, ay = p["head_width"], p["head_height"]
  tip, bridge = p["nose_tip_v"], p["eye_v"] + 0.02
  along = np.clip((V - bridge) / (tip - bridge), 0, 1) * _ramp(tip + 0.04 - V, 0.05)
  h = p["nose_depth"] * 0.35 * np.exp(-(T / p["nose_ridge"]) ** 2) * along
  h = h + p["nose_depth"] * 0.15 * _gauss((T * ax) ** 2 + ((V - tip) * ay) ** 2, 0.035)
  h = h + 0.04 * np.exp(-((V - p["eye_v"] + 0.7 * p["brow_gap"]) / 0.05) ** 2) * np.exp(-(T / 0.75) ** 4)
  h = h - 0.03 * np.exp(-(T / 0.2) ** 2 - ((V - p["eye_v"]) / 0.06) ** 2)
  h = h + 0.012 * np.exp(-(T / p["mouth_w"]) ** 4 - ((V - p["mouth_v"]) / 0.05) ** 2)
  h = h + 0.03 * np.exp(-(T / 0.35) ** 2 - ((V - 0.85) / 0.1) ** 2)
  for side in (-1.0, 1.0):
    h = h + 0.015 * np.exp(-((T - side * p["nostril_sep"]) / 0.04) ** 2 - ((V - tip) / 0.04) ** 2)
    h = h - 0.03 * np.exp(-((T - side * p["eye_sep"]) / 0.12) ** 2 - ((V - p["eye_v"]) / 0.06) ** 2)
    h = h + 0.025 * np.exp(-((T - side * 0.62) / 0.2) ** 2 - ((V - p["eye_v"] - 0.2) / 0.12) ** 2)
    h = h + 0.05 * np.exp(-((T - side * np.pi / 2) / 0.15) ** 2 - ((V - p["ear_v"]) / (0.5 * p["ear_h"])) ** 2)
  slope_v, slope_t = np.gradient(h, 2.0 / _TEX_V, 2 * np.pi / _TEX_T)
  return (slope_t / ax).astype(np.float32), (slope_v / ay).astype(np.float32)


_GEOMETRY_KEYS = (
    "head_width", "head_height", "head_offset_y", "jaw_taper", "sag_rate", "nose_tip_v", "nose_depth", "eye_v",
    "eye_sep", "eye_w", "eye_h", "mouth_v", "mouth_w", "smile", "ear_v", "ear_h", "ear_w", "hair_volume",
    "hair_bottom", "long_hair", "greying", "baldness", "strand_freq", "strand_phase")


def _parameters(seed: int, identity_id: int) -> dict:
  return _sample_identity_parameters(np.random.default_rng([seed, _IDENTITY_STREAM, identity_id]))


def make_geometry(seed: int, identity_id: int) -> dict[str, float]:
  """The scalar geometry of identity `identity_id` of the world `seed` (as `make_identity`, without textures)."""
  p = _parameters(seed, identity_id)
  return {key: float(p[key]) for key in _GEOMETRY_KEYS}


def make_identity(seed: int, identity_id: int) -> Identity:
  """The identity `identity_id` of the world `seed` (its parameters and textures; deterministic)."""
  p = _parameters(seed, identity_id)
  slope_t, slope_v = _height_slopes(p)
  texture = np.concatenate([_albedo(p, 0.0), _albedo(p, 1.0), slope_t[..., None], slope_v[..., None]], axis=-1)
  return Identity(identity_id=identity_id, geometry={key: float(p[key]) for key in _GEOMETRY_KEYS},
                  skin_rgb=p["skin_rgb"], hair_rgb=p["hair_rgb"],
                  texture=np.ascontiguousarray(texture.reshape(-1, _TEXTURE_CHANNELS), dtype=np.float32))


# ---------------------------------------------------------------------------------------------------------------
# Nuisance factors

NUISANCE_KINDS = ("train", "pretrain", "general", "frontal", "profile", "young", "old")
# Light of the "pretrain" kind (the general domain only: ordinary light) and of every other kind:
# (azimuth, elevation low, elevation high, intensity low, intensity high, ambient low, ambient high).
_ORDINARY_LIGHT = (45, 0, 45, 0.6, 1.05, 0.25, 0.5)
_ANY_LIGHT = (75, -15, 55, 0.45, 1.15, 0.2, 0.55)


def sample_nuisance(rng: np.random.Generator, kind: str) -> dict[str, float]:
  """Conditions of one image. yaw in degrees (sign = turn direction), age in [0, 1] (young -> old)."""
  u = rng.uniform
  if kind == "train":
    which = rng.random()
    abs_yaw = u(0, 30) if which < 0.55 else (u(30, 50) if which < 0.7 else u(50, 90))
    age = u(0, 1)
  elif kind == "pretrain":  # the general domain only: near-frontal, young (pose and age stay unseen)
    abs_yaw, age = u(0, 30), u(0, 0.45)
  elif kind == "general":
    abs_yaw, age = u(0, 35), u(0, 0.75)
  elif kind == "frontal":
    abs_yaw, age = u(0, 10), u(0, 0.7)
  elif kind == "profile":
    abs_yaw, age = u(65, 90), u(0, 0.7)
  elif kind == "young":
    abs_yaw, age = u(0, 25), u(0, 0.2)
  elif kind == "old":
    abs_yaw, age = u(0, 25), u(0.8, 1.0)
  else:
    raise ValueError(f"nuisance kind must be one of {NUISANCE_KINDS}, got {kind!r}")
  azimuth, elevation0, elevation1, intensity0, intensity1, ambient0, ambient1 = (
      _ORDINARY_LIGHT if kind == "pretrain" else _ANY_LIGHT)
  temperature = u(-1, 1)
  tint = 1 + u(-0.06, 0.06, 3)
  background0, background1, cloth = u(0.03, 0.97, 3), u(0.03, 0.97, 3), u(0.03, 0.9, 3)
  if rng.random() < 0.3:  # plain walls are common
    background1 = background0 * u(0.6, 1.2)
  return dict(
      yaw=abs_yaw * rng.choice((-1.0, 1.0)), age=age,
      light_azimuth=u(-azimuth, azimuth), light_elevation=u(elevation0, elevation1),
      light_intensity=u(intensity0, intensity1), ambient=u(ambient0, ambient1),
      cast_r=(1 + 0.14 * temperature) * tint[0], cast_g=tint[1], cast_b=(1 - 0.18 * temperature) * tint[2],
      exposure=u(0.75, 1.2), shift_x=u(-0.06, 0.06), shift_y=u(-0.06, 0.06), scale=u(0.92, 1.08),
      roll=u(-9, 9), noise=u(0.002, 0.016),
      bg_r0=background0[0], bg_g0=background0[1], bg_b0=background0[2],
      bg_r1=background1[0], bg_g1=background1[1], bg_b1=background1[2], bg_dx=u(-1, 1), bg_dy=u(-1, 1),
      cloth_r=cloth[0], cloth_g=cloth[1], cloth_b=cloth[2], shoulder_y=u(0.78, 0.95))


def domain_of(yaw, age) -> np.ndarray:
  """0 general, 1 pose (|yaw| >= 45 degrees), 2 age (age >= 0.65 and not pose)."""
  yaw, age = np.asarray(yaw), np.asarray(age)
  return np.where(np.abs(yaw) >= POSE_DOMAIN_MIN_YAW, 1, np.where(age >= AGE_DOMAIN_MIN_AGE, 2, 0)).astype(np.int64)


# ---------------------------------------------------------------------------------------------------------------
# Rendering


class FaceRenderer:
  """Renders faces at `image_size` px; coordinate grids and a sensor-noise bank are computed once."""

  def __init__(self, image_size: int = 112):
    if image_size < 16:
      raise ValueError(f"image_size must be at least 16 px, got {image_size}")
    self.image_size = image_size
    coords = ((np.arange(image_size) + 0.5) / image_size * 2 - 1).astype(np.float32)
    self._x = coords[None, :]
    self._y = coords[:, None]
    self._pixel = 2.0 / image_size
    # Sensor noise is cut from a fixed bank at a random offset: as random per image as fresh draws, 10x cheaper.
    self._noise_bank = np.random.default_rng(0).standard_normal((4, 2 * image_size, 2 * image_size, 3),
                                                                  dtype=np.float32)

  def render(self, identity: Identity, nuisance: dict[str, float], rng: np.random.Generator) -> np.ndarray:
    """uint8 [S, S, 3]: the identity under the nuisance conditions; `rng` draws the sensor noise."""
    g, n = identity.geometry, nuisance
    f32 = np.float32
    px = self._pixel
    yaw = np.radians(n["yaw"])
    sin_yaw = float(np.sin(yaw))
    age = float(n["age"])
    ax, ay, cy = g["head_width"], g["head_height"], g["head_offset_y"]
    sag = g["sag_rate"] * age

    # image -> head coordinates (undo shift, roll and scale)
    roll = np.radians(n["roll"])
    cos_r, sin_r, scale = float(np.cos(roll)), float(np.sin(roll)), n["scale"]
    x = self._x - f32(n["shift_x"])
    y = self._y - f32(n["shift_y"])
    xh = (cos_r / scale) * x + (sin_r / scale) * y
    yh = (cos_r / scale) * y - (sin_r / scale) * x

    v = (yh - f32(cy)) * f32(1 / ay)
    v_clipped = np.clip(v, -1, 1)
    lat = np.sqrt(1 - v_clipped * v_clipped)
    below = np.clip(v, 0, 1)
    half_width = (ax * lat) * (1 - (g["jaw_taper"] * (1 - 0.35 * sag)) * (below * below))
    # (half a pixel inside the ellipse, so that rows above and below the head, where the width is 0, stay empty)
    head_alpha = _ramp(half_width - np.abs(xh) - 0.5 * px, px)

    light_azimuth, light_elevation = np.radians(n["light_azimuth"]), np.radians(n["light_elevation"])
    light_x = float(np.sin(light_azimuth) * np.cos(light_elevation))
    light_y = float(-np.sin(light_elevation))
    light_z = float(np.cos(light_azimuth) * np.cos(light_elevation))
    ambient, intensity = n["ambient"], n["light_intensity"]

    # background: a two-colour gradient
    background0 = np.array([n["bg_r0"], n["bg_g0"], n["bg_b0"]], f32)
    background1 = np.array([n["bg_r1"], n["bg_g1"], n["bg_b1"]], f32)
    mix = np.clip(0.5 + 0.5 * (self._x * f32(n["bg_dx"]) + self._y * f32(n["bg_dy"])), 0, 1)[..., None]
    image = background0 + mix * (background1 - background0)

    # neck and clothes
    skin = identity.skin_rgb
    neck = _ramp(0.5 * ax - np.abs(xh - 0.25 * ax * sin_yaw), px) * _ramp(yh - cy, 0.1)
    neck_light = ambient + 0.7 * intensity * max(0.8 * light_z - 0.4 * light_y, 0.0)
    _over(image, neck, skin * f32(0.8 * neck_light))
    shoulders = _ramp(yh - (n["shoulder_y"] + 0.45 * xh * xh) * ay, px * 2)
    cloth = np.array([n["cloth_r"], n["cloth_g"], n["cloth_b"]], f32)
    _over(image, shoulders, cloth * f32(ambient + 0.6 * intensity * max(light_z, 0.0)))

    # hair mass around the head, shifted towards the back of the head when it turns
    greying = g["greying"] * age ** 1.3
    hair_rgb = identity.hair_rgb + f32(greying) * (_GREY_HAIR - identity.hair_rgb)
    baldness = g["baldness"] * age
    volume = g["hair_volume"] * (1 - 0.7 * baldness)
    long_hair = g["long_hair"]
    hair_x = xh + 0.12 * ax * sin_yaw
    hair_y = yh - (cy - 0.05)
    mass = 1 - (hair_x * (1 / (ax + volume))) ** 2 - (hair_y * (1 / (ay + 1.3 * volume))) ** 2
    bottom = g["hair_bottom"] if long_hair else cy + 0.1 * ay
    hair_alpha = _ramp(mass, 0.05) * _ramp(bottom - yh, 0.04)
    if long_hair:
      curtain = _ramp(ax + 0.8 * volume - np.abs(hair_x), px * 2) * _ramp(yh - cy, 0.05) * _ramp(bottom - yh, 0.06)
      hair_alpha = np.maximum(hair_alpha, curtain)
    else:
      hair_alpha *= 1 - 0.85 * baldness
    strands = 0.85 + 0.15 * np.sin(hair_x * g["strand_freq"] + 6 * hair_y + g["strand_phase"])
    hair_light = ambient + 0.5 * intensity * max(light_z - 0.3 * light_y, 0.0)
    _over(image, hair_alpha, hair_rgb * (strands * f32(hair_light))[..., None])

    # ears sticking out of the silhouette near frontal views
    ear_visible = max(1 - 2.5 * abs(sin_yaw), 0.0) * (1 - long_hair)
    if ear_visible > 0:
      ear_y = cy + g["ear_v"] * ay
      ear_root = ax * np.sqrt(1 - g["ear_v"] ** 2)
      ear_colour = skin * f32(0.85 * (ambient + intensity * max(light_z, 0.0)))
      for side in (-1.0, 1.0):
        q_ear = (((xh - side * (ear_root + 0.25 * g["ear_w"])) * (1 / (0.6 * g["ear_w"]))) ** 2
                 + ((yh - ear_y) * (1 / (0.5 * g["ear_h"] * ay))) ** 2)
        _over(image, ear_visible * _ramp(1 - q_ear, 0.3), ear_colour)

    # the head, looked up in the identity texture, on the crop that holds it
    rows = np.flatnonzero(head_alpha.any(axis=1))
    cols = np.flatnonzero(head_alpha.any(axis=0))
    if rows.size:
      crop = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
      alpha, width, vc, latc = head_alpha[crop], half_width[crop], v_clipped[crop], lat[crop]
      q = np.clip(xh[crop] / np.maximum(width, f32(1e-3)), -0.999, 0.999)
      cos_view = np.sqrt(1 - q * q)
      theta = np.arcsin(q) - f32(yaw)
      v_texture = v[crop] - f32(0.07 * sag) * below[crop]  # sagging: the lower face slides down
      u_tex = theta * f32(_TEX_T / (2 * np.pi)) + f32(_TEX_T / 2 - 0.5)
      v_tex = np.clip(v_texture * f32(_TEX_V / 2) + f32(_TEX_V / 2 - 0.5), 0, _TEX_V - 1.001)
      u_floor, v_floor = np.floor(u_tex), np.floor(v_tex)
      fu, fv = (u_tex - u_floor)[..., None], (v_tex - v_floor)[..., None]
      column0 = u_floor.astype(np.intp) % _TEX_T
      column1 = (column0 + 1) % _TEX_T
      row0 = v_floor.astype(np.intp) * _TEX_T
      row1 = row0 + _TEX_T
      texture = identity.texture
      top = np.take(texture, row0 + column0, axis=0)
      top += fu * (np.take(texture, row0 + column1, axis=0) - top)
      sample = np.take(texture, row1 + column0, axis=0)
      sample += fu * (np.take(texture, row1 + column1, axis=0) - sample)
      sample -= top
      sample *= fv
      sample += top
      albedo = sample[..., 0:3] + f32(age) * (sample[..., 3:6] - sample[..., 0:3])
      # Lambert shading with the normal tilted against the relief slopes (tangents along theta and along v)
      n_dot_l = (q * latc) * light_x + vc * light_y + (cos_view * latc) * light_z
      n_dot_l -= sample[..., 6] * (cos_view * light_x - q * light_z)
      n_dot_l -= sample[..., 7] * (latc * light_y - vc * (q * light_x + cos_view * light_z))
      shade = ambient + intensity * np.maximum(n_dot_l, 0)
      region = image[crop]
      region += alpha[..., None] * (albedo * shade[..., None] - region)

      # the nose leaves the silhouette when the head turns
      if abs(sin_yaw) > 0.02:
        tip_v, bridge_v = g["nose_tip_v"], g["eye_v"] + 0.02
        vr = v[crop]
        profile = (g["nose_depth"] * abs(sin_yaw)) * np.clip((vr - bridge_v) * (1 / (tip_v - bridge_v)), 0, 1) \
            * _ramp(tip_v + 0.05 - vr, 0.04)
        direction = 1.0 if sin_yaw > 0 else -1.0
        out = (xh[crop] - width * sin_yaw) * direction
        nose_alpha = _ramp(profile - out, px) * _ramp(out + px, px) * np.minimum(profile * (1 / px), 1)
        nose_light = ambient + intensity * max(0.7 * direction * light_x + 0.7 * light_z, 0.0)
        _over(region, nose_alpha, skin * f32(nose_light))

    cast = np.array([n["cast_r"], n["cast_g"], n["cast_b"]], f32) * f32(n["exposure"])
    image *= cast
    size = self.image_size
    bank, offset_y, offset_x = rng.integers(0, len(self._noise_bank)), rng.integers(0, size), rng.integers(0, size)
    image += f32(n["noise"]) * self._noise_bank[bank, offset_y:offset_y + size, offset_x:offset_x + size]
    np.clip(image, 0, 1, out=image)
    return (image * 255 + 0.5).astype(np.uint8)


def landmarks(geometry: dict[str, float], nuisance: dict[str, float], image_size: int) -> np.ndarray:
  """float32 [5, 2]: (x, y) pixel positions (pixel centres at integers) of the eye centres, the nose tip and the
  mouth corners in the image that `FaceRenderer(image_size).render(identity, nuisance, ...)` draws for the
  identity of this `geometry` (`Identity.geometry`, or `make_geometry`), in the order
  of the five-point face template (image-left eye first). Worked out from the geometry the renderer draws: an eye or
  a mouth corner turned out of view lies on the silhouette, where a landmark detector would guess it."""
  g, n = geometry, nuisance
  yaw = np.radians(n["yaw"])
  sag = g["sag_rate"] * n["age"]

  def half_width(v):  # of the head at image latitude v (as in `render`)
    below = min(max(v, 0.0), 1.0)
    return g["head_width"] * np.sqrt(1 - v * v) * (1 - g["jaw_taper"] * (1 - 0.35 * sag) * below * below)

  mouth_v = g["mouth_v"] - g["smile"]
  mouth_v = mouth_v / (1 - 0.07 * sag) if mouth_v > 0 else mouth_v  # the lower face slides down with age
  nose_v = g["nose_tip_v"]
  head = [(np.sin(np.clip(theta + yaw, -np.pi / 2, np.pi / 2)) * half_width(v), v) for theta, v in (
      (-g["eye_sep"], g["eye_v"]), (g["eye_sep"], g["eye_v"]))]
  # the tip of the nose layer, which is drawn only as far as the head's widest extent
  nose_x = np.clip((half_width(nose_v) + g["nose_depth"]) * np.sin(yaw), -g["head_width"], g["head_width"])
  head.append((nose_x, nose_v))
  head += [(np.sin(np.clip(theta + yaw, -np.pi / 2, np.pi / 2)) * half_width(mouth_v), mouth_v) for theta in (
      -g["mouth_w"], g["mouth_w"])]
  xh, v = np.asarray(head).T
  yh = g["head_offset_y"] + v * g["head_height"]
  # head -> image coordinates: the inverse of `render`'s roll, scale and shift
  roll, scale = np.radians(n["roll"]), n["scale"]
  x = scale * (np.cos(roll) * xh - np.sin(roll) * yh) + n["shift_x"]
  y = scale * (np.sin(roll) * xh + np.cos(roll) * yh) + n["shift_y"]
  return ((np.stack([x, y], axis=1) + 1) * (image_size / 2) - 0.5).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Verification of raw pixels (how hard the world is for a method that learns nothing)


def pixel_baseline(images: np.ndarray, issame: np.ndarray, num_folds: int = NUM_FOLDS) -> dict:
  """Verification of raw pixels centred on the mean image of the set, under the protocol every model accuracy
  comes from (`verification.evaluate_pairs`: cosine of the pair, threshold chosen on the other nine folds).

  images: [2P, H, W, C] in pair order a0, b0, a1, b1, ...; issame: bool [P].
  """
  from adaptface_jax import verification
  flat = np.asarray(images, np.float32).reshape(len(images), -1)
  return verification.evaluate_pairs(flat - flat.mean(axis=0), issame, num_folds=num_folds)


# ---------------------------------------------------------------------------------------------------------------
# The world on disk


def world_name(*, seed: int, num_train_identities: int, images_per_identity: int, num_pairs: int,
               image_size: int, train_kind: str = "train", identity_offset: int = 0) -> str:
  variant = (f"-{train_kind}" if train_kind != "train" else "") + (f"-from{identity_offset}" if identity_offset else "")
  return (f"seed{seed}-ids{num_train_identities}x{images_per_identity}-pairs{num_pairs}-px{image_size}{variant}"
          f"-r{RENDERER_VERSION}")


def _check_sizes(seed, num_train_identities, images_per_identity, num_pairs, image_size, train_kind,
                 identity_offset) -> None:
  if train_kind not in NUISANCE_KINDS:
    raise ValueError(f"train_kind must be one of {NUISANCE_KINDS}, got {train_kind!r}")
  for name, value, minimum in (("seed", seed, 0), ("num_train_identities", num_train_identities, 2),
                               ("images_per_identity", images_per_identity, 1), ("num_pairs", num_pairs, 20),
                               ("image_size", image_size, 16), ("identity_offset", identity_offset, 0)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
      raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  if num_pairs % (2 * NUM_FOLDS):
    raise ValueError(f"num_pairs must be a multiple of {2 * NUM_FOLDS} ({NUM_FOLDS} folds, each half same / half "
                     f"different pairs), got {num_pairs}")


def _describe(root: Path) -> dict:
  marker = json.loads((root / COMPLETE_MARKER).read_text())
  benchmarks = {name: str(root / f"{name}.bin") for name in BENCHMARKS}
  missing = [path for path in [str(root / "train" / "train.rec"), *benchmarks.values()] if not Path(path).exists()]
  if missing:
    raise FileNotFoundError(f"{root}: marked complete but {missing} are missing; delete {root} to regenerate it")
  return {"root": str(root), "train": str(root / "train"), "num_classes": int(marker["num_classes"]),
          "num_train_images": int(marker["num_train_images"]), "benchmarks": benchmarks}


def _plan_pairs(seed: int, benchmark_index: int, num_pairs: int, eval_ids: np.ndarray) -> tuple[np.ndarray,
                                                                                                 np.ndarray]:
  """(identity of every image [2P] in pair order, issame [P]): 10 contiguous folds, each with its own identities,
  each first half same-identity pairs then half different-identity pairs."""
  rng = np.random.default_rng([seed, _PAIR_PLAN_STREAM, benchmark_index])
  per_fold, ids_per_fold = num_pairs // NUM_FOLDS, len(eval_ids) // NUM_FOLDS
  identities, issame = [], []
  for fold in range(NUM_FOLDS):
    pool = eval_ids[fold * ids_per_fold:(fold + 1) * ids_per_fold]
    for _ in range(per_fold // 2):
      identity = rng.choice(pool)
      identities += [identity, identity]
      issame.append(True)
    for _ in range(per_fold // 2):
      identities += list(rng.choice(pool, 2, replace=False))
      issame.append(False)
  return np.asarray(identities, np.int64), np.asarray(issame, bool)


_CHUNK = 120  # images per task of the rendering pool: a few identities' worth, about a second of work
_POOL_MIN_IMAGES = 4000  # below this, starting the worker processes costs more than it saves


@functools.lru_cache
def cached_renderer(image_size: int) -> "FaceRenderer":
  return FaceRenderer(image_size)


def _render_chunk(seed: int, image_size: int, jobs: list[tuple[int, list[int], str]]) -> list[tuple[bytes, dict]]:
  """[(JPEG bytes, nuisance)] of each job (identity id, nuisance stream key, nuisance kind), in order. Every image
  depends on its job alone, so any process may render any chunk."""
  from adaptface_jax.data import recordio

  renderer = cached_renderer(image_size)
  out, identity = [], None
  for identity_id, stream, kind in jobs:
    if identity is None or identity.identity_id != identity_id:  # jobs come grouped by identity
      identity = make_identity(seed, identity_id)
    rng = np.random.default_rng(stream)
    nuisance = sample_nuisance(rng, kind)
    out.append((recordio.encode_image(renderer.render(identity, nuisance, rng), "jpg", 95), nuisance))
  return out


def render_jobs(render_chunk: Callable[[list], list], jobs: list, desc: str, processes: int) -> Iterator:
  """Renders the jobs over `processes` worker processes, yielding the results in job order. `render_chunk` (a
  module-level function or a partial of one, so that it pickles) turns a list of jobs into their results."""
  from tqdm import tqdm

  chunks = [jobs[i:i + _CHUNK] for i in range(0, len(jobs), _CHUNK)]
  with contextlib.ExitStack() as stack:
    bar = stack.enter_context(tqdm(total=len(jobs), desc=desc, unit="img", file=sys.stderr, mininterval=1.0,
                                   leave=False))
    if processes <= 1 or len(jobs) < _POOL_MIN_IMAGES:
      results = map(render_chunk, chunks)
    else:
      # spawn, not fork: the parent may already run JAX or TensorFlow threads. Each worker imports the parent's
      # main module (seconds), hence _POOL_MIN_IMAGES.
      pool = concurrent.futures.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
      results = stack.enter_context(pool).map(render_chunk, chunks)
    for result in results:
      bar.update(len(result))
      yield from result


def _generate(root: Path, seed: int, num_train_identities: int, images_per_identity: int, num_pairs: int,
              image_size: int, train_kind: str, identity_offset: int, processes: int) -> dict:
  from adaptface_jax.data import binfile, recordio

  start = time.perf_counter()
  num_train = num_train_identities * images_per_identity
  labels = np.repeat(np.arange(num_train_identities, dtype=np.int64), images_per_identity)
  train_jobs = [(identity_offset + label, [seed, _TRAIN_NUISANCE_STREAM, identity_offset + label, index], train_kind)
                for label in range(num_train_identities) for index in range(images_per_identity)]
  nuisances = []

  render_chunk = functools.partial(_render_chunk, seed, image_size)

  def train_samples():
    for (image, nuisance), label in zip(render_jobs(render_chunk, train_jobs, "synthetic train", processes), labels):
      nuisances.append(nuisance)
      yield image, int(label)

  recordio.write_insightface_record(root / "train", train_samples(), image_format="jpg", quality=95)
  train_meta = {key: np.asarray([n[key] for n in nuisances], np.float32) for key in (
      "yaw", "age", "light_azimuth", "light_elevation", "light_intensity", "ambient")}
  train_meta["color_cast"] = np.asarray([(n["cast_r"], n["cast_g"], n["cast_b"]) for n in nuisances], np.float32)
  np.savez(root / "train" / "meta.npz", label=labels, identity=identity_offset + labels,
           domain=domain_of(train_meta["yaw"], train_meta["age"]), **train_meta)

  # Benchmarks: identities after the training ones, split into 10 per-fold pools shared by the three files.
  ids_per_fold = max(4, num_pairs // NUM_FOLDS // 6)
  first_eval_id = identity_offset + num_train_identities
  eval_ids = np.arange(first_eval_id, first_eval_id + NUM_FOLDS * ids_per_fold, dtype=np.int64)
  plans = [_plan_pairs(seed, index, num_pairs, eval_ids) for index in range(len(BENCHMARKS))]
  slots = sorted((int(identity), benchmark, slot) for benchmark, (identities, _) in enumerate(plans)
                 for slot, identity in enumerate(identities))  # grouped by identity: each is built once per chunk
  jobs = [(identity, [seed, _PAIR_NUISANCE_STREAM, benchmark, slot], _BENCHMARK_SIDES[BENCHMARKS[benchmark]][slot % 2])
          for identity, benchmark, slot in slots]
  encoded = [[b""] * (2 * num_pairs) for _ in BENCHMARKS]
  meta = [{key: np.zeros(2 * num_pairs, np.float32) for key in ("yaw", "age")} for _ in BENCHMARKS]
  rendered = render_jobs(render_chunk, jobs, "synthetic benchmarks", processes)
  for (_, benchmark, slot), (image, nuisance) in zip(slots, rendered):
    meta[benchmark]["yaw"][slot], meta[benchmark]["age"][slot] = nuisance["yaw"], nuisance["age"]
    encoded[benchmark][slot] = image
  for benchmark, name in enumerate(BENCHMARKS):
    identities_of_images, issame = plans[benchmark]
    binfile.write_bin(root / f"{name}.bin", encoded[benchmark], issame)
    np.savez(root / f"{name}.meta.npz", domain=domain_of(meta[benchmark]["yaw"], meta[benchmark]["age"]),
             identity=identities_of_images, **meta[benchmark])

  seconds = time.perf_counter() - start
  num_images = num_train + len(jobs)
  return {"num_classes": num_train_identities, "num_train_images": num_train, "num_pairs": num_pairs,
          "num_eval_identities": int(len(eval_ids)), "images": num_images, "seconds": round(seconds, 2),
          "images_per_second": round(num_images / seconds, 1), "processes": processes}


def build_once(root: Path, generate: Callable[[Path], dict], what: str) -> None:
  """Makes `root` with `generate(scratch)` unless its completion marker exists. Generation happens in a scratch
  folder renamed into place at the end, so an interrupted run leaves no half-written folder behind and concurrent
  processes (one per host) do not see each other's partial files. `generate` returns the marker's content (with
  'images', 'seconds', 'images_per_second' and 'processes')."""
  if (root / COMPLETE_MARKER).exists():
    return
  root.parent.mkdir(parents=True, exist_ok=True)
  scratch = root.parent / f".{root.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  scratch.mkdir()
  try:
    log.info("generating the %s %s into %s", what, root.name, root)
    stats = generate(scratch)
    (scratch / COMPLETE_MARKER).write_text(json.dumps(dict(stats, renderer_version=RENDERER_VERSION), indent=2)
                                           + "\n")
    if root.exists() and not (root / COMPLETE_MARKER).exists():
      shutil.rmtree(root)  # left by an interrupted run of an older layout: redo it
    try:
      os.rename(scratch, root)
    except OSError:
      if not (root / COMPLETE_MARKER).exists():
        raise
      log.info("%s was completed by another process meanwhile; using it", root)
  finally:
    if scratch.exists():
      shutil.rmtree(scratch, ignore_errors=True)
  log.info("%s %s: %d images in %.1f s (%.0f images/s, %d processes)", what, root.name, stats["images"],
           stats["seconds"], stats["images_per_second"], stats["processes"])


def build_world(cache_dir: str | os.PathLike | None = None, *, seed: int = 0, num_train_identities: int = 300,
                images_per_identity: int = 20, num_pairs: int = 6000, image_size: int = 112,
                train_kind: str = "train", identity_offset: int = 0) -> dict:
  """Generates the world once into `cache_dir/synthetic/<name>/` and returns where its files are.

  The name holds every parameter and the renderer version; a world is reused only when its completion marker
  exists (see `build_once`).

  Writes `train/` (InsightFace train.rec / train.idx / property, JPEG q95, and meta.npz with per-image label,
  identity, domain, yaw, age and illumination in key order), and for each benchmark `<name>.bin` (num_pairs
  pairs in 10 contiguous folds, each half same / half different, identities disjoint from training) with
  `<name>.meta.npz` (per image: domain, yaw, age, identity).
  `train_kind` is the nuisance kind of the training images ("train": every domain; "pretrain": the general domain
  only). Identities are numbered from `identity_offset` (training ones first, then the benchmarks'): worlds whose
  ranges do not overlap share no identity, as the pretraining world and the adaptation worlds.
  Returns {'root', 'train', 'num_classes', 'num_train_images', 'benchmarks': {name: path}}.
  """
  _check_sizes(seed, num_train_identities, images_per_identity, num_pairs, image_size, train_kind, identity_offset)
  cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
  name = world_name(seed=seed, num_train_identities=num_train_identities, images_per_identity=images_per_identity,
                    num_pairs=num_pairs, image_size=image_size, train_kind=train_kind,
                    identity_offset=identity_offset)
  root = cache_root / "synthetic" / name

  def generate(scratch: Path) -> dict:
    from adaptface_jax import runtime
    stats = _generate(scratch, seed, num_train_identities, images_per_identity, num_pairs, image_size, train_kind,
                      identity_offset, processes=runtime.usable_cpus())
    return dict(stats, seed=seed, num_train_identities=num_train_identities, images_per_identity=images_per_identity,
                image_size=image_size, train_kind=train_kind, identity_offset=identity_offset)

  build_once(root, generate, "synthetic face world")
  return _describe(root)
