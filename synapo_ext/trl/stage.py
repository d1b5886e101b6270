"""The SynAPO stage of `SynAPOTrainer`: TRL's rollout output -> one `compute_synapo_advantages` call -> TRL's
`(B, T)` advantages, the positive-LM row weights and the critic's update (docs/spec.md).

The adapter only translates: a row's score is TRL's weighted sum over reward functions, placed on its last valid
token; a row without a score (every reward function gave None/NaN) reaches the core as a row with no valid token, so
the core skips it as it skips empty rows (zeros, no SCVL pair, no positive-LM weight, no critic target). SCVL's
pairs are the core's, found over the rows of whole groups: this process's rows, or every process's when a group
straddles processes (the core then runs on the gathered batch and each process keeps its own rows). Whitening, when
on, uses the mean and variance of every process's valid tokens either way.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from ..core import METRICS, SCVLPairs, SCVLSides, compute_synapo_advantages, masked_whiten, scvl_sides
from .critic import critic_values
from .update import HELDOUT_VF_LOSS, CriticBatch, critic_health, outcome_returns, update_critic

__all__ = ["LM_WEIGHT", "MAX_ABS_SCORE", "REWARDS_NONFINITE", "SynAPOStageMixin", "screen_rewards"]

logger = logging.getLogger(__name__)

LM_WEIGHT = "synapo_lm_weight"  # (B,) key of TRL's batch: the core's positive-LM weight of each row
REWARDS_NONFINITE = "synapo/rewards_nonfinite"  # +-inf rewards of the batch, treated as missing (TRL only)
# The critic regresses the score in float32: 0.5 * (V - G)^2 summed over up to 1e8 tokens stays below float32's
# largest value (3.4e38) while |G| <= 1e15
MAX_ABS_SCORE = 1e15
# counts summed over processes (the rest of the core's metrics are averaged)
COUNTS = (METRICS.scvl_pairs, METRICS.scvl_groups_mixed, METRICS.scvl_groups_skipped)


def screen_rewards(
    rewards_per_func: torch.Tensor, weights: torch.Tensor, names: list[str]
) -> tuple[torch.Tensor, dict[str, int]]:
    """TRL's rewards `(B, F)` (one column per reward function, NaN for None) with +-inf made NaN: an infinite reward
    is treated as a missing one (the row is scored by the other functions, or left unscored).

    Args:
        rewards_per_func: float (B, F), TRL's `_calculate_rewards` output.
        weights: float (F,), TRL's `reward_weights`.
        names: the F reward functions' names (TRL's `reward_func_names`).

    Returns:
        (the screened rewards, {name: number of +-inf rewards} for the functions that returned any).

    Raises:
        ValueError: a finite weighted reward beyond `MAX_ABS_SCORE` (the critic's float32 loss would overflow),
            naming the reward function and the value.
    """
    infinite = torch.isinf(rewards_per_func)
    counts = {name: int(n) for name, n in zip(names, infinite.sum(dim=0).tolist(), strict=True) if n}
    if counts:
        rewards_per_func = rewards_per_func.masked_fill(infinite, float("nan"))
    weighted = (rewards_per_func * weights.to(rewards_per_func.device)).abs().nan_to_num(nan=0.0)
    if weighted.numel() and bool((weighted > MAX_ABS_SCORE).any()):
        row, column = divmod(int(weighted.argmax()), weighted.size(1))
        raise ValueError(
            f"reward function {names[column]!r} returned {float(rewards_per_func[row, column]):.6g} (weight "
            f"{float(weights[column]):g}), beyond the largest score the critic can learn, |score| <= "
            f"{MAX_ABS_SCORE:g}: the critic regresses scores in float32 and its loss 0.5 * (V - score)^2 summed over "
            "the batch overflows to inf; scale this reward function (or its weight in `reward_weights`) down"
        )
    return rewards_per_func, counts


class SynAPOStageMixin:
    """`_synapo_stage` and its helpers (`SynAPOTrainer` provides `synapo`, `critic`, `_prepare_critic`,
    `_critic_lr_scheduler`, `_critic_mini_batch`, `accelerator`, `args` and the
    TRL state read here)."""

    def _rollout_entropy_for(self, output, input_ids, attention_mask, mode):
        """(B, T) rollout-policy entropy: from TRL's old-log-prob pass, or one extra no-grad forward."""
        entropy, self._rollout_entropy = self._rollout_entropy, None
        if entropy is None:
            batch_size = (
                self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
            )
            with torch.no_grad():
                _, entropy, _ = self._get_per_token_logps_and_entropies(
                    self.model,
                    input_ids,
                    attention_mask,
                    output["completion_ids"].size(1),
                    batch_size=batch_size,
                    compute_entropy=True,
                )
        return entropy.float()

    def _synapo_stage(self, output, mode: str) -> tuple[dict[str, float], dict[str, float]]:
        """Replace `output["advantages"]` by SynAPO's (B, T) advantages, add the positive-LM row weights
        (`output[LM_WEIGHT]`); in training, update the critic.

        Rows with no valid token (e.g. `mask_truncated_completions`) or no score are skipped by the core and counted
        (`synapo/rows_empty`, `synapo/rows_unscored`). A batch where no process has a row left, or, with
        `whiten_advantages`, where all processes together have fewer than 2 valid tokens (whitening needs a mean and
        a variance), gets zero advantages and takes no critic step (`synapo/batches_skipped`).

        Returns:
            (metrics to average over processes, metrics to sum over processes).
        """
        device, params = self.accelerator.device, self.synapo
        self._prepare_critic()  # a no-op once training set it up (an evaluation before training needs it here)
        completion_ids = output["completion_ids"]
        mask = output["completion_mask"] * output["tool_mask"] if "tool_mask" in output else output["completion_mask"]
        B, T = completion_ids.shape
        input_ids = torch.cat([output["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        world, offset = self.accelerator.num_processes, self.accelerator.process_index * B
        if (B * world) % num_generations != 0:
            raise ValueError(
                f"the rollout batch ({B} rows x {world} processes) is not whole groups of `num_generations` "
                f"({num_generations}): SCVL and the group layout need complete groups"
            )

        # Outcome score of each row: TRL's weighted sum over reward functions (TRL holds every process's rows)
        rewards_per_func = self._rewards_per_func.to(device)[offset : offset + B]
        scored = ~torch.isnan(rewards_per_func).all(dim=1)
        scores = (rewards_per_func * self.reward_weights.to(device)).nansum(dim=1)
        learn_mask = mask * scored.unsqueeze(1).to(mask.dtype)  # an unscored row: no valid token for the core
        row_valid = learn_mask.any(dim=1)  # what the core keeps (`valid_rows`)
        totals = {
            METRICS.rows_unscored: float((~scored).sum()),
            METRICS.rows_empty: float((~row_valid & scored).sum()),
        }
        # skip (and count) a batch with nothing to learn from: no process has a row left, or whitening is on and
        # every process together has fewer than 2 valid tokens (a mean and a variance need 2)
        counts = torch.stack([row_valid.sum().float(), learn_mask.sum().float()])
        rows_all, tokens_all = self.accelerator.gather(counts).view(-1, 2).sum(dim=0)
        if rows_all == 0 or (params.whiten_advantages and tokens_all < 2):
            output["advantages"], output[LM_WEIGHT] = torch.zeros(B, T, device=device), torch.zeros(B, device=device)
            self._log_row_advantages(output["advantages"], mask)
            totals[METRICS.batches_skipped] = 1.0
            return {}, totals
        totals[METRICS.batches_skipped] = 0.0

        last = T - 1 - torch.flip(mask, dims=[1]).argmax(dim=1)
        rewards = torch.zeros(B, T, device=device)
        rewards[torch.arange(B, device=device), last] = scores
        entropy = self._rollout_entropy_for(output, input_ids, attention_mask, mode) if params.ea_gae_enabled else None
        values = self._rollout_values(input_ids, attention_mask, T)  # (B, T, H)

        result, scope_world = self._core_stage(learn_mask, rewards, values, entropy, completion_ids, scores, mode)
        output["advantages"] = result.advantages.float() * learn_mask
        output[LM_WEIGHT] = result.positive_lm_weights.float()
        self._log_row_advantages(output["advantages"], mask)
        means = dict(result.metrics)
        means.pop(METRICS.rows_empty)  # the core's count includes the unscored rows: counted apart above
        totals.update({name: means.pop(name) / scope_world for name in COUNTS if name in means})
        # the critic's held-out numbers on this fresh batch (eval rollouts too: the critic never trains on those)
        outcome = outcome_returns(rewards, learn_mask, params.gamma)  # what lambda = 1 targets: comparable figure
        means.update(self._explained_variance(result.returns.float(), values[..., 0], learn_mask, outcome))
        if mode != "train":
            return means, totals

        batch = CriticBatch(
            input_ids,
            attention_mask,
            learn_mask.float(),
            result.returns.float(),
            values,
            result.global_returns.float() if params.hvm_enabled else None,
            result.start_mask if params.hvm_enabled else None,
            result.scvl_sides,
            totals.get(METRICS.scvl_pairs, 0.0),
        )
        if self._critic_update_runs():
            generator = torch.Generator().manual_seed(self.args.seed + self._critic_updates)
            prepared = self._prepare_critic()
            means.update(
                update_critic(
                    prepared.model,
                    prepared.optimizer,
                    self._critic_lr_scheduler(),
                    batch,
                    params,
                    epochs=self.args.critic_epochs,
                    mini_batch_size=self._critic_mini_batch(),
                    cliprange_value=self.args.cliprange_value,
                    max_grad_norm=self.args.critic_max_grad_norm,
                    generator=generator,
                    autocast=self.accelerator.autocast,
                    backend=prepared.backend,
                    values_fn=self._critic_values_fn(),
                )
            )
            if means["critic/updates"] == 1:  # one step, on values not yet moved: its vf_loss is the held-out loss
                means.pop(HELDOUT_VF_LOSS, None)  # one name per quantity
            self._critic_updates += 1
        self._keep_critic_batch(output, batch)
        means[METRICS.warmup_done] = float(self._warmup_finished)
        means[METRICS.warmup_batches] = float(self._warmup_done + (not self._warmup_finished))  # this one included
        return means, totals

    # --- the critic's parts (the shared-trunk critic, synapo_ext/trl/trunk.py, overrides them) ------------------

    def _rollout_values(self, input_ids, attention_mask, T: int) -> torch.Tensor:
        """float (B, T, H) rollout-time values of the critic, no grad."""
        with torch.no_grad(), self.accelerator.autocast():
            return critic_values(self.critic, input_ids, attention_mask, T)

    def _critic_values_fn(self):
        """`update_critic`'s `values_fn` (None: the critic's forward on each mini-batch's tokens)."""
        return None

    def _critic_update_runs(self) -> bool:
        """Whether this training rollout's critic update runs in the stage."""
        return True

    def _keep_critic_batch(self, output, batch) -> None:
        """Called with each training rollout's `CriticBatch` after the critic's update (a no-op here)."""

    def _core_stage(self, mask, rewards, values, entropy, completion_ids, scores, mode):
        """`compute_synapo_advantages` over the rows of whole groups, cut to this process's rows.

        Returns:
            (the core's result over this process's B rows, SCVL sides re-indexed to them; the number of processes
            whose rows the core saw: 1, or the world size when a group straddles processes).
        """
        params, accelerator = self.synapo, self.accelerator
        B, T = mask.shape
        world, rank = accelerator.num_processes, accelerator.process_index
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        per_row = {  # the core's per-row inputs, by its keyword names
            "rewards": rewards,
            "values": values[..., 0],
            "response_mask": mask,
            "global_values": values[..., 1] if params.hvm_enabled else None,
            "entropy": entropy,
            "response_ids": completion_ids,
            "scores": scores,
        }
        scope_world = world if world > 1 and B % num_generations != 0 else 1
        if scope_world > 1:  # groups straddle processes: every process runs the core on the gathered batch
            pad = accelerator.pad_across_processes
            per_row = {
                name: None if x is None else accelerator.gather(pad(x, dim=1) if x.dim() > 1 else x)
                for name, x in per_row.items()
            }
        first = rank * B if scope_world > 1 else 0  # this process's first row in the core's batch
        group_ids = ((rank * B if scope_world == 1 else 0) + torch.arange(B * scope_world)) // num_generations
        group_ids = group_ids if params.scvl_enabled else None
        # whitening spans the whole batch, as in one process (and verl's driver): with each process's own rows the
        # core leaves it out and the advantages are whitened below with the statistics of every process's tokens
        whiten_across = params.whiten_advantages and world > 1 and scope_world == 1
        core_params = dataclasses.replace(params, whiten_advantages=False) if whiten_across else params
        result = compute_synapo_advantages(
            core_params, boundary_table=self.boundary_table, group_ids=group_ids, **per_row
        )
        _drop_pairs_diverging_off_mask(result, per_row["response_mask"])
        if whiten_across:
            result.advantages = masked_whiten(
                result.advantages, mask, sum_over_processes=lambda t: accelerator.reduce(t, "sum")
            )
        if scope_world == 1:
            return result, 1
        mine = slice(first, first + B)
        for name in ("advantages", "returns", "global_returns", "start_mask"):
            x = getattr(result, name)
            setattr(result, name, None if x is None else x[mine, :T])
        result.valid_rows, result.positive_lm_weights = result.valid_rows[mine], result.positive_lm_weights[mine]
        if result.scvl_sides is not None:
            sides = result.scvl_sides
            here = (sides.rows >= first) & (sides.rows < first + B)
            kept = SCVLSides(*(x[here] for x in sides))
            result.scvl_sides = kept._replace(rows=kept.rows - first)
        return result, scope_world

    def _log_row_advantages(self, advantages: torch.Tensor, mask: torch.Tensor) -> None:
        """Show SynAPO's advantages in TRL's completions table: TRL logged its GRPO ones for these rows; replace
        them by each row's mean over valid tokens (all processes' rows, in TRL's order). `advantages`: (B, T), 0 off
        `mask`."""
        row_means = advantages.sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        row_means = self.accelerator.gather(row_means).tolist()
        logged = self._logs["advantages"]
        for _ in range(min(len(row_means), len(logged))):
            logged.pop()
        logged.extend(row_means)

    @staticmethod
    def _explained_variance(returns, values, mask, outcome=None) -> dict[str, float]:
        """The critic's held-out numbers (`critic_health`; `outcome`: the Monte-Carlo return); a method so benchmarks
        can add their own figures."""
        return critic_health(returns, values, mask, outcome)


def _drop_pairs_diverging_off_mask(result, mask: torch.Tensor) -> None:
    """Keep the SCVL pairs whose first divergence is a token the policy chose in both rows (mask 1); drop those that
    diverge at a token the mask leaves out, e.g. a tool's output in a multi-turn rollout (TRL's `tool_mask`): SCVL
    ranks the states after a policy choice, and a tool's output is the environment's. `mask`: (B, T) 0/1 of the
    core's rows; `result.scvl`, its values, sides and pair count are cut in place."""
    pairs = result.scvl
    if pairs is None or pairs.pos_index.numel() == 0:
        return
    valid = mask.bool()
    keep = valid[pairs.pos_index, pairs.diverge_index] & valid[pairs.neg_index, pairs.diverge_index]
    if bool(keep.all()):
        return
    result.scvl = SCVLPairs(*(x[keep] for x in pairs))
    result.scvl_pos_values, result.scvl_neg_values = result.scvl_pos_values[keep], result.scvl_neg_values[keep]
    result.scvl_sides = scvl_sides(result.scvl, result.scvl_pos_values, result.scvl_neg_values)
    result.metrics[METRICS.scvl_pairs] = float(keep.sum())
