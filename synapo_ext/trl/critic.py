"""The critic: a token-classification model (1 head, or 2 with HVM: local, global), built, evaluated and saved.

V(s_t) for completion token t is the critic's output at the token before it (position P + t - 1 of the
prompt + completion sequence), verl's `values` layout.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import tempfile

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, PreTrainedModel
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .critic_arch import base_model_state_dict, critic_class, head_name, is_peft_model
from .critic_files import (
    DamagedCheckpointError,
    IncompleteCheckpointError,
    check_counters,
    check_critic_fits,
    describe_files,
    file_sha256,
    read_json,
    read_manifest,
)

__all__ = [
    "DamagedCheckpointError",
    "IncompleteCheckpointError",
    "build_critic",
    "check_checkpoint_fits",
    "check_critic_state",
    "check_resumable",
    "critic_values",
    "is_sharded_checkpoint",
    "load_critic_state",
    "read_counters",
    "save_critic_state",
]

logger = logging.getLogger(__name__)

CRITIC_DIR = "critic"
OPTIMIZER_FILE = "critic_optimizer.pt"
SCHEDULER_FILE = "critic_scheduler.pt"
STATE_FILE = "critic_trainer_state.json"
MANIFEST_FILE = "critic_manifest.json"  # written last: the critic part is complete iff it lists every file
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"  # sharded weights (large critics)
ADAPTER_FILE = "adapter_model.safetensors"  # a PEFT critic (`critic_peft_config`): its adapters and value head


def _num_labels(model: nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "num_labels", None)


def _vocab_size(model: nn.Module) -> int:
    return model.get_input_embeddings().num_embeddings


def build_critic(critic_model: str | PreTrainedModel | None, policy: PreTrainedModel, *, num_heads: int, **kwargs):
    """The critic for `policy`: loaded from a path, taken as given, or initialised from the policy's weights.

    Built here (None or a path), the critic is `critic_arch.critic_class`'s: the model type's `*ForTokenClassification`
    class, or a value head on its `AutoModel` backbone where transformers has none.

    Args:
        critic_model: a path / hub id of a model to read values with, a model, or None (copy the policy's backbone,
            a PEFT policy's base weights; the value head is zero, so every value starts at 0). Built here (None or a
            path), the critic has no dropout before its head (`classifier_dropout=0`); a model passed in is used as
            it is.
        policy: the policy model (its config and weights seed a `None` critic; its vocabulary is the reference).
        num_heads: 2 with HVM (head 0 local, head 1 global), else 1.
        **kwargs: passed to `from_pretrained` for a path.

    Raises:
        ValueError: the critic's vocabulary or number of outputs does not match, or a critic initialised from the
            policy finds no policy weight for a backbone parameter (naming `critic_model`).
    """
    if critic_model is None:
        config = copy.deepcopy(policy.config)
        config.num_labels = num_heads  # from_config(num_labels=...) is refused by transformers 5
        config.problem_type = "regression"
        config.classifier_dropout = 0.0  # a value head regresses: transformers' token classifiers default to 0.1
        critic = critic_class(config)._from_config(config)
        head = head_name(critic)
        missing, _ = critic.load_state_dict(base_model_state_dict(policy), strict=False)
        backbone_missing = [name for name in missing if name.split(".")[0] != head]
        if backbone_missing:
            raise ValueError(
                f"the critic initialised from the policy finds no policy weight for {backbone_missing[:8]}"
                f"{' ...' if len(backbone_missing) > 8 else ''} (policy {type(policy).__name__}): pass `critic_model`"
            )
        for p in getattr(critic, head).parameters() if head is not None else ():
            nn.init.zeros_(p)
        logger.info("critic initialised from the policy; fresh parameters: %s", missing)
        critic.to(dtype=next(policy.parameters()).dtype)
    elif isinstance(critic_model, str):
        kwargs.setdefault("classifier_dropout", 0.0)  # as above
        config = AutoConfig.from_pretrained(critic_model, trust_remote_code=kwargs.get("trust_remote_code", False))
        critic = critic_class(config).from_pretrained(critic_model, num_labels=num_heads, **kwargs)
    elif isinstance(critic_model, nn.Module):
        critic = critic_model
    else:
        raise TypeError(f"`critic_model` must be a path, a model or None, got {type(critic_model).__name__}")
    if _num_labels(critic) != num_heads:
        raise ValueError(
            f"`critic_model` has {_num_labels(critic)} outputs per token, expected {num_heads} "
            f"({'local, global with HVM on' if num_heads == 2 else 'one value with HVM off'})"
        )
    if _vocab_size(critic) != _vocab_size(policy):
        raise ValueError(
            f"`critic_model` has a vocabulary of {_vocab_size(critic)} tokens but the policy has "
            f"{_vocab_size(policy)}: the critic must read the policy's token ids"
        )
    return critic


def critic_values(
    critic: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int
) -> torch.Tensor:
    """float32 (B, T, H): V(s_t) for the last `logits_to_keep` tokens of `input_ids` (the completion).

    Rollout-time values are the critic's deterministic prediction: evaluated in eval mode (no dropout), whatever
    mode the critic was left in by its last update.
    """
    was_training = critic.training
    critic.eval()
    try:
        logits = critic(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, P + T, H)
    finally:
        critic.train(was_training)
    return logits[:, -logits_to_keep - 1 : -1].float()


def _unwrapped(critic: nn.Module) -> nn.Module:
    return getattr(critic, "module", critic)


def save_critic_state(
    output_dir: str,
    critic: nn.Module,
    optimizer=None,
    scheduler=None,
    state: dict | None = None,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    sharded_dir: str | None = None,
) -> str:
    """Write `output_dir/critic/` complete or not at all; returns its path.

    Everything goes into a temporary sibling folder: the weights (safetensors + config, `from_pretrained` loads them;
    `state_dict`, when given, is what is written, e.g. the full weights gathered from a sharded critic), then, if
    given, the optimizer's and scheduler's `state_dict()`s and the trainer's counters (`state`), and last a manifest
    of every file, its size and SHA-256 (`critic_files`). A sharded critic's weights and optimizer live in
    `output_dir/<sharded_dir>/`, written before by every rank (`critic_weights.save_critic_sharded`): its files go
    into the manifest too, so the check on resume covers them. The folder is then renamed to `critic/` (atomic on
    one file system), so a kill at any point leaves either the previous `critic/` or the new one, never a mix.
    """
    final = os.path.join(output_dir, CRITIC_DIR)
    os.makedirs(output_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{CRITIC_DIR}.tmp-", dir=output_dir)
    if state_dict is None:
        _unwrapped(critic).save_pretrained(tmp, safe_serialization=True)
    else:
        _unwrapped(critic).save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), os.path.join(tmp, OPTIMIZER_FILE))
    if scheduler is not None:
        torch.save(scheduler.state_dict(), os.path.join(tmp, SCHEDULER_FILE))
    if state is not None:
        _write_json(os.path.join(tmp, STATE_FILE), state)
    manifest = {"format": 2, "files": describe_files({name: os.path.join(tmp, name) for name in os.listdir(tmp)})}
    if sharded_dir is not None:
        manifest["sharded"] = {
            "dir": sharded_dir,
            "files": describe_files(_tree(os.path.join(output_dir, sharded_dir))),
        }
    _write_json(os.path.join(tmp, MANIFEST_FILE), manifest)
    old = None
    if os.path.exists(final):  # an export over an older one: move it aside first (os.replace needs no target)
        old = tempfile.mkdtemp(prefix=f".{CRITIC_DIR}.old-", dir=output_dir)
        os.replace(final, os.path.join(old, CRITIC_DIR))
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def check_critic_state(checkpoint: str, *, training_state: bool = True) -> None:
    """Raise `IncompleteCheckpointError` unless `checkpoint/critic/` is complete and undamaged.

    Complete: its manifest exists and lists every file with its size, and (with `training_state`) the optimizer,
    scheduler and counters are among them; a sharded critic's optimizer is in the sharded part, whose files the
    manifest lists too. Undamaged: the manifest reads, and every file has the SHA-256 it recorded
    (`DamagedCheckpointError` otherwise; a manifest of an older synapo_ext has sizes only).
    """
    critic_dir = os.path.join(checkpoint, CRITIC_DIR)
    manifest_path = os.path.join(critic_dir, MANIFEST_FILE)
    if not os.path.isdir(critic_dir):
        raise IncompleteCheckpointError(f"{checkpoint} has no critic part ({CRITIC_DIR}/)")
    if not os.path.isfile(manifest_path):
        raise IncompleteCheckpointError(
            f"{critic_dir} has no {MANIFEST_FILE}: it was written partly, or by an older synapo_ext"
        )
    manifest = read_manifest(manifest_path)
    files, sharded = manifest["files"], manifest.get("sharded")
    required = ([] if sharded else [OPTIMIZER_FILE]) + [SCHEDULER_FILE, STATE_FILE] if training_state else []
    missing = [name for name in required if name not in files]
    if not {WEIGHTS_FILE, WEIGHTS_INDEX_FILE, ADAPTER_FILE} & set(files):
        missing.append(WEIGHTS_FILE)
    listed = [(os.path.join(critic_dir, name), entry) for name, entry in files.items()]
    if sharded:
        listed += [(os.path.join(checkpoint, sharded["dir"], name), entry) for name, entry in sharded["files"].items()]
    bad = [
        os.path.relpath(path, critic_dir)
        for path, entry in listed
        if not os.path.isfile(path) or os.path.getsize(path) != entry["size"]
    ]
    if missing or bad:
        raise IncompleteCheckpointError(
            f"{critic_dir} is incomplete: missing from the manifest {missing}, missing or of the wrong size {bad}"
        )
    changed = [
        os.path.relpath(path, critic_dir)
        for path, entry in listed
        if entry["sha256"] is not None and file_sha256(path) != entry["sha256"]
    ]
    if changed:
        raise DamagedCheckpointError(
            f"{critic_dir} is damaged: {changed} differ from the SHA-256 recorded in {MANIFEST_FILE} when the "
            "checkpoint was saved (changed or corrupted on disk since)"
        )


def load_critic_state(checkpoint: str, critic: nn.Module | None, optimizer=None, scheduler=None) -> dict:
    """Restore what `save_critic_state` wrote into `checkpoint`: weights (strictly; skipped when `critic` is None,
    e.g. a sharded critic restored from its sharded part), optimizer, scheduler; returns the counters. Only
    safetensors and `torch.load(weights_only=True)`.

    Raises:
        IncompleteCheckpointError: the critic part is missing, partial or damaged (`DamagedCheckpointError`: a
            checksum differs or a file cannot be read), naming the folder, the file and the checkpoint to resume
            from instead.
        ValueError: the weights do not fit the critic (another number of heads, architecture or tensor shapes;
            missing or unexpected keys), naming what differs; or `optimizer` is given for a checkpoint whose critic
            optimizer is in a sharded part.
    """
    try:
        return _load_critic_state(checkpoint, critic, optimizer, scheduler)
    except IncompleteCheckpointError as err:
        raise type(err)(f"{err}; {resume_hint(checkpoint)}") from err


def _load_critic_state(checkpoint: str, critic: nn.Module | None, optimizer, scheduler) -> dict:
    check_critic_state(checkpoint)
    critic_dir = os.path.join(checkpoint, CRITIC_DIR)
    if optimizer is not None and is_sharded_checkpoint(checkpoint):
        raise ValueError(
            f"{checkpoint} holds a sharded critic (FSDP2 / DeepSpeed run): resume it under the same accelerate "
            "config, which restores the critic from its sharded part"
        )
    if critic is not None:
        model = _unwrapped(critic)
        device = str(next(model.parameters()).device)
        peft_saved = os.path.isfile(os.path.join(critic_dir, ADAPTER_FILE))
        if peft_saved != is_peft_model(model):
            raise ValueError(
                f"the critic in {critic_dir} is {'a PEFT adapter' if peft_saved else 'a whole model'} but this "
                f"critic is {'PEFT-wrapped' if is_peft_model(model) else 'not'}: resume with the same "
                "`critic_peft_config`"
            )
        check_checkpoint_fits(checkpoint, model)
        if peft_saved:
            state_dict = _load_file(critic_dir, ADAPTER_FILE, device)
            missing, unexpected = _load_adapter(model, state_dict)
        else:
            missing, unexpected = model.load_state_dict(_read_weights(critic_dir, device=device), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"the critic weights in {critic_dir} do not fit this critic: missing keys {missing}, unexpected keys "
                f"{unexpected} (was the checkpoint written with another preset, HVM setting or critic model?)"
            )
    for obj, name in ((optimizer, OPTIMIZER_FILE), (scheduler, SCHEDULER_FILE)):
        if obj is not None:
            path = os.path.join(critic_dir, name)
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # torch's unpickling errors have no common base class
                raise DamagedCheckpointError(f"{path} cannot be read: {type(err).__name__}: {err}") from err
            try:
                obj.load_state_dict(state)
            except (KeyError, ValueError, TypeError, RuntimeError) as err:
                raise ValueError(
                    f"{path} does not fit this run's critic {type(obj).__name__.lower()} ({type(err).__name__}: "
                    f"{err}): resume with the critic model, preset and `critic_peft_config` that wrote {checkpoint}"
                ) from err
    counters = read_json(os.path.join(critic_dir, STATE_FILE), "the trainer's counters")
    if not isinstance(counters, dict):
        raise DamagedCheckpointError(f"{os.path.join(critic_dir, STATE_FILE)} is damaged: not a JSON object")
    return counters


def read_counters(checkpoint: str, counters: dict) -> dict:
    """`counters` (what `load_critic_state` returned for `checkpoint`) checked as `SynAPOTrainer`'s.

    Raises:
        DamagedCheckpointError: a counter missing or of the wrong type, naming the file and the checkpoint to
            resume from instead.
    """
    try:
        return check_counters(counters, os.path.join(checkpoint, CRITIC_DIR, STATE_FILE))
    except DamagedCheckpointError as err:
        raise DamagedCheckpointError(f"{err}; {resume_hint(checkpoint)}") from err


def check_checkpoint_fits(checkpoint: str, critic: nn.Module, run: dict | None = None) -> None:
    """Raise a `ValueError` naming the setting that differs (value heads and the preset that set them, the critic's
    architecture, tensor shapes) when `checkpoint`'s critic cannot be loaded into `critic`; `run`: this run's
    {"preset", "hvm_enabled", "num_heads"}, compared with what the checkpoint's counters recorded."""
    critic_dir = os.path.join(checkpoint, CRITIC_DIR)
    state_path = os.path.join(critic_dir, STATE_FILE)
    model = _unwrapped(critic)
    try:
        saved = read_json(state_path, "the trainer's counters") if os.path.isfile(state_path) else None
        saved_run = saved.get("run") if isinstance(saved, dict) and isinstance(saved.get("run"), dict) else None
        if is_peft_model(model) or os.path.isfile(os.path.join(critic_dir, ADAPTER_FILE)):
            weight_files = []  # an adapter's keys are PEFT's: heads and config are still compared
        else:
            weight_files = _weight_files(critic_dir)
        check_critic_fits(checkpoint, critic_dir, model, weight_files=weight_files, saved_run=saved_run, run=run)
    except DamagedCheckpointError as err:
        raise DamagedCheckpointError(f"cannot resume from {checkpoint}: {err}; {resume_hint(checkpoint)}") from err


