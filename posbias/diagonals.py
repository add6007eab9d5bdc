"""Sums of a block's gradient ``dS [..., rows, keys]`` along its diagonals or anti-diagonals: the
gradient of a bias read from one row of per-offset values (the pairs on one diagonal share an
offset). Used by the kernels (offset tables, Toeplitz rows) and by FIRE (its log-distance table);
one padded reshape each, no scatter over pairs."""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F


def diagonal_sums(ds: Tensor) -> Tensor:
    """``[..., rows + keys − 1]``: entry ``u`` is ``Σ_{t − r = u − (rows − 1)} ds[..., r, t]``, the sums
    along the diagonals of ``ds [..., rows, keys]`` from the lowest-left (row rows − 1, key 0) to the
    top-right: pair ``(r, t)`` of a block has offset ``i − j = c + r − t``, so entry ``u`` holds the
    pairs of offset ``c + rows − 1 − u``. Each row is padded on the left with ``rows`` zeros and the
    buffer re-read with rows one longer, which shifts row ``r`` left by ``r``; a sum over rows finishes
    (no copy of ``ds`` in reverse, as :func:`antidiagonal_sums` of ``ds.flip(-2)`` would need)."""
    rows, keys = ds.shape[-2:]
    flat = F.pad(F.pad(ds, (rows, 0)).flatten(-2), (0, rows))
    return flat.view(*ds.shape[:-2], rows, rows + keys + 1).sum(-2)[..., 1:rows + keys]


def antidiagonal_sums(ds: Tensor) -> Tensor:
    """``[H, rows + keys − 1]``: ``Σ_{r+t=u} ds[:, r, t]`` for every ``u``. Each row is padded with
    ``rows`` zeros and the buffer re-read with row length ``keys + rows − 1``, which shifts row ``r``
    right by ``r``; column ``u`` then holds ``ds[r, u − r]`` (or 0), and a sum over rows finishes."""
    h, rows, keys = ds.shape
    padded = F.pad(ds, (0, rows)).flatten(1)[:, : rows * (keys + rows - 1)]
    return padded.view(h, rows, keys + rows - 1).sum(1)
