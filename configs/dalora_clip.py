r"""EXP-004: CLIP ViT-B/16 + DA-LoRA.

  python -m adaptface_jax.main --config configs/dalora_clip.py --workdir workdirs/dalora_clip
  python -m adaptface_jax.main --config configs/dalora_clip.py:demo --workdir workdirs/dalora_clip_demo   # offline
See configs/common.py for the arguments (demo, rank=, domains=, routing=, ...).
"""

from configs import common


def get_config(arg=None):
  return common.experiment("clip", "dalora", arg)
