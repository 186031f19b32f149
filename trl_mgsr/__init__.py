"""trl_mgsr: Multi-Granularity Semantic Revision (MGSR) knowledge distillation as a drop-in TRL trainer."""

from ._trl import SUPPORTED_TRL
from ._version import __version__
from .config import MGSRConfig
from .data import MGSRDataCollator
from .losses import LossTerm, sft_loss
from .trainer import MGSRTrainer

__all__ = ["LossTerm", "MGSRConfig", "MGSRDataCollator", "MGSRTrainer", "SUPPORTED_TRL", "__version__", "sft_loss"]
