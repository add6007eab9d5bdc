"""What the diagnosis reports say and draw, read from diagnoses made by hand: the single report
(``posbias.report.diagnose``) and the comparison of several (``posbias.report.comparison``). The
measurements themselves are tested in test_retrofit.py; here every number a report shows is one the
test put in, so a cell, sentence or line that shows another one fails."""

import math
from pathlib import Path

import pytest
import torch
from _helpers import figures_drawn

from posbias import passkey
from posbias.diagnose import DiagnoseResult
from posbias.report import comparison, md_row
from posbias.report import diagnose as report
from posbias.schemes import build

L, N = 64, 256  # training length and window of the hand-made diagnoses (the figures average runs of N / 64 = 4)
K = N // 64


def grid(*by_depth):
    """A passkey grid at one length: depth → accuracy."""
    return {f"{d / max(1, len(by_depth) - 1):.1f}": a for d, a in enumerate(by_depth)}


def made(scheme="alibi", *, layers=2, heads=2, copies=None, hidden=True, shift=0.0, n=N):
    """A diagnosis at window ``n`` (N) of a model trained at L, every measurement distinct: the loss at
    position p is log(p + 2) (+ ``shift``; with the full context + 0.001 · (p mod 5), and + 0.01 past
    L); the attention distances ("mean", "q50", "q90") are the query position plus a step per layer and
    head; attention at distance ≥ L grows with the query position at a slope of its own per layer and
    head (and ``shift``). ``copies``: each passkey copy's accuracy by length (L, 2 L, 4 L) at two depths."""
    full = [math.log(p + 2) + shift + 0.001 * (p % 5) + 0.01 * (p >= L) for p in range(n)]
    cut = [math.log(p + 2) + shift for p in range(n)]
    slope = lambda layer, h: (layer * heads + h + 1 + shift) / (10 * n)  # noqa: E731
    ad = {key: [[[scale * (layer + 1) * (h + 1) + q for q in range(n)] for h in range(heads)]
                for layer in range(layers)] for key, scale in (("mean", 10.0), ("q50", 5.0), ("q90", 20.0))}
    ad["beyond"] = [[[slope(layer, h) * max(0, q - L + 1) for q in range(n)] for h in range(heads)]
                    for layer in range(layers)]
    r = DiagnoseResult("ckpt", scheme, {}, L, n, build(scheme, n_heads=heads, head_dim=8), 8, full, cut, [], ad)
    if copies:
        lens = [str(n) for n in (L, 2 * L, 4 * L)]
        r.passkey_seeds = list(range(len(copies)))
        r.passkey_copies = [
            {"seed": s, "passkey": {n: grid(a, a) for n, a in zip(lens, acc)}, "fit": {"probes": [], "steps": 1},
             **({"hidden": {n: grid(min(1.0, a + 0.3), min(1.0, a + 0.3)) for n, a in zip(lens[1:], acc[1:])}}
                if hidden else {})}
            for s, acc in enumerate(copies)]
        r.passkey = passkey.mean_of([c["passkey"] for c in r.passkey_copies])
        r.passkey_samples = 4
    return r


def xy(line):
    return [float(x) for x in line.get_xdata()], [float(y) for y in line.get_ydata()]


def same_line(line, xs, ys):
    """Whether ``line`` draws the points (xs, ys), to float32 rounding."""
    got_x, got_y = xy(line)
    return got_x == pytest.approx(xs, abs=1e-6) and got_y == pytest.approx(ys, abs=1e-6)


def runs(values, k=K):
    """``values`` averaged over runs of ``k``, and each run's mean position in units of L (as the figures
    draw)."""
    means = [sum(values[i:i + k]) / k for i in range(0, len(values), k)]
    return [(i + (k - 1) / 2) / L for i in range(0, len(values), k)], means


def copies_mean(r, n, chosen=None):
    """The mean over depths and over the copies ``chosen`` (all of them) at length ``n``."""
    each = [sum(c["passkey"][str(n)].values()) / len(c["passkey"][str(n)]) for c in r.passkey_copies]
    chosen = range(len(each)) if chosen is None else chosen
    return sum(each[i] for i in chosen) / len(chosen)


def test_the_comparison_figure_draws_each_models_lines_in_units_of_L(saved_figures):
    """comparison.png: Δ (full − cut) and the attention at distance ≥ L by position / L, averaged over
    runs of N / 64 positions, one line per model in one colour across the panels; passkey accuracy by
    length / L on a log₂ axis, solid where the model solved samples at L and dotted (named untaught)
    where it did not, with the band from its lowest to its highest copy; the last panel the copies that
    learned the task at L as they are and with the far filler hidden (at L nothing is hidden)."""
    taught = made("alibi", copies=[(1.0, 0.5, 0.25), (0.95, 0.45, 0.05), (0.2, 0.0, 0.0)])
    untaught = made("t5", copies=[(0.0, 0.0, 0.0)], hidden=False, shift=0.5)
    comparison.plot([("alibi", taught), ("t5", untaught)], Path("comparison.png"))
    fig = saved_figures["comparison.png"]
    assert len(fig.axes) == 4 and {ax.get_subplotspec().get_geometry()[:2] for ax in fig.axes} == {(2, 2)}
    delta, beyond, keyed, learned = fig.axes
    assert [ax.get_title() for ax in fig.axes] == [
        "what the context past L does (< 0: helps)", "attention on distances never seen in training",
        "retrieval past L, copies fine-tuned at L", "copies that learned: as they are (—), far filler hidden (- -)"]
    colour = {}
    for name, r in (("alibi", taught), ("t5", untaught)):
        line = next(x for x in delta.get_lines() if x.get_label() == name)
        colour[name] = line.get_color()
        want = runs([a - b for a, b in zip(r.loss_by_position, r.loss_by_position_cut_at_L)])
        assert same_line(line, *want)
        far = torch.tensor(r.attention_distance["beyond"]).mean((0, 1)).tolist()
        line = next(x for x in beyond.get_lines() if x.get_label() == name)
        assert same_line(line, *runs(far)) and line.get_color() == colour[name]
    assert colour["alibi"] != colour["t5"]
    for ax in fig.axes:  # L marked in every panel; Δ = 0 in the first
        assert any(xy(x) == ([1, 1], [0, 1]) and x.get_linestyle() == "--" for x in ax.get_lines())
    assert any(xy(x) == ([0, 1], [0, 0]) for x in delta.get_lines())

    lines = {x.get_label(): x for x in keyed.get_lines()}
    solid, dotted = lines["alibi, 3 copies"], lines["t5 (untaught at L)"]
    assert same_line(solid, [1, 2, 4], [copies_mean(taught, n) for n in (L, 2 * L, 4 * L)])
    assert same_line(dotted, [1, 2, 4], [0, 0, 0])
    assert (solid.get_linestyle(), dotted.get_linestyle()) == ("-", ":")
    assert (solid.get_color(), dotted.get_color()) == (colour["alibi"], colour["t5"])
    band, = keyed.collections  # the model of several copies alone: its lowest to its highest copy
    corners = {(round(float(x), 6), round(float(y), 6)) for x, y in band.get_paths()[0].vertices}
    assert corners == {(1.0, 0.2), (2.0, 0.0), (4.0, 0.0), (1.0, 1.0), (2.0, 0.5), (4.0, 0.25)}
    for ax in (keyed, learned):
        assert ax.get_xscale() == "log" and ax.get_ylim() == pytest.approx((-0.03, 1.03))
        assert ax.get_xlabel() == "passkey sample length / L"

    got, hid = (x for x in learned.get_lines() if x.get_color() == colour["alibi"])
    assert got.get_label() == "alibi (2 of 3)" and (got.get_linestyle(), hid.get_linestyle()) == ("-", "--")
    assert same_line(got, [1, 2, 4], [copies_mean(taught, n, [0, 1]) for n in (L, 2 * L, 4 * L)])
    assert same_line(hid, [1, 2, 4], [0.975, 0.775, 0.45])  # past L each copy's + 0.3
    assert not [x for x in learned.get_lines() if x.get_color() == colour["t5"]]  # untaught: no copy learned


