"""Does a sliding window of L isolate the far context? Not through several layers: measured.

``posbias diagnose`` splits what the full context does past L into *keys beyond L* (full − a sliding
window of L) and the window's keys before the chunk's start (the window − the context cut at L). The
window hides every key at distance ≥ L in every layer, but a query still reads a key within L whose own
state, one layer down, read keys up to L − 1 farther back: with n layers, a token up to n (L − 1) back
can reach it. At the last position of each cut chunk (position kL + L − 1, ``diagnose.chunk_ends``) the
window and the cut show the first layer the very same keys, so for a scheme of relative positions any
difference there comes only through the layers: what tokens beyond the chunk's start carry into the
keys' states. A scheme of absolute positions differs there by its positions too (the cut restarts them
at 0). The diagnosis reports that chunk-final row (``diagnose.window_split``'s third); this script
prints it beside window − cut over the last quarter of each chunk and over every position past L, each
with a 95% bootstrap interval over the windows, on more windows than the diagnosis's default.

    .venv/bin/python docs/experiments/window_hops.py runs/demo/models/{nope,rope,sinusoidal,alibi,t5}-seed0-<key>/final
"""

from __future__ import annotations

import argparse
import sys

import torch
from _models import each_model

from posbias.data import load_corpus
from posbias.diagnose import chunk_ends, context_effect, delta_interval, window_effect


def window_minus_cut(model, tokens: torch.Tensor, length: int, train_len: int, windows: int) -> dict[str, tuple]:
    """Window − cut (mean, 95% interval) at the chunk-final positions, the last quarter of each chunk,
    and every position past L, on the first ``windows`` windows of ``length`` tokens."""
    _, cut = context_effect(model, tokens, length, train_len, windows=windows)
    win = window_effect(model, tokens, length, train_len, cut.shape[0])
    pos = torch.arange(length)
    past = pos >= train_len
    got = {}
    for label, sel in (("chunk-final", chunk_ends(length, train_len)),
                       ("last quarter of each chunk", past & (pos % train_len >= 3 * train_len // 4)),
                       ("every position past L", past)):
        d = (win - cut)[:, sel]
        got[label] = (float(d.mean()), *delta_interval(d))
    return got


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--length", type=int, help="window length (default: 8 L)")
    p.add_argument("--tokens", type=int, default=32768, help="validation tokens (windows of --length)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    corpus = load_corpus()
    said = []
    for model, train_len, say in each_model(args.checkpoints, args.threads, said):
        length = args.length or 8 * train_len
        got = window_minus_cut(model, corpus.val, length, train_len, max(1, args.tokens // length))
        say(f"{model.cfg.scheme} ({model.cfg.n_layers} layers) window − cut: " + "; ".join(
            f"{label} {m:+.4f} [{lo:+.4f}, {hi:+.4f}]" for label, (m, lo, hi) in got.items()))
    return said


if __name__ == "__main__":
    main(sys.argv[1:])
