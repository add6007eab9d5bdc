import argparse
import errno
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _helpers import TINY_L, figures_drawn, one_line_error, tiny_checkpoint

from posbias import build
from posbias.cli import build_parser, main
from posbias.schemes.t5 import bucket_table
from posbias.stopping import Terminated


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("t5", "alibi", "kerple-log", "fire", "rope", "offset", "nope", "sinusoidal"):
        assert name in out


def test_show_t5_table(capsys):
    assert main(["show", "t5", "--num-buckets", "32", "--max-distance", "128"]) == 0
    out = capsys.readouterr().out
    assert "32 buckets (n_b + 1 = 32, so n_b = 31)" in out
    assert "      26  59-66  (8)" in out  # offset 64 -> bucket 26 (Raffel et al.'s bucket function)
    assert "      31  >= 113" in out


def test_show_bidirectional_t5_counts_the_buckets_of_each_direction(capsys):
    """A bidirectional table of 32 splits into 16 buckets per direction, 8 of them one-to-one; the counts
    are printed as integers."""
    assert main(["show", "t5", "--num-buckets", "32", "--max-distance", "128", "--bidirectional"]) == 0
    out = capsys.readouterr().out
    assert "one-to-one for offsets < 8;" in out
    assert "bidirectional: 16 buckets per direction; keys after the query (j > i) add 16" in out
    from posbias.schemes.t5 import check_t5

    with pytest.raises(ValueError, match=r"must exceed the one-to-one region of 8 buckets for num_buckets=32\)"):
        check_t5(32, 8, True)


def test_show_t5_offsets_names_each_region_at_its_edges(capsys):
    """The region of each offset at the edges of the one-to-one, log and final regions (16 one-to-one
    buckets of 32; the final bucket from 113), a key after the query masked in a causal table, and the
    same offsets read as their own direction in a bidirectional one (8 one-to-one per direction, the
    final bucket from 91). A
    masked offset reads no bucket, so it is not said to share one."""
    def regions(*extra):
        assert main(["show", "t5", "--heads", "1", *extra, "--offsets", "-3", "0", "7", "8", "15", "16", "112",
                     "113"]) == 0
        lines = capsys.readouterr().out.splitlines()
        table = {int(line.split()[0]): line.split()[2] for line in lines
                 if len(line.split()) == 4 and line.split()[0].lstrip("-").isdigit()}
        return table, lines

    table, lines = regions()
    assert table == {-3: "(masked)", 0: "one-to-one", 7: "one-to-one", 8: "one-to-one", 15: "one-to-one", 16: "log",
                     112: "log", 113: "final"}
    assert not any("share bucket 0" in line for line in lines)  # -3 (masked) and 0: no shared scalar
    table, lines = regions("--bidirectional")
    assert table == {-3: "one-to-one", 0: "one-to-one", 7: "one-to-one", 8: "log", 15: "log", 16: "log", 112: "final",
                     113: "final"}  # 16 buckets a direction: the final one from 91


def test_bucket_table_worked_example():
    assert bucket_table(4, 5) == [(0, 0, 0), (1, 1, 1), (2, 2, 3), (3, 4, None)]


