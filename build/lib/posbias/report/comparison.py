"""Several diagnoses side by side: ``comparison.md``, ``comparison.json`` and ``comparison.png``.

``posbias diagnose`` given more than one checkpoint (or a study's output folder) diagnoses each on its
own (:func:`posbias.diagnose.run_diagnose`, each report in ``<out>/<model>/``) and writes here the
numbers that answer *why one model generalises and another does not*, one row per model: whether the
context past ``L`` helps or hurts, whether the distant keys themselves do (the tokens that keep local
context; the sliding-window counterfactual), how much attention goes to distances never seen in
training, whether the bias moves past ``L``, and passkey retrieval. Every Δ carries its interval and a
verdict read from it, never from a threshold of ours.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .. import passkey, store
from ..config import Log, quiet
from ..diagnose import DiagnoseResult, kept_row
from . import (copies_sentence, copy_names, corpus_name, digits_sentence, facing_end, kept_cell, kept_mean, kept_past_l,
               md_table, same_text)
from .diagnose import (DRIFT, delta_cell, far_attention, mean_losses, no_layers_between, run_length, run_positions,
                       smoothed, unseen_pairs)
from .diagnose import verdict as interval_verdict

Delta = tuple[float, float | None, float | None]  # mean Δ and its 95% interval (None with one window)


def row(name: str, r: DiagnoseResult) -> dict[str, Any]:
    """The comparable numbers of one diagnosis (a row of ``comparison.json``)."""
    full, cut = mean_losses(r)
    losses = torch.tensor(r.loss_by_position, dtype=torch.float64)
    kept = kept_row(r.context_split)
    got: dict[str, Any] = {
        "model": name, "checkpoint": r.checkpoint, "scheme": r.scheme_name, "options": r.options,
        "train_len": r.train_len, "length": r.length, "windows": r.loss_windows,
        "finetuned_at": (r.retrofit or {}).get("to") if (r.retrofit or {}).get("finetune_steps") else None,
        "ppl_below_L": math.exp(float(losses[:r.train_len].mean())),
        "ppl_last_half": math.exp(float(losses[r.length // 2:].mean())),
        "context": (full - cut, *r.loss_delta_interval),
        "distant_keys": None if kept is None else tuple(kept[2:]),
        "keys_beyond_L": tuple(r.window_split[0][1:]) if r.window_split else None,
        # window − cut at the chunks' last positions (the same keys in layer 1): far tokens through the layers
        # (none in a one-layer model of a bias of i − j: the window and the cut compute the same there)
        "through_layers": tuple(r.window_split[2][1:]) if len(r.window_split) > 2 and not no_layers_between(r) else None,
        "one_layer_of_offsets": no_layers_between(r),
        "attention_beyond_L": far_attention(r),
        "bias_drift": None if r.bias_drift is None else max(r.bias_drift),
        "rotary_unseen": None if r.rotary is None else (len(unseen_pairs(r)), len(r.rotary["unseen"])),
        # length → (mean accuracy over depths and copies, lowest and highest 95% Wilson bound of any copy)
        "passkey": None,
        "passkey_copies": None,  # length → each copy's accuracy (mean over depths), in the order of passkey_seeds
        "passkey_seeds": r.passkey_seeds or None,
        "passkey_digits": None,  # length → the score of each answer byte, mean over depths and copies
        "passkey_fits": [c["fit"] for c in r.passkey_copies] or None,  # each copy's fine-tune (passkey.teach's record)
        "passkey_trials": None,  # samples behind each copy's accuracy at one length (depths × samples per cell)
        # length past L → each copy's accuracy with the far filler hidden (diagnose.far_filler_scores)
        "passkey_hidden": None,
    }
    if r.passkey:
        trials = len(next(iter(r.passkey.values()))) * r.passkey_samples
        each = {int(n): r.copy_accuracy(n) for n in r.passkey}
        got["passkey_trials"] = trials
        got["passkey"] = {n: (passkey.mean_accuracy(r.passkey, str(n)), *passkey.copies_interval(copies, trials))
                          for n, copies in each.items()}
        got["passkey_copies"] = each
        hidden = {int(n): r.hidden_accuracy(n) for n in r.passkey if int(n) > r.train_len}
        got["passkey_hidden"] = {n: h for n, h in hidden.items() if h is not None} or None
        got["passkey_digits"] = {int(n): passkey.mean_digits(r.passkey_digits, n) for n in r.passkey_digits or {}}
    return got


def verdict(delta: Delta | None) -> str:
    """What a Δ's interval supports, in a word (:func:`posbias.report.diagnose.verdict`); — without a Δ."""
    return "—" if delta is None else interval_verdict(*delta[1:])


