"""Rendering: a workflow's result (a dataclass) → Markdown, JSON and PNGs. Nothing here computes a
number that is not already in the result, and nothing here trains or evaluates.

One module per workflow (:mod:`.study`, :mod:`.retrofit`, :mod:`.diagnose`), each with
``markdown(result) -> str`` and ``write(result, out) -> list[Path]``; :func:`md_table` is the one
Markdown table builder, :func:`paired_cell` the one cell of a paired comparison and
:func:`corpus_line` the one sentence on the text a checkpoint job measured on, :func:`digits_sentence`
the one on passkey answers byte by byte, :func:`copy_names`, :func:`copies_sentence`,
:func:`kept_past_l`, :func:`kept_mean`, :func:`copies_cell` and :func:`kept_cell` the ones on several passkey
copies of a model, :func:`few_segments` the one warning on an evaluation of too few segments.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .. import passkey, store
from ..config import Log
from ..evaluate import SEGMENTS, Paired


def note_replaced(path: Path, new: dict[str, Any], fields: Sequence[str], what: str, log: Log) -> None:
    """Before ``path`` (a ``results.json``) is rewritten with ``new``: a line through ``log`` when it holds
    the report of a run whose ``fields`` differ (a dict field by its entries: ``study.steps``), since the
    new report replaces it. That run's models and caches stay keyed in the folder, so re-running its
    command rewrites its report from them."""
    if not path.exists():
        return
    try:
        old = store.read_json(path)
    except ValueError:  # unreadable: nothing to compare, and the new report mends it
        return
    differ = []
    for f in fields:  # (the compared fields alone as read back: tuples as lists, keys as strings)
        a, b = old.get(f), json.loads(json.dumps(new.get(f), default=str))
        if isinstance(a, dict) and isinstance(b, dict):
            differ += [f"{f}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            differ.append(f)
    if differ:
        log(f"note: {path.parent} held the report of {what} with other {', '.join(differ)}; this run's report "
            "replaces it (that run's models and caches stay: re-running its command rewrites its report)")


def md_row(cells: Sequence[Any]) -> str:
    """A Markdown table row: ``| a | b |`` (cells via ``str``)."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A Markdown table as lines: the header, ``|---|---|``, one :func:`md_row` per row."""
    return [md_row(header), "|" + "---|" * len(header)] + [md_row(r) for r in rows]


def paired_cell(p: Paired) -> str:
    """A paired comparison's cell: ``**best**``, or ``ratio [lo, hi]``, with several seeds the
    smallest–largest ratio seed by seed, and "(≈ best)" where the interval or a seed reaches 1."""
    if p.best:
        return "**best**"
    text = f"{p.ratio:.3f} [{p.lo:.3f}, {p.hi:.3f}]"
    if p.per_seed:
        text += f"; seeds {min(p.per_seed):.3f}–{max(p.per_seed):.3f}"
    return text + (" (≈ best)" if ties_best(p) else "")


def best_and_tied(table: Sequence[Paired]) -> tuple[int, list[int]]:
    """The index of a paired comparison's best entry and those of the entries not distinguishable from it
    (:func:`ties_best`); the summaries of the study and of a retrofit say both."""
    best = next(j for j, p in enumerate(table) if p.best)
    return best, [j for j, p in enumerate(table) if not p.best and ties_best(p)]


def tied_clause(tied: Sequence[str], what: str) -> str:
    """"; not distinguishable from it: a, b", or "; every other <what> is worse beyond the noise"."""
    return f"; not distinguishable from it: {', '.join(tied)}" if tied else f"; every other {what} is worse beyond the noise"


def ties_best(p: Paired) -> bool:
    """Whether ``p`` is not distinguishable from the best: its paired interval, or one of its seeds,
    reaches 1 (the best itself included)."""
    return p.best or p.lo <= 1.0 or bool(p.per_seed and min(p.per_seed) <= 1.0)


def corpus_name(fp: dict[str, Any]) -> str:
    """A corpus fingerprint as reports name it: ``name (sha256 …)``."""
    return f"{fp.get('name', '?')} (sha256 {fp.get('sha256', '?')})"


def same_text(measured: dict[str, Any], trained: dict[str, Any] | None) -> bool:
    """Whether a job measured on the text a checkpoint records it was trained on (corpus fingerprints)."""
    return trained is not None and trained.get("sha256") == measured.get("sha256")


def corpus_line(measured: dict[str, Any], trained: dict[str, Any] | None, *, markdown: bool = True) -> str:
    """A report's sentence on the text it measured on (a corpus ``fingerprint``) against the text the
    checkpoint records it was trained on (``meta["corpus"]``; None for a checkpoint that records none);
    ``markdown=False`` for the terminal."""
    line = f"Measured on the validation split of {corpus_name(measured)}"
    if trained is None:
        return line + "; the checkpoint does not record the text it was trained on."
    if same_text(measured, trained):
        return line + ", the text the checkpoint was trained on."
    stress = "**" if markdown else ""
    return (line + f": {stress}not{stress} the text the checkpoint was trained on, {corpus_name(trained)} (pass that "
            "with --data or --hf-dataset to measure on its validation split).")


def shuffled_key_score(digits: int = 5) -> float:
    """An answer byte's expected score (:func:`posbias.passkey.scores`) when it copies a digit of the
    key from a place chosen at random: right at its own place, else as a guess,
    (1 + (digits − 1) · :data:`posbias.passkey.GUESS`) / digits (0.28 for five digits)."""
    return (1 + (digits - 1) * passkey.GUESS) / digits


