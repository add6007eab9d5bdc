"""The control a fine-tuned retrofit needs: the model as it was, fine-tuned the same way with no retrofit.

`posbias retrofit --finetune-steps N` compares each method, fine-tuned N steps at `--to`, with the model
as it was before any fine-tune, so the table cannot tell what the method adds from what N steps of
training at `--to` do alone. This script adds that row: a method "alone" that keeps the checkpoint's
scheme and options, fine-tuned exactly as the others are (same batches, rate and steps), and prints
every row and each row's perplexity relative to the best at each length, paired over the same windows
(docs/retrofit-and-diagnose.md, "The control the fine-tuned table lacks", quotes its output):

    .venv/bin/python docs/experiments/retrofit_control.py runs/demo/models/rope-seed0-<key>/final \
        --to 1024 --finetune-steps 100 --methods ntk yarn pi
"""

from __future__ import annotations

import argparse

from posbias import checkpoint as ckpt
from posbias import retrofit
from posbias.data import load_corpus

ALONE = "alone"


def add_control(scheme: str) -> None:
    """Register the method "alone" for checkpoints of ``scheme``: the same scheme and options, unchanged."""
    retrofit.METHODS[ALONE] = retrofit.Method(ALONE, "the model as it was, fine-tuned alone (a control)", scheme,
                                              lambda cfg, L, f: (cfg.scheme, dict(cfg.scheme_options)))


def run(path: str, to: int, steps: int, methods: list[str], out: str, *, corpus=None, log=print):
    """The retrofit of ``path`` with the control first; returns its RetrofitResult."""
    add_control(ckpt.read_meta(path)["model"]["scheme"])
    cfg = retrofit.RetrofitConfig(to=to, methods=(ALONE, *methods), finetune_steps=steps)
    return retrofit.run_retrofit(path, cfg, out, corpus=load_corpus(None) if corpus is None else corpus, log=log)


def table(result) -> list[str]:
    """Each row's perplexities, then its ratio to the best row at each length, with the 95% interval."""
    lens = list(result.paired)
    lines = []
    for j, r in enumerate(result.rows):
        cells = [f"{r['ppl'][n]:.3f} ({result.paired[n][j].ratio:.3f} [{result.paired[n][j].lo:.3f}, "
                 f"{result.paired[n][j].hi:.3f}])" for n in lens]
        lines.append(f"{r['method']:>12} {r['stage']:<16} " + "  ".join(f"@{n} {c}" for n, c in zip(lens, cells)))
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--to", type=int, required=True)
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--methods", nargs="+", default=["ntk", "yarn", "pi"])
    p.add_argument("--out", default="runs/retrofit-control")
    args = p.parse_args()
    result = run(args.checkpoint, args.to, args.finetune_steps, args.methods, args.out, log=lambda s: None)
    print("\n".join(table(result)))


if __name__ == "__main__":
    main()
