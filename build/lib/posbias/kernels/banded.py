"""Exact attention for Toeplitz biases constant beyond a window (T5 buckets, clipped per-offset
tables), shaped for a GPU: the far parts in one fused call each, the band dense.

With ``g(o) = g(w)`` for ``o ≥ w`` and ``g(−o) = g(−w)`` for ``o ≥ w``, query ``i``'s keys split
into three parts (the same split as :mod:`.windowed`, which walks query blocks for the CPU's cache):

* **far left**, keys ``j ≤ i − w``: plain attention plus the per-head constant ``g(w)``. For all
  queries at once this is one *bottom-right causal* fused call (flash attention in fp16/bf16,
  :mod:`.fused`) of the queries from position ``k0 + w`` on against the keys up to ``w`` before
  the last query — for self-attention a square causal call on ``q[w:]`` and ``k[:N − w]``;
* **far right** (bidirectional only), keys ``j ≥ i + w``: the same call on the sequences reversed,
  with ``g(−w)``;
* **the band**, ``|i − j| < w`` (``0 ≤ i − j < w`` when causal): chunks of ``C`` queries, each
  against its ``C + w − 1`` keys (``C + 2w − 2`` bidirectional), batched into a few dense matmuls
  with scores, bias and softmax in float32 — so the bias is exact even for bf16 inputs, which a
  fused kernel's bias in the inputs' dtype would round. Every interior chunk has the same bias
  matrix; the chunks at the ends get their own. On the CPU the band's forward is one fused flash
  call per group with that float32 bias as its mask (:func:`_band_forward`).

The parts merge exactly through their log-sum-exps (:func:`.flash.merge`). Backward: the fused
backward op with the merged output and ``lse − c`` for each far part (its exact share, as in ring
attention), a dense backward for the band whose ``dS`` summed along its diagonals is the table's
gradient. A constant's gradient is the sum of ``dS`` over its far part. Every row of ``dS = P ∘ (dP −
δ)`` sums to 0 (``δ_i = dO_i·O_i = Σ_j P_ij dP_ij``), so the last far part's sum is minus that of the
band and the other far part: causal, nothing of the far part is kept. Bidirectional, the far-left
constant's is ``Σ_i w_i (dO_i·o_i − δ_i)``, with ``w_i o_i`` that part's share of the merged output,
kept from the forward. Work is the fused kernel's plus O(N·(C + w)) for the band;
extra memory O(N·d) plus one group of band chunks, capped at :data:`BAND_ELEMENTS` floats
(:data:`CPU_BAND_ELEMENTS` on the CPU).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..diagonals import diagonal_sums
from ..positions import first
from ..schemes.base import ToeplitzScheme
from . import fused
from .flash import NEG, flash_available, flash_forward, mask_backward, merge

BAND_ELEMENTS = 1 << 25  # floats per band group's [B, H, chunks, C, W] score tensor on CUDA (128 MiB)
CPU_BAND_ELEMENTS = 1 << 22  # on the CPU (16 MiB; 2^20 and 2^25 measured the same speed)
FLOAT32_FAR_ROWS = 64  # CUDA: far parts of at most this many query rows run in float32 (see _far)
CPU_CHUNK = 128  # queries per band chunk on the CPU (measured, below)


def overhang(w: int, causal: bool) -> int:
    """Keys a band chunk reads beyond its own queries' count: ``w − 1`` (``2w − 2`` bidirectional)."""
    return w - 1 if causal else 2 * w - 2


def chunk_rows(w: int, causal: bool, device_type: str = "cuda") -> int:
    """Queries per band chunk. CUDA: at least 256 and at least the :func:`overhang` (large batched
    matmuls; not yet measured on a GPU). CPU: :data:`CPU_CHUNK`, whatever ``w`` — the dense band costs
    ``C + w − 1`` keys per query, so small chunks waste less (t5, w = 113, training at 4k / 8k, ratio
    to SDPA: chunk 128 1.36 / 1.18 against 256 1.61 / 1.31; 64 and 112 the same as 128 within the
    noise; 2 threads, 5 interleaved pairs)."""
    if device_type == "cpu":
        return CPU_CHUNK
    return max(256, overhang(w, causal))


