"""Segment-tree rollouts for `SynAPOTrainer` (docs/spec.md "Tree rollouts", docs/trl_tree_rollouts.md).

Each prompt's `num_generations` rows grow as `rollout_tree_roots` trees: the roots are generated from the prompt until
`rollout_tree_segments` segments have closed (a token containing one of `hvm_delimiters`, used as an extra stop token
of transformers' `generate`), each node is copied `rollout_tree_branching` times and every copy continues, down to
`rollout_tree_depth` branchings; the last level runs to eos or `max_completion_length`. A node that ends (eos or the
length budget) before its branch point is copied into all the leaves below it unchanged. Every leaf is one row of
TRL's rollout, in TRL's order, so TRL's rewards, padding and loss run unchanged. The advantages and critic targets
come from `synapo_ext.core.compute_tree_advantages`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..core import actor_lambda, boundary_table_from_tokenizer, compute_tree_advantages, masked_whiten, segment_ids

__all__ = [
    "TREE_METRICS",
    "TreeRolloutFields",
    "TreeRolloutMixin",
    "TreeRollout",
    "grow_trees",
    "token_levels",
]

TREE_METRICS = {
    "generated": "rollout/generated_tokens",  # tokens generated (a shared prefix once), this rollout, all processes
    "leaf": "rollout/leaf_tokens",  # the same leaves' tokens as independent samples would generate them
    "ratio": "rollout/tree_token_ratio",  # generated / leaf
    "generated_total": "rollout/generated_tokens_total",  # cumulative over training rollouts (warm-up included)
    "ended_early": "synapo/tree/nodes_ended_early",  # fraction of inner nodes that ended before their branch point
}


@dataclass(kw_only=True)
class TreeRolloutFields:
    """`SynAPOConfig`'s tree-rollout fields (docs/trl_tree_rollouts.md)."""

    rollout_tree_roots: int = field(
        default=0,
        metadata={"help": "Trees per prompt (0: independent samples). num_generations = roots * branching**depth."},
    )
    rollout_tree_branching: int = field(default=2, metadata={"help": "Children of each inner tree node (>= 2)."})
    rollout_tree_depth: int = field(default=1, metadata={"help": "Branchings from root to leaf (>= 1)."})
    rollout_tree_segments: int = field(
        default=1,
        metadata={"help": "Segments (closed by a delimiter token) each tree level generates before it branches."},
    )
    rollout_tree_local_weight: float = field(
        default=1.0, metadata={"help": "Weight of the critic's in-segment GAE added to the tree's node advantages."}
    )
    rollout_tree_credit: str = field(
        default="nodes",
        metadata={
            "help": "'nodes': each token's advantage is its node's value against its parent's; 'outcome' (a control "
            "for what the node values add): the leaf's score against its root's value on every token, GRPO's "
            "credit on the same tree samples."
        },
    )

    def tree_leaves(self) -> int:
        return self.rollout_tree_roots * self.rollout_tree_branching**self.rollout_tree_depth

    def validate_tree_fields(self) -> None:
        """Each field's type and range, naming it (called before TRL's own checks)."""
        for name, low in (
            ("rollout_tree_roots", 0),
            ("rollout_tree_branching", 2),
            ("rollout_tree_depth", 1),
            ("rollout_tree_segments", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}")
        weight = self.rollout_tree_local_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"`rollout_tree_local_weight` must be a finite number >= 0, got {weight!r}")
        if self.rollout_tree_credit not in ("nodes", "outcome"):
            raise ValueError(f"`rollout_tree_credit` must be 'nodes' or 'outcome', got {self.rollout_tree_credit!r}")

    def validate_tree_rollouts(self) -> None:
        """What tree rollouts need of the rest of the config (after TRL resolved `steps_per_generation`)."""
        if self.rollout_tree_roots == 0:
            return
        leaves = self.tree_leaves()
        shape = (
            f"rollout_tree_roots={self.rollout_tree_roots} * rollout_tree_branching={self.rollout_tree_branching}"
            f"**rollout_tree_depth={self.rollout_tree_depth} = {leaves}"
        )
        if self.num_generations != leaves:
            raise ValueError(
                f"`num_generations` ({self.num_generations}) must equal the leaves of a prompt's trees, {shape}: "
                "set num_generations to it or change the tree's shape"
            )
        if self.gamma != 1.0:
            raise ValueError(
                f"tree rollouts (rollout_tree_roots > 0) need `gamma` = 1 (undiscounted tree values), got {self.gamma}"
            )
        if self.use_vllm or self.use_transformers_continuous_batching:
            name = "use_vllm" if self.use_vllm else "use_transformers_continuous_batching"
            raise ValueError(
                f"tree rollouts (rollout_tree_roots > 0) grow trees with transformers' `generate` (a delimiter token "
                f"as an extra stop token); `{name}=True` is not supported with them: set it to False"
            )
        local = self.per_device_train_batch_size * self.steps_per_generation
        if local % leaves != 0:
            raise ValueError(
                f"each process's rollout batch (per_device_train_batch_size {self.per_device_train_batch_size} x "
                f"steps_per_generation {self.steps_per_generation} = {local} rows) must hold whole trees of "
                f"`num_generations` = {leaves} leaves: make it a multiple of {leaves}"
            )


