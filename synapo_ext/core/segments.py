"""HVM's segmenter: reasoning segments from token ids and a per-vocabulary boundary table (docs/spec.md "HVM").

A valid token whose id is True in `boundary_table` closes the segment it belongs to (the delimiter is the
segment's last token); the row's last valid token closes the last segment. Segment ids are a cumulative
sum of segment ends. Options, applied in this order (docs/core_api.md):
  1. fallback_len: a row with no delimiter is cut into chunks of `fallback_len` valid tokens;
  2. min_len: greedy, left to right, a boundary closes a segment only once it holds >= min_len tokens;
     a final segment shorter than min_len merges into the one before;
  3. max_len: a segment longer than max_len is cut into pieces of max_len tokens from its start.
Lengths count valid tokens only (interior masked tokens are cut out, then ids are put back).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._blocks import map_row_blocks
from ._checks import check_ids, check_mask, check_same_shape, check_tensor
from ._compact import Compactor
from ._hparams import check_hparam

__all__ = ["boundary_table_from_tokenizer", "check_segment_args", "segment_ids"]


def boundary_table_from_tokenizer(
    tokenizer, delimiters: Sequence[str] = ("\n\n",), *, vocab_size: int | None = None
) -> torch.Tensor:
    """Bool (vocab,) table: True for every token whose decoded text contains one of `delimiters`.

    Built once (one batched decode of the whole vocabulary), so the hot path never decodes text. Tokens that
    merge a delimiter into something bigger (".\\n\\n", "\\n\\n\\n") are caught; a delimiter split across two
    tokens is not.

    Args:
        tokenizer: a Hugging Face tokenizer (anything with `batch_decode` and `__len__`).
        delimiters: strings that end a reasoning step (default: a blank line).
        vocab_size: table length; defaults to `len(tokenizer)`. Pass the model's embedding size when it is
            padded beyond the tokenizer (extra ids are never boundaries).

    Raises:
        ValueError: no delimiter given, or no token of the vocabulary contains any of them.
    """
    if isinstance(delimiters, str):
        delimiters = (delimiters,)
    delimiters = tuple(delimiters)
    if not delimiters or any(not isinstance(d, str) or not d for d in delimiters):
        raise ValueError(f"`delimiters` must be non-empty strings, got {delimiters!r}")
    n_tokens = len(tokenizer)
    vocab_size = n_tokens if vocab_size is None else int(vocab_size)
    if vocab_size < n_tokens:
        raise ValueError(f"`vocab_size` ({vocab_size}) is smaller than the tokenizer's vocabulary ({n_tokens})")
    texts = tokenizer.batch_decode([[i] for i in range(n_tokens)], skip_special_tokens=False)
    table = torch.zeros(vocab_size, dtype=torch.bool)
    table[:n_tokens] = torch.tensor([any(d in text for d in delimiters) for text in texts], dtype=torch.bool)
    if not bool(table.any()):
        raise ValueError(
            f"no token of the tokenizer contains any of `delimiters` {delimiters!r}: HVM cannot find segment "
            "boundaries; choose delimiters the tokenizer has, or turn HVM off"
        )
    return table


def segment_ids(
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    boundary_table: torch.Tensor,
    *,
    min_len: int = 1,
    max_len: int | None = None,
    fallback_len: int | None = None,
    dtype: torch.dtype = torch.int64,
) -> torch.Tensor:
    """Segment index of every token.

    Args:
        response_ids: integer (B, T) token ids.
        response_mask: bool/int/float (B, T) of 0 and 1.
        boundary_table: bool (V,), True for ids that close a segment (see `boundary_table_from_tokenizer`).
        min_len: minimum segment length in valid tokens (>= 1).
        max_len: maximum segment length in valid tokens (>= 1), or None.
        fallback_len: chunk length for rows with no delimiter (>= 1), or None (one segment).
        dtype: torch.int64 (default) or torch.int32 (half the bytes).

    Returns:
        seg_ids: `dtype` (B, T), 0..K_b-1 and nondecreasing over row b's valid tokens (masked tokens: a
        neighbour's).

    Raises:
        TypeError, ValueError: naming the argument.
    """
    mask = check_mask(response_mask)
    response_ids, boundary_table = check_segment_args(
        response_ids, mask, boundary_table, min_len=min_len, max_len=max_len, fallback_len=fallback_len
    )
    if dtype not in (torch.int32, torch.int64):
        raise ValueError(f"`dtype` must be torch.int32 or torch.int64, got {dtype}")
    if response_ids.numel() == 0:  # B = 0 (a row with no token was refused by check_mask)
        return torch.zeros(response_ids.shape, dtype=dtype, device=response_ids.device)
    # on blocks of rows (see `_segment_rows`)
    seg = torch.empty(mask.shape, dtype=dtype, device=mask.device)
    table = boundary_table.to(mask.device)
    map_row_blocks(_segment_rows, [seg], (response_ids, mask), table, min_len, max_len, fallback_len)
    return seg


def check_segment_args(
    response_ids: object,
    mask: torch.Tensor,
    boundary_table: object,
    *,
    min_len: int,
    max_len: int | None,
    fallback_len: int | None,
    id_range: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`segment_ids`'s checks on a validated bool `mask`; returns (response_ids, boundary_table). `id_range=False`
    leaves out the pass over the ids (a caller that checks them in its own pass)."""
    response_ids = check_ids(response_ids, "response_ids")
    check_same_shape(mask, "response_mask", response_ids.shape, "response_ids")
    boundary_table = check_tensor(boundary_table, "boundary_table", ndim=1)
    if boundary_table.dtype != torch.bool:
        raise TypeError(f"`boundary_table` must be a bool tensor, got {boundary_table.dtype}")
    check_hparam("hvm_min_len", min_len, "min_len")
    check_hparam("hvm_max_len", max_len, "max_len")
    check_hparam("hvm_fallback_len", fallback_len, "fallback_len")
    if response_ids.numel() == 0 or not id_range:
        return response_ids, boundary_table
    low, high = (int(x) for x in torch.aminmax(response_ids))
    if low < 0 or high >= boundary_table.numel():  # padding may hold anything: look at the valid ids only
        valid_ids = response_ids[mask]
        low, high = int(valid_ids.min()), int(valid_ids.max())
    if low < 0 or high >= boundary_table.numel():
        raise ValueError(
            f"`response_ids` holds ids in [{low}, {high}] but `boundary_table` covers [0, {boundary_table.numel()})"
        )
    return response_ids, boundary_table