def _delta(delta: Delta | None) -> str:
    if delta is None:
        return "—"
    return f"{delta_cell(*delta)} {verdict(delta)}"


def _passkey(r: dict[str, Any], n: int) -> str:
    got = r["passkey"]
    if not got or n not in got:
        return "—"
    a, lo, hi = got[n]
    copies = len(r["passkey_copies"][n])
    return f"{a:.2f} [{lo:.2f}, {hi:.2f}]" + (f" ({copies} copies)" if copies > 1 else "")


def _kept(r: dict[str, Any]) -> str:
    """The passkey cell at the window of the copies that solved the task at L (:func:`kept_cell`)."""
    if not r["passkey"]:
        return "—"
    return kept_cell(r["passkey_copies"][r["train_len"]], r["passkey_copies"][_longest(r)], r["passkey_trials"])


def _several(rows: list[dict[str, Any]]) -> bool:
    """Whether some model has several passkey copies."""
    return any(r["passkey"] and len(r["passkey_seeds"] or []) > 1 for r in rows)


def markdown(rows: list[dict[str, Any]], results: list[DiagnoseResult]) -> str:
    """The comparison table and what it says, from :func:`row` of each diagnosis."""
    lines = [f"# Diagnosis of {len(rows)} checkpoints", "",
             "Each model diagnosed on its own, as `posbias diagnose` does one (its full report: "
             "`<model>/report.md`). Δ: the loss (nats/byte) of the same tokens with the whole window as context "
             "minus with the context cut at L, with its 95% bootstrap interval over the windows and what the "
             "interval supports (hurts: above 0; helps: below 0; ≈ 0: it spans 0). *Distant keys*: Δ over the "
             "tokens that keep local context after the cut; *keys beyond L*: the whole window against a sliding "
             "window of L over the same model; *far tokens through the layers*: that window against the cut at each "
             "chunk's last position, where both show the first layer the same keys, so what differs is tokens at "
             "distance ≥ L reaching the query through the keys' states (and, for absolute positions or a bias that moves with the "
             "query position, that position, which the cut restarts at 0). Passkey: mean accuracy over the depths (and the "
             "copies, where a model has several) with its 95% Wilson interval over samples; with several copies the "
             "interval runs from the lowest to the highest bound of any copy, so it spans how far the copies differ "
             "too." + (f" *Copies ≥ {passkey.LEARNED:g} at L*: the same at the window over only the copies that solved "
                       f"at least {passkey.LEARNED:g} at L, and how many of the model's copies they are: what a scheme "
                       "keeps past L, apart from whether a copy's fine-tune taught it the task." if _several(rows) else "")
             + f" {_corpus(rows, results)}", ""]
    lines += md_table(
        ["model", "L → window", "ppl, positions < L", "ppl, last half of the window", "context past L, Δ", "distant keys, Δ",
         "keys beyond L, Δ", "far tokens through the layers, Δ", "attention ≥ L, last quarter (mean / largest head)", "bias drift, nats",
         "passkey @ L", "passkey @ window"] + ([f"passkey @ window, copies ≥ {passkey.LEARNED:g} at L"] if _several(rows)
                                                else []),
        [[r["model"], _lengths(r), f"{r['ppl_below_L']:.3f}", f"{r['ppl_last_half']:.3f}",
          _delta(r["context"]), _delta(r["distant_keys"]), _delta(r["keys_beyond_L"]), _through(r),
          "—" if r["attention_beyond_L"] is None else "{:.4f} / {:.4f}".format(*r["attention_beyond_L"]),
          "—" if r["bias_drift"] is None else f"{r['bias_drift']:.2f}",
          _passkey(r, r["train_len"]), _passkey(r, _longest(r))] + ([_kept(r)] if _several(rows) else [])
         for r in rows])
    return "\n".join(lines + ["", "## What the table says", ""] + [f"* {s}" for s in sentences(rows)]
                     + ["", "![comparison](comparison.png)", ""])


