"""AdaptFace-JAX: face recognition by LoRA / DA-LoRA adaptation of pretrained ViTs (DINOv2, CLIP) in JAX/Flax."""

from adaptface_jax.models.hf_weights import Backbone, load_backbone

__all__ = ["Backbone", "load_backbone"]
