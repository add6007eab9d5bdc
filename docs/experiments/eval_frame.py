"""Which text does an evaluation speak for? One stretch of a split against segments spread over it.

Until 2026-12-03 every length study scored the validation split's *first* ``eval_tokens`` tokens, and
its 95% intervals (a bootstrap over segments of the longest length) were intervals for that stretch of
text. This script scores each checkpoint on ``--blocks`` contiguous stretches of ``--tokens`` tokens
each, spaced evenly from the split's start to its end (stretch 0 is what the old evaluation scored),
and, beside them, the same number of tokens as segments spread over the whole split (what
:func:`posbias.evaluate.length_study` scores now). Per stretch it prints ppl@longest / ppl@L with the
study's own paired interval, and what the stretch's text is like (its share of digit bytes and mean
line length: the demo's validation split holds the codec tables of ``encodings/``, rows of hex codes
and character names, where a model can copy from far back).

    .venv/bin/python docs/experiments/eval_frame.py runs/demo/models/*/final --plot docs/eval_frame.png
"""

from __future__ import annotations

import argparse
import sys

import torch
from _models import each_model

from posbias.data import load_corpus
from posbias.evaluate import length_study, spread_starts
from posbias.plot import plain_log_ticks, pyplot, save_figure


def text_profile(stretch: torch.Tensor) -> str:
    """The share of digit bytes and the mean line length of a stretch of bytes."""
    digits = float(((stretch >= 48) & (stretch <= 57)).double().mean())
    lines = max(1, int((stretch == 10).sum()))
    return f"digits {digits:.2f}, line {stretch.numel() / lines:.0f} B"


def ratios(model, val: torch.Tensor, train_len: int, longest: int, tokens: int, starts: list[int],
           column: str = "ratio") -> list[tuple]:
    """``(label, value, lo, hi)`` of the study's ``column`` at the longest length (``ratio``:
    ppl@longest / ppl@L; ``far_delta``: what the distant keys do): the contiguous stretch of ``tokens``
    at each of ``starts``, then as many tokens in segments spread over the split."""
    rows = []
    for k, start in enumerate(starts):
        stretch = val[start: start + tokens + 1]
        got = length_study(model, stretch, [train_len, longest], train_len=train_len, n_tokens=tokens)[longest]
        rows.append((f"stretch {k} @ {start} ({text_profile(stretch)})", got[column], got[f"{column}_lo"],
                     got[f"{column}_hi"]))
    got = length_study(model, val, [train_len, longest], train_len=train_len, n_tokens=tokens)[longest]
    rows.append(("segments spread over the split", got[column], got[f"{column}_lo"], got[f"{column}_hi"]))
    return rows


def plot(results: dict[str, list[tuple]], starts: list[int], path: str) -> None:
    """Each scheme's ratio by stretch (dots with their intervals) and over the spread segments (dashed
    line and band); schemes whose ratio grows past 1.1 on the left (log scale), the others on the right."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for k, (name, rows) in enumerate(results.items()):
        *stretches, (_, r, lo, hi) = rows
        ax, color = axes[0 if r > 1.1 else 1], f"C{k}"
        ax.errorbar(range(len(stretches)), [x[1] for x in stretches],
                    # max(0, …): a collapsed interval may miss its point by an ulp (summed in another order)
                    yerr=[[max(0.0, x[1] - x[2]) for x in stretches], [max(0.0, x[3] - x[1]) for x in stretches]],
                    fmt="o-", color=color, capsize=3, label=name, lw=1)
        ax.axhspan(lo, hi, color=color, alpha=0.12)
        ax.axhline(r, color=color, ls="--", lw=0.8)
    axes[0].set_yscale("log")
    plain_log_ticks(axes[0])
    for ax, what in zip(axes, ("grows", "stays near 1")):
        ax.axhline(1.0, color="k", lw=0.6)
        ax.set_xticks(range(len(starts)), [f"{k}\n{start // 1000} KB" for k, start in enumerate(starts)])
        ax.set_xlabel("stretch of the validation split (start offset)")
        ax.set_ylabel("ppl @ longest / ppl @ L")
        ax.set_title(f"ratio {what}")
        ax.legend(fontsize=8)
    fig.suptitle("One stretch's interval against the split's (dashed line and band: segments spread over the split)")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--longest", type=int, help="the longest length (default: 16 L)")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per stretch (the demo's eval_tokens)")
    p.add_argument("--blocks", type=int, default=8, help="contiguous stretches, spaced over the split")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--column", default="ratio", choices=("ratio", "far_delta", "tail_delta"),
                   help="the study's number to compare at the longest length (default: ppl@longest / ppl@L)")
    p.add_argument("--plot", help="write the ratios by stretch to this PNG (with --column ratio)")
    args = p.parse_args(argv)
    val = load_corpus().val
    said, results = [], {}
    starts = spread_starts(val.numel() - 1, args.tokens, args.blocks)
    for model, train_len, say in each_model(args.checkpoints, args.threads, said):
        longest = args.longest or 16 * train_len
        rows = results[model.cfg.scheme] = ratios(model, val, train_len, longest, args.tokens, starts,
                                                  args.column)
        what = f"ppl@{longest}/ppl@{train_len}" if args.column == "ratio" else f"{args.column} @ {longest}"
        fmt = "{:.3f}" if args.column == "ratio" else "{:+.4f}"
        say(f"{model.cfg.scheme}: {what} " + "; ".join(
            f"{label} {fmt.format(r)} [{fmt.format(lo)}, {fmt.format(hi)}]" for label, r, lo, hi in rows))
    if args.plot and args.column == "ratio":
        plot(results, starts, args.plot)
    return said


if __name__ == "__main__":
    main(sys.argv[1:])