def _through(r: dict[str, Any]) -> str:
    """The through-the-layers cell: its Δ, or why a one-layer model has none."""
    if r.get("one_layer_of_offsets"):
        return "none (1 layer)"
    return _delta(r["through_layers"])


def _corpus(rows: list[dict[str, Any]], results: list[DiagnoseResult]) -> str:
    """The text measured on, and the models that record another training text (or none)."""
    first = results[0]
    if not first.corpus:
        return ""
    other = [row["model"] for row, r in zip(rows, results) if not same_text(first.corpus, r.trained_corpus)]
    line = f"Measured on the validation split of {corpus_name(first.corpus)}"
    if not other:
        return line + ", the text every model was trained on."
    return line + f"; **not** (or not recorded as) the text these were trained on: {', '.join(other)}."


def _lengths(r: dict[str, Any]) -> str:
    """``L → window``, with a retrofit's fine-tuning length."""
    tuned = "" if r["finetuned_at"] is None else f" (fine-tuned at {r['finetuned_at']})"
    return f"{r['train_len']}{tuned} → {r['length']}"


def _longest(r: dict[str, Any]) -> int:
    return max(r["passkey"]) if r["passkey"] else r["length"]


_PLURAL = {"hurts": "hurt", "helps": "help", "≈ 0": "make no difference this evaluation can see",
           "no interval": "cannot be judged (one window)"}  # a verdict said of several models


def sentences(rows: list[dict[str, Any]]) -> list[str]:
    """The table in sentences: models grouped by each verdict, the extremes of attention on unseen
    distances, the biases that move past L, the best passkey retrieval at the window."""
    said = []
    for key, what in (("context", "The context past L"), ("distant_keys", "For tokens that keep local context, "
                                                                          "the distant keys"),
                      ("keys_beyond_L", "Against a sliding window of L, the keys beyond L"),
                      ("through_layers", "At chunk ends, where a window of L and the cut show the same keys, far "
                                         "tokens reaching the query through the layers")):
        groups: dict[str, list[str]] = {}
        for r in rows:
            if r[key] is not None:
                groups.setdefault(verdict(r[key]), []).append(r["model"])
        if groups:
            said.append(f"{what}: " + "; ".join(f"{word} in {', '.join(groups[v])}" for v, word in _PLURAL.items()
                                                if v in groups) + _nearest_zero(rows, key) + ".")
    seen = [r for r in rows if r["attention_beyond_L"] is not None]
    if len(seen) > 1:
        most = max(seen, key=lambda r: r["attention_beyond_L"][0])
        least = min(seen, key=lambda r: r["attention_beyond_L"][0])
        high, low = (f"{r['attention_beyond_L'][0]:.4f}" for r in (most, least))
        said.append("Attention on distances ≥ L (never seen in the training at L; last quarter of the window) is "
                    + (f"{high} in every model." if high == low else  # a tie would name one model largest and smallest
                       f"largest in {most['model']} ({high}) and smallest in {least['model']} ({low})."))
    moving = [r for r in rows if r["bias_drift"] is not None and r["bias_drift"] >= DRIFT]
    if moving:
        said.append("The bias moves with the query position past L in " + ", ".join(
            f"{r['model']} (up to {r['bias_drift']:.2f} nats)" for r in moving) + "; in the others it depends on "
            "i − j alone, or there is none.")
    rotary = [r for r in rows if r["rotary_unseen"] is not None]
    if rotary:
        said.append("Rotary pairs that meet angles past L never seen in the training at L: " + ", ".join(
            f"{r['rotary_unseen'][0]} of {r['rotary_unseen'][1]} in {r['model']}" for r in rotary) + ".")
    learned = passkey.learned_sentence([(name, fit) for r in rows for name, fit in _copies(r, r.get("passkey_fits"))])
    if learned:
        said.append(learned)
    said += _passkey_sentences(rows)
    return said


