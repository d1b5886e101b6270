"""Every public core function checks its hyper-parameters by the rule of the `SynAPOParams` field they stand for (one
table, `core/_hparams.py`): a value `SynAPOParams` refuses, the function refuses with the same exception type, naming
its own argument; a value `SynAPOParams` accepts, the function accepts. Bad data that gave a silent NaN or a bare
error names the argument too."""

from __future__ import annotations

import math

import pytest
import torch

from synapo_ext.core import (
    SynAPOParams,
    compute_gae,
    compute_synapo_advantages,
    critic_objective,
    ea_gae_lambda,
    hvm_advantages,
    params_from_preset,
    positive_lm_loss,
    positive_lm_weights,
    scvl_group_stats,
    scvl_loss,
    scvl_pairs,
    scvl_split_loss,
    segment_ids,
    value_loss,
)
from synapo_ext.core.backend import use_backend

B, T = 4, 6
MASK = torch.ones(B, T)
REWARDS = torch.zeros(B, T)
REWARDS[:, -1] = torch.tensor([1.0, 0.0, 1.0, 0.0])
VALUES = torch.linspace(0, 1, B * T).view(B, T)
ENTROPY = torch.full((B, T), 0.5)
IDS = torch.tensor([[1, 2, 3, 4, 5, 6], [1, 2, 3, 9, 9, 9], [1, 2, 7, 7, 7, 7], [1, 2, 3, 4, 5, 8]])
TABLE = torch.zeros(10, dtype=torch.bool)
TABLE[4] = True
SEG = torch.tensor([[0, 0, 1, 1, 2, 2]] * B)
SCORES = torch.tensor([1.0, 0.0, 1.0, 0.0])
GROUPS = torch.tensor([0, 0, 1, 1])
PAIR = (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))

# (function, argument) -> (call with that argument set, the SynAPOParams field whose rule it follows)
CASES = {
    ("ea_gae_lambda", "alpha"): (lambda v: ea_gae_lambda(MASK, ENTROPY, alpha=v), "ea_gae_alpha"),
    ("ea_gae_lambda", "beta"): (lambda v: ea_gae_lambda(MASK, ENTROPY, alpha=0.05, beta=v), "ea_gae_beta"),
    ("ea_gae_lambda", "lambda_min"): (lambda v: ea_gae_lambda(MASK, alpha=0.05, lambda_min=v), "ea_gae_lambda_min"),
    ("ea_gae_lambda", "lambda_max"): (lambda v: ea_gae_lambda(MASK, alpha=0.05, lambda_max=v), "ea_gae_lambda_max"),
    ("compute_gae", "gamma"): (lambda v: compute_gae(REWARDS, VALUES, MASK, gamma=v, lam=0.9), "gamma"),
    ("compute_gae", "lam"): (lambda v: compute_gae(REWARDS, VALUES, MASK, gamma=1.0, lam=v), "gae_lambda"),
    ("compute_gae", "whiten"): (
        lambda v: compute_gae(REWARDS, VALUES, MASK, gamma=1.0, lam=0.9, whiten=v),
        "whiten_advantages",
    ),
    ("hvm_advantages", "global_lam"): (
        lambda v: hvm_advantages(
            REWARDS, VALUES, VALUES, MASK, SEG, gamma=1.0, lam=0.9, global_lam=v, global_weight=1.0
        ),
        "hvm_global_lambda",
    ),
    ("hvm_advantages", "global_weight"): (
        lambda v: hvm_advantages(
            REWARDS, VALUES, VALUES, MASK, SEG, gamma=1.0, lam=0.9, global_lam=0.9, global_weight=v
        ),
        "hvm_global_weight",
    ),
    ("segment_ids", "min_len"): (lambda v: segment_ids(IDS, MASK, TABLE, min_len=v), "hvm_min_len"),
    ("segment_ids", "max_len"): (lambda v: segment_ids(IDS, MASK, TABLE, max_len=v), "hvm_max_len"),
    ("segment_ids", "fallback_len"): (lambda v: segment_ids(IDS, MASK, TABLE, fallback_len=v), "hvm_fallback_len"),
    ("scvl_pairs", "threshold"): (lambda v: scvl_pairs(IDS, MASK, SCORES, GROUPS, threshold=v), "scvl_threshold"),
    ("scvl_pairs", "max_pairs"): (lambda v: scvl_pairs(IDS, MASK, SCORES, GROUPS, max_pairs=v), "scvl_max_pairs"),
    ("scvl_group_stats", "threshold"): (lambda v: scvl_group_stats(SCORES, GROUPS, threshold=v), "scvl_threshold"),
    ("scvl_loss", "margin"): (lambda v: scvl_loss(VALUES, *PAIR, margin=v), "scvl_margin"),
    ("scvl_split_loss", "margin"): (
        lambda v: scvl_split_loss(
            VALUES, PAIR[0], PAIR[2], torch.tensor([0.0]), torch.tensor([True]), margin=v, num_pairs=1
        ),
        "scvl_margin",
    ),
    ("critic_objective", "scvl_weight"): (
        lambda v: critic_objective(
            VALUES, VALUES, MASK, scvl_sides=_sides(), scvl_weight=v, scvl_margin=0.5, num_pairs=1
        ),
        "scvl_weight",
    ),
    ("positive_lm_weights", "coef"): (
        lambda v: positive_lm_weights(SCORES, coef=v, threshold=0.5),
        "positive_lm_coef",
    ),
    ("positive_lm_weights", "threshold"): (
        lambda v: positive_lm_weights(SCORES, coef=0.1, threshold=v),
        "positive_lm_threshold",
    ),
}

