"""The length study's report: ``results.json``, ``results.md`` (perplexity, Δ beyond L, what the
positional parameters learned) and three PNGs, from a :class:`posbias.study.StudyResult`."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import torch

from .. import store
from ..config import Log, quiet
from ..evaluate import N_BOOT, local_head
from ..schemes.options import options_text
from ..study import StudyResult, learned_little, records_at
from . import best_and_tied, facing_end, few_segments, md_table, note_replaced, paired_cell, tied_clause

Records = list[dict[str, Any]]


def write(result: StudyResult, out: str | Path, *, log: Log = quiet) -> list[Path]:
    """Write ``results.json``, ``results.md`` and the PNGs into ``out``; returns the paths written.
    Without matplotlib the PNGs are skipped (said through ``log``) and the rest is still written."""
    out, saved = Path(out), result.to_json()
    note_replaced(out / "results.json", saved, ("study", "corpus"), "another study", log)
    paths = [store.write_json(out / "results.json", saved), store.write_text(out / "results.md", markdown(result))]
    try:
        paths += plots(result, out)
    except ValueError as exc:  # matplotlib missing
        log(f"plots skipped: {exc}")
    return paths


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
    lines = (summary(result) + _ppl_section(result) + _paired_section(result) + _delta_section(result)
             + _learned_section(result))
    if len(cfg.seeds) > 1:
        lens = cfg.lengths()
        lines += ["", f"Per seed, ppl@{lens[-1]} / ppl@{cfg.train_len}: " + "; ".join(
            f"{a.label} " + " / ".join(f"{r['ratio']:.3f}" for r in records_at(result.records, a.label, lens[-1]))
            for a in result.arms)]
    return "\n".join(lines + ["", _footer(result), ""])


def summary(result: StudyResult) -> list[str]:
    """The tables' answers in sentences, with no threshold of ours: which schemes' perplexity grows or
    falls from L to the longest length (the 95% interval of the ratio above or below 1, in every seed)
    and which do not change beyond the noise, with how near 1 each grows/falls interval comes
    (:func:`nearest_end`); the best scheme at L, at the longest length and in length generalisation,
    with those not distinguishable from it (the paired tables' "≈ best")."""
    cfg = result.config
    lens, base = cfg.lengths(), cfg.train_len
    longest = lens[-1]
    if longest == base or not result.records:
        return []
    every = " in every seed" if len(cfg.seeds) > 1 else ""
    ways: dict[str, list[str]] = {"grows": [], "falls": [], "same": []}
    ends: list[tuple[float, str]] = []
    for a in result.arms:
        rs = records_at(result.records, a.label, longest)
        if not rs:
            continue
        way = ("grows" if all(r["ratio_lo"] > 1 for r in rs) else "falls" if all(r["ratio_hi"] < 1 for r in rs)
               else "same")
        ways[way].append(f"{a.label} ({times(statistics.mean(r['ratio'] for r in rs))}×)")
        if way != "same":
            ends.append(nearest_end(a.label, rs))
    parts = [f"grows{every} for {', '.join(ways['grows'])}" if ways["grows"] else "",
             f"falls{every} for {', '.join(ways['falls'])}" if ways["falls"] else "",
             f"does not change beyond the noise for {', '.join(ways['same'])}" if ways["same"] else ""]
    lines = ["### Summary", "", *_learned_little(result),
             f"* **From L = {base} to {longest} tokens ({longest / base:g} L), perplexity** "
             + "; ".join(x for x in parts if x) + f" (grows, falls: the 95% interval of ppl@{longest} / ppl@{base} "
             f"lies above, below 1{every}; mean ratio in brackets)."]
    if ends:
        lines.append("* **How near 1 those intervals come** (the end nearest 1" + (", in the seed where it is nearest"
                     if every else "") + "; the nearer, the more easily another sample of the text turns the answer): "
                     + ", ".join(text for _, text in sorted(ends)) + ".")
    for what, table in ((f"at L = {base}", result.paired.get(base, {})),
                        (f"at {longest}", result.paired.get(longest, {})),
                        ("in length generalisation (the smallest ppl@longest / ppl@L)", result.paired_ratio)):
        if not table:
            continue
        labels = list(table)
        best, tied = best_and_tied(list(table.values()))
        lines.append(f"* **Best {what}:** {labels[best]}" + tied_clause([labels[j] for j in tied], "scheme") + ".")
    lines += _for_scale(result)
    if len(cfg.seeds) == 1:
        lines.append(f"* **One seed ({cfg.seeds[0]}):** every interval here is over the text scored; how far "
                     "training's own spread moves these answers is not measured (`--seeds 0 1 2` measures it).")
    few = few_segments(result.records[0]["segments"]) if "segments" in result.records[0] else ""
    return lines + ([f"* **{few}**"] if few else []) + [""]


def times(x: float) -> str:
    """A ratio to three significant digits, or as many more (up to six) as it takes not to read 1 when
    it is not 1 (1.003: "1.003", not "1", beside "grows")."""
    for digits in range(3, 7):
        text = f"{x:.{digits}g}"
        if x == 1 or float(text) != 1:
            break
    return text


def _vs_unigram(e: dict[str, Any], seeds: int) -> str:
    return f"{e['label']}" + (f" (seed {e['seed']})" if seeds > 1 else "") + f" {e['ratio']:.3f}× [{e['lo']:.3f}, {e['hi']:.3f}]"


def _learned_little(result: StudyResult) -> list[str]:
    """The models whose perplexity at L is not below the byte-frequency reference's beyond the noise
    (:func:`posbias.study.against_unigram`): first in the summary, since every other sentence about them
    describes a model that uses no context."""
    u, seeds, base = result.unigram, len(result.config.seeds), result.config.train_len
    little = [e for e in (u or {}).get("at", []) if e["eval_len"] == base and learned_little(e)]
    if not little:
        return []
    return [f"* **Learned little: {', '.join(_vs_unigram(e, seeds) for e in little)} "
            f"{'is' if len(little) == 1 else 'are'} not below the perplexity of byte frequencies ({u['ppl']:.2f}) "
            f"beyond the noise at L = {result.config.train_len} (ratio to it, 95% interval paired over the same text): "
            f"{'it predicts' if len(little) == 1 else 'they predict'} each byte by how often it occurs and no better, "
            "so what perplexity does past L says nothing about a positional scheme. Train longer (`--steps`).**"]


def _for_scale(result: StudyResult) -> list[str]:
    """The byte-frequency reference's perplexity and the range of the models' perplexity at L relative to it."""
    u, seeds, cfg = result.unigram, len(result.config.seeds), result.config
    entries = (u or {}).get("at", [])
    at = sorted((e for e in entries if e["eval_len"] == cfg.train_len), key=lambda e: e["ratio"])
    if not at:
        return []
    longest = max(cfg.lengths())
    worse = [e for e in entries if e["eval_len"] == longest != cfg.train_len and e["lo"] > 1]
    return [f"* **For scale:** predicting each byte by its frequency in the training text, without context, "
            f"reads ppl {u['ppl']:.2f} [{u['ppl_lo']:.2f}, {u['ppl_hi']:.2f}] on the same tokens; at L = "
            f"{cfg.train_len} the models read "
            + (f"{_vs_unigram(at[0], seeds)} of that" if len(at) == 1 else
               f"from {_vs_unigram(at[0], seeds)} to {_vs_unigram(at[-1], seeds)} of that")
            + (f"; at {longest}, {', '.join(_vs_unigram(e, seeds) for e in worse)} {'reads' if len(worse) == 1 else 'read'} "
               "above it, beyond the noise: worse there than no context at all." if worse else ".")]


def nearest_end(label: str, rs: Records) -> tuple[float, str]:
    """For a ratio that grows or falls in every one of ``rs``: the interval end nearest 1 over the seeds
    (:func:`~posbias.report.facing_end`), as ``(distance from 1 in log, "label 0.997 (seed 1)")``. 16
    against 64 segments of the same split turned the demo's verdicts whose ends lay within 0.003 of 1
    (docs/study.md, "Which verdicts a sample of text can turn")."""
    end, seed = min(((facing_end(r["ratio_lo"], r["ratio_hi"], 1.0), r["seed"]) for r in rs),
                    key=lambda e: abs(math.log(e[0])))
    return abs(math.log(end)), f"{label} {end:.3f}" + (f" (seed {seed})" if len(rs) > 1 else "")


def _ppl_section(result: StudyResult) -> list[str]:
    cfg, recs = result.config, result.records
    lens, base = cfg.lengths(), cfg.train_len
    what = "mean ± std over seeds" if len(cfg.seeds) > 1 else "95% bootstrap interval"
    rows = [[a.label, *(_cell(records_at(recs, a.label, n), "ppl") for n in lens),
             _cell(records_at(recs, a.label, lens[-1]), "ratio", ".3f")] for a in result.arms]
    header = ["scheme", *(f"ppl @ {n}" for n in lens), f"ppl@{lens[-1]} / ppl@{base}"]
    return [f"### Perplexity by evaluation length ({what})", ""] + md_table(header, rows)


def _paired_section(result: StudyResult) -> list[str]:
    cfg = result.config
    lens = cfg.lengths()
    tables, extra = result.paired, result.paired_ratio
    if not tables:
        return []
    header = ["scheme", *(f"@ {n}" for n in lens)] + ([f"ppl@{lens[-1]} / ppl@{cfg.train_len}"] if extra else [])
    rows = [[a.label, *(paired_cell(tables[n][a.label]) for n in lens)]
            + ([paired_cell(extra[a.label])] if extra else []) for a in result.arms if a.label in tables[lens[0]]]
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
    head = local_head(base)

    def table(key: str, fmt: str) -> list[str]:
        rows = [[a.label, *(_cell(records_at(result.records, a.label, n), key, fmt) for n in far)] for a in result.arms]
        return md_table(["scheme", *(f"Δ @ {n}" for n in far)], rows)

    return (["", f"### Beyond the training length: the last {base} tokens of each window, with n − {base} … n − 1 "
             f"tokens of context, against the same tokens scored in windows of {base} (Δ nats/byte; < 0: the "
             "longer context helps, > 0: the model breaks past L)", ""]
            + table("tail_delta", "+.3f")
            + ["", f"### What the distant keys do: the same Δ without the first {head} of those {base} tokens, which in "
               f"windows of {base} have almost no context (their local context coming back dominates the table "
               f"above); the other {base - head} keep at least {head} tokens of it either way (< 0: the distant "
               "keys are used, ≈ 0: ignored, > 0: they disturb the model)", ""]
            + table("far_delta", "+.4f"))


def _learned_section(result: StudyResult) -> list[str]:
    cfg = result.config
    rows = []
    for a in result.arms:
        rs = [r for r in result.records if r["label"] == a.label and r["seed"] == cfg.seeds[0]]
        if not rs:
            continue
        lr = rs[0]["learned"]
        rows.append([
            a.label, options_text(a.options, "–"),
            f"[{lr['bias_range'][0]:.2f}, {lr['bias_range'][1]:.2f}]" if "bias_range" in lr else "–",
            f"{lr['bias_contrast']:.2f}" if "bias_contrast" in lr else "–",
            f"{lr['final_share']:.0%}" if "final_share" in lr else "–",
            (f"threshold L = {lr['threshold']:.0f} tokens; " if "threshold" in lr else "")
            + (", ".join(f"{k} [{v[0]:.2f}, {v[1]:.2f}]" for k, v in lr["params"].items()) or "none")])
    header = ["scheme", "options", "bias range at L (query L−1, keys 0…L−1)", "largest near−far contrast",
              "far entry's share of training pairs", "parameter ranges"]
    return ["", f"### What the positional parameters learned (seed {cfg.seeds[0]})", ""] + md_table(header, rows)


def _n(count: int, noun: str) -> str:
    """``1 layer``, ``4 layers``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _footer(result: StudyResult) -> str:
    cfg = result.config
    r0 = result.records[0] if result.records else {"tokens": 0, "segments": 0}
    seeds = ", ".join(map(str, cfg.seeds))
    # the study's longest length when it passes L; else diagnose's default (8 L): it refuses a window of L
    window = f" --length {n}" if (n := max(cfg.lengths())) > cfg.train_len else ""
    return (f"Trained at {cfg.train_len} tokens for {cfg.steps} steps (batch {cfg.batch_size}, lr {cfg.lr:g}, "
            f"positional parameters at {cfg.pos_lr_mult:g}× lr without weight decay); d_model {cfg.d_model}, "
            f"{_n(cfg.n_layers, 'layer')}, {_n(cfg.n_heads, 'head')}; {'seed' if len(cfg.seeds) == 1 else 'seeds'} "
            f"{seeds}; {_n(cfg.threads, 'thread')}. Every length scores "
            f"the same {r0['tokens']:,} validation tokens ({r0['segments']} segments of {max(cfg.lengths())}, spread "
            f"evenly from the split's start to its end) in non-overlapping windows. Intervals: 95% percentile "
            f"bootstrap over the segments ({N_BOOT} replicates, paired across lengths): an interval for this split's "
            "text, which varies along it (one stretch of it can read far from another). To compare two schemes, read the paired table: their own "
            "intervals share the text's difficulty and overlap even where the paired difference is clear; "
            "between seeds, the std is the spread of training itself. Why a scheme's curve is what it is: "
            f"`posbias diagnose models/<scheme>-seed<k>-<key>/final{window}` (from this "
            "folder) splits its context effect into the local context restored at the cut chunks' starts and what "
            "the distant keys do, and measures its attention on distances beyond L; `posbias diagnose <this "
            f"folder>{window}` does it for every model here and sets them side by side "
            "(comparison.md).")


def plots(result: StudyResult, out: Path) -> list[Path]:
    """``ppl_vs_length.png``, ``ratio_vs_length.png``, ``loss_vs_position.png`` and
    ``learned_bias_vs_distance.png``."""
    from ..plot import plot_bias_curves, pyplot

    plt = pyplot()
    colors = plt.get_cmap("tab10" if len(result.arms) <= 10 else "tab20")
    paths = [_ppl_plot(result, out / "ppl_vs_length.png", plt, colors),
             _ratio_plot(result, out / "ratio_vs_length.png", plt, colors)]
    if result.positions:
        paths.append(_position_plot(result, out / "loss_vs_position.png", plt, colors))
    if result.schemes:
        cfg = result.config
        paths.append(plot_bias_curves(list(result.schemes.values()), out / "learned_bias_vs_distance.png",
                                      max_distance=max(cfg.lengths()), names=list(result.schemes), log_distance=True,
                                      trained=cfg.train_len,
                                      title=f"positional biases after training at {cfg.train_len} tokens "
                                            "(ALiBi is fixed, not learned)"))
    return paths


def _mean_band(rs: Records, key: str) -> tuple[float, float, float]:
    """The mean of ``key`` and its band: ± std over seeds, or the bootstrap interval of one seed."""
    v = [r[key] for r in rs]
    m = statistics.mean(v)
    if len(v) > 1:
        sd = statistics.stdev(v)
        return m, m - sd, m + sd
    return m, rs[0][key + "_lo"], rs[0][key + "_hi"]


Curve = tuple[int, list[int], list[float], list[float], list[float]]  # colour index, lengths, mean, band


def _curves(result: StudyResult, key: str) -> dict[str, Curve]:
    """Each scheme's ``key`` by length with its band (:func:`_mean_band`), for the plots."""
    curves = {}
    for k, arm in enumerate(result.arms):
        pts = [(n, *_mean_band(rs, key)) for n in result.config.lengths()
               if (rs := records_at(result.records, arm.label, n))]
        if pts:
            xs, ys, lo, hi = (list(c) for c in zip(*pts))
            curves[arm.label] = (k, xs, ys, lo, hi)
    return curves


def _draw(ax, curves: dict[str, Curve], labels: list[str], colors, alpha: float) -> None:
    """The named curves on ``ax``: a line with markers and its band, one colour per scheme."""
    for label in labels:
        k, xs, ys, lo, hi = curves[label]
        ax.plot(xs, ys, marker="o", label=label, color=colors(k), lw=1.5)
        ax.fill_between(xs, lo, hi, color=colors(k), alpha=alpha, lw=0)


ZOOM = 1.25  # the ratio plot's right panel: the schemes whose band stays below this at every length


def _ratio_plot(result: StudyResult, path: Path, plt, colors) -> Path:
    """ppl@n / ppl@L by length, the quantity the summary's grows / falls verdicts read: its interval
    is paired over the same segments, so it is tight where the perplexities' own bands overlap (they
    carry the text's difficulty). Left every scheme; right, on its own scale, the schemes whose band
    stays under :data:`ZOOM` (a display choice: a ratio of 0.97 and one of 1.00 are lost on an axis
    that reaches 4), with the line at 1."""
    from ..plot import plain_log_ticks, save_figure

    cfg = result.config
    curves = _curves(result, "ratio")
    near = [label for label, (*_, hi) in curves.items() if max(hi) < ZOOM]
    panels = [list(curves)] + ([near] if near and len(near) < len(curves) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels) + 2.3, 5), squeeze=False)
    for j, (ax, labels) in enumerate(zip(axes[0], panels)):
        _draw(ax, curves, labels, colors, alpha=0.18)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axvline(cfg.train_len, color="grey", ls="--", lw=1)
        ax.set_xscale("log", base=2)
        values = [v for label in labels for v in curves[label][3] + curves[label][4]]
        if j == 0 and max(values) / min(values) > 2:  # log only over a wide range: over 0.95–1.05 it has no
            ax.set_yscale("log")                      # ticks to read (the zoom is always linear)
            plain_log_ticks(ax)
        ax.set_xlabel("evaluation length n (tokens)")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel(f"ppl@n / ppl@{cfg.train_len}")
    if len(panels) > 1:
        axes[0][1].set_title(f"the schemes that stay under {ZOOM:g}×, on their own scale", fontsize=10)
    band = "± std over seeds" if len(cfg.seeds) > 1 else "95% interval, paired over the same segments"
    fig.suptitle(f"Perplexity relative to the training length {cfg.train_len} (band: {band}; below 1: the longer "
                 "context helps)", fontsize=11)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 0.9))
    fig.tight_layout()
    return save_figure(fig, path)


