"""The oracle-value arm (issue 13): Monte-Carlo values at segment boundaries instead of a learned critic.

As VinePPO (arXiv 2410.01679) and SPO (arXiv 2505.23564) do: for every rollout and every segment start s_k (the
first token after a ``"\\n\\n"``, and the first token of the answer), K continuations are sampled from the *current*
policy (temperature 1) from the prefix up to s_k and scored by the task's reward; V(s_k) = their mean reward, an
unbiased estimate of the state's value under the policy. Every token of segment k gets V(s_k) (the values are
piecewise constant over segments), so GAE's token-level deltas are 0 inside a segment and V(s_(k+1)) - V(s_k) at
its last token; HVM's global head reads the same V(s_k).

`MCOracleCritic` is a drop-in for the trainer's critic (`SynAPOTrainer(critic_model=...)`): its forward returns
these values as "logits" (one column per head), its only parameter is a dummy scalar that the critic update leaves
at 0 (the losses do not depend on it), so SCVL and the value loss change nothing. Values are cached per row, so the
critic update's mini-batch forwards on the same rollouts cost nothing.

Two savings that do not change the estimate: identical prefixes (rows of a group that agree up to s_k) are
estimated once, and a prefix the task calls *dead* (``dead(prompt, completion_prefix)``: no continuation can score,
e.g. task_checked once a wrong step is written) gets V = 0 without sampling (every continuation would score 0).
The continuations are counted (`self.generated`) and reported beside the sample budget: they are not part of it.

How it could become a core option: a `value_fn(prompt_ids, completion_ids, segment_starts) -> (B, K) values`
hook on the trainer (TRL: an argument of `SynAPOTrainer`; verl: a rollout-worker call before
`compute_synapo_advantages`) that fills `global_values` at segment starts; the rest of the stage is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch import nn


class MCOracleCritic(nn.Module):
    """Monte-Carlo values of `policy` at segment starts, in the critic's output layout (B, P + T, heads).

    Args:
        policy: the policy being trained (the trainer's model: continuations follow its current weights).
        tokenizer: the task's tokenizer (decodes completions for `score`).
        score: score(prompt_text, completion_text, ended) -> float, the task's reward.
        prompt_len: tokens of every prompt (the benchmark's prompts all have this length, left padding unused).
        delimiter_id: the segment delimiter's token id.
        max_completion: the trainer's max completion length (continuations stop there).
        k: continuations per distinct prefix.
        num_heads: the trainer's critic outputs (2 with HVM: both get the same values).
        dead: optional dead(prompt_text, completion_prefix_text) -> bool: no continuation can score (V = 0).
        seed: seed of the continuations' sampling.
    """

    def __init__(
        self,
        policy,
        tokenizer,
        score: Callable,
        *,
        prompt_len: int,
        delimiter_id: int,
        max_completion: int,
        k: int = 8,
        num_heads: int = 1,
        dead: Callable | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.policy = [policy]  # a list: not registered as a sub-module (not the critic's parameters)
        self.tokenizer, self.score, self.dead = tokenizer, score, dead
        self.prompt_len, self.delimiter_id, self.max_completion = prompt_len, delimiter_id, max_completion
        self.k, self.num_heads = k, num_heads
        self.dummy = nn.Parameter(torch.zeros(()))
        self.generator = torch.Generator().manual_seed(seed)
        self.cache: dict[tuple, torch.Tensor] = {}
        self.generated = 0  # continuations sampled so far
        self.generated_tokens = 0  # their generated tokens (eos included, no padding)
        self.estimated = 0  # distinct live prefixes estimated so far
        self.config = SimpleNamespace(num_labels=num_heads)

    def get_input_embeddings(self):  # the trainer checks the critic's vocabulary against the policy's
        return self.policy[0].get_input_embeddings()

    def save_pretrained(self, path: str) -> None:  # nothing to save: the values come from the policy
        pass

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
        rows = []
        for b in range(input_ids.size(0)):
            valid = input_ids[b][attention_mask[b].bool()]
            rows.append(tuple(valid.tolist()))
        missing = [r for r in dict.fromkeys(rows) if r not in self.cache]
        if missing:
            if len(self.cache) > 8192:
                self.cache.clear()
            self.cache.update(self._estimate(missing))
        L = input_ids.size(1)
        out = torch.zeros(input_ids.size(0), L)
        for b, r in enumerate(rows):
            values = self.cache[r]  # (len(r),): value of the prefix ending at each position
            positions = attention_mask[b].bool().nonzero().squeeze(1)
            out[b, positions] = values
        logits = out[..., None].expand(-1, -1, self.num_heads) + 0.0 * self.dummy
        return SimpleNamespace(logits=logits)

    @torch.no_grad()
    def _estimate(self, rows: list[tuple]) -> dict[tuple, torch.Tensor]:
        """Per row (prompt + completion ids): (len,) values, entry j = V of the state after tokens [:j + 1]."""
        P = self.prompt_len
        # segment starts of each row's completion: 0 and after every delimiter (not past the end)
        prefixes: dict[tuple, float | None] = {}
        plan = []
        for r in rows:
            completion = r[P:]
            starts = [0] + [i + 1 for i, tok in enumerate(completion) if tok == self.delimiter_id]
            starts = [s for s in starts if s < len(completion)]
            plan.append((r, starts))
            for s in starts:
                prefixes.setdefault(r[: P + s], None)
        prompt_text = {}
        todo = []
        for prefix in prefixes:
            prompt = self.tokenizer.decode(list(prefix[:P]), skip_special_tokens=True)
            prompt_text[prefix] = prompt
            done = self.tokenizer.decode(list(prefix[P:]), skip_special_tokens=True)
            if self.dead is not None and self.dead(prompt, done):
                prefixes[prefix] = 0.0
            else:
                todo.append(prefix)
        for length in sorted({len(p) for p in todo}):  # one batched generate per prefix length (no padding)
            group = [p for p in todo if len(p) == length]
            for p, v in zip(group, self._rollout_values(group, prompt_text), strict=True):
                prefixes[p] = v
        out = {}
        for r, starts in plan:
            values = torch.zeros(len(r))
            bounds = starts + [len(r) - P]
            for s, e in zip(bounds[:-1], bounds[1:], strict=True):
                # V(s_t) for completion token t sits at position P + t - 1 (the critic's layout)
                values[P + s - 1 : P + e - 1] = prefixes[r[: P + s]]
            values[P + bounds[-1] - 1 :] = 0.0  # after the last token: the terminal state
            out[r] = values
        return out

    def _rollout_values(self, prefixes: list[tuple], prompt_text: dict) -> list[float]:
        policy = self.policy[0]
        was_training = policy.training
        policy.eval()
        P, eos = self.prompt_len, self.tokenizer.eos_token_id
        ids = torch.tensor(prefixes).repeat_interleave(self.k, dim=0)
        room = self.max_completion - (ids.size(1) - P)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator)))
        gen = policy.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max(room, 1),
                              do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              pad_token_id=self.tokenizer.pad_token_id, eos_token_id=eos)  # fmt: skip
        policy.train(was_training)
        self.generated += ids.size(0)
        self.estimated += len(prefixes)
        scores = []
        for i, row in enumerate(gen.tolist()):
            new = row[ids.size(1) :]  # this continuation's tokens (generate pads after eos)
            self.generated_tokens += new.index(eos) + 1 if eos in new else len(new)
            completion = row[P:]
            ended = eos in completion
            completion = completion[: completion.index(eos)] if ended else completion
            text = self.tokenizer.decode(completion, skip_special_tokens=True)
            scores.append(self.score(prompt_text[prefixes[i // self.k]], text, ended))
        scores_t = torch.tensor(scores).view(len(prefixes), self.k)
        return scores_t.mean(dim=1).tolist()
