"""MGSR loss terms. Each term function returns a `LossTerm` of sums; the trainer normalises them."""

from .span import SPAN_DISTANCES, chunked_span_loss, span_loss
from .terms import LossTerm, sft_loss

__all__ = ["LossTerm", "SPAN_DISTANCES", "chunked_span_loss", "sft_loss", "span_loss"]