def test_the_comparison_figure_has_the_panels_its_diagnoses_fill(saved_figures):
    """Without a passkey test two panels side by side; with one but no far filler hidden, three; a
    window under 128 positions drawn position by position."""
    comparison.plot([("alibi", made("alibi")), ("t5", made("t5"))], Path("two.png"))
    comparison.plot([("alibi", made("alibi", copies=[(1.0, 0.5, 0.2)], hidden=False))], Path("three.png"))
    comparison.plot([("short", made("alibi", n=2 * L - 2))], Path("short.png"))  # under 128 positions: each drawn
    delta = saved_figures["short.png"].axes[0].get_lines()[0]
    assert len(delta.get_xdata()) == 2 * L - 2 and float(delta.get_xdata()[0]) == 0.0
    for name, panels in (("two.png", 2), ("three.png", 3)):
        fig = saved_figures[name]
        assert len(fig.axes) == panels and {ax.get_subplotspec().get_geometry()[:2] for ax in fig.axes} == {(1, panels)}


def test_the_diagnosis_figures_draw_its_measurements_by_position(saved_figures, monkeypatch):
    """report.plots: the loss by position with the full context and cut at L, averaged over runs of
    N / 64 positions at each run's mean position, L marked; the attention distance of each head in a panel per
    layer against uniform attention over every earlier key (mean x / 2); the attention at distance ≥ L
    averaged the same way against uniform attention's share of keys that far; the bias to the whole
    window (additive schemes); the passkey grid, a cell per length and depth, its text dark on the
    light cells."""
    drawn = figures_drawn(monkeypatch)
    r = made("alibi", copies=[(1.0, 0.5, 0.25), (0.95, 0.45, 0.05)])
    r.passkey = {str(L): grid(0.9, 0.55), str(2 * L): grid(0.6, 0.3), str(4 * L): grid(0.2, 0.0)}
    names = [p.name for p in report.plots(r, Path("d"))]
    assert names == ["loss_by_position.png", "attention_distance.png", "attention_beyond_L.png",
                     "bias_vs_distance.png", "passkey.png"]

    ax, = saved_figures["loss_by_position.png"].axes
    lines = {x.get_label(): x for x in ax.get_lines()}
    middles = [i + (K - 1) / 2 for i in range(0, N, K)]  # each run's mean position
    assert same_line(lines["full context"], middles, runs(r.loss_by_position)[1])
    assert same_line(lines[f"context cut at L = {L}"], middles, runs(r.loss_by_position_cut_at_L)[1])
    assert xy(lines[f"training length {L}"]) == ([L, L], [0, 1])
    assert ax.get_title() == "alibi: loss by position"

    fig = saved_figures["attention_distance.png"]
    assert fig.get_suptitle() == "alibi: how far each head looks" and len(fig.axes) == 2
    for layer, ax in enumerate(fig.axes):
        lines = {x.get_label(): x for x in ax.get_lines()}
        assert ax.get_title() == f"layer {layer}"
        for h in range(2):
            assert same_line(lines[f"head {h}"], list(range(N)), r.attention_distance["mean"][layer][h])
        assert same_line(lines["uniform"], list(range(N)), [x / 2 for x in range(N)])
        assert any(xy(x) == ([L, L], [0, 1]) for x in ax.get_lines())

    fig = saved_figures["attention_beyond_L.png"]
    assert fig.get_suptitle() == f"alibi: attention on unseen distances (mean of {K} queries)"
    assert fig.axes[0].get_ylabel() == f"attention at distance ≥ L = {L}"
    for layer, ax in enumerate(fig.axes):
        lines = {x.get_label(): x for x in ax.get_lines()}
        for h in range(2):
            xs = [i + (K - 1) / 2 for i in range(0, N, K)]  # the mean position of each run
            assert same_line(lines[f"head {h}"], xs, runs(r.attention_distance["beyond"][layer][h])[1])
        assert same_line(lines["uniform"], list(range(N)), [max(0, x - L + 1) / (x + 1) for x in range(N)])

    assert drawn["bias_vs_distance.png"] == {"max_distance": N, "trained": L, "title": "learned/fixed bias per head (alibi)"}

    ax = saved_figures["passkey.png"].axes[0]
    image, = ax.images
    assert image.get_array().tolist() == [[0.9, 0.55], [0.6, 0.3], [0.2, 0.0]] and image.get_clim() == (0, 1)
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(L), str(2 * L), str(4 * L)]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.0", "1.0"]
    cells = [(t.get_text(), t.get_color()) for t in ax.texts]
    assert cells == [("0.90", "black"), ("0.55", "white"), ("0.60", "black"), ("0.30", "white"), ("0.20", "white"),
                     ("0.00", "white")]
    assert ax.get_title() == f"alibi: passkey retrieval (trained at {L}, mean of 2 copies)"


