"""Memory-bounded exact attention for any additive scheme (FIRE, or anything with a ``bias``): query
blocks, each with its own dense bias ``[H, block, keys]``, never ``[H, N, N]``.

On CPU (the fused flash kernel with a log-sum-exp) each block is one fused call with its bias as the
additive mask, written into two buffers reused by every block (:meth:`Scheme.bias_into`; fresh
tensors of tens of MB cost more in page faults than in writing). The backward pass recomputes each
block's bias and runs the fused backward op, or — when the bias has parameters that train — a
dense five-matmul block backward that also yields ``dS = P ∘ (dP − δ)``, handed to the scheme's
:meth:`Scheme.block_grads` (FIRE reduces it by linear piece and by diagonal, with one autograd pass
per call instead of one per block). Elsewhere
(CUDA) each block is the reference dense attention, checkpointed in training. Either way the peak
extra memory is a few ``[B, H, block, keys]`` buffers: linear in N, and on the fused path capped at
two masks of ``FUSED_BLOCK_ELEMS`` floats (128 MB each; FIRE at 16k: 190 MiB peak extra forward,
measured).
Causal blocks only read the keys up to their last query. One decoding query against K cached keys
costs O(K).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..positions import piece, run_start
from ..schemes.base import Scheme, kept, needs_grad
from .flash import (backward_rows, block_work, flash_available, flash_backward, flash_forward, fused_inputs,
                    mask_backward)
from .reference import dense_attention, every_row_sees_a_key, hides_nothing, ungrouped, visible

MAX_BLOCK_ELEMS = 1 << 22  # ~16 MB of float32 logits per block (the dense reference path)
# The fused path's forward blocks: 256 query rows, as far as a block's mask stays under 128 MB. The
# CPU flash op splits a call's queries into chunks of 64 from 192 rows on (32 below): measured on
# FIRE at 8k (H=8, d=64, 2 threads; the flash calls alone, as a ratio to causal SDPA), 64 rows cost
# 1.46-1.49x, 128 rows 1.40x, 256 rows 1.23-1.24x, 512 rows 1.24x with a costlier bias.
FUSED_ROWS, FUSED_BLOCK_ELEMS = 256, 1 << 25
# The fused backward op's blocks for a fixed bias (FIRE at 8k, fwd+bwd: 256 rows 1.89x, 64 rows 2.22x)
BACKWARD_ROWS = 256
# A one-block call's mask of at most this many floats (4 MB: one query against 128k keys, 8 heads) is
# kept on the scheme without autograd, for the next call with the same positions and parameters: the
# layers of a model sharing one scheme then compute it once per decoding step
KEPT_MASK_ELEMS = 1 << 20


def blockwise_kernel(q: Tensor, k: Tensor, v: Tensor, scheme: Scheme, *, q_pos: Tensor, k_pos: Tensor,
                     causal: bool, scale: float, block: int | None = None) -> Tensor:
    lk = k.shape[2]
    per_row = max(1, lk * q.shape[0] * q.shape[1])
    train = needs_grad(scheme, q, k, v)
    if flash_available(q) and lk > 0 and scheme.family == "additive" and every_row_sees_a_key(q_pos, k_pos, causal):
        blocks = _Blocks(q_pos, k_pos, causal, block or max(16, min(FUSED_ROWS, FUSED_BLOCK_ELEMS // per_row)))
        if not train:  # (no autograd Function: its dispatch is a third of a decoding step at 1k keys)
            return _fused_forward(*fused_inputs(q, k, v), scheme, blocks, scale, keep_mask=True)[0].to(q.dtype)
        f = [t.float().contiguous() for t in (q, *ungrouped(q, k, v))]
        return _FusedBlocks.apply(*f, scheme, blocks, scale, *scheme.parameters()).to(q.dtype)
    # one output buffer, written block by block: a list of per-block outputs would interleave small
    # long-lived allocations with the large per-block temporaries and fragment the CPU heap (peak
    # RSS then grows like N² although every block is freed)
    k, v = ungrouped(q, k, v)
    out = q.new_empty(q.shape[:3] + v.shape[3:])
    blocks = _Blocks(q_pos, k_pos, causal, block or max(16, min(512, MAX_BLOCK_ELEMS // per_row)))
    for s, e, hi in blocks:
        qp, kp = blocks.positions(s, e, hi)

        def run(qb: Tensor, kb: Tensor, vb: Tensor, qp: Tensor = qp, kp: Tensor = kp) -> Tensor:
            return dense_attention(qb, kb, vb, scheme.bias(qp, kp), visible(qp, kp, causal), scale)

        args = (q[:, :, s:e], k[:, :, :hi], v[:, :, :hi])
        out[:, :, s:e] = checkpoint(run, *args, use_reentrant=False) if train else run(*args)
    return out


class _Blocks:
    """The query blocks ``(start, end, keys)`` of one call, and their masks: a causal block with
    sorted keys reads only the keys up to its last query, and only the keys past its first query can
    be hidden from one of its rows."""

    def __init__(self, q_pos: Tensor, k_pos: Tensor, causal: bool, block: int) -> None:
        causal = causal and not hides_nothing(q_pos, k_pos)  # (a decoding step: the call is bidirectional)
        self.q_pos, self.k_pos, self.causal, self.block = q_pos, k_pos, causal, block
        self.sorted_keys = causal and (len(k_pos) < 2 or run_start(k_pos) is not None
                                       or bool((k_pos[1:] > k_pos[:-1]).all()))

    def __iter__(self):
        lq, lk = len(self.q_pos), len(self.k_pos)
        for s in range(0, lq, self.block):
            e = min(s + self.block, lq)
            hi = lk
            if self.causal and self.sorted_keys:  # keys after the block's last query are masked for every row
                hi = self._keys_up_to(s, e, lk, last=True)
            yield s, e, hi

    def _keys_up_to(self, s: int, e: int, keys: int, *, last: bool) -> int:
        """How many of the first ``keys`` (sorted) keys are at or before the last (or first) query of
        rows ``s:e``: from the runs' starts where both are runs, else searched on the device."""
        q0, k0 = run_start(self.q_pos), run_start(self.k_pos)
        if q0 is not None and k0 is not None:
            return min(max((q0 + (e - 1 if last else s)) - k0 + 1, 0), keys)
        qs = self.q_pos[s:e]
        return int(torch.searchsorted(self.k_pos[:keys], qs.max() if last else qs.min(), right=True))

    def positions(self, s: int, e: int, hi: int) -> tuple[Tensor, Tensor]:
        """Block ``s:e``'s query positions and the first ``hi`` keys' (runs where the call's are)."""
        return piece(self.q_pos, s, e), piece(self.k_pos, 0, hi)

    def with_rows(self, block: int) -> "_Blocks":
        """The same call cut into blocks of ``block`` query rows."""
        return _Blocks(self.q_pos, self.k_pos, self.causal, block)

    def work(self, per_pair: int, device: torch.device) -> Tensor:
        """Two scratch buffers, each large enough for any block's ``[per_pair, rows, keys]``."""
        return block_work(per_pair * min(self.block, len(self.q_pos)) * len(self.k_pos), device)

    def mask(self, scheme: Scheme, s: int, e: int, hi: int, buffers: Tensor, writer=None) -> Tensor:
        """Block ``s:e``'s ``[1, H, rows, hi]`` bias with −∞ at the pairs it may not see, in ``buffers[0]``,
        written by ``writer`` (a :class:`~posbias.schemes.base.BlockGrads`) or the scheme."""
        qp, kp = self.positions(s, e, hi)
        shape = (scheme.n_heads, e - s, hi)
        size = shape[0] * shape[1] * shape[2]
        mask = (writer or scheme).bias_into(qp, kp, buffers[0, :size].view(shape), buffers[1, :size].view(shape))
        if self.causal:
            lo = self._keys_up_to(s, e, hi, last=False) if self.sorted_keys else 0
            vis = visible(qp, piece(kp, lo), True)
            if vis is not None:
                mask[:, :, lo:].masked_fill_(~vis, float("-inf"))
        return mask.unsqueeze(0)


