"""MGSR loss terms. Each term function returns a `LossTerm` of sums; the trainer normalises them."""

from .dac_kl import DACBandNet, chunked_dac_kl_loss, dac_kl_loss
from .span import SPAN_DISTANCES, chunked_span_loss, span_loss
from .terms import IGNORE_INDEX, LossTerm, chunked_sft_loss, sft_loss

__all__ = [
    "DACBandNet",
    "IGNORE_INDEX",
    "LossTerm",
    "SPAN_DISTANCES",
    "chunked_dac_kl_loss",
    "chunked_sft_loss",
    "chunked_span_loss",
    "dac_kl_loss",
    "sft_loss",
    "span_loss",
]
