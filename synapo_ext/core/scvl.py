"""SCVL: sub-path contrastive value learning (docs/spec.md "SCVL").

A correct (positive) and a wrong (negative) response to one prompt share every state up to the first
token where they differ, d; the critic should rank the states right after it:

    loss = mean over pairs of max(0, margin - (V_i[d+1] - V_j[d+1]))      (i positive, j negative)

Hosts that split a group across micro-batches use the split form (`scvl_split_loss`): each side of a
pair sees its partner's rollout-time value as a constant; at the rollout-time weights its gradient
equals the joint hinge's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from ._checks import check_finite, check_ids, check_mask, check_same_shape, check_tensor
from ._hparams import check_argument, check_hparam

__all__ = [  # in the order a host uses them
    "SCVLPairs",
    "scvl_pairs",
    "scvl_group_stats",
    "scvl_pair_values",
    "scvl_loss",
    "SCVLSides",
    "scvl_sides",
    "scvl_split_loss",
    "group_codes",
]

# Compare at most this many (pair, token) entries at once when finding divergence points.
_BLOCK_ELEMENTS = 1 << 22


class SCVLPairs(NamedTuple):
    """Pairs found by `scvl_pairs`, each a LongTensor (P,): rows i (positive), j (negative) and d."""

    pos_index: torch.Tensor
    neg_index: torch.Tensor
    diverge_index: torch.Tensor


class SCVLSides(NamedTuple):
    """Both sides of every pair for the split form, (S,) = (2P,): the P positive sides, then the P negative ones.

    rows: LongTensor, the row holding the side; diverge_index: LongTensor, d of its pair; partner_values: float,
    the partner's rollout-time V[partner, d + 1]; is_positive: bool. Hosts carry these with the rows and pass
    the ones a micro-batch holds to `scvl_split_loss`.
    """

    rows: torch.Tensor
    diverge_index: torch.Tensor
    partner_values: torch.Tensor
    is_positive: torch.Tensor


def scvl_sides(pairs: SCVLPairs, pos_values: torch.Tensor, neg_values: torch.Tensor) -> SCVLSides:
    """The split form's sides of `pairs`: positive side i sees V_j_old[d+1], negative side j sees V_i_old[d+1].

    Args:
        pairs: from `scvl_pairs` (P pairs).
        pos_values, neg_values: float (P,), rollout-time V[i, d+1] and V[j, d+1] (`scvl_pair_values`).

    Returns:
        SCVLSides, each (2P,).
    """
    P = pairs.pos_index.numel()
    if pos_values.shape != (P,) or neg_values.shape != (P,):
        raise ValueError(
            f"`pos_values` and `neg_values` must have shape ({P},), got {tuple(pos_values.shape)} and "
            f"{tuple(neg_values.shape)}"
        )
    return SCVLSides(
        rows=torch.cat([pairs.pos_index, pairs.neg_index]),
        diverge_index=torch.cat([pairs.diverge_index, pairs.diverge_index]),
        partner_values=torch.cat([neg_values, pos_values]),
        is_positive=torch.arange(2 * P, device=pairs.pos_index.device) < P,
    )


def group_codes(group_ids: torch.Tensor | Sequence, batch_size: int) -> torch.Tensor:
    """Group ids (an integer tensor or a sequence of hashables, e.g. verl's uid strings) -> int64 (B,) codes
    0, 1, ... in order of first appearance.

    Raises:
        ValueError: wrong length or a missing (None) id.
    """
    if isinstance(group_ids, torch.Tensor):
        if group_ids.dim() != 1 or group_ids.is_floating_point() or group_ids.dtype == torch.bool:
            raise ValueError(
                f"`group_ids` must be a 1-D integer tensor, got {group_ids.dtype} {tuple(group_ids.shape)}"
            )
        if group_ids.numel() != batch_size:
            raise ValueError(f"`group_ids` has {group_ids.numel()} entries, expected one per response ({batch_size})")
        ids = group_ids.cpu().long()
        unique, inverse = torch.unique(ids, return_inverse=True)
        # code of a group = its rank by first appearance
        first = torch.full((unique.numel(),), batch_size, dtype=torch.long)
        first.scatter_reduce_(0, inverse, torch.arange(batch_size), reduce="amin")
        rank = torch.empty_like(first)
        rank[torch.argsort(first)] = torch.arange(unique.numel())
        return rank[inverse]
    keys = list(group_ids)
    if len(keys) != batch_size:
        raise ValueError(f"`group_ids` has {len(keys)} entries, expected one per response ({batch_size})")
    if any(key is None for key in keys):
        raise ValueError("`group_ids` has a missing (None) group id; every response needs the id of its prompt")
    first_seen: dict = {}
    return torch.tensor([first_seen.setdefault(key, len(first_seen)) for key in keys], dtype=torch.long)


def _check_scores(scores: object, batch_size: int) -> torch.Tensor:
    scores = check_tensor(scores, "scores", ndim=1)
    if scores.numel() != batch_size:
        raise ValueError(f"`scores` has {scores.numel()} entries, expected one per response ({batch_size})")
    check_finite(scores, "scores")
    return scores


def scvl_group_stats(
    scores: torch.Tensor, group_ids: torch.Tensor | Sequence, *, threshold: float = 0.5
) -> dict[str, int]:
    """Counts of groups for the metrics: all, mixed (have a pair), all-positive and all-negative."""
    scores = check_tensor(scores, "scores", ndim=1)
    check_finite(scores, "scores")
    check_hparam("scvl_threshold", threshold, "threshold")
    codes = group_codes(group_ids, scores.numel())
    n_groups = int(codes.max()) + 1 if codes.numel() else 0
    positive = (scores.cpu() >= threshold).long()
    n_pos = torch.zeros(n_groups, dtype=torch.long).index_add_(0, codes, positive)
    n_all = torch.bincount(codes, minlength=n_groups)
    return {
        "groups": n_groups,
        "groups_mixed": int(((n_pos > 0) & (n_pos < n_all)).sum()),
        "groups_all_positive": int((n_pos == n_all).sum()),
        "groups_all_negative": int((n_pos == 0).sum()),
    }


def row_lengths(mask: torch.Tensor) -> torch.Tensor:
    """A row's length is its last valid position + 1 (docs/spec.md), 0 for a row with no valid token, int64 (B,)
    (`mask`: bool (B, T))."""
    B, T = mask.shape
    if T == 0:
        return torch.zeros(B, dtype=torch.long, device=mask.device)
    flipped = mask.flip(1).view(torch.uint8)  # argmax: the first maximum, i.e. the last valid token
    return torch.where(flipped.amax(dim=1).bool(), T - flipped.argmax(dim=1), 0)


def _divergence(ids: torch.Tensor, lengths: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """d = first position where rows pos and neg differ or either has ended, int64 (P,); blocked over pairs."""
    shortest = torch.minimum(lengths[pos], lengths[neg])
    width = int(shortest.max()) if shortest.numel() else 0
    out = torch.empty_like(pos)
    block = max(1, _BLOCK_ELEMENTS // max(width, 1))
    for start in range(0, pos.numel(), block):  # blocks of pairs bound the memory, not a loop per pair
        p, n, s = pos[start : start + block], neg[start : start + block], shortest[start : start + block]
        differ = ids[p, :width] != ids[n, :width]  # (P_block, width)
        first = differ.to(torch.uint8).argmax(dim=1)
        out[start : start + block] = torch.where(differ.any(dim=1), torch.minimum(first, s), s)
    return out


def _candidate_pairs(codes: torch.Tensor, positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (i, j) with i positive and j negative in one group, LongTensors (P,), by group, then (i, j) ascending.

    Per group g with n_pos[g] positives and n_neg[g] negatives (each listed by row), the pair of rank k is
    (k // n_neg[g]-th positive, k % n_neg[g]-th negative): memory O(sum_g n_pos[g] * n_neg[g]), never O(B^2).
    """
    device = codes.device
    n_groups = int(codes.max()) + 1 if codes.numel() else 0
    pos_rows, neg_rows = positive.nonzero().squeeze(1), (~positive).nonzero().squeeze(1)
    # rows grouped by code, ascending inside a group (a stable sort keeps nonzero()'s order)
    pos_rows = pos_rows[torch.sort(codes[pos_rows], stable=True).indices]
    neg_rows = neg_rows[torch.sort(codes[neg_rows], stable=True).indices]
    n_pos = torch.bincount(codes[pos_rows], minlength=n_groups)
    n_neg = torch.bincount(codes[neg_rows], minlength=n_groups)
    n_pairs = n_pos * n_neg  # (G,)
    group = torch.repeat_interleave(torch.arange(n_groups, device=device), n_pairs)  # (P,) group of each pair
    rank = torch.arange(group.numel(), device=device) - (torch.cumsum(n_pairs, 0) - n_pairs)[group]
    width = n_neg[group]
    pos = pos_rows[(torch.cumsum(n_pos, 0) - n_pos)[group] + torch.div(rank, width, rounding_mode="floor")]
    neg = neg_rows[(torch.cumsum(n_neg, 0) - n_neg)[group] + rank % width]
    return pos, neg


def scvl_pairs(
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    scores: torch.Tensor,
    group_ids: torch.Tensor | Sequence,
    *,
    threshold: float = 0.5,
    max_pairs: int = 16,
) -> SCVLPairs:
    """Positive/negative pairs inside each group and their divergence index.

    A pair is kept only if d + 1 < both lengths (a state after the divergent token exists in both rows).
    Per group at most `max_pairs`, the largest d first, ties by (positive, negative) index.

    Args:
        response_ids: integer (B, T).
        response_mask: bool/int/float (B, T) of 0 and 1.
        scores: float (B,), the outcome score of each response.
        group_ids: (B,) integer tensor or a sequence of hashables: responses to one prompt share an id.
        threshold: positive iff score >= threshold.
        max_pairs: maximum pairs per group (>= 1).

    Returns:
        SCVLPairs(pos_index, neg_index, diverge_index), LongTensors (P,), ordered by group (first appearance),
        d descending, then positive index, then negative index.

    Raises:
        TypeError, ValueError: naming the argument.
    """
    response_ids = check_ids(response_ids, "response_ids")
    mask = check_mask(response_mask)
    check_same_shape(mask, "response_mask", response_ids.shape, "response_ids")
    lengths = row_lengths(mask)
    return pairs_from_lengths(response_ids, lengths, scores, group_ids, threshold=threshold, max_pairs=max_pairs)


def pairs_from_lengths(
    response_ids: torch.Tensor,
    lengths: torch.Tensor,
    scores: torch.Tensor,
    group_ids: torch.Tensor | Sequence,
    *,
    threshold: float,
    max_pairs: int,
    divergence: Callable[..., torch.Tensor] | None = None,
) -> SCVLPairs:
    """`scvl_pairs` given checked ids (`check_ids`) and each row's length (last valid position + 1, int64 (B,)):
    what the advantage stage calls, which has the lengths from its own pass over the mask. `divergence`: a function
    with `_divergence`'s arguments and result (the fused stage passes its compiled one), None: `_divergence`."""
    B = response_ids.shape[0]
    scores = _check_scores(scores, B)
    check_hparam("scvl_threshold", threshold, "threshold")
    check_hparam("scvl_max_pairs", max_pairs, "max_pairs")
    device = response_ids.device
    codes = group_codes(group_ids, B).to(device)

    positive = scores.to(device) >= threshold
    pos, neg = _candidate_pairs(codes, positive)
    lengths = lengths.to(device)
    d = (divergence or _divergence)(response_ids, lengths, pos, neg)
    keep = (d + 1 < lengths[pos]) & (d + 1 < lengths[neg])
    pos, neg, d = pos[keep], neg[keep], d[keep]

    # order by (group, -d, i, j): stable sorts, least significant key first
    order = torch.sort(-d, stable=True).indices
    order = order[torch.sort(codes[pos[order]], stable=True).indices]
    pos, neg, d = pos[order], neg[order], d[order]
    # rank within the group; keep the first max_pairs
    group = codes[pos]
    first_of_group = torch.searchsorted(group, group)  # group is sorted
    rank = torch.arange(group.numel(), device=device) - first_of_group
    keep = rank < max_pairs
    return SCVLPairs(pos[keep], neg[keep], d[keep])


def _pair_values(values: torch.Tensor, rows: torch.Tensor, diverge_index: torch.Tensor) -> torch.Tensor:
    """V[row, d + 1], (P,)."""
    return values[rows, diverge_index + 1]


def _check_index(index: object, name: str) -> torch.Tensor:
    index = check_tensor(index, name, ndim=1)
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise TypeError(f"`{name}` must be an integer tensor, got {index.dtype}")
    return index


def _checked_pair_values(values: torch.Tensor, rows: object, diverge_index: object, rows_name: str) -> torch.Tensor:
    """`_pair_values` with `rows` in [0, B) and `diverge_index` + 1 in [0, T) checked first (one read of 4 numbers:
    a bad index would be a bare IndexError, or a device-side assert on a GPU), and the values used finite."""
    rows, diverge_index = _check_index(rows, rows_name), _check_index(diverge_index, "diverge_index")
    if rows.shape != diverge_index.shape:
        raise ValueError(f"`{rows_name}` has shape {tuple(rows.shape)}, `diverge_index` {tuple(diverge_index.shape)}")
    if rows.numel():
        bounds = torch.stack([rows.min(), rows.max(), diverge_index.min(), diverge_index.max()]).tolist()
        for (low, high), name, size, offset in (
            (bounds[:2], rows_name, values.shape[0], 0),
            (bounds[2:], "diverge_index", values.shape[1], 1),
        ):
            if low + offset < 0 or high + offset >= size:
                shown = f"`{name}` + {offset}" if offset else f"`{name}`"
                raise ValueError(f"{shown} holds entries in [{low + offset}, {high + offset}], outside [0, {size})")
    picked = _pair_values(values, rows, diverge_index)
    check_finite(picked, "values")
    return picked


def scvl_pair_values(values: torch.Tensor, pairs: SCVLPairs) -> tuple[torch.Tensor, torch.Tensor]:
    """Rollout-time V[i, d+1] and V[j, d+1] of each pair, (P,) each, detached: the partner values of the split form.

    V(s_d) is shared by both rows of a pair, so SCVL compares the states after the divergent token.
    """
    after = pairs.diverge_index + 1
    return values[pairs.pos_index, after].detach(), values[pairs.neg_index, after].detach()


def scvl_loss(
    values: torch.Tensor,
    pos_index: torch.Tensor,
    neg_index: torch.Tensor,
    diverge_index: torch.Tensor,
    *,
    margin: float,
) -> torch.Tensor:
    """mean over pairs of max(0, margin - (V[i, d+1] - V[j, d+1])); 0 (with a zero gradient) without pairs.

    Args:
        values: float (B, T), the critic's values (the local head with HVM on).
        pos_index, neg_index, diverge_index: LongTensors (P,) from `scvl_pairs`.
        margin: hinge margin.

    Returns:
        A scalar tensor.

    Raises:
        TypeError, ValueError: naming the argument: a bad margin (the rule of `scvl_margin`), an index outside
            `values`, NaN/inf among the values the pairs compare.
    """
    values = check_tensor(values, "values", ndim=2)
    check_hparam("scvl_margin", margin, "margin")
    pos = _checked_pair_values(values, pos_index, diverge_index, "pos_index")
    neg = _checked_pair_values(values, neg_index, diverge_index, "neg_index")
    hinge = torch.relu(margin - (pos - neg))
    return hinge.sum() / max(hinge.numel(), 1)


def scvl_split_loss(
    values: torch.Tensor,
    rows: torch.Tensor,
    diverge_index: torch.Tensor,
    partner_values: torch.Tensor,
    is_positive: torch.Tensor,
    *,
    margin: float,
    num_pairs: float,
) -> torch.Tensor:
    """SCVL's split form: each side of a pair with its partner's rollout-time value held constant.

        positive side: max(0, margin - (V_i[d+1] - V_j_old[d+1])) / P
        negative side: max(0, margin - (V_i_old[d+1] - V_j[d+1])) / P

    Args:
        values: float (B, T), current values of the rows in this micro-batch.
        rows: LongTensor (S,), the row of each pair side in `values`.
        diverge_index: LongTensor (S,), d of the pair.
        partner_values: float (S,), the partner's rollout-time V[partner, d+1].
        is_positive: bool (S,), whether this side is the positive one.
        margin: hinge margin.
        num_pairs: P, the number of pairs in the whole batch (so sides summed over micro-batches give the mean);
            any positive normaliser (e.g. this process's share of P) works the same way.

    Returns:
        A scalar tensor: the sum over the sides given, divided by `num_pairs` (0 without sides).

    Raises:
        TypeError, ValueError: naming the argument: a bad margin (the rule of `scvl_margin`) or `num_pairs` (< 0), an
            index outside `values`, NaN/inf among the values compared.
    """
    values = check_tensor(values, "values", ndim=2)
    check_hparam("scvl_margin", margin, "margin")
    num_pairs = check_argument("num_pairs", num_pairs)
    own = _checked_pair_values(values, rows, diverge_index, "rows")
    partner_values = check_tensor(partner_values, "partner_values", ndim=1)
    check_same_shape(partner_values, "partner_values", own.shape, "rows")
    check_finite(partner_values, "partner_values")
    partner = partner_values.to(own.dtype)
    gap = torch.where(is_positive, own - partner, partner - own)  # V_pos - V_neg
    return torch.relu(margin - gap).sum() / (num_pairs if num_pairs > 0 else 1.0)
