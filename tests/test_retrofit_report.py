"""What the retrofit report says and draws (``posbias.report.retrofit``), read from retrofit results made
by hand. The measurements themselves (perplexities, passkey copies, costs) are tested in
test_retrofit.py; here every number the report shows is one the test put in, so a cell, sentence or
line that shows another one fails."""

import json

from posbias.evaluate import Paired
from posbias.report import md_row
from posbias.report import retrofit as report
from posbias.retrofit import RetrofitConfig, RetrofitResult

L, TO = 256, 1024
LENS = [256, 512, 1024]
CORPUS = {"name": "embedded", "sha256": "abc"}
# three segments of 1024 tokens, tiled by every length: 12 windows at 256, 6 at 512, 3 at 1024
WINDOWS = {n: 3 * TO // n for n in LENS}


def row(method, stage, ppl, *, extra=0, final=None, cost=None, key=None):
    """A row of perplexity ``ppl`` (one value per length of LENS); ``key``: its passkey fields."""
    r = {"method": method, "stage": stage, "scheme": "rope", "ppl": dict(zip(LENS, ppl)),
         "window_loss": {n: [0.1 * j for j in range(WINDOWS[n])] for n in LENS},
         "extra_params": extra, "passkey": None, "attention_cost": None}
    if final is not None:
        r["final"] = final
    if cost is not None:
        r["attention_cost"], r["attention_cost_range"] = cost[0], list(cost[1:])
    return r | (key or {})


def key(at_l, at_to, *, interval, hidden=None, digits=None, fits=None):
    """A row's passkey fields: each copy's accuracy at L and TO (its seeds 0, 1, …), the interval of the
    cells at L and TO, the far filler hidden at TO, the answer bytes' scores at TO, each copy's fine-tune."""
    return {"passkey": {L: sum(at_l) / len(at_l), TO: sum(at_to) / len(at_to)},
            "passkey_interval": {L: interval[0], TO: interval[1]},
            "passkey_copies": {L: list(at_l), TO: list(at_to)}, "passkey_seeds": list(range(len(at_l))),
            "passkey_digits": {TO: digits} if digits else {}, "passkey_fits": fits or [None] * len(at_l),
            "passkey_hidden": {TO: hidden} if hidden else {}}


def fit(learned_at, steps=300):
    return {"learned_at": learned_at, "target": 0.9, "steps": steps, "probes": []}


def result(rows, *, paired=None, seeds=(0, 1, 2), compare=True, passkey_steps=300, finetune_steps=0,
           until=0.9, pos_lr_mult=None, lens=LENS, trained=CORPUS, remap=None):
    cfg = RetrofitConfig(to=TO, methods=("pi", "ntk"), finetune_steps=finetune_steps, compare=compare,
                         passkey_steps=passkey_steps, passkey_until=until, passkey_samples=4,
                         passkey_seeds=seeds, pos_lr_mult=pos_lr_mult)
    return RetrofitResult("runs/rope/final", L, TO, list(lens), cfg, CORPUS, trained, pos_lr_mult=1.5,
                          rows=rows, paired=paired or {}, bucket_remap=remap or {})


def three_rows():
    """The model as it was, PI and NTK with no fine-tune, each with three passkey copies: the original
    solved 1.00, 0.95 and 0 at L (the third never learned), PI every one, NTK 0.50, 0.90 and 0.95."""
    return [
        row("original", "before", [10.0, 14.0, 20.0], final=True, cost=(1.0, 1.0, 1.0),
            key=key([1.0, 0.95, 0.0], [0.2, 0.1, 0.0], interval=((0.01, 0.99), (0.0, 0.31)),
                    hidden=[0.9, 0.15, 0.0], digits=[0.5, 0.4, 0.3, 0.2, 0.1],
                    fits=[fit(120), fit(200), fit(None)])),
        row("pi", "no fine-tune", [12.0, 12.5, 13.0], final=True, cost=(1.04, 0.97, 1.1),
            key=key([1.0, 1.0, 1.0], [0.5, 0.6, 0.7], interval=((0.83, 1.0), (0.3, 0.85)),
                    hidden=[0.55, 0.6, 0.7], digits=[0.9, 0.8, 0.7, 0.6, 0.5], fits=[fit(40), fit(60), fit(80)])),
        row("ntk", "no fine-tune", [10.5, 11.0, 12.0], extra=-3, final=True, cost=(1.2, 1.2, 1.2),
            key=key([0.5, 0.9, 0.95], [0.4, 0.85, 0.9], interval=((0.3, 1.0), (0.2, 0.97)))),
    ]


def three_paired():
    """At 1024 NTK best, PI not distinguishable from it; at 256 the original best, NTK tied; at 512
    PI best and every other row worse."""
    return {256: [Paired(1.0, 1.0, 1.0, best=True), Paired(1.2, 1.1, 1.3), Paired(1.05, 0.98, 1.1)],
            512: [Paired(1.27, 1.2, 1.35), Paired(1.0, 1.0, 1.0, best=True), Paired(1.02, 1.01, 1.04)],
            1024: [Paired(1.667, 1.5, 1.8), Paired(1.083, 0.99, 1.2), Paired(1.0, 1.0, 1.0, best=True)]}


def lines_of(res):
    return report.markdown(res).splitlines()


def at(lines, start):
    """The index of the first line that starts with ``start``."""
    return next(i for i, line in enumerate(lines) if line.startswith(start))


def after(lines, start, count):
    """``count`` lines after the first that starts with ``start``."""
    i = at(lines, start)
    return lines[i + 1:i + 1 + count]


def test_the_opening_line_names_checkpoint_lengths_text_tokens_and_the_fine_tunes_rate():
    first = lines_of(result(three_rows()))[0]
    assert first == (
        "Retrofit of `runs/rope/final` (trained at L = 256) to 1024 tokens. Measured on the validation split of "
        "embedded (sha256 abc), the text the checkpoint was trained on. Perplexity: up to 3,072 validation tokens "
        "in segments spread evenly over the split. Fine-tunes train the positional parameters at 1.5× their "
        "learning rate (as the checkpoint was trained).")
    # a rate given on the command line is not the checkpoint's
    assert lines_of(result(three_rows(), pos_lr_mult=1.5))[0].endswith("at 1.5× their learning rate.")
    # nothing fine-tuned (no --finetune-steps, no passkey copies): no rate
    for res in (result(three_rows(), compare=False), result(three_rows(), passkey_steps=0)):
        assert lines_of(res)[0].endswith("spread evenly over the split.")
    tuned = lines_of(result(three_rows(), compare=False, finetune_steps=50))[0]
    assert "Fine-tunes train" in tuned and tuned.endswith(
        "learning rate (as the checkpoint was trained). The rows fine-tuned 50 steps at 1024 are set against the model "
        "before any fine-tune, not against the same fine-tune without a retrofit, which can do most of their gain "
        "(docs/retrofit-and-diagnose.md, \"The control the fine-tuned table lacks\", measures that row).")
    assert "without a retrofit" not in lines_of(result(three_rows(), compare=False))[0]
    other = lines_of(result(three_rows(), trained={"name": "wiki", "sha256": "def"}))[0]
    assert "**not** the text the checkpoint was trained on, wiki (sha256 def)" in other


def test_the_perplexity_table_has_each_length_and_the_growth_past_l_against_the_model_before():
    lines = lines_of(result(three_rows(), paired=three_paired()))
    assert after(lines, "(Each row against the best", 6)[1:] == [
        "| method | stage | ppl @ 256 | ppl @ 512 | ppl @ 1024 | ppl@1024 / ppl@256 (before) |",
        "|---|---|---|---|---|---|",
        "| original | before | 10.000 | 14.000 | 20.000 | 2.00 |",
        "| pi | no fine-tune | 12.000 | 12.500 | 13.000 | 1.30 |",  # against the original's 10 at L, not its own 12
        "| ntk | no fine-tune | 10.500 | 11.000 | 12.000 | 1.20 |"]


def test_the_summary_names_the_best_row_its_ties_and_where_the_original_stands():
    lines = lines_of(result(three_rows(), paired=three_paired()))
    assert lines[2:5] == [
        "* **Best at 1024: ntk (no fine-tune)**; not distinguishable from it: pi (no fine-tune).",
        "* **At L = 256 (the near range) the model as it was, with no retrofit, is best**; not distinguishable "
        "from it: ntk (no fine-tune): only that row keeps its perplexity.",
        "(Each row against the best, paired over the same windows: *Which differences are real*, below.)"]
    rows = three_rows()
    tied = {n: [Paired(1.01, 0.99, 1.03), Paired(1.0, 1.0, 1.0, best=True), Paired(1.5, 1.4, 1.6)] for n in LENS}
    assert lines_of(result(rows, paired=tied))[2:4] == [
        "* **Best at 1024: pi (no fine-tune)**; not distinguishable from it: original (before). The model as it was "
        "is among them: no retrofit here gains anything beyond the noise.",
        "* **Best at L = 256 (the near range): pi (no fine-tune)**; not distinguishable from it: original (before). "
        "The model as it was is among them: no retrofit here gains anything beyond the noise."]
    alone = {TO: [Paired(1.3, 1.2, 1.4), Paired(1.0, 1.0, 1.0, best=True), Paired(1.5, 1.4, 1.6)]}
    said = report.summary(result(rows, paired=alone))
    assert said == ["* **Best at 1024: pi (no fine-tune)**; every other row is worse beyond the noise.",
                    "(Each row against the best, paired over the same windows: *Which differences are real*, below.)",
                    ""]
    assert report.summary(result(rows)) == []  # one row: nothing paired


def test_the_paired_table_counts_each_lengths_windows_and_warns_of_few():
    lines = lines_of(result(three_rows(), paired=three_paired()))
    i = at(lines, "Which differences are real")
    assert lines[i] == (
        "Which differences are real: perplexity relative to the best row at each length, 95% interval paired over "
        "the same windows (12 at 256, 6 at 512, 3 at 1024); (≈ best): not distinguishable from the best at this "
        "evaluation size. Only 3 windows scored (fewer than 64): the intervals are too narrow where a few "
        "stretches of the text carry most of its variance (on the embedded corpus, the study's 95% interval held "
        "the whole split's value in 81-94% of random draws of 16 segments, 92-97% of 64; docs/study.md, \"Do the "
        "intervals now mean 95%?\"); raise --eval-tokens, or give more validation text.")
    assert lines[i - 1] == lines[i + 1] == ""
    assert lines[i + 2:i + 7] == [
        "| method | stage | @ 256 | @ 512 | @ 1024 |", "|---|---|---|---|---|",
        "| original | before | **best** | 1.270 [1.200, 1.350] | 1.667 [1.500, 1.800] |",
        "| pi | no fine-tune | 1.200 [1.100, 1.300] | **best** | 1.083 [0.990, 1.200] (≈ best) |",
        "| ntk | no fine-tune | 1.050 [0.980, 1.100] (≈ best) | 1.020 [1.010, 1.040] | **best** |"]
    # 64 windows at the longest length: no warning
    rows = three_rows()
    for r in rows:
        r["window_loss"] = {n: [0.0] * (64 * TO // n) for n in LENS}
    lines = lines_of(result(rows, paired=three_paired()))
    i = at(lines, "Which differences are real")
    assert lines[i].endswith("(256 at 256, 128 at 512, 64 at 1024); (≈ best): not distinguishable from the best at "
                             "this evaluation size.")
    assert not any(line.startswith("Which differences") for line in lines_of(result(three_rows())))


def test_the_decision_table_with_several_copies():
    lines = lines_of(result(three_rows(), paired=three_paired()))
    head = at(lines, "Decision table")
    assert lines[head] == (
        "Decision table (passkey: 3 copies, of seeds 0, 1, 2, each trained at L for 300 steps, fewer once it solved "
        "0.9 of a probe there; mean accuracy over 5 depths and copies, with the 95% Wilson interval from the lowest "
        "copy's bound to the highest's; *copies ≥ 0.9 at L*: the same at 1024 over only the copies that solved at "
        "least 0.9 at L, what a method keeps once a copy has learned the task; *far filler hidden*: the same samples "
        "at 1024 with every key at distance ≥ L hidden except the key statement, in every layer, so the key keeps "
        "its distance and rotation and only the filler beyond L is gone; attention cost: a forward pass at 1024 "
        "tokens relative to the original model, the median of 6 pairs timed back to back in this run, with the "
        "lowest and highest pair's ratio):")
    assert lines[head + 2:head + 7] == [
        "| method | stage | near-range ppl @ 256 | ppl @ 512 | ppl @ 1024 | passkey @ 256 | passkey @ 1024 | "
        "passkey @ 1024, copies ≥ 0.9 at L | passkey @ 1024, far filler hidden | extra params | attention cost |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        # original: copies 1.00 and 0.95 solved at L (0.20, 0.10 at 1024); hidden 0.90, 0.15, 0.00
        "| original | before | 10.000 | 14.000 | 20.000 | 0.65 [0.01, 0.99] (3 copies) | 0.10 [0.00, 0.31] (3 copies) "
        "| 0.15 [0.03, 0.42] (2 of 3) | 0.35 [0.00, 0.97] | +0 | 1.00× |",
        "| pi | no fine-tune | 12.000 | 12.500 | 13.000 | 1.00 [0.83, 1.00] (3 copies) | 0.60 [0.30, 0.85] (3 copies) "
        "| 0.60 [0.30, 0.85] (3 of 3) | 0.62 [0.34, 0.85] | +0 | 1.04× (0.97–1.10) |",
        "| ntk | no fine-tune | 10.500 | 11.000 | 12.000 | 0.78 [0.30, 1.00] (3 copies) | 0.72 [0.20, 0.97] (3 copies) "
        "| 0.88 [0.64, 0.97] (2 of 3) | — | -3 | 1.20× |"]
    rest = lines[head + 7:]
    assert rest == [
        "",
        "The passkey copies had learned the task at L (≥ 0.9 of their probe): pi (no fine-tune) seed 0 by step 40, "
        "pi (no fine-tune) seed 1 by step 60, pi (no fine-tune) seed 2 by step 80, original (before) seed 0 by step "
        "120, original (before) seed 1 by step 200; not within 300 steps: original (before) seed 2.",
        "",
        "With the far filler hidden, each copy that learned the task at L and lost some of it at 1024:",
        "",
        "* original (before) seed 0 solved 1.00 at L and 0.20 at 1024; with the far filler hidden 0.90: it lost 0.80 "
        "past L, most of it to the filler past L, not to the key's distance (hiding gives back 0.70).",
        "* original (before) seed 1 solved 0.95 at L and 0.10 at 1024; with the far filler hidden 0.15: it lost 0.85 "
        "past L, most of it not to the filler past L: to the key's distance itself, or what far positions do to it "
        "(hiding gives back 0.05).",
        "* pi (no fine-tune) seed 0 solved 1.00 at L and 0.50 at 1024; with the far filler hidden 0.55: it lost 0.50 "
        "past L, most of it not to the filler past L: to the key's distance itself, or what far positions do to it "
        "(hiding gives back 0.05).",
        "* pi (no fine-tune) seed 1 solved 1.00 at L and 0.60 at 1024; with the far filler hidden 0.60: it lost 0.40 "
        "past L, most of it not to the filler past L: to the key's distance itself, or what far positions do to it "
        "(hiding gives back 0.00).",
        "* pi (no fine-tune) seed 2 solved 1.00 at L and 0.70 at 1024; with the far filler hidden 0.70: it lost 0.30 "
        "past L, most of it not to the filler past L: to the key's distance itself, or what far positions do to it "
        "(hiding gives back 0.00).",
        "",
        "Each copy, solved at L → at 1024: original (before) 1.00 → 0.20, 0.95 → 0.10, 0.00 → 0.00; pi (no "
        "fine-tune) 1.00 → 0.50, 1.00 → 0.60, 1.00 → 0.70; ntk (no fine-tune) 0.50 → 0.40, 0.90 → 0.85, 0.95 → 0.90.",
        "",
        "Answer bytes right at 1024 (mean over depths, all bytes · the first, which needs the key found; a guess "
        "among the ten digits scores 0.1, a digit of the key copied from a random place 0.28): original (before) "
        "0.30 · 0.50; pi (no fine-tune) 0.70 · 0.90.",
        "",
        "No passkey sample was solved at L = 256 by: original (before) seed 2. The passkey fine-tune did not teach "
        "that copy the task within its training length, so its passkey @ 1024 says nothing about retrieval at 1024 "
        "(yet it counts in its row's mean)."]


def one_copy_rows():
    return [row("original", "before", [10.0, 14.0, 20.0], final=True, cost=(1.0, 1.0, 1.0),
                key=key([0.0], [0.0], interval=((0.0, 0.17), (0.0, 0.17)))),
            row("pi", "no fine-tune", [12.0, 12.5, 13.0], final=False),
            row("pi", "fine-tuned 50", [11.0, 11.5, 12.0], final=True, cost=(1.1, 1.1, 1.1),
                key=key([0.95], [0.4], interval=((0.75, 0.99), (0.21, 0.61)), hidden=[0.45]))]


def test_the_decision_table_with_one_copy_holds_what_each_method_ends_with():
    lines = lines_of(result(one_copy_rows(), seeds=None, until=0.0, finetune_steps=50))
    head = at(lines, "Decision table")
    assert lines[head].startswith(
        "Decision table (passkey: a copy trained at L for 300 steps (batches of seed 0); mean accuracy over 5 depths "
        "with its 95% Wilson interval over samples (one copy is one draw: copies of one model can read far apart; "
        "`--passkey-seeds 0 1 2` trains three); *far filler hidden*: the same samples at 1024 ")
    assert lines[head + 2:head + 7] == [
        "| method | stage | near-range ppl @ 256 | ppl @ 512 | ppl @ 1024 | passkey @ 256 | passkey @ 1024 | "
        "passkey @ 1024, far filler hidden | extra params | attention cost |",
        "|---|---|---|---|---|---|---|---|---|---|",
        "| original | before | 10.000 | 14.000 | 20.000 | 0.00 [0.00, 0.17] | 0.00 [0.00, 0.17] | — | +0 | 1.00× |",
        # PI with no fine-tune is not what the method ends with: no row of the decision table
        "| pi | fine-tuned 50 | 11.000 | 11.500 | 12.000 | 0.95 [0.75, 0.99] | 0.40 [0.21, 0.61] | 0.45 [0.26, 0.66] "
        "| +0 | 1.10× |",
        ""]
    # one copy: no "copies ≥ 0.9" column, no per-copy sentence; its only copy named without a seed
    rest = lines[head + 7:]
    assert not any(line.startswith("Each copy") for line in rest)
    assert rest[-1] == ("No passkey sample was solved at L = 256 by: original (before). The passkey fine-tune did not "
                        "teach that copy the task within its training length, so its passkey @ 1024 says nothing "
                        "about retrieval at 1024.")
    assert rest[:4] == ["With the far filler hidden, each copy that learned the task at L and lost some of it at 1024:", "",
                        "* pi (fine-tuned 50) solved 0.95 at L and 0.40 at 1024; with the far filler hidden 0.45: it "
                        "lost 0.55 past L, most of it not to the filler past L: to the key's distance itself, or what "
                        "far positions do to it (hiding gives back 0.05).", ""]
    assert not any(line.startswith(("The passkey copies had learned", "Answer bytes")) for line in rest)


def test_no_passkey_test_or_no_compare():
    lines = lines_of(result(one_copy_rows(), passkey_steps=0, finetune_steps=50))
    head = at(lines, "Decision table")
    assert lines[head:] == [
        "Decision table (no passkey test: --passkey-steps 0; attention cost: a forward pass at 1024 tokens relative "
        "to the original model, the median of 6 pairs timed back to back in this run, with the lowest and highest "
        "pair's ratio):", "",
        "| method | stage | near-range ppl @ 256 | ppl @ 512 | ppl @ 1024 | extra params | attention cost |",
        "|---|---|---|---|---|---|---|",
        "| original | before | 10.000 | 14.000 | 20.000 | +0 | 1.00× |",
        "| pi | fine-tuned 50 | 11.000 | 11.500 | 12.000 | +0 | 1.10× |"]
    assert lines[head - 1] == ""
    assert not any(line.startswith("Decision table") for line in lines_of(result(three_rows(), compare=False)))


def test_lengths_that_do_not_all_divide_the_longest_warn_that_each_scores_its_own_segments():
    lens = [256, 768, 1024]
    rows = three_rows()
    for r in rows:
        r["ppl"] = dict(zip(lens, r["ppl"].values()))
        r["window_loss"] = {256: [0.0] * 12, 768: [0.0] * 4, 1024: [0.0] * 3}
    first = lines_of(result(rows, lens=lens, compare=False))[0]
    assert (" **The lengths do not all divide 1024, so each scores segments of its own** (windows: 12 at 256, 4 at "
            "768, 3 at 1024): a row's ppl@1024 / ppl@256 compares other text as well as other lengths (between rows "
            "at one length the windows are the same); lengths that divide 1024 score the same tokens at every "
            "length.") in first
    assert "do not all divide" not in lines_of(result(three_rows(), compare=False))[0]
    without = result([], lens=lens, compare=False)
    assert report._own_segments(without).startswith(
        " **The lengths do not all divide 1024, so each scores segments of its own**: a row's")


def test_each_moved_tables_bucket_remap_follows_the_tables():
    remap = {"t5-distance": [(100, 20, 18), (500, 28, 24)]}
    lines = lines_of(result(three_rows(), compare=False, remap=remap))
    assert lines[-7:] == ["", "`t5-distance`: the learned table is kept, so distances land in other buckets:", "",
                          "| distance | bucket before | bucket after |", "|---|---|---|",
                          md_row((100, 20, 18)), md_row((500, 28, 24))]


def test_the_figure_has_a_line_per_row_a_colour_per_method_a_style_per_stage(saved_figures, tmp_path):
    rows = one_copy_rows() + [row("ntk", "no fine-tune", [10.5, 11.0, 12.0])]
    saved = json.loads(json.dumps(result(rows).to_json()))  # as read back: lengths are strings
    report.plot(saved, tmp_path / "p.png")
    ax = saved_figures["p.png"].axes[0]
    lines = {line.get_label(): line for line in ax.lines}
    assert list(lines) == ["original (before)", "pi (no fine-tune)", "pi (fine-tuned 50)", "ntk (no fine-tune)",
                           "training length"]
    for r in rows:
        line = lines[report._row_name(r)]
        assert [float(x) for x in line.get_xdata()] == [256.0, 512.0, 1024.0]  # in order of length, not of text
        assert [float(y) for y in line.get_ydata()] == list(r["ppl"].values())
        assert line.get_marker() == "o"
    styles = {name: lines[name].get_linestyle() for name in lines}
    assert styles["original (before)"] == ":" and styles["pi (no fine-tune)"] == styles["ntk (no fine-tune)"] == "--"
    assert styles["pi (fine-tuned 50)"] == "-"
    colours = {name: lines[name].get_color() for name in lines}
    assert colours["pi (no fine-tune)"] == colours["pi (fine-tuned 50)"]
    assert len({colours[n] for n in ("original (before)", "pi (no fine-tune)", "ntk (no fine-tune)")}) == 3
    assert [float(x) for x in lines["training length"].get_xdata()] == [256.0, 256.0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert ax.xaxis.get_transform().base == 2  # the lengths are powers of two
    assert ax.get_xlabel() == "evaluation length (tokens)" and ax.get_ylabel() == "perplexity (bytes)"
    assert ax.get_title() == "Retrofit to 1024 tokens (dotted: before, dashed: no fine-tune, solid: fine-tuned)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(lines)


def test_write_saves_the_three_files_and_says_when_the_figure_is_skipped(saved_figures, monkeypatch, tmp_path):
    res = result(three_rows(), paired=three_paired())
    said = []
    paths = report.write(res, tmp_path, log=said.append)
    assert [p.name for p in paths] == ["results.json", "results.md", "ppl_vs_length.png"]
    assert (tmp_path / "results.md").read_text() == report.markdown(res)
    assert json.loads((tmp_path / "results.json").read_text())["to"] == TO
    assert said == [] and "ppl_vs_length.png" in saved_figures
    from posbias import plot

    def missing():
        raise ValueError("matplotlib is not installed")

    other = result(three_rows())
    other.checkpoint = "runs/other/final"
    with monkeypatch.context() as patched:
        patched.setattr(plot, "pyplot", missing)
        paths = report.write(other, tmp_path, log=said.append)
    assert [p.name for p in paths] == ["results.json", "results.md"]
    assert said[-1] == "plot skipped: matplotlib is not installed"
    assert said[0].startswith(f"note: {tmp_path} held the report of another retrofit with other checkpoint;")


def test_at_l_the_rows_tied_with_the_original_keep_its_perplexity():
    """The near-range sentence with the original best: "no method keeps its perplexity" only where no
    row is tied with it (it once said so of a row the same sentence named as not distinguishable)."""
    rows = three_rows()
    best, tied, worse = Paired(1, 1, 1, best=True), Paired(1.01, 0.99, 1.03), Paired(1.5, 1.4, 1.6)
    say = lambda *t: report._best(list(t), rows, "L = 256", near=True)  # noqa: E731
    assert say(best, worse, worse) == ("* **At L = 256 the model as it was, with no retrofit, is best**; every other "
                                       "row is worse beyond the noise: no method here keeps its perplexity.")
    assert say(best, tied, worse).endswith("not distinguishable from it: pi (no fine-tune): only that row keeps its "
                                           "perplexity.")
    assert say(best, tied, tied).endswith("not distinguishable from it: pi (no fine-tune), ntk (no fine-tune): only "
                                          "those rows keep its perplexity.")
    # at the target length a tie improves on nothing
    assert report._best([best, tied, worse], rows, "1024").endswith(
        "not distinguishable from it: pi (no fine-tune): no method here improves on it.")


def test_several_untaught_copies_are_named_in_the_plural():
    rows = three_rows()
    rows[2]["passkey_copies"][L] = [0.0, 0.9, 0.95]
    assert lines_of(result(rows))[-1] == (
        "No passkey sample was solved at L = 256 by: original (before) seed 2, ntk (no fine-tune) seed 0. The passkey "
        "fine-tune did not teach those copies the task within their training length, so their passkey @ 1024 says "
        "nothing about retrieval at 1024 (yet each counts in its row's mean).")


def test_two_copies_are_several():
    """Two passkey seeds: the cells count the copies, the kept column and the per-copy sentence appear, and an
    untaught copy still counts in its row's mean."""
    rows = [row("original", "before", [10.0, 14.0, 20.0], final=True, cost=(1.0, 1.0, 1.0),
                key=key([1.0, 0.0], [0.3, 0.0], interval=((0.01, 0.99), (0.0, 0.52)))),
            row("pi", "no fine-tune", [12.0, 12.5, 13.0], final=True, cost=(1.0, 1.0, 1.0),
                key=key([1.0, 0.9], [0.5, 0.4], interval=((0.7, 1.0), (0.2, 0.7))))]
    lines = lines_of(result(rows, seeds=(0, 1)))
    head = at(lines, "Decision table")
    assert lines[head].startswith("Decision table (passkey: 2 copies, of seeds 0, 1, each trained at L for 300 steps")
    assert lines[head + 2].split(" | ")[7] == "passkey @ 1024, copies ≥ 0.9 at L"
    assert lines[head + 4].split(" | ")[5:8] == ["0.50 [0.01, 0.99] (2 copies)", "0.15 [0.00, 0.52] (2 copies)",
                                                 "0.30 [0.15, 0.52] (1 of 2)"]
    assert "Each copy, solved at L → at 1024: original (before) 1.00 → 0.30, 0.00 → 0.00; pi (no fine-tune) " \
           "1.00 → 0.50, 0.90 → 0.40." in lines
    assert lines[-1].endswith("says nothing about retrieval at 1024 (yet it counts in its row's mean).")
    assert lines[-1].startswith("No passkey sample was solved at L = 256 by: original (before) seed 1. ")
