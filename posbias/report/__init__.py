"""Rendering: a workflow's result (a dataclass) → Markdown, JSON and PNGs. Nothing here computes a
number that is not already in the result, and nothing here trains or evaluates.

One module per workflow (:mod:`.study`, :mod:`.retrofit`, :mod:`.diagnose`), each with
``markdown(result) -> str`` and ``write(result, out) -> list[Path]``; :func:`md_table` is the one
Markdown table builder.
"""

from __future__ import annotations

from typing import Any, Sequence


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A Markdown table as lines: ``| a | b |``, ``|---|---|``, one line per row (cells via ``str``)."""
    line = lambda cells: "| " + " | ".join(str(c) for c in cells) + " |"  # noqa: E731
    return [line(header), "|" + "---|" * len(header)] + [line(r) for r in rows]
