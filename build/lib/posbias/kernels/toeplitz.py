"""Exact attention for any Toeplitz bias on the fused flash kernel (KERPLE and every ``bias_at`` scheme).

A Toeplitz bias needs one number per offset. For a query block ``[a, b)`` against keys ``[0, K)``,
pass the keys (and values) in *reverse* order — attention does not depend on the order of the keys —
and the block's additive mask ``B'[r, t] = g(a + r − (K − 1 − t))`` depends on ``r + t`` only: it is
``R.unfold(-1, K, 1)`` over one row ``R[u] = g(a − K + 1 + u)`` of ``b − a + K − 1`` offsets, a
zero-copy view with strides ``(1, 1)`` that the fused kernel reads directly (building a forward-order
mask instead costs a copy of ``[H, rows, K]`` floats, about 3× the attention call itself). Causality is
in the row: offsets < 0 hold −∞, so one fused call per query block computes the block exactly with no
merge, and the masked waste is confined to the diagonal block. The bias is evaluated once, on the
``Lq + Lk − 1`` offsets of the call. Extra memory: the reversed keys and values, O(N).

Backward: the fused backward op with the same view gives q/k/v gradients. When the bias has
learnable parameters (KERPLE ``r1``/``r2``, a T5 or offset table) the gradient of the per-offset row is
``∂L/∂R[u] = Σ_{r+t=u} dS[r, t]`` with ``dS = P ∘ (dP − δ)`` (``δ = rowsum(dO ∘ O)``): each block then
runs a dense backward (``P``, ``dP``, ``dq``, ``dk``, ``dv``: five matmuls, measured faster than the
fused backward plus the two matmuls ``dS`` needs) and sums ``dS`` along its anti-diagonals in place
(:func:`~posbias.diagonals.antidiagonal_sums`); autograd takes the row gradient on to the scheme's parameters. Extra memory in that
case: a few ``[B, H, block, keys]`` float32 buffers, linear in N.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..diagonals import antidiagonal_sums
from ..positions import first
from ..schemes.base import ToeplitzScheme, kept, needs_grad, trains_bias
from .flash import backward_rows, block_work, flash_backward, flash_forward, fused_inputs, mask_backward
from .reference import ungrouped


def forward_block(lk: int) -> int:
    """Query rows per block of the fused op, forward and, for a fixed bias, backward (a trained bias:
    :func:`~posbias.kernels.flash.backward_rows`): larger blocks cost fewer calls, but the causal
    waste in the diagonal block grows like block / N. Measured (t5 forward, H=8, d=64, 2 threads,
    ratio to SDPA, median of 4 pairs): at 2k, 256 → 1.11× vs 512 → 1.21×; at 8k, 1024 → 1.12× vs 512
    → 1.18×; at 16k, 1024 → 1.08× vs 512 → 1.21× and 2048 → 1.14×. ALiBi training's backward
    (2026-12-01, 5–7 pairs, ratio to SDPA) on these blocks instead of at most 512 rows: the same at
    1k–4k (at 1k 256 rows 1.22× vs 512 1.34×; at 4k 512 and 1024 rows 1.28× / 1.31×), at 8k 1.16×
    vs 1.35× and at 16k 1.09× vs 1.50× (1024 rows; 2048: 1.17×); old against new code alternating,
    new/old 0.81 at 8k and 0.78 at 16k."""
    return min(1024, max(256, lk // 8))


def _mask(table: Tensor, o_min: int, qa: int, lq: int, ka: int, lk: int) -> Tensor:
    """``[1, H, lq, lk]`` view: the mask for queries ``qa …`` against keys ``ka … ka + lk − 1`` taken in
    reverse order, ``B'[r, t] = g(qa + r − (ka + lk − 1 − t)) = R[r + t]`` (no copy)."""
    lo = qa - (ka + lk - 1) - o_min  # R[0] is the offset of the first query and the last key
    return table[:, lo: lo + lq + lk - 1].unfold(-1, lk, 1).unsqueeze(0)


