"""The retrofit report: ``results.json``, ``results.md`` (before/after perplexity; with ``compare``
the decision table; T5's bucket moves) and ``ppl_vs_length.png``, from a
:class:`posbias.retrofit.RetrofitResult`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from .. import passkey, store
from ..config import Log, quiet
from ..evaluate import Paired
from ..retrofit import COST_PAIRS, PASSKEY_DEPTHS, RetrofitResult
from . import (copies_cell, copies_sentence, copy_names, corpus_line, digits_sentence, far_filler_sentences, few_segments,
               best_and_tied, kept_cell, md_table, note_replaced, paired_cell, tied_clause)

STAGE_STYLES = {"before": ":", "no fine-tune": "--"}  # fine-tuned stages: solid


def write(result: RetrofitResult, out: str | Path, *, log: Log = quiet) -> list[Path]:
    """Write ``results.json``, ``results.md`` and ``ppl_vs_length.png`` into ``out``."""
    out, saved = Path(out), result.to_json()
    note_replaced(out / "results.json", saved, ("checkpoint", "config", "corpus"), "another retrofit", log)
    paths = [store.write_json(out / "results.json", saved), store.write_text(out / "results.md", markdown(result))]
    try:
        paths.append(plot(saved, out / "ppl_vs_length.png"))
    except ValueError as exc:  # matplotlib missing
        log(f"plot skipped: {exc}")
    return paths


def _row_name(r: dict[str, Any]) -> str:
    """A row as the report names it: ``method (stage)``."""
    return f"{r['method']} ({r['stage']})"


def _passkey_cell(r: dict[str, Any], n: int) -> str:
    lo, hi = r["passkey_interval"][n]
    copies = len(r["passkey_copies"][n])
    return f"{r['passkey'][n]:.2f} [{lo:.2f}, {hi:.2f}]" + (f" ({copies} copies)" if copies > 1 else "")


def _hidden_cell(r: dict[str, Any], n: int, trials: int) -> str:
    """A row's passkey at ``n`` with the far filler hidden, as :func:`_passkey_cell` (— where not measured)."""
    got = (r.get("passkey_hidden") or {}).get(n)
    return copies_cell(got, trials) if got else "—"


def _hidden_sentences(rows: list[dict[str, Any]], L: int, to: int) -> list[str]:
    """:func:`posbias.report.far_filler_sentences` of every copy of every row, at ``to``."""
    named = [(name, a, b, h) for r in rows if (r.get("passkey_hidden") or {}).get(to)
             for name, a, b, h in zip(copy_names(_row_name(r), r["passkey_seeds"]),
                                      r["passkey_copies"][L], r["passkey_copies"][to], r["passkey_hidden"][to])]
    return far_filler_sentences(named, f"at {to}")


def _row_copies(r: dict[str, Any]) -> list[tuple[str, Any]]:
    """A row's passkey copies named ``method (stage)``, with ``seed K`` where it has several, each
    with its fine-tune's record."""
    return list(zip(copy_names(_row_name(r), r["passkey_seeds"]), r["passkey_fits"]))


def summary(result: RetrofitResult) -> list[str]:
    """The decision in sentences, from the paired comparisons (``result.paired``) and no threshold of ours:
    at the target length the best row, the rows not distinguishable from it, and whether the model as
    it was (no retrofit) is among them, when a retrofit gains nothing beyond the noise there; the same at
    L, what each method costs in the near range."""
    rows, to, L, paired = result.rows, result.to, result.train_len, result.paired
    if to not in paired:
        return []
    lines = [_best(paired[to], rows, f"{to}")]
    if L in paired:
        lines.append(_best(paired[L], rows, f"L = {L} (the near range)", near=True))
    return lines + ["(Each row against the best, paired over the same windows: *Which differences are real*, below.)", ""]


def _best(table: list[Paired], rows: list[dict[str, Any]], where: str, *, near: bool = False) -> str:
    """One summary sentence: the best row at ``where``, those not distinguishable from it, and the
    original model's place among them. Where the original is best, no method improves on it at the
    target length; ``near`` (at L), the rows tied with it keep its perplexity, and "no method keeps it"
    is said only when none is tied."""
    best, tied = best_and_tied(table)
    others = tied_clause([_row_name(rows[j]) for j in tied], "row")
    if rows[best]["method"] == "original":
        if not near:
            said = "no method here improves on it"
        elif tied:
            said = f"only {'that row keeps' if len(tied) == 1 else 'those rows keep'} its perplexity"
        else:
            said = "no method here keeps its perplexity"
        return f"* **At {where} the model as it was, with no retrofit, is best**{others}: {said}."
    original = any(rows[j]["method"] == "original" for j in tied)
    return (f"* **Best at {where}: {_row_name(rows[best])}**{others}"
            + (". The model as it was is among them: no retrofit here gains anything beyond the noise." if original
               else "."))