# values of every kind: NaN/inf, strings (e.g. from a YAML file), booleans, None, negatives, out of [0, 1], ints
PROBES = [math.nan, math.inf, -math.inf, "0.5", "1", True, None, -1.0, -1, 0, 0.0, 0.5, 1, 1.0, 1.5, 2, 64]


def _sides():
    from synapo_ext.core import SCVLSides

    return SCVLSides(PAIR[0], PAIR[2], torch.tensor([0.0]), torch.tensor([True]))


def _outcome(call):
    try:
        call()
    except (TypeError, ValueError) as exc:
        return type(exc), str(exc)
    return None, ""


@pytest.mark.parametrize("case", sorted(CASES), ids=lambda c: f"{c[0]}-{c[1]}")
@pytest.mark.parametrize("value", PROBES, ids=repr)
def test_public_functions_follow_the_rule_of_their_synapo_field(case, value):
    call, field = CASES[case]
    reference, _ = _outcome(lambda: SynAPOParams(**{field: value}))
    got, message = _outcome(lambda: call(value))
    assert got is reference, (case, value, message)
    if got is not None:
        assert f"`{case[1]}`" in message, message  # the function's own argument, not the field


def test_nan_beta_used_to_give_nan_lambdas():
    with pytest.raises(ValueError, match="`beta` must be finite"):
        ea_gae_lambda(MASK, ENTROPY, alpha=0.05, beta=math.nan)


def test_a_string_alpha_is_a_type_error_naming_alpha():
    with pytest.raises(TypeError, match="`alpha`"):  # used to be "'>' not supported between 'str' and 'int'"
        ea_gae_lambda(MASK, alpha="0.05")


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_negative_entropy_beyond_rounding_is_named(backend):
    entropy = ENTROPY.clone()
    entropy[1, 2] = -3.0  # e.g. log-probabilities passed for the entropy
    params = params_from_preset("synapo-no-hvm", scvl_enabled=False)
    with use_backend(backend), pytest.raises(ValueError, match="`entropy` must be >= 0"):
        compute_synapo_advantages(params, rewards=REWARDS, values=VALUES, response_mask=MASK, entropy=entropy)
    with pytest.raises(ValueError, match="`entropy` must be >= 0"):
        ea_gae_lambda(MASK, entropy, alpha=0.05, beta=0.05)
    entropy[1, 2] = -0.01  # rounding of a low-precision entropy: accepted
    with use_backend(backend):
        compute_synapo_advantages(params, rewards=REWARDS, values=VALUES, response_mask=MASK, entropy=entropy)
    mask = MASK.clone()
    mask[1, 2], entropy[1, 2] = 0, -50.0  # a masked position may hold any finite value
    with use_backend(backend):
        compute_synapo_advantages(params, rewards=REWARDS, values=VALUES, response_mask=mask, entropy=entropy)


