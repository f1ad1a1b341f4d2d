"""The model zoo of bench_models.py: transformers architectures from small configs (random weights, no
download), each with a function making example inputs at a given batch size."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

SEQUENCE = 32  # tokens of the text models
IMAGE = 64  # pixels a side of the vision models
AUDIO = 4000  # samples of Wav2Vec2's raw audio


@dataclass
class Entry:
    name: str
    make: Callable[[], nn.Module]
    inputs: Callable[[int], tuple]  # batch -> example inputs


def _tokens(batch: int) -> tuple:
    return (torch.randint(0, 1000, (batch, SEQUENCE), generator=torch.Generator().manual_seed(batch)),)


def _images(batch: int) -> tuple:
    return (torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(batch)),)


TEXT = dict(vocab_size=1000, max_position_embeddings=64)


def bert():
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=512, **TEXT))


def distilbert():
    from transformers import DistilBertConfig, DistilBertModel

    return DistilBertModel(DistilBertConfig(dim=128, n_layers=2, n_heads=2, hidden_dim=512, **TEXT))


def opt():
    from transformers import OPTConfig, OPTModel

    return OPTModel(OPTConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, ffn_dim=512,
                              word_embed_proj_dim=128, use_cache=False, **TEXT))


def gpt2():
    from transformers import GPT2Config, GPT2Model

    return GPT2Model(GPT2Config(n_embd=128, n_layer=2, n_head=2, n_inner=512, vocab_size=1000, n_positions=64,
                                use_cache=False))


def llama():
    from transformers import LlamaConfig, LlamaModel

    return LlamaModel(LlamaConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=2, use_cache=False, **TEXT))


def mt5():
    from transformers import MT5Config, MT5EncoderModel

    return MT5EncoderModel(MT5Config(d_model=128, d_kv=64, d_ff=512, num_layers=2, num_heads=2, vocab_size=1000))


def t5():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(d_model=128, d_kv=64, d_ff=512, num_layers=2, num_heads=2, vocab_size=1000))


def vit():
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
                              image_size=IMAGE, patch_size=8))


def resnet():
    from transformers import ResNetConfig, ResNetModel

    return ResNetModel(ResNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                                    layer_type="basic"))


def regnet():
    from transformers import RegNetConfig, RegNetModel

    return RegNetModel(RegNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                                    groups_width=16))


def convnext():
    from transformers import ConvNextConfig, ConvNextModel

    return ConvNextModel(ConvNextConfig(hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1]))


def mobilenet_v2():
    from transformers import MobileNetV2Config, MobileNetV2Model

    return MobileNetV2Model(MobileNetV2Config(image_size=IMAGE, depth_multiplier=0.5))


def efficientnet():
    from transformers import EfficientNetConfig, EfficientNetModel

    return EfficientNetModel(EfficientNetConfig(image_size=IMAGE, width_coefficient=0.5, depth_coefficient=0.3,
                                                hidden_dim=640))


def whisper_encoder():
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    return WhisperEncoder(WhisperConfig(d_model=128, encoder_layers=2, encoder_attention_heads=2,
                                        encoder_ffn_dim=512, num_mel_bins=40, max_source_positions=64))


def wav2vec2():
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    return Wav2Vec2Model(Wav2Vec2Config(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=512, conv_dim=(64, 64, 64), conv_stride=(5, 4, 4),
                                        conv_kernel=(10, 4, 4), num_conv_pos_embeddings=16,
                                        num_conv_pos_embedding_groups=4, do_stable_layer_norm=True))


ZOO = [
    Entry("BERT", bert, _tokens),
    Entry("DistilBERT", distilbert, _tokens),
    Entry("OPT", opt, _tokens),
    Entry("GPT-2", gpt2, _tokens),
    Entry("Llama", llama, _tokens),
    Entry("T5 encoder", t5, _tokens),
    Entry("MT5 encoder", mt5, _tokens),
    Entry("ViT", vit, _images),
    Entry("ResNet", resnet, _images),
    Entry("RegNet", regnet, _images),
    Entry("ConvNeXt", convnext, _images),
    Entry("MobileNetV2", mobilenet_v2, _images),
    Entry("EfficientNet", efficientnet, _images),
    Entry("Whisper encoder", whisper_encoder,
          lambda batch: (torch.randn(batch, 40, 128, generator=torch.Generator().manual_seed(batch)),)),
    Entry("Wav2Vec2", wav2vec2,
          lambda batch: (torch.randn(batch, AUDIO, generator=torch.Generator().manual_seed(batch)),)),
]


def build(entry: Entry) -> nn.Module:
    """The model in eval mode, its batch norms given trained-looking statistics (fresh ones with a
    random init can zero a whole network's output, e.g. MobileNetV2's ReLU6 stack)."""
    torch.manual_seed(0)
    model = entry.make().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    return model
