"""The diagnosis report: ``report.md``, ``diagnose.json`` and PNGs (loss by position, attention
distance, the bias, passkey accuracy), from a :class:`posbias.diagnose.DiagnoseResult`."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .. import passkey, store
from ..config import Log, quiet
from ..diagnose import ANSWER_SAMPLES, DiagnoseResult, kept_row
from ..schemes.options import options_text
from . import corpus_line, far_filler_sentences, few_segments, kept_mean, kept_past_l, md_table, shuffled_key_score


def write(result: DiagnoseResult, out: str | Path, *, log: Log = quiet) -> list[Path]:
    """Write ``diagnose.json``, ``report.md`` and the PNGs into ``out``; returns the paths written."""
    out = Path(out)
    paths = [store.write_json(out / "diagnose.json", result.to_json()),
             store.write_text(out / "report.md", markdown(result))]
    try:
        paths += plots(result, out)
    except ValueError as exc:  # matplotlib missing: the report and JSON are still written
        log(f"plots skipped: {exc}")
    return paths


def mean_losses(r: DiagnoseResult) -> tuple[float, float]:
    """Mean loss with the full context and cut at L, over every position (float64, as measured)."""
    return tuple(float(torch.tensor(x, dtype=torch.float64).mean())
                 for x in (r.loss_by_position, r.loss_by_position_cut_at_L))


DRIFT = 1e-4  # nats: a bias drift below this is float rounding, the bias depends on i − j alone


def bias_moves(r: DiagnoseResult) -> bool:
    """Whether the bias moves with the query position past L (:func:`posbias.diagnose.bias_drift`)."""
    return r.bias_drift is not None and max(r.bias_drift) >= DRIFT


def summary(r: DiagnoseResult) -> list[str]:
    """The verdicts of the report in a few lines, for the terminal."""
    full, cut = mean_losses(r)
    lo, hi = r.loss_delta_interval
    lines = [f"context past L = {r.train_len} (Δ {delta_cell(full - cut, lo, hi)}): "
             f"{_context_verdict(lo, hi, r.loss_windows)}"]
    kept = kept_row(r.context_split)
    if kept is not None:
        _, _, d, lo, hi = kept
        lines.append(f"distant keys, for tokens that keep local context (Δ {delta_cell(d, lo, hi)}): "
                     f"{_context_verdict(lo, hi, r.loss_windows)}")
    if r.window_split:
        _, d, lo, hi = r.window_split[0]
        lines.append(f"keys beyond L, against a sliding window of L (Δ {delta_cell(d, lo, hi)}): "
                     f"{_context_verdict(lo, hi, r.loss_windows)}")
    if len(r.window_split) > 2:
        _, d, lo, hi = r.window_split[2]
        also = _position_moves(r)
        lines.append(f"far tokens through the layers{f' and {also}' if also else ''}, at chunk ends where a window "
                     f"of L and the cut show the same keys (Δ {delta_cell(d, lo, hi)}): "
                     + _through_verdict(r, lo, hi))
    far = far_attention(r)
    if far is not None:
        lines.append(f"attention at distances ≥ L over the last {r.length // 4} queries: {far[0]:.4f} "
                     f"(largest head {far[1]:.4f})")
    if bias_moves(r):
        lines.append(f"the bias moves with the query position: up to {max(r.bias_drift):.2f} nats at trained distances")
    if r.passkey:
        copies = r.passkey_copies

        def at(n: str) -> str:
            each = "" if len(copies) == 1 else " (" + " / ".join(f"{a:.2f}" for a in r.copy_accuracy(n)) + ")"
            return f"{passkey.mean_accuracy(r.passkey, n):.2f}{each}"

        whose = "one copy" if len(copies) == 1 else f"mean of {len(copies)} copies, seeds " + ", ".join(
            str(c["seed"]) for c in copies)
        far = max(r.passkey, key=int)
        kept = kept_past_l(r.copy_accuracy(str(r.train_len)), r.copy_accuracy(far))
        learned = ("" if len(copies) == 1 else
                   f"; no copy solved ≥ {passkey.LEARNED:g} at L" if not kept else
                   f"; the {len(kept)} of {len(copies)} copies that solved ≥ {passkey.LEARNED:g} at L: "
                   f"{sum(kept) / len(kept):.2f} at {far}")
        hid = r.hidden_accuracy(far)
        hidden = ("" if hid is None else f"; far filler hidden: {sum(hid) / len(hid):.2f}" + (
            "" if len(copies) == 1 else " (" + " / ".join(f"{a:.2f}" for a in hid) + ")") + f" at {far}")
        if int(far) == r.train_len:  # a window short of 2 L: the grid (L, 2 L, … ≤ the window) is L alone
            lines.append(f"passkey solved ({whose}; mean over depths): {at(far)} at L; none past it (the grid runs "
                         f"at L, 2 L, … up to the {r.length}-token window)")
        else:
            lines.append(f"passkey solved ({whose}; mean over depths): {at(str(r.train_len))} at L, {at(far)} at "
                         f"{far}" + learned + hidden)
    return lines


def markdown(r: DiagnoseResult) -> str:
    options = options_text(r.options or {}, "")
    opening = (f"Scheme **{r.scheme_name}**{f' ({options})' if options else ''}, trained at L = {r.train_len} tokens; "
               f"examined at {r.length} tokens ({r.length / r.train_len:g} L).")
    lines = [f"# Diagnosis of `{r.checkpoint}`", "",
             " ".join(filter(None, [opening, corpus_line(r.corpus, r.trained_corpus) if r.corpus else "", retrofit_line(r)])),
             ""]
    lines += _loss_section(r) + _distance_section(r) + _final_entry_section(r) + _reach_section(r)
    lines += _rotary_section(r) + _passkey_section(r)
    return "\n".join(lines)


def retrofit_line(r: DiagnoseResult) -> str:
    """For a retrofitted checkpoint: which distances its fine-tune saw (L stays the original training's)."""
    rf = r.retrofit
    if not rf or not rf.get("finetune_steps"):
        return ""
    return (f"This checkpoint is a retrofit ({rf.get('method')}) fine-tuned for {rf['finetune_steps']} steps at "
            f"{rf.get('to')} tokens: that fine-tune saw distances up to {rf.get('to', 1) - 1}, so below, 'never "
            f"seen in training' means in the original training at L = {r.train_len}.")


def delta_cell(delta: float, lo: float | None, hi: float | None) -> str:
    """A Δ and its interval, to 4 decimals; where all of them are below 0.0005 in size, in scientific
    notation, so that a verdict on an interval that excludes 0 never sits beside "+0.0000"."""
    values = [delta] + ([] if lo is None or hi is None else [lo, hi])
    fmt = "{:+.1e}" if max(abs(v) for v in values) < 5e-4 else "{:+.4f}"
    return fmt.format(delta) + ("" if len(values) == 1 else f" [{fmt.format(lo)}, {fmt.format(hi)}]")


def verdict(lo: float | None, hi: float | None) -> str:
    """What the interval of a Δ (full − cut) supports, in a word: hurts (above 0), helps (below 0),
    ≈ 0 (spans 0), or no interval (one window)."""
    if lo is None or hi is None:
        return "no interval"
    return "hurts" if lo > 0 else "helps" if hi < 0 else "≈ 0"


def _context_verdict(lo: float | None, hi: float | None, windows: int) -> str:
    """:func:`verdict` in a sentence; one window has no interval to read."""
    return {"no interval": f"cannot be judged from {windows} window (no interval; raise --eval-tokens)",
            "hurts": "hurts (the whole interval of Δ is above 0)",
            "helps": "helps (the whole interval of Δ is below 0)",
            "≈ 0": "makes no difference this evaluation can see (the interval of Δ spans 0)"}[verdict(lo, hi)]


def _loss_section(r: DiagnoseResult) -> list[str]:
    full, cut = mean_losses(r)
    lo_all, hi_all = r.loss_delta_interval
    rows = [[name, f"{lo:.4f}", f"{sh:.4f}", delta_cell(lo - sh, d_lo, d_hi)] for name, lo, sh, d_lo, d_hi in r.loss_by_range]
    rows.append(["all", f"{full:.4f}", f"{cut:.4f}", delta_cell(full - cut, lo_all, hi_all)])
    return (["## Loss by position", "",
             f"The same {r.loss_windows * r.length} validation bytes ({r.loss_windows} windows spread evenly over the "
             f"split) scored in {r.length}-token windows (full context) "
             f"and with the context cut into chunks of L = {r.train_len} (what the model saw in training). Δ < 0: the "
             f"extra context helps; Δ > 0: it hurts. Intervals: 95% bootstrap over the {r.loss_windows} windows "
             "(paired: both columns score the same tokens)."
             + (f" {few}" if (few := few_segments(r.loss_windows, "window")) else ""), ""]
            + md_table(["positions", "loss, full context", "loss, context cut at L", "Δ"], rows)
            + ["", f"Perplexity {math.exp(full):.3f} with the full context vs {math.exp(cut):.3f} cut at L: the "
               f"extra context {_context_verdict(lo_all, hi_all, r.loss_windows)}.", ""]
            + _split_section(r) + _window_section(r)
            + ["![loss by position](loss_by_position.png)", ""])


def _window_section(r: DiagnoseResult) -> list[str]:
    """The kept tokens' Δ split by a sliding window of L, and what far tokens do through the layers
    (:func:`posbias.diagnose.window_split`)."""
    if not r.window_split:
        return []
    rows = [[label, delta_cell(d, lo, hi)] for label, d, lo, hi in r.window_split]
    _, _, lo, hi = r.window_split[0]
    return (["The same tokens once more with attention cut to the L nearest keys in every layer (a sliding window "
             "of L laid over the model: a counterfactual, not how it was trained). The first two rows add up to the "
             "second row above: what the keys beyond L do directly, and what the window's keys before the chunk's "
             "start add. Those keys are within L of the query, but in a model of several layers each carries in its "
             "state tokens up to L − 1 farther back per layer below it, so the window − cut row is not near context "
             "alone. The third row (not part of the sum) measures that part: at each chunk's last position the "
             "window and the cut show the first layer the same keys, so what differs there is far tokens reaching "
             "the query through the layers.", ""]
            + md_table(["what the full context adds", "Δ"], rows)
            + ["", f"Attention to the keys beyond L {_context_verdict(lo, hi, r.loss_windows)}.", "",
               _through_layers(r), ""])


def layers(r: DiagnoseResult) -> int:
    """The model's layer count (the attention measurements hold one entry per layer)."""
    return len(r.attention_distance["mean"])


def no_layers_between(r: DiagnoseResult) -> bool:
    """True where the through-the-layers row measures nothing but rounding: one layer, and a scheme of
    i − j alone (a window of L and the cut then show that layer the same keys at the same offsets)."""
    return layers(r) == 1 and not _position_moves(r)


def _position_moves(r: DiagnoseResult) -> str:
    """What, besides far tokens, makes a window and the cut differ at a chunk's last position: the
    cut restarts positions at 0, so a scheme that reads the position itself (absolute positions, a
    bias that moves with the query position) sees another one there. Empty for a scheme of i − j."""
    if r.scheme.family == "absolute":
        return "the positions past L themselves"
    if bias_moves(r):
        return "the bias's move with the query position"
    return ""


def _through_layers(r: DiagnoseResult) -> str:
    """The sentence on :func:`posbias.diagnose.window_split`'s third row (or why there is none)."""
    if len(r.window_split) < 3:
        return (f"No chunk of L past the first ends within the {r.length}-token window, so what far tokens do "
                f"through the layers is not measured here (it needs a window of at least 2 L = {2 * r.train_len}).")
    _, d, lo, hi = r.window_split[2]
    also = _position_moves(r)
    what = (f"Far tokens through the layers together with {also} (the cut restarts the positions at 0, so this "
            "row holds both)," if also else "Far tokens reaching a query through the layers, with the same keys in "
            "the first layer,")
    return f"{what} Δ {delta_cell(d, lo, hi)}: {_through_verdict(r, lo, hi)}."


def _through_verdict(r: DiagnoseResult, lo: float | None, hi: float | None) -> str:
    """What the through-the-layers Δ supports; in a one-layer model of i − j, that it is rounding."""
    if no_layers_between(r):
        return ("none can reach a query through the layers of a one-layer model: there the window and the cut "
                "compute the same, and Δ is float rounding")
    return _context_verdict(lo, hi, r.loss_windows)


def _split_section(r: DiagnoseResult) -> list[str]:
    """Δ past L split by the local context the cut left each token (:func:`posbias.diagnose.context_split`)."""
    if not r.context_split:
        return []
    rows = [[label, f"{share:.1%}", delta_cell(d, lo, hi), f"{share * d:+.4f}"]
            for label, share, d, lo, hi in r.context_split]
    lines = ["Where Δ comes from: cut at L, the first tokens of every chunk lose their local context, while "
             "the others keep some of it; over those others, Δ is what the distant keys themselves do.", ""]
    lines += md_table(["positions", "share of all", "Δ within", "share × Δ"], rows)
    kept = kept_row(r.context_split)
    if kept is not None:
        lines += ["", f"For tokens that keep local context, the far context {_context_verdict(kept[3], kept[4], r.loss_windows)}."]
    return lines + [""]


def last_quarter(n: int) -> slice:
    """The query positions the attention statistics summarise: the last quarter of the window."""
    return slice(n - n // 4, n)


def far_attention(r: DiagnoseResult) -> tuple[float, float] | None:
    """The attention mass at distance ≥ L over the last quarter of the window: the mean over layers
    and heads, and the largest head's (None without the measurement)."""
    beyond = r.attention_distance.get("beyond")
    if beyond is None:
        return None
    tail = torch.tensor(beyond)[:, :, last_quarter(r.length)].mean(-1)  # [layers, heads]
    return float(tail.mean()), float(tail.max())


def smoothed(values: torch.Tensor, k: int) -> torch.Tensor:
    """``values [..., N]`` averaged over runs of ``k`` positions (as they are for ``k`` = 1)."""
    if k <= 1:
        return values
    return torch.nn.functional.avg_pool1d(values.reshape(-1, 1, values.shape[-1]), k, k).reshape(
        *values.shape[:-1], -1)


def _distance_section(r: DiagnoseResult) -> list[str]:
    n, L = r.length, r.train_len
    ad = {k: torch.tensor(v) for k, v in r.attention_distance.items()}
    tail = last_quarter(n)
    at_l = slice(max(0, L - 8), min(n, L + 8))
    beyond = ad.get("beyond")
    rows = [[layer, h, f"{ad['mean'][layer, h, tail].mean():.1f}", f"{ad['q50'][layer, h, tail].mean():.1f}",
             f"{ad['q90'][layer, h, tail].mean():.1f}", f"{ad['mean'][layer, h, at_l].mean():.1f}",
             *([] if beyond is None else [f"{beyond[layer, h, tail].mean():.4f}"])]
            for layer in range(ad["mean"].shape[0]) for h in range(ad["mean"].shape[1])]
    head = ["layer", "head", "mean", "median", "90th pct", "at query ≈ L: mean",
            *([] if beyond is None else ["mass at distance ≥ L"])]
    lines = ["## Attention distance", "",
             f"Attention-weighted distance i − j at the last {n // 4} query positions (uniform attention over "
             f"all earlier keys would give a mean of about {3 * n / 8:.0f}; a head that attended only to keys within L "
             f"would stay below {L}).", ""]
    lines += md_table(head, rows) + ["", "![attention distance](attention_distance.png)", ""]
    if beyond is not None and n >= 2 * L:
        near, (late, largest) = beyond[:, :, max(L, 2 * L - 16): 2 * L].mean(), far_attention(r)
        lines += [f"Attention on keys at distance ≥ L (distances never seen in training), averaged over layers and "
                  f"heads: {near:.4f} at queries just below 2L, {late:.4f} over the last "
                  f"{n // 4} (largest head {largest:.4f}). A share that grows with the "
                  "query position is attention dilution: ever more unseen distances draw weight.", "",
                  "![attention beyond L](attention_beyond_L.png)", ""]
    return lines


def _final_entry_section(r: DiagnoseResult) -> list[str]:
    if not r.final_entry_share:
        return []
    s = r.scheme
    n_far = max(0, r.length - s.flat_beyond)
    diluted = [h for h, w in enumerate(r.far_weight) if w > 1]
    if diluted:
        verdict = (f"In head(s) {', '.join(map(str, diluted))} the {n_far} far keys together outweigh the nearest key on "
                   "the bias alone: the final entry does not separate near from far, and attention mass can drift to "
                   "the many far keys (dilution).")
    elif not n_far:
        verdict = f"No key of the {r.length}-token window is as far as the final entry: it plays no part here."
    else:
        verdict = (f"In every head the {n_far} far keys together weigh no more than the nearest key on the bias alone: "
                   "the final entry acts as a penalty, not as a source of dilution.")
    return (["## The final entry (T5: the final bucket)", "",
             f"{s.name} ({s.extra_repr()}): every distance from {s.flat_beyond} on reads one learned value. Share of "
             "causal query–key pairs on that final entry:", ""]
            + md_table(["window", "share on the final entry"], [[n, f"{v:.1%}"] for n, v in r.final_entry_share.items()])
            + ["", "The final entry's learned value against the entry of distance 0, for a query at the end of the "
               f"{r.length}-token window:", ""]
            + md_table(["head", "u(0) − u(final), nats", "far keys' weight vs. the nearest key"],
                       [[h, f"{g:+.2f}", f"{w:.3g}"] for h, (g, w) in enumerate(zip(r.final_entry_gap, r.far_weight))])
            + ["", verdict, ""])


def _reach_section(r: DiagnoseResult) -> list[str]:
    if r.effective_reach is None:
        return []
    L, end = r.train_len, r.length - 1
    shown = lambda x: x if x is not None else "never"  # noqa: E731
    rows = [[h, shown(x), *([] if r.reach_at_L is None else [shown(r.reach_at_L[h])]),
             *([] if r.bias_drift is None else [f"{r.bias_drift[h]:.3f}"])] for h, x in enumerate(r.effective_reach)]
    head = ["head", f"reach, query at {end}", *([] if r.reach_at_L is None else [f"reach, query at {L - 1}"]),
            *([] if r.bias_drift is None else ["bias drift over distances < L, nats"])]
    lines = ["## Effective reach of the bias, and its drift past L", "",
             f"Distance at which the bias alone cuts attention by 100× ('never' = not within {16 * r.length}), and "
             f"how far the bias over the distances seen in training (0 … {L - 1}) moves between a query at {L - 1} "
             f"and one at {end} (each curve relative to its distance-0 value):", ""]
    lines += md_table(head, rows) + [""]
    if r.bias_drift is not None:
        lines += [(f"The bias changes with the query position: at the distances it was trained on, a query at {end} "
                   f"meets a bias up to {max(r.bias_drift):.2f} nats away from the one a query at {L - 1} met in "
                   "training." if bias_moves(r) else
                   "The bias depends on i − j alone: past training, the model meets the bias it was trained with."), ""]
    return lines + ["![bias](bias_vs_distance.png)", ""]


def unseen_pairs(r: DiagnoseResult) -> list[int]:
    """The rotary frequency pairs that meet angles past L no distance of training gave them."""
    return [k for k, u in enumerate(r.rotary["unseen"]) if u] if r.rotary else []


def _rotary_section(r: DiagnoseResult) -> list[str]:
    """RoPE: each frequency pair's angle over the training length against over the window
    (:func:`posbias.diagnose.rotary_angles`)."""
    if r.rotary is None:
        return []
    rot, L = r.rotary, r.train_len
    pairs, unseen = len(rot["wavelength"]), unseen_pairs(r)
    partial = sum(w > L for w in rot["wavelength"])
    rows = [[k, f"{w:,.0f}", f"{a:.2f}", f"{b:.2f}", "**yes**" if u else ""]
            for k, (w, a, b, u) in enumerate(zip(rot["wavelength"], rot["train_angle"], rot["end_angle"], rot["unseen"]))]
    if unseen:
        waves = [rot["wavelength"][k] for k in unseen]
        verdict = (f"{len(unseen)} of {pairs} pairs meet angles past L that no distance of training gave them "
                   f"(pairs {unseen[0]}–{unseen[-1]}, wavelengths {min(waves):,.0f}–{max(waves):,.0f} tokens): "
                   "there, attention reads rotations the model never learned to read.")
    else:
        verdict = (f"No pair meets an angle past what training gave it: {pairs - partial} of {pairs} turned full "
                   "circles within L, and the frequencies in use keep the others within their trained range.")
    return (["## Rotary angles past L", "",
             f"Each of the {pairs} rotary pairs of a head turns by θ_k per token of distance. A pair whose wavelength "
             f"exceeds L = {L} never turned a full circle in training ({partial} of {pairs}); past L it meets new "
             f"angles unless the frequencies in use at {r.length} tokens slow it down (a retrofit's scaling). Angles "
             "in radians, over the longest distance of training (base frequencies) and of the window "
             "(frequencies in use):", ""]
            + md_table(["pair", "wavelength, tokens", f"angle over {L - 1}", f"angle over {r.length - 1}",
                        "past training"], rows)
            + ["", verdict, ""])


def _passkey_section(r: DiagnoseResult) -> list[str]:
    if r.passkey_skipped:
        return ["## Passkey retrieval", "", f"Skipped: {r.passkey_skipped}.", ""]
    if not r.passkey:
        return []
    copies = r.passkey_copies
    at_l = r.copy_accuracy(str(r.train_len))
    depths = list(next(iter(r.passkey.values())))
    rows = [[n, *(f"{row[d]:.2f}" for d in depths), f"{sum(row.values()) / len(row):.2f}"] for n, row in r.passkey.items()]
    untaught = [c["seed"] for c in copies if not any(c["passkey"].get(str(r.train_len), {}).values())]
    those = ("that fine-tune", "its") if len(untaught) == 1 else ("those fine-tunes", "their")
    taught = (f"No sample was solved at L = {r.train_len} by the {_copies_named(r, untaught)}: {those[0]} did not "
              f"teach the task within the training length, so {those[1]} rows past L say nothing about retrieval "
              "there. "
              f"Raise --passkey-steps (beyond {r.passkey_max_steps})." if untaught else "")
    steps = (f" fine-tuned for {r.passkey_max_steps} steps"
             + (f" (fewer once it solved {r.passkey_until:g} of the probe)" if r.passkey_until else "")
             + f" on passkey samples of {r.train_len} bytes")
    probe = (f"a probe at L ({passkey.PROBE_SAMPLES * 5} samples of its own, every {passkey.PROBE_EVERY} steps) "
             "shows how it learned")
    if len(copies) == 1:
        c = copies[0]
        head = [f"A copy{steps} (batches of seed {c['seed']}); {probe}: {passkey.fit_sentence(c['fit'])}. "
                f"{_probes(c)} Its positional parameters at {r.passkey_lr_mult:g}× the learning rate, as in training. "
                "This is one copy, one draw: copies of one model from other batch seeds have read far apart (a T5 "
                "model's three solved 0.93, 0.48 and 0.05 at L), so compare models over several (`--passkey-seeds 0 "
                f"1 2`). Accuracy over {r.passkey_samples} samples per cell (depth 0 = key at the start of the window):",
                ""]
    else:
        head = ([f"{len(copies)} copies{steps}, each from the batches of its own seed, their positional parameters at "
                 f"{r.passkey_lr_mult:g}× the learning rate, as in training; {probe}:", ""]
                + [f"* seed {c['seed']}: {passkey.fit_sentence(c['fit'])}. {_probes(c)}" for c in copies]
                + ["", "Copies of one model can read far apart, and a single copy is one draw: each copy's accuracy by "
                   "length (mean over depths), the mean over copies, their spread (highest − lowest), and the mean over "
                   f"only the copies that solved at least {passkey.LEARNED:g} at L (what the model keeps past L once a "
                   "copy has learned the task, apart from how many copies learn it):", ""]
                + md_table(["length", *(f"seed {c['seed']}" for c in copies), "mean", "spread",
                            f"copies ≥ {passkey.LEARNED:g} at L ({len(kept_past_l(at_l, at_l))} of {len(copies)})"],
                           [[n, *(f"{a:.2f}" for a in got), f"{sum(got) / len(got):.2f}", f"{max(got) - min(got):.2f}",
                             _kept_mean(at_l, got)]
                            for n, got in ((n, r.copy_accuracy(n)) for n in r.passkey)])
                + ["", f"Accuracy over {r.passkey_samples} samples per cell, mean over the {len(copies)} copies "
                   "(depth 0 = key at the start of the window):", ""])
    return (["## Passkey retrieval", ""] + head
            + md_table(["length", *(f"depth {d}" for d in depths), "mean"], rows)
            + [""] + ([taught, ""] if taught else []) + _digits_table(r) + _hidden_table(r) + _answer_attention_table(r)
            + ["![passkey](passkey.png)", ""])


def _kept_mean(at_l: list[float], far: list[float]) -> str:
    """:func:`kept_mean` as text, ``—`` when no copy solved the task at L."""
    mean = kept_mean(at_l, far)
    return "—" if mean is None else f"{mean:.2f}"


def _probes(copy: dict) -> str:
    return "Probe accuracy by step: " + ", ".join(f"{s} {a:.2f}" for s, a in copy["fit"]["probes"]) + "."


def _copies_named(r: DiagnoseResult, seeds: list[int]) -> str:
    """``copy`` (the only one) or ``copies of seed 0, 2`` (some of several)."""
    if len(r.passkey_copies) == 1:
        return "copy"
    return f"cop{'y' if len(seeds) == 1 else 'ies'} of seed{'' if len(seeds) == 1 else 's'} " + ", ".join(map(str, seeds))


def _digits_table(r: DiagnoseResult) -> list[str]:
    """The score of each answer byte by length (:func:`posbias.passkey.scores`): found the key, or not."""
    if not r.passkey_digits:
        return []
    by_length = {n: passkey.mean_digits(r.passkey_digits, n) for n in r.passkey_digits}
    width = len(next(iter(by_length.values())))
    over = f" and over the {len(r.passkey_copies)} copies" if len(r.passkey_copies) > 1 else ""
    return (["The same samples byte by byte: the share of samples whose i-th answer byte is the argmax given the "
             f"true bytes before it, mean over depths{over}. The first byte needs the key found; each later one can also "
             f"copy on from the byte before it. A guess among the ten digits scores {passkey.GUESS:g}; a digit of the "
             f"key copied from a random place {shuffled_key_score(width):.2f}. High first bytes with few samples "
             "solved: the model finds the key but copies it badly; bytes near a guess: it does not find it.", ""]
            + md_table(["length", *(f"byte {i + 1}" for i in range(width)), "mean", f"all {width} (solved)"],
                       [[n, *(f"{a:.2f}" for a in got), f"{sum(got) / width:.2f}",
                         f"{passkey.mean_accuracy(r.passkey, n):.2f}"] for n, got in by_length.items()])
            + [""])


def _hidden_table(r: DiagnoseResult) -> list[str]:
    """Past L, each copy's accuracy as it is → with the far filler hidden
    (:func:`posbias.diagnose.far_filler_scores`), and what that says of each copy that learned the
    task at L and lost some of it past L (:func:`hidden_sentences`)."""
    lens = [n for n in r.passkey if int(n) > r.train_len]
    if not lens or r.hidden_accuracy(lens[0]) is None:
        return []
    several = len(r.passkey_copies) > 1
    at_l = r.copy_accuracy(str(r.train_len))
    rows = []
    for n in lens:
        got, hid = r.copy_accuracy(n), r.hidden_accuracy(n)
        kept = ([f"{_kept_mean(at_l, got)} → {_kept_mean(at_l, hid)}"] if several else [])
        rows.append([n, *(f"{a:.2f} → {h:.2f}" for a, h in zip(got, hid)), *kept])
    header = ["length", *((f"seed {c['seed']}" for c in r.passkey_copies) if several else ["solved"]),
              *([f"copies ≥ {passkey.LEARNED:g} at L"] if several else [])]
    said = hidden_sentences(r)
    depths = list(r.passkey[lens[0]])
    hidden = passkey.mean_of([c["hidden"] for c in r.passkey_copies])  # length → depth, mean over the copies
    by_depth = [[n, *(f"{r.passkey[n][d]:.2f} → {hidden[n][d]:.2f}" for d in depths)] for n in lens]
    whose = "the copy" if not several else f"the mean over the {len(r.passkey_copies)} copies"
    return (["Past L, the same samples again with every key at distance ≥ L hidden except the key statement, in "
             "every layer: the key stays where it is, at its distance with its bias, rotation or position, only the "
             "filler beyond L is gone. Whole keys solved as the model is → with that filler hidden "
             "(`docs/experiments/far_filler.py` hides it layer by layer):", ""] + md_table(header, rows) + [""]
            + [f"* {s}" for s in said] + ([""] if said else [])
            + [f"The same by the key's depth ({whose}). The question is at the end of the window, so the key of "
               "depth d is about (1 − d) × length before it: at depth 1 within L at every length, deeper ever "
               "farther. What hiding gives back where the key is within L was taken by the filler alone; where it "
               "does not come back with the key far away, the key's distance is what fails:", ""]
            + md_table(["length", *(f"depth {d}" for d in depths)], by_depth) + [""])


def hidden_sentences(r: DiagnoseResult) -> list[str]:
    """:func:`posbias.report.far_filler_sentences` of every copy, at the longest length."""
    far = max(r.passkey, key=int)
    if int(far) <= r.train_len or r.hidden_accuracy(far) is None:
        return []
    several = len(r.passkey_copies) > 1
    named = [(f"Seed {c['seed']}" if several else "The copy", a, b, h)
             for c, a, b, h in zip(r.passkey_copies, r.copy_accuracy(str(r.train_len)), r.copy_accuracy(far),
                                   r.hidden_accuracy(far))]
    return far_filler_sentences(named, f"at {far}", absolute=r.scheme.family == "absolute")


def _answer_attention_table(r: DiagnoseResult) -> list[str]:
    """Where the queries that predict the answer bytes attend (:func:`posbias.diagnose.answer_attention`),
    by length (and copy, with several): the most any head puts on the key's digits · on the one digit
    the byte copies."""
    copies = [c for c in r.passkey_copies if c.get("attention")]
    if not copies:
        return []
    rows = []
    for c in copies:
        for n, got in c["attention"].items():
            key, place = (torch.tensor(got[k]).flatten(0, 1).amax(0).tolist() for k in ("key", "place"))
            label = n if len(copies) == 1 else f"{n} (seed {c['seed']})"
            rows.append([label, *(f"{a:.2f} · {b:.2f}" for a, b in zip(key, place))])
    width = len(rows[0]) - 1
    whose = "the copy's" if len(copies) == 1 else "each copy's"
    return ([f"Where {whose} queries that predict the answer bytes attend ({5 * ANSWER_SAMPLES} samples per length, "
             "of their own): "
             "the most attention any head puts on the key's digits · on the one digit this byte copies. Read each "
             "length against the same copy's row at L. The second number is not a test of copying: copies that are "
             "exact at L have put no more than 0.18–0.37 of any head on the digit they copy "
             "(docs/retrofit-and-diagnose.md, three seeds), so a low value says where the heads look, "
             "not that the copy lost its place.", ""]
            + md_table(["length", *(f"byte {i + 1}" for i in range(width))], rows) + [""])


def plots(r: DiagnoseResult, out: Path) -> list[Path]:
    from ..plot import plot_bias_curves, pyplot

    plt = pyplot()
    paths = [_loss_plot(r, out / "loss_by_position.png", plt),
             _head_plot(r, out / "attention_distance.png", plt, "mean", "mean attention distance i − j",
                        "how far each head looks")]
    if "beyond" in r.attention_distance:
        k = run_length(r.length)
        runs = "query by query" if k == 1 else f"mean of {k} queries"
        paths.append(_head_plot(r, out / "attention_beyond_L.png", plt, "beyond", f"attention at distance ≥ L = {r.train_len}",
                                f"attention on unseen distances ({runs})", smooth=k))
    if r.scheme.family == "additive":
        paths.append(plot_bias_curves([r.scheme], out / "bias_vs_distance.png", max_distance=r.length, trained=r.train_len,
                                      title=f"learned/fixed bias per head ({r.scheme_name})"))
    if r.passkey:
        paths.append(_passkey_plot(r, out / "passkey.png", plt))
    return paths


def run_length(length: int) -> int:
    """The query positions a figure of a window of ``length`` averages over: about 64 points a line
    (each position alone under 128)."""
    return max(1, length // 64)


def run_positions(n: int, k: int) -> torch.Tensor:
    """Where :func:`smoothed` puts its values of ``n`` positions in runs of ``k``: the mean position
    of each run (the position itself for ``k`` = 1; a last run short of ``k`` is dropped, as there)."""
    return torch.arange(n // k * k, dtype=torch.float64).view(-1, k).mean(-1)


def _loss_plot(r: DiagnoseResult, path: Path, plt) -> Path:
    from ..plot import save_figure

    k = run_length(r.length)
    fig, ax = plt.subplots(figsize=(7, 4))
    for losses, label in ((r.loss_by_position, "full context"),
                          (r.loss_by_position_cut_at_L, f"context cut at L = {r.train_len}")):
        ax.plot(run_positions(len(losses), k).numpy(), smoothed(torch.tensor(losses), k).numpy(), label=label)
    ax.axvline(r.train_len, color="grey", ls="--", lw=1, label=f"training length {r.train_len}")
    ax.set_xlabel("position in the window")
    ax.set_ylabel("loss (nats/byte)")
    ax.set_title(f"{r.scheme_name}: loss by position")
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def _head_plot(r: DiagnoseResult, path: Path, plt, key: str, ylabel: str, title: str, smooth: int = 1) -> Path:
    """One panel per layer, one line per head: ``r.attention_distance[key]`` by query position
    (averaged over runs of ``smooth`` positions), with what uniform attention over all earlier keys
    would give."""
    from ..plot import save_figure

    values = torch.tensor(r.attention_distance[key])
    layers = values.shape[0]
    fig, axes = plt.subplots(1, layers, figsize=(3.2 * layers, 3.2), squeeze=False, sharey=True)
    x = torch.arange(r.length)
    L = r.train_len
    uniform = x / 2 if key == "mean" else ((x - L + 1).clamp(min=0) / (x + 1))
    values, xs = smoothed(values, smooth), run_positions(r.length, smooth)
    for layer in range(layers):
        ax = axes[0, layer]
        for h in range(values.shape[1]):
            ax.plot(xs.numpy(), values[layer, h].numpy(), lw=1, label=f"head {h}")
        ax.plot(x.numpy(), uniform.numpy(), color="grey", ls=":", lw=1, label="uniform")
        ax.axvline(L, color="grey", ls="--", lw=1)
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("query position")
    axes[0, 0].set_ylabel(ylabel)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{r.scheme_name}: {title}", y=1.0)
    fig.tight_layout(rect=(0, 0, 1, 0.95))  # room for the figure title above the panel titles
    return save_figure(fig, path)


def _passkey_plot(r: DiagnoseResult, path: Path, plt) -> Path:
    from ..plot import save_figure

    lens = list(r.passkey)
    depths = list(r.passkey[lens[0]])
    data = [[r.passkey[m][d] for d in depths] for m in lens]
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(lens) + 2))
    im = ax.imshow(data, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(depths)), depths)
    ax.set_yticks(range(len(lens)), lens)
    ax.set_xlabel("depth of the key (0 = start of the window)")
    ax.set_ylabel("context length")
    for i, row in enumerate(data):
        for j, a in enumerate(row):
            ax.text(j, i, f"{a:.2f}", ha="center", va="center", color="white" if a < 0.6 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy")
    copies = f", mean of {len(r.passkey_copies)} copies" if len(r.passkey_copies) > 1 else ""
    ax.set_title(f"{r.scheme_name}: passkey retrieval (trained at {r.train_len}{copies})")
    return save_figure(fig, path)
