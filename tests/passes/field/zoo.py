"""Tiny transformers models (random weights, no download): the architectures issue #15 was tried on."""

from __future__ import annotations

import torch


def _ids(batch: int = 2, length: int = 12, vocab: int = 100) -> tuple:
    return (torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0)),)


def tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=2, vocab_size=100,
                       max_position_embeddings=64, word_embed_proj_dim=64, activation_function="relu")
    return OPTForCausalLM(config).eval(), _ids()


def tiny_mobilenet_v2():
    from transformers import MobileNetV2Config, MobileNetV2Model

    config = MobileNetV2Config(image_size=16, depth_multiplier=0.25, min_depth=8)
    return MobileNetV2Model(config).eval(), (torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)),)


def tiny_whisper_encoder():
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    config = WhisperConfig(d_model=64, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
                           max_source_positions=16, activation_function="relu")
    features = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))
    return WhisperEncoder(config).eval(), (features,)


def tiny_bert():
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                        vocab_size=100, max_position_embeddings=32, hidden_act="relu")
    return BertModel(config).eval(), _ids()


def tiny_t5():
    from transformers import T5Config, T5EncoderModel

    config = T5Config(d_model=64, d_ff=128, d_kv=32, num_layers=2, num_heads=2, vocab_size=100,
                      feed_forward_proj="relu")
    return T5EncoderModel(config).eval(), _ids()


ZOO = [tiny_opt, tiny_mobilenet_v2, tiny_whisper_encoder, tiny_bert, tiny_t5]
