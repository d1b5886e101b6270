"""Run by test_tree_rollouts.py under `torchrun` (2 gloo ranks): tree rollouts with DDP, then with forced FSDP2
(where every `generate` call is collective), each 2 training steps on each rank's own prompts.

`python _tree_dist_run.py OUT`: writes `<OUT>/<mode>/rank<r>.json` with the rank's token counts, its number of
`generate` calls and the log keys. The ranks' trees differ (their prompts and samples differ), so they need
different numbers of `generate` calls of their own: a run that finishes shows the ranks stayed in step.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from synapo_ext.trl import SynAPOConfig, SynAPOTrainer  # noqa: E402
from tests.trl._dist_trainer_run import ForcedFSDP2Trainer, untied_policy  # noqa: E402
from tests.trl.tiny import make_dataset, make_tokenizer  # noqa: E402


def last_char_reward(completions, **kwargs):
    return [1.0 if c[-1:].isdigit() else 0.0 for c in completions]


def run(mode: str, out: str) -> None:
    tok = make_tokenizer()
    delimiter = tok.convert_tokens_to_ids("\n\n")
    args = SynAPOConfig(
        output_dir=os.path.join(out, mode, "run"),
        preset="synapo",
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        num_generations=2,  # one root, two leaves: 2 trees per rank
        per_device_train_batch_size=4,
        max_completion_length=10,
        max_steps=2,
        logging_steps=1,
        learning_rate=1e-2,
        critic_learning_rate=1e-2,
        bf16=False,
        value_warmup_steps=0,
        rollout_tree_roots=1,
        rollout_tree_branching=2,
        rollout_tree_depth=1,
        rollout_tree_segments=2,  # two generate calls per level where a node closes one segment, one where it ends
        generation_kwargs={"sequence_bias": {(delimiter,): 1.0}},
        seed=0,
    )
    cls = ForcedFSDP2Trainer if mode == "fsdp2" else SynAPOTrainer
    trainer = cls(
        model=untied_policy(tok),
        reward_funcs=[last_char_reward],
        args=args,
        train_dataset=make_dataset(),
        processing_class=tok,
    )
    calls = []
    generate_level = trainer._generate_level

    def counted(prompts, max_new_tokens, stop_at_delimiter):
        calls.append(len(prompts))
        return generate_level(prompts, max_new_tokens, stop_at_delimiter)

    trainer._generate_level = counted
    trainer.train()
    rank = trainer.accelerator.process_index
    folder = os.path.join(out, mode)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
        json.dump(
            {
                "counts": trainer.rollout_token_counts,
                "calls": calls,
                "keys": sorted({k for entry in trainer.state.log_history for k in entry}),
                "backend": trainer._critic_backend,
            },
            f,
        )


if __name__ == "__main__":
    for mode in ("ddp", "fsdp2"):
        run(mode, sys.argv[1])
