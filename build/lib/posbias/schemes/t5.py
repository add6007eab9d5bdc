"""T5 bucketed relative bias: ``PE(i, j) = u_{b(i−j)}``, ``num_buckets = n_b + 1`` scalars per head.

Causal bucket function for an offset ``o ≥ 0`` with ``N = num_buckets``, ``D = max_distance``,
``e = N // 2`` one-to-one buckets and ``m = N − e`` logarithmic ones::

    b(o) = o                                                 if o < e
    b(o) = min(N − 1, e + ⌊log(o / e) / log(D / e) · m⌋)     if o ≥ e

The last bucket ``N − 1`` collects every offset past ``D`` (it starts a little before ``D``), so any
length works. Bidirectional (encoder) form, from the canonical code: ``N' = N // 2`` buckets per
direction, keys after the query (``j > i``) add ``N'``, and the rule above is applied to ``|i − j|``
with ``N'``. Attention logits are not scaled (Raffel et al. 2020).

:func:`t5_bucket` equals Mesh-TensorFlow / HuggingFace ``_relative_position_bucket`` bit for bit; the
canonical code takes ``relative_position = j − i``, posbias takes ``offset = i − j``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from .base import ToeplitzScheme, bias_float, check_bool, check_int, flat_share, illustrative_table_

__all__ = ["T5Bias", "t5_bucket", "check_t5", "t5_last_bucket_start", "CANONICAL_FINAL_SHARE", "canonical_share_distance"]


def per_direction(num_buckets: int, bidirectional: bool) -> int:
    """The buckets of one direction (half of them for a bidirectional table); its first half are one-to-one."""
    return num_buckets // 2 if bidirectional else num_buckets


def check_t5(num_buckets: int, max_distance: int, bidirectional: bool) -> None:
    """Raise ValueError unless the bucket hyper-parameters define a valid bucket function."""
    minimum = 4 if bidirectional else 2
    check_int("num_buckets", num_buckets, minimum=minimum, hint=" (the count n_b + 1; "
              f"{'bidirectional needs 2 per direction' if bidirectional else 'at least one exact and one log bucket'})")
    exact = per_direction(num_buckets, bidirectional) // 2
    check_int("max_distance", max_distance, minimum=exact + 1,
              hint=f" (must exceed the one-to-one region of {exact} buckets for num_buckets={num_buckets})")


def t5_bucket(
    offset: Tensor | int,
    *,
    num_buckets: int = 32,
    max_distance: int = 128,
    bidirectional: bool = False,
) -> Tensor:
    """Bucket index of each offset ``i − j`` (elementwise on an integer tensor of any shape).

    ``num_buckets`` is the count of buckets (``n_b + 1`` in the textbook's notation). The log ratio is
    computed in float32 and truncated, exactly as the canonical code does, so the results agree bit
    for bit with ``transformers``' ``T5Attention._relative_position_bucket(j − i, ...)``.
    """
    if not torch.compiler.is_compiling():  # checked eagerly; traced (a user's score_mod) the hyper-
        check_t5(num_buckets, max_distance, bidirectional)  # parameters may be symbolic: no f-strings
    offset = torch.as_tensor(offset)
    if offset.dtype.is_floating_point or offset.dtype == torch.bool:
        raise ValueError(f"offsets must be an integer tensor, got dtype {offset.dtype}")
    offset = offset.long()
    n = num_buckets
    if bidirectional:
        n //= 2
        # canonical: relative_position = j − i > 0 (key after query) adds n  ⇔  offset < 0
        base = (offset < 0).long() * n
        dist = offset.abs()
    else:
        base = torch.zeros_like(offset)
        dist = offset.clamp(min=0)  # canonical: −min(j − i, 0)
    exact = n // 2
    is_small = dist < exact
    # clamp(min=1) only keeps log(0) out of the branch `where` discards; identical for dist >= exact
    large = exact + (
        torch.log(dist.clamp(min=1).float() / exact) / math.log(max_distance / exact) * (n - exact)
    ).to(torch.long)
    large = torch.minimum(large, torch.full_like(large, n - 1))
    return base + torch.where(is_small, dist, large)


def t5_last_bucket_start(num_buckets: int, max_distance: int, bidirectional: bool = False) -> int:
    """Smallest distance ``w`` from which every larger distance lands in the final bucket. Found where
    the logarithmic formula puts it, ``exact · (max_distance / exact)^((n − 1 − exact) / (n − exact))``,
    by :func:`t5_bucket` itself on the distances around that guess (its float32 rounding moves the
    boundary by a distance or so), or on every distance up to ``max_distance`` if the guess is off; the
    bucket never falls as the distance grows. O(1) instead of O(max_distance): a study's choice of
    ``max_distance`` calls this once per candidate (16k tokens took 7 s; 10M never finished)."""
    check_t5(num_buckets, max_distance, bidirectional)
    n = num_buckets // 2 if bidirectional else num_buckets
    exact = n // 2
    guess = int(exact * (max_distance / exact) ** ((n - 1 - exact) / (n - exact)))
    lo = max(0, min(guess - 8, max_distance))
    d = torch.arange(lo, min(max_distance, guess + 8) + 1)
    last = torch.nonzero(t5_bucket(d, num_buckets=n, max_distance=max_distance) == n - 1)
    if len(last) and (int(last[0]) > 0 or lo == 0):  # the boundary is inside the window
        return lo + int(last[0])
    d = torch.arange(0, max_distance + 1)
    return int(torch.nonzero(t5_bucket(d, num_buckets=n, max_distance=max_distance) == n - 1)[0])


#: Canonical T5 (32 buckets, max_distance 128, trained on 512 tokens): the final bucket starts at 113
#: and sees 60.8% of the causal training pairs — the share that makes it a well-trained "far" value.
CANONICAL_FINAL_SHARE = flat_share(113, 512)


def canonical_share_distance(train_len: int, start_of: Callable[[int], int], lowest: int) -> int:
    """The distance ``D ≥ lowest`` (up to ``train_len``) whose final entry (starting at ``start_of(D)``,
    which never falls as ``D`` grows) sees the share of training pairs closest to canonical T5's (ties:
    the larger D). The share never grows with ``D``, so the closest is at the crossing of the canonical
    share: the last ``D`` at or above it, or the last of the first ones below it (they share one
    value); each found by bisection, O(log train_len) calls of ``start_of``."""
    hi = max(lowest, train_len)
    share = lambda d: flat_share(start_of(d), train_len)  # noqa: E731

    def last(ok: Callable[[int], bool], a: int) -> int:
        """The largest ``d`` in ``[a, hi]`` with ``ok(d)``, where ``ok`` holds up to some ``d`` and then no
        more (``a − 1`` if it fails at ``a``)."""
        b = hi
        while a <= b:
            m = (a + b) // 2
            a, b = (m + 1, b) if ok(m) else (a, m - 1)
        return b

    above = last(lambda d: share(d) >= CANONICAL_FINAL_SHARE, lowest)
    if above == hi:
        return above
    below = share(above + 1)
    below_end = last(lambda d: share(d) >= below, above + 1)
    if above < lowest or CANONICAL_FINAL_SHARE - below <= share(above) - CANONICAL_FINAL_SHARE:
        return below_end
    return above


def bucket_table(num_buckets: int, max_distance: int, bidirectional: bool = False,
                 span: int | None = None) -> list[tuple[int, int, int | None]]:
    """``(bucket, first offset, last offset or None for unbounded)`` rows of the causal direction
    (offsets ≥ 0), as the concept cards tabulate them; ``span`` (default ``4 · max_distance``) is the
    largest offset looked at."""
    check_t5(num_buckets, max_distance, bidirectional)
    span = span or 4 * max_distance
    off = torch.arange(0, span + 1)
    b = t5_bucket(off, num_buckets=num_buckets, max_distance=max_distance, bidirectional=bidirectional)
    rows = []
    for bucket in sorted(set(b.tolist())):
        hits = off[b == bucket]
        last = int(hits.max())
        rows.append((bucket, int(hits.min()), None if last == span else last))
    return rows


class T5Bias(ToeplitzScheme):
    name = "t5"
    summary = "learned scalar per log-spaced bucket of i-j (num_buckets = n_b+1), unscaled logits"
    paper = "Raffel et al. 2020, Exploring the Limits of Transfer Learning (T5)"
    learnable = True
    unscaled = True

    def __init__(
        self,
        *,
        n_heads: int,
        head_dim: int,
        num_buckets: int = 32,
        max_distance: int = 128,
        bidirectional: bool = False,
    ) -> None:
        super().__init__(n_heads=n_heads, head_dim=head_dim)
        check_t5(num_buckets, max_distance, bidirectional)
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = check_bool("bidirectional", bidirectional)
        # one scalar per bucket and head: the count is num_buckets = n_b + 1, not n_b
        self.table = nn.Parameter(torch.zeros(num_buckets, n_heads))
        self._flat = t5_last_bucket_start(num_buckets, max_distance, self.bidirectional)

    @property
    def flat_beyond(self) -> int:
        return self._flat

    @classmethod
    def study_defaults(cls, train_len: int, options: dict) -> dict:
        """``max_distance`` such that the final bucket sees canonical T5's share of the training pairs
        (60.8%, see :data:`CANONICAL_FINAL_SHARE`); with 32 buckets and ``train_len = 64`` that is
        ``max_distance = 17`` (54%, the closest reachable: the 16 one-to-one buckets come first)."""
        if "max_distance" in options:
            return {}
        n = options.get("num_buckets", 32)
        bi = options.get("bidirectional", False)
        start_of = lambda d: t5_last_bucket_start(n, d, bi)  # noqa: E731
        return {"max_distance": canonical_share_distance(train_len, start_of, per_direction(n, bi) // 2 + 1)}

    def buckets(self, offset: Tensor) -> Tensor:
        return t5_bucket(offset, num_buckets=self.num_buckets, max_distance=self.max_distance,
                         bidirectional=self.bidirectional)

    def bias_at(self, offset: Tensor) -> Tensor:
        return bias_float(self.table)[self.buckets(offset)].movedim(-1, 0)

    def illustrate_(self) -> str:
        return illustrative_table_(self.table)

    def describe(self, query_pos: int | None = None) -> list[str]:
        """The bucket table: which offsets share each learned scalar (the causal direction)."""
        n, per_dir = self.num_buckets, per_direction(self.num_buckets, self.bidirectional)
        lines = [f"{n} buckets (n_b + 1 = {n}, so n_b = {n - 1}); one-to-one for offsets < {per_dir // 2}; "
                 f"final bucket from offset {self.flat_beyond}"]
        if self.bidirectional:
            lines.append(f"bidirectional: {per_dir} buckets per direction; keys after the query (j > i) add {per_dir}")
        lines.append("bucket  offsets i-j (keys at or before the query)")
        for bucket, lo, hi in bucket_table(n, self.max_distance, self.bidirectional):
            rng = f"{lo}" if hi == lo else (f"{lo}-{hi}" if hi is not None else f">= {lo}")
            lines.append(f"{bucket:>6}  {rng}" + ("" if hi is None else f"  ({hi - lo + 1})"))
        return lines

    def _offset_header(self) -> str:
        return f"{'bucket':>8}  {'region':<11}"

    def _offset_cell(self, offset: int) -> str:
        if offset < 0 and not self.bidirectional:
            region = "(masked)"
        elif abs(offset) < per_direction(self.num_buckets, self.bidirectional) // 2:
            region = "one-to-one"
        elif abs(offset) >= self.flat_beyond:
            region = "final"
        else:
            region = "log"
        return f"{int(self.buckets(torch.tensor(offset))):>8}  {region:<11}"

    def _offset_notes(self, offsets: list[int]) -> list[str]:
        shared: dict[int, list[int]] = {}
        for d in dict.fromkeys(o for o in offsets if o >= 0 or self.bidirectional):  # (a masked key reads none)
            shared.setdefault(int(self.buckets(torch.tensor(d))), []).append(d)
        notes = [f"offsets {', '.join(map(str, ds))} share bucket {b}: one learned scalar per head for all of them"
                 for b, ds in shared.items() if len(ds) > 1]
        if not bool(self.table.detach().any()):
            notes.append("(the table starts at 0: training learns its values)")
        return notes

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, num_buckets={self.num_buckets}, "
                f"max_distance={self.max_distance}, bidirectional={self.bidirectional}")
