r"""EXP-002: CLIP ViT-B/16 + LoRA.

  python -m adaptface_jax.main --config configs/lora_clip.py --workdir workdirs/lora_clip
  python -m adaptface_jax.main --config configs/lora_clip.py:demo --workdir workdirs/lora_clip_demo   # offline
See configs/common.py for the arguments (demo, rank=, domains=, routing=, ...).
"""

from configs import common


def get_config(arg=None):
  return common.experiment("clip", "lora", arg)
