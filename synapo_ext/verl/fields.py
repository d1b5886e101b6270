"""The per-row fields a `synapo` step writes to TransferQueue for the critic and the actor, and how they are read.

    values_global          (bs, response_length)  rollout-time global-head values (the critic's own field,
                                                  rewritten response-only in its stored dtype, as verl does `values`)
    synapo_global_returns  (bs, response_length)  the global head's target                   (HVM)
    synapo_start_mask      (bs, response_length)  1 at each segment's first token            (HVM)
    synapo_scvl_diverge    (bs, K) long           d of each pair side of this row, -1: none  (SCVL)
    synapo_scvl_partner    (bs, K)                the partner's rollout-time V[d + 1]        (SCVL)
    synapo_scvl_sign       (bs, K)                +1 positive side, -1 negative side, 0 none (SCVL)
    synapo_lm_weight       (bs,)                  positive-example LM weight of the row      (positive-example LM)

Per-token fields travel nested (one row per sample, its own length), as verl's own. TransferQueue may also hand
(bs, K) row fields over as jagged nested tensors; `dense_rows` reads both layouts.
"""

from __future__ import annotations

import torch

GLOBAL_VALUES = "values_global"
GLOBAL_RETURNS = "synapo_global_returns"
START_MASK = "synapo_start_mask"
SCVL_DIVERGE = "synapo_scvl_diverge"
SCVL_PARTNER = "synapo_scvl_partner"
SCVL_SIGN = "synapo_scvl_sign"
LM_WEIGHT = "synapo_lm_weight"

TOKEN_FIELDS = (GLOBAL_VALUES, GLOBAL_RETURNS, START_MASK)
HVM_FIELDS = (GLOBAL_RETURNS, START_MASK)
SCVL_FIELDS = (SCVL_SIGN, SCVL_DIVERGE, SCVL_PARTNER)
PAD = {SCVL_DIVERGE: -1}


def dense_rows(t: torch.Tensor, name: str = "") -> torch.Tensor:
    """A row field as a dense tensor: a jagged nested (bs, K) / (bs,) tensor is padded (-1 for ids, else 0)."""
    if not t.is_nested:
        return t
    return t.to_padded_tensor(PAD.get(name, 0))
