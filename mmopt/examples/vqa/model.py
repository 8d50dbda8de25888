"""The embedded example model: a small two-encoder VQA network for easy-vqa.

It has the structure mmopt is built for: an image encoder and a text encoder that each take
model inputs unchanged, and a fusion head that the parent ``forward`` glues on top. Small
enough (~130k parameters) to train on a laptop CPU in minutes and to ship inside the package.
"""
from __future__ import annotations

import torch
from torch import nn

VOCAB_SIZE = 28  # len(vocab.json): <pad>, <unk> and the 26 words of the training questions
NUM_ANSWERS = 13
MAX_SEQ = 16


class ImageEncoder(nn.Module):
    """Conv blocks (conv, BatchNorm, ReLU, max-pool), global average pool, linear."""

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64, 64), dim: int = 64):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(c_in, dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.features(pixel_values)
        return self.proj(x.mean(dim=(2, 3)))


class TextEncoder(nn.Module):
    """Token + learned position embeddings, one transformer layer, masked mean pooling."""

    def __init__(self, vocab_size: int = VOCAB_SIZE, dim: int = 64, heads: int = 4,
                 ff_dim: int = 256, max_seq: int = MAX_SEQ, dropout: float = 0.1):
        super().__init__()
        self.token = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.position = nn.Embedding(max_seq, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, ff_dim, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.token(input_ids) + self.position(positions)
        x = self.encoder(x, src_key_padding_mask=~attention_mask)
        keep = attention_mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)
        return self.norm(pooled)


class VQAModel(nn.Module):
    """``(pixel_values, input_ids, attention_mask) -> logits [B, NUM_ANSWERS]``."""

    def __init__(self, vocab_size: int = VOCAB_SIZE, dim: int = 64, num_answers: int = NUM_ANSWERS,
                 channels: tuple[int, ...] = (16, 32, 64, 64), heads: int = 4, ff_dim: int = 256,
                 hidden: int = 128, max_seq: int = MAX_SEQ, dropout: float = 0.1):
        super().__init__()
        self.image_encoder = ImageEncoder(tuple(channels), dim)
        self.text_encoder = TextEncoder(vocab_size, dim, heads, ff_dim, max_seq, dropout)
        self.head = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(inplace=True),
                                  nn.Dropout(dropout), nn.Linear(hidden, num_answers))

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        image_features = self.image_encoder(pixel_values)
        text_features = self.text_encoder(input_ids, attention_mask)
        return self.head(torch.cat([image_features, text_features], dim=-1))


def build_model(**kwargs) -> VQAModel:
    """Factory named by ``mmopt.toml``; the defaults match the shipped checkpoint."""
    return VQAModel(**kwargs)
