"""Realistic custom multimodal models, written the way users write them, one per failure class seen on
real architectures: dataclass / NamedTuple outputs, a parent forward that reads its encoders' attributes,
tied weights saved by ``safetensors.torch.save_model``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from models.toy import CONFIG as TOY_CONFIG


def _seeded(cls: type) -> nn.Module:
    torch.manual_seed(0)
    return cls().eval()


@dataclass
class ImageOut:
    features: torch.Tensor
    pooled: torch.Tensor


class TextOut(NamedTuple):
    tokens: torch.Tensor
    pooled: torch.Tensor


@dataclass
class Prediction:
    logits: torch.Tensor
    image_embeds: torch.Tensor


class ImageEncoder(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.proj = nn.Linear(width, width)

    def forward(self, pixel_values):
        f = torch.relu(self.conv(pixel_values))
        return ImageOut(features=f, pooled=self.proj(f.mean((2, 3))))


class TextEncoder(nn.Module):
    def __init__(self, vocab: int = 50, width: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layer = nn.Linear(width, width)

    def forward(self, input_ids, attention_mask):
        t = torch.tanh(self.layer(self.embed(input_ids)))
        m = attention_mask.unsqueeze(-1).to(t.dtype)
        return TextOut(tokens=t, pooled=(t * m).sum(1) / m.sum(1).clamp(min=1))


class Containers(nn.Module):
    """Encoders return a @dataclass and a NamedTuple; the model returns a @dataclass."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.image_encoder = ImageEncoder(width)
        self.text_encoder = TextEncoder(width=width)
        self.head = nn.Linear(2 * width, 5)

    def forward(self, pixel_values, input_ids, attention_mask):
        img = self.image_encoder(pixel_values)
        txt = self.text_encoder(input_ids, attention_mask)
        return Prediction(logits=self.head(torch.cat([img.pooled, txt.pooled], -1)), image_embeds=img.pooled)


class ReadsAttributes(Containers):
    """The parent forward reads its encoders' configuration and parameter dtype (``self.encoder.config``,
    ``.dtype`` in Hugging Face models)."""

    def forward(self, pixel_values, input_ids, attention_mask):
        img = self.image_encoder(pixel_values)
        txt = self.text_encoder(input_ids, attention_mask)
        width = self.image_encoder.proj.out_features
        dtype = next(self.text_encoder.parameters()).dtype
        joined = torch.cat([img.pooled[:, :width], txt.pooled.to(dtype)], -1)
        return Prediction(logits=self.head(joined), image_embeds=img.pooled)


