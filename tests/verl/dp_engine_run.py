"""One mini-batch through verl's real FSDP2 engines on CPU (gloo), on 1 or N data-parallel ranks: SynAPO's loss terms
and the gradients they give, for `tests/verl/test_data_parallel.py` to compare across rank counts and micro-batching.

    python -m tests.verl.dp_engine_run critic,actor RANKS MODE OUT_DIR [PRESET]     # MODE: fixed|dynamic|packed

A fixed batch (4 prompts x 4 responses, mixed scores, rows permuted so that SCVL pairs straddle the ranks) is split
as verl's dispatch splits it (contiguous, equal shares); each rank runs `engine.forward_backward_batch` on its share
with the loss verl's worker would call (the critic: `synapo_value_loss`; the actor: verl's `ppo_loss` with the
positive-example LM term). Rank 0 writes OUT_DIR/report.json (every loss term summed over micro-batches, averaged
over ranks: each rank's term carries verl's x dp_size) and OUT_DIR/grads.safetensors (the full gradients after
FSDP2's reduction, `<role>.<parameter>`). MODE `fixed`: micro-batches of 2 rows; `dynamic`: `use_dynamic_bsz=True`
with a token budget that splits the share into several micro-batches; `packed`: fixed micro-batches with
`use_remove_padding=True` (each micro-batch's rows packed into one sequence, attention kept inside each row by the
position ids).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from functools import partial

import numpy as np
import torch

P = 4  # prompt length
GROUPS, N, T = 4, 4, 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fixed_batch(tok) -> tuple[dict, torch.Tensor]:
    """The batch (rows permuted with a fixed seed) and the permutation."""
    from tests.verl.helpers import rollout_batch

    batch = rollout_batch(tok, groups=GROUPS, n=N, T=T, seed=11)
    order = torch.from_numpy(np.random.default_rng(0).permutation(GROUPS * N))
    return {k: (v[order] if isinstance(v, torch.Tensor) else v[order.numpy()]) for k, v in batch.items()}, order


def _config(path: str, preset: str, dynamic: bool, packed: bool):
    from hydra import compose, initialize_config_dir

    from synapo_ext.verl.config import prepare_config
    from tests.verl.helpers import verl_config_dir

    micro = ["critic.ppo_micro_batch_size_per_gpu=2", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
             "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2"]  # fmt: skip
    dyn = [f"critic.use_dynamic_bsz={dynamic}", f"actor_rollout_ref.actor.use_dynamic_bsz={dynamic}",
           "critic.ppo_max_token_len_per_gpu=48", "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=48"]  # fmt: skip
    with initialize_config_dir(config_dir=verl_config_dir(), version_base=None):
        cfg = compose(
            config_name="ppo_trainer",
            overrides=[
                "algorithm.adv_estimator=synapo",
                f"+algorithm.synapo.preset={preset}",
                "actor_rollout_ref.rollout.n=4",
                f"actor_rollout_ref.model.path={path}",
                f"actor_rollout_ref.model.use_remove_padding={packed}",
                "actor_rollout_ref.actor.strategy=fsdp2",
                "actor_rollout_ref.actor.use_kl_loss=False",
                "actor_rollout_ref.model.enable_gradient_checkpointing=False",
                "+actor_rollout_ref.model.override_config.attn_implementation=eager",
                f"critic.model.path={path}",
                "critic.strategy=fsdp2",
                f"critic.model.use_remove_padding={packed}",
                "critic.model.enable_gradient_checkpointing=False",
                "+critic.model.override_config.attn_implementation=eager",
                *micro,
                *dyn,
            ],
        )
    prepare_config(cfg)
    return cfg


def _engine(cfg, role: str):
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.engine import EngineRegistry

    if role == "critic":
        critic = omega_conf_to_dataclass(cfg.critic)
        critic.model.model_type = "value_model"  # as verl's TrainingWorker sets it
        model, engine_cfg, optim, ckpt = critic.model, critic.engine, critic.optim, critic.checkpoint
        model_type, loss_cfg = "value_model", critic
    else:
        actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
        model = omega_conf_to_dataclass(cfg.actor_rollout_ref.model)
        actor.model_config = model
        engine_cfg, optim, ckpt = actor.engine, actor.optim, actor.checkpoint
        model_type, loss_cfg = "language_model", actor
    # float32 compute (verl's default is bf16), so rank counts and micro-batchings compare at float tolerance
    fp32 = {"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}
    object.__setattr__(engine_cfg, "mixed_precision", fp32)  # verl's configs are frozen; a test-only change
    engine = EngineRegistry.new(
        model_type=model_type, backend="fsdp2", model_config=model, engine_config=engine_cfg,
        optimizer_config=optim, checkpoint_config=ckpt,
    )  # fmt: skip
    engine.initialize()
    return engine, loss_cfg


def _data(batch: dict, tok, extra: dict, rows: slice, dynamic: bool, packed: bool, global_batch: int):
    """Rows `rows` of the batch in verl's no-padding layout, with the engine settings verl's worker injects."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    B = batch["responses"].shape[0]
    prompts = torch.randint(2, len(tok), (B, P), generator=torch.Generator().manual_seed(1))
    attention = torch.cat([torch.ones(B, P), batch["response_mask"]], dim=1).long()
    fields = {
        "prompts": prompts,
        "responses": batch["responses"],
        "input_ids": torch.cat([prompts, batch["responses"]], dim=1),
        "attention_mask": attention,
        "position_ids": (attention.cumsum(-1) - 1).clamp_min(0),
        "response_mask": batch["response_mask"].long(),
        "temperature": torch.ones(B),
        **extra,
    }
    td = TensorDict({k: v[rows] for k, v in fields.items()}, batch_size=[len(range(B)[rows])])
    td = left_right_2_no_padding(td)
    tu.assign_non_tensor(
        td,
        use_remove_padding=packed,
        use_dynamic_bsz=dynamic,
        micro_batch_size_per_gpu=2,
        max_token_len_per_gpu=48,
        use_fused_kernels=False,
        global_batch_size=global_batch,
        temperature=1.0,
    )
    return td


