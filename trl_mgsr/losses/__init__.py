"""MGSR loss terms. Each term function returns a `LossTerm` of sums; the trainer normalises them."""

from .terms import LossTerm, sft_loss

__all__ = ["LossTerm", "sft_loss"]