def _fused_forward(q: Tensor, k: Tensor, v: Tensor, scheme: Scheme, blocks: _Blocks, scale: float, *,
                   keep_mask: bool = False) -> tuple[Tensor, Tensor]:
    """Every block's fused call with its bias as the mask → (out, lse). ``keep_mask`` (inference) keeps
    a one-block call's small mask on the scheme (:data:`KEPT_MASK_ELEMS`)."""
    if len(blocks.q_pos) <= blocks.block:  # one block (decoding): its results are the call's
        s, e, hi = next(iter(blocks))

        def make() -> Tensor:
            return blocks.mask(scheme, s, e, hi, blocks.work(scheme.n_heads, q.device))

        if keep_mask and scheme.n_heads * (e - s) * hi <= KEPT_MASK_ELEMS:  # the layers of a model share it
            mask = kept(scheme, "_kept_mask", (blocks.q_pos, blocks.k_pos, blocks.causal, q.device), make)
        else:
            mask = make()
        return flash_forward(q, k[:, :, :hi], v[:, :, :hi], scale, False, mask)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    buffers = blocks.work(scheme.n_heads, q.device)
    for s, e, hi in blocks:
        mask = blocks.mask(scheme, s, e, hi, buffers)
        out[:, :, s:e], lse[:, :, s:e] = flash_forward(q[:, :, s:e], k[:, :, :hi], v[:, :, :hi], scale, False, mask)
    return out, lse