def _ppl_plot(result: StudyResult, path: Path, plt, colors) -> Path:
    from ..plot import plain_log_ticks, save_figure

    cfg = result.config
    fig, ax = plt.subplots(figsize=(8.5, 5))
    curves = _curves(result, "ppl")
    _draw(ax, curves, list(curves), colors, alpha=0.15)
    ax.axvline(cfg.train_len, color="grey", ls="--", lw=1, label=f"training length {cfg.train_len}")
    _unigram_line(ax, result, "ppl")
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


def _unigram_line(ax, result: StudyResult, what: str) -> None:
    """For scale, the byte-frequency reference (:func:`posbias.study.against_unigram`) as a dotted line:
    its perplexity (``what="ppl"``) or loss."""
    u = result.unigram
    if u:
        y, text = (u["ppl"], f"{u['ppl']:.1f}") if what == "ppl" else (math.log(u["ppl"]), f"{math.log(u['ppl']):.2f}")
        ax.axhline(y, color="black", ls=":", lw=1, label=f"bytes by frequency, no context ({text})")


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
    _unigram_line(ax, result, "loss")
    ax.set_xscale("log")
    ax.set_xlabel("position inside the window + 1 (log scale; mean over log-spaced bins)")
    ax.set_ylabel("loss (nats / byte)")
    ax.set_title(f"Loss by position in {max(cfg.lengths())}-token windows (seed {cfg.seeds[0]})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)