def _load_adapter(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Load a PEFT critic's saved adapter + head into `model`; (missing trainable keys, unexpected keys)."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state_dict)
    loaded = {k for k in model.state_dict() if k not in result.missing_keys}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    return [n for n in trainable if n not in loaded], list(result.unexpected_keys)


def is_sharded_checkpoint(checkpoint: str) -> bool:
    """Whether `checkpoint`'s critic part keeps its weights and optimizer in a sharded part (FSDP2 / DeepSpeed)."""
    manifest_path = os.path.join(checkpoint, CRITIC_DIR, MANIFEST_FILE)
    if not os.path.isfile(manifest_path):
        return False
    return bool(read_manifest(manifest_path).get("sharded"))


def _tree(root: str) -> dict[str, str]:
    """{path relative to `root`: path} of every file below `root`."""
    return {
        os.path.relpath(os.path.join(folder, name), root): os.path.join(folder, name)
        for folder, _, names in sorted(os.walk(root))
        for name in sorted(names)
    }


def _weight_files(critic_dir: str) -> list[str]:
    """The safetensors files `save_pretrained` wrote: one file, or the shards its index lists."""
    index = os.path.join(critic_dir, WEIGHTS_INDEX_FILE)
    if not os.path.isfile(index):
        return [WEIGHTS_FILE]
    weight_map = read_json(index, "the critic's weights index")
    if not isinstance(weight_map, dict) or not isinstance(weight_map.get("weight_map"), dict):
        raise DamagedCheckpointError(f"{index} is damaged: no `weight_map`")
    return sorted(set(weight_map["weight_map"].values()))


def _load_file(critic_dir: str, name: str, device: str) -> dict[str, torch.Tensor]:
    path = os.path.join(critic_dir, name)
    try:
        return load_file(path, device=device)
    except Exception as err:  # safetensors' errors have no common base class
        raise DamagedCheckpointError(f"{path} cannot be read: {type(err).__name__}: {err}") from err


def _read_weights(critic_dir: str, device: str) -> dict[str, torch.Tensor]:
    """The state dict `save_pretrained` wrote: one safetensors file, or the shards its index lists."""
    state_dict: dict[str, torch.Tensor] = {}
    for shard in _weight_files(critic_dir):
        state_dict.update(_load_file(critic_dir, shard, device))
    return state_dict


def check_resumable(checkpoint: str) -> None:
    """Raise `IncompleteCheckpointError` unless `checkpoint`'s critic part is complete and undamaged, naming the
    checkpoint to resume from instead."""
    try:
        check_critic_state(checkpoint)
    except IncompleteCheckpointError as err:
        why = (
            "It is damaged, so resuming would load a wrong critic"
            if isinstance(err, DamagedCheckpointError)
            else "Its save was interrupted, so resuming would restart the critic (warm-up, Adam state, counters) "
            "silently"
        )
        raise type(err)(f"cannot resume from {checkpoint}: {err}. {why}; {resume_hint(checkpoint)}") from err


def resume_hint(checkpoint: str) -> str:
    """What to do instead of resuming from `checkpoint`: the newest complete checkpoint before it in its folder (else
    the newest complete one after it), or start again."""
    checkpoint = os.path.normpath(checkpoint)
    parent = os.path.dirname(checkpoint)
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    names = os.listdir(parent) if os.path.isdir(parent) else []
    steps = sorted((int(m.group(1)), name) for name in names if (m := pattern.match(name)) is not None)
    here = pattern.match(os.path.basename(checkpoint))
    step = int(here.group(1)) if here else None
    others = [(s, os.path.join(parent, name)) for s, name in steps if os.path.join(parent, name) != checkpoint]
    before = [path for s, path in others if step is None or s < step]
    after = [path for s, path in others if step is not None and s > step]
    for path in [*reversed(before), *after]:  # the newest before it first; checked one at a time
        if _is_complete(path):
            return (
                f"resume from {path}, the last complete checkpoint (resume_from_checkpoint={path!r}), after "
                f"deleting {checkpoint}"
            )
    return "no complete checkpoint is left in that folder: start again without resume_from_checkpoint"


def _is_complete(checkpoint: str) -> bool:
    try:
        check_critic_state(checkpoint)
    except IncompleteCheckpointError:
        return False
    return True


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
