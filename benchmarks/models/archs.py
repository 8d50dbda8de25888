"""Multimodal architectures for benchmarks/architectures.py, beside tests/models/{custom,hf}.py: the
patterns users bring (RNN speech encoders, FiLM and gated fusion, cross-attention bridges, tri-modal
contrastive heads, shared towers, preprocessing in the parent, a dict batch, a single-stream model).
Random weights from fixed seeds; small sizes so the whole set runs on a 2-core CPU."""
from __future__ import annotations

import torch
from torch import nn


class Conv(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                                 nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, width))

    def forward(self, pixel_values):
        return self.net(pixel_values)


class Text(nn.Module):
    def __init__(self, width: int = 16, vocab: int = 50):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, 4, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)

    def forward(self, input_ids, attention_mask):
        t = self.enc(self.embed(input_ids), src_key_padding_mask=~attention_mask)
        m = attention_mask.unsqueeze(-1).to(t.dtype)
        return (t * m).sum(1) / m.sum(1).clamp(min=1)


class RNNSpeech(nn.Module):
    def __init__(self, kind: str, width: int = 16, mels: int = 8):
        super().__init__()
        self.rnn = (nn.GRU if kind == "gru" else nn.LSTM)(mels, width, batch_first=True)
        self.proj = nn.Linear(width, width)

    def forward(self, features):
        out, _ = self.rnn(features)
        return self.proj(out[:, -1])


class SpeechText(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.speech = RNNSpeech(kind)
        self.text = Text()
        self.head = nn.Linear(32, 5)

    def forward(self, features, input_ids, attention_mask):
        return self.head(torch.cat([self.speech(features), self.text(input_ids, attention_mask)], -1))


class FiLM(nn.Module):
    """Text conditions the image features by a learned scale and shift."""

    def __init__(self):
        super().__init__()
        self.image = Conv()
        self.text = Text()
        self.gamma, self.beta = nn.Linear(16, 16), nn.Linear(16, 16)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(16, 5))

    def forward(self, pixel_values, input_ids, attention_mask):
        t = self.text(input_ids, attention_mask)
        return self.head(self.image(pixel_values) * (1 + self.gamma(t)) + self.beta(t))


class Gated(nn.Module):
    """A learned gate mixes the two modalities (gated multimodal unit)."""

    def __init__(self):
        super().__init__()
        self.image = Conv()
        self.text = Text()
        self.gate = nn.Linear(32, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, pixel_values, input_ids, attention_mask):
        i, t = self.image(pixel_values), self.text(input_ids, attention_mask)
        z = torch.sigmoid(self.gate(torch.cat([i, t], -1)))
        return self.head(z * torch.tanh(i) + (1 - z) * torch.tanh(t))


class Bridge(nn.Module):
    """Perceiver / Q-Former style: learned queries cross-attend to the image tokens, then meet the text."""

    def __init__(self):
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(3, 16, 4, stride=4), nn.Flatten(2))
        self.text = Text()
        self.queries = nn.Parameter(torch.randn(4, 16))
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, pixel_values, input_ids, attention_mask):
        tokens = self.image(pixel_values).transpose(1, 2)
        q = self.queries.expand(tokens.shape[0], -1, -1)
        bridged, _ = self.attn(q, tokens, tokens)
        return self.head(torch.cat([bridged.mean(1), self.text(input_ids, attention_mask)], -1))


class TriModal(nn.Module):
    """ImageBind style: three encoders into one normalised embedding space, similarity logits."""

    def __init__(self):
        super().__init__()
        self.image, self.text, self.audio = Conv(), Text(), RNNSpeech("gru")
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, pixel_values, input_ids, attention_mask, features):
        i = nn.functional.normalize(self.image(pixel_values), dim=-1)
        t = nn.functional.normalize(self.text(input_ids, attention_mask), dim=-1)
        a = nn.functional.normalize(self.audio(features), dim=-1)
        s = self.logit_scale.exp()
        return {"image_text": s * i @ t.T, "audio_text": s * a @ t.T, "image_embeds": i}


class Siamese(nn.Module):
    """One shared tower for two views (a component called twice per forward)."""

    def __init__(self):
        super().__init__()
        self.tower = Conv()
        self.head = nn.Linear(32, 2)

    def forward(self, left, right):
        return self.head(torch.cat([self.tower(left), self.tower(right)], -1))


class Normalising(nn.Module):
    """Pixel normalisation in the parent forward before the image encoder."""

    def __init__(self):
        super().__init__()
        self.image = Conv()
        self.text = Text()
        self.register_buffer("mean", torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1))
        self.head = nn.Linear(32, 5)

    def forward(self, pixel_values, input_ids, attention_mask):
        x = (pixel_values - self.mean) / 0.25
        return self.head(torch.cat([self.image(x), self.text(input_ids, attention_mask)], -1))


class DictBatch(nn.Module):
    """Lightning style: ``forward(batch)`` with one dict."""

    def __init__(self):
        super().__init__()
        self.image = Conv()
        self.text = Text()
        self.head = nn.Linear(32, 5)

    def forward(self, batch):
        return self.head(torch.cat([self.image(batch["pixel_values"]),
                                    self.text(batch["input_ids"], batch["attention_mask"])], -1))


class SingleStream(nn.Module):
    """ViLT style: patches and tokens embedded, concatenated, one transformer over both."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Sequential(nn.Conv2d(3, 16, 4, stride=4), nn.Flatten(2))
        self.embed = nn.Embedding(50, 16)
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(16, 5)

    def forward(self, pixel_values, input_ids, attention_mask):
        x = torch.cat([self.patch(pixel_values).transpose(1, 2), self.embed(input_ids)], 1)
        return self.head(self.encoder(x)[:, 0])


def _build(cls, *args):
    def factory():
        torch.manual_seed(0)
        return cls(*args).eval()
    return factory


gru = _build(SpeechText, "gru")
lstm = _build(SpeechText, "lstm")
film = _build(FiLM)
gated = _build(Gated)
bridge = _build(Bridge)
tri_modal = _build(TriModal)
siamese = _build(Siamese)
normalising = _build(Normalising)
dict_batch = _build(DictBatch)
single_stream = _build(SingleStream)


def siglip() -> nn.Module:
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    cfg = SiglipConfig(text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=32),
                       vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4))
    return SiglipModel(cfg).eval()


class WhisperGPT2(nn.Module):
    """A Whisper encoder and a GPT-2 decoder cross-attending to it (speech captioning)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel, WhisperConfig
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        torch.manual_seed(0)
        self.speech = WhisperEncoder(WhisperConfig(num_mel_bins=16, d_model=32, encoder_layers=2,
                                                   encoder_attention_heads=4, encoder_ffn_dim=64,
                                                   max_source_positions=32))
        self.decoder = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                                  add_cross_attention=True))

    def forward(self, input_features, input_ids):
        memory = self.speech(input_features).last_hidden_state
        return self.decoder(input_ids=input_ids, encoder_hidden_states=memory).logits


def whisper_gpt2() -> nn.Module:
    return WhisperGPT2().eval()