def test_the_diagnosis_draws_the_figures_its_measurements_allow(saved_figures, monkeypatch):
    """No attention-beyond-L figure without the measurement, no bias figure for a scheme that adds
    none (RoPE), no passkey figure without the test; one copy's passkey title names no mean; a window
    shorter than 128 drawn position by position (runs of 1), a run of two averaged."""
    figures_drawn(monkeypatch)
    r = made("rope", n=2 * L - 2)
    del r.attention_distance["beyond"]
    assert [p.name for p in report.plots(r, Path("d"))] == ["loss_by_position.png", "attention_distance.png"]
    line = next(x for x in saved_figures["loss_by_position.png"].axes[0].get_lines() if x.get_label() == "full context")
    assert same_line(line, list(range(2 * L - 2)), r.loss_by_position)
    short = made("alibi", n=2 * L - 2)  # attention at distance ≥ L, query by query too
    report.plots(short, Path("s"))
    fig = saved_figures["attention_beyond_L.png"]
    assert fig.get_suptitle() == "alibi: attention on unseen distances (query by query)"
    assert same_line(fig.axes[0].get_lines()[0], list(range(2 * L - 2)), short.attention_distance["beyond"][0][0])
    values = torch.tensor([[1.0, 3.0, 5.0, 9.0]])
    assert report.smoothed(values, 2).tolist() == [[2.0, 7.0]] and report.smoothed(values, 1) is values
    one = made("alibi", copies=[(1.0, 0.5, 0.25)])
    assert "passkey.png" in [p.name for p in report.plots(one, Path("e"))]
    assert saved_figures["passkey.png"].axes[0].get_title() == f"alibi: passkey retrieval (trained at {L})"


def test_the_comparison_says_which_models_were_trained_on_another_text():
    """The text measured on, and the models whose checkpoint records another training text or none;
    nothing where the diagnoses record no text."""
    a, b = made("alibi"), made("t5")
    rows = [comparison.row("alibi", a), comparison.row("t5", b)]
    assert comparison._corpus(rows, [a, b]) == ""
    for r in (a, b):
        r.corpus, r.trained_corpus = {"name": "text", "sha256": "aa"}, {"name": "text", "sha256": "aa"}
    assert comparison._corpus(rows, [a, b]) == "Measured on the validation split of text (sha256 aa), the text every model was trained on."
    b.trained_corpus = {"name": "other", "sha256": "bb"}
    a.trained_corpus = None
    assert comparison._corpus(rows, [a, b]) == ("Measured on the validation split of text (sha256 aa); **not** (or not "
                                                "recorded as) the text these were trained on: alibi, t5.")
    assert comparison._corpus(rows, [a, b]) in comparison.markdown(rows, [a, b])


def test_the_comparison_says_what_hiding_the_far_filler_gives_back_and_where_attention_goes_farthest():
    """The sentences: the copies that learned the task at L, at the window as they are → with the far
    filler hidden (a model without the measurement, or without such copies, left out); the models whose
    attention at distance ≥ L is largest and smallest, or the one value where they tie."""
    a = made("alibi", copies=[(1.0, 0.5, 0.25), (0.95, 0.45, 0.05), (0.2, 0.0, 0.0)])
    b = made("t5", copies=[(1.0, 0.9, 0.8)], hidden=False, shift=0.5)
    c = made("fire", copies=[(0.5, 0.5, 0.5)], shift=1.0)
    rows = [comparison.row(name, r) for name, r in (("alibi", a), ("t5", b), ("fire", c))]
    said = comparison.sentences(rows)
    assert ("With the filler past L hidden (the key kept at its distance), the copies that solved at least 0.9 at L "
            "solve at the window's length (as they are → hidden; retrieval that comes back was lost to the far filler, "
            "not to the key's distance): alibi 0.15 → 0.45.") in said
    far = {name: r["attention_beyond_L"][0] for name, r in zip(("alibi", "t5", "fire"), rows)}
    assert far["alibi"] < far["t5"] < far["fire"]  # the slope grows with the shift
    assert (f"Attention on distances ≥ L (never seen in the training at L; last quarter of the window) is largest in "
            f"fire ({far['fire']:.4f}) and smallest in alibi ({far['alibi']:.4f}).") in said
    tied = comparison.sentences([comparison.row("alibi", a), comparison.row("t5", made("t5"))])
    assert (f"Attention on distances ≥ L (never seen in the training at L; last quarter of the window) is "
            f"{far['alibi']:.4f} in every model.") in tied


def row(*cells):
    """A table row as the reports write it."""
    return md_row(cells)


def context_delta(r):
    """Δ over all positions: the mean loss with the full context minus cut at L."""
    return (sum(r.loss_by_position) - sum(r.loss_by_position_cut_at_L)) / len(r.loss_by_position)


def full(copies=((1.0, 0.5, 0.25), (0.95, 0.45, 0.05), (0.0, 0.0, 0.0))):
    """A T5 diagnosis with every measurement a report can show, each a value of the test's: the loss by
    range and its split by local context and by a sliding window (three verdicts: hurts, ≈ 0, hurts),
    the final bucket (head 1 diluted), reach and a bias that moves, and three passkey copies (the
    third solved nothing at L) with per-byte scores, the far filler hidden and where the answer
    queries attend."""
    from posbias.diagnose import KEPT

    r = made("t5", copies=copies)
    r.loss_by_range = [("0–63", 1.0, 1.1, -0.2, 0.05), ("64–255", 2.0, 1.9, 0.01, 0.2)]
    r.loss_delta_interval = (0.004, 0.02)
    r.context_split = [("the first 8 of each chunk past L", 0.125, -0.3, -0.4, -0.2), (f"{KEPT} (≥ 8 kept)", 0.625, 0.02, 0.01, 0.03)]
    r.window_split = [("keys beyond L", 0.015, 0.005, 0.025), ("window − cut", 0.005, -0.001, 0.011),
                      ("at chunk ends", 0.0002, 0.0001, 0.0003)]
    r.final_entry_share, r.final_entry_gap, r.far_weight = {128: 0.25, 256: 0.6}, [1.5, -0.5], [0.4, 1.5]
    r.effective_reach, r.reach_at_L, r.bias_drift = [100, None], [90, None], [0.0, 0.3]
    r.passkey_digits = {n: {d: [0.9, 0.5, 0.4, 0.3, 0.2] for d in g} for n, g in r.passkey.items()}
    for s, c in enumerate(r.passkey_copies):
        c["fit"] = {"steps": 10, "target": 0.9, "probes": [[5, 0.5], [10, 0.95 - s / 10]], "stopped": s == 0,
                    "learned_at": 10 if s < 2 else None}
        c["attention"] = {str(L): {"key": [[[0.5, 0.4]], [[0.2, 0.6 - s / 10]]], "place": [[[0.1, 0.2]], [[0.3, 0.05]]]}}
    r.passkey_max_steps, r.passkey_lr_mult = 10, 100.0
    return r


