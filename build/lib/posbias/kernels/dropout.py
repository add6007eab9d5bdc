"""Attention dropout, exact and in O(N) memory, for every scheme: ``attention(..., dropout_p=p)``.

Dropout on the attention probabilities (as ``scaled_dot_product_attention(..., dropout_p=p)`` and the
``transformers`` attention layers apply it while training): ``O = (P ∘ Z) V`` with ``P`` the softmax of
the biased logits and ``Z_ij = 1/(1 − p)`` where the pair is kept, 0 where it is dropped, each pair
dropped with probability ``p``. On CPU, PyTorch's fused attention kernels refuse ``dropout_p > 0``, so
SDPA with dropout runs its math path, which holds the whole ``[B, H, Lq, Lk]`` probability tensor (and
the dense bias) for the backward pass. Here the query blocks of :mod:`~posbias.kernels.blockwise` each
compute their logits, softmax and dropout, keep only the output and the log-sum-exp, and the backward
pass recomputes every block's probabilities and regenerates its dropout mask: extra memory a few
``[B, H, block, keys]`` buffers, linear in N, and the bias's parameters get their gradients as on
the other blockwise paths (:meth:`~posbias.schemes.base.Scheme.block_grads`).

**The mask** must be the same in the backward pass as in the forward pass without being stored, so it
is a function of the pair, not of a random stream: pair ``(b, h, i, j)`` — batch, head, query row and
key column of the call, counted from 0 — is dropped when ``x < ⌊p · 2³²⌉`` for the 32-bit hash

    r = fmix(fmix(fmix(seed) + b · H + h) + i),   x = fmix(r + j · 0x9E3779B9)   (mod 2³²)

with ``fmix`` the two-multiply finaliser ``x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15;
x *= 0x846CA68B; x ^= x >> 16`` (C. Wellons' "lowbias32", a bijection of 32-bit words), and ``x``
compared as a signed 32-bit integer offset by 2³¹ (uniform either way). Every block of every
partition gets the same mask, so the blocked kernel, the dense reference and any block size agree
pair for pair; ``seed`` (32 bits) is drawn from torch's default CPU generator when the caller gives
none, so ``torch.manual_seed`` reproduces a run. The per-pair hash runs in 32-bit integer
arithmetic (wrapping); a one-time check against the same hash in 64-bit arithmetic guards the
wrap-around, and a platform where it failed would take the 64-bit path.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ..schemes.base import Scheme, needs_grad
from .blockwise import _Blocks
from .flash import LOG2E, NEG, backward_rows, mask_backward
from .reference import reference_probs

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9  # ⌊2³² / φ⌋: consecutive key columns start far apart before the finaliser
M1, M2 = 0x7FEB352D, 0x846CA68B
SEEDS = 1 << 32  # seeds are 32-bit words


def check_dropout(p: object, seed: object) -> tuple[float, int | None]:
    """``(p, seed)`` validated: ``p`` a number in [0, 1) (1 would zero every probability and divide by
    0), ``seed`` None or an int in [0, 2³² − 1]."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEEDS):
        raise ValueError(f"dropout_seed must be None or an int in [0, 2^32 - 1], got {seed!r}")
    return float(p), seed


def draw_seed() -> int:
    """A 32-bit dropout seed from torch's default CPU generator (``torch.manual_seed`` reproduces it)."""
    return int(torch.randint(0, SEEDS, (), dtype=torch.int64))


def group_seed(seed: int | None, group: int, groups: int) -> int | None:
    """The seed of part ``group`` of ``groups`` of a call split into parts (a padded batch's groups of
    sequences with one key mask, packed documents of one length): distinct streams fixed by the call's
    seed, since one seed would give the first sequence of every part one mask; a call in one part keeps
    its seed (and None, no dropout, stays None)."""
    if seed is None or groups == 1:
        return seed
    return int(_fmix64(torch.tensor((seed + GOLDEN * (group + 1)) & MASK32)))


def _fmix64(x: Tensor) -> Tensor:
    """The finaliser on int64 tensors holding 32-bit words (exact: every product stays below 2⁶³)."""
    x = x ^ (x >> 16)
    x = (x * M1) & MASK32
    x = x ^ (x >> 15)
    x = (x * M2) & MASK32
    return x ^ (x >> 16)


def _signed32(x: Tensor) -> Tensor:
    """int64 words in [0, 2³²) as the int32 with the same bits."""
    return (x - (x >= 1 << 31).long() * (1 << 32)).to(torch.int32)


