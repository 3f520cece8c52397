r"""Pretraining a backbone from random initialisation on the synthetic face world's general domain.

  python -m adaptface_jax.main --config configs/pretrain.py:dino --workdir workdirs/pretrain_dino
  python -m adaptface_jax.main --config configs/pretrain.py:clip --workdir workdirs/pretrain_clip
  python -m adaptface_jax.export --workdir workdirs/pretrain_dino --out synthetic_backbones/dinov2_192x6 --overwrite

The argument picks the family: `dino` (DINOv2: patch 14, LayerScale, CLS token, interpolated position
embeddings, exact GELU) or `clip` (CLIP: patch 16, pre-LayerNorm, quick-GELU), each 192 wide with 6 blocks
(`hf_weights.PRESETS`: synthface-dinov2, synthface-clip). Every weight trains (the rule set says so), with no
adapter and no head: the CosFace loss acts on the backbone's own pooled feature, which is what the un-tuned row
and the adaptation configs read. The margin grows from 0 (a normalised softmax) to 0.2 over the first half.
Data: `synthetic_faces/pretrain` (near-frontal, young, ordinary light, identities of its own); the
evaluation uses the adaptation world's benchmarks (synthetic_faces/demo), whose pose and age the backbone never
sees. Append e.g. `,steps=200` to the argument for a shorter run.
"""

from configs import common


def get_config(arg="dino"):
  family, *rest = (arg or "dino").split(",")
  if family not in common.SYNTHETIC_ARCHITECTURES:
    raise ValueError(f"configs/pretrain.py takes `dino` or `clip` (then optional `,steps=N`), got {arg!r}")
  c = common.experiment(family, "lora", ",".join(["demo", *rest]))
  c.experiment = f"pretrain_{family}"
  c.model.backbone = common.SYNTHETIC_ARCHITECTURES[family]
  c.model.random_init = True
  c.model.embedding_dim = 0  # no head: the margin loss trains the backbone's pooled feature itself
  c.adapter.rank = 0  # no adapter: every backbone weight trains
  c.trainable = [(r"^params/backbone/", "train"), (r"^margin/", "train")]
  c.data.train = "synthetic_faces/pretrain"
  c.data.shuffle_buffer = 20_000
  c.eval.world = "synthetic_faces/demo"
  c.eval.max_pairs = 600
  c.loss.scale = 32.0
  c.loss.m3 = 0.2
  c.optim.lr = 1e-3
  c.optim.end_lr = 1e-5
  c.optim.warmup_fraction = 0.05
  if not any(item.startswith("steps=") for item in rest):
    c.total_steps = 3000
  c.loss.margin_warmup_steps = c.total_steps // 2
  c.log_every = 25
  c.checkpoint_every = 250
  c.eval.every_steps = 500
  return c