class _FusedBlocks(torch.autograd.Function):
    """Blocks on the fused CPU kernel (float32, contiguous q/k/v); the scheme's parameters are inputs so
    that they receive their gradients from :meth:`Scheme.bias_grad`."""

    @staticmethod
    def forward(ctx, q, k, v, scheme: Scheme, blocks: _Blocks, scale: float, *params):
        out, lse = _fused_forward(q, k, v, scheme, blocks, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scheme, ctx.blocks, ctx.scale = scheme, blocks, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        scheme, blocks, scale = ctx.scheme, ctx.blocks, ctx.scale
        dout = dout.contiguous()
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        train_bias = any(ctx.needs_input_grad[6:])
        bias_grads = scheme.block_grads() if train_bias else None
        delta = (dout * out).sum(-1) if train_bias else None  # δ_i = dO_i · O_i
        blocks = blocks.with_rows(min(blocks.block, backward_rows(q, k.shape[2]) if train_bias else BACKWARD_ROWS))
        buffers = blocks.work(scheme.n_heads, q.device)
        work = blocks.work(q.shape[0] * q.shape[1], q.device) if train_bias else None
        for s, e, hi in blocks:
            mask = blocks.mask(scheme, s, e, hi, buffers, bias_grads)
            args = (q[:, :, s:e], k[:, :, :hi], v[:, :, :hi], dout[:, :, s:e])
            if not train_bias:
                gq, gk, gv = flash_backward(args[3], *args[:3], out[:, :, s:e], lse[:, :, s:e], scale, False, mask)
            else:
                gq, gk, gv, ds = mask_backward(*args, lse[:, :, s:e], delta[:, :, s:e], mask, scale, work,
                                               whole_rows=True)
                bias_grads.add(*blocks.positions(s, e, hi), ds)
            dq[:, :, s:e] += gq
            dk[:, :, :hi] += gk
            dv[:, :, :hi] += gv
        grads = bias_grads.result() if train_bias else [None] * (len(ctx.needs_input_grad) - 6)
        return (dq, dk, dv, None, None, None, *grads)
