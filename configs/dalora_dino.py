r"""EXP-003: DINOv2 ViT-S/14 + DA-LoRA.

  python -m adaptface_jax.main --config configs/dalora_dino.py --workdir workdirs/dalora_dino
  python -m adaptface_jax.main --config configs/dalora_dino.py:demo --workdir workdirs/dalora_dino_demo   # offline
See configs/common.py for the arguments (demo, rank=, domains=, routing=, ...).
"""

from configs import common


def get_config(arg=None):
  return common.experiment("dino", "dalora", arg)
