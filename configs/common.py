"""Shared base of the experiment configs, and the argument grammar every config file accepts.

`get_config(arg)` of each experiment file takes a comma-separated argument (big_vision style):
  demo                  embedded synthetic faces, the synthetic-pretrained backbone of the family (SYNTHETIC_BACKBONES)
                        at 112 px, CPU-sized budget
  tiny                  a 2-layer ViT of the same family (tests and smoke runs)
  rank=8                LoRA rank (alpha follows: alpha = rank keeps scale 1, as in the recipe's r16/alpha16)
  domains=4             DA-LoRA domains K (1 = plain LoRA)
  domain_weight=0.05    weight of the per-image entropy domain loss
  targets=q_v           LoRA targets, '_'-joined (qkv_proj, q_v, qkv_proj_fc1_fc2, ...)
  routing=oracle        learned | uniform | oracle
  router_input=patch_mean   frozen_cls | patch_mean
  steps=200             total training steps (overrides the epoch budget)
  seed=1                run seed (initialisation, data order, dropout)
Everything else is a dotted override on the command line, e.g. --config.optim.lr=3e-4.
"""

from pathlib import Path

import ml_collections

from adaptface_jax.data.common import SYNTHETIC_BENCHMARKS
from adaptface_jax.verification import STANDARD_BENCHMARKS

BACKBONES = {"dino": "facebook/dinov2-small", "clip": "openai/clip-vit-base-patch16"}
# Backbones pretrained on the synthetic face world (configs/pretrain.py), shipped as transformers snapshots: what the
# offline `demo` adapts. They have never seen a real face.
SYNTHETIC_BACKBONES = {family: str(Path(__file__).resolve().parents[1] / "synthetic_backbones" / folder)
                       for family, folder in (("dino", "dinov2_192x6"), ("clip", "clip_192x6"))}
SYNTHETIC_ARCHITECTURES = {"dino": "synthface-dinov2", "clip": "synthface-clip"}  # hf_weights.PRESETS
TINY_BACKBONES = {"dino": "tiny-dinov2", "clip": "tiny-clip"}
# Domains of DA-LoRA in the seed: general / pose / age (the synthetic world labels its images with these).
DEFAULT_DOMAINS = 3


def parse_arg(arg: str | None) -> dict:
  known = {"demo", "tiny", "rank", "domains", "domain_weight", "targets", "routing", "router_input", "steps", "seed"}
  out = {}
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in known:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(known)}")
    out[key] = value if value else True
  return out


def base_config(backbone: str, adapter: str) -> ml_collections.ConfigDict:
  """The recipe of the original AdaptFace (recipe.md): CASIA-WebFace, CosFace s=64 m=0.35, AdamW 1e-4."""
  c = ml_collections.ConfigDict()
  c.experiment = f"{adapter}_{backbone}"
  c.seed = 0

  c.model = ml_collections.ConfigDict(dict(
      backbone=BACKBONES[backbone],  # hub id, or a local snapshot directory (config.json + model.safetensors)
      random_init=False,  # True: same architecture, random weights (never chosen implicitly)
      image_size=224,  # faces are 112 px; resized on device (bicubic) as in the seed
      embedding_dim=512,
      use_projection=False,  # CLIP only: use the 512-d visual_projection output as the feature
      dtype="float32",  # compute dtype: float32 | bfloat16 (parameters stay float32)
      remat="",  # recompute blocks in the backward to fit larger batches: "" (off) | "dots" | "full"
  ))
  c.adapter = ml_collections.ConfigDict(dict(
      rank=16, alpha=16.0, num_domains=DEFAULT_DOMAINS if adapter == "dalora" else 1,
      targets=("qkv", "proj"), rslora=False, init="kaiming_uniform", dropout=0.0))
  c.router = ml_collections.ConfigDict(dict(mode="learned", input="frozen_cls", hidden=256, dropout=0.1))

  c.loss = ml_collections.ConfigDict(dict(
      scale=64.0, m1=1.0, m2=0.0, m3=0.35,  # CosFace; ArcFace: m2=0.5, m3=0
      entropy_weight=0.1,  # per-image routing entropy (the seed's domain loss)
      balance_weight=0.1,  # keeps the batch-mean routing spread out (entropy alone collapses to one domain)
      supervised_weight=0.0,  # cross-entropy on domain labels, when the data has them
      margin_warmup_steps=0,  # > 0: m3 grows linearly from 0 over this many steps (training from scratch)
  ))
  c.centers = ml_collections.ConfigDict(dict(
      # The class-centre matrix [embedding_dim, num_classes] and its AdamW moments split along the classes over the
      # devices (see sharding.py): "on", "off", or "auto": on over several devices once the head with its moments
      # reaches sharding.AUTO_SHARD_BYTES (256 MiB; e.g. MS1MV2's 85.7k identities at 512-d, not CASIA's 10.5k).
      shard="auto",
      # Partial FC: < 1 keeps each step's positive classes and random negatives, this share of each device's
      # centres (at least the global batch size); 1.0 uses every centre.
      sample_rate=1.0,
  ))
  c.data = ml_collections.ConfigDict(dict(
      train="casia_webface",  # a TFDS builder registered by adaptface_jax.data.tfds_builders
      data_dir="",  # TFDS data_dir ("": $ADAPTFACE_CACHE/tfds or ~/.cache/adaptface_jax/tfds)
      manual_dir="~/data/faces_webface_112x112",  # where train.rec / train.idx are, for casia_webface
      num_classes=10572,
      batch_size=128,
      shuffle_buffer=20_000,
      flip=True,
      randaugment=(),  # e.g. (2, 9) for RandAugment(num_layers, magnitude); () = off
  ))
  c.eval = ml_collections.ConfigDict(dict(
      benchmarks=STANDARD_BENCHMARKS,
      bin_dir="~/data/faces_webface_112x112",  # where lfw.bin, cfp_fp.bin, ... are
      max_pairs=0,  # > 0: evaluate a subset of N pairs (see embeddings.py); 0: all pairs
      batch_size=256,
      every_steps=0,  # 0: once per epoch
      world="",  # with bin_dir "": the synthetic_faces/<config> whose benchmarks to use ("": data.train's own)
      best_metric="lfw",  # the checkpoint kept as "best"
  ))
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-4, end_lr=1e-6, warmup_fraction=5 / 40, warmup_steps=None, weight_decay=0.05,
      b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=5.0, decay_1d=False,
      accumulate_steps=1,  # N: data.batch_size (the effective batch) runs as N micro-batches, then one update
  ))
  c.num_epochs = 40
  c.total_steps = 0  # 0: num_epochs over the training set
  c.init_from = ""  # a run's workdir: start this new run from its last trainable weights (fresh optimizer); "": off
  c.log_every = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3

  # What trains: first matching regex wins; a leaf no rule matches is an error.
  c.trainable = [
      (r"^lora/", "train"),
      (r"^params/(head|router)/", "train"),
      (r"^margin/", "train"),
      (r"^params/backbone/", "freeze"),
  ]
  return c