def test_the_diagnosis_report_shows_each_measurement_where_it_belongs():
    """report.md's sections, cell by cell and verdict by verdict: the loss by range and over all
    positions (its Δ recomputed from the losses), the split by local context, the sliding window's rows
    with the verdict of the first (keys beyond L) apart from the second's, the attention distances over
    the last quarter and around L, the final bucket's shares and diluted head, the reach and drift."""
    r = full()
    md = report.markdown(r).splitlines()
    full_mean, cut_mean = (sum(x) / N for x in (r.loss_by_position, r.loss_by_position_cut_at_L))
    for line in [
            row("0–63", "1.0000", "1.1000", "-0.1000 [-0.2000, +0.0500]"),
            row("64–255", "2.0000", "1.9000", "+0.1000 [+0.0100, +0.2000]"),
            row("all", f"{full_mean:.4f}", f"{cut_mean:.4f}", f"{context_delta(r):+.4f} [+0.0040, +0.0200]"),
            f"Perplexity {math.exp(full_mean):.3f} with the full context vs {math.exp(cut_mean):.3f} cut at L: the extra "
            "context hurts (the whole interval of Δ is above 0).",
            row("the first 8 of each chunk past L", "12.5%", "-0.3000 [-0.4000, -0.2000]", "-0.0375"),
            row("the rest past L (≥ 8 kept)", "62.5%", "+0.0200 [+0.0100, +0.0300]", "+0.0125"),
            "For tokens that keep local context, the far context hurts (the whole interval of Δ is above 0).",
            row("keys beyond L", "+0.0150 [+0.0050, +0.0250]"), row("window − cut", "+0.0050 [-0.0010, +0.0110]"),
            row("at chunk ends", "+2.0e-04 [+1.0e-04, +3.0e-04]"),
            "Attention to the keys beyond L hurts (the whole interval of Δ is above 0).",
            "Far tokens through the layers together with the bias's move with the query position (the cut restarts the "
            "positions at 0, so this row holds both), Δ +2.0e-04 [+1.0e-04, +3.0e-04]: hurts (the whole interval of Δ "
            "is above 0).",
            # attention distance: the last N/4 queries (192 … 255, mean position 223.5), and queries L ± 8 (63.5)
            row(0, 0, "233.5", "228.5", "243.5", "73.5", f"{(223.5 - L + 1) / (10 * N):.4f}"),
            row(1, 1, "263.5", "243.5", "303.5", "103.5", f"{4 * (223.5 - L + 1) / (10 * N):.4f}"),
            f"Attention-weighted distance i − j at the last {N // 4} query positions (uniform attention over all earlier "
            f"keys would give a mean of about {3 * N // 8}; a head that attended only to keys within L would stay below {L}).",
            f"Attention on keys at distance ≥ L (distances never seen in training), averaged over layers and heads: "
            f"{2.5 * (119.5 - L + 1) / (10 * N):.4f} at queries just below 2L, {2.5 * (223.5 - L + 1) / (10 * N):.4f} over "
            f"the last {N // 4} (largest head {4 * (223.5 - L + 1) / (10 * N):.4f}). A share that grows with the query "
            "position is attention dilution: ever more unseen distances draw weight.",
            row(128, "25.0%"), row(256, "60.0%"), row(0, "+1.50", "0.4"), row(1, "-0.50", "1.5"),
            f"In head(s) 1 the {N - r.scheme.flat_beyond} far keys together outweigh the nearest key on the bias alone: the "
            "final entry does not separate near from far, and attention mass can drift to the many far keys (dilution).",
            row("head", f"reach, query at {N - 1}", f"reach, query at {L - 1}", "bias drift over distances < L, nats"),
            row(0, 100, 90, "0.000"), row(1, "never", "never", "0.300"),
            f"The bias changes with the query position: at the distances it was trained on, a query at {N - 1} meets a bias "
            f"up to 0.30 nats away from the one a query at {L - 1} met in training.",
    ]:
        assert line in md, line
    assert r.scheme.flat_beyond < N and f"every distance from {r.scheme.flat_beyond} on reads one learned value" in md[
        md.index("## The final entry (T5: the final bucket)") + 2]
    assert md[md.index("## Loss by position") + 2].startswith(
        f"The same {8 * N} validation bytes (8 windows spread evenly over the split) scored in {N}-token windows (full "
        f"context) and with the context cut into chunks of L = {L} (what the model saw in training).")
    assert md[md.index("## Effective reach of the bias, and its drift past L") + 2] == (
        f"Distance at which the bias alone cuts attention by 100× ('never' = not within {16 * N}), and how far the bias "
        f"over the distances seen in training (0 … {L - 1}) moves between a query at {L - 1} and one at {N - 1} (each "
        "curve relative to its distance-0 value):")
    r.far_weight = [0.4, 1.0]  # as much as the nearest key: no dilution
    assert (f"In every head the {N - r.scheme.flat_beyond} far keys together weigh no more than the nearest key on the "
            "bias alone: the final entry acts as a penalty, not as a source of dilution.") in report.markdown(r).splitlines()
    near = made("t5", n=r.scheme.flat_beyond)  # a window whose farthest key (distance n − 1) is short of the final entry
    near.final_entry_share, near.final_entry_gap, near.far_weight = {L: 0.0, near.length: 0.0}, [1.5, -0.5], [0.0, 0.0]
    assert (f"No key of the {near.length}-token window is as far as the final entry: it plays no part here."
            in report.markdown(near).splitlines())
    r.context_split[1] = (*r.context_split[1][:2], 0.01, -0.005, 0.03)  # an interval that spans 0
    assert ("For tokens that keep local context, the far context makes no difference this evaluation can see (the "
            "interval of Δ spans 0).") in report.markdown(r).splitlines()


