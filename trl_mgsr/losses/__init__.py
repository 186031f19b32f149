"""MGSR loss terms. Each term function returns a `LossTerm` of sums; the trainer normalises them."""

from .dac_kl import (DIVERGENCES, DACBandNet, DACKLSettings, band_features, band_label_loss, chunked_dac_kl_loss,
                     dac_kl_loss)
from .span import SPAN_DISTANCES, SPAN_OBJECTIVES, chunked_span_loss, span_loglik_loss, span_loss
from .terms import IGNORE_INDEX, LossTerm, chunked_sft_loss, chunked_token_logprobs, sft_loss

__all__ = [
    "DACBandNet",
    "DACKLSettings",
    "DIVERGENCES",
    "band_features",
    "band_label_loss",
    "IGNORE_INDEX",
    "LossTerm",
    "SPAN_DISTANCES",
    "SPAN_OBJECTIVES",
    "chunked_dac_kl_loss",
    "chunked_sft_loss",
    "chunked_span_loss",
    "chunked_token_logprobs",
    "dac_kl_loss",
    "sft_loss",
    "span_loglik_loss",
    "span_loss",
]
