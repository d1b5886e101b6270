"""Test-only support that lets the stock `python -m verl.trainer.main_ppo` run on a CPU-only machine.

Imported in every verl process (driver, TaskRunner, workers, agent-loop and reward workers) through
`VERL_USE_EXTERNAL_MODULES=tests.verl.realrun.support`, set by tests/verl/test_real_run.py. Not shipped: the plugin
never changes how verl picks its device or rollout. What it adds (see the blockers in docs/verl_real_run.md):

- the `cpu` platform (gloo; `tests/verl/cpu_platform.py`), selected with VERL_PLATFORM=cpu;
- the value model's attention: verl 0.9.1 hard-codes flash-attention 2 for value models; here it is eager;
- a CPU rollout backend `hfcpu`: verl registers only vLLM, SGLang and TRT-LLM. `HFCPUReplica` starts one Ray actor
  (`HFCPUServer`) per replica that samples with Hugging Face `generate`; the hybrid worker's `HFCPURollout` receives
  the actor's weights through verl's `naive` sync and hands them to that actor.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import ray
import torch
import transformers

from tests.verl import cpu_platform  # noqa: F401  (registers the `cpu` platform)

logger = logging.getLogger(__name__)

ROLLOUT = "hfcpu"


def _server_name(replica_rank: int) -> str:
    return f"{ROLLOUT}_server_{replica_rank}"


def _eager_valuehead(local_path, torch_dtype, model_config, trust_remote_code):
    return transformers.AutoModelForTokenClassification.from_pretrained(
        local_path, torch_dtype=torch_dtype, config=model_config, attn_implementation="eager"
    )


class HFCPUServer:
    """One rollout server: a Hugging Face causal LM sampling on CPU (the Ray actor behind a replica)."""

    def __init__(self, model_path: str, response_length: int) -> None:
        torch.set_num_threads(1)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            model_path, attn_implementation="eager", dtype=torch.float32
        ).eval()
        self.response_length = response_length
        self.global_steps = 0  # the policy version the weights come from (verl's staleness metrics read it)
        self._lock = threading.Lock()

    def load_weights(self, state: dict[str, torch.Tensor], global_steps: int | None = None) -> int:
        with self._lock:
            result = self.model.load_state_dict(state, strict=False)
            if result.unexpected_keys:
                raise KeyError(f"hfcpu rollout: weights not in the model: {result.unexpected_keys[:5]}")
            missing = [k for k in result.missing_keys if k != "lm_head.weight"]  # tied to the embedding
            if missing:
                raise KeyError(f"hfcpu rollout: weights missing from the update: {missing[:5]}")
            self.global_steps = global_steps if global_steps is not None else self.global_steps
            return self.global_steps

    def generate(self, request_id: str, prompt_ids: list[int], sampling_params: dict[str, Any], **kwargs: Any):
        from verl.workers.rollout.replica import TokenOutput

        temperature = float(sampling_params.get("temperature", 1.0))
        max_new = int(sampling_params.get("max_tokens") or self.response_length)
        ids = torch.tensor([list(prompt_ids)])
        with self._lock, torch.no_grad():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new,
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                top_p=None,
                top_k=None,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=self.model.config.pad_token_id,
            )
        tokens = out.sequences[0, ids.shape[1] :]
        log_probs = None
        if sampling_params.get("logprobs"):
            logits = torch.stack(out.scores, dim=1)[0].float()  # (new, V), after temperature
            log_probs = logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1).tolist()
        return TokenOutput(
            token_ids=tokens.tolist(),
            log_probs=log_probs,
            stop_reason="completed",
            extra_fields={"global_steps": self.global_steps},
        )

    # verl's replica calls these on every server; an HF model on CPU has no memory to free
    def wake_up(self, *args, **kwargs) -> None: ...
    def sleep(self, *args, **kwargs) -> None: ...
    def abort_all_requests(self, *args, **kwargs) -> None: ...
    def resume_generation(self, *args, **kwargs) -> None: ...
    def clear_kv_cache(self, *args, **kwargs) -> None: ...
    def release_kv_cache(self, *args, **kwargs) -> None: ...
    def resume_kv_cache(self, *args, **kwargs) -> None: ...
    def start_profile(self, *args, **kwargs) -> None: ...
    def stop_profile(self, *args, **kwargs) -> None: ...


def _gloo_process_group(module) -> None:
    """verl builds "cpu:gloo,<device>:<backend>", which is "cpu:gloo,cpu:gloo" here: ask for plain gloo."""
    original = module.initialize_global_process_group_ray

    def initialize_global_process_group_ray(timeout_second=None, backend=None):
        return original(timeout_second=timeout_second, backend=backend or "gloo")

    module.initialize_global_process_group_ray = initialize_global_process_group_ray


def _full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = module.state_dict()
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().float().cpu() for k, v in state.items()}


def _dump_engine_state(transformer_impl) -> None:
    """With SYNAPO_TEST_DUMP=<dir>: after every checkpoint save or load, write the engine's full weights to
    <dir>/<value|policy>_<save|load>_<step>.pt, so a test compares a resumed model with the saved one exactly."""
    import os

    root = os.environ.get("SYNAPO_TEST_DUMP")
    if not root:
        return
    cls = transformer_impl.FSDPEngine

    def dump(engine, event: str, step: int) -> None:
        role = "value" if isinstance(engine, transformer_impl.FSDPEngineWithValueHead) else "policy"
        torch.save(_full_state(engine.module), os.path.join(root, f"{role}_{event}_{step}.pt"))

    save, load = cls.save_checkpoint, cls.load_checkpoint

    def save_checkpoint(self, local_path, hdfs_path=None, global_step=0, max_ckpt_to_keep=None, **kwargs):
        save(self, local_path, hdfs_path, global_step, max_ckpt_to_keep, **kwargs)
        dump(self, "save", global_step)

    def load_checkpoint(self, local_path, hdfs_path=None, del_local_after_load=True, **kwargs):
        load(self, local_path, hdfs_path, del_local_after_load, **kwargs)
        dump(self, "load", int(str(local_path).rstrip("/").split("global_step_")[-1].split("/")[0]))

    cls.save_checkpoint, cls.load_checkpoint = save_checkpoint, load_checkpoint


def _row_ids(responses: torch.Tensor, mask: torch.Tensor) -> list[tuple[int, ...]]:
    """Each row's valid response tokens: the row's identity across processes (a random policy's 16-token answers
    do not repeat; the test drops any that does)."""
    if responses.is_nested:
        responses = responses.to_padded_tensor(0)
    if mask.is_nested:
        mask = mask.to_padded_tensor(0)
    width = min(responses.shape[1], mask.shape[1])
    return [tuple(r[:width][m[:width] > 0].tolist()) for r, m in zip(responses, mask, strict=True)]


def _dump_rows(path: str, record: dict) -> None:
    import json

    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _record_scvl_pairs(trainer_mod) -> None:
    """With SYNAPO_TEST_DUMP=<dir>, the advantage step appends its SCVL pairs (the two rows' identities) to
    <dir>/scvl_pairs.jsonl."""
    import os

    root = os.environ.get("SYNAPO_TEST_DUMP")
    if not root:
        return
    original = trainer_mod.row_fields

    def row_fields(ctx, params):
        scvl = ctx.result.scvl
        if scvl is not None and scvl.pos_index.numel():
            ids = _row_ids(ctx.extras["responses"], ctx.response_mask)
            pairs = [[ids[p], ids[n]] for p, n in zip(scvl.pos_index.tolist(), scvl.neg_index.tolist(), strict=True)]
            _dump_rows(os.path.join(root, "scvl_pairs.jsonl"), {"pairs": pairs})
        return original(ctx, params)

    trainer_mod.row_fields = row_fields


def _record_critic_rows(transformer_impl) -> None:
    """With SYNAPO_TEST_DUMP=<dir>, every critic rank appends the identities of the rows it trains on to
    <dir>/critic_rows.jsonl."""
    import os

    root = os.environ.get("SYNAPO_TEST_DUMP")
    if not root:
        return
    cls = transformer_impl.FSDPEngine
    original = cls.forward_backward_batch

    def forward_backward_batch(self, data, loss_function, forward_only=False):
        critic = isinstance(self, transformer_impl.FSDPEngineWithValueHead)
        if critic and not forward_only and "synapo_scvl_sign" in data.keys():
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            ids = _row_ids(data["responses"], data["response_mask"])
            _dump_rows(os.path.join(root, "critic_rows.jsonl"), {"rank": rank, "rows": ids})
        return original(self, data, loss_function, forward_only=forward_only)

    cls.forward_backward_batch = forward_backward_batch


def _install() -> None:
    from verl.utils import model as verl_model

    from synapo_ext.patches._hooks import when_imported

    if os.environ.get("VERL_PLATFORM") == "cpu":  # on a GPU, verl's own NCCL process group
        when_imported("verl.workers.engine_workers", _gloo_process_group)
    when_imported("verl.workers.engine.fsdp.transformer_impl", _dump_engine_state)
    when_imported("verl.workers.engine.fsdp.transformer_impl", _record_critic_rows)
    when_imported("synapo_ext.verl.trainer", _record_scvl_pairs)
    from verl.workers.rollout import base
    from verl.workers.rollout.base import BaseRollout
    from verl.workers.rollout.replica import RolloutReplica, RolloutReplicaRegistry

    verl_model.load_valuehead_model = _eager_valuehead

    class HFCPURollout(BaseRollout):
        """The hybrid worker's rollout: forwards the actor's weights to this replica's `HFCPUServer`."""

        async def update_weights(self, weights, wire_format: str = "named_tensors", **kwargs):
            state = {name: tensor.detach().to("cpu", torch.float32).clone() for name, tensor in weights}
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            server = ray.get_actor(_server_name(rank // self.config.tensor_model_parallel_size))
            await server.load_weights.remote(state, kwargs.get("global_steps"))

        async def resume(self, tags: list[str]) -> None: ...

        async def release(self) -> None: ...

    class HFCPUReplica(RolloutReplica):
        async def launch_servers(self) -> None:
            model = self.model_config
            path = model.get("local_path") or model.get("path") if hasattr(model, "get") else model.local_path
            server = (
                ray.remote(HFCPUServer)
                .options(name=_server_name(self.replica_rank), num_cpus=0)
                .remote(path, self.config.response_length)
            )
            self.servers = [server]
            self._server_handle = server
            self._server_address = f"{ROLLOUT}-{self.replica_rank}:0"

    globals().update(HFCPURollout=HFCPURollout, HFCPUReplica=HFCPUReplica)
    base._ROLLOUT_REGISTRY[(ROLLOUT, "async")] = f"{__name__}.HFCPURollout"
    RolloutReplicaRegistry.register(ROLLOUT, lambda: HFCPUReplica)


_install()
