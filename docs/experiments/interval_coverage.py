"""Do the study's 95% intervals cover the split's value? Measured for three ways of picking segments.

The study's ratio ppl@longest / ppl@L comes with a percentile bootstrap interval over the segments it
scored. This script scores a checkpoint on ``--population`` segments of the longest length spread over
the whole validation split (nearly all of it by default) and takes their ratio as the split's value.
Then it draws, from those segments, samples of ``n`` segments the way an evaluation could pick them,
computes the study's interval on each, and counts how often it covers the split's value:

* **contiguous**: ``n`` adjacent segments, every such block along the split (what every evaluation
  scored until 2026-12-03, with the block at the split's start);
* **spread**: ``n`` segments evenly spaced over the split, every offset of that grid (what
  :func:`posbias.evaluate.spread_starts` scores now, at offset 0);
* **random**: ``n`` segments drawn at random, ``--draws`` times (what the bootstrap assumes).

Each design is counted with the study's percentile interval and, beside it, with the *expanded*
percentile interval (Hesterberg 2015: the percentiles of level ``erf(z / √2)``, ``z = √(n / (n − 1))
t(0.975; n − 1)``, which widens a small sample's interval as Student's t does): a candidate for the
study, measured here before any change to it.

    .venv/bin/python docs/experiments/interval_coverage.py runs/demo/models/*/final
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
from _models import each_model

from posbias.data import load_corpus
from posbias.evaluate import bootstrap_means, interval, length_study


def segment_log_ratios(model, tokens: torch.Tensor, train_len: int, longest: int, population: int) -> torch.Tensor:
    """Per segment of ``longest`` tokens (``population`` of them, spread over ``tokens``): mean loss in
    windows of ``longest`` minus in windows of ``train_len``, the same tokens, as the study records
    them (``segment_loss``). The mean over segments is the log of the ratio ppl@longest / ppl@L."""
    got = length_study(model, tokens, [train_len, longest], train_len=train_len, n_tokens=population * longest)
    return torch.tensor(got[longest]["segment_loss"], dtype=torch.float64) - torch.tensor(
        got[train_len]["segment_loss"], dtype=torch.float64)


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile (0.5 < p < 1) by integrating its density on a fine grid (an experiment's
    accuracy: 1e-4)."""
    x = torch.linspace(0, 60, 600_001, dtype=torch.float64)
    pdf = torch.distributions.StudentT(torch.tensor(float(df), dtype=torch.float64)).log_prob(x).exp()
    cdf = 0.5 + torch.cumulative_trapezoid(pdf, x)
    return float(x[1:][torch.searchsorted(cdf, torch.tensor([p], dtype=torch.float64))])


def expanded_level(n: int, level: float = 0.95) -> float:
    """The level whose percentile interval is Hesterberg's expanded percentile interval for ``n`` units."""
    z = math.sqrt(n / (n - 1)) * t_quantile(1 - (1 - level) / 2, n - 1)
    return math.erf(z / math.sqrt(2))


def covers(d: torch.Tensor, idx: torch.Tensor, truth: float, n_boot: int, level: float = 0.95) -> bool:
    """Whether the percentile bootstrap interval (of ``level``) of the ratio over segments ``idx``
    holds ``truth``."""
    k = idx.numel()
    reps = bootstrap_means(d[idx, None], torch.ones(k, 1, dtype=torch.float64), n_boot=n_boot)[:, 0]
    lo, hi = interval(reps.exp(), level)
    return lo <= truth <= hi


def coverage(d: torch.Tensor, n: int, *, draws: int, n_boot: int = 1000, seed: int = 0) -> dict[str, tuple[int, int]]:
    """``{design: (covering, samples)}`` for samples of ``n`` of the segments ``d`` (in split order),
    each design with the percentile interval and (``… expanded``) the expanded percentile interval."""
    truth = math.exp(float(d.mean()))
    count = d.numel()
    step = count // n
    blocks = [torch.arange(b * n, b * n + n) for b in range(count // n)]
    grids = [torch.arange(off, off + step * n, step) for off in range(step)]
    g = torch.Generator().manual_seed(seed)
    randoms = [torch.randperm(count, generator=g)[:n] for _ in range(draws)]
    wide = expanded_level(n)
    return {f"{name}{tag}": (sum(covers(d, idx, truth, n_boot, level) for idx in samples), len(samples))
            for name, samples in (("contiguous", blocks), ("spread", grids), ("random", randoms))
            for tag, level in (("", 0.95), (" expanded", wide))}


def tails(d: torch.Tensor) -> str:
    """How heavy-tailed the segments' log ratios are: their skewness, excess kurtosis (0 for a normal
    distribution) and the share of their variance that the 5% segments farthest from the mean carry
    (about 0.35 for a normal distribution), with where along the split those segments lie."""
    c = d - d.mean()
    m2 = float((c**2).mean())
    skew = float((c**3).mean()) / m2**1.5
    kurt = float((c**4).mean()) / m2**2 - 3
    far = c.abs().argsort(descending=True)[: max(1, round(0.05 * d.numel()))]
    share = float((c[far] ** 2).sum() / (c**2).sum())
    where = ", ".join(f"{float(i) / d.numel():.2f}" for i in far.sort().values[:8])
    return (f"log ratio per segment sd {m2 ** 0.5:.4f}, skew {skew:+.2f}, excess kurtosis {kurt:+.1f}, the 5% farthest "
            f"segments {share:.0%} of the variance (at {where}{' …' if far.numel() > 8 else ''} of the split)")


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--longest", type=int, help="the longest length (default: 16 L)")
    p.add_argument("--population", type=int, default=512, help="segments scored over the split")
    p.add_argument("--n", type=int, nargs="+", default=[8, 16], help="segments per evaluation")
    p.add_argument("--draws", type=int, default=400, help="random samples per n")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    val = load_corpus().val
    said = []
    for model, train_len, say in each_model(args.checkpoints, args.threads, said):
        d = segment_log_ratios(model, val, train_len, args.longest or 16 * train_len, args.population)
        parts = [f"{model.cfg.scheme}: the split's ratio {math.exp(float(d.mean())):.3f}", tails(d)]
        for n in args.n:
            got = coverage(d, n, draws=args.draws)
            parts.append(f"n = {n}: " + ", ".join(f"{k} {c}/{t}" for k, (c, t) in got.items()))
        say("; ".join(parts))
    return said


if __name__ == "__main__":
    main(sys.argv[1:])
