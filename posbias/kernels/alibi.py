"""Exact causal ALiBi on the fused flash kernel: the bias rides along as one extra head dimension.

``−m(i − j) = −m(i − r) + m(j − r)`` for any reference ``r``; the first term is constant along a row
and cancels in the softmax, so with ``q' = [q, 1/scale]`` and ``k' = [k, m·(j − r)]`` the fused kernel
computes ``scale·q·k + m(j − r)`` — ALiBi up to a row constant that is the same for every part of the
row. Taking ``r`` = the first query of each block keeps ``|m(j − r)|`` small for the keys that matter,
so float32 stays exact at any length (keys far away have large negative logits and vanish either
way). Each block = a rectangle of earlier keys + a square causal diagonal block, merged through their
log-sum-exps; the backward calls the fused backward op with the merged output and lse. Computed in
float32 whatever the input dtype (a bf16 extra column would round the bias).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from .flash import flash_backward, flash_forward, merge

BLOCK = 512


class _Augmented:
    """``k' = [k, m·(j − r)]`` and ``v' = [v, 0]`` allocated once per call; moving the reference ``r``
    to the next block rewrites only the extra column (O(N), not a copy of the keys per block)."""

    def __init__(self, k: Tensor, v: Tensor, slopes: Tensor, k0: int) -> None:
        bsz, h, lk, _ = k.shape
        self.k = torch.cat([k, k.new_zeros(bsz, h, lk, 1)], -1)
        self.v = F.pad(v, (0, 1))
        self.slope = slopes.view(1, h, 1).to(k.dtype)
        self.k0 = k0
        self.kidx = torch.arange(lk, device=k.device).view(1, 1, -1)  # int64: j − k0

    def at(self, r: int, upto: int) -> tuple[Tensor, Tensor]:
        # j − r = (j − k0) − (r − k0), in integers: float32 sees only the small difference
        rel = (self.kidx[:, :, :upto] - (r - self.k0)).to(self.k.dtype)
        self.k[:, :, :upto, -1] = self.slope * rel
        return self.k[:, :, :upto], self.v[:, :, :upto]


def _query(q: Tensor, scale: float) -> Tensor:
    return torch.cat([q, q.new_full((*q.shape[:3], 1), 1.0 / scale)], -1)


class _ALiBi(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slopes, q0: int, k0: int, scale: float, block: int):
        lq, d = q.shape[2], q.shape[3]
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        aug = _Augmented(k, v, slopes, k0)
        for s in range(0, lq, block):
            e = min(s + block, lq)
            qa = q0 + s
            a, b = qa - k0, q0 + e - k0  # key indices of the diagonal block
            kk, vv = aug.at(qa, b)
            qq = _query(q[:, :, s:e], scale)
            parts = []
            if a > 0:
                parts.append(flash_forward(qq, kk[:, :, :a], vv[:, :, :a], scale, False))
            parts.append(flash_forward(qq, kk[:, :, a:], vv[:, :, a:], scale, True))
            o, l = merge(parts) if len(parts) > 1 else (parts[0][0].float(), parts[0][1])
            out[:, :, s:e], lse[:, :, s:e] = o[..., :d], l
        ctx.save_for_backward(q, k, v, slopes, out, lse)
        ctx.args = (q0, k0, scale, block)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, slopes, out, lse = ctx.saved_tensors
        q0, k0, scale, block = ctx.args
        lq, d = q.shape[2], q.shape[3]
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        dout = F.pad(dout.contiguous(), (0, 1))
        aug = _Augmented(k, v, slopes, k0)
        for s in range(0, lq, block):
            e = min(s + block, lq)
            qa = q0 + s
            a, b = qa - k0, q0 + e - k0
            kk, vv = aug.at(qa, b)
            qq = _query(q[:, :, s:e], scale)
            o, l, do = F.pad(out[:, :, s:e], (0, 1)), lse[:, :, s:e], dout[:, :, s:e]
            if a > 0:
                gq, gk, gv = flash_backward(do, qq, kk[:, :, :a], vv[:, :, :a], o, l, scale, False)
                dq[:, :, s:e] += gq[..., :d]
                dk[:, :, :a] += gk[..., :d]
                dv[:, :, :a] += gv[..., :d]
            gq, gk, gv = flash_backward(do, qq, kk[:, :, a:], vv[:, :, a:], o, l, scale, True)
            dq[:, :, s:e] += gq[..., :d]
            dk[:, :, a:b] += gk[..., :d]
            dv[:, :, a:b] += gv[..., :d]
        return dq, dk, dv, None, None, None, None, None


def alibi_kernel(q: Tensor, k: Tensor, v: Tensor, scheme, *, q_pos: Tensor, k_pos: Tensor, causal: bool,
                 scale: float, block: int = BLOCK) -> Tensor:
    """Causal, contiguous positions with every query's own position among the keys (the dispatcher
    checks). ``scheme.linear_slopes`` gives ``m_h``."""
    dtype = q.dtype
    f = [t.float().contiguous() for t in (q, k, v)]
    out = _ALiBi.apply(*f, scheme.linear_slopes.float(), int(q_pos[0]), int(k_pos[0]), scale, block)
    return out.to(dtype)
