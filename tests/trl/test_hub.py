"""push_to_hub, offline: what the Hub would receive (the hub client patched to record each upload), the model card,
the critic's config, and training on from what was pushed."""

from __future__ import annotations

import json
import os
from unittest import mock

import pytest

pytest.importorskip("trl")

pytestmark = pytest.mark.trl


class FakeHub:
    """Records `upload_folder` calls: the files of the folder at the time of the call (the real client reads them
    then), skipping what transformers' ignore_patterns skip."""

    def __init__(self):
        self.uploads = []

    def create_repo(self, repo_id, **kwargs):
        return mock.Mock(repo_id=f"user/{repo_id}")

    def upload_folder(self, *, folder_path, path_in_repo=None, ignore_patterns=(), **kwargs):
        files = {}
        for root, dirs, names in os.walk(folder_path):
            dirs[:] = [d for d in dirs if not d.startswith(("_", "checkpoint-"))]
            for name in names:
                rel = os.path.relpath(os.path.join(root, name), folder_path)
                if not rel.startswith("_"):
                    with open(os.path.join(root, name), "rb") as f:
                        files[rel] = f.read()
        self.uploads.append({"path_in_repo": path_in_repo, "files": files})
        return mock.Mock(is_done=lambda: True, done=lambda: True)


def test_push_to_hub_uploads_the_critic_and_a_synapo_card(make_trainer, tmp_path):
    hub = FakeHub()
    with mock.patch("transformers.trainer.hf_api", lambda: hub):
        trainer = make_trainer(
            "synapo", max_steps=2, value_warmup_steps=1, push_to_hub=True, hub_model_id="tiny-synapo",
            save_strategy="steps", save_steps=1, hub_strategy="every_save",
        )  # fmt: skip
        trainer.train()
        trainer.push_to_hub()  # as the TRL script does at the end
    assert len(hub.uploads) >= 2
    for upload in hub.uploads:  # every checkpoint push and the final one hold the critic beside the policy
        if upload["path_in_repo"] is None:
            assert {"model.safetensors", "critic/model.safetensors", "critic/config.json"} <= set(upload["files"])
    final = hub.uploads[-1]["files"]
    card = final["README.md"].decode()
    assert "DeepSeekMath" not in card and "SynAPO" in card and 'subfolder="critic"' in card
    assert '"scvl_weight": 0.1' in card
    config = json.loads(final["critic/config.json"])
    assert config["id2label"] == {"0": "local", "1": "global"}
    assert config["synapo_params"]["hvm_enabled"] is True and config["synapo_preset"] == "synapo"

    # reload both from what was pushed and train on from them
    repo = tmp_path / "pulled"
    for rel, data in final.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_bytes(data)
    from transformers import AutoModelForCausalLM

    from synapo_ext.trl.critic import build_critic

    policy = AutoModelForCausalLM.from_pretrained(repo)
    critic = build_critic(str(repo / "critic"), policy, num_heads=2)
    again = make_trainer("synapo", max_steps=1, critic_model=critic, output_dir=str(tmp_path / "again"))
    again.model.load_state_dict(policy.state_dict())
    again.train()
    assert again.state.global_step == 1
