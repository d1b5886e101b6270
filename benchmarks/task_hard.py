"""A checked chain that GRPO does not saturate (issue 20): six misconceptions instead of three, more of them per
prompt, and a warm start that gets them wrong more often.

Everything else is `task_checked.py` (the same format, reward only for an exactly right worked chain, the value a
step function that falls to 0 at the first wrong step): its functions read the misconceptions and the task's name
from this module's `TaskConfig`. The changes, each one a way to make outcome-only credit slower:

- **six misconceptions** (task_chain's ``*7`` as ``*3``, ``-8`` as ``+8``, ``+9`` as ``-9``, and ``+6`` as ``+4``,
  ``-3`` as ``+3``, ``*9`` as ``*1``): each one has to be found and fixed on its own, from the prompts that hold it;
- **0-4 risky operations per prompt** (``risky_probs``, P(0) = 0.1): a sample is right only if every risky step is;
- **bug_rate 0.8**: at temperature 1 the warm start does a risky step right one time in five, so a prompt with
  k risky steps is solved by a sample with probability about 0.2^k.

The budget, model and evaluation are the checked task's. `python benchmarks/critic_probe.py --task hard` checks the
gate (a lookup value on the true features explains >= 0.5 of the return).
"""

from __future__ import annotations

from dataclasses import dataclass

import task_checked
from task_checked import (  # noqa: F401  (re-exported: the task interface)
    DELIMITER,
    accuracy,
    answer,
    answer_regex,
    bugs_of,
    completion_length,
    dead_prefix,
    first_wrong_step,
    generate,
    held_out_prompts,
    make_model,
    make_tokenizer,
    parse_prompt,
    rl_dataset,
    score,
    trace,
    warm_start,
)
from task_checked import true_features as _true_features

NAME = "hard"


@dataclass(frozen=True)
class TaskConfig(task_checked.TaskConfig):
    """The checked task's config with this task's misconceptions and draws (every field enters the cache key)."""

    name: str = NAME
    misconceptions: tuple[str, ...] = ("*7>*3", "-8>+8", "+9>-9", "+6>+4", "-3>+3", "*9>*1")
    risky_probs: tuple[float, ...] = (0.1, 0.25, 0.3, 0.2, 0.15)  # P(0, 1, 2, 3, 4 risky operations in a prompt)
    bug_rate: float = 0.8  # warm-start traces: probability that a risky step is done the misconceived way


def true_features(prompts: list[str], tokens: list[list[str]]):
    """`task_checked.true_features` with this task's six misconceptions as the risky steps."""
    return _true_features(prompts, tokens, bugs_of(TaskConfig()))