def _value(v) -> float:
    if hasattr(v, "values"):  # verl's Metric: the micro-batch values appended so far
        return float(sum(float(x) for x in v.values))
    return float(v.detach()) if isinstance(v, torch.Tensor) else float(v)


def worker(rank: int, world: int, roles: tuple[str, ...], mode: str, out: str, preset: str, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    import torch.distributed as dist
    from verl.utils import model as verl_model

    from synapo_ext.verl.config import params_from_algorithm
    from synapo_ext.verl.estimator import StepContext, compute_synapo_advantage, step_context
    from synapo_ext.verl.trainer import row_fields
    from tests.verl.critic_engine_run import eager_valuehead
    from tests.verl.helpers import make_tokenizer, tiny_model_dir

    verl_model.load_valuehead_model = eager_valuehead
    dist.init_process_group("gloo", rank=rank, world_size=world)
    tok = make_tokenizer()
    path = os.path.join(out, "model")
    if rank == 0:
        tiny_model_dir(tok, path)
    dist.barrier()
    dynamic, packed = mode == "dynamic", mode == "packed"
    cfg = _config(path, preset, dynamic, packed)
    batch, order = fixed_batch(tok)
    ctx = StepContext(tokenizer=tok)
    with step_context(ctx):
        advantages, returns = compute_synapo_advantage(
            batch["token_level_rewards"], batch["response_mask"], index=batch["uid"], config=cfg.algorithm,
            values=batch["values"], values_global=batch["values_global"], entropys=batch["entropys"],
            responses=batch["responses"], scores=batch["token_level_scores"].sum(-1),
        )  # fmt: skip
    params = params_from_algorithm(cfg.algorithm)
    ctx.extras = {"values_global": batch["values_global"]}
    fields = row_fields(ctx, params)
    B = GROUPS * N
    share = B // world
    report: dict = {"world": world, "mode": mode}
    grads: dict[str, torch.Tensor] = {}
    for role in roles:
        engine, loss_cfg = _engine(cfg, role)
        if role == "critic":
            from synapo_ext.verl.critic import synapo_value_loss

            extra = {"values": batch["values"], "returns": returns, **fields}
            loss_fn = partial(synapo_value_loss, config=loss_cfg)
        else:
            from verl.workers.utils import losses

            old = -2.0 - torch.rand(batch["responses"].shape, generator=torch.Generator().manual_seed(3))
            extra = {"old_log_probs": old, "advantages": advantages, **fields}
            loss_fn = partial(losses.ppo_loss, config=loss_cfg)
        terms: list[dict[str, float]] = []

        def recording(model_output, data, dp_group=None, loss_fn=loss_fn, terms=terms):
            loss, metrics = loss_fn(model_output=model_output, data=data, dp_group=dp_group)
            terms.append({"loss": float(loss.detach()), **{k: _value(v) for k, v in metrics.items()}})
            return loss, metrics

        data = _data(batch, tok, extra, slice(rank * share, (rank + 1) * share), dynamic, packed, B)
        with engine.train_mode():
            engine.optimizer_zero_grad()
            engine.forward_backward_batch(data, recording, forward_only=False)
            for name, p in engine.module.named_parameters():
                if p.grad is None:  # a parameter no loss reaches: the same on every rank count
                    continue
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                grads[f"{role}.{name}"] = g.detach().double().contiguous()
        summed = {k: sum(t.get(k, 0.0) for t in terms) for k in sorted({k for t in terms for k in t})}
        gathered = [None] * world
        dist.all_gather_object(gathered, {"terms": summed, "micro_batches": len(terms)})
        report[role] = {
            "terms": {k: float(np.mean([g["terms"][k] for g in gathered])) for k in summed},
            "micro_batches": [g["micro_batches"] for g in gathered],
        }
        del engine
    pos, neg = ctx.result.scvl.pos_index, ctx.result.scvl.neg_index
    report["scvl_pairs"] = int(pos.numel())
    report["cross_rank_pairs"] = int(((pos // share) != (neg // share)).sum()) if pos.numel() else 0
    report["lm_rows"] = int((fields.get("synapo_lm_weight", torch.zeros(1)) > 0).sum())
    report["grads"] = len(grads)
    if rank == 0:
        from safetensors.torch import save_file

        save_file(grads, os.path.join(out, "grads.safetensors"))
        with open(os.path.join(out, "report.json"), "w") as f:
            json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


def main(roles: str, world: int, mode: str, out: str, preset: str = "synapo") -> None:
    os.environ.setdefault("VERL_PLATFORM", "cpu")
    os.environ.setdefault("VERL_ENGINE_DEVICE", "cuda")
    os.environ.setdefault("VERL_ENGINE_VENDOR", "nvidia")
    import tests.verl.cpu_platform  # noqa: F401  (registers the `cpu` platform)

    os.makedirs(out, exist_ok=True)
    port = _free_port()
    if mode not in ("fixed", "dynamic", "packed"):
        raise ValueError(f"MODE must be fixed, dynamic or packed, got {mode!r}")
    args = (world, tuple(roles.split(",")), mode, out, preset, port)
    if world == 1:
        worker(0, *args)
    else:
        torch.multiprocessing.spawn(worker, args=args, nprocs=world)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], *sys.argv[5:6])
