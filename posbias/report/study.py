"""The length study's report: ``results.json``, ``results.md`` (perplexity, Δ beyond L, what the
positional parameters learned) and three PNGs, from a :class:`posbias.study.StudyResult`."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

from .. import store
from ..config import Log, quiet
from ..evaluate import N_BOOT, ratios_to_best
from ..study import StudyResult
from . import md_table

Records = list[dict[str, Any]]


def write(result: StudyResult, out: str | Path, *, log: Log = quiet) -> list[Path]:
    """Write ``results.json``, ``results.md`` and the PNGs into ``out``; returns the paths written.
    Without matplotlib the PNGs are skipped (said through ``log``) and the rest is still written."""
    out = Path(out)
    paths = [store.write_json(out / "results.json", result.to_json()),
             store.write_text(out / "results.md", markdown(result))]
    try:
        paths += plots(result, out)
    except ValueError as exc:  # matplotlib missing
        log(f"plots skipped: {exc}")
    return paths


def _pick(records: Records, label: str, n: int) -> Records:
    return [r for r in records if r["label"] == label and r["eval_len"] == n]


def _cell(rs: Records, key: str, fmt: str = ".2f") -> str:
    """One seed: value [lo, hi]; several: mean ± std over seeds."""
    if not rs:
        return "–"
    if len(rs) == 1:
        r = rs[0]
        return f"{r[key]:{fmt}} [{r[key + '_lo']:{fmt}}, {r[key + '_hi']:{fmt}}]"
    v = [r[key] for r in rs]
    return f"{statistics.mean(v):{fmt}} ± {statistics.stdev(v):{fmt.lstrip('+')}}"


def markdown(result: StudyResult) -> str:
    cfg = result.config
    lines = _ppl_section(result) + _paired_section(result) + _delta_section(result) + _learned_section(result)
    if len(cfg.seeds) > 1:
        lens = cfg.lengths()
        lines += ["", f"Per seed, ppl@{lens[-1]} / ppl@{cfg.train_len}: " + "; ".join(
            f"{a.label} " + " / ".join(f"{r['ratio']:.3f}" for r in _pick(result.records, a.label, lens[-1]))
            for a in result.arms)]
    return "\n".join(lines + ["", _footer(result), ""])


def _ppl_section(result: StudyResult) -> list[str]:
    cfg, recs = result.config, result.records
    lens, base = cfg.lengths(), cfg.train_len
    what = "mean ± std over seeds" if len(cfg.seeds) > 1 else "95% bootstrap interval"
    rows = [[a.label, *(_cell(_pick(recs, a.label, n), "ppl") for n in lens),
             _cell(_pick(recs, a.label, lens[-1]), "ratio", ".3f")] for a in result.arms]
    header = ["scheme", *(f"ppl @ {n}" for n in lens), f"ppl@{lens[-1]} / ppl@{base}"]
    return [f"### Perplexity by evaluation length ({what})", ""] + md_table(header, rows)


class Paired(NamedTuple):
    """One scheme against the best at one length: perplexity ratio, its paired 95% interval, and with
    several seeds the ratio seed by seed (each seed against the best scheme's same seed)."""

    ratio: float
    lo: float
    hi: float
    per_seed: tuple[float, ...] = ()


SegmentLosses = Callable[[str], "dict[int, torch.Tensor] | None"]  # label → {seed: per-segment losses}


def _at(result: StudyResult, n: int) -> SegmentLosses:
    """Each seed's per-segment losses at length ``n`` (None where a record has none: an older posbias)."""
    def losses(label: str) -> dict[int, torch.Tensor] | None:
        rs = _pick(result.records, label, n)
        if any(not r.get("segment_loss") for r in rs):
            return None
        return {r["seed"]: torch.tensor(r["segment_loss"], dtype=torch.float64) for r in rs}
    return losses


def _paired(result: StudyResult, losses_of: SegmentLosses) -> dict[str, Paired] | None:
    labels, cols, by_seed = [], [], []
    for a in result.arms:
        per_seed = losses_of(a.label)
        if per_seed is None:
            return None
        if not per_seed:
            continue
        labels.append(a.label)
        cols.append(torch.stack(list(per_seed.values())).mean(0))
        by_seed.append({seed: float(x.mean()) for seed, x in per_seed.items()})
    if len(labels) < 2 or len({len(c) for c in cols}) > 1:
        return None
    best, ratios = ratios_to_best(torch.stack(cols, 1))  # [segments, schemes]
    out = {}
    for j, label in enumerate(labels):
        seeds = sorted(set(by_seed[j]) & set(by_seed[best]))
        per_seed = tuple(math.exp(by_seed[j][s] - by_seed[best][s]) for s in seeds) if len(seeds) > 1 else ()
        out[label] = Paired(*ratios[j], per_seed)
    return out


def paired_to_best(result: StudyResult, n: int) -> dict[str, Paired] | None:
    """At evaluation length ``n``: each scheme's perplexity as a ratio to the best scheme's (lowest
    perplexity), with a 95% percentile-bootstrap interval in which every replicate resamples the
    *same* text segments for all schemes. Paired this way, the interval holds only how the two
    models differ on the same text, not how hard the text is, so it is much narrower than the
    schemes' own intervals, whose overlap says little. Several seeds: each scheme's per-segment loss
    is the mean over its seeds, so the interval is text resampling only, and ``per_seed`` gives the
    ratio seed by seed (the same seed means the same data order and initialisation: the spread of
    training). None when records lack per-segment losses (results of an older posbias)."""
    return _paired(result, _at(result, n))


def paired_extrapolation(result: StudyResult) -> dict[str, Paired] | None:
    """Length generalisation compared between schemes: each scheme's ``ppl@longest / ppl@L`` as a
    ratio to the smallest such ratio among the schemes, paired as :func:`paired_to_best` is. Every
    length scores the same segments, so per segment the log-ratio is ``loss@longest − loss@L``, and
    one resample of segments serves both lengths and every scheme."""
    cfg = result.config
    longest, base = cfg.lengths()[-1], cfg.train_len
    if longest == base:
        return None
    far, near = _at(result, longest), _at(result, base)

    def log_ratio(label: str) -> dict[int, torch.Tensor] | None:
        a, b = far(label), near(label)
        if a is None or b is None:
            return None
        return {seed: a[seed] - b[seed] for seed in a if seed in b}

    return _paired(result, log_ratio)


def _paired_cell(p: Paired) -> str:
    if p.ratio == 1.0 and p.lo == 1.0 and p.hi == 1.0:
        return "**best**"
    text = f"{p.ratio:.3f} [{p.lo:.3f}, {p.hi:.3f}]"
    if p.per_seed:
        text += f"; seeds {min(p.per_seed):.3f}–{max(p.per_seed):.3f}"
    return text + (" (≈ best)" if p.lo <= 1.0 or (p.per_seed and min(p.per_seed) <= 1.0) else "")


def _paired_section(result: StudyResult) -> list[str]:
    cfg = result.config
    lens = cfg.lengths()
    tables = {n: paired_to_best(result, n) for n in lens}
    if any(t is None for t in tables.values()):
        return []
    extra = paired_extrapolation(result)
    header = ["scheme", *(f"@ {n}" for n in lens)] + ([f"ppl@{lens[-1]} / ppl@{cfg.train_len}"] if extra else [])
    rows = [[a.label, *(_paired_cell(tables[n][a.label]) for n in lens)]
            + ([_paired_cell(extra[a.label])] if extra else []) for a in result.arms if a.label in tables[lens[0]]]
    seeds = (" (per-segment losses averaged over seeds; then the smallest–largest ratio seed by seed, "
             "each seed against the best scheme's same seed)") if len(cfg.seeds) > 1 else ""
    last = (f"; last column: each scheme's ppl@{lens[-1]} / ppl@{cfg.train_len} relative to the smallest such "
            "ratio (length generalisation compared, paired the same way)") if extra else ""
    return ["", "### Which differences are real: perplexity relative to the best scheme at each length, 95% "
            f"interval paired over the same text segments{seeds}{last}; (≈ best): not distinguishable from the "
            "best at this evaluation size", ""] + md_table(header, rows)


def _delta_section(result: StudyResult) -> list[str]:
    cfg, base = result.config, result.config.train_len
    far = [n for n in cfg.lengths() if n > base]
    if not far:
        return []
    rows = [[a.label, *(_cell(_pick(result.records, a.label, n), "tail_delta", "+.3f") for n in far)]
            for a in result.arms]
    return ["", f"### Beyond the training length: the last {base} tokens of each window, with n − {base} … n − 1 "
            f"tokens of context, against the same tokens scored in windows of {base} (Δ nats/byte; < 0: the "
            "longer context helps, > 0: the model breaks past L)", ""] + md_table(
        ["scheme", *(f"Δ @ {n}" for n in far)], rows)


def _learned_section(result: StudyResult) -> list[str]:
    cfg = result.config
    rows = []
    for a in result.arms:
        rs = [r for r in result.records if r["label"] == a.label and r["seed"] == cfg.seeds[0]]
        if not rs:
            continue
        lr = rs[0]["learned"]
        rows.append([
            a.label, ", ".join(f"{k}={v}" for k, v in a.options.items()) or "–",
            f"[{lr['bias_range'][0]:.2f}, {lr['bias_range'][1]:.2f}]" if "bias_range" in lr else "–",
            f"{lr['bias_contrast']:.2f}" if "bias_contrast" in lr else "–",
            f"{lr['final_share']:.0%}" if "final_share" in lr else "–",
            ", ".join(f"{k} [{v[0]:.2f}, {v[1]:.2f}]" for k, v in lr["params"].items()) or "none"])
    header = ["scheme", "options", "bias range at L (query L−1, keys 0…L−1)", "largest near−far contrast",
              "far entry's share of training pairs", "parameter ranges"]
    return ["", f"### What the positional parameters learned (seed {cfg.seeds[0]})", ""] + md_table(header, rows)


def _footer(result: StudyResult) -> str:
    cfg = result.config
    r0 = result.records[0] if result.records else {"tokens": 0, "segments": 0}
    seeds = ", ".join(map(str, cfg.seeds))
    return (f"Trained at {cfg.train_len} tokens for {cfg.steps} steps (batch {cfg.batch_size}, lr {cfg.lr:g}, "
            f"positional parameters at {cfg.pos_lr_mult:g}× lr without weight decay); d_model {cfg.d_model}, "
            f"{cfg.n_layers} layers, {cfg.n_heads} heads; seeds {seeds}; {cfg.threads} threads. Every length scores "
            f"the same {r0['tokens']:,} validation tokens ({r0['segments']} segments of {max(cfg.lengths())}) in "
            f"non-overlapping windows. Intervals: 95% percentile bootstrap over the segments ({N_BOOT} "
            "replicates, paired across lengths). To compare two schemes, read the paired table: their own "
            "intervals share the text's difficulty and overlap even where the paired difference is clear; "
            "between seeds, the std is the spread of training itself.")


def plots(result: StudyResult, out: Path) -> list[Path]:
    """``ppl_vs_length.png``, ``loss_vs_position.png`` and ``learned_bias_vs_distance.png``."""
    from ..plot import plot_bias_curves, pyplot

    plt = pyplot()
    colors = plt.get_cmap("tab10" if len(result.arms) <= 10 else "tab20")
    paths = [_ppl_plot(result, out / "ppl_vs_length.png", plt, colors)]
    if result.positions:
        paths.append(_position_plot(result, out / "loss_vs_position.png", plt, colors))
    if result.schemes:
        cfg = result.config
        paths.append(plot_bias_curves(list(result.schemes.values()), out / "learned_bias_vs_distance.png",
                                      max_distance=max(cfg.lengths()), names=list(result.schemes), log_distance=True,
                                      title=f"positional biases after training at {cfg.train_len} tokens "
                                            "(ALiBi is fixed, not learned)"))
    return paths


def _mean_band(rs: Records) -> tuple[float, float, float]:
    """Mean perplexity and its band: ± std over seeds, or the bootstrap interval of one seed."""
    v = [r["ppl"] for r in rs]
    m = statistics.mean(v)
    if len(v) > 1:
        sd = statistics.stdev(v)
        return m, m - sd, m + sd
    return m, rs[0]["ppl_lo"], rs[0]["ppl_hi"]


def _ppl_plot(result: StudyResult, path: Path, plt, colors) -> Path:
    from ..plot import plain_log_ticks, save_figure

    cfg = result.config
    fig, ax = plt.subplots(figsize=(8.5, 5))
    for k, arm in enumerate(result.arms):
        pts = [(n, *_mean_band(rs)) for n in cfg.lengths() if (rs := _pick(result.records, arm.label, n))]
        xs, ys, lo, hi = (list(c) for c in zip(*pts)) if pts else ([], [], [], [])
        ax.plot(xs, ys, marker="o", label=arm.label, color=colors(k), lw=1.5)
        ax.fill_between(xs, lo, hi, color=colors(k), alpha=0.15, lw=0)
    ax.axvline(cfg.train_len, color="grey", ls="--", lw=1, label=f"training length {cfg.train_len}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    plain_log_ticks(ax)
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("perplexity (bytes)")
    band = "± std over seeds" if len(cfg.seeds) > 1 else "95% bootstrap interval"
    ax.set_title(f"Train short, test long (band: {band})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)


def _position_plot(result: StudyResult, path: Path, plt, colors) -> Path:
    from ..plot import save_figure

    cfg = result.config
    fig, ax = plt.subplots(figsize=(8.5, 5))
    for k, arm in enumerate(result.arms):
        if arm.label not in result.positions:
            continue
        y = torch.tensor(result.positions[arm.label])
        # mean over ~16 log-spaced bins of (position + 1): single positions are too noisy to read
        edges = torch.unique(torch.logspace(0, math.log10(len(y) + 1), 17).round().long().clamp(1, len(y) + 1))
        xs = [math.sqrt(int(a) * int(b)) for a, b in zip(edges[:-1], edges[1:])]
        ys = [float(y[int(a) - 1:int(b) - 1].mean()) for a, b in zip(edges[:-1], edges[1:])]
        ax.plot(xs, ys, label=arm.label, lw=1.4, color=colors(k), marker=".")
    ax.axvline(cfg.train_len, color="grey", ls="--", lw=1, label="training length")
    ax.set_xscale("log")
    ax.set_xlabel("position inside the window + 1 (log scale; mean over log-spaced bins)")
    ax.set_ylabel("loss (nats / byte)")
    ax.set_title(f"Loss by position in {max(cfg.lengths())}-token windows (seed {cfg.seeds[0]})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)