class _Group(NamedTuple):
    """Band chunks sharing one bias matrix: rows ``[r0, r0 + n·rows)`` in ``n`` chunks, chunk ``c``
    against keys ``[k0 + c·rows, k0 + c·rows + keys)``; ``shift`` = first query's key index − ``k0``."""
    r0: int
    n: int
    rows: int
    k0: int
    keys: int
    shift: int


def _groups(lq: int, lk: int, delta: int, w: int, causal: bool, chunk: int, per_chunk: int,
            elements: int) -> list[_Group]:
    """Every band chunk, interior ones batched (at most ``elements`` scores a group)."""
    over = overhang(w, causal)
    cap = max(1, elements // max(1, per_chunk * chunk * (chunk + over)))  # interior chunks per group
    out, s = [], 0
    while s < lq:
        e = min(s + chunk, lq)
        a_s, a_e = delta + s, delta + e - 1  # key indices of the chunk's first and last query
        k0 = max(0, a_s - w + 1)
        k1 = min(lk, a_e + (1 if causal else w))
        interior = a_s - w + 1 >= 0 and e - s == chunk and (causal or a_e + w <= lk)
        if not interior:
            out.append(_Group(s, 1, e - s, k0, k1 - k0, a_s - k0))
            s = e
            continue
        n = 1  # extend over every following interior chunk, within the memory cap
        while n < cap:
            t = s + n * chunk
            if t + chunk > lq or (not causal and delta + t + chunk - 1 + w > lk):
                break
            n += 1
        out.append(_Group(s, n, chunk, k0, chunk + over, w - 1))
        s += n * chunk
    return out


def _windows(x: Tensor, g: _Group) -> Tensor:
    """``[B, H, n, keys, d]``: the keys (or values) of each chunk of the group (a copy)."""
    span = x[:, :, g.k0: g.k0 + (g.n - 1) * g.rows + g.keys]
    return span.unfold(2, g.keys, g.rows).transpose(-1, -2).float()


def _bias(vals: Tensor, g: _Group, w: int, causal: bool) -> Tensor:
    """``[H, rows, keys]`` float32: the bias of pair (r, t) at offset ``shift + r − t``, −∞ off the band."""
    off = g.shift + torch.arange(g.rows, device=vals.device)[:, None] - torch.arange(g.keys, device=vals.device)
    hidden = (off < 0) | (off >= w) if causal else off.abs() >= w
    return vals.float()[:, off.clamp(-w, w) + w].masked_fill(hidden, float("-inf"))


def _fold(dst: Tensor, part: Tensor, g: _Group) -> None:
    """Add the per-chunk key gradients ``[B, H, n, keys, d]`` into ``dst`` (the keys' gradient).
    Chunk ``c``'s keys start at block ``c`` of the group's span (blocks of ``rows`` keys); its piece
    ``p`` (keys ``[p·rows, (p+1)·rows)``) lands in block ``c + p``: one strided add per piece over all
    chunks at once, ``⌈keys / rows⌉`` adds, no loop over chunks."""
    b, h, n, keys, d = part.shape
    if n == 1:  # an end chunk: its own key range, whatever its length
        dst[:, :, g.k0: g.k0 + keys] += part[:, :, 0]
        return
    pieces = -(-keys // g.rows)
    buf = part.new_zeros(b, h, (n + pieces - 1) * g.rows, d)
    for p in range(pieces):
        lo, hi = p * g.rows, min(keys, (p + 1) * g.rows)
        buf[:, :, lo: lo + n * g.rows].view(b, h, n, g.rows, d)[:, :, :, : hi - lo].add_(part[:, :, :, lo:hi])
    span = (n - 1) * g.rows + keys
    dst[:, :, g.k0: g.k0 + span] += buf[:, :, :span]


def _band_forward(qc: Tensor, kw: Tensor, vw: Tensor, bias: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """One group's band: chunks ``[B, H, n, C, d]`` against their key windows ``[B, H, n, W, d]`` with
    the bias ``[H, C, W]`` (−∞ off the band) → (out ``[B, H, n, C, d]``, lse ``[B, H, n, C]``), float32.
    On the CPU one fused flash call with the bias as its mask, the chunks folded into the batch (half
    the time of the dense form: 23 against 46 ms for t5's band at 4k; a whole banded training step
    0.95–0.97× at 2k–8k, 7 pairs); elsewhere dense, since the CUDA flash kernel takes no mask."""
    b, h, n, c, d = qc.shape
    if flash_available(qc):
        fold = lambda x: x.transpose(1, 2).reshape(b * n, h, x.shape[-2], d)  # noqa: E731
        o, l = flash_forward(fold(qc), fold(kw), fold(vw), scale, False, bias[None])
        return o.view(b, n, h, c, d).transpose(1, 2), l.view(b, n, h, c).transpose(1, 2)
    s = torch.matmul(qc, kw.transpose(-1, -2)).mul_(scale).add_(bias[:, None])
    m = s.amax(-1, keepdim=True)
    p = s.sub_(m).exp_()
    total = p.sum(-1, keepdim=True)
    return torch.matmul(p, vw).div_(total), (m + total.log()).squeeze(-1)


def _elements(q: Tensor) -> int:
    return CPU_BAND_ELEMENTS if q.device.type == "cpu" else BAND_ELEMENTS


class _Far(NamedTuple):
    rows: slice  # the queries that have keys in this part
    keys: slice
    flip: bool  # far right: computed on the reversed sequences
    col: int  # the constant's column in vals (−1: g(w); 0: g(−w))


def _far_parts(lq: int, lk: int, delta: int, w: int, causal: bool) -> list[_Far]:
    parts = []
    first = max(0, w - delta)  # far left: queries whose position is ≥ k0 + w
    if first < lq:
        parts.append(_Far(slice(first, lq), slice(0, delta + lq - w), False, -1))
    last = min(lq, lk - w - delta)  # far right: queries whose position is ≤ k0 + lk − 1 − w
    if not causal and last > 0:
        parts.append(_Far(slice(0, last), slice(delta + w, lk), True, 0))
    return parts


def _take(x: Tensor, s: slice, flip: bool) -> Tensor:
    x = x[:, :, s]
    return x.flip(2) if flip else x


def _far(x: Tensor, s: slice, flip: bool, wide: bool) -> Tensor:
    """A far part's queries, keys or values: :func:`_take`, and on the CPU in float32. In bf16/fp16 the
    CPU's fused op gives a log-sum-exp and an output rounded otherwise than the float32 band they are
    merged with, and its backward takes ``δ = dO · O`` from the merged output rounded to the inputs'
    precision: under T5's unscaled logits q/k's gradients came out up to 8–16× further from the float64
    truth than the reference's in the same precision (a fuzzed case with logits of std 32: 0.12 against
    0.014), and over 329 fuzzed T5/offset cases forced onto ``banded`` their error over SDPA's (dense
    bias, same precision) had a 90th percentile of 5.6, now 1.3; in float32 they are the reference's.
    It costs bf16 training on ``banded`` 1.16–1.23× (t5, 2k–4k, H=8, d=64, 2 threads, median of 5
    alternating runs; float32 training is unchanged). A CUDA GPU runs the far part on its bf16/fp16
    flash kernel, which takes nothing else, as flash attention training does: rehearsed on the CPU with
    stand-ins of the CUDA ops (float64 arithmetic, outputs rounded to the inputs' dtype; a real kernel
    can only add error), q/k's gradients then come out 2–3.5× further from the truth than the
    reference's in the same precision (medians; ``benchmarks/bench_precision.py --device stand-in``,
    H=8, d=64, 1,200 keys), within the tests' rule, but 11× (up to 30×) for a single query, where the
    true gradient is small and ``δ``'s rounding is not. So in training a far part of at most
    :data:`FLOAT32_FAR_ROWS` queries runs in float32 on CUDA too, on the memory-efficient kernel (the
    reference's error then, as on the CPU). Its cost grows with the queries: at 64 queries against 32k
    keys, H=8, d=64, about 15 GFLOP forward and backward and a 134 MB float32 copy of the keys, which
    at float32's rate is estimated well under a millisecond a call (not yet measured on a GPU).
    Inference keeps the half-precision kernel (no copy of the keys per decoding step)."""
    x = _take(x, s, flip)
    return x.float() if wide else x


def _wide_far(x: Tensor, p: _Far, train: bool) -> bool:
    """Whether far part ``p`` runs in float32 (:func:`_far`): always on the CPU; on CUDA in training when
    it has at most :data:`FLOAT32_FAR_ROWS` queries."""
    return x.device.type == "cpu" or (train and p.rows.stop - p.rows.start <= FLOAT32_FAR_ROWS)


class _Banded(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, vals, delta: int, w: int, causal: bool, scale: float, chunk: int):
        bsz, h, lq, d = q.shape
        lk = k.shape[2]
        consts = vals.detach().float()
        out = q.new_empty(bsz, h, lq, d, dtype=torch.float32)
        lse = q.new_empty(bsz, h, lq, dtype=torch.float32)
        for g in _groups(lq, lk, delta, w, causal, chunk, bsz * h, _elements(q)):  # the band: every query
            rows = slice(g.r0, g.r0 + g.n * g.rows)
            o, l = _band_forward(q[:, :, rows].float().view(bsz, h, g.n, g.rows, d), _windows(k, g), _windows(v, g),
                                 _bias(consts, g, w, causal), scale)
            out[:, :, rows] = o.reshape(bsz, h, -1, d)
            lse[:, :, rows] = l.reshape(bsz, h, -1)
        far_parts, far_saved, keep = _far_parts(lq, lk, delta, w, causal), [], []
        train = any(ctx.needs_input_grad[:4])
        for n, p in enumerate(far_parts):  # each merged into its own rows: no full-length part held
            wide = _wide_far(q, p, train)
            qq, kk, vv = (_far(t, s, p.flip, wide) for t, s in ((q, p.rows), (k, p.keys), (v, p.keys)))
            o, l, aux = fused.forward(qq, kk, vv, scale, True)
            o, l = (o.flip(2), l.flip(2)) if p.flip else (o, l)
            l = l + consts[:, p.col].view(1, h, 1)
            out[:, :, p.rows], lse[:, :, p.rows] = merge([(out[:, :, p.rows], lse[:, :, p.rows]), (o, l)])
            far_saved.append(aux)
            if ctx.needs_input_grad[3] and n < len(far_parts) - 1:  # the constants' gradient: the last from the rest
                keep += [o.float(), l]
        ctx.save_for_backward(q, k, v, vals, out, lse, *keep)
        ctx.aux = far_saved
        ctx.args = (delta, w, causal, scale, chunk)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, vals, out, lse, *far = ctx.saved_tensors
        delta, w, causal, scale, chunk = ctx.args
        bsz, h, lq, d = q.shape
        lk = k.shape[2]
        consts = vals.detach().float()
        dout = dout.float()
        dq, dk, dv = (torch.zeros_like(t, dtype=torch.float32) for t in (q, k, v))
        dvals = torch.zeros_like(vals, dtype=torch.float32) if ctx.needs_input_grad[3] else None
        delta_rows = (dout * out).sum(-1)  # δ_i = dO_i · O_i
        safe = lse.clamp(min=NEG)
        far_parts = _far_parts(lq, lk, delta, w, causal)
        rest = torch.zeros(h, device=q.device)  # Σ dS over the band and every far part but the last, per head
        for n, p in enumerate(far_parts):
            wide = _wide_far(q, p, True)
            qq, kk, vv = (_far(t, s, p.flip, wide) for t, s in ((q, p.rows), (k, p.keys), (v, p.keys)))
            do, o = (_take(t, p.rows, p.flip).to(qq.dtype) for t in (dout, out))
            l_part = _take(lse, p.rows, p.flip) - consts[:, p.col].view(1, h, 1)
            gq, gk, gv = fused.backward(do, qq, kk, vv, o, l_part, ctx.aux[n], scale, True)
            if p.flip:
                gq, gk, gv = gq.flip(2), gk.flip(2), gv.flip(2)
            dq[:, :, p.rows] += gq
            dk[:, :, p.keys] += gk
            dv[:, :, p.keys] += gv
            if dvals is not None and n < len(far_parts) - 1:  # Σ_i w_i (dO_i·o_i − δ_i), w_i o_i its share of the output
                part_o, part_l, r = far[2 * n], far[2 * n + 1], p.rows  # the part's own rows
                share = torch.exp(part_l - safe[:, :, r])
                part_sum = (share * ((dout[:, :, r] * part_o).sum(-1) - delta_rows[:, :, r])).sum((0, 2))
                dvals[:, p.col] += part_sum
                rest += part_sum
        for g in _groups(lq, lk, delta, w, causal, chunk, bsz * h, _elements(q)):
            rows = slice(g.r0, g.r0 + g.n * g.rows)
            qc = q[:, :, rows].float().view(bsz, h, g.n, g.rows, d)
            per_row = (bsz, h, g.n, g.rows)
            # the chunks are one more batch dimension of the dense backward (merged lse: the band's share)
            gq, gk, gv, ds = mask_backward(qc, _windows(k, g), _windows(v, g), dout[:, :, rows].view(*per_row, d),
                                           lse[:, :, rows].view(per_row), delta_rows[:, :, rows].view(per_row),
                                           _bias(consts, g, w, causal)[:, None], scale)
            dq[:, :, rows] += gq.reshape(bsz, h, -1, d)
            _fold(dk, gk, g)
            _fold(dv, gv, g)
            if dvals is not None:  # pair (r, t) has offset shift + r − t: sums along the diagonals
                gb = ds.sum(1)  # [H, rows, keys] (ds is summed over the batch): the group's chunks share offsets
                off = g.shift + g.rows - 1 - torch.arange(g.rows + g.keys - 1, device=q.device)
                dvals.index_add_(1, off.clamp(-w, w) + w, diagonal_sums(gb))
                rest += gb.sum((1, 2))
        if dvals is not None and far_parts:  # each row's dS sums to 0: the last far part's sum is minus the rest
            dvals[:, far_parts[-1].col] -= rest
        grads = (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None if dvals is None else dvals.to(vals.dtype))
        return (*grads, None, None, None, None, None)


def banded_kernel(q: Tensor, k: Tensor, v: Tensor, scheme: ToeplitzScheme, *, q_pos: Tensor, k_pos: Tensor,
                  causal: bool, scale: float, chunk: int | None = None) -> Tensor:
    """Contiguous positions with every query's own position among the keys (the dispatcher checks),
    and ``scheme.flat_beyond``. Output in the inputs' dtype; the band in float32."""
    w = max(int(scheme.flat_beyond), 1)
    vals = scheme.bias_at(torch.arange(-w, w + 1, device=q.device))  # [H, 2w+1], differentiable
    delta = first(q_pos) - first(k_pos)
    chunk = chunk_rows(w, causal, q.device.type) if chunk is None else chunk
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be a positive number of queries")
    q, k, v = (t.contiguous() for t in (q, k, v))
    return _Banded.apply(q, k, v, vals, delta, w, causal, scale, chunk).to(q.dtype)
