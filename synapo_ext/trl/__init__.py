"""SynAPO for TRL: `SynAPOConfig` + `SynAPOTrainer` on TRL's GRPO pipeline (TRL >=1.16,<1.17, checked on import)."""

from ._compat import check_trl_version

check_trl_version()  # before anything subclasses TRL's private methods

from .config import SynAPOConfig  # noqa: E402
from .trainer import SynAPOTrainer  # noqa: E402

__all__ = ["SynAPOConfig", "SynAPOTrainer"]
