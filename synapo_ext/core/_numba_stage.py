"""Fused CPU kernels (numba) for the whole advantage stage: one pass per row, no (B, T) temporaries.

`stage_hvm_rows` computes, per row, the actor's lambda from the row's length and entropy, the segment starts
(segments.py's rules), HVM's local and global GAE and both heads' targets; `stage_gae_rows` the actor's GAE and
the critic's returns at `critic_lambda` in one backward pass. Lambda and segment ids are written only when the
caller asks for them (`write_lam`, `write_seg`); per-row sums for the metrics and for whitening go to `row_stats`.
The formulas and the order of every floating-point operation are those of `_numba_kernels.py`'s separate kernels,
so the fused stage gives the same numbers. Accumulators are float64 whatever the array dtype.
"""

from __future__ import annotations

from numba import njit, prange

from ._numba_kernels import _kernel

# columns of `row_stats` (float64 (B, STATS))
N_VALID, LAM_SUM, LAM_MIN, LAM_MAX, ENTROPY_SUM, SEGMENTS, ADV_MEAN, ADV_M2 = range(8)
STATS = 8


@_kernel
def stage_hvm_rows(
    rewards,
    local_values,
    global_values,
    mask,
    entropy,
    has_entropy,
    ids,
    table,
    adaptive,
    lam_const,
    alpha,
    beta,
    eps,
    lambda_min,
    lambda_max,
    min_len,
    max_len,
    fallback_len,
    gamma,
    global_lam,
    global_weight,
    moments,
    write_lam,
    lam_out,
    write_seg,
    seg_out,
    advantages,
    local_returns,
    global_returns,
    start_mask,
    row_stats,
):
    """Per row: (1) length, delimiter presence, entropy sum; (2) segment starts forward (greedy min_len,
    fallback chunks, max_len pieces); (3) one backward pass: lambda_t, local GAE AL_t and target LR_t restarting
    at each segment end e_k, Monte-Carlo return, and at each start s_k the segment's AG_k, added to the segment's
    tokens (still in cache) with its global target; (4) the row's mean and centred sum of squares of A (moments)."""
    B, T = rewards.shape
    for b in prange(B):
        n, entropy_sum = _row_count_sum(mask, entropy, has_entropy, b)
        has_delimiter = False
        for t in range(T):
            if mask[b, t] and table[ids[b, t]]:
                has_delimiter = True
                break

        # (2) segments: the same decisions as segment_rows, recorded as starts (and ids if asked)
        seg = 0
        i = 0
        seg_len = 0
        next_is_start = True
        for t in range(T):
            if write_seg:
                seg_out[b, t] = seg
            if not mask[b, t]:
                start_mask[b, t] = False
                continue
            start_mask[b, t] = next_is_start
            next_is_start = False
            seg_len += 1
            if has_delimiter:
                raw_end = table[ids[b, t]]
            else:
                raw_end = fallback_len > 0 and (i + 1) % fallback_len == 0
            end = i == n - 1 or (raw_end and seg_len >= min_len and n - 1 - i >= min_len)
            piece_end = max_len > 0 and seg_len % max_len == 0
            if (end or piece_end) and i < n - 1:
                seg += 1
                next_is_start = True
            if end:
                seg_len = 0
            i += 1

        # (3) backward: HVM as hvm_rows, with e_k found from the next valid token's start flag
        have_next = False
        next_starts = False
        next_local = 0.0
        next_global = 0.0
        running = 0.0
        local_return = 0.0
        mc_return = 0.0
        discount = 1.0
        segment_advantage = 0.0
        end_pos = 0
        lam_sum = 0.0
        lam_lo = 1.0
        lam_hi = 0.0
        segments = 0
        for t in range(T - 1, -1, -1):
            if not mask[b, t]:
                advantages[b, t] = 0.0
                local_returns[b, t] = 0.0
                global_returns[b, t] = 0.0
                if write_lam:
                    lam_out[b, t] = lambda_min
                continue
            if adaptive:  # EA-GAE, rounded to the output dtype through the advantages slot (as ea_gae_lambda)
                factor = 1.0
                if has_entropy:
                    factor = max(1.0 + beta * entropy[b, t], eps)
                advantages[b, t] = min(max(1.0 - 1.0 / (alpha * n * factor), lambda_min), lambda_max)
                lam_t = advantages[b, t]
            else:
                lam_t = lam_const
            if write_lam:
                lam_out[b, t] = lam_t
            lam_sum += lam_t
            lam_lo = min(lam_lo, lam_t)
            lam_hi = max(lam_hi, lam_t)
            r = rewards[b, t]
            if (not have_next) or next_starts:  # t = e_k: bootstrap from g_{k+1}, restart
                running = r + gamma * next_global - local_values[b, t]
                local_return = r + gamma * next_global
                discount = gamma
                end_pos = t
            else:
                running = r + gamma * next_local - local_values[b, t] + gamma * lam_t * running
                local_return = r + gamma * local_return
                discount *= gamma
            mc_return = r + gamma * mc_return
            advantages[b, t] = running
            local_returns[b, t] = local_return
            next_starts = start_mask[b, t]
            if next_starts:  # t = s_k: AG_k = (LR_{s_k} - g_k) + gamma^n_k * global_lam * AG_{k+1}
                g = global_values[b, t]
                segment_advantage = local_return - g + discount * global_lam * segment_advantage
                for s in range(t, end_pos + 1):  # the segment's tokens, just written: still in cache
                    if mask[b, s]:
                        advantages[b, s] += global_weight * segment_advantage
                        global_returns[b, s] = mc_return
                next_global = g
                segments += 1
            next_local = local_values[b, t]
            have_next = True

        row_stats[b, N_VALID] = n
        row_stats[b, LAM_SUM] = lam_sum
        row_stats[b, LAM_MIN] = lam_lo
        row_stats[b, LAM_MAX] = lam_hi
        row_stats[b, ENTROPY_SUM] = entropy_sum
        row_stats[b, SEGMENTS] = segments
        if moments:
            _row_moments(advantages, mask, b, n, row_stats)


