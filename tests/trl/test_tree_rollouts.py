"""Segment-tree rollouts in SynAPOTrainer: the trees' structure, the tokens they save, their advantages against the
float64 reference of tests/core, and the refusals."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

from synapo_ext.core import actor_lambda, segment_ids  # noqa: E402
from synapo_ext.trl.tree import grow_trees, token_levels  # noqa: E402

from ..core.test_tree import ref_tree  # noqa: E402
from .tiny import make_tokenizer  # noqa: E402

pytestmark = pytest.mark.trl

TREE = dict(rollout_tree_roots=1, rollout_tree_branching=2, rollout_tree_depth=2, num_generations=4)


def last_char_reward(completions, **kwargs):
    """1.0 when the completion ends with a digit: leaves of one tree differ (their first tokens are shared)."""
    return [1.0 if c[-1:].isdigit() else 0.0 for c in completions]


def shared_level(paths: torch.Tensor, i: int, j: int) -> int:
    """The deepest level (column of `paths`, >= 1) at which rows i and j share a node, 0 for different roots."""
    level = 0
    for column in range(1, paths.shape[1]):
        if not torch.equal(paths[i, : column + 1], paths[j, : column + 1]):
            break
        level = column
    return level


# --- grow_trees with a scripted generator ----------------------------------------------------------------------


def scripted_generate(calls):
    """Each call returns, per prompt, [len(prompt), 7 (delimiter)] or, at the last level, [len(prompt), 9, 1 (eos)]:
    completions differ between nodes (their prompts differ in length) and are deterministic."""

    def generate(prompts, max_new_tokens, stop_at_delimiter):
        calls.append((len(prompts), max_new_tokens, stop_at_delimiter))
        tail = [7] if stop_at_delimiter else [9, 1]
        return [[len(p) * 10 + k] + tail for k, p in enumerate(prompts)]

    return generate


def test_grow_trees_shares_prefixes_and_counts_each_node_once():
    calls = []
    prompts = [[5, 5]] * 4 + [[6]] * 4  # two prompts, one root each, branching 2, depth 2
    completions, tree = grow_trees(
        prompts, scripted_generate(calls), roots=1, branching=2, depth=2, segments=1, max_length=20,
        stop_ids={7}, eos_ids={1},
    )  # fmt: skip
    assert [c[:2] for c in completions[:4]] == [completions[0][:2]] * 4  # the root's 2 tokens, shared
    assert completions[0][:4] == completions[1][:4] and completions[2][:4] == completions[3][:4]
    assert completions[0][4:] != completions[1][4:] and completions[1][2:4] != completions[2][2:4]
    assert tree.branch_positions.tolist() == [[2, 4]] * 8
    assert tree.paths[:4].tolist() == [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 2], [0, 0, 1, 3]]
    # per group: root 2 + two level-1 nodes 2 each + four leaves 3 each = 18 generated, 4 leaves x 7 = 28
    assert (tree.generated, tree.leaf) == (36, 56)
    assert [c[2] for c in calls] == [True, True, False]  # one generate call per level, the last without delimiter
    assert all(len(c) == 7 and c[-1] == 1 for c in completions)


def test_grow_trees_copies_a_node_that_ends_before_its_branch_point():
    def generate(prompts, max_new_tokens, stop_at_delimiter):
        return [[3, 1] if len(p) == 1 else [4, 7] for p in prompts]  # prompt [6] ends at once (eos)

    completions, tree = grow_trees(
        [[5, 5]] * 2 + [[6]] * 2, generate, roots=1, branching=2, depth=1, segments=1, max_length=8,
        stop_ids={7}, eos_ids={1},
    )  # fmt: skip
    assert completions[2] == completions[3] == [3, 1]  # copied into both leaves, no more tokens generated
    assert tree.branch_positions[2:].tolist() == [[2], [2]]  # no token at level 2
    assert tree.ended_early == 1 and tree.inner_nodes == 2


def test_grow_trees_respects_the_length_budget_and_segments():
    seen = []

    def generate(prompts, max_new_tokens, stop_at_delimiter):
        seen.append(max_new_tokens)
        return [[2, 7] if stop_at_delimiter else [8] * max_new_tokens for _ in prompts]

    completions, tree = grow_trees(
        [[0]] * 2, generate, roots=1, branching=2, depth=1, segments=2, max_length=6, stop_ids={7}, eos_ids={1}
    )
    assert seen == [6, 4, 2]  # two segments of 2 before the branch, then the rest of the budget
    assert all(len(c) == 6 for c in completions) and tree.branch_positions.tolist() == [[4], [4]]


def test_grow_trees_keeps_step_with_other_processes():
    # this process's nodes all end at once; another process generates two more rounds at each level
    calls, rounds = [], iter([True, True, True, False, True, True, True, False])

    def generate(prompts, max_new_tokens, stop_at_delimiter):
        calls.append((len(prompts), max_new_tokens))
        return [[1] for _ in prompts]

    completions, tree = grow_trees(
        [[0]] * 2, generate, roots=1, branching=2, depth=1, segments=1, max_length=4, stop_ids={7}, eos_ids={1},
        any_process=lambda flag: next(rounds),
    )  # fmt: skip
    # level 0: the real call, then 2 throw-away calls; level 1 (no node left here): 3 throw-away calls
    assert calls == [(1, 4), (1, 1), (1, 1), (1, 1), (1, 1), (1, 1)]
    assert completions == [[1], [1]] and tree.generated == 1


def test_grow_trees_refuses_mixed_groups():
    with pytest.raises(ValueError, match="different prompts"):
        grow_trees(
            [[1], [2]], None, roots=1, branching=2, depth=1, segments=1, max_length=4, stop_ids=set(), eos_ids=set()
        )


def test_token_levels():
    # row 1: levels 2 and 3 both start at 1 (level 2 holds no token)
    assert token_levels(torch.tensor([[2, 4], [1, 1]]), 5).tolist() == [[1, 1, 2, 2, 3], [1, 3, 3, 3, 3]]


# --- the trainer -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["synapo", "vapo"])
def test_tree_rollouts_train_with_tree_advantages(make_trainer, tokenizer, preset):
    delimiter = tokenizer.convert_tokens_to_ids("\n\n")
    trainer = make_trainer(
        preset,
        reward_funcs=[last_char_reward],
        per_device_train_batch_size=8,
        max_completion_length=12,
        whiten_advantages=False,
        rollout_tree_local_weight=0.5,
        generation_kwargs={"sequence_bias": {(delimiter,): 1.0}},  # the random tiny policy closes segments sooner
        **TREE,
    )
    captured = []
    core_stage = trainer._core_stage

    def spy(mask, rewards, values, entropy, completion_ids, scores, mode):
        tree = trainer._tree_rollout
        result, scope = core_stage(mask, rewards, values, entropy, completion_ids, scores, mode)
        captured.append((tree, mask.bool(), values, entropy, completion_ids, scores.double(), result))
        return result, scope

    trainer._core_stage = spy
    policy_before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    generation_before = (list(trainer.eos_token_ids), dict(trainer.generation_kwargs))
    generation_before += (trainer.generation_config.to_dict(),)
    trainer.train()
    # the stop tokens and lengths of each level's generate call are TRL's own again afterwards
    generation_after = (trainer.eos_token_ids, trainer.generation_kwargs, trainer.generation_config.to_dict())
    assert generation_after == generation_before
    assert any(not torch.equal(v, policy_before[k]) for k, v in trainer.model.state_dict().items())
    assert len(captured) == 2
    pairs = 0
    for tree, mask, values, entropy, ids, scores, result in captured:
        B, T = mask.shape
        # leaves of a node share its tokens exactly, up to the branch token
        for i in range(B):
            for j in range(i + 1, (i // 4 + 1) * 4):
                level = shared_level(tree.paths, i, j)
                end = tree.branch_positions[i, level - 1]
                assert torch.equal(tree.branch_positions[i, : level - 1], tree.branch_positions[j, : level - 1])
                assert torch.equal(ids[i, :end], ids[j, :end])
        assert tree.generated < tree.leaf
        # advantages and critic targets: the float64 loop reference (tests/core/test_tree.py)
        params = trainer.synapo
        lam = actor_lambda(params, mask, entropy)
        seg = None
        if params.hvm_enabled:
            seg = segment_ids(
                ids, mask, trainer.boundary_table, min_len=params.hvm_min_len, max_len=params.hvm_max_len,
                fallback_len=params.hvm_fallback_len,
            )  # fmt: skip
        levels = token_levels(tree.branch_positions, T)
        local = values[..., 0].double()
        lam64 = lam.double() if isinstance(lam, torch.Tensor) else lam
        want = ref_tree(scores, tree.paths, levels, mask, local, seg, lam64, local_weight=0.5)
        torch.testing.assert_close(result.advantages[mask].double(), want["advantages"][mask], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(result.returns[mask].double(), want["local_returns"][mask], atol=1e-5, rtol=1e-5)
        if params.hvm_enabled:
            got_global = result.global_returns[mask].double()
            torch.testing.assert_close(got_global, want["global_returns"][mask], atol=1e-5, rtol=1e-5)
            assert torch.equal(result.start_mask & mask, want["start_mask"] & mask)
        # SCVL pairs of one tree part at or after their branch token
        if result.scvl is not None:
            for pos, neg, d in zip(*result.scvl, strict=True):
                level = shared_level(tree.paths, int(pos), int(neg))
                if level > 0:
                    assert d >= tree.branch_positions[pos, level - 1]
                pairs += 1
    if trainer.synapo.scvl_enabled:
        assert pairs > 0
    counts = trainer.rollout_token_counts
    assert 0 < counts["generated"] < counts["leaf"]
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert {"rollout/generated_tokens", "rollout/leaf_tokens", "rollout/tree_token_ratio"} <= logged


def test_outcome_credit_puts_score_minus_root_value_on_every_token(make_trainer, rollout_inputs):
    """`rollout_tree_credit="outcome"` (the control for what the node values add): with the critic's part off, every
    token of a leaf gets its score minus the mean score of its tree's leaves."""
    delimiter = make_tokenizer().convert_tokens_to_ids("\n\n")
    rewards = iter([[1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]])
    trainer = make_trainer(
        "vapo",
        reward_funcs=[lambda completions, **kw: next(rewards)],
        max_completion_length=12,
        whiten_advantages=False,
        rollout_tree_local_weight=0.0,
        rollout_tree_credit="outcome",
        generation_kwargs={"sequence_bias": {(delimiter,): 1.0}},
        **TREE,
    )
    trainer.model.train()
    output = trainer._generate_and_score_completions(rollout_inputs(trainer))
    mask, advantages = output["completion_mask"].bool(), output["advantages"]
    want = torch.tensor([0.5, -0.5, -0.5, 0.5, -0.25, -0.25, -0.25, 0.75])  # score - mean of its tree's 4 leaves
    for b in range(8):
        assert torch.allclose(advantages[b][mask[b]], want[b].expand(int(mask[b].sum())), atol=1e-6)


