"""The fused stage's CPU kernels (numba): one pass per row over the (B, T) arrays, no (B, T) temporaries.

`stage_hvm_rows` computes, per row, the actor's lambda from the row's length and entropy, the segment starts
(segments.py's rules), HVM's local and global GAE and both heads' targets; `stage_gae_rows` the actor's GAE and
the critic's returns at `critic_lambda` in one backward pass. Lambda and segment ids are written only when the
caller asks for them (`write_lam`, `write_seg`); per-row sums for the metrics and for whitening go to `row_stats`.
Both take the actor's lambda as `lam_args` = (adaptive, constant lambda, alpha, beta, eps, lambda_min, lambda_max):
EA-GAE's (or VAPO's, beta = 0) when adaptive, else the constant.
Each kernel is the plain per-token loop of a formula of docs/spec.md (the torch functions of `synapo_ext.core` are
the readable versions), run over the original layout: masked tokens carry the running quantities through unchanged
(verl's carry rule), so interior zeros need no compaction. Accumulators are float64 whatever the array dtype.
`row_lengths` and `mask_rows` are the stage's one pass over the mask, `divergence` its SCVL step's scan. Imported
only by `fast/stage.py` and `backend.fused_kernels`, on first use.
"""

from __future__ import annotations

import inspect
import itertools
import threading
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import torch
from numba import njit, prange

from ..ea_gae import ENTROPY_ROUNDING

# Each kernel is compiled once, serial (`prange` runs as `range`). `SERIAL` calls it on the whole batch (small
# batches: no thread wakes up, so nothing competes with torch's own threads in a training step); `PARALLEL` runs
# it on blocks of rows in plain threads (the kernels release the GIL), as many as torch's intra-op threads.
# Not numba's own thread pool: its OpenMP workers spin-wait after each parallel loop, and beside torch's OpenMP
# workers (a second runtime, spinning too) every hand-over between a numba kernel and a torch op cost milliseconds
# of two pools fighting for the cores (the whole stage at 512 x 16384 took 234 ms with the spinning, 120 ms
# with OMP_WAIT_POLICY=passive, on the 2-core machine). Rows are independent, so a block gives the rows'
# results exactly as the whole batch does.
SERIAL = SimpleNamespace()
PARALLEL = SimpleNamespace()
BLOCKS_PER_THREAD = 4  # blocks of rows per thread, taken in turn: rows of unequal length even out


def _kernel(*rows: str) -> Callable[[Callable], Callable]:
    """Register a kernel whose arguments `rows` are indexed by row (first dimension: the batch; the first of them
    sets the batch size; one whose first dimension differs, e.g. a (1, 1) placeholder, is passed whole)."""

    def decorate(fn: Callable) -> Callable:
        serial = njit(cache=True, nogil=True)(fn)
        names = list(inspect.signature(fn).parameters)
        setattr(SERIAL, fn.__name__, serial)
        setattr(PARALLEL, fn.__name__, _row_blocks(serial, [names.index(name) for name in rows]))
        return fn

    return decorate


