"""scvl_pairs, scvl_group_stats and scvl_loss against the loop reference (SPEC "SCVL" and "The core API")."""

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from synapo_ext.core import scvl_group_stats, scvl_loss, scvl_pairs
from synapo_ext.core.backend import numba_available, use_backend

from .reference import ref_scvl_group_stats, ref_scvl_loss, ref_scvl_loss_grad, ref_scvl_pairs
from .strategies import DEFAULT, SLOW, generators, scvl_cases, uniform

needs_numba = pytest.mark.skipif(not numba_available(), reason="numba not installed")


def _pairs(case, **overrides):
    kwargs = dict(threshold=case.threshold, max_pairs=case.max_pairs)
    kwargs.update(overrides)
    return kwargs


def as_triples(result) -> list[tuple[int, int, int]]:
    pos_index, neg_index, diverge_index = result
    for index in result:
        assert index.dtype == torch.int64 and index.dim() == 1
    return list(zip(pos_index.tolist(), neg_index.tolist(), diverge_index.tolist(), strict=True))


def check_pairs_against_reference(case):
    result = scvl_pairs(case.response_ids, case.response_mask, case.scores, case.group_ids, **_pairs(case))
    assert result.pos_index is result[0] and result.neg_index is result[1] and result.diverge_index is result[2]
    expected = ref_scvl_pairs(case.response_ids, case.response_mask, case.scores, case.group_ids, **_pairs(case))
    actual = as_triples(result)
    assert set(actual) == set(expected)
    assert actual == expected  # documented order: group (first appearance), d descending, pos, neg


@DEFAULT
@given(case=scvl_cases())
def test_scvl_pairs_match_reference(case):
    check_pairs_against_reference(case)


@pytest.mark.slow
@SLOW
@given(case=scvl_cases())
def test_scvl_pairs_match_reference_slow(case):
    check_pairs_against_reference(case)


@DEFAULT
@given(case=scvl_cases())
def test_scvl_group_stats_match_reference(case):
    stats = scvl_group_stats(case.scores, case.group_ids, threshold=case.threshold)
    expected = ref_scvl_group_stats(case.scores, case.group_ids, threshold=case.threshold)
    assert {key: int(stats[key]) for key in expected} == expected


@DEFAULT
@given(case=scvl_cases(), gen=generators())
def test_padding_ids_do_not_matter(case, gen):
    # Ids from a row's length on (right padding) are never compared.
    B, T = case.response_ids.shape
    lengths = (torch.arange(1, T + 1) * case.response_mask.bool().long()).max(dim=1, keepdim=True).values
    padding = torch.arange(T) >= lengths
    junk = torch.where(padding, torch.randint(-100, 100, (B, T), generator=gen), case.response_ids)
    expected = as_triples(
        scvl_pairs(case.response_ids, case.response_mask, case.scores, case.group_ids, **_pairs(case))
    )
    assert as_triples(scvl_pairs(junk, case.response_mask, case.scores, case.group_ids, **_pairs(case))) == expected


def check_loss_against_reference(case, gen, margin, dtype):
    pairs = ref_scvl_pairs(case.response_ids, case.response_mask, case.scores, case.group_ids, **_pairs(case))
    values = uniform(case.response_ids.shape, gen, -1.0, 1.0, dtype).requires_grad_(True)
    V = values.detach().double()
    # Stay away from the hinge's kink, where the gradient is not defined.
    assume(all(abs(margin - (V[i, d + 1] - V[j, d + 1])) > 1e-4 for i, j, d in pairs))
    index = [torch.tensor([p[k] for p in pairs], dtype=torch.int64) for k in range(3)]
    loss = scvl_loss(values, *index, margin=margin)
    assert loss.dim() == 0 and loss.dtype == dtype
    assert not torch.isnan(loss)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(
        loss.detach().double(),
        torch.tensor(ref_scvl_loss(values, pairs, margin=margin), dtype=torch.float64),
        atol=tolerance,
        rtol=0,
    )
    loss.backward()
    torch.testing.assert_close(
        values.grad.double(), ref_scvl_loss_grad(values, pairs, margin=margin), atol=tolerance, rtol=0
    )