def _forward(q: Tensor, k: Tensor, v: Tensor, table: Tensor, o_min: int, q0: int, k0: int, causal: bool,
             scale: float, block: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The blocks' fused calls on the reversed keys → (out, lse, reversed keys, reversed values)."""
    lq, lk = q.shape[2], k.shape[2]
    k_rev, v_rev = k.flip(2), v.flip(2)  # key t of k_rev is key lk − 1 − t
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    for s, e, hi in _blocks(lq, lk, q0, k0, causal, block):
        if hi <= 0:
            out[:, :, s:e], lse[:, :, s:e] = 0, float("-inf")
            continue
        mask = _mask(table, o_min, q0 + s, e - s, k0, hi)
        out[:, :, s:e], lse[:, :, s:e] = flash_forward(q[:, :, s:e], k_rev[:, :, lk - hi:], v_rev[:, :, lk - hi:],
                                                       scale, False, mask)
    return out, lse, k_rev, v_rev


class _Toeplitz(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, table, o_min: int, q0: int, k0: int, causal: bool, scale: float, block: int):
        out, lse, k_rev, v_rev = _forward(q, k, v, table, o_min, q0, k0, causal, scale, block)
        ctx.save_for_backward(q, k_rev, v_rev, table, out, lse)
        ctx.args = (o_min, q0, k0, causal, scale, block)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k_rev, v_rev, table, out, lse = ctx.saved_tensors
        o_min, q0, k0, causal, scale, block = ctx.args
        if ctx.needs_input_grad[3]:  # the dense backward that yields dS: blocks that stay in cache
            block = min(block, backward_rows(q, k_rev.shape[2]))
        lq, lk = q.shape[2], k_rev.shape[2]
        dout = dout.contiguous()
        # keys' and values' gradients add up over the query blocks: in float32 for bf16/fp16 inputs
        dq = torch.zeros_like(q)
        dk, dv = (torch.zeros_like(t, dtype=torch.float32) for t in (k_rev, v_rev))
        dtable = torch.zeros_like(table) if ctx.needs_input_grad[3] else None
        delta = (dout * out).sum(-1) if dtable is not None else None  # δ_i = dO_i · O_i
        work = block_work(q.shape[0] * q.shape[1] * min(block, lq) * lk, q.device) if dtable is not None else None
        for s, e, hi in _blocks(lq, lk, q0, k0, causal, block):
            if hi <= 0:
                continue
            mask = _mask(table, o_min, q0 + s, e - s, k0, hi)
            args = (q[:, :, s:e], k_rev[:, :, lk - hi:], v_rev[:, :, lk - hi:], dout[:, :, s:e])
            if dtable is None:
                gq, gk, gv = flash_backward(args[3], *args[:3], out[:, :, s:e], lse[:, :, s:e], scale, False, mask)
            else:  # the row's gradient needs dS itself: one dense pass gives it and q/k/v's gradients
                gq, gk, gv, ds = mask_backward(*args, lse[:, :, s:e], delta[:, :, s:e], mask, scale, work,
                                               whole_rows=True)
                lo = q0 + s - (k0 + hi - 1) - o_min
                dtable[:, lo: lo + e - s + hi - 1] += antidiagonal_sums(ds)
            dq[:, :, s:e] += gq
            dk[:, :, lk - hi:] += gk
            dv[:, :, lk - hi:] += gv
        return dq, dk.flip(2).to(k_rev.dtype), dv.flip(2).to(v_rev.dtype), dtable, None, None, None, None, None, None


def _blocks(lq: int, lk: int, q0: int, k0: int, causal: bool, block: int):
    """``(start, end, keys)`` per query block: causal blocks read only the keys up to their last query."""
    for s in range(0, lq, block):
        e = min(s + block, lq)
        yield s, e, (min(lk, q0 + e - k0) if causal else lk)


def toeplitz_kernel(q: Tensor, k: Tensor, v: Tensor, scheme: ToeplitzScheme, *, q_pos: Tensor, k_pos: Tensor,
                    causal: bool, scale: float, block: int | None = None) -> Tensor:
    """Contiguous positions (checked by the dispatcher). The bias is evaluated once on the call's
    ``Lq + Lk − 1`` offsets, with autograd, so its parameters receive their gradients."""
    lq, lk = q.shape[2], k.shape[2]
    q0, k0 = first(q_pos), first(k_pos)
    o_min, o_max = q0 - (k0 + lk - 1), q0 + lq - 1 - k0

    def row() -> Tensor:
        table = _row(scheme, o_min, o_max, q.device)
        if causal and o_min < 0:  # offsets < 0 are hidden (out of place, so the hidden entries get no gradient)
            table = table.masked_fill(torch.arange(o_min, o_max + 1, device=q.device) < 0, float("-inf"))
        return table

    dtype = q.dtype
    block = block or forward_block(lk)
    if not needs_grad(scheme, q, k, v):
        f = fused_inputs(q, k, v)
        if lq < lk and lq <= block:
            # the reversed row is kept for the call's offsets (:func:`~posbias.schemes.base.kept`): the
            # other layers of a decoding step, which share the scheme, read it (cat and flip: about
            # 0.15 ms of a 0.5 ms call at 1k keys, measured)
            flipped = kept(scheme, "_kept_row", (o_min, o_max, causal, q.device), lambda: row().flip(-1))
            return _few_queries(*f, flipped, q0, k0, causal, scale).to(dtype)
        return _forward(*f, row().contiguous(), o_min, q0, k0, causal, scale, block)[0].to(dtype)
    # training: a fixed bias (ALiBi, a frozen table) takes bf16/fp16 inputs as they are, forward and
    # backward on the fused op with the float32 bias as its mask (gradients closer to the float32
    # ones than the reference's in the same precision, tested); a bias that trains needs dS in float32
    k, v = ungrouped(q, k, v)  # (the backward sums per query head)
    f = [t.float() for t in (q, k, v)] if trains_bias(scheme) else fused_inputs(q, k, v)
    return _Toeplitz.apply(*(t.contiguous() for t in f), row().contiguous(), o_min, q0, k0, causal, scale,
                           block).to(dtype)


def _row(scheme: ToeplitzScheme, o_min: int, o_max: int, device: torch.device) -> Tensor:
    """``[H, o_max − o_min + 1]`` float32: the bias at offsets ``o_min … o_max``. A bias flat beyond
    ``w`` (:attr:`~posbias.schemes.base.ToeplitzScheme.flat_beyond`) is evaluated on ``−w … w`` only and
    the constants ``g(±w)`` expanded over the rest (the same values; the expansion sums their
    gradients): a decoding step against 16k keys evaluates 129 T5 offsets instead of 16k."""
    w = scheme.flat_beyond
    if w is None:
        return scheme.bias_at(torch.arange(o_min, o_max + 1, device=device)).float()
    lo, hi = max(o_min, -w), min(o_max, w)
    if lo > hi:  # every offset beyond the window, on one side
        edge = torch.tensor([w if o_min > w else -w], device=device)
        return scheme.bias_at(edge).float().expand(-1, o_max - o_min + 1)
    inner = _window(scheme, w, lo, hi, device)
    left, right = lo - o_min, o_max - hi  # offsets below −w (reading g(−w)) and above w (reading g(w))
    if not left and not right:
        return inner
    return torch.cat([inner[:, :1].expand(-1, left), inner, inner[:, -1:].expand(-1, right)], 1)


def _window(scheme: ToeplitzScheme, w: int, lo: int, hi: int, device: torch.device) -> Tensor:
    """The bias at offsets ``lo … hi`` inside the window. Without autograd it is kept on the scheme and
    reused while nothing that made it changed (:func:`~posbias.schemes.base.kept`): the layers of a
    model and the steps of a decoding loop then evaluate it once (a T5 row of 129 offsets: 0.16–0.3 ms
    a call, measured, against 0.7 ms for a whole step at 1k keys)."""
    return kept(scheme, "_kept_window", (w, lo, hi, device),
                lambda: scheme.bias_at(torch.arange(lo, hi + 1, device=device)).float())


def _few_queries(q: Tensor, k: Tensor, v: Tensor, flipped: Tensor, q0: int, k0: int, causal: bool,
                 scale: float) -> Tensor:
    """Decoding and short chunks at inference (fewer queries than keys, one block, no gradient): the
    *queries* reversed instead of the keys, so the call copies ``Lq`` rows instead of the whole key and
    value cache. With query ``r'`` of the reversed queries (query ``Lq − 1 − r'``) and key ``t`` in
    order, the pair's offset is ``o_max − r' − t``: the mask is ``flipped`` (the row of offsets
    ``o_min … o_max`` reversed) read through the same zero-copy ``unfold`` view. One query against 16k
    cached keys (t5, 8 heads, 2 threads): 38 ms with the keys reversed, against 5–6 ms for unbiased
    SDPA, measured before this path."""
    lq, lk = q.shape[2], k.shape[2]
    (_, _, hi), = _blocks(lq, lk, q0, k0, causal, lq)  # one block: the keys some query sees
    if hi <= 0:
        return torch.zeros_like(q)
    mask = flipped[:, : lq + hi - 1].unfold(-1, hi, 1).unsqueeze(0)  # [1, H, lq, hi]: row r' is query lq − 1 − r'
    out, _ = flash_forward(q.flip(2), k[:, :, :hi], v[:, :, :hi], scale, False, mask)
    return out.flip(2)
