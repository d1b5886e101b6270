"""Segment-tree values and advantages (synapo_ext.core.tree) against a float64 plain-loop reference."""

from __future__ import annotations

import pytest
import torch

from synapo_ext.core import compute_tree_advantages, segment_ids, tree_node_values, tree_token_values

# ---------------------------------------------------------------------------------------------------------------
# The reference: a dict of nodes keyed by their path from the root, loops over rows and valid tokens
# ---------------------------------------------------------------------------------------------------------------


def ref_tree(scores, paths, levels, mask, local_values=None, seg_ids=None, lam=1.0, local_weight=1.0):
    """float64 lists, as docs/spec.md "Tree rollouts" writes them."""
    B, T = mask.shape
    L = paths.shape[1]
    leaves = [b for b in range(B) if any(mask[b, t] for t in range(T))]
    members: dict[tuple, list[float]] = {}
    for b in leaves:
        for level in range(L):
            members.setdefault(tuple(int(x) for x in paths[b, : level + 1]), []).append(float(scores[b]))
    node_value = {key: sum(v) / len(v) for key, v in members.items()}

    def value(b, level):
        return node_value.get(tuple(int(x) for x in paths[b, : level + 1]), 0.0)

    tree_adv = torch.zeros(B, T, dtype=torch.float64)
    state = torch.zeros(B, T, dtype=torch.float64)
    starts = torch.zeros(B, T, dtype=torch.bool)
    local_adv = torch.zeros(B, T, dtype=torch.float64)
    local_ret = torch.zeros(B, T, dtype=torch.float64)
    global_ret = torch.zeros(B, T, dtype=torch.float64)
    lam_t = lam if isinstance(lam, torch.Tensor) else torch.full((B, T), float(lam), dtype=torch.float64)
    for b in leaves:
        valid = [t for t in range(T) if mask[b, t]]
        previous_level, previous_seg = 0, None
        seg_start = []
        for t in valid:
            level = int(levels[b, t])
            first = level != previous_level
            tree_adv[b, t] = value(b, level) - value(b, level - 1)
            state[b, t] = value(b, level - 1) if first else value(b, level)
            seg = None if seg_ids is None else int(seg_ids[b, t])
            seg_start.append(first or (seg_ids is not None and seg != previous_seg))
            previous_level, previous_seg = level, seg
        if local_values is None:
            continue
        n = len(valid)
        next_start_value = 0.0  # W at the next segment's first token (0 after the last segment)
        running_adv = running_ret = 0.0
        for i in reversed(range(n)):
            t = valid[i]
            reward = float(scores[b]) if i == n - 1 else 0.0
            is_end = i == n - 1 or seg_start[i + 1]
            v = float(local_values[b, t])
            if is_end:
                if i < n - 1:
                    next_start_value = float(state[b, valid[i + 1]])
                delta = reward + next_start_value - v
                running_adv = delta
                running_ret = reward + next_start_value
            else:
                delta = reward + float(local_values[b, valid[i + 1]]) - v
                running_adv = delta + float(lam_t[b, t]) * running_adv
                running_ret = reward + running_ret
            local_adv[b, t], local_ret[b, t] = running_adv, running_ret
        start_value = 0.0
        for i, t in enumerate(valid):
            if seg_start[i]:
                start_value = float(state[b, t])
            global_ret[b, t] = start_value
            starts[b, t] = seg_start[i]
    return {
        "tree_advantages": tree_adv,
        "state_values": state,
        "advantages": tree_adv + local_weight * local_adv,
        "local_returns": local_ret,
        "global_returns": global_ret,
        "start_mask": starts,
    }


