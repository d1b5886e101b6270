"""synapo_ext.core: SynAPO's math as plain torch functions (no verl, no TRL).

The math: docs/spec.md ; the API contract: docs/core_api.md.
"""

from .config import PRESETS, SynAPOParams, params_from_preset
from .ea_gae import EA_GAE_EPS, ea_gae_lambda
from .gae import compute_gae, masked_whiten
from .hvm import HVMResult, hvm_advantages
from .losses import (
    CriticObjective,
    critic_objective,
    hvm_critic_loss,
    positive_lm_loss,
    positive_lm_weights,
    value_loss,
)
from .metrics import METRICS, MetricNames, explained_variance
from .scan import reverse_linear_scan
from .scvl import (
    SCVLPairs,
    SCVLSides,
    scvl_group_stats,
    scvl_loss,
    scvl_pair_values,
    scvl_pairs,
    scvl_sides,
    scvl_split_loss,
)
from .segments import boundary_table_from_tokenizer, segment_ids
from .stage import SynAPOAdvantages, actor_lambda, compute_synapo_advantages
from .tree import TreeAdvantages, compute_tree_advantages, tree_local_advantages, tree_node_values, tree_token_values

__all__ = [
    "CriticObjective",
    "EA_GAE_EPS",
    "METRICS",
    "PRESETS",
    "HVMResult",
    "MetricNames",
    "SCVLPairs",
    "SCVLSides",
    "SynAPOAdvantages",
    "SynAPOParams",
    "TreeAdvantages",
    "actor_lambda",
    "boundary_table_from_tokenizer",
    "compute_gae",
    "compute_synapo_advantages",
    "compute_tree_advantages",
    "critic_objective",
    "ea_gae_lambda",
    "explained_variance",
    "hvm_advantages",
    "hvm_critic_loss",
    "masked_whiten",
    "params_from_preset",
    "positive_lm_loss",
    "positive_lm_weights",
    "reverse_linear_scan",
    "scvl_group_stats",
    "scvl_loss",
    "scvl_pair_values",
    "scvl_pairs",
    "scvl_sides",
    "scvl_split_loss",
    "segment_ids",
    "tree_local_advantages",
    "tree_node_values",
    "tree_token_values",
    "value_loss",
]