class TiedText(nn.Module):
    """A text encoder whose output head shares the embedding matrix (GPT-2 / BERT-MLM style)."""

    def __init__(self, vocab: int = 50, width: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.embed.weight  # tied

    def forward(self, input_ids, attention_mask):
        t = self.embed(input_ids)
        m = attention_mask.unsqueeze(-1).to(t.dtype)
        pooled = (t * m).sum(1) / m.sum(1).clamp(min=1)
        return self.lm_head(pooled)


class Tied(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.image_encoder = ImageEncoder(width)
        self.text_encoder = TiedText(width=width)
        self.head = nn.Linear(width + 50, 5)

    def forward(self, pixel_values, input_ids, attention_mask):
        return self.head(torch.cat([self.image_encoder(pixel_values).pooled,
                                    self.text_encoder(input_ids, attention_mask)], -1))


class VotingFusion(Containers):
    """Late fusion with no weights of its own: the average of two views' scores."""

    def forward(self, pixel_values, input_ids, attention_mask):
        img = self.image_encoder(pixel_values).pooled
        txt = self.text_encoder(input_ids, attention_mask).pooled
        return (img.softmax(-1) + txt.softmax(-1)) / 2


class GuardedText(TextEncoder):
    """Branches on the data (a run-time check such as "is there any padding?"): not exportable as is."""

    def forward(self, input_ids, attention_mask):
        if bool(attention_mask.all()):  # data-dependent guard
            return super().forward(input_ids, attention_mask)
        return super().forward(input_ids, attention_mask)


class DataDependent(Containers):
    def __init__(self, width: int = 16):
        super().__init__(width)
        self.text_encoder = GuardedText(width=width)


def data_dependent() -> nn.Module:
    return _seeded(DataDependent)


class PreLNText(nn.Module):
    """The ViT / BERT layout in plain PyTorch: pre-LayerNorm transformer layers."""

    def __init__(self, vocab: int = 50, width: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, 4, 32, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, input_ids, attention_mask):
        t = self.encoder(self.embed(input_ids), src_key_padding_mask=~attention_mask)
        m = attention_mask.unsqueeze(-1).to(t.dtype)
        return TextOut(tokens=t, pooled=(t * m).sum(1) / m.sum(1).clamp(min=1))


class PreLN(Containers):
    def __init__(self, width: int = 16):
        super().__init__(width)
        self.text_encoder = PreLNText(width=width)


def pre_ln() -> nn.Module:
    return _seeded(PreLN)


class CrossText(TextEncoder):
    def forward(self, input_ids, attention_mask, memory):
        t = torch.tanh(self.layer(self.embed(input_ids)) + memory.unsqueeze(1))
        m = attention_mask.unsqueeze(-1).to(t.dtype)
        return TextOut(tokens=t, pooled=(t * m).sum(1) / m.sum(1).clamp(min=1))


class Glue(Containers):
    """Computation in the parent between the model inputs and the encoders: pixel normalisation, and a
    mask made with torch.ones from another encoder's output shape (BLIP-style cross-attending text)."""

    def __init__(self, width: int = 16):
        super().__init__(width)
        self.text_encoder = CrossText(width=width)
        self.register_buffer("mean", torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1))

    def forward(self, pixel_values, input_ids, attention_mask):
        img = self.image_encoder((pixel_values - self.mean) / 0.25)
        mask = attention_mask & torch.ones(img.pooled.shape[0], 1, dtype=torch.bool)
        txt = self.text_encoder(input_ids, mask, img.pooled)  # cross-attends to the image features
        return self.head(torch.cat([img.pooled, txt.pooled], -1))


class Siamese(Containers):
    """One image tower for two views (a query and a reference image), weights shared; the text encoder's
    features pass through a shared refinement block applied twice (ALBERT-style weight sharing: its second
    call reads its first call's output)."""

    def __init__(self, width: int = 16):
        super().__init__(width)
        self.refine = nn.Linear(width, width)
        self.head = nn.Linear(3 * width, 5)

    def forward(self, pixel_values, reference, input_ids, attention_mask):
        a = self.image_encoder(pixel_values).pooled
        b = self.image_encoder(reference).pooled
        t = self.refine(self.refine(self.text_encoder(input_ids, attention_mask).pooled))
        return self.head(torch.cat([a - b, a, t], -1))  # order-dependent: swapped calls would show


class Frames(Containers):
    """The image encoder on two halves sliced out of one input: computed in the parent, called twice."""

    def forward(self, pixel_values, input_ids, attention_mask):
        top, bottom = self.image_encoder(pixel_values[:, :, :8]), self.image_encoder(pixel_values[:, :, 8:])
        txt = self.text_encoder(input_ids, attention_mask)
        return self.head(torch.cat([top.pooled + bottom.pooled, txt.pooled], -1))


class OutlierText(TextEncoder):
    """A transformer-style MLP whose hidden layer has a few outlier channels, as trained transformers do
    (LLM.int8(), SmoothQuant): one per-tensor int8 scale for the down-projection's input crushes the rest."""

    def __init__(self, vocab: int = 50, width: int = 16):
        super().__init__(vocab, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        with torch.no_grad():
            self.up.weight[:2] *= 500.0
            self.down.weight[:, :2] /= 500.0

    def forward(self, input_ids, attention_mask):
        x = self.embed(input_ids)
        t = x + self.down(nn.functional.gelu(self.up(x)))
        m = attention_mask.unsqueeze(-1).to(t.dtype)
        return TextOut(tokens=t, pooled=(t * m).sum(1) / m.sum(1).clamp(min=1))


class Outliers(Containers):
    def __init__(self, width: int = 16):
        super().__init__(width)
        self.text_encoder = OutlierText(width=width)


def outliers() -> nn.Module:
    return _seeded(Outliers)


class GlueBetweenCalls(Containers):
    """A shared block called before and after a glued text encoder: the text encoder may read the first
    call's output, and the second call reads the text encoder's (an order the pipeline must keep)."""

    def __init__(self, width: int = 16):
        super().__init__(width)
        self.text_encoder = CrossText(width=width)
        self.refine = nn.Linear(width, width)

    def forward(self, pixel_values, input_ids, attention_mask):
        r1 = self.refine(self.image_encoder(pixel_values).pooled)
        mask = attention_mask & torch.ones(r1.shape[0], 1, dtype=torch.bool)  # glue: computed in the parent
        txt = self.text_encoder(input_ids, mask, r1)
        r2 = self.refine(txt.pooled)
        return self.head(torch.cat([r1, r2], -1))


def glue_between_calls() -> nn.Module:
    return _seeded(GlueBetweenCalls)


def siamese() -> nn.Module:
    return _seeded(Siamese)


def frames() -> nn.Module:
    return _seeded(Frames)


def glue() -> nn.Module:
    return _seeded(Glue)


def voting() -> nn.Module:
    return _seeded(VotingFusion)


def containers() -> nn.Module:
    return _seeded(Containers)


def reads_attributes() -> nn.Module:
    return _seeded(ReadsAttributes)


def tied() -> nn.Module:
    return _seeded(Tied)


# the toy model's config (its inputs are these models' inputs), for a factory of this module
CONFIG = TOY_CONFIG.replace('factory = "toy:build"', 'factory = "models.custom:{factory}"').replace(
    "batch = {{ min = 1, opt = 8, max = 32 }}", "batch = {{ min = 1, opt = 4, max = 16 }}")


def siamese_batches():
    """Calibration batches for ``siamese``: the toy's inputs plus a reference image, dimmer than the query
    (a second call with its own range)."""
    import numpy as np

    from models.toydata import calibration_batches

    rng = np.random.default_rng(1)
    for batch in calibration_batches():
        n = len(batch["pixel_values"])
        yield {**batch, "reference": (0.3 * rng.standard_normal((n, 3, 16, 16))).astype(np.float32)}
