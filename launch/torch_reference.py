"""The PyTorch reference that `launch/benchmark.py` times beside this project's train step: a transformers ViT
(random init) with peft LoRA, a Linear head and CosFace, trained with AdamW, eagerly (no torch.compile).

The recipe below is the benchmark's: `benchmark.py` builds ours from a config and checks that it is the same.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from adaptface_jax.models import preprocess

# peft calls a transformers method that transformers 5 marks as deprecated; the warning says nothing about speed.
warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")

NUM_CLASSES = 1000
LORA_RANK, LORA_ALPHA = 16, 16.0
EMBEDDING_DIM = 512
COSFACE_SCALE, COSFACE_MARGIN = 64.0, 0.35
LR, WEIGHT_DECAY, GRAD_CLIP_NORM = 1e-4, 0.05, 5.0

# peft target names of the attention projections in transformers 5 (the counterparts of our qkv + proj).
PEFT_TARGETS = {"dinov2": ["q_proj", "k_proj", "v_proj", "o_proj"],
                "clip": ["q_proj", "k_proj", "v_proj", "out_proj"]}


def hf_vision_config(preset: dict):
  """A transformers vision config from one of `hf_weights.PRESETS` (the architectures ours is built from)."""
  from transformers import CONFIG_MAPPING
  fields = {k: v for k, v in preset.items() if k != "model_type"}
  model_type = preset["model_type"]
  if model_type == "clip":  # a full CLIPModel preset: the reference is its vision tower
    fields, model_type = dict(preset["vision_config"]), "clip_vision_model"
  return CONFIG_MAPPING[model_type](**fields)


def cosface_loss(embeddings: torch.Tensor, centers: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
  cosine = torch.nn.functional.normalize(embeddings, dim=1) @ torch.nn.functional.normalize(centers, dim=0)
  margin = torch.nn.functional.one_hot(labels, cosine.shape[1]).to(cosine.dtype) * COSFACE_MARGIN
  return torch.nn.functional.cross_entropy(COSFACE_SCALE * (cosine - margin), labels)


class TorchReference:
  """The reference: a transformers ViT (random init) + peft LoRA + Linear d->512 + CosFace, AdamW, in PyTorch."""

  def __init__(self, preset: dict, *, image_size: int, batch: dict[str, np.ndarray], device: torch.device,
               autocast_dtype: torch.dtype | None, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPVisionModel, Dinov2Model

    torch.manual_seed(seed)
    hf_config = hf_vision_config(preset)
    self.family = "dinov2" if hf_config.model_type == "dinov2" else "clip"
    backbone = (Dinov2Model if self.family == "dinov2" else CLIPVisionModel)(hf_config)
    lora = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, bias="none",
                      target_modules=PEFT_TARGETS[self.family])
    self.backbone = get_peft_model(backbone, lora).to(device)  # freezes every non-LoRA weight
    self.head = torch.nn.Linear(hf_config.hidden_size, EMBEDDING_DIM).to(device)
    self.centers = torch.nn.Parameter(0.01 * torch.randn(EMBEDDING_DIM, NUM_CLASSES, device=device))
    trainable = [p for p in self.backbone.parameters() if p.requires_grad] + list(self.head.parameters())
    trainable.append(self.centers)
    self.trainable = trainable
    self.trainable_params = int(sum(p.numel() for p in trainable))
    # As ours: weight decay on matrices only.
    self.optimizer = torch.optim.AdamW(
        [{"params": [p for p in trainable if p.ndim > 1], "weight_decay": WEIGHT_DECAY},
         {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0}], lr=LR)
    # CLIP's position table is for its pretraining size; DINOv2 always interpolates its own.
    self.forward_kwargs = ({"interpolate_pos_encoding": True}
                           if self.family == "clip" and image_size != hf_config.image_size else {})
    mean, std = preprocess.NORMALIZATION[self.family]
    self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
    self.image_size, self.device, self.autocast_dtype = image_size, device, autocast_dtype
    self.images = torch.from_numpy(batch["image"]).to(device)
    self.labels = torch.from_numpy(batch["label"]).long().to(device)

  def _autocast(self):
    if self.autocast_dtype is None:
      return torch.autocast(self.device.type, enabled=False)
    return torch.autocast(self.device.type, dtype=self.autocast_dtype)

  def _preprocess(self, images: torch.Tensor) -> torch.Tensor:
    x = images.permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != self.image_size:
      x = torch.nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic",
                                          align_corners=False)
    return (x - self.mean) / self.std

  def _embed_raw(self, images: torch.Tensor) -> torch.Tensor:
    with self._autocast():
      feature = self.backbone(pixel_values=self._preprocess(images), **self.forward_kwargs).pooler_output
    return self.head(feature.float())

  def _sync(self) -> None:
    if self.device.type == "cuda":
      torch.cuda.synchronize(self.device)

  def train(self, steps: int) -> None:
    self.backbone.train()
    for _ in range(steps):
      loss = cosface_loss(self._embed_raw(self.images), self.centers, self.labels)
      self.optimizer.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(self.trainable, GRAD_CLIP_NORM)
      self.optimizer.step()
    self._sync()

  def embed(self, steps: int) -> None:
    self.backbone.eval()
    batch = self.images.shape[0]
    with torch.inference_mode():
      for _ in range(steps):
        raw = self._embed_raw(torch.cat([self.images, self.images.flip(2)]))  # NHWC: dim 2 is the width
        embeddings, embeddings_flip = raw[:batch], raw[batch:]  # noqa: F841 (as verification uses them)
      self._sync()
