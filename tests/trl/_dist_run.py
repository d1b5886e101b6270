"""Run by test_multiprocess.py under `torchrun --nproc_per_node 2` (gloo, CPU): SynAPO on three batch layouts.

Writes `<out>/rank<r>.json`: per layout, a digest of the critic's weights and the logged SCVL pair counts.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from synapo_ext.core import METRICS  # noqa: E402
from synapo_ext.trl import SynAPOConfig, SynAPOTrainer  # noqa: E402
from tests.trl.tiny import first_char_reward, make_dataset, make_policy, make_tokenizer  # noqa: E402

LAYOUTS = {
    "whole_groups": {"per_device_train_batch_size": 4, "steps_per_generation": 2, "gradient_accumulation_steps": 2},
    "split_groups": {"per_device_train_batch_size": 2, "steps_per_generation": 1},  # a group spans both ranks
    "illegal": {"per_device_train_batch_size": 3, "steps_per_generation": 1},  # 6 rows: not whole groups of 4
}


def digest(model) -> str:
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()


def main(out: str) -> None:
    rank = int(os.environ["RANK"])
    results = {}
    for name, layout in LAYOUTS.items():
        tok = make_tokenizer()
        try:
            args = SynAPOConfig(
                output_dir=os.path.join(out, name),
                preset="synapo",
                use_cpu=True,
                report_to=[],
                save_strategy="no",
                disable_tqdm=True,
                num_generations=4,
                max_completion_length=12,
                max_steps=2,
                logging_steps=1,
                value_warmup_steps=3,  # the plateau rule below stops it at 2 on every rank (same reduced numbers)
                value_warmup_patience=1,
                value_warmup_window=1,
                value_warmup_min_delta=1.0,
                critic_learning_rate=1e-2,
                seed=0,
                **layout,
            )
            trainer = SynAPOTrainer(
                model=make_policy(tok, seed=rank),  # different start on each rank: the policy is synced by DDP
                reward_funcs=[first_char_reward],
                args=args,
                train_dataset=make_dataset(),
                processing_class=tok,
            )
            before = digest(trainer.critic)
            trainer.train()
        except ValueError as err:
            results[name] = {"error": str(err)}
            continue
        pairs = [e[METRICS.scvl_pairs] for e in trainer.state.log_history if METRICS.scvl_pairs in e]
        results[name] = {
            "critic": digest(trainer.critic),
            "critic_moved": digest(trainer.critic) != before,
            "policy": digest(trainer.model),
            "scvl_pairs": pairs,
            "warmup": [trainer._warmup_done, trainer._warmup_stop_reason],
        }
        torch.distributed.barrier()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])