def test_evaluation_samples_independently(make_trainer, rollout_inputs):
    trainer = make_trainer("synapo", max_completion_length=6, **TREE)
    trainer.model.eval()
    output = trainer._generate_and_score_completions(rollout_inputs(trainer))
    assert output["advantages"].shape == output["completion_ids"].shape
    assert trainer._tree_rollout is None and trainer.rollout_token_counts == {"generated": 0, "leaf": 0}


def test_independent_samples_count_their_tokens(make_trainer, rollout_inputs):
    trainer = make_trainer("vapo", max_completion_length=6)
    trainer.model.train()
    output = trainer._generate_and_score_completions(rollout_inputs(trainer))
    tokens = int(output["completion_mask"].sum())
    assert trainer.rollout_token_counts == {"generated": tokens, "leaf": tokens}


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(num_generations=8), "num_generations"),
        (dict(rollout_tree_branching=1), "rollout_tree_branching"),
        (dict(rollout_tree_roots=True), "rollout_tree_roots"),
        (dict(rollout_tree_depth=0), "rollout_tree_depth"),
        (dict(rollout_tree_segments=1.5), "rollout_tree_segments"),
        (dict(rollout_tree_local_weight=float("nan")), "rollout_tree_local_weight"),
        (dict(rollout_tree_credit="leaf"), "rollout_tree_credit"),
        (dict(gamma=0.99), "gamma"),
        (dict(use_vllm=True), "use_vllm"),
    ],
)
def test_config_refuses_what_trees_cannot_do(tmp_path, overrides, match):
    from synapo_ext.trl import SynAPOConfig

    config = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=8, **TREE)
    config.update(overrides)
    with pytest.raises(ValueError, match=match):
        SynAPOConfig(**config)