def _nearest_zero(rows: list[dict[str, Any]], key: str) -> str:
    """Among the models whose Δ under ``key`` helps or hurts, the interval end nearest 0, as a clause
    (empty with fewer than two models or no such verdict). A verdict is only as firm as that end: the
    demo's ALiBi distant keys hurt in two seeds of three on 32 windows and in all three on 64
    (docs/retrofit-and-diagnose.md)."""
    judged = [(r["model"], facing_end(r[key][1], r[key][2], 0.0)) for r in rows
              if r[key] is not None and verdict(r[key]) in ("hurts", "helps")]
    if len(rows) < 2 or not judged:
        return ""
    model, end = min(judged, key=lambda m: abs(m[1]))
    return f" (the verdict nearest to turning: {model}, whose interval ends at {delta_cell(end, None, None)})"


def _copies(r: dict[str, Any], values: list | None) -> list[tuple[str, Any]]:
    """``values`` (one per passkey copy) named by the model, and by the seed where it has several."""
    return list(zip(copy_names(r["model"], r.get("passkey_seeds") or []), values or []))


def _passkey_sentences(rows: list[dict[str, Any]]) -> list[str]:
    """Passkey retrieval across the models: those untaught at L, each copy where a model has several,
    and the best at the window's length with the models whose interval reaches it."""
    said = []
    tested = [r for r in rows if r["passkey"] and r["passkey"][r["train_len"]][0] > 0]
    untaught = [r["model"] for r in rows if r["passkey"] and r["passkey"][r["train_len"]][0] == 0]
    if untaught:
        bytes_at_l = digits_sentence([(r["model"], r["passkey_digits"][r["train_len"]]) for r in rows
                                      if r["model"] in untaught and r["passkey_digits"]], "at L")
        said.append(_joined(f"The passkey fine-tune did not teach the task at L to {', '.join(untaught)} (no sample "
                            "solved there): their passkey columns say nothing about retrieval past L; raise "
                            "--passkey-steps.", bytes_at_l))
    several = [r for r in tested if len(r["passkey_copies"][r["train_len"]]) > 1]
    if several:
        lost = [name for r in several for name, a in _copies(r, r["passkey_copies"][r["train_len"]]) if a == 0]
        said.append(_joined(
            copies_sentence([(r["model"], r["passkey_copies"][r["train_len"]], r["passkey_copies"][_longest(r)])
                             for r in several], "at the window's length"),
            f"Copies that solved no sample at L (past L they say nothing about retrieval, yet count in their "
            f"model's mean): {', '.join(lost)}." if lost else ""))
        said.append(_kept_sentence(several))
    hidden = _hidden_sentence(tested)
    if hidden:
        said.append(hidden)
    if tested:
        best = max(r["passkey"][_longest(r)][0] for r in tested)
        tied = [r["model"] for r in tested if r["passkey"][_longest(r)][2] >= best]
        bytes_far = digits_sentence([(r["model"], r["passkey_digits"][_longest(r)]) for r in tested
                                     if r["passkey_digits"]], "at the window's length")
        how = ("(the interval of a model with several copies runs from its lowest copy's bound to its highest's)"
               if any(r in several for r in tested) else "(one copy each: the intervals are over samples, not over "
               "copies, which can differ far more; `--passkey-seeds 0 1 2` trains three)")
        said.append(_joined(f"Passkey retrieval at the window's length, among the models that solve samples at L "
                            f"(mean over copies): best {best:.2f}; models whose interval reaches it: {', '.join(tied)} "
                            f"{how}.", bytes_far))
    return said