def _fmix32_(x: Tensor, tmp: Tensor) -> Tensor:
    """The finaliser in place on int32 words (wrapping multiplies; logical shifts by masking the
    arithmetic ones), ``tmp`` a scratch tensor of ``x``'s shape."""
    torch.bitwise_right_shift(x, 16, out=tmp).bitwise_and_(0xFFFF)
    x.bitwise_xor_(tmp).mul_(M1)
    torch.bitwise_right_shift(x, 15, out=tmp).bitwise_and_(0x1FFFF)
    x.bitwise_xor_(tmp).mul_(M2 - (1 << 32))  # M2 ≥ 2³¹: the int32 with its bits
    torch.bitwise_right_shift(x, 16, out=tmp).bitwise_and_(0xFFFF)
    return x.bitwise_xor_(tmp)


def seed_word(seed: int) -> int:
    """``fmix(seed)``, the call's first word (every row's word starts from it)."""
    return int(_fmix64(torch.tensor(seed, dtype=torch.int64)))


def row_keys(seed: int, batch: int, heads: int, rows: Tensor) -> Tensor:
    """``r`` for every (b, h, i) with ``i`` in ``rows`` (int64 query rows): int64 ``[B, H, R]`` words."""
    base = torch.tensor(seed_word(seed), dtype=torch.int64)
    lanes = torch.arange(batch * heads, dtype=torch.int64, device=rows.device).view(batch, heads, 1)
    return _fmix64((_fmix64((base.to(rows.device) + lanes) & MASK32) + rows) & MASK32)


def drop_threshold(p: float) -> int:
    """Dropped iff the signed word is below this: ``⌊p · 2³²⌉`` words of 2³² (−2³¹ ≤ x < −2³¹ + that)."""
    return -(1 << 31) + round(p * (1 << 32))


def dropped_reference(seed: int, p: float, batch: int, heads: int, rows: Tensor, cols: Tensor) -> Tensor:
    """The mask in 64-bit arithmetic (the definition; slow): bool ``[B, H, R, K]``, True = dropped."""
    r = row_keys(seed, batch, heads, rows.long())
    x = _fmix64((r[..., None] + cols.long() * GOLDEN) & MASK32)
    return _signed32(x) < drop_threshold(p)


def _dropped32(seed: int, p: float, batch: int, heads: int, rows: Tensor, cols: Tensor) -> Tensor:
    r = _signed32(row_keys(seed, batch, heads, rows.long()))
    c = _signed32((cols.long() * GOLDEN) & MASK32)
    x = torch.add(r[..., None], c)
    return _fmix32_(x, torch.empty_like(x)) < drop_threshold(p)


@functools.lru_cache(maxsize=None)
def _wraps(device_type: str) -> bool:
    """Whether 32-bit integer arithmetic wraps on this device as the hash needs (checked once, against
    the 64-bit definition, on words that overflow every step)."""
    device = torch.device(device_type)
    rows, cols = torch.arange(0, 4099, 37, device=device), torch.arange(70001, 70001 + (1 << 12), device=device)
    args = (0xDEADBEEF, 0.5, 2, 3, rows, cols)
    return bool(torch.equal(_dropped32(*args), dropped_reference(*args)))


def dropped(seed: int, p: float, batch: int, heads: int, rows: Tensor, cols: Tensor) -> Tensor:
    """Bool ``[B, H, len(rows), len(cols)]``: True where pair (b, h, rows[i], cols[j]) is dropped."""
    if _wraps(rows.device.type):
        return _dropped32(seed, p, batch, heads, rows, cols)
    return dropped_reference(seed, p, batch, heads, rows, cols)


def reference_dropout(q: Tensor, k: Tensor, v: Tensor, scheme: Scheme, *, q_pos: Tensor, k_pos: Tensor, causal: bool,
                      scale: float, p: float, seed: int) -> Tensor:
    """The dense oracle: the reference probabilities, the whole mask, ``(P ∘ Z) V`` (autograd)."""
    probs = reference_probs(q, k, scheme, q_pos=q_pos, k_pos=k_pos, causal=causal, scale=scale)
    rows = torch.arange(q.shape[2], device=q.device)
    cols = torch.arange(k.shape[2], device=q.device)
    drop = dropped_reference(seed, p, q.shape[0], q.shape[1], rows, cols)
    return torch.matmul(probs.masked_fill(drop, 0.0) / (1 - p), v.float()).to(q.dtype)


def dropout_kernel(q: Tensor, k: Tensor, v: Tensor, scheme: Scheme, *, q_pos: Tensor, k_pos: Tensor, causal: bool,
                   scale: float, p: float, seed: int, block: int | None = None) -> Tensor:
    """Blocked attention with dropout (module docstring): q, k, v with one head per query head."""
    f = [t.float().contiguous() for t in (q, k, v)]
    rows = block or backward_rows(q, k.shape[2])
    blocks = _Blocks(q_pos, k_pos, causal, rows)
    drop = _Mask(seed, p, q.shape[0], q.shape[1], q.device)
    if not needs_grad(scheme, q, k, v):
        return _forward(*f, scheme, blocks, scale, drop)[0].to(q.dtype)
    return _DroppedBlocks.apply(*f, scheme, blocks, scale, drop, *scheme.parameters()).to(q.dtype)


