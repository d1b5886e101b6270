"""Row fields as TransferQueue hands them over, a loud failure when they do not arrive, imports in any order."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

pytest.importorskip("verl")

import torch  # noqa: E402
from tensordict import TensorDict  # noqa: E402

from synapo_ext.core import params_from_preset  # noqa: E402
from synapo_ext.verl import critic  # noqa: E402
from synapo_ext.verl.config import HF_CONFIG_KEY, params_to_json  # noqa: E402
from synapo_ext.verl.fields import SCVL_DIVERGE, SCVL_SIGN, dense_rows  # noqa: E402

pytestmark = pytest.mark.verl


def test_dense_rows_reads_nested_and_dense():
    rows = [torch.tensor([3, 5]), torch.tensor([7])]
    nested = torch.nested.as_nested_tensor(rows, layout=torch.jagged)
    assert torch.equal(dense_rows(nested, SCVL_DIVERGE), torch.tensor([[3, 5], [7, -1]]))
    assert torch.equal(dense_rows(nested, SCVL_SIGN), torch.tensor([[3, 5], [7, 0]]))
    dense = torch.tensor([[1.0, 0.0]])
    assert dense_rows(dense, SCVL_SIGN) is dense


@pytest.mark.parametrize(("preset", "part"), [("synapo-no-hvm", "SCVL"), ("synapo-no-scvl", "HVM")])
def test_missing_fields_fail_loudly(monkeypatch, preset, part):
    """A SynAPO critic whose row fields did not arrive raises; it never trains without the term."""
    monkeypatch.setattr("verl.workers.utils.losses.value_loss", lambda *a, **k: (torch.zeros(()), {}))
    hf_config = SimpleNamespace(**{HF_CONFIG_KEY: params_to_json(params_from_preset(preset))})
    config = SimpleNamespace(
        model=SimpleNamespace(hf_config=hf_config), cliprange_value=0.5, loss_agg_mode="token-mean"
    )
    data = TensorDict({"response_mask": torch.ones(2, 3)}, batch_size=[2])
    with pytest.raises(RuntimeError, match=f"{part} is on but the critic's mini-batch has no"):
        critic.synapo_value_loss(config, {"values": torch.zeros(2, 3)}, data)


@pytest.mark.parametrize(
    "first", ["synapo_ext.verl.critic", "synapo_ext.verl.engine", "verl.workers.engine", "synapo_ext.verl.trainer"]
)
def test_imports_in_a_fresh_process(first):
    """No import cycle whatever a process imports first; the engine is registered once verl's engines load."""
    code = (
        f"import {first}\n"
        "import verl.workers.engine as e\n"
        "import synapo_ext.verl.critic, synapo_ext.verl.trainer, synapo_ext.verl.actor, synapo_ext.verl.estimator\n"
        "from synapo_ext.verl.engine import SynAPOValueEngine\n"
        "assert e.EngineRegistry._engines['value_model']['fsdp2'][('cuda', 'nvidia')] is SynAPOValueEngine\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