def _paired_section(result: RetrofitResult) -> list[str]:
    """Each row's perplexity relative to the best row's at L and every length past it, paired over the same
    windows (``result.paired``: :func:`posbias.retrofit.compare_rows`)."""
    paired, rows = result.paired, result.rows
    if not paired:
        return []
    lens = list(paired)
    windows = ", ".join(f"{len(rows[0]['window_loss'][n])} at {n}" for n in lens)
    return ["", "Which differences are real: perplexity relative to the best row at each length, 95% interval "
            f"paired over the same windows ({windows}); (≈ best): not distinguishable from the best at this "
            "evaluation size." + (f" {few}" if (few := few_segments(len(rows[0]["window_loss"][lens[-1]]), "window"))
                                  else ""), ""] + md_table(
        ["method", "stage", *(f"@ {n}" for n in lens)],
        [[r["method"], r["stage"], *(paired_cell(paired[n][j]) for n in lens)] for j, r in enumerate(rows)])


def _cost_words(to: int) -> str:
    return (f"attention cost: a forward pass at {to} tokens relative to the original model, the median of "
            f"{COST_PAIRS} pairs timed back to back in this run, with the lowest and highest pair's ratio")


def _cost_cell(r: dict[str, Any]) -> str:
    """``1.04× (0.97–1.10)``: the median of the timed pairs' ratios and the lowest and highest."""
    lo, hi = r["attention_cost_range"]
    return f"{r['attention_cost']:.2f}×" + ("" if lo == hi else f" ({lo:.2f}–{hi:.2f})")


def _decision_section(result: RetrofitResult) -> list[str]:
    """The decision table (passkey, far filler hidden, extra parameters, attention cost) and what it says
    of the passkey copies; nothing without ``--compare``."""
    lens, L, to, rows = result.eval_lens, result.train_len, result.to, result.rows
    cfg = result.config
    if not cfg.compare:
        return []
    far = [n for n in lens if n > L]
    finals = [r for r in rows if r.get("final")]  # what each method ends with
    cols: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("method", lambda r: r["method"]), ("stage", lambda r: r["stage"]),
        (f"near-range ppl @ {L}", lambda r: f"{r['ppl'][L]:.3f}"),
        *((f"ppl @ {n}", lambda r, n=n: f"{r['ppl'][n]:.3f}") for n in far)]
    seeds, several = cfg.copy_seeds, len(cfg.copy_seeds) > 1
    trials = PASSKEY_DEPTHS * cfg.passkey_samples
    if cfg.passkey_steps:
        cols += [(f"passkey @ {L}", lambda r: _passkey_cell(r, L)), (f"passkey @ {to}", lambda r: _passkey_cell(r, to)),
                 *([(f"passkey @ {to}, copies ≥ {passkey.LEARNED:g} at L",
                     lambda r: kept_cell(r["passkey_copies"][L], r["passkey_copies"][to], trials))] if several else []),
                 (f"passkey @ {to}, far filler hidden", lambda r: _hidden_cell(r, to, trials))]
    cols += [("extra params", lambda r: f"{r['extra_params']:+d}"), ("attention cost", _cost_cell)]
    table = md_table([head for head, _ in cols], [[cell(r) for _, cell in cols] for r in finals])
    if not cfg.passkey_steps:  # no passkey test: perplexity, extra parameters and attention cost
        return ["", f"Decision table (no passkey test: --passkey-steps 0; {_cost_words(to)}):", ""] + table
    taught = (f"a copy trained at L for {cfg.passkey_steps} steps (batches of seed {seeds[0]})" if len(seeds) == 1
              else f"{len(seeds)} copies, of seeds {', '.join(map(str, seeds))}, each trained at L for "
              f"{cfg.passkey_steps} steps") + (
        f", fewer once it solved {cfg.passkey_until:g} of a probe there" if cfg.passkey_until else "")
    over = ("with its 95% Wilson interval over samples (one copy is one draw: copies of one model can read far "
            "apart; `--passkey-seeds 0 1 2` trains three)" if len(seeds) == 1 else
            "and copies, with the 95% Wilson interval from the lowest copy's bound to the highest's; *copies ≥ "
            f"{passkey.LEARNED:g} at L*: the same at {to} over only the copies that solved at least "
            f"{passkey.LEARNED:g} at L, what a method keeps once a copy has learned the task")
    lines = ["", f"Decision table (passkey: {taught}; mean accuracy over {PASSKEY_DEPTHS} depths {over}; "
             f"*far filler hidden*: the same samples at {to} with every key at distance ≥ L hidden except the "
             "key statement, in every layer, so the key keeps its distance and rotation and only the filler "
             f"beyond L is gone; {_cost_words(to)}):", ""] + table
    learned = passkey.learned_sentence([item for r in finals for item in _row_copies(r)])
    if learned:
        lines += ["", learned]
    hidden = _hidden_sentences(finals, L, to)
    if hidden:
        lines += ["", "With the far filler hidden, each copy that learned the task at L and lost some of it at "
                  f"{to}:", "", *(f"* {h}" for h in hidden)]
    if several:
        lines += ["", copies_sentence([(_row_name(r), r["passkey_copies"][L],
                                        r["passkey_copies"][to]) for r in finals], f"at {to}")]
    digits = [(_row_name(r), r["passkey_digits"][to]) for r in finals if r.get("passkey_digits")]
    if digits:
        lines += ["", digits_sentence(digits, f"at {to}")]
    untaught = [name for r in finals
                for name, a in zip((n for n, _ in _row_copies(r)), r["passkey_copies"][L]) if a == 0]
    if untaught:
        copies, its, each = ("that copy", "its", "it") if len(untaught) == 1 else ("those copies", "their", "each")
        lines += ["", f"No passkey sample was solved at L = {L} by: {', '.join(untaught)}. The passkey fine-tune "
                  f"did not teach {copies} the task within {its} training length, so {its} passkey @ {to} says "
                  f"nothing about retrieval at {to}" + (f" (yet {each} counts in its row's mean)." if len(seeds) > 1
                                                        else ".")]
    return lines


