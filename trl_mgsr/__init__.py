"""trl_mgsr: Multi-Granularity Semantic Revision (MGSR) knowledge distillation as a drop-in TRL trainer."""

from ._trl import SUPPORTED_TRL
from .config import MGSRConfig

__version__ = "0.1.0.dev0"

__all__ = ["MGSRConfig", "SUPPORTED_TRL", "__version__"]
