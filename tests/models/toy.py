"""A tiny image + text model (CNN, one transformer layer with a padding mask, linear head) and
variants that break mmopt's assumptions on purpose."""
from __future__ import annotations

import torch
from torch import nn


class Img(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Linear(8, 16)

    def forward(self, x):
        return self.proj(torch.relu(self.conv(x)).mean((2, 3)))


class Txt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.pos = nn.Embedding(16, 16)
        layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) + self.pos(torch.arange(input_ids.shape[1]))[None]
        h = self.enc(h, src_key_padding_mask=~attention_mask)
        m = attention_mask.unsqueeze(-1).float()
        return {"pooled": (h * m).sum(1) / m.sum(1), "tokens": h}


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.image_encoder = Img()
        self.text_encoder = Txt()
        self.head = nn.Linear(32, 5)

    def forward(self, pixel_values, input_ids, attention_mask):
        a = self.image_encoder(pixel_values)
        b = self.text_encoder(input_ids, attention_mask)["pooled"]
        return self.head(torch.cat([a, b], -1))


class Twice(Toy):
    """Calls the image encoder twice: not splittable into one call per component."""

    def forward(self, pixel_values, input_ids, attention_mask):
        a = self.image_encoder(pixel_values) + self.image_encoder(pixel_values.flip(-1))
        b = self.text_encoder(input_ids, attention_mask)["pooled"]
        return self.head(torch.cat([a, b], -1))


def build(width: int = 16) -> Toy:
    torch.manual_seed(0)
    return Toy().eval()


def twice() -> Toy:
    torch.manual_seed(0)
    return Twice().eval()


def not_a_module():
    return "hello"


CONFIG = '''
[model]
factory = "toy:build"
{checkpoint}
[inputs.pixel_values]
shape = ["batch", 3, 16, 16]
[inputs.input_ids]
shape = ["batch", "seq"]
dtype = "int64"
range = [0, 49]
[inputs.attention_mask]
shape = ["batch", "seq"]
dtype = "bool"
[dims]
batch = {{ min = 1, opt = 8, max = 32 }}
seq = {{ min = 4, opt = 8, max = 16 }}
[components]
image = "image_encoder"
text = "text_encoder"
{extra}
'''
