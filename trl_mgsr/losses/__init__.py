"""MGSR loss terms. Each term function returns a `LossTerm` of sums; the trainer normalises them."""

from .dac_kl import DACBandNet, chunked_dac_kl_loss, dac_kl_loss
from .terms import LossTerm, sft_loss

__all__ = ["DACBandNet", "LossTerm", "chunked_dac_kl_loss", "dac_kl_loss", "sft_loss"]