class _Mask:
    """One call's dropout: its seed, rate and shape; :meth:`block` gives a block's dropped pairs."""

    def __init__(self, seed: int, p: float, batch: int, heads: int, device: torch.device) -> None:
        self.seed, self.p, self.batch, self.heads, self.device = seed, p, batch, heads, device
        self.keep_scale = 1.0 / (1.0 - p)

    def block(self, s: int, e: int, hi: int) -> Tensor:
        return dropped(self.seed, self.p, self.batch, self.heads, torch.arange(s, e, device=self.device),
                       torch.arange(hi, device=self.device))


def _forward(q: Tensor, k: Tensor, v: Tensor, scheme: Scheme, blocks: _Blocks, scale: float,
             drop: _Mask) -> tuple[Tensor, Tensor]:
    """Every block: logits, softmax (exp as 2^(x·log2 e), as in the backward), dropout, ``(P ∘ Z) V``
    → (out, lse). A row that sees no key gets 0 and lse −∞."""
    b, h = q.shape[:2]
    out = q.new_empty(q.shape[:3] + v.shape[3:])
    lse = q.new_empty(q.shape[:3])
    buffers = blocks.work(scheme.n_heads, q.device)
    work = blocks.work(b * h, q.device)
    qs = q if scale == 1 else q * scale
    for s, e, hi in blocks:
        if hi == 0:  # every key after the block's queries (causal): nothing to attend to
            out[:, :, s:e], lse[:, :, s:e] = 0.0, -math.inf
            continue
        mask = blocks.mask(scheme, s, e, hi, buffers)
        shape = (b, h, e - s, hi)
        logits = torch.matmul(qs[:, :, s:e], k[:, :, :hi].transpose(-1, -2),
                              out=work[0, :shape[0] * shape[1] * shape[2] * shape[3]].view(shape)).add_(mask)
        top = logits.amax(-1, keepdim=True).clamp_(min=NEG)  # a row without keys: −∞ − NEG below, weights 0
        weights = logits.sub_(top).mul_(LOG2E).exp2_()
        total = weights.sum(-1, keepdim=True)
        lse[:, :, s:e] = (top + total.log()).squeeze(-1)
        inv = torch.where(total > 0, drop.keep_scale / total, 0.0)  # 1/(1 − p) with the normalisation
        weights.masked_fill_(drop.block(s, e, hi), 0.0).mul_(inv)
        out[:, :, s:e] = torch.matmul(weights, v[:, :, :hi])
    return out, lse


class _DroppedBlocks(torch.autograd.Function):
    """:func:`_forward` with the backward of :func:`~posbias.kernels.flash.mask_backward` per block, the
    mask regenerated; the scheme's parameters are inputs so that they receive their gradients."""

    @staticmethod
    def forward(ctx, q, k, v, scheme: Scheme, blocks: _Blocks, scale: float, drop: _Mask, *params):
        out, lse = _forward(q, k, v, scheme, blocks, scale, drop)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scheme, ctx.blocks, ctx.scale, ctx.drop = scheme, blocks, scale, drop
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        scheme, blocks, scale, drop = ctx.scheme, ctx.blocks, ctx.scale, ctx.drop
        dout = dout.contiguous()
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        train_bias = any(ctx.needs_input_grad[7:])
        bias_grads = scheme.block_grads() if train_bias else None
        delta = (dout * out).sum(-1)  # δ_i = dO_i · O_i
        buffers = blocks.work(scheme.n_heads, q.device)
        work = blocks.work(q.shape[0] * q.shape[1], q.device)
        for s, e, hi in blocks:
            if hi == 0:  # rows without keys: output 0, no gradient
                continue
            mask = blocks.mask(scheme, s, e, hi, buffers, bias_grads)
            gq, gk, gv, ds = mask_backward(q[:, :, s:e], k[:, :, :hi], v[:, :, :hi], dout[:, :, s:e], lse[:, :, s:e],
                                           delta[:, :, s:e], mask, scale, work, drop.block(s, e, hi), drop.keep_scale,
                                           whole_rows=True)
            if train_bias:
                bias_grads.add(*blocks.positions(s, e, hi), ds)
            dq[:, :, s:e] += gq
            dk[:, :, :hi] += gk
            dv[:, :, :hi] += gv
        grads = bias_grads.result() if train_bias else [None] * (len(ctx.needs_input_grad) - 7)
        return (dq, dk, dv, None, None, None, None, *grads)