def _row_blocks(serial: Callable, rows: list[int]) -> Callable:
    """`serial` run on blocks of rows by `torch.get_num_threads()` threads (the caller's thread among them)."""
    row_set = set(rows)

    def run(*args) -> None:
        n = args[rows[0]].shape[0]
        threads = min(torch.get_num_threads(), n)
        if threads <= 1:
            serial(*args)
            return
        blocks = min(n, BLOCKS_PER_THREAD * threads)
        bounds = [n * i // blocks for i in range(blocks + 1)]
        taken = itertools.count()  # next() is atomic under the GIL
        errors: list[BaseException] = []

        def work() -> None:
            while not errors and (i := next(taken)) < blocks:
                lo, hi = bounds[i], bounds[i + 1]
                try:
                    serial(*(a[lo:hi] if j in row_set and a.shape[0] == n else a for j, a in enumerate(args)))
                except BaseException as e:  # re-raised by the caller's thread
                    errors.append(e)

        helpers = [threading.Thread(target=work, daemon=True) for _ in range(threads - 1)]
        for t in helpers:
            t.start()
        work()
        for t in helpers:
            t.join()
        if errors:
            raise errors[0]

    return run


# columns of `row_stats` (float64 (B, STATS))
N_VALID, LAM_SUM, LAM_MIN, LAM_MAX, ENTROPY_SUM, SEGMENTS, ADV_MEAN, ADV_M2 = range(8)
STATS = 8
# bits of `bad` (int64 (B,)): which input failed its check on that row
REWARDS, VALUES, GLOBAL_VALUES, ENTROPY, IDS = 1, 2, 4, 8, 16
# Sums for statistics may be reordered (vectorised): a strict left-to-right float64 sum waits ~4 cycles per token.
# NaN/inf semantics are kept (no "nnan"/"ninf"), and the recursions themselves are compiled without fast-math.
_SUM_MATH = {"reassoc", "nsz"}


@_kernel("mask", "out")
def row_lengths(mask, out):
    """Per row: last valid position + 1 (0 for a row with no valid token), scanning from the end."""
    B, T = mask.shape
    for b in prange(B):
        last = 0
        for t in range(T - 1, -1, -1):
            if mask[b, t]:
                last = t + 1
                break
        out[b] = last


@_kernel("mask", "out", "lengths", "bad")
def mask_rows(mask, one, neg_zero, out, lengths, bad):
    """Per row: a 0/1 mask of any dtype, read as the signed integers of its bits (`one`, `neg_zero`: the bits of 1
    and -0 in its dtype, 0 for -0 of an integer dtype), written as bool, with its length (last valid position + 1)
    and `bad` = 1 where it holds any other value."""
    B, T = mask.shape
    for b in prange(B):
        others = 0
        last = 0
        for t in range(T):
            v = mask[b, t]
            is_one = v == one
            out[b, t] = is_one
            others += (v != 0) & (v != neg_zero) & (v != one)
            last = max(last, (t + 1) * is_one)
        lengths[b] = last
        bad[b] = others > 0


@_kernel("pos", "neg", "shortest", "out")
def divergence(ids, pos, neg, shortest, out):
    """SCVL's d = first position where rows pos[p] and neg[p] differ, or shortest[p] if none before it; a pair's
    scan stops at its first difference (the torch version compares whole prefixes)."""
    for p in prange(pos.shape[0]):
        i = pos[p]
        j = neg[p]
        d = shortest[p]
        for t in range(shortest[p]):
            if ids[i, t] != ids[j, t]:
                d = t
                break
        out[p] = d


@njit(cache=True, nogil=True)
def segment_starts(
    ids, mask, table, b, n, last, has_delimiter, min_len, max_len, fallback_len, write_seg, seg_out, write_starts,
    start_mask,
):  # fmt: skip
    """Row b's segments in one forward pass (n valid tokens, the last at `last` - 1): its ids into seg_out (when
    `write_seg`), its start flags into start_mask (when `write_starts`).

    Greedy min_len in one pass: a raw end at valid index i closes the segment iff it is the row's last token,
    or the segment holds >= min_len tokens and the tokens left after it (n - 1 - i) are >= min_len (a shorter
    tail would merge back into this segment). max_len cuts every max_len tokens from the segment's start.
    """
    seg = 0
    i = 0  # valid-token index
    seg_len = 0  # tokens in the current (merged) segment so far, this one included
    next_is_start = True
    for t in range(last):
        if write_seg:
            seg_out[b, t] = seg
        if not mask[b, t]:
            if write_starts:
                start_mask[b, t] = False
            continue
        if write_starts:
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
    if write_seg:
        for t in range(last, seg_out.shape[1]):
            seg_out[b, t] = seg


@njit(cache=True, nogil=True)
def hvm_local_step(r, v, is_end, next_local, next_global, lam_t, gamma, running, local_return, discount):
    """One token of HVM's backward pass inside a segment: (AL_t, LR_t, gamma^(e_k - t + 1)) from the next token's.
    At a segment end e_k (`is_end`) the local GAE and target bootstrap from the next segment's g_{k+1} and restart:

        AL_t = r_t + gamma g_{k+1} - V_t                  LR_t = r_t + gamma g_{k+1}
        AL_t = r_t + gamma V_{t+1} - V_t + gamma lambda_t AL_{t+1}    LR_t = r_t + gamma LR_{t+1}   (inside)
    """
    if is_end:
        return r + gamma * next_global - v, r + gamma * next_global, gamma
    return r + gamma * next_local - v + gamma * lam_t * running, r + gamma * local_return, discount * gamma


@_kernel(
    "rewards",
    "local_values",
    "global_values",
    "mask",
    "entropy",
    "ids",
    "lam_out",
    "seg_out",
    "advantages",
    "local_returns",
    "global_returns",
    "start_mask",
    "row_stats",
    "bad",
)
def stage_hvm_rows(
    rewards,
    local_values,
    global_values,
    mask,
    entropy,
    has_entropy,
    ids,
    table,
    lam_args,
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
    bad,
):
    """Per row: (0) the input checks: NaN/inf anywhere in rewards, values, global values, entropy, an id outside
    the table at a valid token; a row that fails gets its bits in `bad` (REWARDS, ...) and no further work, and
    the caller raises; (1) length, delimiter presence, entropy sum; (2) segment starts forward (greedy min_len, max_len
    pieces), only when those options are set or ids are asked for: with min_len = 1 and no max_len a token ends a
    segment iff it is a delimiter (or ends a fallback chunk) or the row's last, which the backward pass sees itself;
    (3) one backward pass: lambda_t, local GAE AL_t and target LR_t restarting at each segment end e_k, Monte-Carlo
    return, and once a segment's start s_k is known (at the token before it, or the row's start) its AG_k, added
    to the segment's tokens (still in cache) with its global target; (4) the row's mean and centred sum of squares
    of A (moments)."""
    B, T = rewards.shape
    forward = min_len > 1 or max_len > 0 or write_seg
    for b in prange(B):
        flags = _row_finite_flags(rewards, local_values, entropy, has_entropy, mask, b)
        if not _row_finite(global_values, b):
            flags |= GLOBAL_VALUES
        if not _row_ids_in_table(ids, mask, b, table.shape[0]):
            flags |= IDS
        bad[b] = flags
        if flags:
            continue
        n, entropy_sum, last, lam_row = _row_start(mask, entropy, has_entropy, b, lam_args, write_lam, lam_out)
        for t in range(last, T):  # the padding after the last valid token: plain fills, not the passes below
            advantages[b, t] = 0.0
            local_returns[b, t] = 0.0
            global_returns[b, t] = 0.0
            start_mask[b, t] = False
        has_delimiter = False
        for t in range(last):
            if mask[b, t] and table[ids[b, t]]:
                has_delimiter = True
                break
        if forward:
            segment_starts(ids, mask, table, b, n, last, has_delimiter, min_len, max_len, fallback_len,
                           write_seg, seg_out, True, start_mask)  # fmt: skip

        # (3) backward. Per valid token t (j-th from the end, valid index i = n - 1 - j): t is a segment end e_k
        # iff it is the last token or the next valid token starts a segment.
        next_local = 0.0
        next_global = 0.0  # g_{k+1}
        running = 0.0
        local_return = 0.0
        mc_return = 0.0
        discount = 1.0
        segment_advantage = 0.0  # AG_{k+1}
        end_pos = 0  # e_k of the segment being accumulated
        start_pos = 0  # the last valid token seen: the start of its segment if the current token ends one
        lam_sum, lam_lo, lam_hi = 0.0, 1.0, 0.0  # the row's lambda: sum, min, max
        segments = 0
        j = 0
        for t in range(last - 1, -1, -1):
            if not mask[b, t]:
                advantages[b, t] = 0.0
                local_returns[b, t] = 0.0
                global_returns[b, t] = 0.0
                if not forward:
                    start_mask[b, t] = False
                continue
            if j == 0:
                is_end = True
            elif forward:
                is_end = start_mask[b, start_pos]
            elif has_delimiter:
                is_end = table[ids[b, t]]
            else:
                is_end = fallback_len > 0 and (n - j) % fallback_len == 0  # (i + 1) % fallback_len
            if is_end and j > 0:  # the segment starting at start_pos is complete: AG_{k+1}, its tokens, g_{k+1}
                segment_advantage, next_global = _close_segment(
                    local_values, global_values, mask, b, start_pos, end_pos, local_return, discount, mc_return,
                    segment_advantage, global_lam, global_weight, advantages, global_returns, start_mask,
                )  # fmt: skip
                segments += 1
            lam_t = lam_row[t] if lam_args[0] else lam_args[1]
            lam_sum += lam_t
            lam_lo = min(lam_lo, lam_t)
            lam_hi = max(lam_hi, lam_t)
            r = rewards[b, t]
            running, local_return, discount = hvm_local_step(
                r, local_values[b, t], is_end, next_local, next_global, lam_t, gamma, running, local_return, discount
            )
            if is_end:  # t = e_k
                end_pos = t
            mc_return = r + gamma * mc_return
            advantages[b, t] = running
            local_returns[b, t] = local_return
            if not forward:
                start_mask[b, t] = False
            next_local = local_values[b, t]
            start_pos = t
            j += 1
        # the row's first segment starts at its first valid token
        _close_segment(
            local_values, global_values, mask, b, start_pos, end_pos, local_return, discount, mc_return,
            segment_advantage, global_lam, global_weight, advantages, global_returns, start_mask,
        )  # fmt: skip
        segments += 1

        _row_end_stats(row_stats, b, n, lam_sum, lam_lo, lam_hi, entropy_sum, segments, moments, advantages, mask)


@njit(cache=True, nogil=True)
def _close_segment(
    local_values, global_values, mask, b, s, e, local_return, discount, mc_return, segment_advantage, global_lam,
    global_weight, advantages, global_returns, start_mask,
):  # fmt: skip
    """Segment [s, e] of row b, given LR, gamma^n_k and the Monte-Carlo return at s = s_k:
    AG_k = (LR_{s_k} - g_k) + gamma^n_k * global_lam * AG_{k+1}, added to A on its tokens, its global target
    stored on them. Returns (AG_k, g_k)."""
    g = global_values[b, s]
    segment_advantage = local_return - g + discount * global_lam * segment_advantage
    for t in range(s, e + 1):
        if mask[b, t]:
            advantages[b, t] += global_weight * segment_advantage
            global_returns[b, t] = mc_return
    start_mask[b, s] = True
    return segment_advantage, g


@_kernel(
    "rewards",
    "values",
    "mask",
    "entropy",
    "lam_out",
    "advantages",
    "returns",
    "row_stats",
    "bad",
)
def stage_gae_rows(
    rewards,
    values,
    mask,
    entropy,
    has_entropy,
    lam_args,
    gamma,
    critic_lam,
    moments,
    write_lam,
    lam_out,
    advantages,
    returns,
    row_stats,
    bad,
):
    """Per row: the actor's GAE with lambda_t (EA-GAE, VAPO's or a constant) and the critic's returns with
    critic_lambda in one backward pass (VAPO's decoupled GAE): A_t = delta_t + gamma lambda_t A_{t+1},
    G_t = V_t + C_t with C_t = delta_t + gamma critic_lambda C_{t+1}."""
    B, T = rewards.shape
    for b in prange(B):
        bad[b] = _row_finite_flags(rewards, values, entropy, has_entropy, mask, b)  # as stage_hvm_rows
        if bad[b]:
            continue
        n, entropy_sum, last, lam_row = _row_start(mask, entropy, has_entropy, b, lam_args, write_lam, lam_out)
        for t in range(last, T):  # A = 0 and G = V past the last valid token, as the per-token loop gives
            advantages[b, t] = 0.0
            returns[b, t] = values[b, t]
        next_value = 0.0
        running = 0.0
        critic = 0.0
        lam_sum, lam_lo, lam_hi = 0.0, 1.0, 0.0  # the row's lambda: sum, min, max
        for t in range(last - 1, -1, -1):
            if mask[b, t]:
                lam_t = lam_row[t] if lam_args[0] else lam_args[1]
                lam_sum += lam_t
                lam_lo = min(lam_lo, lam_t)
                lam_hi = max(lam_hi, lam_t)
                delta = rewards[b, t] + gamma * next_value - values[b, t]
                running = delta + gamma * lam_t * running
                critic = delta + gamma * critic_lam * critic
                next_value = values[b, t]
            advantages[b, t] = running
            returns[b, t] = critic + values[b, t]
        _row_end_stats(row_stats, b, n, lam_sum, lam_lo, lam_hi, entropy_sum, 0, moments, advantages, mask)


@njit(cache=True, nogil=True)
def _row_start(mask, entropy, has_entropy, b, lam_args, write_lam, lam_out):
    """Row b's (number of valid tokens, entropy sum over them, last valid position + 1, lambda row): the lambda row
    is `_row_lambda`'s with an adaptive lambda (lam_args[0]), else lam_out's first row (unread)."""
    adaptive, _, alpha, beta, eps, lambda_min, lambda_max = lam_args
    n, entropy_sum = _row_count_sum(mask, entropy, has_entropy, b)
    last = _row_end(mask, b)
    if adaptive:
        lam_row = _row_lambda(entropy, has_entropy, b, last, n, alpha, beta, eps, lambda_min, lambda_max, write_lam,
                              lam_out)  # fmt: skip
    else:
        lam_row = lam_out[0]
    return n, entropy_sum, last, lam_row


@njit(cache=True, nogil=True)
def _row_end_stats(row_stats, b, n, lam_sum, lam_lo, lam_hi, entropy_sum, segments, moments, advantages, mask):
    """Row b's statistics into `row_stats`, and A's moments over the row when whitening (`moments`)."""
    row_stats[b, N_VALID] = n
    row_stats[b, LAM_SUM] = lam_sum
    row_stats[b, LAM_MIN] = lam_lo
    row_stats[b, LAM_MAX] = lam_hi
    row_stats[b, ENTROPY_SUM] = entropy_sum
    row_stats[b, SEGMENTS] = segments
    if moments:
        _row_moments(advantages, mask, b, n, row_stats)


@njit(cache=True, nogil=True, fastmath=_SUM_MATH)
def _row_finite(x, b):
    """True iff row b of x holds no NaN/inf (x - x is 0 for finite x, NaN otherwise); also brings the row into
    cache for the passes that follow."""
    s = 0.0
    for t in range(x.shape[1]):
        s += x[b, t] - x[b, t]
    return s == 0.0


@njit(cache=True, nogil=True, fastmath=_SUM_MATH)
def _row_entropy_ok(x, mask, b):
    """True iff row b of the entropy is finite and >= -ENTROPY_ROUNDING at its valid tokens (`ea_gae.check_entropy`
    raises, naming it)."""
    s = 0.0
    low = 0.0
    for t in range(x.shape[1]):
        v = x[b, t]
        s += v - v
        if mask[b, t] and v < low:
            low = v
    return s == 0.0 and low >= -ENTROPY_ROUNDING


@njit(cache=True, nogil=True)
def _row_finite_flags(rewards, values, entropy, has_entropy, mask, b):
    flags = 0
    if not _row_finite(rewards, b):
        flags |= REWARDS
    if not _row_finite(values, b):
        flags |= VALUES
    if has_entropy and not _row_entropy_ok(entropy, mask, b):
        flags |= ENTROPY
    return flags


@njit(cache=True, nogil=True)
def _row_ids_in_table(ids, mask, b, size):
    """True iff every valid id of row b indexes the table (masked positions may hold anything)."""
    outside = 0
    for t in range(ids.shape[1]):
        outside += mask[b, t] & ((ids[b, t] < 0) | (ids[b, t] >= size))
    return outside == 0


@njit(cache=True, nogil=True)
def _row_lambda(entropy, has_entropy, b, last, n, alpha, beta, eps, lambda_min, lambda_max, write_lam, lam_out):
    """Row b's EA-GAE lambda up to `last`, in lam_out's dtype (ea_gae_lambda's): its row of lam_out when asked for,
    else a row-sized scratch. One branch-free (vectorised) pass: the divisions leave the recursion's loop.

        lambda = clip(1 - 1 / (alpha * l * max(1 + beta * H, eps)), lambda_min, lambda_max)
    """
    T = lam_out.shape[1]
    row = lam_out[b] if write_lam else np.empty(max(last, 1), lam_out.dtype)
    if has_entropy:
        for t in range(last):
            row[t] = min(max(1.0 - 1.0 / (alpha * n * max(1.0 + beta * entropy[b, t], eps)), lambda_min), lambda_max)
    else:
        value = min(max(1.0 - 1.0 / (alpha * n * 1.0), lambda_min), lambda_max)
        for t in range(last):
            row[t] = value
    if write_lam:
        for t in range(last, T):
            row[t] = lambda_min
    return row


@njit(cache=True, nogil=True)
def _row_end(mask, b):
    """Last valid position of row b + 1."""
    for t in range(mask.shape[1] - 1, -1, -1):
        if mask[b, t]:
            return t + 1
    return 0


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


@_kernel("x")
def shift_scale(x, shift, scale):
    """x <- (x - shift) * scale in place, rows in parallel (whitening's last pass, no (B, T) temporary)."""
    B, T = x.shape
    for b in prange(B):
        for t in range(T):
            x[b, t] = (x[b, t] - shift) * scale
