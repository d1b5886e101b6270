"""The files of a checkpoint's critic part: each file's size and SHA-256 in a manifest, reading the manifest and
the counters with errors that name the folder and the file, and whether the saved critic fits this run's (heads,
architecture, tensor shapes) before any weight is loaded.

manifest (format 2) = {"format": 2, "files": {name: {"size": bytes, "sha256": hex}},
                       "sharded": {"dir": folder beside critic/, "files": {relative path: {"size", "sha256"}}}}
Format 1 (older synapo_ext) recorded sizes only: its files are checked by size.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from torch import nn

__all__ = [
    "DamagedCheckpointError",
    "IncompleteCheckpointError",
    "check_counters",
    "check_critic_fits",
    "describe_files",
    "file_sha256",
    "read_json",
    "read_manifest",
]

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = 2
# what `config.json` says about the critic's architecture: a difference means another model
ARCHITECTURE_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)


class IncompleteCheckpointError(ValueError):
    """A checkpoint whose critic part is missing, partial (a save was interrupted) or damaged: it cannot be resumed
    exactly."""


class DamagedCheckpointError(IncompleteCheckpointError):
    """A checkpoint whose critic part is all there but damaged: a file differs from the SHA-256 recorded when it was
    saved, or a file of the part cannot be read (the manifest, the counters, the optimizer)."""


@functools.lru_cache(maxsize=4096)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of `path` (cached per size and modification time: a resume checks each file once)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):  # hashlib releases the GIL on large blocks
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str) -> str:
    stat = os.stat(path)
    return _sha256(path, stat.st_size, stat.st_mtime_ns)


def describe_files(paths: dict[str, str]) -> dict[str, dict[str, Any]]:
    """{name: {"size", "sha256"}} for {name: path}; files are hashed in parallel threads."""
    names = sorted(paths)
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, len(names)))) as pool:
        digests = list(pool.map(lambda name: file_sha256(paths[name]), names))
    return {name: {"size": os.path.getsize(paths[name]), "sha256": d} for name, d in zip(names, digests, strict=True)}


def read_json(path: str, what: str) -> Any:
    """The JSON document at `path`, `what` naming it in the error.

    Raises:
        DamagedCheckpointError: the file cannot be read or is not valid JSON (e.g. cut short).
    """
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedCheckpointError(f"{path} ({what}) cannot be read: {type(err).__name__}: {err}") from err


def _entries(files: Any, path: str, where: str) -> dict[str, dict[str, Any]]:
    """A manifest's {name: size} (format 1) or {name: {"size", "sha256"}} (format 2) as the latter."""
    if not isinstance(files, dict) or not files:
        raise DamagedCheckpointError(f"{path} is damaged: {where} must list the files, got {files!r:.80}")
    out = {}
    for name, entry in files.items():
        if isinstance(entry, int) and not isinstance(entry, bool):
            entry = {"size": entry, "sha256": None}
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("size"), int)
            and (entry.get("sha256") is None or isinstance(entry.get("sha256"), str))
        )
        if not ok:
            raise DamagedCheckpointError(f"{path} is damaged: {where} entry {name!r} is {entry!r:.80}")
        out[name] = entry
    return out


def read_manifest(path: str) -> dict[str, Any]:
    """The manifest at `path`, checked and in format 2's layout (format 1 sizes get `"sha256": None`).

    Raises:
        DamagedCheckpointError: unreadable, not JSON, or not a manifest (e.g. `{}`), naming the file.
    """
    manifest = read_json(path, "the critic part's manifest")
    if not isinstance(manifest, dict) or "files" not in manifest:
        raise DamagedCheckpointError(f"{path} is damaged: no `files` list in {manifest!r:.80}")
    out = {"format": manifest.get("format", 1), "files": _entries(manifest["files"], path, "`files`")}
    sharded = manifest.get("sharded")
    if sharded is not None:
        if not isinstance(sharded, dict) or not isinstance(sharded.get("dir"), str):
            raise DamagedCheckpointError(f"{path} is damaged: `sharded` is {sharded!r:.80}")
        out["sharded"] = {"dir": sharded["dir"], "files": _entries(sharded.get("files"), path, "`sharded.files`")}
    return out


# The trainer's counters: name -> (type, may be None)
COUNTERS = {"warmup_done": (int, False), "critic_updates": (int, False), "warmup_stop_reason": (str, True)}


