"""Resuming from a damaged checkpoint, or with settings that do not fit it: each refused before anything loads, with
an error naming the checkpoint folder, the file or the setting, and what to do instead."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

pytest.importorskip("trl")

from .conftest import trainer_factory  # noqa: E402
from .tiny import make_policy, make_tokenizer  # noqa: E402

pytestmark = pytest.mark.trl

SETTINGS = {"save_strategy": "steps", "save_steps": 1, "max_steps": 2, "value_warmup_steps": 1}


@pytest.fixture(scope="module")
def saved_runs(tmp_path_factory):
    """{preset: output folder of a 2-step run saving checkpoint-1 and checkpoint-2} (trained once per module)."""
    runs = {}

    def get(preset):
        if preset not in runs:
            root = tmp_path_factory.mktemp(preset)
            trainer_factory(root, make_tokenizer())(preset, **SETTINGS).train()
            runs[preset] = root / "out"
        return runs[preset]

    return get


@pytest.fixture
def copied_run(saved_runs, tmp_path):
    """`copied_run(preset)` -> this test's own copy (tmp_path / "out") of a saved run, free to damage."""

    def copy(preset="synapo"):
        shutil.copytree(saved_runs(preset), tmp_path / "out")
        return tmp_path / "out"

    return copy


def _rewrite(critic_dir, name, data: bytes, *, update_manifest: bool):
    """Write `data` to `critic_dir/name`; with `update_manifest`, record its new size and SHA-256 too (a file
    written wrong before the manifest, which then vouches for it)."""
    (critic_dir / name).write_bytes(data)
    if update_manifest:
        path = critic_dir / "critic_manifest.json"
        manifest = json.loads(path.read_text())
        entry = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        manifest["files"][name] = entry if isinstance(manifest["files"][name], dict) else len(data)  # its format
        path.write_text(json.dumps(manifest))


def _flip_one_byte_of_the_weights(critic_dir):
    path = critic_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # inside the last tensor's data: the same size, a different weight
    path.write_bytes(bytes(data))


