"""Shared builders for tests/verl: a local character tokenizer, rollout batches, configs (no downloads)."""

from __future__ import annotations

import os

import numpy as np
import torch
from omegaconf import OmegaConf

from synapo_ext.testing import DELIMITER as DELIM
from synapo_ext.testing import char_tokenizer, tiny_qwen2

CHARS = "0123456789+-=. abcdefghij\n"


def make_tokenizer(with_delimiter: bool = True):
    """A character tokenizer (pad 0, eos 1, no unknown token of its own: unknown characters read as pad, right
    padding); with `with_delimiter`, "\\n\\n" is one token (as in real BPE vocabularies)."""
    return char_tokenizer(
        CHARS,
        delimiter=DELIM if with_delimiter else None,
        specials=("<pad>", "<eos>"),
        unk_token="<pad>",
        padding_side="right",
    )


def rollout_batch(tokenizer, groups: int = 3, n: int = 4, T: int = 24, seed: int = 0) -> dict:
    """A rollout batch as verl holds it: right-padded responses with shared prefixes inside each group,
    a 0/1 outcome score on the last valid token (mixed inside each group), values, entropy and uid."""
    g = torch.Generator().manual_seed(seed)
    B = groups * n
    delim = tokenizer.convert_tokens_to_ids(DELIM) if DELIM in tokenizer.get_vocab() else 5
    responses = torch.randint(2, 2 + len(CHARS), (B, T), generator=g)
    for b in range(B):
        start = b - b % n
        prefix = int(torch.randint(2, T // 2, (1,), generator=g))
        responses[b, :prefix] = responses[start, :prefix]  # shared prefix inside the group
    responses[:, 4] = delim
    responses[:, 11] = delim
    lengths = torch.randint(T // 2 + 2, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    scores = torch.zeros(B, T)
    score = torch.tensor([float(i % 2) for i in range(B)])  # every group mixed
    scores[torch.arange(B), lengths - 1] = score
    return {
        "responses": responses * mask.long(),
        "response_mask": mask,
        "token_level_scores": scores,
        "token_level_rewards": scores.clone(),
        "values": torch.rand(B, T, generator=g) * mask,
        "values_global": torch.rand(B, T, generator=g) * mask,
        "entropys": 3 * torch.rand(B, T, generator=g) * mask,
        "uid": np.array([f"p{b // n}" for b in range(B)], dtype=object),
    }


def algorithm_config(preset: str | None = "synapo", **synapo) -> OmegaConf:
    node = dict(synapo)
    if preset is not None:
        node["preset"] = preset
    return OmegaConf.create(
        {"adv_estimator": "synapo", "gamma": 1.0, "lam": 1.0, "use_kl_in_reward": False, "synapo": node}
    )


def tiny_model_dir(tokenizer, path: str | None = None) -> str:
    """A tiny Qwen2 causal LM and its tokenizer saved to `path` (a fresh temp dir by default)."""
    import tempfile

    path = path or tempfile.mkdtemp(prefix="synapo_tiny_")
    tiny_qwen2(tokenizer, seed=0, max_position_embeddings=128).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def verl_config_dir() -> str:
    import verl

    return os.path.join(os.path.dirname(verl.__file__), "trainer", "config")


PROMPT_LEN = 3


class FakeTQ:
    """TransferQueue's `kv_batch_get` / `kv_batch_put` over a dict, one sample per key, with the real store's layouts
    and its dtype rule (checked against the real TransferQueue by tests/verl/test_real_run.py):

    - every per-sample field that is a 1-D tensor (per-token fields, and (bs, K) row fields too) comes back as a
      jagged nested tensor; per-sample scalars come back stacked (bs,);
    - a put that changes a stored field's dtype is refused, as the real controller refuses it (it logs the error and
      drops the metadata of every field written after it; the fake raises).

    Per-token fields are stored per sample at the sample's own length (verl's nested layout); `prompt+response`
    fields (what a critic's `infer_batch` writes) hold PROMPT_LEN extra leading entries.
    """

    def __init__(self) -> None:
        self.store: dict[str, dict[str, object]] = {}
        self.calls: list[tuple[str, tuple[str, ...]]] = []  # ("get" | "put", field names), in call order

    def load(self, keys, batch: dict, full_fields=()) -> None:
        lengths = batch["response_mask"].sum(-1).long().clamp_min(1)
        for i, key in enumerate(keys):
            row = self.store.setdefault(key, {})
            n = int(lengths[i])
            for name, value in batch.items():
                if name == "uid":
                    row[name] = str(value[i])
                elif name in full_fields:
                    # the model's output at position p is the value of the state before token p + 1
                    row[name] = torch.cat([value.new_zeros(PROMPT_LEN - 1), value[i, :n], value.new_zeros(1)])
                elif value.dim() == 2:
                    row[name] = value[i, :n]
                else:
                    row[name] = value[i]

    def kv_batch_get(self, keys, partition_id=None, select_fields=None):
        from tensordict import NonTensorData, NonTensorStack, TensorDict

        self.calls.append(("get", tuple(select_fields or ())))
        names = [f for f in (select_fields or self.store[keys[0]].keys()) if f in self.store[keys[0]]]
        td = TensorDict({}, batch_size=[len(keys)])
        for name in names:
            values = [self.store[k][name] for k in keys]
            if isinstance(values[0], str):
                td.set(name, NonTensorStack(*[NonTensorData(v) for v in values]))
            elif values[0].dim() == 1:
                td[name] = torch.nested.as_nested_tensor(values, layout=torch.jagged)
            else:
                td[name] = torch.stack(values)
        return td

    def kv_batch_put(self, keys, partition_id=None, fields=None):
        from transfer_queue import KVBatchMeta

        self.calls.append(("put", tuple(fields.keys())))
        for name in fields.keys():
            value = fields[name]
            old = self.store[keys[0]].get(name)
            if isinstance(old, torch.Tensor) and old.dtype != value.dtype:
                raise ValueError(
                    f"dtype mismatch: existing={old.dtype}, incoming={value.dtype}. "
                    "All batches for the same field must have the same dtype."
                )
            rows = value.unbind(0)
            for key, row in zip(keys, rows, strict=True):
                self.store[key][name] = row
        return KVBatchMeta(keys=list(keys), tags=[{}] * len(keys), partition_id=partition_id)


def padded(store_rows: list, width: int) -> torch.Tensor:
    out = torch.zeros(len(store_rows), width)
    for i, row in enumerate(store_rows):
        out[i, : row.shape[0]] = row
    return out