def _kept_sentence(rows: list[dict[str, Any]]) -> str:
    """Retrieval at the window by the copies that learned the task at L, model by model, and the
    models none of whose copies did."""
    kept = [(r["model"], kept_past_l(r["passkey_copies"][r["train_len"]], r["passkey_copies"][_longest(r)]),
             len(r["passkey_seeds"])) for r in rows]
    learned = [(name, k, n) for name, k, n in kept if k]
    never = [name for name, k, _ in kept if not k]
    return _joined(
        f"Of the copies that solved at least {passkey.LEARNED:g} at L, solved at the window's length (their mean; "
        "what a scheme keeps past L once a copy has learned the task, whatever share of copies learns it): "
        + "; ".join(f"{name} {sum(k) / len(k):.2f} ({len(k)} of {n})" for name, k, n in learned) + "."
        if learned else "",
        f"No copy of {', '.join(never)} solved {passkey.LEARNED:g} at L." if never else "")


def _hidden_sentence(rows: list[dict[str, Any]]) -> str:
    """At the window, the copies that solved the task at L as they are → with the far filler hidden
    (the key at its distance, every other key past L hidden), model by model."""
    named = []
    for r in rows:
        far = _longest(r)
        hidden = (r.get("passkey_hidden") or {}).get(far)
        if hidden is None:
            continue
        at_l = r["passkey_copies"][r["train_len"]]
        got, hid = kept_mean(at_l, r["passkey_copies"][far]), kept_mean(at_l, hidden)
        if got is not None:
            named.append(f"{r['model']} {got:.2f} → {hid:.2f}")
    return ("With the filler past L hidden (the key kept at its distance), the copies that solved at least "
            f"{passkey.LEARNED:g} at L solve at the window's length (as they are → hidden; retrieval that comes back "
            "was lost to the far filler, not to the key's distance): " + "; ".join(named) + ".") if named else ""


def _joined(*sentences: str) -> str:
    """Sentences as one line, leaving out the empty ones."""
    return " ".join(s for s in sentences if s)


def write(named: list[tuple[str, DiagnoseResult]], out: str | Path, *, log: Log = quiet) -> list[Path]:
    """``comparison.md``, ``comparison.json`` and ``comparison.png`` of the diagnoses ``named`` in ``out``."""
    out = Path(out)
    rows = [row(name, r) for name, r in named]
    results = [r for _, r in named]
    paths = [store.write_json(out / "comparison.json", {"rows": rows}),
             store.write_text(out / "comparison.md", markdown(rows, results))]
    try:
        paths.append(plot(named, out / "comparison.png"))
    except ValueError as exc:  # matplotlib missing: the table and JSON are still written
        log(f"plot skipped: {exc}")
    return paths


def _passkey_lines(axes, name: str, r: DiagnoseResult, color, learned) -> None:
    """A model's passkey lines: its mean accuracy by length with the band of its copies on
    ``axes[0]``, and (``learned``, :func:`_learned_lines`) its copies that learned the task at L as
    they are and with the far filler hidden on ``axes[1]``."""
    lens = [int(n) for n in r.passkey]
    taught = passkey.mean_accuracy(r.passkey, str(r.train_len)) > 0
    xs = [n / r.train_len for n in lens]
    copies = len(r.passkey_copies)
    axes[0].plot(xs, [passkey.mean_accuracy(r.passkey, str(n)) for n in lens], marker="o", ms=3, lw=1.2,
                 ls="-" if taught else ":", color=color,
                 label=(name if taught else f"{name} (untaught at L)") + (f", {copies} copies" if copies > 1 else ""))
    if copies > 1:  # the band: the lowest and highest copy
        each = [r.copy_accuracy(str(n)) for n in lens]
        axes[0].fill_between(xs, [min(a) for a in each], [max(a) for a in each], color=color, alpha=0.15, lw=0)
    if learned:
        (xs, got, hid), k = learned
        axes[1].plot(xs, got, marker="o", ms=3, lw=1.2, color=color, label=f"{name} ({k} of {copies})")
        axes[1].plot(xs, hid, marker="x", ms=4, lw=1.2, ls="--", color=color)