def _same_size_garbage(path) -> bytes:
    size = path.stat().st_size
    return (b"\x00garbage" * (size // 8 + 1))[:size]


# name -> (damage done to checkpoint-2's critic part, the file the error must name)
DAMAGE = {
    "weights_same_size": (_flip_one_byte_of_the_weights, "model.safetensors"),
    "manifest_truncated": (
        lambda d: _rewrite(
            d, "critic_manifest.json", (d / "critic_manifest.json").read_bytes()[:40], update_manifest=False
        ),
        "critic_manifest.json",
    ),
    "manifest_empty_object": (
        lambda d: _rewrite(d, "critic_manifest.json", b"{}", update_manifest=False),
        "critic_manifest.json",
    ),
    "counters_missing_one": (
        lambda d: _rewrite(d, "critic_trainer_state.json", b'{"warmup_done": 1}', update_manifest=True),
        "critic_trainer_state.json",
    ),
    "counters_truncated": (
        lambda d: _rewrite(d, "critic_trainer_state.json", b'{"warmup_do', update_manifest=True),
        "critic_trainer_state.json",
    ),
    "counters_wrong_type": (
        lambda d: _rewrite(
            d, "critic_trainer_state.json", b'{"warmup_done": 1, "critic_updates": "3"}', update_manifest=True
        ),
        "critic_trainer_state.json",
    ),
    "optimizer_garbage": (
        lambda d: _rewrite(d, "critic_optimizer.pt", b"\x00garbage" * 64, update_manifest=True),
        "critic_optimizer.pt",
    ),
    "optimizer_changed_after_save": (  # same size: only the checksum tells
        lambda d: _rewrite(
            d, "critic_optimizer.pt", _same_size_garbage(d / "critic_optimizer.pt"), update_manifest=False
        ),
        "critic_optimizer.pt",
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_critic_part_names_the_folder_the_file_and_the_previous_checkpoint(copied_run, tmp_path, damage):
    from synapo_ext.trl.critic import IncompleteCheckpointError

    out = copied_run("synapo")
    damage_fn, file = DAMAGE[damage]
    damage_fn(out / "checkpoint-2" / "critic")
    resumed = trainer_factory(tmp_path, make_tokenizer())("synapo", **{**SETTINGS, "max_steps": 3})
    # before: loaded silently (same-size weights) or torch's / json's own error (JSONDecodeError, KeyError 'files',
    # KeyError 'critic_updates', UnpicklingError) naming neither the checkpoint nor what to do
    with pytest.raises(IncompleteCheckpointError) as info:
        resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    message = str(info.value)
    assert "checkpoint-2" in message and file in message, message
    assert f"resume from {out / 'checkpoint-1'}" in message, message


def test_the_last_checkpoint_found_by_resume_true_is_checked_too(copied_run, tmp_path):
    from synapo_ext.trl.critic import DamagedCheckpointError

    out = copied_run("synapo")
    _flip_one_byte_of_the_weights(out / "checkpoint-2" / "critic")
    resumed = trainer_factory(tmp_path, make_tokenizer())("synapo", **{**SETTINGS, "max_steps": 3})
    with pytest.raises(DamagedCheckpointError, match=r"model.safetensors.*SHA-256.*resume from .*checkpoint-1"):
        resumed.train(resume_from_checkpoint=True)


def test_the_manifest_records_a_checksum_per_file(copied_run):
    out = copied_run("synapo")
    critic_dir = out / "checkpoint-2" / "critic"
    manifest = json.loads((critic_dir / "critic_manifest.json").read_text())
    assert manifest["format"] == 2
    for name, entry in manifest["files"].items():
        data = (critic_dir / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name


def test_a_format_1_manifest_is_still_resumed_by_size(copied_run, tmp_path):
    out = copied_run("synapo")
    path = out / "checkpoint-2" / "critic" / "critic_manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({"format": 1, "files": {k: v["size"] for k, v in manifest["files"].items()}}))
    resumed = trainer_factory(tmp_path, make_tokenizer())("synapo", **{**SETTINGS, "max_steps": 3})
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert resumed.state.global_step == 3


@pytest.mark.parametrize(
    ("saved", "resumed", "match"),
    [
        ("synapo", "vapo", r"2 value head\(s\) \(preset 'synapo', hvm_enabled=True\).*has 1 \(preset 'vapo'"),
        ("synapo", "synapo-no-hvm", r"2 value head.*'synapo-no-hvm'.*preset='synapo'"),
        ("vapo", "synapo", r"1 value head\(s\) \(preset 'vapo', hvm_enabled=False\).*has 2"),
    ],
)
def test_a_preset_with_another_critic_shape_is_named_before_torch_loads(copied_run, tmp_path, saved, resumed, match):
    out = copied_run(saved)
    trainer = trainer_factory(tmp_path, make_tokenizer())(resumed, **{**SETTINGS, "max_steps": 3})
    # before: torch's "size mismatch for score.weight" from load_state_dict, after TRL had loaded the policy
    with pytest.raises(ValueError, match=match):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))


def test_another_critic_model_size_is_named(copied_run, tmp_path):
    from synapo_ext.trl.critic import build_critic

    out = copied_run("synapo")
    tokenizer = make_tokenizer()
    wider = build_critic(None, make_policy(tokenizer, hidden_size=64), num_heads=2)
    wider.save_pretrained(tmp_path / "wider")
    trainer = trainer_factory(tmp_path, tokenizer)(
        "synapo", critic_model=str(tmp_path / "wider"), **{**SETTINGS, "max_steps": 3}
    )
    with pytest.raises(ValueError, match=r"another model.*hidden_size 32 in the checkpoint, 64 in this run"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))


def test_a_preset_change_that_fits_resumes_with_a_warning(copied_run, tmp_path, caplog):
    out = copied_run("synapo")
    trainer = trainer_factory(tmp_path, make_tokenizer())("synapo-no-scvl", **{**SETTINGS, "max_steps": 3})
    with caplog.at_level("WARNING", logger="synapo_ext.trl.critic_files"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert trainer.state.global_step == 3
    assert any("written with preset 'synapo', under preset 'synapo-no-scvl'" in r.getMessage() for r in caplog.records)
