"""Rendering: a workflow's result (a dataclass) → Markdown, JSON and PNGs. Nothing here computes a
number that is not already in the result, and nothing here trains or evaluates.

One module per workflow (:mod:`.study`, :mod:`.retrofit`, :mod:`.diagnose`), each with
``markdown(result) -> str`` and ``write(result, out) -> list[Path]``; :func:`md_table` is the one
Markdown table builder and :func:`paired_cell` the one cell of a paired comparison.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..evaluate import Paired


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A Markdown table as lines: ``| a | b |``, ``|---|---|``, one line per row (cells via ``str``)."""
    line = lambda cells: "| " + " | ".join(str(c) for c in cells) + " |"  # noqa: E731
    return [line(header), "|" + "---|" * len(header)] + [line(r) for r in rows]


def paired_cell(p: Paired) -> str:
    """A paired comparison's cell: ``**best**``, or ``ratio [lo, hi]``, with several seeds the
    smallest–largest ratio seed by seed, and "(≈ best)" where the interval or a seed reaches 1."""
    if p.best:
        return "**best**"
    text = f"{p.ratio:.3f} [{p.lo:.3f}, {p.hi:.3f}]"
    if p.per_seed:
        text += f"; seeds {min(p.per_seed):.3f}–{max(p.per_seed):.3f}"
    return text + (" (≈ best)" if ties_best(p) else "")


def ties_best(p: Paired) -> bool:
    """Whether ``p`` is not distinguishable from the best: its paired interval, or one of its seeds,
    reaches 1 (the best itself included)."""
    return p.best or p.lo <= 1.0 or bool(p.per_seed and min(p.per_seed) <= 1.0)
