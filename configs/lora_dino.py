r"""EXP-001: DINOv2 ViT-S/14 + LoRA.

  python -m adaptface_jax.main --config configs/lora_dino.py --workdir workdirs/lora_dino
  python -m adaptface_jax.main --config configs/lora_dino.py:demo --workdir workdirs/lora_dino_demo   # offline
See configs/common.py for the arguments (demo, rank=, domains=, routing=, ...).
"""

from configs import common


def get_config(arg=None):
  return common.experiment("dino", "lora", arg)