def digits_sentence(named: list[tuple[str, list[float]]], where: str) -> str:
    """Several models' passkey answers byte by byte (:func:`posbias.passkey.mean_digits`) ``where``
    ("at 512", "at L"), in words, with the scores of a guess and of a key copied out of order; ""
    for none."""
    if not named:
        return ""
    return (f"Answer bytes right {where} (mean over depths, all bytes · the first, which needs the key found; a "
            f"guess among the ten digits scores {passkey.GUESS:g}, a digit of the key copied from a random place "
            f"{shuffled_key_score(len(named[0][1])):.2f}): "
            + "; ".join(f"{name} {sum(d) / len(d):.2f} · {d[0]:.2f}" for name, d in named) + ".")


def copy_names(name: str, seeds: Sequence[int]) -> list[str]:
    """The passkey copies of ``name`` as reports call them: ``name`` for the only one, else
    ``name seed K`` for each copy's batch seed."""
    return [name] if len(seeds) == 1 else [f"{name} seed {s}" for s in seeds]


def copies_sentence(named: list[tuple[str, Sequence[float], Sequence[float]]], where: str) -> str:
    """Several models' passkey copies, each as its accuracy at L → ``where``: ``(name, at L, there)``
    per model, one value per copy."""
    return (f"Each copy, solved at L → {where}: "
            + "; ".join(f"{name} " + ", ".join(f"{a:.2f} → {b:.2f}" for a, b in zip(at_l, far))
                        for name, at_l, far in named) + ".")


def kept_past_l(at_l: Sequence[float], far: Sequence[float]) -> list[float]:
    """The accuracies ``far`` of the copies that solved at least :data:`posbias.passkey.LEARNED` at L
    (``at_l``, one value per copy): retrieval past L apart from whether a copy's fine-tune taught it
    the task at all, which decides most of a mean over copies of a scheme that learns it slowly."""
    return [b for a, b in zip(at_l, far) if a >= passkey.LEARNED]


def kept_mean(at_l: Sequence[float], far: Sequence[float]) -> float | None:
    """The mean of :func:`kept_past_l`; None when no copy solved the task at L."""
    kept = kept_past_l(at_l, far)
    return sum(kept) / len(kept) if kept else None


def copies_cell(values: Sequence[float], trials: int) -> str:
    """Several copies' accuracies as a table cell: their mean with the interval of
    :func:`posbias.passkey.copies_interval` (``trials`` samples per copy)."""
    lo, hi = passkey.copies_interval(values, trials)
    return f"{sum(values) / len(values):.2f} [{lo:.2f}, {hi:.2f}]"


def kept_cell(at_l: Sequence[float], far: Sequence[float], trials: int) -> str:
    """:func:`kept_past_l` as a table cell: their mean with the interval of
    :func:`posbias.passkey.copies_interval` (``trials`` samples per copy) and how many of the copies
    they are; ``— (0 of n)`` when none solved the task at L."""
    kept = kept_past_l(at_l, far)
    if not kept:
        return f"— (0 of {len(at_l)})"
    return f"{copies_cell(kept, trials)} ({len(kept)} of {len(at_l)})"


LOST = 0.1  # a copy's drop in accuracy from L to a longer length that the far-filler sentences explain


def far_filler_sentences(named: list[tuple[str, float, float, float]], where: str, *, absolute: bool = False) -> list[str]:
    """For each copy ``(name, at L, at where, at where with the far filler hidden)`` that solved at least
    :data:`posbias.passkey.LEARNED` at L and :data:`LOST` less at ``where``: how much of that loss hiding
    the far filler gives back (:func:`posbias.diagnose.far_filler_scores`), and so whether the filler
    past L (half or more given back) or the key's distance took it; ``absolute``: a scheme of absolute
    positions, where what is not the filler is the positions past L themselves."""
    rest = ("to the positions past L themselves, which training never embedded" if absolute
            else "to the key's distance itself, or what far positions do to it")
    said = []
    for who, a, b, h in named:
        if a < passkey.LEARNED or a - b < LOST:
            continue
        back = max(0.0, h - b)
        cause = ("most of it to the filler past L, not to the key's distance" if back >= (a - b) / 2 else
                 f"most of it not to the filler past L: {rest}")
        said.append(f"{who} solved {a:.2f} at L and {b:.2f} {where}; with the far filler hidden {h:.2f}: it lost "
                    f"{a - b:.2f} past L, {cause} (hiding gives back {back:.2f}).")
    return said


def facing_end(lo: float, hi: float, null: float) -> float:
    """Of an interval wholly on one side of ``null`` (a verdict: grows / falls, hurts / helps), the end
    nearest it: ``lo`` above it, ``hi`` below. A verdict is only as firm as this end."""
    return lo if lo > null else hi


def few_segments(count: int, unit: str = "segment") -> str:
    """A warning where an evaluation scored fewer than :data:`posbias.evaluate.SEGMENTS` resampling
    units (segments or windows; empty otherwise): its percentile intervals are too narrow, by a
    measured amount."""
    if count >= SEGMENTS:
        return ""
    return (f"Only {count} {unit}{'s' * (count != 1)} scored (fewer than {SEGMENTS}): the intervals are too narrow "
            "where a few stretches of the text carry most of its variance (on the embedded corpus, the study's 95% "
            f"interval held the whole split's value in 81-94% of random draws of 16 segments, 92-97% of {SEGMENTS}; "
            "docs/study.md, \"Do the intervals now mean 95%?\"); raise --eval-tokens, or give more validation text.")