@_kernel
def stage_gae_rows(
    rewards,
    values,
    mask,
    entropy,
    has_entropy,
    adaptive,
    lam_const,
    alpha,
    beta,
    eps,
    lambda_min,
    lambda_max,
    gamma,
    critic_lam,
    moments,
    write_lam,
    lam_out,
    advantages,
    returns,
    row_stats,
):
    """Per row: the actor's GAE with lambda_t (EA-GAE, VAPO's or a constant) and the critic's returns with
    critic_lambda in one backward pass (VAPO's decoupled GAE): A_t = delta_t + gamma lambda_t A_{t+1},
    G_t = V_t + C_t with C_t = delta_t + gamma critic_lambda C_{t+1}."""
    B, T = rewards.shape
    for b in prange(B):
        n, entropy_sum = _row_count_sum(mask, entropy, has_entropy, b)
        next_value = 0.0
        running = 0.0
        critic = 0.0
        lam_sum = 0.0
        lam_lo = 1.0
        lam_hi = 0.0
        for t in range(T - 1, -1, -1):
            if mask[b, t]:
                if adaptive:
                    factor = 1.0
                    if has_entropy:
                        factor = max(1.0 + beta * entropy[b, t], eps)
                    advantages[b, t] = min(max(1.0 - 1.0 / (alpha * n * factor), lambda_min), lambda_max)
                    lam_t = advantages[b, t]
                else:
                    lam_t = lam_const
                if write_lam:
                    lam_out[b, t] = lam_t
                lam_sum += lam_t
                lam_lo = min(lam_lo, lam_t)
                lam_hi = max(lam_hi, lam_t)
                delta = rewards[b, t] + gamma * next_value - values[b, t]
                running = delta + gamma * lam_t * running
                critic = delta + gamma * critic_lam * critic
                next_value = values[b, t]
            elif write_lam:
                lam_out[b, t] = lambda_min
            advantages[b, t] = running
            returns[b, t] = critic + values[b, t]
        row_stats[b, N_VALID] = n
        row_stats[b, LAM_SUM] = lam_sum
        row_stats[b, LAM_MIN] = lam_lo
        row_stats[b, LAM_MAX] = lam_hi
        row_stats[b, ENTROPY_SUM] = entropy_sum
        row_stats[b, SEGMENTS] = 0.0
        if moments:
            _row_moments(advantages, mask, b, n, row_stats)


# Sums for statistics may be reordered (vectorised): a strict left-to-right float64 sum waits ~4 cycles per token.
# NaN/inf semantics are kept (no "nnan"/"ninf"), and the recursions themselves are compiled without fast-math.
_SUM_MATH = {"reassoc", "nsz"}


@njit(cache=True, nogil=True, fastmath=_SUM_MATH)
def _row_moments(x, mask, b, n, row_stats):
    """Row b's mean and centred sum of squares over valid tokens (two passes over a row still in cache)."""
    T = x.shape[1]
    s = 0.0
    for t in range(T):
        s += x[b, t] if mask[b, t] else 0.0
    mean = s / n
    m2 = 0.0
    for t in range(T):
        d = x[b, t] - mean if mask[b, t] else 0.0
        m2 += d * d
    row_stats[b, ADV_MEAN] = mean
    row_stats[b, ADV_M2] = m2


@njit(cache=True, nogil=True, fastmath=_SUM_MATH)
def _row_count_sum(mask, x, has_x, b):
    """(number of valid tokens of row b, sum of x over them (0 when not has_x))."""
    T = mask.shape[1]
    n = 0
    s = 0.0
    for t in range(T):
        n += mask[b, t]
    if has_x:
        for t in range(T):
            s += x[b, t] if mask[b, t] else 0.0
    return n, s


@_kernel
def shift_scale(x, shift, scale):
    """x <- (x - shift) * scale in place, rows in parallel (whitening's last pass, no (B, T) temporary)."""
    B, T = x.shape
    for b in prange(B):
        for t in range(T):
            x[b, t] = (x[b, t] - shift) * scale