def check_counters(counters: Any, path: str) -> dict[str, Any]:
    """The trainer's counters as read from `path`, checked.

    Raises:
        DamagedCheckpointError: not a JSON object, or a counter missing or of the wrong type, naming the file.
    """
    if not isinstance(counters, dict):
        raise DamagedCheckpointError(f"{path} is damaged: the counters must be a JSON object, got {counters!r:.80}")
    for name, (kind, optional) in COUNTERS.items():
        value = counters.get(name)
        if value is None and optional:
            continue
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            problem = "missing" if name not in counters else f"{value!r:.40} (expected {kind.__name__})"
            raise DamagedCheckpointError(f"{path} is damaged: the counter `{name}` is {problem}")
    return counters


def _saved_shapes(critic_dir: str, weight_files: list[str]) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from the safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    shapes = {}
    for name in weight_files:
        with safe_open(os.path.join(critic_dir, name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def _model_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """{name: full shape} of the model's parameters and buffers (DTensor: global; ZeRO-3: `ds_shape`)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return {name: tuple(getattr(t, "ds_shape", t.shape)) for name, t in tensors}


def check_critic_fits(
    checkpoint: str,
    critic_dir: str,
    model: nn.Module,
    *,
    weight_files: list[str],
    saved_run: dict[str, Any] | None = None,
    run: dict[str, Any] | None = None,
) -> None:
    """Raise a `ValueError` that names the setting that differs when the critic saved in `critic_dir` cannot be
    loaded into `model`, before torch's `size mismatch` could: the number of value heads (the preset's
    `hvm_enabled`), the architecture in `config.json`, then each tensor's shape.

    Args:
        checkpoint: the checkpoint folder (named in the error).
        critic_dir: its critic part.
        model: the unwrapped critic (plain, DTensor-sharded, ZeRO-3 partitioned or PEFT-wrapped).
        weight_files: the safetensors files of the whole-model weights in `critic_dir` ([] for a PEFT adapter).
        saved_run, run: {"preset", "hvm_enabled", "num_heads"} of the run that wrote the checkpoint (its counters;
            None for a checkpoint without them) and of this run.
    """
    config = getattr(model, "config", None)
    saved_config_path = os.path.join(critic_dir, "config.json")
    saved_config = read_json(saved_config_path, "the critic's config") if os.path.isfile(saved_config_path) else {}
    saved_heads = (saved_run or {}).get("num_heads", saved_config.get("num_labels"))
    heads = getattr(config, "num_labels", None)
    prefix = f"cannot resume from {checkpoint}:"
    if saved_heads is not None and heads is not None and saved_heads != heads:
        raise ValueError(
            f"{prefix} its critic has {saved_heads} value head(s) {_run_text(saved_run)}but this run's critic has "
            f"{heads} {_run_text(run)}(2 with HVM on: local and global; 1 with HVM off). Resume with the settings "
            f"that wrote it{_advice(saved_run)}, or start a new run without resume_from_checkpoint"
        )
    differ = [
        f"{key} {saved_config[key]!r} in the checkpoint, {getattr(config, key)!r} in this run"
        for key in ARCHITECTURE_KEYS
        if key in saved_config and hasattr(config, key) and saved_config[key] != getattr(config, key)
    ]
    if differ:
        raise ValueError(
            f"{prefix} its critic is another model than this run's ({'; '.join(differ)}): resume with the critic "
            "model that wrote it (`critic_model` / `critic_model_name_or_path`), or start a new run"
        )
    if weight_files:
        saved, here = _saved_shapes(critic_dir, weight_files), _model_shapes(model)
        wrong = [
            f"{k}: {list(saved[k])} saved, {list(here[k])} here" for k in saved if k in here and saved[k] != here[k]
        ]
        if wrong:
            raise ValueError(
                f"{prefix} the critic's tensors have other shapes than this run's critic ({'; '.join(wrong[:5])}"
                f"{'; ...' if len(wrong) > 5 else ''}): resume with the critic model and preset that wrote it"
            )
    if saved_run and run and saved_run.get("preset") not in (None, run.get("preset")):
        logger.warning(
            "resuming %s, written with preset %r, under preset %r: the critic's weights fit and are loaded; the "
            "settings that differ between the presets take effect from here on",
            checkpoint,
            saved_run.get("preset"),
            run.get("preset"),
        )


def _run_text(run: dict[str, Any] | None) -> str:
    if not run or run.get("preset") is None:
        return ""
    return f"(preset {run['preset']!r}, hvm_enabled={run.get('hvm_enabled')}) "


def _advice(saved_run: dict[str, Any] | None) -> str:
    if not saved_run or saved_run.get("preset") is None:
        return ""
    return f" (preset={saved_run['preset']!r}, hvm_enabled={saved_run.get('hvm_enabled')})"
