"""The face model: (DA-)LoRA-adapted ViT backbone + domain router + embedding head.

The variable tree, the one description of it (`python -m adaptface_jax.inspect_params` prints it for a config; the
paths are what `config.trainable`'s rules match, see trainable_rules.py):
  params/backbone/...   pretrained ViT weights (frozen by the default rules), as ported in vit.py
  params/router/...     domain classifier (DA-LoRA with learned routing)
  params/head/...       embedding projection d -> embedding_dim (absent when embedding_dim is 0)
  lora/backbone/...     the adapter deltas at the paths of the layers they adapt: params/backbone/blocks_i/qkv/kernel
                        is adapted by lora/backbone/blocks_i/qkv/lora_a [K, in, rank] and .../lora_b [K, rank, out]
  margin/centers        the margin loss's class centres [output_dim, num_classes]: made by `init_variables`,
                        taken off the tree again by `split_margin` (the model itself never sees them); a train
                        step may hold them padded and split along the classes over the devices (sharding.py),
                        a checkpoint always with this shape
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from adaptface_jax import losses
from adaptface_jax.models import hf_weights
from adaptface_jax.models.lora import AdapterSpec
from adaptface_jax.models.preprocess import preprocess
from adaptface_jax.models.vit import ViT, ViTConfig

ROUTER_MODES = ("learned", "uniform", "oracle")
ROUTER_INPUTS = ("frozen_cls", "patch_mean")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Router(nn.Module):
  """Global domain classifier: Linear d->hidden, ReLU, Dropout, Linear hidden->K (logits)."""
  num_domains: int
  hidden: int = 256
  dropout: float = 0.1

  @nn.compact
  def __call__(self, feature, *, deterministic=True):
    x = nn.relu(nn.Dense(self.hidden, name="fc1")(feature.astype(jnp.float32)))
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    return nn.Dense(self.num_domains, name="fc2")(x)


class FaceModel(nn.Module):
  vit: ViTConfig
  spec: AdapterSpec | None
  image_size: int
  embedding_dim: int = 512  # 0: no head, the embedding is the backbone feature itself (pretraining)
  router_mode: str = "learned"
  router_input: str = "frozen_cls"
  router_hidden: int = 256
  router_dropout: float = 0.1
  use_projection: bool = False  # CLIP: take the 512-d visual_projection output as the feature
  dtype: Any = jnp.float32
  remat: str = ""  # see vit.REMAT_POLICIES

  @property
  def output_dim(self) -> int:
    """Width of the embedding (and of the margin-loss class centres)."""
    if self.embedding_dim:
      return self.embedding_dim
    return self.vit.projection_dim if self.use_projection else self.vit.hidden_size

  @property
  def num_domains(self) -> int:
    return self.spec.num_domains if self.spec is not None else 1

  def setup(self):
    if self.router_mode not in ROUTER_MODES:
      raise ValueError(f"router mode {self.router_mode!r} not in {ROUTER_MODES}")
    if self.router_input not in ROUTER_INPUTS:
      raise ValueError(f"router input {self.router_input!r} not in {ROUTER_INPUTS}")
    if self.use_projection and not self.vit.projection_dim:
      raise ValueError("use_projection needs a CLIP checkpoint with visual_projection (a full CLIPModel)")
    self.backbone = ViT(self.vit, spec=self.spec, dtype=self.dtype, remat=self.remat)
    if self.num_domains > 1 and self.router_mode == "learned":
      self.router = Router(self.num_domains, self.router_hidden, self.router_dropout)
    self.head = nn.Dense(self.embedding_dim, name="head") if self.embedding_dim else None

  def route(self, images, domain_labels, deterministic):
    """Per-image domain logits (or None) and mixing weights [B, K] (None for plain LoRA)."""
    k = self.num_domains
    if k == 1:
      return None, None
    batch = images.shape[0]
    if self.router_mode == "uniform":
      return None, jnp.full((batch, k), 1.0 / k, jnp.float32)
    if self.router_mode == "oracle":
      if domain_labels is None:
        raise ValueError("router mode 'oracle' needs domain labels with the batch")
      # Images without a label (-1) get uniform weights.
      one_hot = jax.nn.one_hot(domain_labels, k)
      return None, jnp.where((domain_labels >= 0)[:, None], one_hot, 1.0 / k)
    if self.router_input == "patch_mean":
      feature = self.backbone.patch_embed(images).mean(axis=1)
    else:
      # A pass of the pretrained backbone without adapters: routing sees the frozen representation only.
      frozen = self.backbone(images, adapters_enabled=False, pooled_only=True)
      feature = jax.lax.stop_gradient(frozen["pooler_output"])
    logits = self.router(feature, deterministic=deterministic).astype(jnp.float32)
    return logits, jax.nn.softmax(logits, axis=-1)

  def __call__(self, images, domain_labels=None, *, train: bool = False):
    """images: [B, H, W, 3] uint8 faces (or floats in 0..1). Returns dict(embedding (unit norm), embedding_raw,
    feature (backbone output), domain_logits (learned routing only), domain_weights [B, K] (DA-LoRA only))."""
    x = preprocess(images, image_size=self.image_size, family=self.vit.family, dtype=self.dtype)
    logits, weights = self.route(x, domain_labels, deterministic=not train)
    out = self.backbone(x, weights, deterministic=not train, pooled_only=True)
    feature = out["image_embeds"] if self.use_projection else out["pooler_output"]
    feature = feature.astype(jnp.float32)
    raw = self.head(feature) if self.head is not None else feature
    # The verification protocol sums raw embeddings of an image and its flip before normalising.
    return {"embedding": losses.safe_l2_normalize(raw), "embedding_raw": raw, "feature": feature,
            "domain_logits": logits, "domain_weights": weights}


def adapter_spec(config: ml_collections.ConfigDict) -> AdapterSpec | None:
  a = config.adapter
  if a.rank == 0:
    return None
  return AdapterSpec(rank=a.rank, alpha=float(a.alpha), num_domains=a.num_domains, targets=tuple(a.targets),
                     rslora=a.rslora, init=a.init, dropout=a.dropout)


def create_model(config: ml_collections.ConfigDict, vit_config: ViTConfig | None = None) -> FaceModel:
  """The FaceModel a config describes; the architecture is read without loading any weights."""
  m = config.model
  if vit_config is None:
    hf_config, _ = hf_weights.read_architecture(m.backbone, random_init=m.get("random_init", False))
    vit_config = hf_weights.vit_config(hf_config)
  if not m.use_projection:
    vit_config = dataclasses.replace(vit_config, projection_dim=None)
  if m.dtype not in DTYPES:
    raise ValueError(f"model.dtype {m.dtype!r} not in {sorted(DTYPES)}")
  return FaceModel(vit=vit_config, spec=adapter_spec(config), image_size=m.image_size,
                   embedding_dim=m.embedding_dim, router_mode=config.router.mode, router_input=config.router.input,
                   router_hidden=config.router.hidden, router_dropout=config.router.dropout,
                   use_projection=m.use_projection, dtype=DTYPES[m.dtype],
                   remat=m.get("remat", ""))  # runs saved before the option have no remat field


MARGIN = "margin"  # the collection of the margin loss's class centres


def init_variables(model: FaceModel, rng, num_classes: int | None, *, input_size: int = 112) -> dict:
  """Random variables of the whole tree: the model's collections (params, lora) and, when num_classes is given,
  the margin-loss class centres (margin/centers). Wrap in jax.eval_shape for shapes only."""
  model_rng, margin_rng = jax.random.split(rng)
  images = jnp.zeros((1, input_size, input_size, 3), jnp.uint8)
  tree = dict(model.init({"params": model_rng}, images, jnp.zeros((1,), jnp.int32)))
  if num_classes:
    tree[MARGIN] = {"centers": losses.init_class_centers(margin_rng, model.output_dim, num_classes)}
  return tree


def split_margin(tree: dict) -> tuple[dict, jnp.ndarray | None]:
  """(the model's variables, the margin loss's class centres or None) of a whole variable tree."""
  variables = {collection: value for collection, value in tree.items() if collection != MARGIN}
  return variables, tree[MARGIN]["centers"] if MARGIN in tree else None