def _passkey_axis(ax, ylabel: str, title: str) -> None:
    """A passkey panel's axes: sample length / L on a log₂ scale, accuracy 0–1, a legend."""
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.set_xlabel("passkey sample length / L")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(title)
    ax.legend(fontsize=7)


def _learned_lines(r: DiagnoseResult) -> tuple[tuple[list[float], list[float], list[float]], int] | None:
    """For the comparison plot's last panel: lengths / L, and the mean accuracy of the copies that
    solved ≥ :data:`posbias.passkey.LEARNED` at L as they are and with the far filler hidden (at L
    nothing is hidden), with how many copies those are; None without such copies or hidden cells."""
    lens = [n for n in r.passkey if int(n) > r.train_len]
    at_l = r.copy_accuracy(str(r.train_len))
    first = kept_mean(at_l, at_l)
    if not lens or first is None or any(r.hidden_accuracy(n) is None for n in lens):
        return None
    got = [first] + [kept_mean(at_l, r.copy_accuracy(n)) for n in lens]
    hid = [first] + [kept_mean(at_l, r.hidden_accuracy(n)) for n in lens]
    return ([1.0] + [int(n) / r.train_len for n in lens], got, hid), len(kept_past_l(at_l, at_l))


def plot(named: list[tuple[str, DiagnoseResult]], path: Path) -> Path:
    """One line per model, positions in units of L: Δ (full − cut) by position, the attention on keys
    at distance ≥ L (mean over layers and heads) by query position, and, where the models were given
    the passkey test, its mean accuracy by length (dotted: copies that solved no sample at L, whose
    line says nothing about retrieval past L; shaded: from the lowest copy to the highest, where a model
    has several), and where the far filler was hidden, the copies that learned the task at L as they
    are and with it hidden."""
    from ..plot import pyplot, save_figure

    plt = pyplot()
    keyed = [r for _, r in named if r.passkey]
    learned = {id(r): _learned_lines(r) for r in keyed}
    panels = 2 + bool(keyed) + any(learned.values())
    rows = 2 if panels == 4 else 1  # four panels as two rows of two
    fig, axes = plt.subplots(rows, panels // rows, figsize=(5.7 * panels / rows, 4.2 * rows), squeeze=False)
    axes = axes.flatten()
    left, right = axes[0], axes[1]
    for name, r in named:
        k = run_length(r.length)
        delta = torch.tensor(r.loss_by_position) - torch.tensor(r.loss_by_position_cut_at_L)
        smooth = smoothed(delta, k)
        xs = run_positions(len(delta), k) / r.train_len
        line, = left.plot(xs.numpy(), smooth.numpy(), lw=1.2, label=name)
        if "beyond" in r.attention_distance:
            far = torch.tensor(r.attention_distance["beyond"]).mean((0, 1))
            right.plot(xs.numpy(), smoothed(far, k).numpy(), lw=1.2, color=line.get_color(), label=name)
        if r.passkey:
            _passkey_lines(axes[2:], name, r, line.get_color(), learned[id(r)])
    left.axhline(0, color="grey", lw=0.8)
    left.set_ylabel("Δ loss, full − cut at L (nats/byte)")
    left.set_title("what the context past L does (< 0: helps)")
    right.set_ylabel("attention at distance ≥ L")
    right.set_title("attention on distances never seen in training")
    for ax in axes:
        ax.axvline(1, color="grey", ls="--", lw=1)
        ax.set_xlabel("position / L")
        ax.grid(alpha=0.3)
    if keyed:
        _passkey_axis(axes[2], "passkey accuracy (mean over depths)", "retrieval past L, copies fine-tuned at L")
    if panels == 4:
        _passkey_axis(axes[3], f"mean accuracy, copies ≥ {passkey.LEARNED:g} at L",
                      "copies that learned: as they are (—), far filler hidden (- -)")
    left.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
