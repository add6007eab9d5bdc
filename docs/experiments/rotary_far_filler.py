"""Counterfactual for a retrofitted model: is it the filler past L that breaks a passkey copy's retrieval?

``posbias retrofit --compare --passkey-seeds 0 1 2`` found three passkey copies of one dynamic-NTK
retrofit far apart at 16 L (whole keys 0.03 / 0.66 / 0.86), all three exact at L. Retrofit keeps no
passkey copy, so this script teaches them again from the retrofitted checkpoint exactly as retrofit
does (:func:`posbias.passkey.teach`: the same steps, batch seeds and positional learning rate, so the
same weights at a fixed thread count; ``--save`` keeps them), then scores each on the decision table's
samples at L, 2 L, … ``--to``: as it is, and with every key at distance ≥ L hidden except the key
statement (the counterfactual of ``docs/experiments/far_filler.py``, :func:`posbias.diagnose.far_filler_scores`:
for a rotary scheme, which adds no bias, a mask on the blockwise backend; any retrofit row works, a
swapped-in bias too). A copy whose retrieval comes back lost it to the filler past L, not to the key's
distance (its rotation). ``retrofit --compare`` now scores the copies it teaches this way at ``--to``;
this script adds every doubling in between and keeps the copies.

    .venv/bin/python docs/experiments/rotary_far_filler.py runs/retrofit-rope-copies/models/dynamic-ntk-ft100-<key> --to 1024
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from posbias import checkpoint as ckpt
from posbias import passkey
from posbias.config import fixed_threads
from posbias.diagnose import far_filler_scores

DEPTHS = 5  # the retrofit decision table's depths (posbias.retrofit.PASSKEY_DEPTHS)


def scores(model, n: int, d: float, train_len: int, samples: int, hide: bool) -> dict:
    """:func:`posbias.passkey.scores` of one cell, with the far filler hidden (``hide``:
    :func:`posbias.diagnose.far_filler_scores`, the mask on the blockwise backend) or as the model is."""
    if hide:
        return far_filler_scores(model, n, d, train_len, samples=samples)
    return passkey.scores(model, n, d, samples=samples)


def copy_for(model, meta: dict, train_len: int, seed: int, steps: int, save: Path | None):
    """The passkey copy of ``seed`` (from ``save`` when a run kept it), taught as retrofit teaches it."""
    where = None if save is None else save / f"passkey-seed{seed}"
    if where is not None and ckpt.exists(where):
        return ckpt.load_model(where).eval()
    copy = model.with_scheme(model.cfg.scheme, model.cfg.scheme_options)
    record = passkey.teach(copy, length=train_len, steps=steps, seed=seed, pos_lr_mult=ckpt.pos_lr_mult(meta))
    if where is not None:
        ckpt.save_checkpoint(where, copy, extra={"passkey": {"length": train_len, **record}})
    return copy.eval()


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="the retrofitted model (retrofit's models/<method>-ft<steps>-<key>)")
    p.add_argument("--to", type=int, required=True, help="the longest length (retrofit's --to)")
    p.add_argument("--train-len", type=int, help="L (default: what the checkpoint records)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="passkey copies' batch seeds")
    p.add_argument("--steps", type=int, default=2400, help="each copy's passkey fine-tune (retrofit's --passkey-steps)")
    p.add_argument("--samples", type=int, default=32, help="samples per cell (retrofit's --passkey-samples)")
    p.add_argument("--save", type=Path, help="keep the copies here (and reuse them)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    model = ckpt.load_model(args.checkpoint).eval()
    meta = ckpt.read_meta(args.checkpoint)
    train_len = args.train_len or ckpt.train_len(args.checkpoint, meta)
    lens = [train_len]
    while lens[-1] * 2 <= args.to:
        lens.append(lens[-1] * 2)
    said = []
    with fixed_threads(args.threads):
        for seed in args.seeds:
            t0 = time.perf_counter()
            copy = copy_for(model, meta, train_len, seed, args.steps, args.save)
            with torch.no_grad():
                for hide in (False, True):
                    grid = {n: {d: scores(copy, n, d, train_len, args.samples, hide)
                                for d in passkey.default_depths(DEPTHS)} for n in lens}
                    solved, digits = passkey.split_scores(grid)
                    said.append(f"seed {seed}, {'far filler hidden' if hide else 'as trained'}: " + ", ".join(
                        f"@{n} {passkey.mean_accuracy(solved, n):.2f} (bytes "
                        f"{sum(passkey.mean_digits(digits, n)) / 5:.2f})" for n in lens)
                        + f" ({time.perf_counter() - t0:.0f} s)")
                    print(said[-1], flush=True)
    return said


if __name__ == "__main__":
    main(sys.argv[1:])
