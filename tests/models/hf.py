"""Real transformers architectures built offline from small configs, each as a multimodal model.

Weights are random (no hub access here); parity is judged with relative error and cosine as well as
absolute error, so near-zero outputs cannot pass vacuously.
"""
from __future__ import annotations

import torch
from torch import nn


def clip() -> nn.Module:
    """HF CLIPModel: vision_model + text_model; projections, normalisation, logits are the fusion."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=16)
    return CLIPModel(cfg).eval()


class AudioText(nn.Module):
    """Wav2Vec2 on raw audio + BERT on text, mean-pooled audio and pooled text into an MLP head."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel, Wav2Vec2Config, Wav2Vec2Model

        torch.manual_seed(0)
        self.audio = Wav2Vec2Model(Wav2Vec2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4, do_stable_layer_norm=False, feat_extract_norm="group"))
        self.text = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=64, max_position_embeddings=32))
        self.head = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 5))

    def forward(self, input_values, input_ids, attention_mask):
        a = self.audio(input_values).last_hidden_state.mean(1)
        t = self.text(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return self.head(torch.cat([a, t], dim=-1))


def audio_text() -> nn.Module:
    return AudioText().eval()


class Head3(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32 * 3, 7)

    def forward(self, image, text, audio):
        return self.proj(torch.cat([image, text, audio.mean(1)], dim=-1))


class ThreeEncoders(nn.Module):
    """ViT + BERT + Whisper encoder; the encoders' outputs go straight into ``head``."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel, ViTConfig, ViTModel, WhisperConfig
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        torch.manual_seed(0)
        self.vision = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=64))
        self.text = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=64, max_position_embeddings=32))
        self.speech = WhisperEncoder(WhisperConfig(num_mel_bins=16, d_model=32, encoder_layers=2,
                                                   encoder_attention_heads=4, encoder_ffn_dim=64,
                                                   max_source_positions=32))
        self.head = Head3()

    def forward(self, pixel_values, input_ids, attention_mask, input_features):
        v = self.vision(pixel_values=pixel_values)
        t = self.text(input_ids=input_ids, attention_mask=attention_mask)
        s = self.speech(input_features)
        return self.head(v.pooler_output, t.pooler_output, s.last_hidden_state)


def three_encoders() -> nn.Module:
    return ThreeEncoders().eval()


CONFIGS = {
    "clip": '''
[model]
factory = "models.hf:clip"
[inputs.input_ids]
shape = ["batch", "seq"]
dtype = "int64"
range = [0, 99]
[inputs.pixel_values]
shape = ["batch", 3, 32, 32]
[inputs.attention_mask]
shape = ["batch", "seq"]
dtype = "int64"
range = [0, 1]
[dims]
batch = { min = 1, opt = 4, max = 8 }
seq = { min = 5, opt = 12, max = 32 }
[components]
image = "vision_model"
text = "text_model"
''',
    "audio_text": '''
[model]
factory = "models.hf:audio_text"
[inputs.input_values]
shape = ["batch", "samples"]
range = [-1.0, 1.0]
[inputs.input_ids]
shape = ["batch", "seq"]
dtype = "int64"
range = [0, 99]
[inputs.attention_mask]
shape = ["batch", "seq"]
dtype = "int64"
range = [0, 1]
[dims]
batch = { min = 2, opt = 4, max = 8 }
samples = { min = 800, opt = 1600, max = 3200 }
seq = { min = 5, opt = 12, max = 32 }
[components]
audio = "audio"
text = "text"
''',
    "three": '''
[model]
factory = "models.hf:three_encoders"
[inputs.pixel_values]
shape = ["batch", 3, 32, 32]
[inputs.input_ids]
shape = ["batch", "seq"]
dtype = "int64"
range = [0, 99]
[inputs.attention_mask]
shape = ["batch", "seq"]
dtype = "int64"
range = [0, 1]
[inputs.input_features]
shape = ["batch", 16, 64]
[dims]
batch = { min = 1, opt = 4, max = 8 }
seq = { min = 5, opt = 12, max = 32 }
[components]
image = "vision"
text = "text"
speech = "speech"
fusion = "head"
''',
}
