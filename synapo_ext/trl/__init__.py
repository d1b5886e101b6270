"""SynAPO for TRL: `SynAPOConfig` + `SynAPOTrainer` on TRL's GRPO pipeline (TRL 1.16)."""

from .config import SynAPOConfig
from .trainer import SynAPOTrainer

__all__ = ["SynAPOConfig", "SynAPOTrainer"]