def test_the_passkey_section_names_each_copy_and_what_it_solved():
    """Each copy's fine-tune and probes, accuracy by length per copy with the mean, spread and the
    copies that learned at L, the grid by depth, the copy that solved nothing at L named (one copy, or
    several, in the singular or plural), the answer bytes, the far filler hidden per copy and by depth,
    and where the answer queries attend (the largest head per byte)."""
    r = full()
    md = report.markdown(r).splitlines()
    untaught = ("No sample was solved at L = 64 by the copy of seed 2: that fine-tune did not teach the task within "
                "the training length, so its rows past L say nothing about retrieval there. Raise --passkey-steps "
                "(beyond 10).")
    for line in [
            "3 copies fine-tuned for 10 steps on passkey samples of 64 bytes, each from the batches of its own seed, their "
            "positional parameters at 100× the learning rate, as in training; a probe at L (40 samples of its own, every "
            "100 steps) shows how it learned:",
            "* seed 0: it learned the task (≥ 0.9 of the probe at L) after 10 steps and stopped there. Probe accuracy by "
            "step: 5 0.50, 10 0.95.",
            "* seed 2: it trained all 10 steps and its probe at L never reached 0.9 (the last, at step 10: 0.75). Probe "
            "accuracy by step: 5 0.50, 10 0.75.",
            row("length", "seed 0", "seed 1", "seed 2", "mean", "spread", "copies ≥ 0.9 at L (2 of 3)"),
            row(L, "1.00", "0.95", "0.00", "0.65", "1.00", "0.97"),
            row(4 * L, "0.25", "0.05", "0.00", "0.10", "0.25", "0.15"),
            row("length", "depth 0.0", "depth 1.0", "mean"), row(2 * L, "0.32", "0.32", "0.32"),
            untaught,
            row("length", "byte 1", "byte 2", "byte 3", "byte 4", "byte 5", "mean", "all 5 (solved)"),
            row(L, "0.90", "0.50", "0.40", "0.30", "0.20", "0.46", "0.65"),
            row("length", "seed 0", "seed 1", "seed 2", "copies ≥ 0.9 at L"),
            row(2 * L, "0.50 → 0.80", "0.45 → 0.75", "0.00 → 0.30", "0.47 → 0.78"),
            row(4 * L, "0.25 → 0.55", "0.05 → 0.35", "0.00 → 0.30", "0.15 → 0.45"),
            row(4 * L, "0.10 → 0.40", "0.10 → 0.40"),  # by depth, the mean over the copies
            row("length", "byte 1", "byte 2"),
            row(f"{L} (seed 0)", "0.50 · 0.30", "0.60 · 0.20"), row(f"{L} (seed 2)", "0.50 · 0.30", "0.40 · 0.20"),
    ]:
        assert line in md, line
    assert next(x for x in md if x.startswith("The same by the key's depth (the mean over the 3 copies)."))
    assert "mean over depths and over the 3 copies. The first byte" in next(
        x for x in md if x.startswith("The same samples byte by byte"))

    one = full(copies=[(0.0, 0.0, 0.0)])
    md = report.markdown(one).splitlines()
    assert ("No sample was solved at L = 64 by the copy: that fine-tune did not teach the task within the training "
            "length, so its rows past L say nothing about retrieval there. Raise --passkey-steps (beyond 10).") in md
    assert md[md.index("## Passkey retrieval") + 2].startswith(
        "A copy fine-tuned for 10 steps on passkey samples of 64 bytes (batches of seed 0); a probe at L (40 samples of "
        "its own, every 100 steps) shows how it learned: it learned the task (≥ 0.9 of the probe at L) after 10 steps "
        "and stopped there. Probe accuracy by step: 5 0.50, 10 0.95. Its positional parameters at 100× the learning "
        "rate, as in training.")
    assert row("length", "solved") in md and row(2 * L, "0.00 → 0.30") in md
    digits = next(x for x in md if x.startswith("The same samples byte by byte"))
    assert "the argmax given the true bytes before it, mean over depths. The first byte" in digits
    assert row(L, "0.50 · 0.30", "0.60 · 0.20") in md  # one copy: no seed in the label
    pair = report.markdown(full(copies=[(1.0, 0.5, 0.25), (0.0, 0.0, 0.0)])).splitlines()
    assert row("length", "seed 0", "seed 1", "copies ≥ 0.9 at L") in pair  # two copies are several
    assert [x[:14] for x in pair if x.startswith("* ") and " solved " in x] == ["* Seed 0 solve"]  # the copy that learned
    alone = report.markdown(full(copies=[(1.0, 0.5, 0.25)])).splitlines()
    assert [x[:16] for x in alone if x.startswith("* ") and " solved " in x] == ["* The copy solve"]
    assert "mean over depths and over the 2 copies. The first byte" in next(
        x for x in pair if x.startswith("The same samples byte by byte"))
    close = report.markdown(full(copies=[(1.0, 0.5, 0.3), (0.9, 0.2, 0.1)])).splitlines()
    assert row(L, "1.00", "0.90", "0.95", "0.10", "0.95") in close  # the spread: highest − lowest copy
    assert next(x for x in close if x.startswith("Where each copy's queries that predict the answer bytes attend (40 "
                                                 "samples per length, of their own)"))
    two = full(copies=[(1.0, 0.5, 0.25), (0.0, 0.0, 0.0), (0.0, 0.1, 0.0)])
    assert ("No sample was solved at L = 64 by the copies of seeds 1, 2: those fine-tunes did not teach the task "
            "within the training length, so their rows past L say nothing about retrieval there. Raise "
            "--passkey-steps (beyond 10).") in report.markdown(two).splitlines()


def test_a_bias_moves_past_L_from_a_drift_of_1e_4_nats():
    """Below :data:`DRIFT` a bias drift is float rounding: the bias depends on i − j alone."""
    r = made("fire")
    for drift, moves in ((report.DRIFT, True), (math.nextafter(report.DRIFT, 0), False),
                          (1e-4, True)):  # the documented value
        r.bias_drift = [0.0, drift]
        assert report.bias_moves(r) is moves
    r.bias_drift = None
    assert not report.bias_moves(r)


HURTS = "hurts (the whole interval of Δ is above 0)"


