"""Run SynAPO's critic through verl's real value-model engine (FSDP2, gloo, one CPU process) and print a JSON report.

Run by tests/verl/test_critic_engine.py in a subprocess (it sets a process group and verl's platform, which must not
leak into other tests). Test-only shims: the CPU platform (`cpu_platform.py`) and eager attention instead of the
flash-attention verl 0.9.1 hard-codes for value models.

    python -m tests.verl.critic_engine_run [preset] [use_remove_padding]
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VERL_PLATFORM", "cpu")
os.environ.setdefault("VERL_ENGINE_DEVICE", "cuda")
os.environ.setdefault("VERL_ENGINE_VENDOR", "nvidia")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
    os.environ.setdefault(k, v)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from verl.utils import model as verl_model  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.config import omega_conf_to_dataclass  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding  # noqa: E402

from synapo_ext.verl.config import params_from_algorithm, prepare_config  # noqa: E402
from synapo_ext.verl.estimator import StepContext, compute_synapo_advantage, step_context  # noqa: E402
from synapo_ext.verl.trainer import row_fields  # noqa: E402
from tests.verl.cpu_platform import PlatformCPU  # noqa: E402  (registers the platform)
from tests.verl.helpers import make_tokenizer, rollout_batch, tiny_model_dir, verl_config_dir  # noqa: E402

P = 4  # prompt length


def eager_valuehead(local_path, torch_dtype, model_config, trust_remote_code):
    return transformers.AutoModelForTokenClassification.from_pretrained(
        local_path, torch_dtype=torch_dtype, config=model_config, attn_implementation="eager"
    )


def critic_config(path: str, preset: str, remove_padding: bool):
    with initialize_config_dir(config_dir=verl_config_dir(), version_base=None):
        cfg = compose(
            config_name="ppo_trainer",
            overrides=[
                "algorithm.adv_estimator=synapo",
                f"+algorithm.synapo.preset={preset}",
                "actor_rollout_ref.rollout.n=4",
                f"actor_rollout_ref.model.path={path}",
                f"critic.model.path={path}",
                "critic.strategy=fsdp2",
                f"critic.model.use_remove_padding={remove_padding}",
                "critic.ppo_micro_batch_size_per_gpu=4",
                "critic.optim.lr=1e-2",
                "critic.model.enable_gradient_checkpointing=False",
                "critic.use_dynamic_bsz=False",
                "+critic.model.override_config.attn_implementation=eager",
            ],
        )
    prepare_config(cfg)
    return omega_conf_to_dataclass(cfg.critic), cfg


def engine_batch(batch: dict, tokenizer, extra: dict, remove_padding: bool, micro: int) -> TensorDict:
    """What verl's critic worker receives: left-padded prompts, right-padded responses -> no-padding layout."""
    B, R = batch["responses"].shape
    prompts = torch.randint(2, len(tokenizer), (B, P), generator=torch.Generator().manual_seed(1))
    attention = torch.cat([torch.ones(B, P), batch["response_mask"]], dim=1).long()
    td = TensorDict(
        {
            "prompts": prompts,
            "responses": batch["responses"],
            "input_ids": torch.cat([prompts, batch["responses"]], dim=1),
            "attention_mask": attention,
            "position_ids": (attention.cumsum(-1) - 1).clamp_min(0),
            "response_mask": batch["response_mask"].long(),
            "temperature": torch.ones(B),
            **extra,
        },
        batch_size=[B],
    )
    td = left_right_2_no_padding(td)
    tu.assign_non_tensor(
        td,
        use_remove_padding=remove_padding,
        use_dynamic_bsz=False,
        micro_batch_size_per_gpu=micro,
        max_token_len_per_gpu=4096,
        use_fused_kernels=False,
        global_batch_size=B,
        temperature=1.0,
    )
    return td