def _segment_rows(
    response_ids: torch.Tensor,
    mask: torch.Tensor,
    boundary_table: torch.Tensor,
    min_len: int,
    max_len: int | None,
    fallback_len: int | None,
) -> tuple[torch.Tensor]:
    """Segment ids of some rows, int64 (one output, as a 1-tuple for `map_row_blocks`)."""
    layout = Compactor(mask)
    valid = layout.mask
    # int64 ids (uint8/int8/int16 cannot index a table); ids past a row's end may be anything
    ids = layout.compact(response_ids).long().clamp(0, boundary_table.numel() - 1)
    position = torch.arange(mask.shape[1], device=mask.device).expand_as(ids)
    last = position == (layout.lengths - 1)[:, None]

    ends = valid & boundary_table[ids]
    if fallback_len is not None:
        no_delimiter = ~ends.any(dim=1, keepdim=True)
        ends |= no_delimiter & valid & ((position + 1) % fallback_len == 0)
    ends |= last
    if min_len > 1:
        ends = _merge_short_segments(ends, last, min_len)
    if max_len is not None:
        ends = _split_long_segments(ends, valid, max_len)

    # id of token t = number of segment ends strictly before t
    seg = ends.cumsum(dim=1) - ends.long()
    seg = seg.clamp_max(ends.sum(dim=1, keepdim=True) - 1)
    return (layout.expand(seg),)


def _merge_short_segments(ends: torch.Tensor, last: torch.Tensor, min_len: int) -> torch.Tensor:
    """Greedy min_len merging on right-padded rows, vectorised by pointer doubling over the boundaries.

    Boundaries are nodes; from the previous kept end p the next kept end is the first boundary at
    position >= p + min_len. The kept ends are the chain from a virtual start at p = -1; the last node of
    the chain is replaced by the row's last token (a short tail merges into the segment before).
    """
    B, T = ends.shape
    device = ends.device
    n_ends = ends.sum(dim=1)
    K = int(n_ends.max())
    # rank of each end among its row's ends, and the sorted end positions per row (padding: T, never reached)
    rank = ends.cumsum(dim=1) - 1
    end_pos = torch.full((B, K + 1), T, dtype=torch.long, device=device)
    end_pos.scatter_(1, torch.where(ends, rank, K), torch.arange(T, device=device).expand(B, T).contiguous())
    end_pos[:, K] = T  # dump slot for non-ends, then a sink node at index K
    # node K + 1 is the virtual start at position -1; its successor is the first end at >= min_len - 1
    positions = torch.cat(
        [end_pos[:, :K], torch.full((B, 1), T, device=device), torch.full((B, 1), -1, device=device)], 1
    )
    successor = torch.searchsorted(end_pos[:, :K].contiguous(), (positions + min_len).clamp_max(T))
    # no real end that far (only padding slots): go to the sink, which points to itself
    successor = torch.where(successor >= n_ends[:, None], K, successor)
    # mark the chain start -> ... by doubling: after step j, nodes up to 2^j - 1 hops from the start are on it
    on_chain = torch.zeros(B, K + 2, dtype=torch.uint8, device=device)
    on_chain[:, K + 1] = 1
    jump = successor
    for _ in range(max(1, (K + 2).bit_length())):
        reached = torch.zeros_like(on_chain).scatter_reduce_(1, jump, on_chain, reduce="amax")
        on_chain |= reached
        jump = jump.gather(1, jump)
    kept = on_chain[:, :K].bool()
    # drop the chain's last end (its tail is shorter than min_len, or it is the row end itself) ...
    last_kept = torch.where(kept, torch.arange(K, device=device), -1).amax(dim=1)
    kept[torch.arange(B, device=device)[last_kept >= 0], last_kept[last_kept >= 0]] = False
    # ... and close the row at its last token instead
    return (ends & kept.gather(1, rank.clamp(0, max(K - 1, 0)))) | last


def _split_long_segments(ends: torch.Tensor, valid: torch.Tensor, max_len: int) -> torch.Tensor:
    """Cut every segment longer than max_len into pieces of max_len tokens from its start."""
    T = ends.shape[1]
    position = torch.arange(T, device=ends.device).expand_as(ends)
    # first position of each token's segment = (position of the previous end) + 1
    after_end = torch.zeros_like(position)
    after_end[:, 1:] = torch.where(ends[:, :-1], position[:, :-1] + 1, 0)
    start = after_end.cummax(dim=1).values
    return ends | (valid & ((position - start + 1) % max_len == 0))
