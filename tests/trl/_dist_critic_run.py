"""Run by test_distributed_critic.py under `torchrun --nproc_per_node 2` (gloo, CPU): the critic under DDP / FSDP2.

`python _dist_critic_run.py MODE OUT`: MODE is "ddp" or "fsdp2". Writes `<OUT>/rank<r>.json` with the sharding, the
critic's state after a few steps next to a 1-process run on the same data, and a save / load / resume check.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from accelerate import Accelerator  # noqa: E402
from accelerate.state import PartialState  # noqa: E402
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402
from transformers import AutoModelForTokenClassification  # noqa: E402

from synapo_ext.trl.critic import build_critic  # noqa: E402
from synapo_ext.trl.critic_weights import (  # noqa: E402
    export_critic,
    init_critic_meta,
    load_critic_sharded,
    local_numel,
    save_critic_sharded,
)
from synapo_ext.trl.distributed import PreparedCritic, critic_step, prepare_critic  # noqa: E402
from tests.trl.tiny import make_policy, make_tokenizer  # noqa: E402

B, L, STEPS, MORE, LR, CLIP = 4, 10, 3, 2, 1e-2, 1.0
# Adam's eps well above float noise: with eps=1e-8 a gradient element that cancels to ~1e-10 moves by +-lr on a
# sign flip of its rounding, so summation order (1 process vs a reduction over 2) shows as lr-sized differences
ADAM = {"eps": 1e-3}  # and weight_decay=0 on both sides (prepare_critic's default; torch's is 0.01)


def make_accelerator(mode: str) -> Accelerator:
    if mode == "ddp":
        return Accelerator(cpu=True)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    # accelerate never selects FSDP on MULTI_CPU (state.py lists GPU-like types only); fully_shard itself runs on
    # CPU + gloo, so force the type in both shared states (AcceleratorState re-reads PartialState's on each init).
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    return accelerator


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 24, (B, L), generator=g), torch.randn(B, L, 2, generator=g)


def loss_of(model, ids, target):
    values = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()  # (b, L, H)
    return 0.5 * (values - target).square().mean()


def full_state(model) -> dict[str, torch.Tensor]:
    if any(hasattr(p, "to_local") for p in model.parameters()):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in getattr(model, "module", model).state_dict().items()}


def digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name, value in sorted(state.items()):
        h.update(name.encode())
        h.update(value.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def train(prepared: PreparedCritic, rows: slice, steps: int, seed0: int) -> None:
    for step in range(steps):
        ids, target = batch(seed0 + step)
        loss = loss_of(prepared.model, ids[rows], target[rows])
        norm = critic_step(prepared, loss, max_grad_norm=CLIP)
        if os.environ.get("DEBUG_CRITIC"):
            sys.stderr.write(f"{prepared.backend} {step} {float(loss)} {float(norm)}\n")


def main(mode: str, out: str) -> None:
    accelerator = make_accelerator(mode)
    rank, world = accelerator.process_index, accelerator.num_processes
    rows = slice(rank * B // world, (rank + 1) * B // world)
    tok = make_tokenizer()

    # 1-process reference: the whole batch, a plain critic, a plain AdamW (identical on every rank)
    reference_policy = make_policy(tok, seed=0)
    reference = build_critic(None, reference_policy, num_heads=2).eval()
    ref = PreparedCritic(
        reference, torch.optim.AdamW(reference.parameters(), lr=LR, weight_decay=0.0, **ADAM), "single"
    )
    initial_reference = full_state(reference)
    train(ref, slice(0, B), STEPS, seed0=1)

    # the distributed run: policy prepared first (as the trainer does), critic from the meta device
    policy = make_policy(tok, seed=0)
    policy.config.tie_word_embeddings = False  # tied weights trip accelerate's FSDP2 name mapping on CPU toys
    policy, _ = accelerator.prepare(policy, torch.optim.AdamW(policy.parameters(), lr=LR))
    critic = init_critic_meta(accelerator.unwrap_model(policy).config, num_heads=2)
    prepared = prepare_critic(accelerator, critic, learning_rate=LR, policy=policy, **ADAM)
    held, total = local_numel(prepared.unwrapped)
    init_match = digest(full_state(prepared.model)) == digest(initial_reference)
    train(prepared, rows, STEPS, seed0=1)
    after = full_state(prepared.model)
    diffs = {k: float((after[k] - v).abs().max()) for k, v in full_state(reference).items()}
    max_diff = max(diffs.values())
    if os.environ.get("DEBUG_CRITIC"):
        sys.stderr.write(f"{sorted(diffs.items(), key=lambda kv: -kv[1])[:4]}\n")

    # save, go on MORE steps; load into a fresh critic, same MORE steps: the states must agree bitwise
    ckpt = os.path.join(out, "checkpoint")
    save_critic_sharded(accelerator, prepared, ckpt)
    export_critic(accelerator, prepared, os.path.join(ckpt, "critic"))
    train(prepared, rows, MORE, seed0=100)
    continued = digest(full_state(prepared.model))
    fresh = prepare_critic(
        accelerator, init_critic_meta(critic.config, num_heads=2), learning_rate=LR, policy=policy, **ADAM
    )
    load_critic_sharded(accelerator, fresh, ckpt)
    loaded = digest(full_state(fresh.model)) == digest(after)
    train(fresh, rows, MORE, seed0=100)
    exported = AutoModelForTokenClassification.from_pretrained(os.path.join(ckpt, "critic"))
    export_diff = max(float((exported.state_dict()[k] - v).abs().max()) for k, v in after.items())
    result = {
        "backend": prepared.backend,
        "held": held,
        "total": total,
        "init_match": init_match,
        "max_diff_vs_1proc": max_diff,
        "loaded_equal": loaded,
        "resumed_equal": digest(full_state(fresh.model)) == continued,
        "export_diff": export_diff,
        "files": sorted(os.listdir(os.path.join(ckpt, "critic_sharded"))),
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