@dataclass
class TreeRollout:
    """One process's trees, rows in TRL's order. `paths`: int64 (B, D + 2), each row's node per level (column 0 its
    prompt group, then its root, ..., its leaf; ids per parent). `branch_positions`: int64 (B, D), the completion
    position where level 1..D's tokens start (the completion's length when the row has no token of that level).
    `generated` / `leaf`: token counts (each node once / each leaf's whole completion)."""

    paths: torch.Tensor
    branch_positions: torch.Tensor
    generated: int
    leaf: int
    ended_early: int
    inner_nodes: int


def token_levels(branch_positions: torch.Tensor, length: int) -> torch.Tensor:
    """int64 (B, T): 1 + the number of branch positions <= t, the level (1..D+1) of the node holding token t."""
    position = torch.arange(length, device=branch_positions.device)
    return 1 + (position[None, None, :] >= branch_positions[:, :, None]).sum(dim=1)


def grow_trees(
    prompt_ids: Sequence[Sequence[int]],
    generate: Callable[[list[list[int]], int, bool], list[list[int]]],
    *,
    roots: int,
    branching: int,
    depth: int,
    segments: int,
    max_length: int,
    stop_ids: set[int],
    eos_ids: set[int],
    any_process: Callable[[bool], bool] = bool,
) -> tuple[list[list[int]], TreeRollout]:
    """Grow each group's trees level by level; returns the leaves' completions (in `prompt_ids`' order) and the tree.

    Args:
        prompt_ids: B prompts, groups of roots * branching**depth consecutive rows holding one prompt.
        generate: (prompts, max_new_tokens, stop_at_delimiter) -> completions, each cut after its first stop token
            (eos, or with `stop_at_delimiter` a delimiter token too).
        segments: delimiter tokens a level generates before it branches (the last level runs to the end).
        max_length: the completion length budget (`max_completion_length`).
        stop_ids, eos_ids: delimiter token ids; eos ids.
        any_process: whether a flag is True on any process (an all-reduce). Under FSDP / ZeRO-3 every `generate`
            call is collective, so a process whose nodes have all ended makes a throw-away call (one token) while
            another still generates: every process makes the same number of calls.
    """
    G = roots * branching**depth
    B = len(prompt_ids)
    if B % G != 0:
        raise ValueError(f"the rollout batch ({B} rows) is not whole groups of {G} leaves (num_generations)")
    groups = B // G
    for g in range(groups):
        if any(list(prompt_ids[g * G + j]) != list(prompt_ids[g * G]) for j in range(1, G)):
            raise ValueError(
                f"rows {g * G}..{g * G + G - 1} of the rollout batch hold different prompts: tree rollouts need each "
                "group of num_generations consecutive rows to be one prompt (TRL's RepeatSampler)"
            )
    prefixes: list[list[int]] = [[] for _ in range(groups * roots)]  # per node of the current level: tokens before it
    ended = [False] * len(prefixes)
    level_tokens: list[list[list[int]]] = []
    generated = ended_early = inner_nodes = 0
    for level in range(depth + 1):
        nodes_per_group = roots * branching**level
        if level > 0:
            prefixes = [
                prefixes[k // branching] + level_tokens[-1][k // branching] for k in range(groups * nodes_per_group)
            ]
            ended = [ended[k // branching] for k in range(groups * nodes_per_group)]
        last = level == depth
        new: list[list[int]] = [[] for _ in prefixes]
        closed = [0] * len(prefixes)
        active = [k for k, done in enumerate(ended) if not done]
        while True:
            budgets = {k: max_length - len(prefixes[k]) - len(new[k]) for k in active}
            for k in [k for k in active if budgets[k] <= 0]:
                ended[k] = True
            active = [k for k in active if budgets[k] > 0]
            if not any_process(bool(active)):
                break
            if not active:  # another process still generates: take part in its collective generate call
                generate([list(prompt_ids[0])], 1, not last)
                continue
            prompts = [list(prompt_ids[(k // nodes_per_group) * G]) + prefixes[k] + new[k] for k in active]
            outputs = generate(prompts, max(budgets[k] for k in active), not last)
            still = []
            for k, out in zip(active, outputs, strict=True):
                out = list(out)[: budgets[k]]
                new[k] += out
                if not out or out[-1] in eos_ids or len(out) >= budgets[k]:
                    ended[k] = True  # eos, or the length budget spent (truncated)
                elif not last and out[-1] in stop_ids:
                    closed[k] += 1
                    if closed[k] < segments:
                        still.append(k)
                else:
                    ended[k] = True
            active = still
        if not last:
            inner_nodes += len(prefixes)
            ended_early += sum(ended)
        generated += sum(len(tokens) for tokens in new)
        level_tokens.append(new)
    completions, paths, branch_positions = [], [], []
    for row in range(B):
        g, i = divmod(row, G)
        tokens, path, starts = [], [g], []
        for level in range(depth + 1):
            below = branching ** (depth - level)
            if level > 0:
                starts.append(len(tokens))
            tokens += level_tokens[level][g * roots * branching**level + i // below]
            path.append(i // below)
        completions.append(tokens)
        paths.append(path)
        branch_positions.append(starts)
    tree = TreeRollout(
        paths=torch.tensor(paths, dtype=torch.long),
        branch_positions=torch.tensor(branch_positions, dtype=torch.long).reshape(B, depth),
        generated=generated,
        leaf=sum(len(c) for c in completions),
        ended_early=ended_early,
        inner_nodes=inner_nodes,
    )
    return completions, tree


class TreeRolloutMixin:
    """Tree rollouts in `SynAPOTrainer` (it provides `args`, `synapo`, `accelerator`, `boundary_table`, TRL's state):
    `_generate_single_turn` grows the trees (training rollouts; evaluation samples independently), `_core_stage`
    replaces the advantages and critic targets by the tree's."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tree_rollout: TreeRollout | None = None
        self.rollout_token_counts = {"generated": 0, "leaf": 0}  # training rollouts, all processes (cumulative)
        self._tree_stop_ids: list[int] = []
        if self.args.rollout_tree_roots > 0:
            self._tree_stop_ids = self._tree_delimiter_ids()
            for name in ("tools", "rollout_func", "environment_factories"):
                if getattr(self, name, None):
                    raise ValueError(
                        f"tree rollouts (rollout_tree_roots > 0) do not support TRL's `{name}`: they grow the "
                        "completions themselves with transformers' generate; set rollout_tree_roots=0"
                    )

    def _tree_delimiter_ids(self) -> list[int]:
        """Token ids whose text contains one of `hvm_delimiters` (where a segment closes and a tree may branch)."""
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        try:
            table = boundary_table_from_tokenizer(tokenizer, self.args.hvm_delimiters)
        except ValueError as err:
            raise ValueError(
                f"tree rollouts branch where a segment closes, at a token containing one of `hvm_delimiters` "
                f"{tuple(self.args.hvm_delimiters)!r}: {err}"
            ) from err
        ids = table.nonzero().squeeze(1).tolist()
        eos = set(self.eos_token_ids)
        return [i for i in ids if i not in eos]

    # --- generation -------------------------------------------------------------------------------------------

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs):
        training = self.model.training
        if not training or self.args.rollout_tree_roots == 0:
            self._tree_rollout = None
            completion_ids, logprobs = super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs
            )
            if training:
                tokens = sum(len(c) for c in completion_ids)
                self._log_rollout_tokens(tokens, tokens)
            return completion_ids, logprobs
        if images is not None or multimodal_fields:
            raise ValueError("tree rollouts (rollout_tree_roots > 0) support text prompts only, got images")
        args = self.args
        eos = set(self.eos_token_ids)
        completion_ids, tree = grow_trees(
            prompt_ids,
            self._generate_level,
            roots=args.rollout_tree_roots,
            branching=args.rollout_tree_branching,
            depth=args.rollout_tree_depth,
            segments=args.rollout_tree_segments,
            max_length=self.max_completion_length,
            stop_ids=set(self._tree_stop_ids),
            eos_ids=eos,
            any_process=self._any_process,
        )
        self._tree_rollout = tree
        self._log_rollout_tokens(tree.generated, tree.leaf, tree.ended_early, tree.inner_nodes)
        return completion_ids, None

    def _any_process(self, flag: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return flag
        count = torch.tensor([float(flag)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(count, "sum").item() > 0)

    def _generate_level(
        self, prompts: list[list[int]], max_new_tokens: int, stop_at_delimiter: bool
    ) -> list[list[int]]:
        """TRL's own generation of `prompts` (transformers' `generate`), with the delimiter tokens as extra stop
        tokens and `max_new_tokens`; TRL cuts each completion after its first stop token."""
        saved = (self.eos_token_ids, self.generation_config.eos_token_id, self.generation_config.max_new_tokens)
        saved_kwargs = {
            k: self.generation_kwargs[k] for k in ("eos_token_id", "max_new_tokens") if k in self.generation_kwargs
        }
        stops = [*self.eos_token_ids, *self._tree_stop_ids] if stop_at_delimiter else list(self.eos_token_ids)
        try:
            self.eos_token_ids = stops
            self.generation_config.eos_token_id = stops
            self.generation_config.max_new_tokens = max_new_tokens
            self.generation_kwargs.update(eos_token_id=stops, max_new_tokens=max_new_tokens)
            completions, _ = super()._generate_single_turn(prompts, None, {}, 1)
        finally:
            self.eos_token_ids, self.generation_config.eos_token_id, self.generation_config.max_new_tokens = saved
            for key in ("eos_token_id", "max_new_tokens"):
                self.generation_kwargs.pop(key, None)
            self.generation_kwargs.update(saved_kwargs)
        return completions

    def _log_rollout_tokens(self, generated: int, leaf: int, ended_early: int = 0, inner_nodes: int = 0) -> None:
        device = self.accelerator.device
        counts = torch.tensor([generated, leaf, ended_early, inner_nodes], dtype=torch.float64, device=device)
        generated, leaf, ended_early, inner_nodes = self.accelerator.reduce(counts, "sum").tolist()
        self.rollout_token_counts["generated"] += int(generated)
        self.rollout_token_counts["leaf"] += int(leaf)
        if self.args.rollout_tree_roots == 0:  # independent samples: counted, not logged (TRL logs their lengths)
            return
        metrics = self._metrics["train"]
        metrics[TREE_METRICS["generated"]].append(generated)
        metrics[TREE_METRICS["leaf"]].append(leaf)
        metrics[TREE_METRICS["ratio"]].append(generated / leaf if leaf else 1.0)
        metrics[TREE_METRICS["generated_total"]] = [float(self.rollout_token_counts["generated"])]
        if inner_nodes:
            metrics[TREE_METRICS["ended_early"]].append(ended_early / inner_nodes)

    # --- advantages ---------------------------------------------------------------------------------------------

    def _core_stage(self, mask, rewards, values, entropy, completion_ids, scores, mode):
        """The core's stage (SCVL pairs, positive-LM weights, metrics), then the tree's advantages and targets."""
        result, scope_world = super()._core_stage(mask, rewards, values, entropy, completion_ids, scores, mode)
        tree, self._tree_rollout = self._tree_rollout, None
        if tree is None or mode != "train":
            return result, scope_world
        if scope_world != 1:
            raise RuntimeError("tree rollouts need whole trees on each process (checked by SynAPOConfig)")
        params, device = self.synapo, mask.device
        B, T = mask.shape
        rows = mask.any(dim=1).nonzero().squeeze(1)
        lam = actor_lambda(params, mask[rows], None if entropy is None else entropy[rows])
        if isinstance(lam, torch.Tensor):
            lam = _scatter(lam, rows, B)
        seg = None
        if params.hvm_enabled:
            seg = _scatter(
                segment_ids(
                    completion_ids[rows],
                    mask[rows],
                    self.boundary_table,
                    min_len=params.hvm_min_len,
                    max_len=params.hvm_max_len,
                    fallback_len=params.hvm_fallback_len,
                ),
                rows,
                B,
            )
        out = compute_tree_advantages(
            scores.to(device),
            tree.paths.to(device),
            token_levels(tree.branch_positions.to(device), T),
            mask,
            local_values=values[..., 0],
            seg_ids=seg,
            lam=lam,
            local_weight=float(self.args.rollout_tree_local_weight),
        )
        advantages = out.advantages.float()
        if self.args.rollout_tree_credit == "outcome":  # score - V(root) on every token instead of the node terms
            outcome = (scores.to(device).double() - out.node_values[:, 0])[:, None] * mask
            advantages = (out.advantages - out.tree_advantages + outcome).float()
        if params.whiten_advantages:
            world = self.accelerator.num_processes
            reduce = (lambda t: self.accelerator.reduce(t, "sum")) if world > 1 else None
            advantages = masked_whiten(advantages, mask, sum_over_processes=reduce)
        replaced = {"advantages": advantages, "returns": out.local_returns.float()}
        if params.hvm_enabled:
            replaced.update(global_returns=out.global_returns.float(), start_mask=out.start_mask)
        return dataclasses.replace(result, **replaced), scope_world


def _scatter(x: torch.Tensor, rows: torch.Tensor, batch_size: int) -> torch.Tensor:
    full = x.new_zeros((batch_size, *x.shape[1:]))
    full[rows] = x
    return full
