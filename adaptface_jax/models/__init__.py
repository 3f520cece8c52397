"""The model: the ViT port, its attention, the (DA-)LoRA adapters, the face model around them, preprocessing and
the HuggingFace key table."""