def test_the_summary_gives_each_verdict_with_its_delta():
    """The terminal's lines: each Δ with its interval and verdict, attention past L, the bias's move and
    passkey retrieval (each copy, the copies that learned at L, the far filler hidden)."""
    r = full()
    assert report.summary(r) == [
        f"context past L = {L} (Δ {context_delta(r):+.4f} [+0.0040, +0.0200]): {HURTS}",
        f"distant keys, for tokens that keep local context (Δ +0.0200 [+0.0100, +0.0300]): {HURTS}",
        f"keys beyond L, against a sliding window of L (Δ +0.0150 [+0.0050, +0.0250]): {HURTS}",
        "far tokens through the layers and the bias's move with the query position, at chunk ends where a window of L "
        f"and the cut show the same keys (Δ +2.0e-04 [+1.0e-04, +3.0e-04]): {HURTS}",
        f"attention at distances ≥ L over the last {N // 4} queries: {2.5 * (223.5 - L + 1) / (10 * N):.4f} (largest "
        f"head {4 * (223.5 - L + 1) / (10 * N):.4f})",
        "the bias moves with the query position: up to 0.30 nats at trained distances",
        f"passkey solved (mean of 3 copies, seeds 0, 1, 2; mean over depths): 0.65 (1.00 / 0.95 / 0.00) at L, 0.10 "
        f"(0.25 / 0.05 / 0.00) at {N}; the 2 of 3 copies that solved ≥ 0.9 at L: 0.15 at {N}; far filler hidden: 0.40 "
        f"(0.55 / 0.35 / 0.30) at {N}"]
    one = report.summary(full(copies=[(1.0, 0.5, 0.25)]))[-1]
    assert one == f"passkey solved (one copy; mean over depths): 1.00 at L, 0.25 at {N}; far filler hidden: 0.55 at {N}"
    none = report.summary(full(copies=[(0.5, 0.5, 0.2), (0.0, 0.0, 0.0)]))[-1]
    assert none.endswith(f"0.10 (0.20 / 0.00) at {N}; no copy solved ≥ 0.9 at L; far filler hidden: 0.40 (0.50 / 0.30) "
                         f"at {N}")
    short = full(copies=[(1.0, 0.5, 0.25)])
    short.passkey = {str(L): short.passkey[str(L)]}
    assert report.summary(short)[-1] == (f"passkey solved (one copy; mean over depths): 1.00 at L; none past it (the "
                                         f"grid runs at L, 2 L, … up to the {N}-token window)")


def test_the_rotary_section_names_the_pairs_that_meet_angles_past_training():
    """Each pair's wavelength and angles; the pairs past training named by number and wavelength, or,
    where none is (frequencies a retrofit slowed), how many turned full circles within L."""
    r = made("rope")
    r.rotary = {"wavelength": [6.28, float(L), 400.0, 3000.0, 20000.0], "train_angle": [63.0, 6.2, 0.99, 0.13, 0.02],
                "end_angle": [255.0, 25.0, 4.0, 0.53, 0.08], "unseen": [False, False, True, True, True]}
    md = report.markdown(r).splitlines()
    assert md.index("## Rotary angles past L") > 0 and report.unseen_pairs(r) == [2, 3, 4]
    for line in [row(0, "6", "63.00", "255.00", ""), row(3, "3,000", "0.13", "0.53", "**yes**"),
                 row("pair", "wavelength, tokens", f"angle over {L - 1}", f"angle over {N - 1}", "past training"),
                 "3 of 5 pairs meet angles past L that no distance of training gave them (pairs 2–4, wavelengths "
                 "400–20,000 tokens): there, attention reads rotations the model never learned to read."]:
        assert line in md, line
    # a wavelength of exactly L turned one full circle over the distances 0 … L
    assert f"exceeds L = {L} never turned a full circle in training (3 of 5)" in md[md.index("## Rotary angles past L") + 2]
    r.rotary["unseen"] = [False] * 5
    assert report.unseen_pairs(r) == []
    assert ("No pair meets an angle past what training gave it: 2 of 5 turned full circles within L, and the frequencies "
            "in use keep the others within their trained range.") in report.markdown(r).splitlines()


