"""Counterfactual: is it the bias at unseen distances that breaks retrieval past L?

A model fine-tuned at L never met distances ≥ L; a learned bias (FIRE's MLP above all) is evaluated
there at inputs no training step gave it. :class:`posbias.diagnose.ClampFar` gives every distance
≥ ``limit`` the bias of distance ``limit − 1`` for the same query (what the model met in training), and
this script runs the passkey grid (:func:`posbias.passkey.accuracy_grid`, the samples ``posbias diagnose`` draws) on a
checkpoint as it is and with the clamp. Retrieval that comes back with the clamp failed because of the
bias past L; retrieval that stays lost failed for another reason (docs/retrofit-and-diagnose.md, *Three copies of every
relative bias*: FIRE's one copy that learned the task, 0.05 → 0.06 at 8 L).

    .venv/bin/python docs/experiments/far_clamp.py runs/diag-copies/fire-seed0/models/passkey-ft2400-seed2-<key>
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from posbias import checkpoint as ckpt
from posbias import passkey
from posbias.config import fixed_threads
from posbias.diagnose import ClampFar


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--train-len", type=int,
                   help="L (default: what the checkpoint records; a passkey copy records the length it was taught at)")
    p.add_argument("--limit", type=int, help="clamp distances from here (default: L)")
    p.add_argument("--samples", type=int, default=24, help="passkey samples per (length, depth) cell (diagnose's)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    model = ckpt.load_model(args.checkpoint).eval()
    meta = ckpt.read_meta(args.checkpoint)
    train_len = args.train_len or meta.get("passkey", {}).get("length") or ckpt.train_len(args.checkpoint, meta)
    limit = args.limit or train_len
    lens = [train_len * k for k in (1, 2, 4, 8)]
    said = []
    with fixed_threads(args.threads), torch.no_grad():
        for label, scheme in (("as trained", model.scheme),
                              (f"distances >= {limit} clamped", ClampFar(model.scheme, limit))):
            model.scheme = scheme
            t0 = time.perf_counter()
            grid = passkey.accuracy_grid(model, lens, passkey.default_depths(5), measure=passkey.scores,
                                         samples=args.samples)
            solved, digits = passkey.split_scores(grid)
            said.append(f"{label} ({time.perf_counter() - t0:.0f} s): " + ", ".join(
                f"@{n} {passkey.mean_accuracy(solved, n):.2f} (bytes {sum(passkey.mean_digits(digits, n)) / 5:.2f})"
                for n in lens))
            print(said[-1], flush=True)
    return said


if __name__ == "__main__":
    main(sys.argv[1:])
