"""Exact causal ALiBi on a fused attention kernel: the bias rides along as extra head dimensions.

``−m(i − j) = −m(i − r) + m(j − r)`` for any reference ``r``; the first term is constant along a row
and cancels in the softmax. With ``q' = [q, c, …, c]`` and ``k' = [k, x₁, …, x_P]``, where ``c`` is
the power of two nearest ``1/scale`` and ``x₁ + … + x_P = m(j − r)/(scale·c)``, the kernel computes
``scale·(q·k + c·Σx) = scale·q·k + m(j − r)`` — ALiBi up to a row constant that is the same for every
part of the row. Taking ``r`` = the first query of each block keeps ``|m(j − r)|`` small for the keys
that matter, so the float32 accumulator inside the kernel stays exact (keys far away have large
negative logits and vanish either way). Each block = a rectangle of earlier keys + a square causal
diagonal block, merged through their log-sum-exps; the backward calls the fused backward op with the
merged output and lse (the ring-attention identity, :mod:`.flash`).

Two ways to run it, chosen by :func:`alibi_kernel`:

* **CPU** (the ``alibi`` backend's measured path): float32 whatever the input dtype, one extra
  column (``P = 1``), 512-query blocks, on PyTorch's CPU flash op;
* **native** (CUDA; issue 12's extra-dimension candidate): the inputs' own dtype on the fused op of
  :mod:`.fused` (flash attention in bf16/fp16, the memory-efficient kernel in float32), head_dim
  padded with zeros to a multiple of 8 as the CUDA kernels need. In bf16/fp16 the bias is split into
  ``P = 3`` columns (``x₁`` = x rounded, ``x₂`` = what is left rounded, …): their products with ``c``
  are exact and the kernel adds them in float32, so the bias reaches the scores with about float32's
  24 bits although each column holds 8 (bf16) — one rounded column would be off by up to 2⁻⁹·|x|
  (half a nat at ``m(j − r) = 256``). Blocks of 4096 queries there (512 in float32) keep the kernel
  calls large; ``|m(j − r)| ≤ m·4096`` costs at most ``2⁻²⁴·2048 ≈ 1e-4`` nats in the accumulator,
  far below bf16's own rounding of ``q·k``. Biases below ``−2¹⁴`` nats are clamped there (fp16's
  range ends at 65504); ``exp`` of either is 0 in float32 unless the scores of one row span thousands
  of nats.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from ..positions import first
from . import fused
from .flash import merge

BLOCK = 512  # queries per block on the CPU and in float32
HALF_BLOCK = 4096  # queries per block in bf16/fp16 (native)
HALF_PIECES = 3  # bias columns in bf16/fp16: ~24 bits in all
BIAS_FLOOR = -(2.0 ** 14)  # nats; the native path clamps below (fp16 range)


class _Augmented:
    """``k' = [k, x₁ … x_P, 0 …]`` and ``v' = [v, 0 …]`` allocated once per call, ``width`` columns;
    moving the reference ``r`` to the next block rewrites only the bias columns (O(N), not a copy of
    the keys per block)."""

    def __init__(self, k: Tensor, v: Tensor, slopes: Tensor, k0: int, scale: float, pieces: int, width: int) -> None:
        bsz, h, lk, d = k.shape
        self.d, self.pieces = d, pieces
        self.k = F.pad(k, (0, width - d))
        self.v = F.pad(v, (0, width - d))
        self.c = 2.0 ** round(math.log2(1.0 / scale))  # exact in every dtype
        self.slope = (slopes.float() / (scale * self.c)).view(1, h, 1)
        self.k0 = k0
        self.kidx = torch.arange(lk, device=k.device).view(1, 1, -1)  # int64: j − k0
        self.floor = BIAS_FLOOR / (scale * self.c) if pieces > 1 else None  # in units of x

    def at(self, r: int, upto: int) -> tuple[Tensor, Tensor]:
        # j − r = (j − k0) − (r − k0), in integers: float32 sees only the small difference
        x = self.slope * (self.kidx[:, :, :upto] - (r - self.k0)).float()
        if self.floor is not None:
            x = x.clamp(self.floor, -self.floor)
        for p in range(self.pieces):  # x₁ = x rounded, x₂ = the rest rounded, …
            piece = x.to(self.k.dtype)
            self.k[:, :, :upto, self.d + p] = piece
            if p + 1 < self.pieces:
                x = x - piece.float()
        return self.k[:, :, :upto], self.v[:, :, :upto]

    def query(self, q: Tensor) -> Tensor:
        extra = q.new_zeros(*q.shape[:3], self.k.shape[-1] - self.d)
        extra[..., : self.pieces] = self.c
        return torch.cat([q, extra], -1)


class _ALiBi(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slopes, q0: int, k0: int, scale: float, block: int, pieces: int, width: int):
        lq, d = q.shape[2], q.shape[3]
        out = q.new_empty(*q.shape[:3], width)  # padded: the backward op wants the output as it made it
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        aug = _Augmented(k, v, slopes, k0, scale, pieces, width)
        saved = []
        for s, e, b, keys in _blocks(lq, q0, k0, block):
            kk, vv = aug.at(q0 + s, b)
            qq = aug.query(q[:, :, s:e])
            parts = [fused.forward(qq, kk[:, :, lo:hi], vv[:, :, lo:hi], scale, causal) for lo, hi, causal in keys]
            o, l = merge([p[:2] for p in parts]) if len(parts) > 1 else parts[0][:2]
            out[:, :, s:e], lse[:, :, s:e] = o, l
            saved.append([p[2] for p in parts])
        ctx.save_for_backward(q, k, v, slopes, out, lse)
        ctx.aux = saved
        ctx.args = (q0, k0, scale, block, pieces, width)
        return out[..., :d].contiguous()  # a copy: in-place edits of the result leave the saved output alone

    @staticmethod
    def backward(ctx, dout):
        q, k, v, slopes, out, lse = ctx.saved_tensors
        q0, k0, scale, block, pieces, width = ctx.args
        lq, d = q.shape[2], q.shape[3]
        dq, dk, dv = (torch.zeros_like(t, dtype=torch.float32) for t in (q, k, v))
        dout = F.pad(dout.to(q.dtype), (0, width - d))
        aug = _Augmented(k, v, slopes, k0, scale, pieces, width)
        for (s, e, b, keys), auxes in zip(_blocks(lq, q0, k0, block), ctx.aux):
            kk, vv = aug.at(q0 + s, b)
            qq = aug.query(q[:, :, s:e])
            o, l, do = out[:, :, s:e], lse[:, :, s:e], dout[:, :, s:e]
            for (lo, hi, causal), aux in zip(keys, auxes):  # each part's share, given the merged out and lse
                gq, gk, gv = fused.backward(do, qq, kk[:, :, lo:hi], vv[:, :, lo:hi], o, l, aux, scale, causal)
                dq[:, :, s:e] += gq[..., :d]
                dk[:, :, lo:hi] += gk[..., :d]
                dv[:, :, lo:hi] += gv[..., :d]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None


def _blocks(lq: int, q0: int, k0: int, block: int):
    """For each block of queries: (first query, end, keys it sees, its key parts), the parts ``(lo,
    hi, causal)``: the rectangle of earlier keys (when there are any) and the square causal diagonal."""
    for s in range(0, lq, block):
        e = min(s + block, lq)
        a, b = q0 + s - k0, q0 + e - k0  # the diagonal block's keys
        yield s, e, b, ([(0, a, False)] if a > 0 else []) + [(a, b, True)]


def alibi_kernel(q: Tensor, k: Tensor, v: Tensor, scheme, *, q_pos: Tensor, k_pos: Tensor, causal: bool,
                 scale: float, block: int | None = None, native: bool | None = None,
                 pieces: int | None = None) -> Tensor:
    """Causal, contiguous positions with every query's own position among the keys (the dispatcher
    checks). ``scheme.linear_slopes`` gives ``m_h``. ``native`` (default: off on the CPU, on
    elsewhere) runs the inputs' dtype on :mod:`.fused` with padded head_dim (see the module text);
    the tests turn it on for CPU tensors to check the CUDA path's arithmetic on the CPU op, and set
    ``pieces`` (bias columns in bf16/fp16) to show why one is not enough."""
    dtype = q.dtype
    native = q.device.type != "cpu" if native is None else native
    half = native and dtype in (torch.float16, torch.bfloat16)
    if native:
        pieces = pieces or (HALF_PIECES if half else 1)
        width = -(-(q.shape[-1] + pieces) // 8) * 8
        f = [t.contiguous() for t in (q, k, v)]
    else:
        pieces, width = 1, q.shape[-1] + 1
        f = [t.float().contiguous() for t in (q, k, v)]
    block = block or (HALF_BLOCK if half else BLOCK)
    out = _ALiBi.apply(*f, scheme.linear_slopes, first(q_pos), first(k_pos), scale, block, pieces, width)
    return out.to(dtype)
