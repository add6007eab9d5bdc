"""Sums of a block's gradient ``dS [..., rows, keys]`` along its diagonals or anti-diagonals: the
gradient of a bias read from one row of per-offset values (the pairs on one diagonal share an
offset). Used by the kernels (offset tables, Toeplitz rows) and by FIRE (its log-distance table).

No scatter over pairs. A wide block (``keys ≥ 2·rows``, the usual case: a query block against all
its keys) is read once, in place: the diagonals that cross every row are the columns of a strided
view of ``dS`` itself (row ``r`` shifted by ``r``: stride ``keys ± 1``) summed over rows, and only
the two corners where diagonals start or end (``rows × (rows − 1)`` each) go through the padded
copy that narrow blocks take whole. Measured on a ``[8, 128, 2048]`` block (2 threads): 0.45 ms
for the strided view's sum against 2.3 ms for a padded copy of the whole block (a fresh tensor:
its page faults cost more than the copy). The sums are exact (each pair is added once; no
subtraction of what a view read twice).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def diagonal_sums(ds: Tensor) -> Tensor:
    """``[..., rows + keys − 1]``: entry ``u`` is ``Σ_{t − r = u − (rows − 1)} ds[..., r, t]``, the sums
    along the diagonals of ``ds [..., rows, keys]`` from the lowest-left (row rows − 1, key 0) to the
    top-right: pair ``(r, t)`` of a block has offset ``i − j = c + r − t``, so entry ``u`` holds the
    pairs of offset ``c + rows − 1 − u``."""
    rows, keys = ds.shape[-2:]
    if not _wide(ds):
        return _padded_diagonal_sums(ds)
    # diagonals t − r = 0 … keys − rows cross every row: row r of a stride-(keys + 1) view starts at (r, r)
    middle = _rows_view(ds, 0, keys + 1, keys - rows + 1).sum(-2)
    return torch.cat([_padded_diagonal_sums(ds[..., :rows - 1])[..., :rows - 1], middle,
                      _padded_diagonal_sums(ds[..., keys - rows + 1:])[..., rows - 1:]], -1)


def antidiagonal_sums(ds: Tensor) -> Tensor:
    """``[..., rows + keys − 1]``: entry ``u`` is ``Σ_{r + t = u} ds[..., r, t]``."""
    rows, keys = ds.shape[-2:]
    if not _wide(ds):
        return _padded_antidiagonal_sums(ds)
    # anti-diagonals u = rows − 1 … keys − 1 cross every row: row r of a stride-(keys − 1) view starts at
    # (r, rows − 1 − r)
    middle = _rows_view(ds, rows - 1, keys - 1, keys - rows + 1).sum(-2)
    return torch.cat([_padded_antidiagonal_sums(ds[..., :rows - 1])[..., :rows - 1], middle,
                      _padded_antidiagonal_sums(ds[..., keys - rows + 1:])[..., rows - 1:]], -1)


def _wide(ds: Tensor) -> bool:
    """True when the in-place views apply: rows stored ``keys`` apart, and ``keys ≥ 2·rows`` (the two
    corners, read through a padded copy, are then at most the block's size)."""
    rows, keys = ds.shape[-2:]
    return rows > 1 and keys >= 2 * rows and ds.stride(-1) == 1 and ds.stride(-2) == keys


def _rows_view(ds: Tensor, start: int, step: int, width: int) -> Tensor:
    """``[..., rows, width]`` view of ``ds`` whose row ``r`` begins ``start + r·step`` elements into
    the block (rows stored ``keys`` apart, so ``step = keys ± 1`` shifts row ``r`` by ``∓ r``)."""
    rows = ds.shape[-2]
    return ds.as_strided((*ds.shape[:-2], rows, width), (*ds.stride()[:-2], step, 1), ds.storage_offset() + start)


def _padded_diagonal_sums(ds: Tensor) -> Tensor:
    """:func:`diagonal_sums` by copy: each row padded on the left with ``rows`` zeros and the buffer
    re-read with rows one longer, which shifts row ``r`` left by ``r``; a sum over rows finishes."""
    rows, keys = ds.shape[-2:]
    flat = F.pad(F.pad(ds, (rows, 0)).flatten(-2), (0, rows))
    return flat.view(*ds.shape[:-2], rows, rows + keys + 1).sum(-2)[..., 1:rows + keys]


def _padded_antidiagonal_sums(ds: Tensor) -> Tensor:
    """:func:`antidiagonal_sums` by copy: each row padded with ``rows`` zeros and the buffer re-read
    with row length ``keys + rows − 1``, which shifts row ``r`` right by ``r``; column ``u`` then holds
    ``ds[r, u − r]`` (or 0), and a sum over rows finishes."""
    rows, keys = ds.shape[-2:]
    padded = F.pad(ds, (0, rows)).flatten(-2)[..., : rows * (keys + rows - 1)]
    return padded.view(*ds.shape[:-2], rows, keys + rows - 1).sum(-2)
