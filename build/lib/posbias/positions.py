"""Positions as posbias's parts hand them to each other: 1-D int64 tensors, and for a run ``p, p + 1, …``
its first position known on the host.

Most decisions of a call depend on the positions: whether they are consecutive (the Toeplitz paths and
tables need that), where the first query and key are (every offset is ``i − j``), whether a causal
mask hides anything. Reading them from a tensor (``int(pos[0])``, a consecutive check) makes the host
wait for the device: on CUDA each read stops the CPU from queueing work ahead of the GPU, and on the
CPU each is a few tensor operations of Python. posbias reads them at most once a call:

* positions posbias makes itself (:func:`attention`'s defaults, the model's, the Hugging Face
  integration's) are :func:`run` tensors, whose start travels with them: nothing is read;
* positions a caller gives are read once, where :func:`~posbias.attention.resolve` checks them
  (:func:`runs`), and handed on as runs where they are consecutive.

A run's start is trusted only while the tensor is the one :func:`run` made and unchanged: the record
names the tensor (a deep copy or an unpickled one carries a record that is not its own) and its
in-place version (an in-place change, through any view, moves it), so a changed tensor is read again,
never taken for the run it was. Slices of a run made by :func:`piece` are runs too.
"""

from __future__ import annotations

import torch
from torch import Tensor

_RUN = "_posbias_run"  # the attribute holding (start, id, version) on a run tensor


def _version(pos: Tensor) -> int | None:
    """The in-place version counter, or None for an inference tensor (it keeps none)."""
    return None if pos.is_inference() else pos._version


def _mark(pos: Tensor, start: int) -> Tensor:
    setattr(pos, _RUN, (start, id(pos), _version(pos)))
    return pos


def run(start: int, length: int, device: torch.device | str | None = None) -> Tensor:
    """``arange(start, start + length)`` on ``device``, int64, with its start known on the host."""
    return _mark(torch.arange(start, start + length, device=device), int(start))


def run_start(pos: Tensor) -> int | None:
    """The first position of a run made by :func:`run` or :func:`piece` and not changed since, else None
    (nothing is read from the tensor)."""
    mark = getattr(pos, _RUN, None)
    if mark is None or mark[1] != id(pos) or mark[2] != _version(pos):
        return None
    return mark[0]


def declare_run(pos: Tensor, start: int) -> Tensor:
    """``pos`` marked as a run from ``start``, without a read: for a tensor its maker knows holds ``start,
    start + 1, …`` (the KV cache's held key positions); a later in-place change unmarks it as for any run."""
    return _mark(pos, int(start))


def piece(pos: Tensor, start: int, stop: int | None = None) -> Tensor:
    """``pos[start:stop]``, a run again where ``pos`` is one."""
    part = pos[start:stop]
    begin = run_start(pos)
    return part if begin is None else _mark(part, begin + range(pos.shape[0])[start:stop].start)


def consecutive(pos: Tensor) -> bool:
    """True for integer positions ``p, p + 1, …`` (and for fewer than two): the runs that kernels and
    tables can treat as an offset range. A run answers without a read."""
    if pos.shape[0] < 2 or run_start(pos) is not None:
        return True
    return not pos.is_floating_point() and bool(_steps_by_one(pos))


def _steps_by_one(pos: Tensor) -> Tensor:
    """A 0-d bool tensor: every step of ``pos`` (two or more positions) is +1 (not read here)."""
    return (torch.diff(pos) == 1).all()


def first(pos: Tensor) -> int:
    """``int(pos[0])``; for a run, without reading the tensor."""
    start = run_start(pos)
    return int(pos[0]) if start is None else start


def lowest(pos: Tensor) -> int:
    """``int(pos.min())`` of non-empty positions; a run's without a read."""
    start = run_start(pos)
    return int(pos.min()) if start is None else start


def highest(pos: Tensor) -> int:
    """``int(pos.max())`` of non-empty positions; a run's without a read."""
    start = run_start(pos)
    return int(pos.max()) if start is None else start + pos.shape[0] - 1


def read_ahead(device: torch.device) -> bool:
    """Whether positions on ``device`` are best read once, ahead of every decision that needs them
    (CUDA: one wait instead of several), rather than value by value where a decision asks (the CPU: a
    read is no wait there)."""
    return device.type != "cpu"


def same(a: Tensor, b: Tensor) -> bool:
    """``torch.equal(a, b)`` for positions; two runs compare their starts and lengths without a read."""
    sa, sb = run_start(a), run_start(b)
    if sa is not None and sb is not None:
        return sa == sb and a.shape == b.shape
    return a.shape == b.shape and torch.equal(a, b)


def starts(*positions: Tensor) -> list[int | None]:
    """The first position of each of ``positions`` (1-D integer tensors) that is consecutive (a run, or
    one that reads as one), else None (None too for an empty tensor that is not a run, and for
    floating-point positions). Runs answer without a read; on CUDA
    the others are read together, in one wait for the device, and on the CPU one by one (cheaper there
    than gathering them: 13 against 35 µs for a query and 1k keys, measured)."""
    found: list[int | None] = [run_start(p) for p in positions]
    unknown = [n for n, p in enumerate(positions) if found[n] is None and p.shape[0] and not p.is_floating_point()]
    if not unknown:
        return found
    if not any(read_ahead(positions[n].device) for n in unknown):
        for n in unknown:
            p = positions[n]
            found[n] = int(p[0]) if p.shape[0] < 2 or bool(_steps_by_one(p)) else None
        return found
    facts = []  # per tensor: its first position, and whether every step is +1
    for n in unknown:
        p = positions[n]
        steps = _steps_by_one(p) if p.shape[0] > 1 else torch.ones((), dtype=torch.bool, device=p.device)
        facts += [p[0], steps.to(p.dtype)]
    read = torch.stack([f.to(facts[0].device) for f in facts]).tolist()
    for m, n in enumerate(unknown):
        found[n] = read[2 * m] if read[2 * m + 1] else None
    return found


def runs(*positions: Tensor) -> tuple[Tensor, ...]:
    """Each of ``positions`` as a run where it is consecutive, else as it is (read as :func:`starts`
    reads): positions a caller hands to many calls (the layers of a model) are then read once."""
    return tuple(p if s is None or run_start(p) is not None else run(s, p.shape[0], p.device)
                 for p, s in zip(positions, starts(*positions)))