def test_the_comparison_table_holds_each_diagnosis_numbers():
    """One row per model: its lengths (a retrofit's fine-tune length), perplexity below L and over the
    window's last half, each Δ with its verdict (none (1 layer) through the layers of a one-layer model
    of i − j), attention at distance ≥ L (mean / largest head), the bias's drift, and passkey at L and
    at the window with the copies behind each, and over the copies that learned the task at L; and the
    sentences that read the table, each naming the models it speaks of."""
    a = full()
    b = made("t5", layers=1, copies=[(1.0, 0.75, 0.5)], shift=0.5)
    b.retrofit = {"method": "swap-t5", "to": 2 * L, "finetune_steps": 10}
    b.window_split = [("keys beyond L", -0.02, -0.03, -0.01), ("window − cut", 0.0, -0.01, 0.01),
                      ("at chunk ends", 1e-7, -1e-7, 3e-7)]
    rows = [comparison.row("t5", a), comparison.row("swapped", b)]
    md = comparison.markdown(rows, [a, b]).splitlines()
    ppl = lambda r, part: math.exp(sum(r.loss_by_position[part]) / len(r.loss_by_position[part]))  # noqa: E731
    far_a = (2.5 * (223.5 - L + 1) / (10 * N), 4 * (223.5 - L + 1) / (10 * N))
    far_b = (2.0 * (223.5 - L + 1) / (10 * N), 2.5 * (223.5 - L + 1) / (10 * N))  # one layer, slopes 1.5 and 2.5
    def cell(mean, copies, tail=""):  # a passkey cell: the interval over the copies, 2 depths × 4 samples each
        lo, hi = passkey.copies_interval(copies, 8)
        return f"{mean:.2f} [{lo:.2f}, {hi:.2f}]{tail}"

    assert row("t5", f"{L} → {N}", f"{ppl(a, slice(0, L)):.3f}", f"{ppl(a, slice(N // 2, N)):.3f}",
               f"{context_delta(a):+.4f} [+0.0040, +0.0200] hurts", "+0.0200 [+0.0100, +0.0300] hurts",
               "+0.0150 [+0.0050, +0.0250] hurts", "+2.0e-04 [+1.0e-04, +3.0e-04] hurts",
               f"{far_a[0]:.4f} / {far_a[1]:.4f}", "0.30", cell(0.65, [1.0, 0.95, 0.0], " (3 copies)"),
               cell(0.10, [0.25, 0.05, 0.0], " (3 copies)"), cell(0.15, [0.25, 0.05], " (2 of 3)")) in md
    assert row("swapped", f"{L} (fine-tuned at {2 * L}) → {N}", f"{ppl(b, slice(0, L)):.3f}",
               f"{ppl(b, slice(N // 2, N)):.3f}", f"{context_delta(b):+.4f} no interval", "—",
               "-0.0200 [-0.0300, -0.0100] helps", "none (1 layer)", f"{far_b[0]:.4f} / {far_b[1]:.4f}", "—",
               cell(1.0, [1.0]), cell(0.5, [0.5]), cell(0.5, [0.5], " (1 of 1)")) in md
    assert rows[1]["through_layers"] is None and rows[1]["one_layer_of_offsets"] and rows[0]["through_layers"] == (
        0.0002, 0.0001, 0.0003)
    assert rows[0]["passkey_trials"] == 8 and rows[0]["passkey_hidden"] == {
        2 * L: pytest.approx([0.8, 0.75, 0.3]), 4 * L: pytest.approx([0.55, 0.35, 0.3])}
    assert rows[0]["rotary_unseen"] is None and rows[0]["finetuned_at"] is None and rows[1]["finetuned_at"] == 2 * L
    nearest = "(the verdict nearest to turning: t5, whose interval ends at"
    assert comparison.sentences(rows) == [
        f"The context past L: hurt in t5; cannot be judged (one window) in swapped {nearest} +0.0040).",
        f"For tokens that keep local context, the distant keys: hurt in t5 {nearest} +0.0100).",
        f"Against a sliding window of L, the keys beyond L: hurt in t5; help in swapped {nearest} +0.0050).",
        "At chunk ends, where a window of L and the cut show the same keys, far tokens reaching the query through the "
        f"layers: hurt in t5 {nearest} +1.0e-04).",
        "Attention on distances ≥ L (never seen in the training at L; last quarter of the window) is largest in t5 "
        f"({far_a[0]:.4f}) and smallest in swapped ({far_b[0]:.4f}).",
        "The bias moves with the query position past L in t5 (up to 0.30 nats); in the others it depends on i − j alone, "
        "or there is none.",
        "The passkey copies had learned the task at L (≥ 0.9 of their probe): t5 seed 0 by step 10, t5 seed 1 by step "
        "10; not within 10 steps: t5 seed 2.",
        "Each copy, solved at L → at the window's length: t5 1.00 → 0.25, 0.95 → 0.05, 0.00 → 0.00. Copies that solved "
        "no sample at L (past L they say nothing about retrieval, yet count in their model's mean): t5 seed 2.",
        "Of the copies that solved at least 0.9 at L, solved at the window's length (their mean; what a scheme keeps "
        "past L once a copy has learned the task, whatever share of copies learns it): t5 0.15 (2 of 3).",
        "With the filler past L hidden (the key kept at its distance), the copies that solved at least 0.9 at L solve "
        "at the window's length (as they are → hidden; retrieval that comes back was lost to the far filler, not to "
        "the key's distance): t5 0.15 → 0.45; swapped 0.50 → 0.80.",
        "Passkey retrieval at the window's length, among the models that solve samples at L (mean over copies): best "
        "0.50; models whose interval reaches it: t5, swapped (the interval of a model with several copies runs from "
        "its lowest copy's bound to its highest's). Answer bytes right at the window's length (mean over depths, all "
        "bytes · the first, which needs the key found; a guess among the ten digits scores 0.1, a digit of the key "
        "copied from a random place 0.28): t5 0.46 · 0.90."]


def test_the_report_opens_with_the_model_and_how_it_was_examined():
    """The scheme and its options as ``key=value`` (nothing where there are none), L, the window in
    units of L, the text measured on, and for a fine-tuned retrofit the distances its fine-tune saw."""
    r = made("t5")
    assert report.markdown(r).splitlines()[2] == f"Scheme **t5**, trained at L = {L} tokens; examined at {N} tokens (4 L)."
    r.options = {"num_buckets": 32, "max_distance": 128}
    r.corpus, r.trained_corpus = {"name": "text", "sha256": "aa"}, {"name": "text", "sha256": "aa"}
    r.retrofit = {"method": "swap-t5", "to": 2 * L, "finetune_steps": 10}
    assert report.markdown(r).splitlines()[2] == (
        f"Scheme **t5** (num_buckets=32, max_distance=128), trained at L = {L} tokens; examined at {N} tokens (4 L). "
        "Measured on the validation split of text (sha256 aa), the text the checkpoint was trained on. This checkpoint "
        f"is a retrofit (swap-t5) fine-tuned for 10 steps at {2 * L} tokens: that fine-tune saw distances up to "
        f"{2 * L - 1}, so below, 'never seen in training' means in the original training at L = {L}.")
    r.retrofit["finetune_steps"] = 0
    assert report.retrofit_line(r) == ""