def main(preset: str = "synapo", remove_padding: bool = False) -> dict:
    from verl.workers.engine import EngineRegistry  # after the CPU platform is registered

    from synapo_ext.verl.critic import synapo_value_loss
    from synapo_ext.verl.engine import SynAPOValueEngine

    assert PlatformCPU.device_name == "cpu"
    verl_model.load_valuehead_model = eager_valuehead
    dist.init_process_group("gloo", rank=0, world_size=1)
    tok = make_tokenizer()
    critic_cfg, cfg = critic_config(tiny_model_dir(tok), preset, remove_padding)
    critic_cfg.model.model_type = "value_model"  # as verl's TrainingWorker sets it
    engine = EngineRegistry.new(
        model_type="value_model",
        backend=critic_cfg.engine.strategy,
        model_config=critic_cfg.model,
        engine_config=critic_cfg.engine,
        optimizer_config=critic_cfg.optim,
        checkpoint_config=critic_cfg.checkpoint,
    )
    engine.initialize()
    report = {"engine": type(engine).__name__, "is_synapo_engine": isinstance(engine, SynAPOValueEngine)}

    # 1. rollout-time values through the engine (verl's compute_values = infer_batch)
    batch = rollout_batch(tok, groups=2, n=4, T=16, seed=4)
    with engine.eval_mode():
        out = engine.infer_batch(engine_batch(batch, tok, {}, remove_padding, 4), loss_function=None)
    heads = out["model_output"]
    report["heads"] = sorted(heads)
    probe = engine_batch(batch, tok, {}, remove_padding, 4)
    values = {k: no_padding_2_padding(v, probe) * batch["response_mask"] for k, v in heads.items()}
    report["heads_differ"] = bool(len(values) == 2 and not torch.allclose(values["values"], values["values_global"]))

    # 2. advantages and critic targets from those values (what the patched V1 trainer computes)
    ctx = StepContext(tokenizer=tok)
    with step_context(ctx):
        _, returns = compute_synapo_advantage(
            batch["token_level_rewards"], batch["response_mask"], index=batch["uid"], config=cfg.algorithm,
            values=values["values"], values_global=values.get("values_global"), entropys=batch["entropys"],
            responses=batch["responses"], scores=batch["token_level_scores"].sum(-1),
        )  # fmt: skip
    params = params_from_algorithm(cfg.algorithm)
    ctx.extras = {"values_global": values.get("values_global", torch.zeros(1))}
    fields = row_fields(ctx, params)
    extra = {"values": values["values"], "returns": returns, **fields}

    # 3. one critic update through the engine with our loss (2 micro-batches, rows in a shuffled order)
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(returns)))
    rows = {k: v[order] for k, v in batch.items() if k != "uid"}
    data = engine_batch(rows, tok, {k: v[order] for k, v in extra.items()}, remove_padding, 4)
    before = [p.detach().clone() for p in engine.module.parameters()]
    from functools import partial

    loss_fn = partial(synapo_value_loss, config=critic_cfg)
    with engine.train_mode():
        out = engine.train_batch(data, loss_function=loss_fn)
    metrics = out["metrics"]
    after = list(engine.module.parameters())
    with engine.eval_mode():
        heads = engine.infer_batch(engine_batch(batch, tok, {}, remove_padding, 4), loss_function=None)["model_output"]
    new = {k: no_padding_2_padding(v, probe) * batch["response_mask"] for k, v in heads.items()}
    report["heads_differ_after_update"] = bool(
        len(new) == 2 and not torch.allclose(new["values"], new["values_global"])
    )
    report["params_moved"] = any(not torch.equal(a.detach(), b) for a, b in zip(after, before, strict=True))

    def total(key):
        v = metrics.get(key)
        if v is None:
            return None
        v = v if isinstance(v, list) else [v]
        return float(sum(float(getattr(x, "aggregate", lambda x=x: x)()) for x in v))

    report["vf_loss"] = total("critic/vf_loss")
    report["global_loss"] = total("critic/synapo/global_loss")
    report["scvl_loss"] = total("critic/synapo/scvl_loss")
    report["scvl_pairs"] = int(ctx.result.scvl.pos_index.numel()) if ctx.result.scvl is not None else 0
    report["loss"] = float(sum(out["loss"])) if isinstance(out["loss"], list) else float(out["loss"])
    dist.destroy_process_group()
    return report


if __name__ == "__main__":
    preset = sys.argv[1] if len(sys.argv) > 1 else "synapo"
    rmpad = len(sys.argv) > 2 and sys.argv[2].lower() in ("1", "true")
    print("SYNAPO_REPORT " + json.dumps(main(preset, rmpad)))  # noqa: T201 (read by test_critic_engine.py)
