"""SynAPO advantages for a small hand-made batch, printed per reasoning segment.

    python examples/advantages_demo.py [--preset synapo] [--beta 0.05]

Two prompts, two responses each (one right, one wrong), written as words with blank-line steps. The
critic's values and the policy's entropy are made up (a critic that already trusts the right path a
little), so the script runs with torch alone: no model, no tokenizer download.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from synapo_ext.core import PRESETS, compute_synapo_advantages, params_from_preset


@dataclass
class Args:
    preset: str = "synapo"
    """one of the presets: ppo, vapo, synapo, synapo-no-hvm, synapo-no-scvl, synapo-no-eagae"""
    beta: float = 0.05
    """EA-GAE entropy scale (< 0: the write-up's prose sign)"""


# (prompt id, response text, outcome score)
RESPONSES = [
    ("p0", "start 3 \n\n add 4 gives 7 \n\n times 2 gives 14 \n\n answer 14", 1.0),
    ("p0", "start 3 \n\n add 4 gives 8 \n\n times 2 gives 16 \n\n answer 16", 0.0),
    ("p1", "start 5 \n\n minus 1 gives 4 \n\n square gives 16 \n\n answer 16", 1.0),
    ("p1", "start 5 \n\n minus 1 gives 4 \n\n square gives 8 \n\n answer 8", 0.0),
]
DELIMITER = "\n\n"


def tokenize(texts: list[str]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Whitespace words plus a "\\n\\n" token; returns (vocab, ids (B, T) right-padded, mask (B, T))."""
    rows = [[w if w else DELIMITER for w in text.replace(" \n\n ", " \0 ").split(" ")] for text in texts]
    rows = [[DELIMITER if w == "\0" else w for w in row] for row in rows]
    vocab = sorted({w for row in rows for w in row} | {"<pad>"})
    index = {w: i for i, w in enumerate(vocab)}
    T = max(len(row) for row in rows)
    ids = torch.full((len(rows), T), index["<pad>"], dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, row in enumerate(rows):  # building the demo batch, not a hot path
        ids[b, : len(row)] = torch.tensor([index[w] for w in row])
        mask[b, : len(row)] = True
    return vocab, ids, mask


def main(args: Args) -> None:
    torch.manual_seed(0)
    prompts = [p for p, _, _ in RESPONSES]
    scores = torch.tensor([s for _, _, s in RESPONSES])
    vocab, ids, mask = tokenize([t for _, t, _ in RESPONSES])
    B, T = ids.shape
    boundary_table = torch.tensor([DELIMITER in w for w in vocab])

    # outcome reward on the last valid token
    lengths = mask.sum(dim=1)
    rewards = torch.zeros(B, T)
    rewards[torch.arange(B), lengths - 1] = scores
    # a made-up critic: values drift towards the outcome along the response; global head a bit flatter
    progress = torch.arange(T).float() / T
    local_values = 0.5 + (scores[:, None] - 0.5) * progress + 0.05 * torch.randn(B, T)
    global_values = 0.5 + 0.5 * (scores[:, None] - 0.5) * progress
    entropy = torch.rand(B, T) * 2.0

    params = params_from_preset(args.preset, ea_gae_beta=args.beta, ea_gae_alpha=0.5)
    out = compute_synapo_advantages(
        params,
        rewards=rewards,
        values=local_values,
        response_mask=mask,
        global_values=global_values,
        entropy=entropy,
        response_ids=ids,
        boundary_table=boundary_table,
        scores=scores,
        group_ids=prompts,
        return_seg_ids=True,  # the fused stage writes the int64 segment ids only when asked
    )

    print(f"preset={args.preset} ({PRESETS[args.preset] or 'all parts on'}), B={B}, T={T}")
    for b in range(B):
        print(f"\nresponse {b} (prompt {prompts[b]}, score {scores[b]:.0f})")
        seg = out.seg_ids[b] if out.seg_ids is not None else torch.zeros(T, dtype=torch.long)
        for k in range(int(seg[mask[b]].max()) + 1):
            tokens = (seg == k) & mask[b]
            words = " ".join(vocab[i] for i in ids[b][tokens].tolist()).replace(DELIMITER, "\\n\\n")
            adv = out.advantages[b][tokens]
            print(f"  segment {k}: mean A {adv.mean():+.3f}  [{' '.join(f'{a:+.2f}' for a in adv.tolist())}]  {words}")
    if out.scvl is not None:
        print("\nSCVL pairs (positive, negative, divergence index):")
        for i, j, d in zip(*(x.tolist() for x in out.scvl), strict=True):
            print(f"  ({i}, {j}) diverge at token {d} ({vocab[ids[i, d]]!r} vs {vocab[ids[j, d]]!r})")
    print("\nmetrics:", {k: round(v, 4) for k, v in out.metrics.items()})


def parse_args() -> Args:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=Args.preset, choices=sorted(PRESETS))
    parser.add_argument("--beta", type=float, default=Args.beta)
    return Args(**vars(parser.parse_args()))


if __name__ == "__main__":
    main(parse_args())