@pytest.mark.parametrize("argv, msg", [
    (["show", "t5", "--num-buckets", "1"], "--num-buckets must be >= 2, got 1"),
    (["show", "t5", "--max-distance", "8"], "--max-distance must be >= 17, got 8"),
    (["show", "t5", "--bogus", "1"], "has no option --bogus"),
    (["show", "t5", "--num-buckets", "many"], "--num-buckets must be an integer (scheme 't5'), got 'many'"),
    (["show", "nosuch"], "unknown scheme 'nosuch'"),
    (["show", "alibi", "--heads", "0"], "--heads must be >= 1, got 0"),
    (["show", "rope", "--head-dim", "15"], "even head_dim"),
    (["show", "rope", "--scaling", "yarn", "--factor", "4"], "--scaling='yarn' needs --train-len"),
    (["show", "t5", "--max-distance", "3"], "--max-distance must be >= 17, got 3"),
    (["plot", "--schemes", "t6"], "unknown scheme 't6'"),
    (["plot", "--schemes", "t5@max_distance=3"], "scheme t5@max_distance=3: max_distance must be >= 17, got 3"),
    (["plot", "--schemes", "t5@max_distnce=64"], "scheme 't5' has no option max_distnce"),
    (["show", "t5@max_distance=64", "--max-distance", "32"],
     "option --max-distance is given twice: in the label (--max-distance=64) and again (--max-distance=32)"),
    (["show", "t5@max_distance=8"], "--max-distance must be >= 17, got 8"),
    (["show", "t5@"], "has '@' but no KEY=VALUE"),
    (["show", "fire", "--query-pos", "5", "--offsets", "10"], "--offsets 10 puts the key before position 0"),
    (["show", "fire", "--query-pos", "-1"], "--query-pos must be a position in [0, 9223372036854775807], got -1"),
    (["show", "fire", "--query-pos", str(2**64)], f"--query-pos must be a position in [0, 9223372036854775807], got {2**64}"),
    # |−2⁶³| wraps to itself in int64: FIRE's bias there was NaN and ALiBi's of the wrong sign; 2⁶⁴ overflowed
    (["show", "fire", "--offsets", str(-2**63)], f"--offsets {-2**63} is out of range; valid: -9223372036854775807 ... "),
    (["show", "alibi", "--offsets", "3", str(2**64)], f"--offsets {2**64} is out of range; valid: -9223372036854775807"),
    (["show", "t5", "--query-pos", "5"], "'t5' depends on i − j alone"),
    (["extrapolate", "--scheme-option", "t5.max_distance=64", "--scheme-option", "t5.max_distance=32"],
     "--scheme-option: scheme 't5': option max_distance is given twice (64 and '32')"),
    (["extrapolate", "--schemes", "t5@max_distance=64,max_distance=32"], "option max_distance is given twice"),
    (["extrapolate", "--scheme-option", "t5max_distance=64"], "--scheme-option 't5max_distance=64' must look like "
                                                               "SCHEME.KEY=VALUE, e.g. t5.max_distance=64"),
    (["extrapolate", "--scheme-option", "t5.max_distance"], "--scheme-option 't5.max_distance' must look like"),
    (["plot", "--num-buckets", "1"], "--num-buckets must be >= 2, got 1"),
    (["plot", "--num-buckets", "2"], "--num-buckets must be >= 4, got 2 (the count n_b + 1; the bidirectional map needs"),
    (["plot", "--num-buckets", "8", "--max-distance", "3"], "--max-distance must be >= 5, got 3"),
    (["plot", "--seed", "-3"], "--seed must be an integer in [0, 4294967295], got -3"),
    (["show", "fire", "--seed", str(2**64)], f"--seed must be an integer in [0, 4294967295], got {2**64}"),
    (["show", "rope", "--base", "1"], "--base must be > 1"),
    (["extrapolate", "--data", "a.txt", "--hf-dataset", "wikitext"], "--hf-dataset not allowed with argument --data"),
    (["diagnose", "x", "--hf-dataset", "wikitext", "--data", "a.txt"], "--data not allowed with argument --hf-dataset"),
])
def test_cli_errors_are_one_line(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and "\n" not in err and "Traceback" not in err


def test_plot_writes_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    assert main(["plot", "--out", str(tmp_path), "--heads", "4", "--max-plot-distance", "64"]) == 0
    names = {p.name for p in tmp_path.glob("*.png")}
    assert {"t5_bucket_map.png", "t5_vs_alibi.png", "bias_vs_distance.png", "heatmap_alibi.png"} <= names
    for p in tmp_path.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_console_script_exit_code():
    r = subprocess.run([sys.executable, "-m", "posbias.cli", "show", "t5", "--num-buckets", "0"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_import_is_light():
    code = ("import sys, posbias; bad = [m for m in ('matplotlib', 'transformers') if m in sys.modules];"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_output_piped_into_head_stops_quietly():
    r = subprocess.run(f"{sys.executable} -m posbias.cli show alibi --heads 4 | head -1", shell=True,
                       capture_output=True, text=True)
    assert "Traceback" not in r.stderr and r.stdout.startswith("alibi")


def test_a_line_reaches_a_pipe_when_it_is_said(tmp_path):
    """A job piped into ``tee`` shows each line as it is said, not when the job ends or 8 KB have
    gathered in Python's buffer: here a child says one line, then waits until a file appears, and the
    line must reach the pipe while it waits (the one flush=True no in-process test can see). The child
    runs without PYTHONUNBUFFERED, which some machines set and which would hide the fault."""
    import select

    go = tmp_path / "go"
    code = ("import os, time; from posbias.cli import say; say('first')\n"
            f"while not os.path.exists({str(go)!r}): time.sleep(0.02)\n"
            "say('last')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # (as a user's shell has it)
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env) as p:
        try:
            assert select.select([p.stdout], [], [], 60)[0], "nothing reached the pipe while the job ran"
            assert p.stdout.readline() == "first\n"
        finally:
            go.touch()
            p.wait(60)
        assert p.stdout.read() == "last\n" and p.returncode == 0


def test_help_shows_defaults_presets_and_scheme_options(capsys):
    for argv, needles in [
        (["extrapolate", "--help"], ["default runs/study", "presets (flags override them)", "about 6 min",
                                     "results.md", "--scheme-option", "default 100"]),
        (["show", "--help"], ["scheme options:", "--max-distance (an integer, default 128)", "--clip (true/false"]),
        (["show", "t5", "--help"], ["and the bucket each falls in"]),
        (["plot", "--help"], ["(default: plots)"]),
        (["--version"], ["posbias 0.1.0"]),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
        out = capsys.readouterr().out
        for n in needles:
            assert n in " ".join(out.split()), (argv, n)
    with pytest.raises(SystemExit):
        main(["show", "alibi", "--help"])
    assert "bucket" not in capsys.readouterr().out  # buckets are T5's


@pytest.mark.parametrize("command", ["list", "show", "plot", "extrapolate", "retrofit", "diagnose"])
def test_every_help_text_reads_as_written(capsys, command):
    """No escaped percent sign left in a help text (argparse formats ``help=`` strings with ``%`` but
    not descriptions: ``95%%`` there reached the user as written), no unfilled ``%(default)s``, and no
    default that says nothing (a yes/no flag off, an option with none)."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "%%" not in out and "%(" not in out
    assert "(default: False)" not in out and "(default: None)" not in out


def test_every_option_says_what_it_does():
    """Every flag of every subcommand (and of each ``show SCHEME``) has a help text."""
    def parsers(p):
        yield p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for child in a.choices.values():
                    yield from parsers(child)

    flags = [(p, a) for p in parsers(build_parser()) for a in p._actions
             if a.option_strings and a.option_strings[0] not in ("-h", "--version")]
    assert [(p.prog, a.option_strings[0]) for p, a in flags if not a.help] == []
    for p, a in flags:  # the default named once: by the text or by the formatter, not both
        text = p._get_formatter()._expand_help(a)
        assert text.count("default") <= 1, (p.prog, a.option_strings[0], text)


@pytest.fixture()
def figures(monkeypatch):
    """Capture every figure a plotting function saves."""
    import posbias.plot as P

    saved, orig = [], P.save_figure
    monkeypatch.setattr(P, "save_figure", lambda fig, path: (saved.append(fig), orig(fig, path))[1])
    return saved


def test_bias_curves_shade_the_distances_no_training_pair_had(figures, tmp_path):
    """Given the training length, each panel shades distances ≥ L (both signs for a bidirectional T5);
    a panel whose L is unknown (a Hugging Face model) or beyond the plot is left plain, and the title says
    what the shading means."""
    from posbias import build
    from posbias.plot import plot_bias_curves

    schemes = [build(name, n_heads=2, head_dim=8, **kw) for name, kw in (("t5", {"bidirectional": True}), ("alibi", {}),
                                                                       ("offset", {}))]
    plot_bias_curves(schemes, tmp_path / "c.png", max_distance=256, trained=[64, 128, None], log_distance=True)
    fig = figures[-1]
    spans = [[(p.get_x(), p.get_x() + p.get_width()) for p in ax.patches] for ax in fig.axes[:3]]
    assert spans == [[(64, 256), (-256, -64)], [(128, 256)], []]
    assert [ax.get_xlabel() for ax in fig.axes[:2]] == ["distance i − j (log scale); < 0: keys after the query",
                                                       "distance i − j (log scale)"]
    assert "shaded: distances ≥ each model's L, which no training pair had" in fig._suptitle.get_text()
    plot_bias_curves(schemes[1:], tmp_path / "c.png", max_distance=100, trained=64)
    assert [len(ax.patches) for ax in figures[-1].axes[:2]] == [1, 1]
    assert figures[-1]._suptitle.get_text().endswith("shaded: distances ≥ L = 64, which no training pair had")
    plot_bias_curves(schemes[1:], tmp_path / "c.png", max_distance=32, trained=64)  # L past the plot: nothing
    assert [len(ax.patches) for ax in figures[-1].axes[:2]] == [0, 0] and "shaded" not in figures[-1]._suptitle.get_text()
    plot_bias_curves([schemes[1], build("fire", n_heads=2, head_dim=8)], tmp_path / "c.png", max_distance=100)
    assert [ax.get_title() for ax in figures[-1].axes[:2]] == ["alibi", "fire (query at position 100)"]


@pytest.mark.parametrize("bidirectional", [False, True])
def test_bucket_map_draws_every_offsets_bucket_and_its_regions(figures, tmp_path, bidirectional):
    """The bucket map's step line is ``t5_bucket`` at every offset up to ``span`` (both signs when
    bidirectional); the shaded one-to-one region ends at the first offset that shares its bucket,
    the dashed line sits at ±max_distance, and the title names the settings."""
    from posbias import t5_bucket
    from posbias.plot import plot_bucket_map

    nb, md = 16, 40
    plot_bucket_map(tmp_path / "b.png", num_buckets=nb, max_distance=md, bidirectional=bidirectional)
    plot_bucket_map(tmp_path / "s.png", num_buckets=nb, max_distance=md, bidirectional=bidirectional, span=100)
    for fig, span in zip(figures, (2 * md, 100)):
        ax = fig.axes[0]
        [line, *dashed] = ax.get_lines()
        off = torch.arange(-span if bidirectional else 0, span + 1)
        want = t5_bucket(off, num_buckets=nb, max_distance=md, bidirectional=bidirectional)
        assert line.get_drawstyle() == "steps-post" and line.get_xdata().tolist() == off.tolist()
        assert line.get_ydata().tolist() == want.tolist()
        assert sorted(x for ln in dashed for x in ln.get_xdata()) == ([-md, -md, md, md] if bidirectional else [md, md])
        forward = want[off >= 0]
        exact = int((forward[1:] == forward[:-1]).nonzero()[0])  # the first offset sharing its bucket
        spans = sorted((p.get_x(), p.get_x() + p.get_width()) for p in ax.patches)
        assert spans == ([(-exact, 0), (0, exact)] if bidirectional else [(0, exact)])
        assert f"one-to-one (offsets < {exact})" in [t.get_text() for t in ax.get_legend().get_texts()]
        kind = "bidirectional" if bidirectional else "causal"
        assert ax.get_title() == f"T5 bucket map ({kind}): num_buckets = {nb} (n_b + 1), max_distance = {md}"
        assert ax.get_ylim()[1] >= int(want.max())


def test_t5_vs_alibi_draws_each_pairs_bucket_and_penalty(figures, tmp_path):
    """The textbook's side-by-side: left, the T5 bucket of every causal pair (labelled ``u_b``), right
    ALiBi's ``−m·(i − j)``; pairs with a key after the query are blank on both."""
    from posbias import t5_bucket
    from posbias.plot import plot_t5_vs_alibi

    n, nb, md, m = 12, 8, 10, 0.25
    plot_t5_vs_alibi(tmp_path / "x.png", length=n, num_buckets=nb, max_distance=md, slope=m)
    left, right = figures[0].axes[:2]
    pos = torch.arange(n)
    off = pos[:, None] - pos[None, :]
    later = off < 0
    buckets = torch.as_tensor(left.get_images()[0].get_array().filled(float("nan")))
    penalty = torch.as_tensor(right.get_images()[0].get_array().filled(float("nan")))
    want_buckets = t5_bucket(off, num_buckets=nb, max_distance=md).float()
    for drawn, want in ((buckets, want_buckets), (penalty, -m * off.float())):
        assert torch.equal(drawn.isnan(), later)
        assert torch.equal(drawn[~later], want[~later])
    labels = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in left.texts}
    assert len(labels) == n * (n + 1) // 2 and labels[(11, 0)] == f"u{int(want_buckets[11, 0])}"
    values = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in right.texts}
    assert values[(5, 5)] == "0" and values[(11, 0)] == f"{-m * 11:.1f}" and len(values) == len(labels)
    assert f"num_buckets={nb}, max_distance={md}" in left.get_title() and f"m = {m}" in right.get_title()
    plot_t5_vs_alibi(tmp_path / "x.png")  # the textbook's figure: 16 tokens, each pair labelled
    left = figures[1].axes[0]
    assert len(left.texts) == 16 * 17 // 2 and left.get_images()[0].get_array().shape == (16, 16)
    plot_t5_vs_alibi(tmp_path / "x.png", length=17)  # more would not be readable: the colours alone
    assert not figures[2].axes[0].texts and not figures[2].axes[1].texts


def test_bucket_maps_default_is_the_default_t5s(figures, tmp_path):
    """``plot_bucket_map()`` without settings draws the buckets of ``build("t5")`` (SPEC: 32 buckets,
    max_distance 128, causal), up to twice max_distance."""
    from posbias.plot import plot_bucket_map

    t5 = build("t5", n_heads=1, head_dim=8)
    plot_bucket_map(tmp_path / "b.png")
    line = figures[0].axes[0].get_lines()[0]
    off = torch.arange(0, 2 * t5.max_distance + 1)
    assert line.get_xdata().tolist() == off.tolist()
    assert line.get_ydata().tolist() == t5.buckets(off).tolist()


def test_heatmap_panels_four_to_a_row_for_the_first_max_heads(figures, tmp_path):
    """Up to ``max_heads`` heads (8 by default), four panels to a row, the unused ones of the last row
    blank; each panel draws its own head's bias (head h's ALiBi slope), and the note ends the title."""
    from posbias.plot import plot_bias_heatmaps

    for heads, max_heads, drawn, grid in [(6, 8, 6, (2, 4)), (2, 8, 2, (1, 2)), (12, 8, 8, (2, 4)), (12, 5, 5, (2, 4))]:
        s = build("alibi", n_heads=heads, head_dim=8)
        kw = {} if max_heads == 8 else {"max_heads": max_heads}  # 8: the default
        plot_bias_heatmaps(s, tmp_path / "h.png", length=10, note=" [note]", **kw)
        fig = figures[-1]
        panels = [ax for ax in fig.axes if ax.get_images() and ax.get_title().startswith("head")]
        assert [ax.get_title() for ax in panels] == [f"head {h}" for h in range(drawn)]
        assert fig.axes[0].get_gridspec().get_geometry() == grid
        assert sum(not ax.axison for ax in fig.axes) == grid[0] * grid[1] - drawn
        with torch.no_grad():
            bias = s.bias(torch.arange(10), torch.arange(10))
        for h, ax in enumerate(panels):
            assert float(ax.get_images()[0].get_array()[9, 0]) == pytest.approx(float(bias[h, 9, 0]))
        assert fig._suptitle.get_text().endswith("(10 tokens) [note]")


def test_long_heatmap_axes_count_in_thousands(figures, tmp_path):
    """From 10,000 tokens the axes read 250k, not 250000 (which run into each other); below, plain."""
    from posbias.plot import plot_bias_heatmaps

    s = build("alibi", n_heads=1, head_dim=8)
    for length, want in ((10**6, "250k"), (10_000, "2.5k"), (9_999, "2500")):
        plot_bias_heatmaps(s, tmp_path / "h.png", length=length)
        ax = figures[-1].axes[0]
        assert ax.xaxis.get_major_formatter()(2500 if length < 10**6 else 250_000, 0) == want


def test_a_figure_is_written_in_the_format_its_name_says(tmp_path):
    """``save_figure``: the file's suffix picks the format (PNG without one), its folders are created,
    and the figure is closed."""
    from posbias.plot import pyplot, save_figure

    plt = pyplot()
    for name, magic in (("a/b/f.png", b"\x89PNG"), ("f.svg", b"<?xml"), ("f", b"\x89PNG"), ("f.pdf", b"%PDF")):
        fig, ax = plt.subplots()
        ax.plot([0, 1], [1, 0])
        assert save_figure(fig, tmp_path / name) == tmp_path / name
        assert (tmp_path / name).read_bytes().startswith(magic) and not plt.fignum_exists(fig.number)


@pytest.mark.parametrize("axis", ["y", "x"])
def test_log_ticks_by_range(figures, tmp_path, axis):
    """Over less than a factor of 3 every integer mantissa gets a tick; over a wider range (or an axis
    from 0) only 1, 2, 3 and 5 of each decade."""
    from matplotlib.ticker import LogLocator

    from posbias.plot import plain_log_ticks, pyplot

    plt = pyplot()
    every, some = [1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 5]
    for lo, hi, subs in ((6, 11, every), (0.5, 1.2, every), (2, 5.9, every), (2, 6, some), (1, 300, some)):
        fig, ax = plt.subplots()
        (ax.set_ylim if axis == "y" else ax.set_xlim)(lo, hi)
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
        plain_log_ticks(ax, axis)
        target = ax.yaxis if axis == "y" else ax.xaxis
        locator = target.get_major_locator()
        assert isinstance(locator, LogLocator) and list(locator._subs) == subs
        assert target.get_major_formatter()(20, 0) == "20" and target.get_minor_formatter()(7, 0) == ""
        other = ax.xaxis if axis == "y" else ax.yaxis
        assert not isinstance(other.get_major_locator(), LogLocator)
        plt.close(fig)


def test_bias_curves_three_panels_to_a_row_with_one_legend(figures, tmp_path):
    """Additive schemes only, three panels to a row (the rest blank), one line per head with each
    panel's bias by distance; the head legend on the first panel alone, and none past 8 heads."""
    from posbias.plot import plot_bias_curves

    schemes = [build(n, n_heads=2, head_dim=8) for n in ("alibi", "rope", "t5", "offset", "kerple-log")]
    plot_bias_curves(schemes, tmp_path / "c.png", max_distance=40)
    fig = figures[-1]
    assert fig.axes[0].get_gridspec().get_geometry() == (2, 3)
    shown = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title() for ax in shown] == ["alibi", "t5", "offset", "kerple-log"]
    assert [ax.get_legend() is not None for ax in shown] == [True, False, False, False]
    for ax, s in zip(shown, [schemes[0], *schemes[2:]]):
        want = s.bias_by_distance(torch.arange(0, 41))
        assert [ln.get_ydata().tolist() for ln in ax.get_lines()] == want.tolist()
    plot_bias_curves(schemes[2:], tmp_path / "c.png", max_distance=40)  # three: one full row
    assert figures[-1].axes[0].get_gridspec().get_geometry() == (1, 3) and all(ax.axison for ax in figures[-1].axes)
    plot_bias_curves([build("alibi", n_heads=8, head_dim=8)], tmp_path / "c.png", max_distance=40)
    assert [t.get_text() for t in figures[-1].axes[0].get_legend().get_texts()] == [f"head {h}" for h in range(8)]
    plot_bias_curves([build("alibi", n_heads=9, head_dim=8)], tmp_path / "c.png", max_distance=40)
    assert figures[-1].axes[0].get_legend() is None and len(figures[-1].axes[0].get_lines()) == 9


def test_rotary_wavelengths_draw_each_scalings_pairs(figures, tmp_path):
    """Left: plain RoPE's wavelengths 2π/θ_k once per (base, head size), naming the unscaled schemes
    it stands for, then each scaled scheme's 2π/θ′_k (dynamic NTK at factor · train_len) and its L as a
    horizontal line; right: the stretch θ_k/θ′_k against a line at 1."""
    from posbias.plot import plot_rotary_wavelengths
    from posbias.schemes.rope import rope_frequencies

    schemes = [build("rope", n_heads=2, head_dim=16), build("rope", n_heads=2, head_dim=16, scaling="pi", factor=4.0),
               build("rope", n_heads=2, head_dim=16, scaling="dynamic-ntk", factor=2.0, train_len=64)]
    plot_rotary_wavelengths(schemes, tmp_path / "w.png", names=["plain", "pi4", "dyn"], trained=[None, 128, None])
    left, right = figures[0].axes[:2]
    plain = rope_frequencies(16, 10000.0)
    lines = {ln.get_label(): ln.get_ydata() for ln in left.get_lines() if not ln.get_label().startswith("_")}
    assert list(lines) == ["plain RoPE (base 10000, 8 pairs): plain", "pi4", "dyn at 128 tokens"]
    assert torch.allclose(torch.as_tensor(lines["plain RoPE (base 10000, 8 pairs): plain"]), 2 * torch.pi / plain)
    assert torch.allclose(torch.as_tensor(lines["pi4"]), 4 * 2 * torch.pi / plain)
    used = schemes[2].effective_frequencies(128)
    assert torch.allclose(torch.as_tensor(lines["dyn at 128 tokens"]), 2 * torch.pi / used)
    assert float(used[0]) == pytest.approx(float(plain[0])) and float(used[-1]) < float(plain[-1])
    stretches = [ln.get_ydata() for ln in right.get_lines()]
    assert torch.allclose(torch.as_tensor(stretches[0]), torch.full((8,), 4.0, dtype=torch.float64))
    assert torch.allclose(torch.as_tensor(stretches[1]), (plain / used))
    assert list(stretches[2]) == [1.0, 1.0]  # the unstretched line
    flat = sorted(float(ln.get_ydata()[0]) for ln in left.get_lines() if ln.get_label().startswith("_"))
    assert flat == [64.0, 128.0]  # the dynamic scheme's train_len and the PI scheme's given L


def test_heatmaps_share_one_colour_scale(figures, tmp_path):
    from posbias import build
    from posbias.plot import plot_bias_heatmaps

    plot_bias_heatmaps(build("alibi", n_heads=4, head_dim=8), tmp_path / "h.png", length=16)
    clims = {im.get_clim() for ax in figures[0].axes for im in ax.get_images()}
    assert len(clims) == 1 and len([im for ax in figures[0].axes for im in ax.get_images()]) == 4


@pytest.mark.parametrize("name", ["alibi", "fire"])
def test_long_heatmaps_draw_exact_values_at_spread_positions(figures, tmp_path, name):
    """Past 512 tokens a heatmap draws 512 evenly spread positions per axis, each pixel the exact bias of
    its pair (FIRE's reads the query position), the axes in true positions: 10^6 tokens draw as fast as
    512 (8 heads at 2,048 took 52 s and 1.5 GB before; 100,000 could not be allocated)."""
    from posbias import build
    from posbias.plot import HEATMAP_POSITIONS, heatmap_positions, plot_bias_heatmaps

    assert torch.equal(heatmap_positions(300), torch.arange(300))
    pos = heatmap_positions(10**6)
    assert len(pos) == HEATMAP_POSITIONS == 512 and pos[0] == 0 and pos[-1] == 10**6 - 1
    assert bool((pos.diff() > 0).all())
    torch.manual_seed(0)
    s = build(name, n_heads=2, head_dim=8)
    plot_bias_heatmaps(s, tmp_path / "h.png", length=10**6)
    [image, *_] = figures[0].axes[0].get_images()
    drawn = torch.as_tensor(image.get_array().filled(float("nan")))
    with torch.no_grad():
        want = s.bias(pos, pos)[0].float().masked_fill(torch.ones(512, 512, dtype=torch.bool).triu(1), float("nan"))
    assert drawn.shape == (512, 512) and torch.equal(drawn.isnan(), want.isnan())
    assert torch.equal(drawn.nan_to_num(), want.nan_to_num())
    assert image.get_extent() == [-0.5, 10**6 - 0.5, 10**6 - 0.5, -0.5]
    assert "(1000000 tokens, 512 positions drawn per axis)" in figures[0]._suptitle.get_text()


def test_retrofit_plot_one_colour_per_method(figures, tmp_path):
    from posbias.report.retrofit import plot as plot_retrofit

    rows = [{"method": m, "stage": st, "ppl": {"16": 5.0 + k, "32": 6.0 + k}}
            for k, (m, st) in enumerate([("original", "before"), ("pi", "no fine-tune"), ("pi", "fine-tuned 10"),
                                         ("swap-alibi", "no fine-tune"), ("swap-alibi", "fine-tuned 10")])]
    plot_retrofit({"rows": rows, "train_len": 16, "to": 32}, tmp_path / "r.png")
    lines = [ln for ln in figures[0].axes[0].get_lines() if not ln.get_label().startswith("training")]
    colour = {}
    for ln in lines:
        colour.setdefault(ln.get_label().split(" (")[0], set()).add(ln.get_color())
    assert all(len(c) == 1 for c in colour.values()) and len({next(iter(c)) for c in colour.values()}) == 3
    styles = {ln.get_label(): ln.get_linestyle() for ln in lines}
    assert styles["pi (no fine-tune)"] == "--" and styles["pi (fine-tuned 10)"] == "-"


def test_log_axis_has_plain_tick_labels(figures, tmp_path):
    from posbias.plot import plain_log_ticks, pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([1, 2], [6, 11])
    ax.set_yscale("log")
    plain_log_ticks(ax)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert {"6", "7", "8", "9", "10"} <= set(labels) and not any("times" in x or "^" in x for x in labels)
    save_figure(fig, tmp_path / "t.png")


def test_plot_skips_schemes_without_a_bias_and_says_so(tmp_path, capsys):
    assert main(["plot", "--schemes", "sinusoidal", "nope", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "skipping sinusoidal (absolute: no attention bias to draw), nope (none: no attention bias to draw)" in out
    assert not any(tmp_path.iterdir())  # nothing to draw: no T5 among them, so no bucket maps either
    assert main(["plot", "--schemes", "nope", "--num-buckets", "16", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t5_bucket_map.png", "t5_bucket_map_bidirectional.png"]


def test_plot_draws_the_t5_figures_of_the_schemes_asked_for(tmp_path, capsys):
    """The bucket maps where a T5 label is drawn (one pair at the flags' settings, and a map of its own for
    a label with others), the T5-vs-ALiBi figure where both are: ``--schemes rope`` writes its one figure."""
    pytest.importorskip("matplotlib")

    def names(argv, out):
        assert main(["plot", *argv, "--heads", "2", "--max-plot-distance", "32", "--out", str(tmp_path / out)]) == 0
        return sorted(p.name for p in (tmp_path / out).iterdir())

    assert names(["--schemes", "rope"], "a") == ["rope_wavelengths.png"]
    assert names(["--schemes", "alibi"], "b") == ["bias_vs_distance.png", "heatmap_alibi.png"]
    assert names(["--schemes", "t5@max_distance=64", "alibi"], "c") == [
        "bias_vs_distance.png", "heatmap_alibi.png", "heatmap_t5_max_distance_64.png",
        "t5_bucket_map_32_64_causal.png", "t5_vs_alibi.png"]
    assert names(["--schemes", "t5@max_distance=64", "t5"], "c2") == [
        "bias_vs_distance.png", "heatmap_t5.png", "heatmap_t5_max_distance_64.png", "t5_bucket_map.png",
        "t5_bucket_map_32_64_causal.png", "t5_bucket_map_bidirectional.png"]
    assert names(["--schemes", "t5", "t5@bidirectional=true"], "d") == [  # the flags' pair covers both directions
        "bias_vs_distance.png", "heatmap_t5.png", "heatmap_t5_bidirectional_true.png", "t5_bucket_map.png",
        "t5_bucket_map_bidirectional.png"]
    capsys.readouterr()
    assert main(["plot", "--checkpoint", str(tmp_path), "--num-buckets", "16", "--out", str(tmp_path / "e")]) == 2
    assert "--num-buckets sets the bucket maps of --schemes; with --checkpoint" in capsys.readouterr().err


def test_plot_draws_what_a_rope_scaling_does_to_each_pair(tmp_path, capsys):
    """Rotary labels have no bias to draw: ``rope_wavelengths.png`` shows each pair's wavelength and stretch."""
    from posbias.plot import plot_rotary_wavelengths

    argv = ["plot", "--schemes", "rope", "rope@scaling=yarn,factor=4,train_len=64", "rope@scaling=pi,factor=2",
            "alibi", "--out", str(tmp_path), "--heads", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "skipping" not in out and str(tmp_path / "rope_wavelengths.png") in out
    assert (tmp_path / "rope_wavelengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "heatmap_alibi.png").exists()
    with pytest.raises(ValueError, match="no rotary scheme to plot"):
        plot_rotary_wavelengths([build("alibi", n_heads=2, head_dim=8)], tmp_path / "x.png")


def test_show_is_deterministic_and_prints_options(capsys):
    outs = []
    for seed in (["--seed", "0"], ["--seed", "0"], ["--seed", "1"], []):
        assert main(["show", "kerple-log", "--heads", "2", *seed]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] != outs[2]
    assert outs[3] == outs[0]  # seed 0 unless told
    assert main(["show", "t5", "--max-distance", "64"]) == 0
    assert "options in use: num_buckets=32, max_distance=64, bidirectional=False" in capsys.readouterr().out


def test_show_and_plot_take_scheme_labels_as_extrapolate_names_them(tmp_path, capsys):
    """``t5@max_distance=64,bidirectional=true`` (how ``extrapolate`` takes schemes and its results name
    them) is the same as the flags for ``show``, and a scheme of its own for ``plot``, drawn beside the
    plain ``t5``; a label given twice is drawn once."""
    assert main(["show", "t5@max_distance=64,bidirectional=true", "--heads", "2"]) == 0
    labelled = capsys.readouterr().out
    assert main(["show", "t5", "--max-distance", "64", "--bidirectional", "true", "--heads", "2"]) == 0
    assert labelled == capsys.readouterr().out
    assert "options in use: num_buckets=32, max_distance=64, bidirectional=True" in labelled
    pytest.importorskip("matplotlib")
    assert main(["plot", "--schemes", "t5", "t5@max_distance=64,bidirectional=true", "t5", "--heads", "2",
                 "--out", str(tmp_path), "--max-plot-distance", "32"]) == 0
    written = [line for line in capsys.readouterr().out.splitlines() if "heatmap" in line]
    assert [Path(w).name for w in written] == ["heatmap_t5.png", "heatmap_t5_max_distance_64_bidirectional_true.png"]


def test_show_rope_tabulates_its_frequencies_and_what_a_scaling_does_to_them(capsys):
    """``show rope`` gives each pair's wavelength; with a scaling the stretch θ_k/θ'_k (NTK: 1 at the
    highest frequency, exactly the factor at the lowest; YaRN: 1 for fast pairs, the factor for slow
    ones) and with train_len the pairs that turn less than once within it."""
    from posbias import rope_frequencies

    def rows(argv, head_dim=16):
        assert main(["show", "rope", "--head-dim", str(head_dim), *argv]) == 0
        out = capsys.readouterr().out
        table = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit() and "pairs turn" not in line]
        return out, table

    out, table = rows([])
    assert [int(r[0]) for r in table] == list(range(8)) and float(table[0][2]) == pytest.approx(2 * math.pi, abs=1e-3)
    assert "give --train-len" in out and "YaRN temperature" not in out  # no temperature without YaRN
    _, wide = rows([], head_dim=32)  # 16 pairs: each one shown
    assert [int(r[0]) for r in wide] == list(range(16))
    out, wide = rows([], head_dim=34)  # 17 pairs: 8 of them, evenly spread
    assert [int(r[0]) for r in wide] == [0, 2, 5, 7, 9, 11, 14, 16] and "(8 of 17 shown)" in out
    out, table = rows(["--scaling", "ntk", "--factor", "8", "--train-len", "128"])
    assert float(table[0][5]) == 1.0 and float(table[-1][5]) == pytest.approx(8.0, abs=1e-3)
    under = int((rope_frequencies(16) * 128 < 2 * math.pi).sum())
    assert f"{under} of 8 pairs turn less than once within 128 tokens" in out and under == 5
    assert sum("< 1 turn" in line for line in out.splitlines()) == under
    out, table = rows(["--scaling", "yarn", "--factor", "4", "--train-len", "128"])
    assert float(table[0][5]) == 1.0 and float(table[-1][5]) == 4.0 and "YaRN temperature" in out
    # every column of every row, against the frequencies: θ_k, its wavelength, θ'_k, its wavelength, the
    # stretch, the turns within train_len (and the pairs under one turn)
    plain, yarn = rope_frequencies(16), build("rope", n_heads=1, head_dim=16, scaling="yarn", factor=4.0,
                                              train_len=128).effective_frequencies()
    for k, row in enumerate(table):
        want = [plain[k], 2 * math.pi / plain[k], yarn[k], 2 * math.pi / yarn[k], plain[k] / yarn[k],
                plain[k] * 128 / (2 * math.pi)]
        got = [float(x.replace(",", "")) for x in row[1:7]]
        assert got == [pytest.approx(float(w), rel=2e-3, abs=1e-3) for w in want], k
        assert ("< 1 turn" in " ".join(row)) == (float(want[-1]) < 1)
    assert "k = 0 … 7 (all shown)" in out
    t = 0.1 * math.log(4.0) + 1
    assert f"q and k are each scaled by {t:.4f} (logits by {t * t:.4f})" in out
    out, table = rows(["--train-len", "64"])  # pair 2 turns 1.02 times in 64 tokens: over once, just
    assert "5 of 8 pairs turn less than once within 64 tokens" in out and float(table[2][3]) == pytest.approx(1.019, abs=1e-3)
    assert [("< 1 turn" in " ".join(r)) for r in table] == [False] * 3 + [True] * 5
    out, _ = rows(["--scaling", "dynamic-ntk", "--factor", "4", "--train-len", "128"])
    assert "at a context of factor · train_len = 512 (plain RoPE up to 128)" in out


def test_show_sinusoidal_tabulates_the_similarity_of_positions_by_distance(capsys):
    """``show sinusoidal``: PE(i)·PE(j)/(d/2) by distance, the same at any i (checked at i = 1000)."""
    assert main(["show", "sinusoidal", "--heads", "2", "--head-dim", "16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    dist = [int(x) for x in lines[-2].split()]
    sim = [float(x) for x in lines[-1].split()]
    emb = build("sinusoidal", n_heads=2, head_dim=16).embed(torch.arange(1000, 1000 + max(dist) + 1), 32).double()
    assert sim[0] == 1.0 and sim == [pytest.approx(float(emb[0] @ emb[d]) / 16, abs=6e-4) for d in dist]
    # the header: the pairs and their wavelengths, read back from the embedding itself (at position 1 the
    # angle of pair k is its frequency ω_k ≤ 1 rad, so its wavelength is 2π / atan2(sin, cos))
    header = next(line for line in lines if "sin/cos pairs" in line)
    pairs, shortest, longest = re.search(r"(\d+) sin/cos pairs, .* from ([\d.]+) to ([\d,]+) tokens", header).groups()
    at1 = build("sinusoidal", n_heads=2, head_dim=16).embed(torch.tensor([1]), 32).double()[0]
    wave = (2 * math.pi / torch.atan2(at1[0::2], at1[1::2])).tolist()
    assert "embedding of width 32 " in header and int(pairs) == 16 == len(wave)
    assert float(shortest) == round(min(wave), 2) == 6.28
    assert int(longest.replace(",", "")) == pytest.approx(max(wave), abs=1) and max(wave) > 35_000


def test_show_offsets_gives_the_bucket_and_bias_of_each_offset(capsys):
    """The concept card's example: with logarithmic buckets, offsets 500 and 510 share one learned
    scalar while 10 and 20 have their own; ``--offsets`` says which bucket (and region) each falls in, and
    every scheme's bias per head there (ALiBi: −m_h · (i − j))."""
    from posbias import alibi_slopes, t5_bucket

    assert main(["show", "t5", "--heads", "2", "--offsets", "10", "20", "500", "510"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {int(line.split()[0]): line.split()[1:3] for line in lines if line.strip()[:1].isdigit() and "  " in line
            and len(line.split()) == 5}
    want = t5_bucket(torch.tensor([10, 20, 500, 510])).tolist()
    assert {d: int(r[0]) for d, r in rows.items()} == dict(zip([10, 20, 500, 510], want)) and want[2] == want[3] == 31
    assert [rows[d][1] for d in (10, 20, 500)] == ["one-to-one", "log", "final"]
    assert any("offsets 500, 510 share bucket 31" in line for line in lines)
    assert any(line.strip() == "(the table starts at 0: training learns its values)" for line in lines)  # fresh
    trained = build("t5", n_heads=2, head_dim=8)
    with torch.no_grad():
        trained.table[3, 1] = 0.5
    assert not any("table starts at 0" in note for note in trained._offset_notes([10, 500, 510]))
    assert not any("share bucket 10" in line or "share bucket 17" in line for line in lines)
    assert main(["show", "alibi", "--heads", "2", "--offsets", "0", "100", "-4"]) == 0
    out = capsys.readouterr().out.splitlines()
    at = {int(line.split()[0]): [float(x) for x in line.split()[1:]] for line in out[out.index(
        next(line for line in out if "bias at the offsets" in line)) + 2:] if line.strip()[:1] in "-0123456789"}
    m = alibi_slopes(2).tolist()
    assert at[100] == [pytest.approx(-x * 100, abs=1e-3) for x in m] and at[0] == [0.0, 0.0]
    assert any("offsets < 0: keys after the query (j > i), hidden in causal attention" in line for line in out)
    assert main(["show", "rope", "--offsets", "3"]) == 2
    assert "--offsets needs a scheme with an attention bias; 'rope' is 'rotary'" in capsys.readouterr().err
    # the per-offset table: the entry each offset reads; clipped, every offset >= D reads entry D, unclipped none
    for clip, want in (("true", {3: ["3", "its", "own"], 16: ["16", "clipped"], 500: ["16", "clipped"]}),
                       ("false", {3: ["3", "its", "own"], 16: ["16", "its", "own"], 500: ["-", "none:", "bias", "0"]})):
        assert main(["show", "offset", "--heads", "1", "--max-distance", "16", "--clip", clip,
                     "--offsets", "3", "16", "500"]) == 0
        rows = {int(line.split()[0]): line.split()[1:-1] for line in capsys.readouterr().out.splitlines()
                if line.split()[:1] in (["3"], ["16"], ["500"]) and len(line.split()) > 2}
        assert rows == want, (clip, rows)
    # causal, a key after the query is masked (offset 0 is not); both directions, offsets <= -D share entry 2D
    assert main(["show", "offset", "--heads", "1", "--max-distance", "16", "--offsets", "-2", "0"]) == 0
    out = capsys.readouterr().out
    assert "-2      0  (masked)" in out and " 0      0  its own" in out and "clipped:" not in out
    assert main(["show", "offset", "--heads", "1", "--max-distance", "16", "--bidirectional", "true",
                 "--offsets", "-2", "-16", "16"]) == 0
    out = capsys.readouterr().out
    assert "-2     18  its own" in out and "-16     32  clipped" in out and " 16     16  clipped" in out
    assert "clipped: entry 16 serves every offset >= 16" in out and "clipped: entry 32 serves every offset <= -16" in out
    assert main(["show", "offset", "--heads", "1", "--max-distance", "16", "--bidirectional", "true",
                 "--offsets", "-2", "0"]) == 0
    assert "clipped:" not in capsys.readouterr().out  # no offset reaches either clipped entry


def test_show_fire_at_a_query_position_shows_progressive_interpolation(capsys):
    """``--query-pos``: FIRE's bias at an offset is the same for every query below its threshold L (512
    at initialisation), and moves past it (ψ(i − j) / ψ(max(L, i))); the table is the scheme's own bias."""
    def at(query):
        assert main(["show", "fire", "--heads", "2", "--query-pos", str(query), "--offsets", "0", "10", "100"]) == 0
        lines = capsys.readouterr().out.splitlines()
        start = next(n for n, line in enumerate(lines) if "bias at the offsets" in line)
        assert f"for one query at position {query}" in lines[start]
        return [[float(x) for x in line.split()[1:]] for line in lines[start + 2:start + 5]]

    torch.manual_seed(0)
    fire = build("fire", n_heads=2, head_dim=64)
    with torch.no_grad():
        want = fire.bias(torch.tensor([10000]), 10000 - torch.tensor([0, 10, 100]))[:, 0].T.tolist()
    assert at(10000) == [[pytest.approx(x, abs=1e-3) for x in row] for row in want]
    assert at(100) == at(400) != at(10000)


def test_show_fire_at_offsets_all_negative_puts_the_query_at_position_0(capsys):
    """Keys after the query only: the default query is at 0 (it was at the largest offset, a negative
    position), and the largest offset whose magnitude is an int64 gives a finite bias (|−2⁶³| is refused:
    it wrapped to itself and gave NaN)."""
    big = -(2**63 - 1)
    assert main(["show", "fire", "--heads", "2", "--offsets", str(big), "-5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(n for n, line in enumerate(lines) if "bias at the offsets" in line)
    assert "for one query at position 0 " in lines[start]
    rows = {int(line.split()[0]): [float(x) for x in line.split()[1:]] for line in lines[start + 2:start + 4]}
    torch.manual_seed(0)
    fire = build("fire", n_heads=2, head_dim=64)
    with torch.no_grad():
        want = fire.bias(torch.tensor([0]), torch.tensor([-big, 5]))[:, 0].T.tolist()
    assert [rows[big], rows[-5]] == [[pytest.approx(x, abs=1e-3) for x in row] for row in want]
    assert all(math.isfinite(x) for row in rows.values() for x in row)


def test_show_says_which_query_a_position_dependent_bias_is_tabulated_for(capsys):
    """FIRE's bias reads the query's position: its table is for one query (at the largest distance), and
    says so; a Toeplitz bias's table holds for every query and says nothing of the kind."""
    assert main(["show", "fire", "--heads", "2"]) == 0
    fire = capsys.readouterr().out
    assert "reads the query's own position too: each row is for one query at the largest distance shown, 0 if " \
           "none is positive; --query-pos moves it" in fire
    from posbias import build

    torch.manual_seed(0)
    row = build("fire", n_heads=2, head_dim=64).bias(torch.tensor([1024]), torch.tensor([1024 - 8]))[:, 0, 0]
    assert [f"{x:.3f}" for x in row.tolist()] == [line.split()[5] for line in fire.splitlines() if line.split()[:1] in (["0"], ["1"])]
    assert main(["show", "alibi", "--heads", "2"]) == 0
    assert "query" not in capsys.readouterr().out


def test_more_threads_than_cores_is_noted(capsys, monkeypatch, tmp_path):
    """A CPU job given more torch threads than the cores it may use says so (they share the cores, and
    the results are keyed by the thread count); at or below the core count, and on a GPU, nothing."""
    import posbias.cli as cli

    monkeypatch.setattr(cli, "usable_cores", lambda: 2)
    missing = str(tmp_path / "no-such-checkpoint")
    for argv, noted in ((["diagnose", missing, "--threads", "4"], True), (["diagnose", missing, "--threads", "2"], False),
                        (["retrofit", missing, "--to", "128", "--threads", "3"], True),
                        (["extrapolate", "--preset", "demo", "--data", missing, "--out", str(tmp_path / "o"), "--threads", "5"],
                         True)):
        assert main(argv) == 2
        out = capsys.readouterr().out
        assert ("note: --threads" in out) is noted, argv
        if noted:
            assert f"--threads {argv[-1]} is more than the 2 cores this process may use" in out
    cli._threads_note(8, "cuda")
    assert capsys.readouterr().out == ""
    assert cli.usable_cores() >= 1


# -- the command line's own rules: what a failure prints and the status it exits with ------------------
@pytest.mark.parametrize("argv, msg", [
    ([], "posbias: error: give a command (list, show, plot, extrapolate, retrofit, diagnose, clean); posbias --help "
         "says what each does"),
    (["--bogus"], "posbias: error: give a command (list, show, plot, extrapolate, retrofit, diagnose, clean); posbias "
                  "--help says what each does"),
    (["foo"], "posbias: error: unknown command 'foo' (choose from 'list', 'show', 'plot', 'extrapolate', 'retrofit', "
              "'diagnose', 'clean')"),
    (["show"], "posbias show: error: the following arguments are required: SCHEME"),
    (["list", "--bogus"], "posbias list: error: unrecognized arguments: --bogus"),
    (["plot", "t5@max_distance=64"], "posbias plot: error: unrecognized arguments: t5@max_distance=64"),
    (["show", "nope", "--foo", "1"], "posbias show: error: scheme 'nope' has no option --foo; valid: none"),
])
def test_an_error_names_the_command_only_where_there_is_one(argv, msg, capsys):
    """``posbias: error: …`` before a command is known (it read ``posbias posbias:`` with none and
    ``posbias foo:`` for an unknown one), ``posbias COMMAND: error: …`` after."""
    assert main(argv) == 2
    assert capsys.readouterr().err == msg + "\n"


def _failing(monkeypatch, exc):
    """``posbias list`` raising ``exc``."""
    def fail(args):
        raise exc
    monkeypatch.setattr("posbias.cli.cmd_list", fail)


@pytest.mark.parametrize("exc, code, said", [
    (KeyboardInterrupt(), 130, "\nposbias list: interrupted (finished work is saved; re-run to resume)\n"),
    (Terminated(), 143,
     "posbias list: terminated (SIGTERM; finished work is saved; re-run to resume)\n"),
    (OSError(errno.EACCES, "Permission denied", "/x/y"), 1, "posbias list: error: '/x/y': Permission denied\n"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "z"), 2,
     "posbias list: error: 'z': No such file or directory\n"),
    (MemoryError(), 1, "posbias list: error: out of memory; what was finished is kept: a shorter length, a smaller "
                       "batch or fewer evaluation tokens, then re-run to resume\n"),
    (ValueError("bad value"), 2, "posbias list: error: bad value\n"),
])
def test_each_way_a_command_stops_has_its_status_and_one_message(monkeypatch, capsys, exc, code, said):
    """Ctrl-C 130 and SIGTERM 128 + 15, as a shell reports them; a system error 1 naming the file; a
    user error 2."""
    _failing(monkeypatch, exc)
    assert main(["list"]) == code
    assert capsys.readouterr().err == said


def test_a_broken_pipe_stops_quietly_and_a_bug_is_shown_whole(monkeypatch, capsys):
    _failing(monkeypatch, BrokenPipeError())
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # (restored after: the handler sends stdout to devnull)
    assert main(["list"]) == 0
    assert sys.stdout.name == os.devnull
    sys.stdout.close()
    _failing(monkeypatch, RuntimeError("an index past the end"))  # not an allocation: a bug, with its traceback
    with pytest.raises(RuntimeError, match="an index past the end"):
        main(["list"])


def test_out_of_memory_reads_the_allocation_torch_asked_for():
    from posbias.cli import _memory_problem

    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried "
                       "to allocate 3221225472 bytes. Error code 12 (Cannot allocate memory)")
    assert _memory_problem(cpu).startswith("out of memory (an allocation of 3.0 GiB); what was finished is kept")
    small = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 41943040 bytes.")
    assert _memory_problem(small).startswith("out of memory (an allocation of 40.0 MiB);")  # not "0.0 GiB"
    assert _memory_problem(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")).startswith(
        "out of memory; what was finished")
    assert _memory_problem(MemoryError()).startswith("out of memory; what was finished")
    assert _memory_problem(RuntimeError("shape mismatch")) is None
    assert _memory_problem(ValueError("can't allocate memory: you tried to allocate 5 bytes")) is None


@pytest.mark.parametrize("err, said", [
    (OSError(errno.ENOSPC, "No space left on device", "/r/m.pt"),
     "'/r/m.pt': No space left on device; what was finished is kept: free some space and re-run to resume"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"),
     "Disk quota exceeded; what was finished is kept: free some space and re-run to resume"),
    (OSError(errno.EROFS, "Read-only file system", "/r"), "'/r': Read-only file system"),
    (OSError("no errno at all"), "no errno at all"),
])
def test_a_system_error_names_the_file_and_where_space_ran_out_what_to_do(err, said):
    from posbias.cli import _os_problem

    assert _os_problem(err) == said


def test_list_aligns_its_columns(capsys):
    from posbias.schemes import SCHEMES

    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(SCHEMES)
    width = max(map(len, SCHEMES))
    for line, (name, cls) in zip(lines, SCHEMES.items()):  # name, family and summary each start in one column
        assert line == f"{name}{' ' * (width - len(name))}  {cls.family:<8}  {cls.summary}"


def test_show_takes_a_flag_for_a_true_option_and_tabulates_eight_heads_by_default(capsys):
    """A yes/no scheme option given bare means yes (``--clip``), as ``--clip true``; ``show`` draws
    8 heads unless told."""
    assert main(["show", "offset", "--clip"]) == 0
    bare = capsys.readouterr().out
    assert "clip=True" in bare
    assert main(["show", "offset", "--clip", "true"]) == 0 and capsys.readouterr().out == bare
    assert main(["show", "alibi"]) == 0
    assert "  ALiBi(n_heads=8, head_dim=64, " in capsys.readouterr().out


def test_plot_draws_the_schemes_show_tabulates_unless_told():
    """``plot`` and ``show`` build their schemes at one shape and seed by default (8 heads of 64
    dimensions, seed 0): a learnable scheme's heatmap is of the initial values ``show`` lists."""
    shape = ("heads", "head_dim", "seed")
    plot, show = build_parser().parse_args(["plot"]), build_parser().parse_args(["show", "kerple-log"])
    assert [getattr(plot, k) for k in shape] == [getattr(show, k) for k in shape] == [8, 64, 0]


@pytest.mark.parametrize("command", ["clean", "list", "show"])
def test_help_of_commands_with_positional_arguments_prints(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0 and "usage: posbias" in capsys.readouterr().out


def test_each_figure_is_drawn_for_the_direction_of_its_scheme(tmp_path, monkeypatch):
    """The bidirectional bucket map is drawn bidirectional, and a two-sided scheme's heatmap without the
    causal mask and with its label in the title."""
    drawn = figures_drawn(monkeypatch)
    assert main(["plot", "--schemes", "t5", "t5@bidirectional=true", "--heads", "2", "--out", str(tmp_path)]) == 0
    assert drawn["t5_bucket_map.png"].get("bidirectional", False) is False
    assert drawn["t5_bucket_map_bidirectional.png"]["bidirectional"] is True
    assert drawn["heatmap_t5.png"]["causal"] is True
    assert drawn["heatmap_t5_bidirectional_true.png"]["causal"] is False
    # each title names what is drawn, and the label where it is not the scheme's bare name
    assert "(t5" not in drawn["heatmap_t5.png"]["note"]
    assert drawn["heatmap_t5_bidirectional_true.png"]["note"].endswith(" (t5@bidirectional=true)")


def test_a_checkpoints_figures_follow_its_direction_and_its_line_gives_the_range_drawn(tmp_path, monkeypatch, capsys):
    """``plot --checkpoint`` of a two-sided T5 (an encoder's): its heatmap without the causal mask, the
    curves on a log distance axis, and the printed range taken over the distances −N … N drawn (0 … N
    for a causal one: ALiBi's lowest value is at N itself)."""
    from posbias import checkpoint as ckpt

    drawn = figures_drawn(monkeypatch)
    both = tiny_checkpoint(tmp_path / "enc", "t5", bidirectional=True)
    one = tiny_checkpoint(tmp_path / "dec", "t5")
    line = tiny_checkpoint(tmp_path / "lin", "alibi")  # its extreme at the largest distance drawn
    assert main(["plot", "--checkpoint", str(both), str(one), str(line), "--max-plot-distance", "40",
                 "--out", str(tmp_path / "p")]) == 0
    said = capsys.readouterr().out
    assert drawn["heatmap_enc.png"]["causal"] is False and drawn["heatmap_dec.png"]["causal"] is True
    assert drawn["learned_bias_vs_distance.png"]["log_distance"] is True
    assert drawn["t5_bucket_map_32_128_bidirectional.png"]["bidirectional"] is True
    for name, path in (("enc", both), ("dec", one), ("lin", line)):
        s = ckpt.load_model(path).scheme
        b = s.bias_by_distance(torch.arange(-40 if name == "enc" else 0, 41))
        span = "±40" if name == "enc" else "0–40"
        assert f"bias from {float(b.min()) + 0.0:+.3f} to {float(b.max()) + 0.0:+.3f} over distances {span}" in said
        assert float(b.min()) != float(b.max())


def test_plot_draws_a_checkpoint_that_records_no_training_length_without_one(tmp_path, monkeypatch):
    """A checkpoint with no training length in its record (one saved by the library, not by a
    study) is drawn, given itself or the folder of a study it sits in, with no L marked; a
    checkpoint that records L has it marked."""
    from posbias import checkpoint as ckpt

    drawn = figures_drawn(monkeypatch)
    model = ckpt.load_model(tiny_checkpoint(tmp_path / "t", "alibi"))
    alone = ckpt.save_checkpoint(tmp_path / "alone", model, extra={})
    ckpt.save_checkpoint(tmp_path / "study" / "models" / "t5-seed0-0123456789" / "final",
                         ckpt.load_model(tiny_checkpoint(tmp_path / "u", "t5")), extra={})
    assert main(["plot", "--checkpoint", str(alone), str(tmp_path / "study"), str(tmp_path / "t"),
                 "--out", str(tmp_path / "p")]) == 0
    assert drawn["learned_bias_vs_distance.png"]["trained"] == [None, None, TINY_L]


def test_clean_prints_each_stale_item_the_reports_by_reason_and_the_bytes_it_frees(tmp_path, monkeypatch, capsys):
    """``clean``'s lines from its findings (here handed to it): each stale item with its size, the
    reports one line per reason (five named and "and N more" past six, up to six named; "report" for
    one), and the total that ``--delete`` frees, or nothing to free where nothing is stale."""
    from posbias import clean

    for d in ("a", "b", "c"):
        (tmp_path / d).mkdir()
    mib = 2 ** 20
    stale = [clean.Stale(tmp_path / "a" / "m1", "trained model", "made by other posbias code", 3 * mib),
             clean.Stale(tmp_path / "a" / "e.json", "evaluation", "evaluation format 1 (installed 2)", mib // 2)]
    reports = ([(tmp_path / "a" / f"r{k}" / "results.md", "made from a stale model") for k in range(7)]
               + [(tmp_path / "a" / f"s{k}" / "report.md", "made from a stale cache") for k in range(6)]
               + [(tmp_path / "a" / "t" / "report.md", "one of its own")]
               + [(tmp_path / "a" / f"u{k}" / "report.md", "two of them") for k in range(2)])
    findings = {tmp_path / "a": clean.Findings(tmp_path / "a", stale, reports, checked=9),
                tmp_path / "b": clean.Findings(tmp_path / "b", [], [], checked=4),
                tmp_path / "c": clean.Findings(tmp_path / "c", [clean.Stale(tmp_path / "c" / "x.tmp", "unfinished write",
                                                                            "left by a write cut short", 3 * mib)],
                                               [], checked=1)}
    monkeypatch.setattr(clean, "find", lambda root, skip=(): findings[Path(root)])
    freed = []
    monkeypatch.setattr(clean, "remove", lambda found: freed.append(found.root) or found.size)
    assert main(["clean", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    lines = capsys.readouterr().out.splitlines()
    a = tmp_path / "a"
    assert lines == [
        f"{a}: 2 stale item(s) of 9 keyed result(s) checked, 3.5 MiB",
        "  m1  [trained model, 3.0 MiB] made by other posbias code",
        "  e.json  [evaluation, 0.5 MiB] evaluation format 1 (installed 2)",
        "  reports " + ", ".join(f"r{k}/results.md" for k in range(5)) + " and 2 more: made from a stale model",
        "  reports " + ", ".join(f"s{k}/report.md" for k in range(6)) + ": made from a stale cache",
        "  report t/report.md: one of its own",
        "  reports u0/report.md, u1/report.md: two of them",
        f"{tmp_path / 'b'}: nothing stale (4 keyed result(s) checked)",
        "nothing removed; add --delete to remove these (3.5 MiB)"]
    assert freed == []
    assert main(["clean", str(tmp_path / "b")]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{tmp_path / 'b'}: nothing stale (4 keyed result(s) checked)"]
    assert main(["clean", str(tmp_path / "a"), str(tmp_path / "c"), "--delete"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "removed 6.5 MiB" and freed == [a, tmp_path / "c"]


def test_models_named_on_the_command_line_are_each_taken_once_under_a_label_of_their_own(tmp_path, capsys):
    """``diagnose``/``plot --checkpoint`` targets: a model given twice (by its folder and by a study folder
    that holds it) is taken once; models of one name from two folders get ``-2``, ``-3``; the study's
    key leaves the label (passing over a stale model beside a current one: test_clean)."""
    from posbias.cli import _model_targets

    for study in ("s1", "s2", "s3"):
        tiny_checkpoint(tmp_path / study / "models" / "t5-seed0-0123456789" / "final", "t5")
    tiny_checkpoint(tmp_path / "s1" / "models" / "alibi-seed0-abcdefabcd" / "final", "alibi")
    got = _model_targets([str(tmp_path / "s1"), str(tmp_path / "s1" / "models" / "t5-seed0-0123456789"),
                          str(tmp_path / "s2"), str(tmp_path / "s3" / "models" / "t5-seed0-0123456789" / "final")])
    assert [(label, name, where.relative_to(tmp_path).as_posix()) for label, name, where in got] == [
        ("alibi-seed0", "alibi-seed0-abcdefabcd", "s1/models/alibi-seed0-abcdefabcd/final"),
        ("t5-seed0", "t5-seed0-0123456789", "s1/models/t5-seed0-0123456789/final"),
        ("t5-seed0-2", "t5-seed0-0123456789", "s2/models/t5-seed0-0123456789/final"),
        ("t5-seed0-3", "t5-seed0-0123456789", "s3/models/t5-seed0-0123456789/final")]
    assert capsys.readouterr().out == ""  # nothing passed over: no stale model among them


def test_a_retrofit_writes_beside_the_others_under_its_models_name_unless_told(tmp_path):
    from posbias.cli import _prepare_checkpoint_job

    final = tiny_checkpoint(tmp_path / "rope-seed0-0123456789" / "final", "rope")
    args = argparse.Namespace(device="cpu", threads=1, checkpoint=str(final), out=None)
    assert _prepare_checkpoint_job(args, "retrofit") == Path("runs/retrofit-rope-seed0-0123456789")
    args.out = str(tmp_path / "here")
    assert _prepare_checkpoint_job(args, "retrofit") == tmp_path / "here"


@pytest.fixture()
def stopped_jobs(monkeypatch):
    """``run_study``, ``run_retrofit`` and ``run_diagnose`` replaced by a stop (ValueError, one line and
    exit 2) that records what the command handed them: ``(config, keyword arguments)`` per call."""
    from posbias import diagnose, retrofit, study

    ran = []

    def stop(_path, cfg, *args, **kwargs):
        ran.append((cfg, kwargs))
        raise ValueError("stopped by the test")

    monkeypatch.setattr(study, "run_study", lambda cfg, out, **kwargs: stop(out, cfg, **kwargs))
    monkeypatch.setattr(retrofit, "run_retrofit", stop)
    monkeypatch.setattr(diagnose, "run_diagnose", stop)
    return ran


def test_extrapolate_shows_progress_unless_quiet_and_keeps_last_unless_told(tmp_path, stopped_jobs, capsys):
    """What ``posbias extrapolate`` hands the study: progress bars unless --quiet, each model's last/
    kept unless --no-keep-last."""
    for extra in ([], ["--quiet"], ["--no-keep-last"]):
        one_line_error(capsys, main(["extrapolate", "--schemes", "alibi", "--out", str(tmp_path), *extra]),
                       "stopped by the test")
    assert [(k["progress"], k["keep_last"]) for _, k in stopped_jobs] == [(True, True), (False, True), (True, False)]


def test_retrofit_and_diagnose_run_their_configs_defaults(tmp_path, stopped_jobs, capsys):
    """With no flag but the required ones, ``posbias retrofit`` and ``posbias diagnose`` run exactly
    ``RetrofitConfig(to, methods)`` and ``DiagnoseConfig()``: every flag's default is the config's
    (a second copy of those numbers in the parser once went unchecked: another default passed). A
    checkpoint that records no corpus gets no line about the text; retrofit without --to is refused
    by name."""
    from posbias.diagnose import DiagnoseConfig
    from posbias.retrofit import RetrofitConfig

    path = tiny_checkpoint(tmp_path / "rope-seed0-0123456789" / "final", "rope")
    main(["retrofit", str(path), "--to", str(4 * TINY_L), "--method", "pi", "--out", str(tmp_path / "r")])
    main(["diagnose", str(path), "--out", str(tmp_path / "d")])
    assert [cfg for cfg, _ in stopped_jobs] == [RetrofitConfig(to=4 * TINY_L, methods=("pi",)), DiagnoseConfig()]
    assert all(kwargs["progress"] for _, kwargs in stopped_jobs)  # bars unless --quiet
    said = capsys.readouterr().out  # tiny_checkpoint records no corpus: nothing to compare, no line on the text
    assert "trained on" not in said and "corpus" not in said
    assert main(["retrofit", str(path), "--method", "pi"]) == 2
    assert capsys.readouterr().err.strip().endswith("the following arguments are required: --to")


def test_diagnose_writes_where_its_help_says_and_retrofit_names_the_methods_that_fit(tmp_path, monkeypatch,
                                                                                      stopped_jobs, capsys):
    """Without --out, one model's diagnosis goes to ``runs/diagnose-<its folder>`` and several models' to
    ``runs/diagnose-<the first PATH's name>/<label>``, as ``--help`` says; a retrofit with neither
    --method nor --compare names the methods that fit the checkpoint's scheme."""
    from posbias.cli import _subcommands

    monkeypatch.chdir(tmp_path)
    one = tiny_checkpoint(tmp_path / "rope-seed0-0123456789" / "final", "rope")
    tiny_checkpoint(tmp_path / "s" / "models" / "t5-seed0-abcdefabcd" / "final", "t5")
    main(["diagnose", str(one)])
    main(["diagnose", "s", str(one)])
    assert [kwargs["out"] for _, kwargs in stopped_jobs] == [Path("runs/diagnose-rope-seed0-0123456789"),
                                                             Path("runs/diagnose-s/t5-seed0")]
    helps = {name: " ".join(p.format_help().split()) for name, p in _subcommands(build_parser()).items()}
    assert "--out OUT default: runs/diagnose-<model folder's name>, or with several models " \
           "runs/diagnose-<the first PATH's name>" in helps["diagnose"]
    assert "--out OUT default: runs/retrofit-<model folder's name> --quiet" in helps["retrofit"]
    capsys.readouterr()
    assert main(["retrofit", str(one), "--to", str(4 * TINY_L)]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "give --method (for a rope checkpoint: pi, ntk, dynamic-ntk, yarn, swap-alibi, swap-t5) or --compare")
