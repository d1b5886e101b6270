"""Float64 plain-loop reference for `synapo_ext.core`, written from docs/spec.md and docs/core_api.md.

This is the oracle the tests trust, so it is written for reading, not speed:
- every number is a Python float (IEEE float64); torch is used only to read inputs and hand results back;
- every recursion is a plain loop over tokens in the order the formula is written;
- interior zeros of `response_mask` are handled literally as SPEC says: the valid tokens of a row are cut out
  (`cut`), the formula runs on that compact row, and the results are put back in place (`put_back`).
  Masked output positions are 0.0 (SPEC: they may hold anything and are never compared).

Nothing here imports `synapo_ext`: it is an independent derivation, never a copy of the vectorised code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

EA_GAE_EPS = 1e-6  # docs/core_api.md: floor of (1 + beta * H)
WHITEN_EPS = 1e-8  # verl masked_whiten: (A - mean) * rsqrt(var + 1e-8)


# ---------------------------------------------------------------------------------------------------------------
# Cut out / put back
# ---------------------------------------------------------------------------------------------------------------


def _rows(x: torch.Tensor) -> list[list]:
    """(B, T) tensor -> list of Python rows (floats for float tensors, ints for integer/bool tensors)."""
    if x.dtype.is_floating_point:
        return x.detach().to(torch.float64).tolist()
    return x.detach().to(torch.int64).tolist()


def valid_positions(mask_row: Sequence) -> list[int]:
    """Positions t of one row where response_mask is 1."""
    return [t for t, m in enumerate(mask_row) if m == 1]


def cut(row: Sequence, positions: list[int]) -> list:
    """The compact row: only the entries at the valid positions, in order."""
    return [row[t] for t in positions]


def put_back(compact: Sequence, positions: list[int], T: int, fill=0.0) -> list:
    """Inverse of `cut`: a length-T row with `compact` at the valid positions and `fill` elsewhere."""
    row = [fill] * T
    for value, t in zip(compact, positions, strict=True):
        row[t] = value
    return row


def _lam_rows(lam, B: int, T: int) -> list[list[float]]:
    if isinstance(lam, torch.Tensor):
        return _rows(lam)
    return [[float(lam)] * T for _ in range(B)]


# ---------------------------------------------------------------------------------------------------------------
# EA-GAE lambda
# ---------------------------------------------------------------------------------------------------------------


def ref_ea_gae_lambda(response_mask, entropy=None, *, alpha, beta=0.0, lambda_min=0.0, lambda_max=1.0):
    """lambda[b,t] = clip(1 - 1 / (alpha * l_b * max(1 + beta * H[b,t], 1e-6)), lambda_min, lambda_max).

    l_b = number of valid tokens of row b; entropy None means H = 0 (VAPO's length-adaptive lambda).
    """
    mask = _rows(response_mask)
    B, T = len(mask), len(mask[0])
    H = _rows(entropy) if entropy is not None else [[0.0] * T for _ in range(B)]
    out = []
    for b in range(B):
        positions = valid_positions(mask[b])
        l_b = len(positions)
        compact = []
        for h in cut(H[b], positions):
            x = alpha * l_b * max(1.0 + beta * h, EA_GAE_EPS)
            raw = 1.0 - 1.0 / x
            compact.append(min(max(raw, lambda_min), lambda_max))
        out.append(put_back(compact, positions, T))
    return torch.tensor(out, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------------------------


def gae_compact(r: list[float], v: list[float], gamma: float, lam: list[float], bootstrap: float = 0.0):
    """GAE on one compact row (valid tokens only), backwards in time.

    delta_t = r_t + gamma * V_next - V_t, V_next = V_{t+1}, or `bootstrap` after the last token;
    A_t = delta_t + gamma * lam_t * A_{t+1}, A after the last token = 0.
    """
    n = len(r)
    advantages = [0.0] * n
    next_value, next_advantage = bootstrap, 0.0
    for t in reversed(range(n)):
        delta = r[t] + gamma * next_value - v[t]
        advantages[t] = delta + gamma * lam[t] * next_advantage
        next_value, next_advantage = v[t], advantages[t]
    return advantages


def ref_masked_whiten(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """verl's masked_whiten: (A - mean) / sqrt(var + 1e-8), mean and Bessel-corrected variance over the batch's valid
    tokens."""
    A, mask = _rows(advantages), _rows(response_mask)
    valid = [A[b][t] for b in range(len(A)) for t in valid_positions(mask[b])]
    N = len(valid)
    mean = sum(valid) / N
    var = sum((a - mean) ** 2 for a in valid) / (N - 1)
    scale = 1.0 / math.sqrt(var + WHITEN_EPS)
    out = [[(a - mean) * scale if m == 1 else 0.0 for a, m in zip(A[b], mask[b], strict=True)] for b in range(len(A))]
    return torch.tensor(out, dtype=torch.float64)


def ref_batch_std(advantages: torch.Tensor, response_mask: torch.Tensor) -> float:
    """sqrt(var + 1e-8) of `ref_masked_whiten` (tests use it to scale the float32 tolerance)."""
    A, mask = _rows(advantages), _rows(response_mask)
    valid = [A[b][t] for b in range(len(A)) for t in valid_positions(mask[b])]
    mean = sum(valid) / len(valid)
    return math.sqrt(sum((a - mean) ** 2 for a in valid) / (len(valid) - 1) + WHITEN_EPS)


def ref_compute_gae(rewards, values, response_mask, *, gamma, lam, whiten=False):
    """SPEC compute_gae: returns (advantages, returns), both float64 (B, T); returns = A + V before whitening."""
    r_rows, v_rows, mask = _rows(rewards), _rows(values), _rows(response_mask)
    B, T = len(mask), len(mask[0])
    lam_rows = _lam_rows(lam, B, T)
    advantages, returns = [], []
    for b in range(B):
        positions = valid_positions(mask[b])
        r, v, lam_b = cut(r_rows[b], positions), cut(v_rows[b], positions), cut(lam_rows[b], positions)
        A = gae_compact(r, v, gamma, lam_b)
        G = [a + x for a, x in zip(A, v, strict=True)]
        advantages.append(put_back(A, positions, T))
        returns.append(put_back(G, positions, T))
    advantages = torch.tensor(advantages, dtype=torch.float64)
    returns = torch.tensor(returns, dtype=torch.float64)
    if whiten:
        advantages = ref_masked_whiten(advantages, response_mask)
    return advantages, returns


# ---------------------------------------------------------------------------------------------------------------
# Segments
# ---------------------------------------------------------------------------------------------------------------


def segment_ends(ids: list[int], table: list[bool], *, min_len=1, max_len=None, fallback_len=None) -> list[int]:
    """Last (compact) index of each segment of one compact row, following docs/core_api.md steps 1-4."""
    n = len(ids)
    # 1. Raw boundaries: a delimiter token closes its segment.
    ends = [i for i in range(n) if table[ids[i]]]
    # 2. Fallback: no delimiter at all -> chunks of fallback_len tokens (None: one segment).
    if not ends and fallback_len is not None:
        ends = list(range(fallback_len - 1, n, fallback_len))
    # ... and the row's last valid token always closes the last segment.
    if not ends or ends[-1] != n - 1:
        ends.append(n - 1)
    # 3. min_len, greedy left to right: a boundary closes a segment only if it has >= min_len tokens.
    merged, start = [], 0
    for e in ends:
        if e - start + 1 >= min_len:
            merged.append(e)
            start = e + 1
    if start < n:  # the final segment is shorter than min_len
        if merged:
            merged[-1] = n - 1  # merge it into the one before
        else:
            merged.append(n - 1)  # nothing before it: the row is one segment
    # 4. max_len: cut longer segments into pieces of max_len from their start.
    final, start = [], 0
    for e in merged:
        if max_len is not None:
            piece_end = start + max_len - 1
            while piece_end < e:
                final.append(piece_end)
                piece_end += max_len
        final.append(e)
        start = e + 1
    return final


def ref_segment_ids(response_ids, response_mask, boundary_table, *, min_len=1, max_len=None, fallback_len=None):
    """int64 (B, T) segment ids 0..K_b-1 at valid positions (0 elsewhere)."""
    ids_rows, mask = _rows(response_ids), _rows(response_mask)
    table = [bool(x) for x in boundary_table.tolist()]
    T = len(mask[0])
    out = []
    for b in range(len(mask)):
        positions = valid_positions(mask[b])
        ids = cut(ids_rows[b], positions)
        ends = segment_ends(ids, table, min_len=min_len, max_len=max_len, fallback_len=fallback_len)
        seg, k = [], 0
        for i in range(len(ids)):
            seg.append(k)
            if i == ends[k]:
                k += 1
        out.append(put_back(seg, positions, T, fill=0))
    return torch.tensor(out, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------------------------
# HVM
# ---------------------------------------------------------------------------------------------------------------


class RefHVM(NamedTuple):
    advantages: torch.Tensor
    local_returns: torch.Tensor
    global_returns: torch.Tensor
    start_mask: torch.Tensor


def segments_of(seg: list[int]) -> list[tuple[int, int]]:
    """(s_k, e_k) of each maximal run of equal segment ids in a compact row."""
    segments, s = [], 0
    for i in range(1, len(seg) + 1):
        if i == len(seg) or seg[i] != seg[s]:
            segments.append((s, i - 1))
            s = i
    return segments


def ref_hvm_advantages(
    rewards,
    local_values,
    global_values,
    response_mask,
    seg_ids,
    *,
    gamma,
    lam,
    global_lam,
    global_weight,
    whiten=False,
):
    """SPEC hvm_advantages on each compact row; returns RefHVM of float64 (B, T) tensors plus a bool start_mask."""
    r_rows, vl_rows, vg_rows = _rows(rewards), _rows(local_values), _rows(global_values)
    mask, seg_rows = _rows(response_mask), _rows(seg_ids)
    B, T = len(mask), len(mask[0])
    lam_rows = _lam_rows(lam, B, T)
    advantages, local_returns, global_returns, start_mask = [], [], [], []
    for b in range(B):
        positions = valid_positions(mask[b])
        r, vl, vg = cut(r_rows[b], positions), cut(vl_rows[b], positions), cut(vg_rows[b], positions)
        lam_b, seg = cut(lam_rows[b], positions), cut(seg_rows[b], positions)
        n = len(r)
        segments = segments_of(seg)
        K = len(segments)

        # Global level, one step per segment.
        g = [vg[s] for s, _ in segments] + [0.0]  # g_k = V_glob at s_k, g_K = 0
        n_k = [e - s + 1 for s, e in segments]
        R = [sum(gamma ** (t - s) * r[t] for t in range(s, e + 1)) for s, e in segments]
        delta_G = [R[k] + gamma ** n_k[k] * g[k + 1] - g[k] for k in range(K)]
        AG = [0.0] * (K + 1)  # AG_K = 0
        for k in reversed(range(K)):
            AG[k] = delta_G[k] + gamma ** n_k[k] * global_lam * AG[k + 1]

        # Monte-Carlo return-to-go of the row: G[t] = sum_{t' >= t} gamma^(t' - t) r_t'.
        G = [0.0] * (n + 1)
        for t in reversed(range(n)):
            G[t] = r[t] + gamma * G[t + 1]

        AL, L_ret, G_ret, starts, A = [0.0] * n, [0.0] * n, [0.0] * n, [False] * n, [0.0] * n
        for k, (s, e) in enumerate(segments):
            # Local level: compute_gae inside the segment, bootstrapping from g_{k+1} at e_k, restarting A at 0.
            AL[s : e + 1] = gae_compact(r[s : e + 1], vl[s : e + 1], gamma, lam_b[s : e + 1], bootstrap=g[k + 1])
            # Local targets: in-segment discounted reward to e_k plus gamma^(steps to e_k + 1) * g_{k+1}.
            running = g[k + 1]
            for t in reversed(range(s, e + 1)):
                running = r[t] + gamma * running
                L_ret[t] = running
            for t in range(s, e + 1):
                G_ret[t] = G[s]  # global target of the segment holding t: return from s_k to the row's end
                A[t] = AL[t] + global_weight * AG[k]
            starts[s] = True

        advantages.append(put_back(A, positions, T))
        local_returns.append(put_back(L_ret, positions, T))
        global_returns.append(put_back(G_ret, positions, T))
        start_mask.append(put_back(starts, positions, T, fill=False))

    advantages = torch.tensor(advantages, dtype=torch.float64)
    if whiten:
        advantages = ref_masked_whiten(advantages, response_mask)
    return RefHVM(
        advantages,
        torch.tensor(local_returns, dtype=torch.float64),
        torch.tensor(global_returns, dtype=torch.float64),
        torch.tensor(start_mask, dtype=torch.bool),
    )


# ---------------------------------------------------------------------------------------------------------------
# SCVL
# ---------------------------------------------------------------------------------------------------------------


def _group_list(group_ids) -> list:
    return group_ids.tolist() if isinstance(group_ids, torch.Tensor) else list(group_ids)


def _groups_in_order(group_ids) -> dict:
    """group id -> member rows in batch order; dict order = order of first appearance in the batch."""
    groups: dict = {}
    for i, gid in enumerate(_group_list(group_ids)):
        groups.setdefault(gid, []).append(i)
    return groups


def row_length(mask_row: Sequence) -> int:
    """A row's length: its last valid position + 1."""
    return max(valid_positions(mask_row)) + 1


def ref_scvl_pairs(response_ids, response_mask, scores, group_ids, *, threshold=0.5, max_pairs=16):
    """List of (pos, neg, d) triples in the documented order."""
    ids_rows, mask = _rows(response_ids), _rows(response_mask)
    score = scores.detach().to(torch.float64).tolist()
    lengths = [row_length(m) for m in mask]
    out = []
    for members in _groups_in_order(group_ids).values():
        positives = [i for i in members if score[i] >= threshold]
        negatives = [j for j in members if score[j] < threshold]
        pairs = []
        for i in positives:
            for j in negatives:
                # d = first position where the ids differ, or where either row has ended.
                d = min(lengths[i], lengths[j])
                for t in range(d):
                    if ids_rows[i][t] != ids_rows[j][t]:
                        d = t
                        break
                if d + 1 < lengths[i] and d + 1 < lengths[j]:  # both have a state after the divergent token
                    pairs.append((i, j, d))
        pairs.sort(key=lambda p: (-p[2], p[0], p[1]))  # largest d first, ties by (pos, neg)
        out.extend(pairs[:max_pairs])
    return out


def ref_scvl_group_stats(scores, group_ids, *, threshold) -> dict[str, int]:
    score = scores.detach().to(torch.float64).tolist()
    stats = {"groups": 0, "groups_mixed": 0, "groups_all_positive": 0, "groups_all_negative": 0}
    for members in _groups_in_order(group_ids).values():
        n_pos = sum(score[i] >= threshold for i in members)
        stats["groups"] += 1
        if n_pos == len(members):
            stats["groups_all_positive"] += 1
        elif n_pos == 0:
            stats["groups_all_negative"] += 1
        else:
            stats["groups_mixed"] += 1
    return stats


def ref_scvl_loss(values, pairs, *, margin) -> float:
    """mean over pairs of max(0, margin - (V[pos, d+1] - V[neg, d+1])); 0.0 with no pairs."""
    V = _rows(values)
    if not pairs:
        return 0.0
    return sum(max(0.0, margin - (V[i][d + 1] - V[j][d + 1])) for i, j, d in pairs) / len(pairs)


def ref_scvl_loss_grad(values, pairs, *, margin) -> torch.Tensor:
    """Analytic d loss / d values of `ref_scvl_loss` (away from the hinge's kink): for each active pair,
    -1/P at (pos, d+1) and +1/P at (neg, d+1)."""
    V = _rows(values)
    grad = [[0.0] * len(V[0]) for _ in V]
    for i, j, d in pairs:
        if margin - (V[i][d + 1] - V[j][d + 1]) > 0:
            grad[i][d + 1] -= 1.0 / len(pairs)
            grad[j][d + 1] += 1.0 / len(pairs)
    return torch.tensor(grad, dtype=torch.float64)