def test_scvl_loss_names_nan_values_and_bad_indices():
    values = VALUES.clone().requires_grad_()
    with pytest.raises(ValueError, match="`values` holds 1 NaN"):
        scvl_loss(VALUES.index_put((PAIR[0], PAIR[2] + 1), torch.tensor(math.nan)), *PAIR, margin=0.5)
    with pytest.raises(ValueError, match="`pos_index` holds entries in \\[4, 4\\], outside \\[0, 4\\)"):
        scvl_loss(values, torch.tensor([B]), PAIR[1], PAIR[2], margin=0.5)  # used to be a bare IndexError
    with pytest.raises(ValueError, match="`diverge_index` \\+ 1"):
        scvl_loss(values, *PAIR[:2], torch.tensor([T - 1]), margin=0.5)
    with pytest.raises(TypeError, match="`neg_index` must be an integer tensor"):
        scvl_loss(values, PAIR[0], PAIR[1].float(), PAIR[2], margin=0.5)
    with pytest.raises(ValueError, match="`rows`"):
        scvl_split_loss(values, torch.tensor([-1]), PAIR[2], torch.tensor([0.0]), torch.tensor([True]), margin=0.5,
                        num_pairs=1)  # fmt: skip
    with pytest.raises(ValueError, match="`partner_values` holds 1 NaN"):
        scvl_split_loss(values, PAIR[0], PAIR[2], torch.tensor([math.nan]), torch.tensor([True]), margin=0.5,
                        num_pairs=1)  # fmt: skip
    scvl_loss(values, *PAIR, margin=0.5).backward()  # legal input still works, with a gradient
    assert values.grad is not None


@pytest.mark.parametrize("where", ["valid", "masked"])
@pytest.mark.parametrize("name", ["values", "returns", "old_values"])
def test_value_loss_names_nan_inputs(name, where):
    inputs = {"values": VALUES.clone(), "returns": VALUES.flip(0).clone(), "old_values": VALUES.clone()}
    mask = MASK.clone()
    inputs[name][1, 3] = math.nan
    if where == "masked":
        mask[1, 3] = 0  # NaN * 0 is NaN: a masked NaN poisons the loss too
    with pytest.raises(ValueError, match=f"`{name}` holds 1 NaN"):
        value_loss(inputs["values"], inputs["returns"], mask, old_values=inputs["old_values"], cliprange_value=0.2)


@pytest.mark.parametrize(("value", "error"), [(math.nan, ValueError), (-0.1, ValueError), ("0.2", TypeError)])
def test_value_loss_checks_cliprange_value(value, error):
    with pytest.raises(error, match="`cliprange_value`"):  # NaN used to clamp everything to NaN
        value_loss(VALUES, VALUES, MASK, old_values=VALUES, cliprange_value=value)


def test_value_loss_overflow_is_named():
    with pytest.raises(ValueError, match="overflow"):
        value_loss(torch.full((B, T), 1e30), torch.zeros(B, T), MASK)


def test_positive_lm_loss_names_nan_log_probs():
    log_probs = torch.full((B, T), -1.0)
    log_probs[0, 2] = math.nan  # row 0 has a weight
    with pytest.raises(ValueError, match="`log_probs` holds 1 NaN/inf"):
        positive_lm_loss(log_probs, MASK, torch.tensor([0.1, 0.0, 0.1, 0.0]))
    log_probs[0, 2], log_probs[1, 2] = -1.0, math.nan  # row 1 has no weight: not counted, no NaN
    assert torch.isfinite(positive_lm_loss(log_probs, MASK, torch.tensor([0.1, 0.0, 0.1, 0.0])))
    with pytest.raises(ValueError, match="`weights` holds 1 NaN"):
        positive_lm_loss(torch.full((B, T), -1.0), MASK, torch.tensor([0.1, math.nan, 0.1, 0.0]))
    with pytest.raises(TypeError, match="`num_tokens`"):
        positive_lm_loss(torch.full((B, T), -1.0), MASK, torch.tensor([0.1, 0.0, 0.1, 0.0]), num_tokens="8")


@pytest.mark.parametrize(
    "call",
    [
        lambda m: compute_gae(m, VALUES, MASK, gamma=1.0, lam=0.9),
        lambda m: value_loss(m, VALUES, MASK),
        lambda m: ea_gae_lambda(MASK, m, alpha=0.05),
        lambda m: scvl_loss(m, *PAIR, margin=0.5),
    ],
)
def test_a_meta_device_tensor_is_named(call):
    with pytest.raises(ValueError, match="meta device"):
        call(torch.empty(B, T, device="meta"))


def test_compute_synapo_advantages_checks_its_params():
    params = params_from_preset("vapo")
    params.gamma = math.nan  # assigned after construction: dataclasses do not check it
    with pytest.raises(ValueError, match="`gamma` must be finite"):
        compute_synapo_advantages(params, rewards=REWARDS, values=VALUES, response_mask=MASK)
    with pytest.raises(TypeError, match="`params` must be a SynAPOParams"):
        compute_synapo_advantages({"gamma": 1.0}, rewards=REWARDS, values=VALUES, response_mask=MASK)
