"""Bit-identity of the core across a refactor: dump the outputs of the public core functions and of
`compute_synapo_advantages` on fixed inputs (every preset, float32 and float64, int and bool masks, an empty row, an
interior masked token, a 64 x 16384 batch on the kernels' row-block threads), under both backends; compare two dumps
with torch.equal.

    git worktree add /tmp/before <rev>
    PYTHONPATH=/tmp/before python benchmarks/core_identity.py dump /tmp/before.pt
    python benchmarks/core_identity.py dump /tmp/after.pt
    python benchmarks/core_identity.py compare /tmp/before.pt /tmp/after.pt
    python benchmarks/core_identity.py compare /tmp/after.pt /tmp/after.pt torch. numba.   # one backend vs the other
"""

# ruff: noqa: B023 (each lambda is called at once, in its own loop iteration)
import sys

import torch


def inputs(dtype, B=12, T=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[3] = 0  # an empty row
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    mask[5, 2] = 0  # interior zero
    rewards = torch.zeros(B, T, dtype=dtype)
    scores = torch.randint(0, 2, (B,), generator=g).to(dtype)
    last = (lengths - 1).clamp_min(0)
    rewards[torch.arange(B), last] = scores * (lengths > 0)
    rewards += 0.01 * torch.randn(B, T, generator=g).to(dtype) * mask
    values = torch.randn(B, T, generator=g).to(dtype)
    global_values = torch.randn(B, T, generator=g).to(dtype)
    entropy = (3 * torch.rand(B, T, generator=g)).to(dtype)
    ids = torch.randint(0, 50, (B, T), generator=g)
    ids[B // 2 :, :5] = ids[: B - B // 2, :5]  # shared prefixes
    table = torch.zeros(50, dtype=torch.bool)
    table[[3, 7, 11]] = True
    groups = torch.arange(B) // 4
    return dict(
        rewards=rewards,
        values=values,
        global_values=global_values,
        entropy=entropy,
        response_ids=ids,
        mask=mask,
        boundary_table=table,
        scores=scores,
        group_ids=groups,
    )


def flatten(prefix, obj, out):
    if obj is None:
        return
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj.detach().clone()
    elif isinstance(obj, (float, int, bool)):
        out[prefix] = torch.tensor(obj, dtype=torch.float64)
    elif isinstance(obj, dict):
        for k, v in sorted(obj.items()):
            flatten(f"{prefix}.{k}", v, out)
    elif isinstance(obj, (tuple, list)):
        names = getattr(obj, "_fields", None) or range(len(obj))
        for k, v in zip(names, obj, strict=True):
            flatten(f"{prefix}.{k}", v, out)
    elif hasattr(obj, "__dataclass_fields__"):
        for k in obj.__dataclass_fields__:
            flatten(f"{prefix}.{k}", getattr(obj, k), out)
    else:
        raise TypeError(type(obj))


def run_all():
    import synapo_ext.core as c
    from synapo_ext.core.backend import use_backend

    out = {}
    for backend in ("torch", "numba"):
        for dtype in (torch.float32, torch.float64):
            x = inputs(dtype)
            full = x["mask"].clone()
            full[3, 0] = 1  # low-level functions refuse empty rows
            key = f"{backend}.{str(dtype)[6:]}"

            def rec(name, fn):
                with use_backend(backend):
                    flatten(f"{key}.{name}", fn(), out)

            with use_backend("torch"):  # the same lambda input for hvm on both backends
                lam = c.ea_gae_lambda(full, x["entropy"], alpha=0.05, beta=0.3, lambda_min=0.5, lambda_max=0.99)
            rec(
                "ea_gae_lambda",
                lambda: c.ea_gae_lambda(full, x["entropy"], alpha=0.05, beta=0.3, lambda_min=0.5, lambda_max=0.99),
            )
            rec("ea_gae_lambda_noent", lambda: c.ea_gae_lambda(full, None, alpha=0.05))
            for whiten in (False, True):
                rec(
                    f"gae.const.{whiten}",
                    lambda: c.compute_gae(x["rewards"], x["values"], full, gamma=0.99, lam=0.95, whiten=whiten),
                )
                with use_backend("torch"):
                    lam_b = c.ea_gae_lambda(full, x["entropy"], alpha=0.05, beta=0.3, lambda_min=0.5, lambda_max=0.99)
                rec(
                    f"gae.tensor.{whiten}",
                    lambda: c.compute_gae(x["rewards"], x["values"], full, gamma=1.0, lam=lam_b, whiten=whiten),
                )
            rec("masked_whiten", lambda: c.masked_whiten(x["values"], full))
            for kw in ({}, {"min_len": 3}, {"min_len": 2, "max_len": 6, "fallback_len": 5}):
                rec(
                    f"segment_ids.{sorted(kw.items())}",
                    lambda: c.segment_ids(x["response_ids"], full, x["boundary_table"], **kw),
                )
            with use_backend("torch"):
                seg = c.segment_ids(x["response_ids"], full, x["boundary_table"], min_len=2)
            for whiten in (False, True):
                rec(
                    f"hvm.{whiten}",
                    lambda: c.hvm_advantages(
                        x["rewards"],
                        x["values"],
                        x["global_values"],
                        full,
                        seg,
                        gamma=1.0,
                        lam=lam,
                        global_lam=1.0,
                        global_weight=0.5,
                        whiten=whiten,
                    ),
                )
            rec("scvl_pairs", lambda: c.scvl_pairs(x["response_ids"], full, x["scores"], x["group_ids"], max_pairs=3))
            rec("scvl_group_stats", lambda: c.scvl_group_stats(x["scores"], x["group_ids"]))
            pairs = c.scvl_pairs(x["response_ids"], full, x["scores"], x["group_ids"], max_pairs=3)
            pv = c.scvl_pair_values(x["values"], pairs)
            rec("scvl_pair_values", lambda: pv)
            sides = c.scvl_sides(pairs, *pv)
            rec("scvl_sides", lambda: sides)
            rec("scvl_loss", lambda: c.scvl_loss(x["values"], *pairs, margin=0.5))
            rec("scvl_split_loss", lambda: c.scvl_split_loss(x["values"], *sides, margin=0.5, num_pairs=3))
            rec(
                "value_loss",
                lambda: c.value_loss(
                    x["values"], x["rewards"], full, old_values=x["global_values"], cliprange_value=0.2
                ),
            )
            rec("explained_variance", lambda: c.explained_variance(x["values"], x["rewards"], full))
            rec("positive_lm_weights", lambda: c.positive_lm_weights(x["scores"], coef=0.1, threshold=0.5))
            rec("reverse_linear_scan", lambda: c.reverse_linear_scan(0.9 * torch.ones_like(x["values"]), x["values"]))
            for preset in c.PRESETS:
                params = c.params_from_preset(preset)
                for extra in (False, True):
                    rec(
                        f"stage.{preset}.{extra}",
                        lambda: c.compute_synapo_advantages(
                            params,
                            rewards=x["rewards"],
                            values=x["values"],
                            response_mask=x["mask"],
                            global_values=x["global_values"],
                            entropy=x["entropy"],
                            response_ids=x["response_ids"],
                            boundary_table=x["boundary_table"],
                            scores=x["scores"],
                            group_ids=x["group_ids"],
                            return_lam=extra,
                            return_seg_ids=extra,
                        ),
                    )
                    rec(
                        f"stage_bool.{preset}.{extra}",
                        lambda: c.compute_synapo_advantages(
                            params,
                            rewards=x["rewards"],
                            values=x["values"],
                            response_mask=x["mask"].bool(),
                            global_values=x["global_values"],
                            entropy=x["entropy"],
                            response_ids=x["response_ids"],
                            boundary_table=x["boundary_table"],
                            scores=x["scores"],
                            group_ids=x["group_ids"].tolist(),
                            return_lam=extra,
                            return_seg_ids=extra,
                        ),
                    )
    # a larger batch: the numba kernels' row-block threads (>= 2^20 elements)
    x = inputs(torch.float32, B=64, T=1 << 14, seed=1)
    for backend in ("torch", "numba"):
        for preset in ("synapo", "vapo", "ppo"):
            with use_backend(backend):
                flatten(
                    f"large.{backend}.{preset}",
                    c.compute_synapo_advantages(
                        c.params_from_preset(preset),
                        rewards=x["rewards"],
                        values=x["values"],
                        response_mask=x["mask"],
                        global_values=x["global_values"],
                        entropy=x["entropy"],
                        response_ids=x["response_ids"],
                        boundary_table=x["boundary_table"],
                        scores=x["scores"],
                        group_ids=x["group_ids"],
                    ),
                    out,
                )
    return out


if __name__ == "__main__":
    if sys.argv[1] == "dump":
        out = run_all()
        torch.save(out, sys.argv[2])
        print(len(out), "outputs")
    else:
        a, b = torch.load(sys.argv[2]), torch.load(sys.argv[3])
        if len(sys.argv) > 4:  # compare one backend's entries of a with another's of b: PREFIX_A PREFIX_B
            pa, pb = sys.argv[4], sys.argv[5]
            a = {k[len(pa) :]: v for k, v in a.items() if k.startswith(pa)}
            b = {k[len(pb) :]: v for k, v in b.items() if k.startswith(pb)}
        keys = sorted(set(a) | set(b))
        bad = [k for k in keys if k not in a or k not in b or a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
        print(f"{len(keys)} outputs, {len(keys) - len(bad)} torch.equal, {len(bad)} differ")
        for k in bad[:40]:
            print("  differ:", k)
