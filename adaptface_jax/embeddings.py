"""Embedding extraction and verification of a model on `.bin` benchmarks (used by training and `evaluate`)."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm import tqdm

from adaptface_jax import sharding, trainable_rules, verification
from adaptface_jax.data.common import DOMAIN_NAMES
from adaptface_jax.models import face_model

log = logging.getLogger(__name__)


def make_embed_fn(model, output: str = "embedding_raw"):
  """jit: uint8 images [B, H, W, 3] -> raw embeddings (`output`: the head's "embedding_raw", or the backbone's
  "feature") of the images and of their horizontal flips, and the routing weights ([B, K], or [B, 0] for plain
  LoRA). Image and flip go through the model as one batch."""

  def embed(variables, images, domains):
    both = jnp.concatenate([images, images[:, :, ::-1]], axis=0)
    out = model.apply(variables, both, jnp.concatenate([domains, domains]))
    raw = out[output]
    batch = images.shape[0]
    weights = out["domain_weights"]
    weights = jnp.zeros((batch, 0)) if weights is None else weights[:batch]
    return raw[:batch], raw[batch:], weights

  return jax.jit(embed)


def extract(embed_fn, variables, images: np.ndarray, *, batch_size: int, domains: np.ndarray | None = None,
            mesh: Mesh | None = None, desc: str = "embedding"):
  """Runs `embed_fn` over all images in fixed-size batches (the last one padded: one compilation). In a
  multi-process run every process passes all the images and gets all the embeddings back."""
  n = len(images)
  domains = np.full((n,), -1, np.int32) if domains is None else domains.astype(np.int32)
  if mesh is not None:  # the batch must split evenly over the devices
    batch_size = -(-batch_size // mesh.size) * mesh.size
  batch_sharding = sharding.shardings(mesh)[1] if mesh is not None else None
  outputs = []
  for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", leave=False):
    chunk, dom = images[start:start + batch_size], domains[start:start + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
      dom = np.concatenate([dom, np.full((pad,), -1, np.int32)])
    if batch_sharding is not None:
      chunk, dom = sharding.put(chunk, batch_sharding), sharding.put(dom, batch_sharding)
    # Sharded over other processes' devices too, an output is only readable here once gathered.
    result = [np.asarray(r) if r.is_fully_addressable else multihost_utils.process_allgather(r, tiled=True)
              for r in embed_fn(variables, chunk, dom)]
    outputs.append([r[:len(r) - pad] for r in result])
  return tuple(np.concatenate(parts) for parts in zip(*outputs))


def embedder(model, variables, *, batch_size: int, mesh: Mesh | None = None, output: str = "embedding_raw"):
  """A function: uint8 images [N, H, W, 3] -> (raw embeddings, raw embeddings of the flips) [N, D] under
  `variables` (a run's whole tree; the margin's class centres are left out)."""
  embed_fn, variables = make_embed_fn(model, output), model_variables(variables, mesh)
  return lambda images: extract(embed_fn, variables, images, batch_size=batch_size, mesh=mesh)[:2]


def model_variables(tree: dict, mesh: Mesh | None) -> dict:
  """What the model applies of a run's whole variable tree (the margin's class centres left out), replicated over
  the devices that share each batch (a no-op when they already are)."""
  variables, _ = face_model.split_margin(tree)
  return variables if mesh is None else sharding.put(variables, sharding.shardings(mesh)[0])


def benchmark_paths(config) -> dict[str, Path]:
  """name -> .bin path for config.eval.benchmarks; when bin_dir is unset, the files of the synthetic world
  config.eval.world (default: the training set's own world)."""
  names = list(config.eval.benchmarks)
  if config.eval.bin_dir:
    root = Path(config.eval.bin_dir).expanduser()
    paths = {name: root / f"{name}.bin" for name in names}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
      raise FileNotFoundError(
          "verification file(s) not found: " + ", ".join(missing) + ". Put the InsightFace .bin files there, "
          "point --config.eval.bin_dir at their folder, choose others with --config.eval.benchmarks, or run a "
          "`:demo` config (synthetic benchmarks).")
    return paths
  from adaptface_jax.data import tfds_builders
  world = tfds_builders.synthetic_world_for(config.eval.get("world") or config.data.train,
                                            data_dir=config.data.data_dir or None)
  unknown = [n for n in names if n not in world["benchmarks"]]
  if unknown:
    raise ValueError(f"benchmarks {unknown} are not in the synthetic world (it has {sorted(world['benchmarks'])}); "
                     "set config.eval.bin_dir to evaluate on real .bin files")
  return {name: Path(world["benchmarks"][name]) for name in names}


def _load_benchmark(path: Path, max_pairs: int | None):
  from adaptface_jax.data import binfile
  images, issame = binfile.load_pairs(path)
  domains = None
  meta_path = path.with_suffix(".meta.npz")
  if meta_path.exists():  # the synthetic world ships ground-truth domains (used by oracle routing)
    domains = np.load(meta_path)["domain"]
  if max_pairs and max_pairs < len(issame):
    pairs = balanced_subset(issame, max_pairs)
    sides = np.stack([2 * pairs, 2 * pairs + 1], axis=1).reshape(-1)
    images, issame = images[sides], issame[pairs]
    domains = None if domains is None else domains[sides]
  return images, issame, domains


def balanced_subset(issame: np.ndarray, max_pairs: int, num_folds: int = 10) -> np.ndarray:
  """Indices of about max_pairs pairs, in file order: from each of the contiguous folds, its first same and its
  first different pairs in equal numbers, so that the subset keeps the folds and the same/different balance."""
  per_class = max(1, max_pairs // (2 * num_folds))
  picked = []
  for fold in np.array_split(np.arange(len(issame)), num_folds):
    same, different = fold[issame[fold]], fold[~issame[fold]]
    picked += [same[:per_class], different[:per_class]]
  return np.sort(np.concatenate(picked))


class Evaluator:
  """Verification on the configured benchmarks; images are decoded once and kept."""

  def __init__(self, config, model, frozen, mesh: Mesh | None = None, output: str = "embedding_raw"):
    self.config, self.frozen, self.mesh = config, frozen, mesh
    self.embed_fn = make_embed_fn(model, output)
    self.benchmarks = {name: _load_benchmark(path, config.eval.max_pairs)
                       for name, path in benchmark_paths(config).items()}
    self.domain_names = None
    if model.num_domains > 1:
      self.domain_names = list(DOMAIN_NAMES) if model.num_domains == len(DOMAIN_NAMES) else [
          f"domain_{k}" for k in range(model.num_domains)]

  def __call__(self, trainable, out_dir: Path | None = None, *, step: int | None = None) -> dict:
    variables = model_variables(trainable_rules.merge(trainable, self.frozen), self.mesh)
    results = {}
    for name, (images, issame, domains) in self.benchmarks.items():
      emb, emb_flip, weights = extract(self.embed_fn, variables, images, batch_size=self.config.eval.batch_size,
                                       domains=domains, mesh=self.mesh, desc=name)
      result = verification.evaluate_pairs(emb, issame, embeddings_flip=emb_flip, name=name)
      if weights.shape[-1]:
        result["domain_weights"] = {"all": weights.mean(0).tolist(), "a": weights[0::2].mean(0).tolist(),
                                    "b": weights[1::2].mean(0).tolist()}
        result["domain_names"] = self.domain_names
      results[name] = result
      log.info("%s: accuracy %.4f +- %.4f", name, result["accuracy"], result["accuracy_std"])
    if out_dir is not None and jax.process_index() == 0:
      verification.write_results(out_dir, results, extra=None if step is None else {"step": step})
    return results
