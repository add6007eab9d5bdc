"""Exact attention for Toeplitz biases that are constant beyond a window (T5 buckets, clipped
per-offset tables): ``g(o) = g(w)`` for ``o ≥ w`` and ``g(−o) = g(−w)`` for ``o ≥ w``.

For a block of queries ``[a, b)`` the keys split into three parts:

* keys ``j ≤ a − w`` — every pair has offset ≥ w, so the bias is the per-head constant ``g(w)``:
  plain attention by the fused flash kernel, with ``g(w)`` added to its log-sum-exp;
* a band ``a − w < j < b − 1 + w`` — the exact bias from an O(w) table, computed densely;
* (bidirectional) keys ``j ≥ b − 1 + w`` — constant ``g(−w)``, fused kernel again.

The parts merge exactly through their log-sum-exps (see :mod:`.flash`). Extra memory is O(N·w), never
``[H, N, N]``. Backward: the fused backward op on the merged output for the flat parts, a dense
backward for the band (its mask cached like the forward's), and the table gradient as sums along the
band's diagonals (one per offset), index-added into the table; the constants' gradient
is ``Σ_i w_i (dO_i·o_i − D_i)`` with ``w_i o_i`` the part's share of the merged output.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..diagonals import diagonal_sums
from ..positions import first
from ..schemes.base import ToeplitzScheme
from .flash import flash_backward, flash_forward, mask_backward, merge

# Query rows per block (each block: one dense band, flat parts on the fused op). Bidirectional t5
# training (2026-12-01, 7 pairs, ratio to SDPA) at 2.5k / 3k / 4k: 128 rows 2.29 / 2.28 / 2.36×,
# 256 rows 1.72 / 1.61 / 1.68×, 512 rows 2.04 / 1.96 / 1.69×
BLOCK = 256


def _segments(qa: int, qb: int, k0: int, lk: int, w: int, causal: bool) -> tuple[int, int]:
    """Key indices ``[0, left) | [left, band_end) | [band_end, lk)`` for query positions [qa, qb)."""
    left = min(max(qa - w - k0 + 1, 0), lk)
    band_end = min(max((qb if causal else qb - 1 + w) - k0, left), lk)
    return left, band_end


class _Windowed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, vals, q0: int, k0: int, w: int, causal: bool, scale: float, block: int):
        # vals: [H, 2w+1] bias for offsets −w … w
        bsz, h, lq, d = q.shape
        lk = k.shape[2]
        out = torch.empty(bsz, h, lq, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(bsz, h, lq, dtype=torch.float32, device=q.device)
        shares = []  # per block: the flat parts' shares of the output, for the constants' gradient
        band_mask = _BandMasks(vals.detach(), w, causal)
        c_left, c_right = vals[:, -1].view(1, h, 1), vals[:, 0].view(1, h, 1)
        for s in range(0, lq, block):
            e = min(s + block, lq)
            qa, qb = q0 + s, q0 + e
            left, band_end = _segments(qa, qb, k0, lk, w, causal)
            qb_ = q[:, :, s:e]
            parts, flat = [], []
            if left > 0:
                o, l = flash_forward(qb_, k[:, :, :left], v[:, :, :left], scale, False)
                parts.append((o, l + c_left))
                flat.append(len(parts) - 1)
            if band_end > left:
                mask = band_mask(qa, qb, k0 + left, k0 + band_end)
                parts.append(flash_forward(qb_, k[:, :, left:band_end], v[:, :, left:band_end], scale, False, mask))
            if not causal and band_end < lk:
                o, l = flash_forward(qb_, k[:, :, band_end:], v[:, :, band_end:], scale, False)
                parts.append((o, l + c_right))
                flat.append(len(parts) - 1)
            if not parts:
                out[:, :, s:e] = 0
                lse[:, :, s:e] = float("-inf")
                shares.append(None)
                continue
            o, l = merge(parts)
            out[:, :, s:e], lse[:, :, s:e] = o, l
            if ctx.needs_input_grad[3]:  # the constants' gradient needs each flat part's share
                safe = l.clamp(min=torch.finfo(torch.float32).min)
                shares.append([(torch.exp(parts[i][1] - safe), parts[i][0].float()) for i in flat])
            else:
                shares.append([])
        ctx.save_for_backward(q, k, v, vals, out, lse)
        ctx.shares = shares
        ctx.args = (q0, k0, w, causal, scale, block)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, vals, out, lse = ctx.saved_tensors
        q0, k0, w, causal, scale, block = ctx.args
        bsz, h, lq, d = q.shape
        lk = k.shape[2]
        dq = torch.zeros_like(q, dtype=torch.float32)
        dk = torch.zeros_like(k, dtype=torch.float32)
        dv = torch.zeros_like(v, dtype=torch.float32)
        dvals = torch.zeros_like(vals, dtype=torch.float32)
        c_left, c_right = vals[:, -1].view(1, h, 1), vals[:, 0].view(1, h, 1)
        band_mask = _BandMasks(vals.detach(), w, causal)
        dout = dout.float()
        for n, s in enumerate(range(0, lq, block)):
            if ctx.shares[n] is None:
                continue
            e = min(s + block, lq)
            qa, qb = q0 + s, q0 + e
            left, band_end = _segments(qa, qb, k0, lk, w, causal)
            do, o, l = dout[:, :, s:e], out[:, :, s:e], lse[:, :, s:e]
            qb_ = q[:, :, s:e]
            delta = (do * o).sum(-1)
            shares = iter(ctx.shares[n])
            flat_parts = [(0, left, c_left, -1)] if left > 0 else []
            if not causal and band_end < lk:
                flat_parts.append((band_end, lk, c_right, 0))
            for lo, hi, c, col in flat_parts:
                gq, gk, gv = flash_backward(do.to(q.dtype), qb_, k[:, :, lo:hi], v[:, :, lo:hi], o.to(q.dtype),
                                            l - c, scale, False)
                dq[:, :, s:e] += gq
                dk[:, :, lo:hi] += gk
                dv[:, :, lo:hi] += gv
                if ctx.needs_input_grad[3]:
                    weight, part_out = next(shares)
                    dvals[:, col] += (weight * ((do * part_out).sum(-1) - delta)).sum((0, 2))
            if band_end > left and not ctx.needs_input_grad[3]:  # fixed bias: fused backward
                mask = band_mask(qa, qb, k0 + left, k0 + band_end)
                gq, gk, gv = flash_backward(do.to(q.dtype), qb_, k[:, :, left:band_end], v[:, :, left:band_end],
                                            o.to(q.dtype), l, scale, False, mask)
                dq[:, :, s:e] += gq
                dk[:, :, left:band_end] += gk
                dv[:, :, left:band_end] += gv
            elif band_end > left:
                mask = band_mask(qa, qb, k0 + left, k0 + band_end)  # cached: interior blocks share one
                gq, gk, gv, gb = mask_backward(qb_, k[:, :, left:band_end], v[:, :, left:band_end], do, l, delta,
                                               mask, scale)
                dq[:, :, s:e] += gq
                dk[:, :, left:band_end] += gk
                dv[:, :, left:band_end] += gv
                # pair (r, t) has offset qa − ka + r − t: sums along the diagonals (u = t − r + rows − 1),
                # clamped into the table. A scatter-add over every
                # pair took 0.82 against 0.56 ms per 8 × 256 × 384 block (t5 2k fwd+bwd 1.37x -> 1.29x)
                rows, keys = gb.shape[1], gb.shape[2]
                off = qa - (k0 + left) + rows - 1 - torch.arange(rows + keys - 1, device=q.device)
                dvals.index_add_(1, off.clamp(-w, w) + w, diagonal_sums(gb))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dvals.to(vals.dtype), None, None, None, None, None, None


class _BandMasks:
    """Additive band masks (bias, −∞ where hidden), built once per (query − key start, shape): every
    interior block has the same one, since the bias depends on the offset only."""

    def __init__(self, vals: Tensor, w: int, causal: bool) -> None:
        self.vals, self.w, self.causal, self.cache = vals, w, causal, {}

    def __call__(self, qa: int, qb: int, ka: int, kb: int) -> Tensor:
        key = (qa - ka, qb - qa, kb - ka)
        if key not in self.cache:
            bias, vis = _band(self.vals, qa, qb, ka, kb, self.w, self.causal)
            if vis is not None:
                bias = bias.masked_fill(~vis, float("-inf"))
            self.cache[key] = bias.unsqueeze(0)
        return self.cache[key]


def _band(vals: Tensor, qa: int, qb: int, ka: int, kb: int, w: int, causal: bool) -> tuple[Tensor, Tensor | None]:
    # Toeplitz: B[r, c] = E[r − c + Lk − 1] over the Lq + Lk − 1 offsets of the block, built as a
    # strided window of the reversed row (a copy, not an [Lq, Lk] gather)
    lq, lk = qb - qa, kb - ka
    offsets = torch.arange((qa - ka) - (lk - 1), (qa - ka) + lq, device=vals.device)
    row = vals.float()[:, offsets.clamp(-w, w) + w].flip(-1)  # F[u] = E[T − 1 − u]
    bias = row.unfold(-1, lk, 1).flip(-2)  # W[a, c] = F[a + c];  B[r] = W[Lq − 1 − r]
    vis = None
    if causal:
        vis = torch.arange(ka, kb, device=vals.device)[None, :] <= torch.arange(qa, qb, device=vals.device)[:, None]
    return bias, vis


def windowed_kernel(q: Tensor, k: Tensor, v: Tensor, scheme: ToeplitzScheme, *, q_pos: Tensor, k_pos: Tensor,
                    causal: bool, scale: float, block: int = BLOCK) -> Tensor:
    """Requires contiguous positions (checked by the dispatcher) and ``scheme.flat_beyond``."""
    w = scheme.flat_beyond
    assert w is not None
    w = max(int(w), 1)
    vals = scheme.bias_at(torch.arange(-w, w + 1, device=q.device))  # [H, 2w+1], differentiable
    # float32 throughout: the band mask carries the bias, and a bf16 mask would round it
    f = [t.float().contiguous() for t in (q, k, v)]
    return _Windowed.apply(*f, vals, first(q_pos), first(k_pos), w, causal, scale, block).to(q.dtype)