def test_the_comparison_at_its_boundaries(saved_figures):
    """Two copies are several (each copy said, counted in the cell, a column over the copies that
    learned, a band drawn); a drift of exactly DRIFT moves; with one model measured at distance ≥ L there
    is no largest and smallest to name, and with several they are ranked by the mean over heads, not by
    the largest head; the rotary pairs past training counted of all."""
    a = made("alibi", copies=[(1.0, 0.5, 0.25), (0.95, 0.45, 0.05)])
    a.bias_drift = [0.0, report.DRIFT]
    b = made("t5")
    del b.attention_distance["beyond"]
    said = comparison.sentences([comparison.row("alibi", a), comparison.row("t5", b)])
    assert not [x for x in said if x.startswith("Attention on distances ≥ L")]
    assert ("The bias moves with the query position past L in alibi (up to 0.00 nats); in the others it depends on "
            "i − j alone, or there is none.") in said
    assert next(x for x in said if x.startswith("Each copy, solved at L → at the window's length: alibi 1.00 → 0.25, "
                                                "0.95 → 0.05."))
    pair = comparison.row("alibi", a)
    assert comparison._passkey(pair, L).endswith(" (2 copies)") and comparison._several([pair])
    comparison.plot([("alibi", a), ("t5", b)], Path("pair.png"))
    assert [x.get_label() for x in saved_figures["pair.png"].axes[2].get_lines()][:1] == ["alibi, 2 copies"]
    band, = saved_figures["pair.png"].axes[2].collections
    corners = {(round(float(x), 6), round(float(y), 6)) for x, y in band.get_paths()[0].vertices}
    assert corners == {(1.0, 0.95), (2.0, 0.45), (4.0, 0.05), (1.0, 1.0), (2.0, 0.5), (4.0, 0.25)}

    perfect = {**comparison.row("t5", made("t5", copies=[(1.0, 1.0, 1.0)])), "model": "perfect"}
    assert "best 1.00; models whose interval reaches it: perfect " in next(  # its interval ends at its mean
        x for x in comparison.sentences([perfect, comparison.row("alibi", a)]) if x.startswith("Passkey retrieval at"))
    wide = made("fire", layers=1, heads=1, shift=2.5)  # one head: its mean is its largest, between t5's two
    said = comparison.sentences([comparison.row("t5", full()), comparison.row("fire", wide)])
    assert next(x for x in said if x.startswith("Attention on distances ≥ L")).endswith(
        f"is largest in fire ({3.5 * (223.5 - L + 1) / (10 * N):.4f}) and smallest in t5 "
        f"({2.5 * (223.5 - L + 1) / (10 * N):.4f}).")
    rope = made("rope")
    rope.rotary = {"wavelength": [6.0, 400.0, 3000.0], "train_angle": [63.0, 1.0, 0.1], "end_angle": [255.0, 4.0, 0.5],
                   "unseen": [False, True, True]}
    assert ("Rotary pairs that meet angles past L never seen in the training at L: 2 of 3 in rope."
            in comparison.sentences([comparison.row("rope", rope), comparison.row("t5", b)]))

def test_a_delta_and_its_verdict_at_their_boundaries():
    """A Δ prints to 4 decimals unless all of it (Δ and both ends) is under 0.0005 in size; a verdict
    needs the whole interval on one side of 0: an end at exactly 0 spans it."""
    assert report.delta_cell(5e-4, None, None) == "+0.0005"
    assert report.delta_cell(math.nextafter(5e-4, 0), None, None) == "+5.0e-04"
    assert report.delta_cell(0.01, 0.0001, 0.02) == "+0.0100 [+0.0001, +0.0200]"  # one end small: still 4 decimals
    assert report.delta_cell(-2e-4, -3e-4, -1e-4) == "-2.0e-04 [-3.0e-04, -1.0e-04]"
    assert [report.verdict(*ends) for ends in ((0.0, 0.1), (-0.1, 0.0), (1e-9, 0.1), (-0.1, -1e-9), (None, None))] == [
        "≈ 0", "≈ 0", "hurts", "helps", "no interval"]


@pytest.mark.parametrize("n,k", [(10, 4), (12, 4), (5, 1)])
def test_run_positions_are_the_mean_position_of_each_run_smoothed_keeps(n, k):
    """Each figure point sits at the mean position of the run :func:`smoothed` averaged; a last run
    short of ``k`` is dropped by both, so points and values always pair up."""
    values = torch.arange(n, dtype=torch.float64)
    xs = report.run_positions(n, k)
    assert xs.tolist() == [i * k + (k - 1) / 2 for i in range(n // k)]
    assert torch.equal(xs, report.smoothed(values, k))


def test_the_shared_report_sentences_at_their_edges(tmp_path):
    """The pieces every report shares (``posbias.report``), each at its edges: a copy judged by the
    far-filler sentences once it solved exactly :data:`passkey.LEARNED` at L and lost at least ``LOST``
    past L (a copy below L's bar, or that lost less, is not); the filler named where hiding it gives back
    half the loss or more, exactly half included; a verdict's end that sits on the null is not beyond it;
    the shuffled-key score of five digits; the sentence of a checkpoint that records no text; and a
    replaced report whose field was a dict and is now a plain value."""
    from posbias.report import corpus_line, facing_end, far_filler_sentences, note_replaced, shuffled_key_score

    lost = lambda a, b, h: (f"c solved {a:.2f} at L and {b:.2f} at 4096; with the far filler hidden {h:.2f}: it lost "
                            f"{a - b:.2f} past L, ")
    filler = "most of it to the filler past L, not to the key's distance"
    said = far_filler_sentences([("c", passkey.LEARNED, 0.4, 0.9), ("c", 1.0, 0.75, 0.875), ("c", 1.0, 0.75, 0.85),
                                 ("c", 1.0, 0.875, 0.875), ("c", 1.0, 0.9375, 1.0), ("c", 0.5, 0.0, 0.5)], "at 4096")
    assert said == [lost(0.9, 0.4, 0.9) + filler + " (hiding gives back 0.50).",  # solved exactly LEARNED at L
                    lost(1.0, 0.75, 0.875) + filler + " (hiding gives back 0.12).",  # 0.125 of 0.25: half
                    lost(1.0, 0.75, 0.85) + "most of it not to the filler past L: to the key's distance itself, or "
                    "what far positions do to it (hiding gives back 0.10).",  # 0.1 of 0.25: less than half
                    lost(1.0, 0.875, 0.875) + "most of it not to the filler past L: to the key's distance itself, or "
                    "what far positions do to it (hiding gives back 0.00)."]  # lost 0.125 ≥ 0.1: judged
    assert facing_end(1.0, 2.0, 0.0) == 1.0 and facing_end(-2.0, -1.0, 0.0) == -1.0
    assert facing_end(0.0, 0.5, 0.0) == 0.5  # an end on the null is not above it
    assert shuffled_key_score() == shuffled_key_score(5) == pytest.approx((1 + 4 * passkey.GUESS) / 5)
    assert shuffled_key_score() == pytest.approx(0.28)
    assert corpus_line({"name": "tiny", "sha256": "ab"}, None) == ("Measured on the validation split of tiny (sha256 ab); "
                                                                   "the checkpoint does not record the text it was trained on.")
    said = []
    (tmp_path / "results.json").write_text('{"study": {"steps": 2}, "corpus": "x"}')
    note_replaced(tmp_path / "results.json", {"study": 5, "corpus": "x"}, ("study", "corpus"), "another study",
                  said.append)
    assert said == [f"note: {tmp_path} held the report of another study with other study; this run's report replaces it "
                    "(that run's models and caches stay: re-running its command rewrites its report)"]
