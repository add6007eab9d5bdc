"""Counterfactual: is it the filler past L, not the key's own distance, that breaks retrieval past L?

A passkey sample of ``n`` bytes puts ``n − L`` more filler bytes beyond the training distance than
any sample the model was taught on. For every (length, depth) cell this script hides every key at
distance ``≥ L`` **except the key statement** (`` key=NNNNN; ``, at a position the length and depth
fix): the key stays where it was, at the same distance, with the same bias, rotation or position;
only the far filler is gone (any scheme: one without a bias gets the mask alone). Retrieval that
comes back when the far filler is hidden was lost to that filler (its share of the attention, or
what it writes into the residual stream); retrieval that stays lost was lost to the key's distance
itself. Hiding it in one layer at a time says in which layer the filler does the
harm. :func:`posbias.passkey.scores` on the samples ``posbias diagnose`` draws; ``posbias diagnose``
itself runs the every-layer condition on each passkey copy (:func:`posbias.diagnose.far_filler_scores`).

    .venv/bin/python docs/experiments/far_filler.py runs/diag-copies/fire-seed0/models/passkey-ft2400-seed2-<key>
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from typing import Iterator

import torch

from posbias import checkpoint as ckpt
from posbias import passkey
from posbias.config import fixed_threads
from posbias.diagnose import MASKED_BACKEND, HideFarFiller
from posbias.schemes import Scheme


@contextmanager
def scheme_in_layers(model, scheme: Scheme, layers: list[int]) -> Iterator[None]:
    """``scheme`` instead of the model's in the listed layers only (the others keep the model's), on
    the backend every counterfactual runs on (:data:`posbias.diagnose.MASKED_BACKEND`: it adds the
    mask of a scheme without a bias too)."""
    backends = [model.blocks[n].attn.backend for n in layers]
    for n in layers:
        block = model.blocks[n]
        # Block.forward(x, scheme, pos, …): the scheme swapped, whatever follows passed on as it came
        block.forward = lambda x, _scheme, *rest, run=block.forward: run(x, scheme, *rest)
        block.attn.backend = MASKED_BACKEND
    try:
        yield
    finally:
        for n, name in zip(layers, backends):
            del model.blocks[n].forward
            model.blocks[n].attn.backend = name


def grid(model, lengths: list[int], train_len: int, layers: list[int] | None, samples: int) -> dict:
    """``passkey.scores`` for every cell, the far filler hidden in ``layers`` (None: nothing hidden)."""
    out: dict[int, dict[float, dict]] = {n: {} for n in lengths}
    for n in lengths:
        for d in passkey.default_depths(5):
            if layers is None:
                out[n][d] = passkey.scores(model, n, d, samples=samples)
                continue
            hide = HideFarFiller(model.scheme, train_len, passkey.statement_span(n, d))
            with scheme_in_layers(model, hide, layers):
                out[n][d] = passkey.scores(model, n, d, samples=samples)
    return out


def far_share(model, lengths: list[int], train_len: int, samples: int) -> dict[int, list[float]]:
    """Per layer, the attention mass (mean over heads, answer queries, samples and depths) on the far
    filler: keys at distance ``≥ train_len`` outside the key statement, as the model is."""
    share: dict[int, list[float]] = {}
    for n in lengths:
        total = torch.zeros(len(model.blocks))
        for d in passkey.default_depths(5):
            g = torch.Generator().manual_seed(1234 + n)
            batch = passkey.make_batch(samples, n, generator=g, depths=[d])
            keep = passkey.statement_span(n, d)
            pos = torch.arange(n - 1)
            far = ((pos[-5:, None] - pos[None, :]) >= train_len) & ~((pos >= keep.start) & (pos < keep.stop))
            seen = torch.zeros(len(model.blocks))
            model(batch[:, :-1].long(), on_attention=lambda layer, p: seen.__setitem__(
                layer, float(p[:, :, -5:].masked_fill(~far, 0).sum(-1).mean())))
            total += seen
        share[n] = (total / len(passkey.default_depths(5))).tolist()
    return share


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--train-len", type=int,
                   help="L (default: what the checkpoint records; a passkey copy records the length it was taught at)")
    p.add_argument("--samples", type=int, default=24, help="passkey samples per (length, depth) cell (diagnose's)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    model = ckpt.load_model(args.checkpoint).eval()
    meta = ckpt.read_meta(args.checkpoint)
    train_len = args.train_len or meta.get("passkey", {}).get("length") or ckpt.train_len(args.checkpoint, meta)
    lens = [train_len * k for k in (1, 2, 4, 8)]
    every = list(range(len(model.blocks)))
    conditions = [("as trained", None), ("far filler hidden in every layer", every)]
    if len(every) > 1:
        conditions += [(f"far filler hidden in layer {n} only", [n]) for n in every]
        conditions += [(f"far filler hidden in every layer but {n}", [m for m in every if m != n]) for n in every]
    said = []
    with fixed_threads(args.threads), torch.no_grad():
        for label, layers in conditions:
            t0 = time.perf_counter()
            solved, digits = passkey.split_scores(grid(model, lens, train_len, layers, args.samples))
            said.append(f"{label} ({time.perf_counter() - t0:.0f} s): " + ", ".join(
                f"@{n} {passkey.mean_accuracy(solved, n):.2f} (bytes {sum(passkey.mean_digits(digits, n)) / 5:.2f})"
                for n in lens))
            print(said[-1], flush=True)
        share = far_share(model, lens, train_len, max(1, args.samples // 3))
    said.append("attention on the far filler by layer (as trained; answer queries): " + ", ".join(
        f"@{n} " + "/".join(f"{x:.2f}" for x in share[n]) for n in lens))
    print(said[-1], flush=True)
    return said


if __name__ == "__main__":
    main(sys.argv[1:])
