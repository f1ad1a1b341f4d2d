"""Tiny transformers models for the compile zoo: random weights from small configs (hidden <= 64,
1-2 layers, tiny vocabularies), no downloads. Each entry builds (model, inputs(batch, length))."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

VOCAB = 96


@dataclass(frozen=True)
class ZooModel:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, int], tuple]  # (batch, sequence length) -> example inputs
    lengths: tuple[int, int] | None  # two sequence lengths, or None where the input size is fixed


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed + batch + length))


def _text(batch: int, length: int) -> tuple:
    return (_ids(batch, length),)


def _text_and_mask(batch: int, length: int) -> tuple:
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[0, length - 2:] = 0  # some padding, so the mask matters
    return _ids(batch, length), mask


def _image(size: int, channels: int = 3):
    def inputs(batch: int, length: int) -> tuple:
        return (torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(batch)),)

    return inputs


def _seeded(build):
    """``build`` seeded, in eval mode, its batch norms given trained-looking statistics: fresh ones with random
    convolution weights shrink MobileNetV2's output to ~1e-26, where a comparison with eager measures only
    rounding noise (folding a batch norm into its convolution's weights rounds differently)."""

    def seeded():
        torch.manual_seed(0)
        model = build().eval()
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.running_mean.normal_(0, 0.1)
                    module.running_var.uniform_(0.5, 1.5)
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.normal_(0, 0.1)
        return model

    return seeded


def bert():
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                vocab_size=VOCAB, max_position_embeddings=32, hidden_act="relu"))


def distilbert():
    from transformers import DistilBertConfig, DistilBertModel

    return DistilBertModel(DistilBertConfig(dim=64, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=VOCAB,
                                            max_position_embeddings=32, activation="relu"))


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32,
                                      activation_function="relu", bos_token_id=0, eos_token_id=0))


def opt():
    from transformers import OPTConfig, OPTModel

    return OPTModel(OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
                              vocab_size=VOCAB, max_position_embeddings=32, word_embed_proj_dim=64))


def t5():
    from transformers import T5Config, T5Model

    return T5Model(T5Config(d_model=64, d_kv=32, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2,
                            vocab_size=VOCAB, decoder_start_token_id=0, feed_forward_proj="relu"))


def _t5_inputs(batch: int, length: int) -> tuple:
    ids, mask = _text_and_mask(batch, length)
    return ids, mask, _ids(batch, length // 2, seed=7)


def _decoder(config_class, model_class, **extra):
    def build():
        config = config_class(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=32,
                              hidden_act="relu", **extra)
        return model_class(config)

    return build


def llama():
    from transformers import LlamaConfig, LlamaModel

    return _decoder(LlamaConfig, LlamaModel)()


def qwen2():
    from transformers import Qwen2Config, Qwen2Model

    return _decoder(Qwen2Config, Qwen2Model)()


def mistral():
    from transformers import MistralConfig, MistralModel

    return _decoder(MistralConfig, MistralModel, sliding_window=None)()


def vit():
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                              image_size=32, patch_size=8, hidden_act="relu"))


def resnet():
    from transformers import ResNetConfig, ResNetModel

    return ResNetModel(ResNetConfig(embedding_size=16, hidden_sizes=[16, 64], depths=[1, 1], layer_type="basic"))


def convnext():
    from transformers import ConvNextConfig, ConvNextModel

    return ConvNextModel(ConvNextConfig(hidden_sizes=[16, 64], depths=[1, 1], num_stages=2, hidden_act="relu"))


def mobilenet_v2():
    from transformers import MobileNetV2Config, MobileNetV2Model

    return MobileNetV2Model(MobileNetV2Config(image_size=32, depth_multiplier=0.25))


def whisper_encoder():
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    return WhisperEncoder(WhisperConfig(d_model=64, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                                        num_mel_bins=16, max_source_positions=16, vocab_size=VOCAB,
                                        activation_function="relu"))


def _mel(batch: int, length: int) -> tuple:
    return (torch.randn(batch, 16, 32, generator=torch.Generator().manual_seed(batch)),)


def wav2vec2():
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    return Wav2Vec2Model(Wav2Vec2Config(hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64, conv_dim=(16, 16), conv_kernel=(10, 3),
                                        conv_stride=(5, 2), num_conv_pos_embeddings=8,
                                        num_conv_pos_embedding_groups=2, hidden_act="relu",
                                        feat_extract_norm="layer", do_stable_layer_norm=True))


def _audio_of(samples: int):
    """Raw audio: compile keeps its length static (a float sequence; see structfx.lowering.export)."""

    def inputs(batch: int, length: int) -> tuple:
        return (torch.randn(batch, samples, generator=torch.Generator().manual_seed(batch)),)

    return inputs


ZOO = [
    ZooModel("bert", _seeded(bert), _text_and_mask, (16, 24)),
    ZooModel("distilbert", _seeded(distilbert), _text_and_mask, (16, 24)),
    ZooModel("gpt2", _seeded(gpt2), _text, (16, 24)),
    ZooModel("opt", _seeded(opt), _text_and_mask, (16, 24)),
    ZooModel("t5", _seeded(t5), _t5_inputs, (16, 24)),
    ZooModel("llama", _seeded(llama), _text, (16, 24)),
    ZooModel("qwen2", _seeded(qwen2), _text, (16, 24)),
    ZooModel("mistral", _seeded(mistral), _text, (16, 24)),
    ZooModel("vit", _seeded(vit), _image(32), None),
    ZooModel("resnet", _seeded(resnet), _image(32), None),
    ZooModel("convnext", _seeded(convnext), _image(32), None),
    ZooModel("mobilenet_v2", _seeded(mobilenet_v2), _image(32), None),
    ZooModel("whisper_encoder", _seeded(whisper_encoder), _mel, None),
    ZooModel("wav2vec2", _seeded(wav2vec2), _audio_of(160), None),
]