def experiment(backbone: str, adapter: str, arg: str | None) -> ml_collections.ConfigDict:
  args = parse_arg(arg)
  c = base_config(backbone, adapter)
  if args.get("demo"):
    apply_demo(c, backbone)
  if args.get("tiny"):
    c.model.backbone = TINY_BACKBONES[backbone]
    c.model.random_init = True
  if "rank" in args:
    c.adapter.rank = int(args["rank"])
    c.adapter.alpha = float(args["rank"])
  if "domains" in args:
    c.adapter.num_domains = int(args["domains"])
  if "domain_weight" in args:
    c.loss.entropy_weight = float(args["domain_weight"])
  if "targets" in args:
    c.adapter.targets = tuple(args["targets"].split("_"))
  if "routing" in args:
    c.router.mode = args["routing"]
  if "router_input" in args:
    c.router.input = args["router_input"]
  if "steps" in args:
    c.total_steps = int(args["steps"])
  if "seed" in args:
    c.seed = int(args["seed"])
  return c


def apply_demo(c: ml_collections.ConfigDict, family: str) -> None:
  """A run that trains and evaluates on a 2-core CPU in minutes, fully offline."""
  c.model.backbone = SYNTHETIC_BACKBONES[family]
  c.model.image_size = 112
  c.data.train = "synthetic_faces/demo"
  c.data.manual_dir = ""
  c.data.num_classes = 0  # 0: read from the dataset
  c.data.batch_size = 64
  c.data.shuffle_buffer = 10_000
  c.eval.benchmarks = SYNTHETIC_BENCHMARKS
  c.eval.bin_dir = ""  # the synthetic world's own directory
  c.eval.max_pairs = 1200  # a balanced subset: 60 same + 60 different pairs from each fold
  c.eval.best_metric = "synth_lfw"
  # A short run on a small backbone: a softer margin and a larger step than the recipe.
  c.loss.scale = 32.0
  c.loss.m3 = 0.1
  c.optim.lr = 2e-3
  c.optim.end_lr = 1e-5
  c.optim.warmup_fraction = 0.05
  c.total_steps = 200
  c.log_every = 10
  c.checkpoint_every = 100
  c.eval.every_steps = 200


# The ablation matrix and the sweeps, declared once. A cell is (experiment file, config argument); with a base
# argument such as `demo` it becomes e.g. `configs/dalora_dino.py:demo,rank=8`.
MATRIX = [("lora_dino", ""), ("dalora_dino", ""), ("lora_clip", ""), ("dalora_clip", "")]
SWEEPS = {
    "matrix": MATRIX,
    "rank": [("lora_dino", f"rank={r}") for r in (2, 4, 8, 16, 32)],
    "domains": [("dalora_dino", f"domains={k}") for k in (2, 3, 4, 5)],
    "domain_weight": [("dalora_dino", f"domain_weight={w}") for w in (0.01, 0.05, 0.1, 0.5)],
    "targets": [("lora_dino", "targets=qkv_proj"), ("lora_dino", "targets=q_v")],
    "routing": [("dalora_dino", f"routing={m}") for m in ("learned", "uniform", "oracle")],
    "router_input": [("dalora_dino", f"router_input={i}") for i in ("frozen_cls", "patch_mean")],
    # Two quick cells to check an installation (with `--base demo,tiny,steps=2`).
    "smoke": [("lora_dino", "rank=2"), ("dalora_dino", "domains=2")],
}
# The synthetic study: the 2x2 matrix with 3 seeds, DA-LoRA with oracle and uniform routing, and the rank and K
# sweeps; rank=16, domains=3 and learned routing are the defaults, i.e. the matrix's own cells, not run twice.
SWEEPS["seeds"] = [(experiment, f"seed={seed}" if seed else "") for seed in (0, 1, 2) for experiment, _ in MATRIX]
SWEEPS["study"] = SWEEPS["seeds"] + [
    cell for cell in SWEEPS["routing"] + SWEEPS["rank"] + SWEEPS["domains"]
    if cell not in (("lora_dino", "rank=16"), ("dalora_dino", "domains=3"), ("dalora_dino", "routing=learned"))]


def cell_name(experiment: str, arg: str) -> str:
  return experiment + ("-" + arg.replace("=", "").replace(",", "-") if arg else "")