def random_tree_batch(gen, groups=2, roots=2, branching=2, depth=2, T=12, empty_rows=0):
    """Uniform trees: each group has roots * branching**depth leaves; levels cut each row at random points."""
    G = roots * branching**depth
    B = groups * G
    paths = torch.zeros(B, depth + 2, dtype=torch.long)
    for j in range(B):
        group, leaf = divmod(j, G)
        paths[j, 0] = group
        for level in range(depth + 1):
            paths[j, level + 1] = (leaf // branching ** (depth - level)) % (roots if level == 0 else branching)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = torch.arange(T).expand(B, T) < lengths[:, None]
    mask[:, 0] = True
    if empty_rows:
        mask[-empty_rows:] = False
    cuts = torch.sort(torch.randint(0, T, (B, depth), generator=gen), dim=1).values
    levels = 1 + (torch.arange(T)[None, None, :] >= cuts[:, :, None]).sum(1)
    scores = torch.randint(0, 2, (B,), generator=gen).double()
    return scores, paths, levels, mask


def test_hand_computed_tree():
    # one prompt, one root, branching 2, depth 1: leaves 0, 1 (score 1, 0) share the root node's 2 tokens
    scores = torch.tensor([1.0, 0.0], dtype=torch.float64)
    paths = torch.tensor([[0, 0, 0], [0, 0, 1]])
    levels = torch.tensor([[1, 1, 2, 2], [1, 1, 2, 2]])
    mask = torch.ones(2, 4, dtype=torch.bool)
    out = compute_tree_advantages(scores, paths, levels, mask)
    # V(root) = V(node) = 0.5; V(leaf 0) = 1, V(leaf 1) = 0: the shared tokens get 0.5 - 0.5 = 0, each leaf's own
    # tokens +-0.5; W: 0.5 until the branch, then 0.5 at each leaf's first token and the leaf's score after it
    torch.testing.assert_close(out.tree_advantages, torch.tensor([[0, 0, 0.5, 0.5], [0, 0, -0.5, -0.5]]).double())
    torch.testing.assert_close(out.state_values, torch.tensor([[0.5, 0.5, 0.5, 1], [0.5, 0.5, 0.5, 0]]).double())
    assert out.node_values.tolist() == [[0.5, 0.5, 1.0], [0.5, 0.5, 0.0]]


def test_advantages_telescope_to_the_group_baseline(gen):
    # along a row, each node's first token carries V(n) - V(parent): their sum is score - V(root)
    scores, paths, levels, mask = random_tree_batch(gen, T=20)
    levels = torch.where(mask, levels, 1)
    out = compute_tree_advantages(scores, paths, levels, mask)
    _, _, node_start = tree_token_values(out.node_values, levels, mask)
    per_node = (out.tree_advantages * node_start).sum(dim=1)
    skipped = torch.zeros_like(per_node)  # levels a row jumps over hold no token of it
    for b in range(len(scores)):
        seen = set(levels[b][mask[b]].tolist())
        skipped[b] = sum(
            out.node_values[b, k] - out.node_values[b, k - 1] for k in range(1, paths.shape[1]) if k not in seen
        )
    torch.testing.assert_close(per_node + skipped, scores - out.node_values[:, 0])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("with_segments", [False, True])
def test_equals_reference(seed, with_segments):
    gen = torch.Generator().manual_seed(seed)
    scores, paths, levels, mask = random_tree_batch(gen, groups=2, roots=1 + seed % 2, depth=1 + seed % 3, T=16)
    if seed % 3 == 2:
        mask[1, 3:6] = False  # interior zeros
        mask[-1] = False  # a row with no valid token: no leaf
    B, T = mask.shape
    local_values = torch.randn(B, T, generator=gen, dtype=torch.float64)
    lam = torch.rand(B, T, generator=gen, dtype=torch.float64) if seed % 2 else 0.9
    seg = None
    if with_segments:
        ids = torch.randint(0, 5, (B, T), generator=gen)
        table = torch.zeros(5, dtype=torch.bool)
        table[0] = True
        safe = mask.clone()
        safe[~mask.any(1), 0] = True  # segment_ids refuses empty rows: give them a token, then ignore them
        seg = segment_ids(ids, safe, table)
    got = compute_tree_advantages(
        scores, paths, levels, mask, local_values=local_values, seg_ids=seg, lam=lam, local_weight=0.7
    )
    want = ref_tree(scores, paths, levels, mask, local_values, seg, lam, local_weight=0.7)
    m = mask
    for name in ("tree_advantages", "state_values", "advantages", "local_returns", "global_returns"):
        torch.testing.assert_close(getattr(got, name)[m], want[name][m], msg=name)
    assert torch.equal(got.start_mask & m, want["start_mask"] & m)


def test_node_values_float32_and_leaf_mask():
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0])
    paths = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]])
    values = tree_node_values(scores, paths, torch.tensor([True, True, True, False]))
    assert values.dtype == torch.float32
    # root: mean of 1, 0, 1; node 1 holds leaves 2 (1) and 3 (not counted): 1; leaf 3 counts nothing: 0
    want = torch.tensor([[2 / 3, 0.5, 1.0], [2 / 3, 0.5, 0.0], [2 / 3, 1.0, 1.0], [2 / 3, 1.0, 0.0]])
    torch.testing.assert_close(values, want)


def test_ids_are_per_parent():
    # the same id under two parents is two nodes
    scores = torch.tensor([1.0, 0.0])
    paths = torch.tensor([[0, 0, 0], [0, 1, 0]])
    assert tree_node_values(scores, paths)[:, 2].tolist() == [1.0, 0.0]


def test_empty_batch():
    out = compute_tree_advantages(
        torch.zeros(0), torch.zeros(0, 3, dtype=torch.long), torch.ones(0, 5, dtype=torch.long), torch.zeros(0, 5),
        local_values=torch.zeros(0, 5),
    )  # fmt: skip
    assert out.advantages.shape == (0, 5)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(scores=torch.tensor([1.0, float("nan")])), ValueError, "scores"),
        (dict(tree_paths=torch.zeros(2, 3)), TypeError, "tree_paths"),
        (dict(tree_paths=torch.zeros(3, 3, dtype=torch.long)), ValueError, "tree_paths"),
        (dict(tree_paths=torch.zeros(2, 1, dtype=torch.long)), ValueError, "tree_paths"),
        (dict(token_levels=torch.tensor([[1, 3], [1, 2]])), ValueError, "token_levels"),
        (dict(token_levels=torch.tensor([[0, 1], [1, 2]])), ValueError, "token_levels"),
        (dict(token_levels=torch.tensor([[2, 1], [1, 2]])), ValueError, "nondecreasing"),
        (dict(token_levels=torch.ones(2, 2)), TypeError, "token_levels"),
        (dict(response_mask=torch.full((2, 2), 2)), ValueError, "response_mask"),
        (dict(local_values=torch.zeros(2, 3)), ValueError, "local_values"),
        (dict(local_values=torch.tensor([[0.0, float("inf")], [0.0, 0.0]])), ValueError, "local_values"),
        (dict(local_weight=-1.0), ValueError, "local_weight"),
        (dict(local_weight="1"), TypeError, "local_weight"),
    ],
)
def test_bad_input_names_the_argument(change, error, match):
    kwargs = dict(
        scores=torch.tensor([1.0, 0.0]),
        tree_paths=torch.tensor([[0, 0, 0], [0, 0, 1]]),
        token_levels=torch.tensor([[1, 2], [1, 2]]),
        response_mask=torch.ones(2, 2),
        local_values=torch.zeros(2, 2),
    )
    kwargs.update(change)
    with pytest.raises(error, match=match):
        compute_tree_advantages(
            kwargs.pop("scores"), kwargs.pop("tree_paths"), kwargs.pop("token_levels"), kwargs.pop("response_mask"),
            **kwargs,
        )  # fmt: skip
