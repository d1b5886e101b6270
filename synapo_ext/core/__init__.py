"""synapo_ext.core: SynAPO's math as plain torch functions (no verl, no TRL).

SPEC: ../shared/SPEC.md ; decisions on top of it: docs/core_api.md.
"""

from .config import PRESETS, SynAPOParams, params_from_preset
from .ea_gae import EA_GAE_EPS, ea_gae_lambda
from .gae import compute_gae, masked_whiten
from .hvm import HVMResult, hvm_advantages
from .losses import hvm_critic_loss, value_loss
from .scan import reverse_linear_scan
from .scvl import SCVLPairs, scvl_group_stats, scvl_loss, scvl_pair_values, scvl_pairs, scvl_split_loss
from .segments import boundary_table_from_tokenizer, segment_ids
from .stage import SynAPOAdvantages, actor_lambda, compute_synapo_advantages

__all__ = [
    "EA_GAE_EPS",
    "PRESETS",
    "HVMResult",
    "SCVLPairs",
    "SynAPOAdvantages",
    "SynAPOParams",
    "actor_lambda",
    "boundary_table_from_tokenizer",
    "compute_gae",
    "compute_synapo_advantages",
    "ea_gae_lambda",
    "hvm_advantages",
    "hvm_critic_loss",
    "masked_whiten",
    "params_from_preset",
    "reverse_linear_scan",
    "scvl_group_stats",
    "scvl_loss",
    "scvl_pair_values",
    "scvl_pairs",
    "scvl_split_loss",
    "segment_ids",
    "value_loss",
]
