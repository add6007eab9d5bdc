"""Exact attention for any Toeplitz bias on the fused flash kernel (KERPLE and every ``bias_at`` scheme).

A Toeplitz bias needs one number per offset, so for a query block ``[a, b)`` against keys ``[0, b)``
the additive mask ``B[r, c] = g(a + r − c)`` is a strided window of one row of ``b − a + b − 1``
offsets (built by ``unfold`` + ``flip``, a copy rather than an ``[rows, keys]`` gather or a kernel
evaluation per pair). Causality is in the row itself: offsets < 0 hold −∞, so one fused call per
query block computes the block exactly with no merge. The bias is evaluated once on the ``Lq + Lk − 1``
offsets of the call. Extra memory: one block's ``[H, block, keys]`` mask, linear in N.

Backward: the fused backward op with the same mask gives q/k/v gradients; when the bias has
learnable parameters (KERPLE ``r1``/``r2``) the dispatcher prefers the blockwise path, whose
checkpointed dense blocks give the parameter gradients as well.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..schemes.base import ToeplitzScheme
from .flash import flash_backward, flash_forward

BLOCK = 512


def _mask(table: Tensor, o_min: int, qa: int, lq: int, ka: int, lk: int) -> Tensor:
    """``[1, H, lq, lk]`` additive mask ``g(qa + r − (ka + c))`` as a Toeplitz window of the table."""
    hi = qa + lq - 1 - ka
    lo = qa - (ka + lk - 1)
    row = table[:, lo - o_min: hi - o_min + 1].flip(-1)  # offsets lo … hi;  F[u] = g(hi − u)
    return row.unfold(-1, lk, 1).flip(-2).unsqueeze(0)  # B[r, c] = F[lq − 1 − r + c] = g(qa + r − ka − c)


class _Toeplitz(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, table, o_min: int, q0: int, k0: int, causal: bool, scale: float, block: int):
        lq, lk = q.shape[2], k.shape[2]
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        for s in range(0, lq, block):
            e = min(s + block, lq)
            hi = min(lk, q0 + e - k0) if causal else lk  # keys after the block's last query are hidden
            if hi <= 0:
                out[:, :, s:e], lse[:, :, s:e] = 0, float("-inf")
                continue
            mask = _mask(table, o_min, q0 + s, e - s, k0, hi)
            out[:, :, s:e], lse[:, :, s:e] = flash_forward(q[:, :, s:e], k[:, :, :hi], v[:, :, :hi], scale, False, mask)
        ctx.save_for_backward(q, k, v, table, out, lse)
        ctx.args = (o_min, q0, k0, causal, scale, block)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, table, out, lse = ctx.saved_tensors
        o_min, q0, k0, causal, scale, block = ctx.args
        lq, lk = q.shape[2], k.shape[2]
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for s in range(0, lq, block):
            e = min(s + block, lq)
            hi = min(lk, q0 + e - k0) if causal else lk
            if hi <= 0:
                continue
            mask = _mask(table, o_min, q0 + s, e - s, k0, hi)
            gq, gk, gv = flash_backward(dout[:, :, s:e], q[:, :, s:e], k[:, :, :hi], v[:, :, :hi], out[:, :, s:e],
                                        lse[:, :, s:e], scale, False, mask)
            dq[:, :, s:e] += gq
            dk[:, :, :hi] += gk
            dv[:, :, :hi] += gv
        return dq, dk, dv, None, None, None, None, None, None, None


def toeplitz_kernel(q: Tensor, k: Tensor, v: Tensor, scheme: ToeplitzScheme, *, q_pos: Tensor, k_pos: Tensor,
                    causal: bool, scale: float, block: int = BLOCK) -> Tensor:
    """Contiguous positions (checked by the dispatcher); the bias enters as a constant (no parameter
    gradients — the dispatcher sends learnable biases in training to ``blockwise``)."""
    lq, lk = q.shape[2], k.shape[2]
    q0, k0 = int(q_pos[0]), int(k_pos[0])
    o_min, o_max = q0 - (k0 + lk - 1), q0 + lq - 1 - k0
    with torch.no_grad():
        table = scheme.bias_at(torch.arange(o_min, o_max + 1, device=q.device)).float()
        if causal:
            table[:, : max(0, min(table.shape[1], -o_min))] = float("-inf")  # offsets < 0 are hidden
    dtype = q.dtype
    f = [t.float().contiguous() for t in (q, k, v)]
    return _Toeplitz.apply(*f, table.contiguous(), o_min, q0, k0, causal, scale, block).to(dtype)