@DEFAULT
@given(
    case=scvl_cases(),
    gen=generators(),
    margin=st.sampled_from([0.5, 0.0]) | st.floats(0.0, 2.0),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_scvl_loss_matches_reference(case, gen, margin, dtype):
    check_loss_against_reference(case, gen, margin, dtype)


@pytest.mark.slow
@SLOW
@given(
    case=scvl_cases(),
    gen=generators(),
    margin=st.sampled_from([0.5, 0.0]) | st.floats(0.0, 2.0),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_scvl_loss_matches_reference_slow(case, gen, margin, dtype):
    check_loss_against_reference(case, gen, margin, dtype)


# ---------------------------------------------------------------------------------------------------------------
# Hand-computed cases
# ---------------------------------------------------------------------------------------------------------------

# Group "a" (rows 0-3) and group "b" (rows 4-5, both negative: no pair).
#   row 0  positive  [5 6 7 8]  length 4
#   row 1  negative  [5 6 9 9]  length 4
#   row 2  negative  [5 1 1 .]  length 3
#   row 3  positive  [5 6 7 .]  length 3
# (0, 1): first difference at d = 2; 3 < 4 and 3 < 4: kept.
# (0, 2): d = 1; 2 < 4 and 2 < 3: kept.
# (3, 1): d = 2; row 3 has length 3 and 3 < 3 fails (no state after d): skipped.
# (3, 2): d = 1: kept.
# Order: d descending, then positive index: (0, 1, 2), (0, 2, 1), (3, 2, 1).
IDS = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 9], [5, 1, 1, 0], [5, 6, 7, 0], [1, 2, 3, 4], [1, 2, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
SCORES = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
GROUPS = ["a", "a", "a", "a", "b", "b"]


def test_hand_case_pairs():
    assert as_triples(scvl_pairs(IDS, MASK, SCORES, GROUPS)) == [(0, 1, 2), (0, 2, 1), (3, 2, 1)]


@pytest.mark.parametrize("max_pairs, expected", [(1, [(0, 1, 2)]), (2, [(0, 1, 2), (0, 2, 1)])])
def test_max_pairs_keeps_largest_d(max_pairs, expected):
    assert as_triples(scvl_pairs(IDS, MASK, SCORES, GROUPS, max_pairs=max_pairs)) == expected


def test_ties_by_positive_then_negative_index():
    # Every pair diverges at d = 0 (first tokens differ): order by (pos, neg); max_pairs 3 drops (3, 2).
    ids = torch.tensor([[2, 5, 5], [1, 5, 5], [3, 6, 6], [1, 6, 6]])
    scores = torch.tensor([0.0, 1.0, 0.0, 1.0])
    result = as_triples(scvl_pairs(ids, torch.ones(4, 3), scores, [7, 7, 7, 7], max_pairs=3))
    assert result == [(1, 0, 0), (1, 2, 0), (3, 0, 0)]


def test_groups_in_order_of_first_appearance():
    # Group "g2" appears first (row 0), so its pair comes first even though group "g1"'s pair has the larger d.
    ids = torch.tensor([[1, 2, 3, 4, 5], [7, 7, 7, 7, 5], [1, 9, 9, 9, 9], [7, 7, 7, 1, 1]])
    scores = torch.tensor([1.0, 1.0, 0.0, 0.0])
    result = as_triples(scvl_pairs(ids, torch.ones(4, 5), scores, ["g2", "g1", "g2", "g1"]))
    assert result == [(0, 2, 1), (1, 3, 3)]


def test_threshold_is_inclusive():
    # score == threshold is positive.
    ids = torch.tensor([[1, 2, 3], [1, 3, 3]])
    result = as_triples(scvl_pairs(ids, torch.ones(2, 3), torch.tensor([0.5, 0.49]), [0, 0], threshold=0.5))
    assert result == [(0, 1, 1)]


def test_identical_responses_give_no_pair():
    # Equal ids and lengths: d = length, so no state after d.
    ids = torch.tensor([[1, 2, 3], [1, 2, 3]])
    assert as_triples(scvl_pairs(ids, torch.ones(2, 3), torch.tensor([1.0, 0.0]), [0, 0])) == []


def test_hand_case_loss_and_gradient():
    # Pairs (0, 1, 2), (0, 2, 1), (3, 2, 1); margin 0.5; compare V at d + 1:
    #   (0, 1): V[0, 3] - V[1, 3] = 1.0 - 0.2 = 0.8 -> max(0, 0.5 - 0.8) = 0 (inactive)
    #   (0, 2): V[0, 2] - V[2, 2] = 0.3 - 0.1 = 0.2 -> 0.3
    #   (3, 2): V[3, 2] - V[2, 2] = -0.2 - 0.1 = -0.3 -> 0.8
    # loss = (0 + 0.3 + 0.8) / 3. Gradient (P = 3): -1/3 at V[0, 2] and V[3, 2]; +1/3 + 1/3 at V[2, 2].
    values = torch.zeros(6, 4)
    values[0, 3], values[1, 3], values[0, 2], values[2, 2], values[3, 2] = 1.0, 0.2, 0.3, 0.1, -0.2
    values.requires_grad_(True)
    pairs = scvl_pairs(IDS, MASK, SCORES, GROUPS)
    loss = scvl_loss(values, *pairs, margin=0.5)
    torch.testing.assert_close(loss, torch.tensor(1.1 / 3))
    loss.backward()
    expected = torch.zeros(6, 4)
    expected[0, 2], expected[3, 2], expected[2, 2] = -1 / 3, -1 / 3, 2 / 3
    torch.testing.assert_close(values.grad, expected)


def test_group_without_positive_gives_zero_loss_with_gradient():
    ids = torch.tensor([[1, 2, 3], [1, 3, 3], [4, 4, 4]])
    scores = torch.tensor([0.0, 0.0, 0.0])
    pairs = scvl_pairs(ids, torch.ones(3, 3), scores, ["u", "u", "v"])
    assert all(index.shape == (0,) and index.dtype == torch.int64 for index in pairs)
    values = torch.randn(3, 3, requires_grad=True)
    loss = scvl_loss(values, *pairs, margin=0.5)
    assert loss.dim() == 0
    assert loss.item() == 0.0  # exactly 0, not NaN
    loss.backward()
    assert values.grad is not None and torch.equal(values.grad, torch.zeros(3, 3))
    stats = scvl_group_stats(scores, ["u", "u", "v"], threshold=0.5)
    assert {key: int(stats[key]) for key in ("groups", "groups_mixed", "groups_all_negative")} == {
        "groups": 2,
        "groups_mixed": 0,
        "groups_all_negative": 2,
    }


def test_group_stats_hand_case():
    stats = scvl_group_stats(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0]), ["a", "a", "b", "b", "c"], threshold=0.5)
    expected = {"groups": 3, "groups_mixed": 1, "groups_all_positive": 1, "groups_all_negative": 1}
    assert {key: int(stats[key]) for key in expected} == expected


