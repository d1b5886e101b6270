"""Compiled CPU kernels (numba): one pass per row over the (B, T) arrays.

Imported only by `backend.py`, and only when numba is installed (a default dependency); the
kernels are called through `SERIAL` or `PARALLEL`.
Each kernel is the plain per-token loop of a formula of docs/spec.md, run over the original layout: masked
tokens carry the running quantities through unchanged (verl's carry rule), so interior zeros need
no compaction. Accumulators are float64 whatever the array dtype.
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


@_kernel("mask", "entropy", "out")
def ea_gae_lambda_rows(mask, entropy, has_entropy, alpha, beta, eps, lambda_min, lambda_max, out):
    """lambda = clip(1 - 1 / (alpha * l * max(1 + beta * H, eps)), lambda_min, lambda_max)."""
    B, T = mask.shape
    for b in prange(B):
        length = 0
        for t in range(T):
            if mask[b, t]:
                length += 1
        for t in range(T):
            factor = 1.0
            if has_entropy:
                factor = max(1.0 + beta * entropy[b, t], eps)
            lam = 1.0 - 1.0 / (alpha * length * factor)
            out[b, t] = min(max(lam, lambda_min), lambda_max)


@_kernel("rewards", "values", "mask", "lam", "advantages", "returns")
def gae_rows(rewards, values, mask, lam, per_token_lam, gamma, advantages, returns):
    """delta_t = r_t + gamma V_next - V_t;  A_t = delta_t + gamma lambda_t A_next;  G_t = A_t + V_t."""
    B, T = rewards.shape
    for b in prange(B):
        next_value = 0.0
        running = 0.0
        for t in range(T - 1, -1, -1):
            if mask[b, t]:
                lam_t = lam[b, t] if per_token_lam else lam[0, 0]
                delta = rewards[b, t] + gamma * next_value - values[b, t]
                running = delta + gamma * lam_t * running
                next_value = values[b, t]
            advantages[b, t] = running
            returns[b, t] = running + values[b, t]


@_kernel("x", "mask", "sums", "counts")
def masked_row_sums(x, mask, center, sums, counts):
    """Per row: sum over valid tokens of (x - center) and of (x - center)^2, and the count."""
    B, T = x.shape
    for b in prange(B):
        s1 = 0.0
        s2 = 0.0
        n = 0
        for t in range(T):
            if mask[b, t]:
                d = x[b, t] - center
                s1 += d
                s2 += d * d
                n += 1
        sums[b, 0] = s1
        sums[b, 1] = s2
        counts[b] = n


@_kernel("ids", "mask", "out")
def segment_rows(ids, mask, table, min_len, max_len, fallback_len, out):
    """Segment ids in one forward pass per row (see segments.py for the rules, `segment_starts` for the pass)."""
    B, T = ids.shape
    no_starts = np.zeros((1, 1), np.bool_)
    for b in prange(B):
        n = 0
        last = 0
        has_delimiter = False
        for t in range(T):
            if mask[b, t]:
                n += 1
                last = t + 1
                if table[ids[b, t]]:
                    has_delimiter = True
        segment_starts(
            ids, mask, table, b, n, last, has_delimiter, min_len, max_len, fallback_len, True, out, False, no_starts
        )


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


@_kernel(
    "rewards",
    "local_values",
    "global_values",
    "mask",
    "seg_ids",
    "lam",
    "advantages",
    "local_returns",
    "global_returns",
    "start_mask",
)
def hvm_rows(
    rewards,
    local_values,
    global_values,
    mask,
    seg_ids,
    lam,
    per_token_lam,
    gamma,
    global_lam,
    global_weight,
    advantages,
    local_returns,
    global_returns,
    start_mask,
):
    """HVM per row: mark segment starts, one backward pass (local GAE, targets, GAE over segments), one
    forward pass broadcasting the segment-level results to the segment's tokens."""
    B, T = rewards.shape
    for b in prange(B):
        have_prev = False
        prev_seg = 0
        for t in range(T):
            start_mask[b, t] = False
            if mask[b, t]:
                start_mask[b, t] = (not have_prev) or seg_ids[b, t] != prev_seg
                prev_seg = seg_ids[b, t]
                have_prev = True

        segment_advantage = np.zeros(T)  # AG_k, stored at s_k
        have_next = False
        next_seg = 0
        next_local = 0.0  # V_loc of the next valid token
        next_global = 0.0  # g_{k+1}: V_glob at the next segment's start, 0 after the last segment
        running = 0.0  # AL
        local_return = 0.0  # LR
        mc_return = 0.0  # Monte-Carlo return
        discount = 1.0  # gamma^(e_k - t + 1)
        next_segment_advantage = 0.0  # AG_{k+1}
        for t in range(T - 1, -1, -1):
            if not mask[b, t]:
                continue
            r = rewards[b, t]
            lam_t = lam[b, t] if per_token_lam else lam[0, 0]
            is_end = (not have_next) or seg_ids[b, t] != next_seg
            running, local_return, discount = hvm_local_step(
                r, local_values[b, t], is_end, next_local, next_global, lam_t, gamma, running, local_return, discount
            )
            mc_return = r + gamma * mc_return
            advantages[b, t] = running
            local_returns[b, t] = local_return
            if start_mask[b, t]:  # t = s_k: AG_k = (LR_{s_k} - g_k) + gamma^n_k * global_lam * AG_{k+1}
                g = global_values[b, t]
                next_segment_advantage = local_return - g + discount * global_lam * next_segment_advantage
                segment_advantage[t] = next_segment_advantage
                global_returns[b, t] = mc_return
                next_global = g
            next_local = local_values[b, t]
            next_seg = seg_ids[b, t]
            have_next = True

        current_advantage = 0.0
        current_return = 0.0
        for t in range(T):
            if mask[b, t]:
                if start_mask[b, t]:
                    current_advantage = segment_advantage[t]
                    current_return = global_returns[b, t]
                advantages[b, t] += global_weight * current_advantage
                global_returns[b, t] = current_return
            else:
                advantages[b, t] = 0.0
                local_returns[b, t] = 0.0
                global_returns[b, t] = 0.0


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


@_kernel("pos", "neg", "shortest", "out")
def divergence(ids, pos, neg, shortest, out):
    """d = first position where rows pos[p] and neg[p] differ, or shortest[p] if none before it."""
    for p in prange(pos.shape[0]):
        i = pos[p]
        j = neg[p]
        d = shortest[p]
        for t in range(shortest[p]):
            if ids[i, t] != ids[j, t]:
                d = t
                break
        out[p] = d


@_kernel("x", "mask", "out")
def masked_row_stats(x, mask, out):
    """Per row over valid tokens: sum, min, max, count."""
    B, T = x.shape
    for b in prange(B):
        s = 0.0
        lo = np.inf
        hi = -np.inf
        n = 0
        for t in range(T):
            if mask[b, t]:
                s += x[b, t]
                lo = min(lo, x[b, t])
                hi = max(hi, x[b, t])
                n += 1
        out[b, 0] = s
        out[b, 1] = lo
        out[b, 2] = hi
        out[b, 3] = n
