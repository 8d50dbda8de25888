"""A small but real Hugging Face CLIP (vision + text transformers, projections, logits), randomly
initialised from a fixed seed: no hub access is needed. Shared by mmopt and the Optimum peer, which
loads the same weights from ``save(dir)``."""
from __future__ import annotations

import torch

CONFIG = dict(
    text_config=dict(vocab_size=1000, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                     num_attention_heads=4, max_position_embeddings=32, bos_token_id=998,
                     eos_token_id=999, pad_token_id=1),
    vision_config=dict(image_size=64, patch_size=8, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=4),
    projection_dim=64)


def build():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    return CLIPModel(CLIPConfig(**CONFIG)).eval()


def save(path: str) -> None:
    build().save_pretrained(path)