@pytest.mark.parametrize("form", ["tensor", "str_list", "int_tuple"])
def test_group_id_forms_agree(form):
    group_ids = {"tensor": torch.tensor([3, 3, 3, 3, 8, 8]), "str_list": GROUPS, "int_tuple": (3, 3, 3, 3, 8, 8)}
    assert as_triples(scvl_pairs(IDS, MASK, SCORES, group_ids[form])) == [(0, 1, 2), (0, 2, 1), (3, 2, 1)]


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_ids", [["a", "a", None, "a", "b", "b"], [None] * 6])
def test_missing_group_id(group_ids):
    with pytest.raises(ValueError, match="group_ids"):
        scvl_pairs(IDS, MASK, SCORES, group_ids)
    with pytest.raises(ValueError, match="group_ids"):
        scvl_group_stats(SCORES, group_ids, threshold=0.5)


@pytest.mark.parametrize(
    "group_ids", [["a"] * 5, torch.zeros(7, dtype=torch.long), torch.zeros(6, 1, dtype=torch.long)]
)
def test_group_ids_length(group_ids):
    with pytest.raises(ValueError, match="group_ids"):
        scvl_pairs(IDS, MASK, SCORES, group_ids)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scores(bad):
    scores = SCORES.clone()
    scores[2] = bad
    with pytest.raises(ValueError, match="scores"):
        scvl_pairs(IDS, MASK, scores, GROUPS)
    with pytest.raises(ValueError, match="scores"):
        scvl_group_stats(scores, GROUPS, threshold=0.5)


def test_scores_shape():
    with pytest.raises(ValueError, match="scores"):
        scvl_pairs(IDS, MASK, SCORES[:5], GROUPS)


@pytest.mark.parametrize("max_pairs", [0, -1])
def test_max_pairs_at_least_one(max_pairs):
    with pytest.raises(ValueError, match="max_pairs"):
        scvl_pairs(IDS, MASK, SCORES, GROUPS, max_pairs=max_pairs)


@pytest.mark.parametrize("bad", [2, 0.5])
def test_mask_values(bad):
    mask = MASK.clone().float()
    mask[0, 0] = bad
    with pytest.raises(ValueError, match="response_mask"):
        scvl_pairs(IDS, mask, SCORES, GROUPS)


def test_all_masked_row():
    mask = MASK.clone()
    mask[5] = 0
    with pytest.raises(ValueError, match="response_mask"):
        scvl_pairs(IDS, mask, SCORES, GROUPS)


def test_ids_mask_shape_mismatch():
    with pytest.raises(ValueError, match="response_ids|response_mask"):
        scvl_pairs(IDS, MASK[:, :3], SCORES, GROUPS)


def test_non_tensor_scores():
    with pytest.raises(TypeError, match="scores"):
        scvl_pairs(IDS, MASK, SCORES.tolist(), GROUPS)


@pytest.mark.parametrize("backend", ["torch", pytest.param("numba", marks=needs_numba)])
def test_row_lengths_are_last_valid_position_plus_one_and_0_for_an_empty_row(backend):
    from synapo_ext.core.scvl import row_lengths

    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0]], dtype=torch.bool)
    with use_backend(backend):
        assert row_lengths(mask).tolist() == [3, 0, 4, 1]
        assert row_lengths(mask[:, :0]).tolist() == [0, 0, 0, 0]