def test_config_refuses_trees_split_across_processes(tmp_path):
    from synapo_ext.trl import SynAPOConfig

    config = SynAPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=8, **TREE)
    config.validate_tree_rollouts()
    config.per_device_train_batch_size = 2  # e.g. 2 processes x 2 rows: a generation batch of 4, split in halves
    with pytest.raises(ValueError, match="whole trees"):
        config.validate_tree_rollouts()


def test_trainer_refuses_a_tokenizer_without_the_delimiter_token(make_trainer):
    with pytest.raises(ValueError, match="tree rollouts branch .* `hvm_delimiters`"):
        make_trainer("vapo", processing_class=make_tokenizer(with_delimiter=False), **TREE)


@pytest.mark.slow
def test_tree_rollouts_keep_two_ranks_in_step(torchrun, tmp_path):
    # DDP, then FSDP2 (collective generate): each rank grows its own trees, needing different numbers of calls
    import json

    torchrun("_tree_dist_run.py", str(tmp_path), timeout=900, env={"ACCELERATE_USE_CPU": "true"})
    for mode in ("ddp", "fsdp2"):
        ranks = [json.load(open(tmp_path / mode / f"rank{r}.json")) for r in range(2)]
        assert ranks[0]["backend"] == mode
        assert len(ranks[0]["calls"]) == len(ranks[1]["calls"])  # the same number of generate calls
        assert ranks[0]["counts"] == ranks[1]["counts"]  # summed over both ranks
        assert 0 < ranks[0]["counts"]["generated"] < ranks[0]["counts"]["leaf"]
        assert "rollout/generated_tokens" in ranks[0]["keys"]
