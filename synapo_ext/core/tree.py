"""Segment-tree rollouts: Monte-Carlo values and advantages from a tree of responses (docs/spec.md "Tree rollouts").

Each prompt's responses are the leaves of a tree that branches at segment boundaries: leaves below one node share
its tokens (the prefix up to the branch token) exactly. With level 0 the prompt (the root) and n(t) the node whose
tokens hold token t (one row's ancestors at levels 1..L-1, its own leaf last):

    V(n)       = mean outcome score of the leaves below n                  (SPO-tree's and TreeRL's node value)
    A_tree[t]  = V(n(t)) - V(parent(n(t)))                                  (SPO's segment advantage)
    W[t]       = V(parent(n(t))) at the first token of n(t), else V(n(t))   (the tree's value of the state s_t)

Along a row the A_tree of its nodes add up to score - V(root): GRPO's (unscaled) advantage, split over the segments
of the tree. Optionally the critic's local head adds the GAE inside each segment, bootstrapped at the segment's end
by the tree's value of the next state (HVM's local level with g_k = W[s_k]); the global head's target is W[s_k].
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._checks import check_finite, check_mask, check_same_shape, check_tensor, float_dtype
from .hvm import hvm_advantages

__all__ = [
    "TreeAdvantages",
    "compute_tree_advantages",
    "tree_local_advantages",
    "tree_node_values",
    "tree_token_values",
]


class TreeAdvantages(NamedTuple):
    """Outputs of `compute_tree_advantages`; (B, T) unless said.

    advantages: A_tree + local_weight * A_local (not whitened).
    tree_advantages: A_tree[t] = V(n(t)) - V(parent(n(t))).
    state_values: W[t], the tree's Monte-Carlo value of the state before token t.
    node_values: (B, L), V of row b's ancestor at level l (level 0: the root).
    local_returns: the local (or single) critic head's target (None without `local_values`).
    global_returns: the global head's target W[s_k] of the segment holding t (None without `local_values`).
    start_mask: bool, the first token of each segment (segments cut at every node start too).
    """

    advantages: torch.Tensor
    tree_advantages: torch.Tensor
    state_values: torch.Tensor
    node_values: torch.Tensor
    local_returns: torch.Tensor | None
    global_returns: torch.Tensor | None
    start_mask: torch.Tensor


def _check_paths(tree_paths: object, batch_size: int) -> torch.Tensor:
    tree_paths = check_tensor(tree_paths, "tree_paths", ndim=2)
    if tree_paths.is_floating_point() or tree_paths.dtype == torch.bool:
        raise TypeError(f"`tree_paths` must be an integer tensor of node ids, got {tree_paths.dtype}")
    if tree_paths.shape[0] != batch_size:
        raise ValueError(f"`tree_paths` has {tree_paths.shape[0]} rows but `scores` has {batch_size}")
    if tree_paths.shape[1] < 2:
        raise ValueError(
            f"`tree_paths` needs a root and at least one level below it, got shape {tuple(tree_paths.shape)}"
        )
    return tree_paths.long()


def _node_keys(tree_paths: torch.Tensor) -> torch.Tensor:
    """int64 (B, L): one key per distinct (level, ancestors' ids) node, so ids need only be unique per parent."""
    B, L = tree_paths.shape
    if B == 0:
        return tree_paths.new_zeros((0, L))
    keys = torch.empty_like(tree_paths)
    keys[:, 0] = torch.unique(tree_paths[:, 0], return_inverse=True)[1]
    for level in range(1, L):  # L is the tree's depth, a few levels: no loop over rows or tokens
        pairs = torch.stack([keys[:, level - 1], tree_paths[:, level]], dim=1)
        keys[:, level] = torch.unique(pairs, dim=0, return_inverse=True)[1] + keys[:, level - 1].max() + 1
    return keys


def tree_node_values(
    scores: torch.Tensor, tree_paths: torch.Tensor, leaf_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """V(n) = the mean score of the leaves below n, for every row's ancestors.

    Args:
        scores: float (B,), each leaf's outcome score (finite).
        tree_paths: integer (B, L), row b's node id at level l: column 0 the root (the prompt: one id per prompt
            group), the last column the leaf. A node is its id under its parent (ids may repeat elsewhere).
        leaf_mask: bool (B,), the leaves that count (default: all). A node with no counted leaf below it has value 0.

    Returns:
        float (B, L): V of row b's ancestor at level l (float64 for float64 scores, else float32).

    Raises:
        TypeError, ValueError: naming the argument.
    """
    scores = check_tensor(scores, "scores", ndim=1)
    check_finite(scores, "scores")
    B = scores.shape[0]
    tree_paths = _check_paths(tree_paths, B)
    if leaf_mask is None:
        leaf_mask = torch.ones(B, dtype=torch.bool, device=scores.device)
    leaf_mask = check_tensor(leaf_mask, "leaf_mask", ndim=1)
    check_same_shape(leaf_mask, "leaf_mask", scores.shape, "scores")
    leaf_mask = leaf_mask.bool()
    dtype = float_dtype(scores)
    keys = _node_keys(tree_paths.to(scores.device))  # (B, L)
    num_nodes = int(keys.max()) + 1 if B else 0
    weight = leaf_mask.to(torch.float64)
    # sums and counts per node in float64 (a node averages up to B leaves)
    flat = keys.reshape(-1)
    sums = torch.zeros(num_nodes, dtype=torch.float64, device=scores.device)
    counts = torch.zeros(num_nodes, dtype=torch.float64, device=scores.device)
    L = keys.shape[1]
    sums.index_add_(0, flat, (scores.double() * weight).repeat_interleave(L))
    counts.index_add_(0, flat, weight.repeat_interleave(L))
    values = torch.where(counts > 0, sums / counts.clamp(min=1.0), 0.0)
    return values[keys].to(dtype)


def _check_levels(token_levels: object, mask: torch.Tensor, num_levels: int) -> torch.Tensor:
    token_levels = check_tensor(token_levels, "token_levels", ndim=2)
    check_same_shape(token_levels, "token_levels", mask.shape, "response_mask")
    if token_levels.is_floating_point() or token_levels.dtype == torch.bool:
        raise TypeError(f"`token_levels` must be an integer tensor, got {token_levels.dtype}")
    levels = torch.where(mask, token_levels.long(), 1)
    if levels.numel() and (int(levels.min()) < 1 or int(levels.max()) > num_levels - 1):
        raise ValueError(
            f"`token_levels` must lie in [1, {num_levels - 1}] at valid tokens (level 0 is the root, which holds no "
            f"token; `tree_paths` has {num_levels} levels), got values in [{int(levels.min())}, {int(levels.max())}]"
        )
    running = torch.where(mask, levels, 0).cummax(dim=1).values
    if bool((mask & (levels != running)).any()):
        raise ValueError(
            "`token_levels` must be nondecreasing over each row's valid tokens (a row walks down its path)"
        )
    return levels


def tree_token_values(
    node_values: torch.Tensor, token_levels: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token tree values: (A_tree, W, node_start).

    Args:
        node_values: float (B, L) from `tree_node_values`.
        token_levels: integer (B, T), the level (1..L-1) of the node holding token t, nondecreasing over valid tokens.
        response_mask: 0/1 (B, T); interior zeros are skipped.

    Returns:
        A_tree (B, T) = V(n(t)) - V(parent(n(t))); W (B, T) = V(parent(n(t))) at a node's first valid token, else
        V(n(t)); node_start bool (B, T), True at each node's first valid token. 0 / False at masked positions.
    """
    node_values = check_tensor(node_values, "node_values", ndim=2)
    mask = check_mask(response_mask, allow_empty_rows=True)
    if node_values.shape[0] != mask.shape[0]:
        raise ValueError(f"`node_values` has {node_values.shape[0]} rows but `response_mask` has {mask.shape[0]}")
    levels = _check_levels(token_levels, mask, node_values.shape[1])
    own = node_values.gather(1, levels)  # V(n(t))
    parent = node_values.gather(1, levels - 1)  # V(parent(n(t)))
    # the previous valid token's level (0 before the first): levels are nondecreasing, so a running max
    running = torch.where(mask, levels, 0).cummax(dim=1).values
    previous = torch.cat([running.new_zeros(mask.shape[0], 1), running[:, :-1]], dim=1)
    node_start = mask & (levels > previous)
    zero = torch.zeros((), dtype=own.dtype, device=own.device)
    advantages = torch.where(mask, own - parent, zero)
    state_values = torch.where(node_start, parent, torch.where(mask, own, zero))
    return advantages, state_values, node_start


def _segment_starts(seg_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """bool (B, T): valid tokens whose segment id differs from the previous valid token's (and each first one)."""
    if seg_ids.is_floating_point() or seg_ids.dtype == torch.bool:
        raise TypeError(f"`seg_ids` must be an integer tensor, got {seg_ids.dtype}")
    seg = seg_ids.long()
    low = torch.iinfo(torch.int64).min
    running = torch.where(mask, seg, low).cummax(dim=1).values
    previous = torch.cat([running.new_full((mask.shape[0], 1), low), running[:, :-1]], dim=1)
    return mask & (seg != previous)


def tree_local_advantages(
    scores: torch.Tensor,
    local_values: torch.Tensor,
    state_values: torch.Tensor,
    response_mask: torch.Tensor,
    node_start: torch.Tensor,
    *,
    seg_ids: torch.Tensor | None = None,
    lam: float | torch.Tensor = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The critic's GAE inside each segment, bootstrapped by the tree (HVM's local level with g_k = W[s_k]).

    Segments are `seg_ids`' (HVM's), also cut at every node start (None: one segment per node). With r the score on
    the row's last valid token and gamma = 1: deltaL_t = r_t + V_loc[t+1] - V_loc[t], except at a segment's last
    token e_k: r_t + W[s_(k+1)] - V_loc[t] (W[s_K] = 0); AL_t = deltaL_t + lambda_t * AL_(t+1), restarting after e_k.

    Args:
        scores: float (B,). local_values: float (B, T), V_loc(s_t) (or the single head). state_values: W (B, T).
        response_mask: 0/1 (B, T), every row with a valid token. node_start: bool (B, T) from `tree_token_values`.
        seg_ids: integer (B, T), nondecreasing over valid tokens, or None. lam: float or (B, T) in [0, 1].

    Returns:
        (AL, local targets, global targets W[s_k(t)], segment starts), each (B, T).
    """
    mask = check_mask(response_mask)
    scores = check_tensor(scores, "scores", ndim=1)
    check_finite(scores, "scores")
    node_start = check_tensor(node_start, "node_start", ndim=2).bool()
    check_same_shape(node_start, "node_start", mask.shape, "response_mask")
    starts = node_start & mask
    if seg_ids is not None:
        seg_ids = check_tensor(seg_ids, "seg_ids", ndim=2)
        check_same_shape(seg_ids, "seg_ids", mask.shape, "response_mask")
        starts = starts | _segment_starts(seg_ids, mask)
    segments = torch.cumsum(starts.long(), dim=1)  # nondecreasing over valid tokens, a new id at every start
    B, T = mask.shape
    dtype = float_dtype(scores, local_values, state_values)
    last = T - 1 - torch.flip(mask, dims=[1]).long().argmax(dim=1)
    rewards = torch.zeros(B, T, dtype=dtype, device=mask.device)
    rewards[torch.arange(B, device=mask.device), last] = scores.to(dtype)
    hvm = hvm_advantages(
        rewards, local_values, state_values, mask, segments, gamma=1.0, lam=lam, global_lam=0.0, global_weight=0.0
    )
    # W at each segment's first token, for every token of the segment
    position = torch.arange(T, device=mask.device).expand(B, T)
    segment_start = torch.where(hvm.start_mask, position, 0).cummax(dim=1).values
    global_returns = torch.where(mask, state_values.to(dtype).gather(1, segment_start), 0.0)
    return hvm.advantages, hvm.local_returns, global_returns, hvm.start_mask


def compute_tree_advantages(
    scores: torch.Tensor,
    tree_paths: torch.Tensor,
    token_levels: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    local_values: torch.Tensor | None = None,
    seg_ids: torch.Tensor | None = None,
    lam: float | torch.Tensor = 1.0,
    local_weight: float = 1.0,
) -> TreeAdvantages:
    """Tree values, advantages and critic targets for a batch of tree leaves (docs/spec.md "Tree rollouts").

    Rows with no valid token are not leaves of their tree (they count in no node value) and get zeros.

    Args:
        scores: float (B,), each leaf's outcome score.
        tree_paths: integer (B, L), see `tree_node_values`.
        token_levels: integer (B, T), see `tree_token_values`.
        response_mask: 0/1 (B, T).
        local_values: float (B, T), the critic's local head (or single head); None: tree advantages only.
        seg_ids: integer (B, T), HVM's segment ids (None: one segment per node).
        lam: the local GAE's lambda, a float or (B, T) (EA-GAE).
        local_weight: weight of the local GAE in the advantages (finite, >= 0).

    Returns:
        TreeAdvantages.

    Raises:
        TypeError, ValueError: naming the argument.
    """
    mask = check_mask(response_mask, allow_empty_rows=True)
    if isinstance(local_weight, bool) or not isinstance(local_weight, (int, float)):
        raise TypeError(f"`local_weight` must be a float, got {type(local_weight).__name__}")
    if not (local_weight >= 0 and local_weight < float("inf")):
        raise ValueError(f"`local_weight` must be finite and >= 0, got {local_weight}")
    rows = mask.any(dim=1)
    node_values = tree_node_values(scores, tree_paths, rows)
    tree_adv, state_values, node_start = tree_token_values(node_values, token_levels, mask)
    if local_values is None:
        return TreeAdvantages(tree_adv, tree_adv, state_values, node_values, None, None, node_start)
    local_values = check_tensor(local_values, "local_values", ndim=2)
    check_same_shape(local_values, "local_values", mask.shape, "response_mask")
    dtype = float_dtype(scores, local_values)
    local_adv = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    local_returns, global_returns = torch.zeros_like(local_adv), torch.zeros_like(local_adv)
    start_mask = torch.zeros_like(mask)
    if bool(rows.any()):
        keep = rows.nonzero().squeeze(1)
        take = lambda x: None if x is None else x[keep]  # noqa: E731
        lam_rows = take(lam) if isinstance(lam, torch.Tensor) else lam
        out = tree_local_advantages(
            scores[keep],
            local_values[keep],
            state_values[keep],
            mask[keep],
            node_start[keep],
            seg_ids=take(seg_ids),
            lam=lam_rows,
        )
        for full, part in zip((local_adv, local_returns, global_returns, start_mask), out, strict=True):
            full[keep] = part.to(full.dtype)
    advantages = tree_adv.to(dtype) + local_weight * local_adv
    return TreeAdvantages(advantages, tree_adv, state_values, node_values, local_returns, global_returns, start_mask)
