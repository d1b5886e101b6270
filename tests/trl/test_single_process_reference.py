"""The single-process `SynAPOTrainer` path, bitwise: a fixed tiny run (a warm-up batch, 3 steps, 2 critic mini-batches
per update) of `synapo` and of `vapo` gives exactly the logged metrics and final critic / policy weights recorded in
`single_process_reference.json`.

The record was written at 90a5b66, before the critic went through `synapo_ext.trl.distributed` (issue 14), and the
long benchmarks compare against runs of that code. A change that moves these numbers on purpose (a fix of the core's
math, another TRL) rewrites the record, saying so in its commit:
`python tests/trl/test_single_process_reference.py --write`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile

import pytest

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
else:
    pytest.importorskip("trl")
    pytestmark = pytest.mark.trl

RECORD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "single_process_reference.json")
PRESETS = ("synapo", "vapo")
UNTIMED = ("time", "runtime", "per_second")  # wall-clock entries are not part of the record


def _digest(model) -> str:
    h = hashlib.sha256()
    for name, value in sorted(getattr(model, "module", model).state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def reference_run(preset: str) -> dict:
    """The logged numbers (every entry, timings left out) and the final weights' sha256 of one fixed run."""
    from synapo_ext.trl import SynAPOConfig, SynAPOTrainer
    from tests.trl.tiny import first_char_reward, make_dataset, make_policy, make_tokenizer

    tok = make_tokenizer()
    with tempfile.TemporaryDirectory() as out:
        args = SynAPOConfig(
            output_dir=out,
            preset=preset,
            use_cpu=True,
            bf16=False,  # as the learning benchmarks run
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
            num_generations=4,
            per_device_train_batch_size=8,
            max_completion_length=16,
            max_steps=3,
            logging_steps=1,
            learning_rate=1e-2,
            critic_learning_rate=1e-2,
            critic_mini_batch_size=4,
            value_warmup_steps=1,
            seed=0,
        )
        trainer = SynAPOTrainer(
            model=make_policy(tok),
            reward_funcs=[first_char_reward],
            args=args,
            train_dataset=make_dataset(),
            processing_class=tok,
        )
        trainer.train()
    logs = [
        {k: v for k, v in entry.items() if isinstance(v, (int, float)) and not any(t in k for t in UNTIMED)}
        for entry in trainer.state.log_history
    ]
    return {"logs": logs, "critic": _digest(trainer.critic), "policy": _digest(trainer.model)}


@pytest.mark.parametrize("preset", PRESETS)
def test_single_process_run_is_bitwise_the_recorded_one(preset):
    with open(RECORD) as f:
        expected = json.load(f)[preset]
    got = reference_run(preset)
    assert len(got["logs"]) == len(expected["logs"])
    for step, (entry, want) in enumerate(zip(got["logs"], expected["logs"], strict=True)):
        assert entry.keys() == want.keys(), (step, sorted(entry.keys() ^ want.keys()))
        differ = {k: (entry[k], want[k]) for k in want if entry[k] != want[k]}
        assert not differ, f"{preset}, log entry {step}: (now, recorded) {differ}"
    assert got["critic"] == expected["critic"], f"{preset}: the final critic's weights changed"
    assert got["policy"] == expected["policy"], f"{preset}: the final policy's weights changed"


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(f"usage: python {sys.argv[0]} --write  (rewrites {RECORD})")
    with open(RECORD, "w") as f:
        json.dump({preset: reference_run(preset) for preset in PRESETS}, f, indent=1)
        f.write("\n")
    sys.stdout.write(f"wrote {RECORD}\n")
