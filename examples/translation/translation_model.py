"""fairseq's ``transformer_iwslt_de_en`` as a ``transformers`` Marian model, built from scratch.

The architecture (Vaswani et al. 2017, fairseq's IWSLT'14 variant): 6 encoder and 6 decoder
layers of width 512, feed-forward width 1024, 4 attention heads, ReLU, post-norm residual
blocks, sinusoidal positions, token embeddings scaled by sqrt(512), separate source and target
vocabularies, decoder input and output embeddings tied. With fairseq's IWSLT'14 dictionaries
(8,848 German and 6,632 English entries) it has 39,469,056 trainable parameters.
"""

from __future__ import annotations

from transformers import GenerationConfig, MarianConfig, MarianMTModel
from translation_vocab import BOS_ID, EOS_ID, PAD_ID

# fairseq starts the decoder with </s>.
DECODER_START_ID = EOS_ID


def transformer_iwslt_de_en_config(
    source_vocab_size: int,
    target_vocab_size: int,
    *,
    d_model: int = 512,
    encoder_layers: int = 6,
    decoder_layers: int = 6,
    attention_heads: int = 4,
    ffn_dim: int = 1024,
    dropout: float = 0.3,
    max_positions: int = 1024,
) -> MarianConfig:
    """The Marian configuration of ``transformer_iwslt_de_en``; the defaults are fairseq's.

    Initialisation: ``init_std = d_model ** -0.5`` is fairseq's embedding standard deviation and
    matches the standard deviation of its Xavier-uniform init of the square projections.
    """
    if d_model % attention_heads:
        raise ValueError(
            f"d_model ({d_model}) must be a multiple of attention_heads ({attention_heads})"
        )
    return MarianConfig(
        vocab_size=source_vocab_size,
        decoder_vocab_size=target_vocab_size,
        share_encoder_decoder_embeddings=False,
        tie_word_embeddings=True,
        d_model=d_model,
        encoder_layers=encoder_layers,
        decoder_layers=decoder_layers,
        encoder_attention_heads=attention_heads,
        decoder_attention_heads=attention_heads,
        encoder_ffn_dim=ffn_dim,
        decoder_ffn_dim=ffn_dim,
        activation_function="relu",
        dropout=dropout,
        attention_dropout=0.0,
        activation_dropout=0.0,
        scale_embedding=True,
        max_position_embeddings=max_positions,
        init_std=d_model**-0.5,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=DECODER_START_ID,
        forced_eos_token_id=None,
    )


def translation_generation_config(num_beams: int = 5, max_length: int = 200) -> GenerationConfig:
    """Beam search as ``fairseq-generate --beam 5``: hypotheses of at most ``max_length``
    tokens (fairseq's ``max_len_b``), length penalty 1, a beam ends when ``num_beams``
    hypotheses have finished, ``<s>`` and ``<pad>`` are never generated. ``num_beams=1`` is
    greedy decoding (``fairseq-generate --beam 1``), which has no beam to stop early."""
    if num_beams < 1 or max_length < 1:
        raise ValueError(
            f"generation needs num_beams >= 1 (1: greedy) and max_length >= 1, got "
            f"num_beams={num_beams}, max_length={max_length}: change --generation_num_beams or "
            "--generation_max_length"
        )
    return GenerationConfig(
        num_beams=num_beams,
        max_length=max_length,
        length_penalty=1.0,
        early_stopping=num_beams > 1,
        suppress_tokens=[BOS_ID, PAD_ID],
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        decoder_start_token_id=DECODER_START_ID,
    )


def count_trainable_parameters(model: MarianMTModel) -> int:
    """Trainable parameters; the tied decoder/output embedding counts once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
