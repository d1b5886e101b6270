"""Smoke test of examples/trl_synapo.py: a few steps through the CLI, exit 0, progress and summary printed (~10 s)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("trl")

pytestmark = pytest.mark.trl

EXAMPLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples", "trl_synapo.py"
)


def _run(*args, timeout=300):
    return subprocess.run(
        [sys.executable, EXAMPLE, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_help_lists_synapo_options():
    out = _run("--help")
    assert out.returncode == 0, out.stderr[-3000:]
    for option in ("--preset", "--ea_gae_alpha", "--critic_learning_rate", "--value_warmup_steps", "--print_every"):
        assert option in out.stdout
    # the defaults shown are the script's (not SynAPOConfig's), and a GPU user is told how to leave the CPU
    text = " ".join(out.stdout.split())
    for option, default in [("learning_rate", "0.001"), ("critic_learning_rate", "0.001"), ("ea_gae_alpha", "0.5"),
                            ("value_warmup_steps", "5"), ("use_cpu", "True"), ("max_steps", "800")]:  # fmt: skip
        flag = option.replace("_", "-")
        shown = re.search(rf"--{flag} \S+ (?:(?!--\w).)*?\(default: ([^)]*)\)", text)
        assert shown is not None and shown.group(1) == default, (option, shown and shown.group(1))
    assert "--use_cpu false" in text


def test_example_runs_a_few_steps(tmp_path):
    out = _run(
        "--output_dir", str(tmp_path / "out"), "--max_steps", "4", "--value_warmup_steps", "1",
        "--print_every", "2", "--num_threads", "1",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["2", "4"], out.stdout
    assert all("reward=" in line and "vf_loss=" in line for line in steps), out.stdout
    assert any(line.startswith("mean reward: first 4 steps") for line in lines), out.stdout
    assert any(line.startswith("greedy accuracy:") for line in lines), out.stdout
    assert os.path.isdir(tmp_path / "out" / "critic")


def test_example_takes_a_model_and_a_dataset_by_path_as_trl_scripts_do(tmp_path):
    """TRL's script shape: --model_name_or_path (a local folder), --dataset_name (a saved local dataset), a reward
    function by name, ModelConfig's --dtype, a YAML config (TrlParser) for the trainer's settings; the policy and its
    critic saved at the end."""
    from datasets import Dataset

    from synapo_ext.testing import char_tokenizer, tiny_qwen2

    tokenizer = char_tokenizer("0123456789+= ")
    tiny_qwen2(tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(5) for b in range(5)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "data"))
    (tmp_path / "config.yaml").write_text(
        "use_cpu: true\nbf16: false\nmax_steps: 2\nper_device_train_batch_size: 8\nnum_generations: 4\n"
        "max_completion_length: 4\nvalue_warmup_steps: 1\nreport_to: none\nsave_strategy: 'no'\nlogging_steps: 1\n"
    )
    out = _run(
        "--config", str(tmp_path / "config.yaml"), "--model_name_or_path", str(tmp_path / "model"),
        "--dtype", "float32", "--dataset_name", str(tmp_path / "data"), "--reward_funcs", "correct",
        "--output_dir", str(tmp_path / "out"), "--num_threads", "1", "--print_every", "1",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "lr 1e-06" in out.stdout  # a named model gets the library's defaults, not the demo's 1e-3
    assert [line.split()[1] for line in out.stdout.splitlines() if line.startswith("step ")] == ["1", "2"]
    assert os.path.exists(tmp_path / "out" / "model.safetensors")
    assert os.path.exists(tmp_path / "out" / "critic" / "model.safetensors")