def _own_segments(result: RetrofitResult) -> str:
    """The header's warning when the lengths do not all divide the longest: each length then scores
    segments of its own (retrofit.Job.span is None), so a row compared across lengths reads other text."""
    longest = max(result.eval_lens)
    if all(longest % n == 0 for n in result.eval_lens):
        return ""
    windows = ", ".join(f"{len(result.rows[0]['window_loss'][n])} at {n}" for n in result.eval_lens) if result.rows else ""
    return (f" **The lengths do not all divide {longest}, so each scores segments of its own**"
            f"{f' (windows: {windows})' if windows else ''}: a row's ppl@{result.to} / ppl@{result.train_len} compares "
            f"other text as well as other lengths (between rows at one length the windows are the same); "
            f"lengths that divide {longest} score the same tokens at every length.")


def markdown(result: RetrofitResult) -> str:
    lens, L, to, rows = result.eval_lens, result.train_len, result.to, result.rows
    ref = rows[0]["ppl"].get(L, math.nan)
    tuned = result.config.finetune_steps or (result.config.compare and result.config.passkey_steps)
    lines = [f"Retrofit of `{result.checkpoint}` (trained at L = {L}) to {to} tokens. "
             f"{corpus_line(result.corpus, result.trained_corpus)} Perplexity: up to {result.eval_tokens:,} "
             "validation tokens in segments spread evenly over the split." + _own_segments(result)
             + (f" Fine-tunes train the positional parameters at {result.pos_lr_mult:g}× their learning rate"
                f"{' (as the checkpoint was trained)' if result.config.pos_lr_mult is None else ''}." if tuned else "")
             + (f" The rows fine-tuned {result.config.finetune_steps} steps at {to} are set against the model before "
                "any fine-tune, not against the same fine-tune without a retrofit, which can do most of their gain "
                "(docs/retrofit-and-diagnose.md, \"The control the fine-tuned table lacks\", measures that row)."
                if result.config.finetune_steps else ""),
             ""] + summary(result) + md_table(
        ["method", "stage", *(f"ppl @ {n}" for n in lens), f"ppl@{to} / ppl@{L} (before)"],
        [[r["method"], r["stage"], *(f"{r['ppl'][n]:.3f}" for n in lens), f"{r['ppl'][to] / ref:.2f}"] for r in rows])
    lines += _paired_section(result)
    lines += _decision_section(result)
    for m, remap in result.bucket_remap.items():
        lines += ["", f"`{m}`: the learned table is kept, so distances land in other buckets:", ""]
        lines += md_table(["distance", "bucket before", "bucket after"], remap)
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> Path:
    """One colour per method, one line style per stage (dotted: before, dashed: no fine-tune, solid:
    fine-tuned), legend outside the axes so it never covers the data. ``result`` is the JSON form."""
    from ..plot import plain_log_ticks, pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    cmap = plt.get_cmap("tab10")  # ten colours: the original and every method of METHODS (seven) fit
    colour = {m: cmap(k) for k, m in enumerate(methods)}
    for r in result["rows"]:
        xs = sorted(r["ppl"], key=int)
        ax.plot([int(x) for x in xs], [r["ppl"][n] for n in xs], STAGE_STYLES.get(r["stage"], "-"), marker="o",
                ms=4, color=colour[r["method"]], label=_row_name(r))
    ax.axvline(result["train_len"], color="grey", ls=":", lw=1, label="training length")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    plain_log_ticks(ax)
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("perplexity (bytes)")
    ax.set_title(f"Retrofit to {result['to']} tokens (dotted: before, dashed: no fine-tune, solid: fine-tuned)",
                 fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)
