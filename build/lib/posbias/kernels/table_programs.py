"""The Triton programs of :mod:`.table_flash`: flash attention whose logits add a per-offset bias
read from a table, forward and backward (the table's gradient included). Imported only where the
``triton`` package is (every CUDA build of torch ships it); :func:`programs` compiles them for the
GPU or, with ``interpret=True``, runs them in Triton's interpreter on CPU tensors, which is how
the tests check them on machines without a GPU.

Notation, shared by the three programs. Query ``i`` of ``LQ`` and key ``j`` of ``LK`` (contiguous
positions) are at offset ``o = DELTA + i − j``; their bias is ``TAB[h, clamp(o − LO, 0, TLEN − 1)]``:
``LO`` is the offset of the table's first entry, and a scheme constant beyond a window (T5, a
clipped per-offset table) stores only its ``2w + 1`` entries, the clamp standing for the constant
parts. The logit ``scale·q·k + bias`` is formed in float32 (the bias never rounds to the inputs'
dtype) and handled in base 2 (``exp2``, ``LOG2E``) as flash attention does; the log-sum-exp
``LSE`` is stored in base e. Causal: a pair is visible where ``o ≥ 0``.

FIRE (``FIRE``, past its threshold, where its bias is not a function of the offset alone): ``TAB`` holds
one value, ``c``, ``INV[i] = 1 / (ψ(max(L, i)) + eps)`` one value per query, and the MLP's input
``x = ψ(|o|)·INV[i]`` with ``ψ(|o|) = log(1 + c·|o|)`` is formed per pair (a log and a multiply, where
the reference takes ``log1p`` and divides: ``x`` to float rounding). The MLP ``1 → width → ReLU → heads``
is its pieces (:meth:`~posbias.schemes.fire.FIRE.pieces`): sorted kinks ``KINK[0 … NK − 1]`` and per
head ``SLOPE``/``OFFS`` of its ``NP = NK + 1`` linear pieces. A tile's ``x`` spans few pieces (``x``
moves slowly along rows and columns): the bias is the lowest one's line plus ``Δslope_k·max(x − t_k, 0)``
for each kink ``t_k`` inside the tile's range, a handful of multiply-adds per pair instead of
``width``; the backward sums ``dS`` onto the pieces the same way and carries ``∂x`` to ``c`` (through
``ψ``) and to ``INV`` (by row).
"""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # (a global a Triton program reads must be a constexpr)


@triton.jit
def _program(H, BLOCK: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
    """This program's block and (batch·head) ids, its batch and head (64-bit: offsets past 2^31
    elements in a large batch), the block's indices, and the head dims padded to ``DP`` with their mask."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    dims = tl.arange(0, DP)
    return pid, bh, (bh // H).to(tl.int64), (bh % H).to(tl.int64), pid * BLOCK + tl.arange(0, BLOCK), dims, dims < D


@triton.jit
def _fmix(x):
    """The dropout hash's finaliser (:mod:`~posbias.kernels.dropout`) on uint32 words: wrapping multiplies,
    logical shifts."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _head_word(SEED, bh):
    """The dropout hash's word ``fmix(fmix(seed) + b·H + h)`` of this (batch·head) ``bh``, once a program;
    ``SEED`` is ``fmix(seed)``'s bits as an int32 (:func:`~.table_flash.dropout_args`)."""
    return _fmix(SEED.to(tl.uint32, bitcast=True) + bh.to(tl.uint32))


@triton.jit
def _row_keys(hword, rows):
    """The dropout hash's word ``r = fmix(hword + i)`` of each query row ``i`` (``hword``: :func:`_head_word`)."""
    return _fmix(hword + rows.to(tl.uint32))


@triton.jit
def _kept(rkey, cols, TH):
    """Whether each pair (row word ``rkey``, key column ``cols``, broadcast together) keeps its probability:
    ``x = fmix(r + j·0x9E3779B9)``, dropped where ``x`` read as a signed word is below ``TH``, the mask of
    :func:`~posbias.kernels.dropout.dropped` pair for pair."""
    return _fmix(rkey + cols.to(tl.uint32) * 0x9E3779B9).to(tl.int32, bitcast=True) >= TH


@triton.jit
def _tile(qk, r, c, r0, r1, c0, c1, TAB, INV, KINK, SLOPE, OFFS, h, DELTA, LO, TLEN, NK, NP, LQ, LK, scale,
          CAUSAL: tl.constexpr, FIRE: tl.constexpr, LINEAR: tl.constexpr, KSTEPS: tl.constexpr,
          EDGE: tl.constexpr = 0):
    """A tile's logits in base 2: ``(scale·qk + bias)·log₂e``, −∞ where a pair is hidden; with FIRE also
    its MLP inputs ``x`` and the pieces ``[lo, hi]`` they span (:func:`_fire_input`). ``r``/``c`` are the
    tile's query and key indices, broadcastable to ``qk``'s shape (either orientation); ``[r0, r1]`` and
    ``[c0, c1]`` their ranges; ``EDGE`` (a table's): 1 where every pair is at or past the table's last
    offset, 2 where at or before its first (:func:`_table_bias`). ``LINEAR`` (ALiBi, fixed slopes):
    ``TAB[h]`` is the head's ``−m_h`` and the bias ``−m_h·o`` is formed in place, the reference's product
    exactly, with no table to read (compiled for sm_90, bf16, head_dim 64, 128 × 64 tiles, before the far
    tiles had loops of their own: the forward's code 2,008 instructions against 2,592 with the table's
    gather and 1,896 with no bias)."""
    if FIRE:
        x, lo, hi = _fire_input(TAB, INV, KINK, r, c, r0, r1, c0, c1, DELTA, NK, LQ, LK, CAUSAL, KSTEPS)
        s = qk * scale + _fire_bias(x, lo, hi, KINK, SLOPE + h * NP, OFFS + h * NP)
    else:
        x, lo, hi = qk, 0, 0  # (no MLP)
        if LINEAR:
            s = qk * scale + tl.load(TAB + h) * (DELTA + r - c).to(tl.float32)
        else:
            s = _table_bias(qk * scale, TAB + h * TLEN, r, c, DELTA, LO, TLEN, EDGE)
    s = s * LOG2E
    edge = (r1 >= LQ) | (c1 >= LK)  # only a tile past the last query or key, or across the diagonal, masks
    if CAUSAL:
        edge = edge | (DELTA + r0 - c1 < 0)
    if edge:
        seen = (r < LQ) & (c < LK)
        if CAUSAL:
            seen = seen & (DELTA + r - c >= 0)
        s = tl.where(seen, s, float("-inf"))
    return s, x, lo, hi


@triton.jit
def _table_bias(x, tab, r, c, DELTA, LO, TLEN, EDGE: tl.constexpr):
    """``x`` plus each pair's entry of the per-offset table ``tab``, its index clamped (a pair past either
    end reads that end's entry). ``EDGE`` 1 or 2: every pair of the tile is past the last entry or
    before the first, and the tile adds that entry alone, with no index and no load per pair: the
    programs split their loops so that the far tiles of a table constant beyond a window (T5, a clipped
    table; most of a long call) run a body of their own, flash attention's plus one add. A runtime
    branch between the two in one loop had cost registers instead: compiled for sm_90 (bf16, head_dim
    64, 128 × 64 tiles, 4 warps) the forward spilled 2,088 bytes per thread with it, 416 without (8
    warps: 408 and none; ``compile_for``'s ``spilled``)."""
    if EDGE == 1:
        return x + tl.load(tab + TLEN - 1)
    elif EDGE == 2:
        return x + tl.load(tab)
    else:
        return x + tl.load(tab + tl.minimum(tl.maximum(DELTA + r - c - LO, 0), TLEN - 1))


@triton.jit
def _far_tiles(lo, hi, until, since, BLOCK: tl.constexpr, FIRE: tl.constexpr, LINEAR: tl.constexpr):
    """Tiles starting at ``lo``, ``lo + BLOCK``, … below ``hi``: ``(a, b)`` with ``[lo, a)`` the tiles starting
    at or before ``until`` and ``[b, hi)`` those starting at or after ``since`` (``a ≤ b``). A program's two
    far runs of a table's tiles, each wholly past one end of the table; FIRE and ALiBi's line have no
    table: every tile between (``(lo, hi)``)."""
    if FIRE:
        return lo, hi
    elif LINEAR:
        return lo, hi
    else:
        a = tl.minimum(tl.where(until >= lo, lo + ((until - lo) // BLOCK + 1) * BLOCK, lo), hi)
        b = tl.where(since > lo, lo + ((since - lo + BLOCK - 1) // BLOCK) * BLOCK, lo)
        return a, tl.minimum(tl.maximum(b, a), hi)


@triton.jit
def _fire_input(C, INV, KINK, r, c, r0, r1, c0, c1, DELTA, NK, LQ, LK, CAUSAL: tl.constexpr, KSTEPS: tl.constexpr):
    """FIRE's MLP input per pair, ``x = ψ(|o|)·INV[i]`` with ``ψ(|o|) = log(1 + C·|o|)`` computed in place,
    and the pieces ``[lo, hi]`` the tile's ``x`` spans, from its corners: ``ψ`` grows with ``|o|`` and
    ``INV`` falls with ``i``, so the smallest ``x`` is the smallest ``|o|``'s ``ψ`` times the last row's
    ``INV`` and the largest the largest's times the first row's (causally, of the visible offsets
    ``o ≥ 0``). Compiled for sm_90 (bf16, head_dim 64, 128 × 32 tiles), the forward's alternatives
    cost: reducing the tile's ``x`` to its smallest and largest, 314 warp shuffles and 18 barriers
    (a table's forward: 8 and 8); ``ψ`` gathered from a per-offset table, 164 and 14 (the gather's
    layout is not the dot's, and the kinks' loop carried it across); computed in place, 8 and 10."""
    cc = tl.load(C)
    o = DELTA + r - c
    x = tl.log(1.0 + cc * tl.where(o < 0, -o, o).to(tl.float32)) * tl.load(INV + tl.minimum(r, LQ - 1))
    last = tl.minimum(r1, LQ - 1)
    o_lo = DELTA + r0 - tl.minimum(c1, LK - 1)  # the tile's offsets: o_lo … o_hi, every one a pair's
    o_hi = DELTA + last - c0
    if CAUSAL:
        o_lo = tl.maximum(o_lo, 0)
    near = tl.where(o_lo > 0, o_lo, tl.where(o_hi < 0, -o_hi, 0))  # the smallest |o|
    far = tl.maximum(-o_lo, o_hi)  # the largest
    x_lo = tl.log(1.0 + cc * near.to(tl.float32)) * tl.load(INV + last)
    x_hi = tl.log(1.0 + cc * far.to(tl.float32)) * tl.load(INV + r0)
    return x, _kinks_below(KINK, x_lo, NK, KSTEPS), _kinks_below(KINK, x_hi, NK, KSTEPS)


@triton.jit
def _kinks_below(KINK, x, NK, KSTEPS: tl.constexpr):
    """How many of the sorted kinks ``KINK[0 … NK − 1]`` lie below ``x`` (``torch.bucketize``'s piece),
    by binary search on scalars in ``KSTEPS`` steps, enough for ``NK + 1`` answers."""
    lo = 0
    hi = NK
    for _ in tl.static_range(KSTEPS):
        mid = (lo + hi) // 2
        go = (mid < hi) & (tl.load(KINK + mid) < x)
        lo = tl.where(go, mid + 1, lo)
        hi = tl.where(go | (mid >= hi), hi, mid)
    return lo


@triton.jit
def _fire_bias(x, lo, hi, KINK, SLOPE, OFFS):
    """One head's MLP at ``x`` whose pieces lie in ``[lo, hi]``: piece ``lo``'s line, plus for each kink
    ``t_k`` between (``lo ≤ k < hi``) the slope it adds, ``Δslope_k·max(x − t_k, 0)`` (the MLP is
    continuous, so past ``t_k`` this is the next piece's line)."""
    bias = tl.load(SLOPE + lo) * x + tl.load(OFFS + lo)
    for k in range(lo, hi):
        bias += (tl.load(SLOPE + k + 1) - tl.load(SLOPE + k)) * tl.maximum(x - tl.load(KINK + k), 0.0)
    return bias


@triton.jit
def _fire_slope(x, lo, hi, KINK, SLOPE):
    """One head's slope at each pair (``∂bias/∂x``): piece ``lo``'s, plus ``Δslope_k`` where ``x > t_k``."""
    slope = tl.zeros_like(x) + tl.load(SLOPE + lo)
    for k in range(lo, hi):
        slope += tl.where(x > tl.load(KINK + k), tl.load(SLOPE + k + 1) - tl.load(SLOPE + k), 0.0)
    return slope


@triton.jit
def _fire_pieces_grad(ds, x, lo, hi, KINK, DSLOPE, DOFFS):
    """A tile's ``dS`` onto one head's pieces (float32 atomics): ``∂/∂offset[m] = Σ dS``, ``∂/∂slope[m] =
    Σ dS·x`` over the pairs on piece ``m``. Every pair is first counted on piece ``lo``; then for each kink
    ``t_k`` between, the pairs with ``x > t_k`` move from piece ``k`` to ``k + 1`` (a pair on piece ``m``
    moves ``m − lo`` times and lands on ``m``)."""
    dsx = ds * x
    tl.atomic_add(DOFFS + lo, tl.sum(tl.sum(ds, 1), 0))
    tl.atomic_add(DSLOPE + lo, tl.sum(tl.sum(dsx, 1), 0))
    for k in range(lo, hi):
        above = x > tl.load(KINK + k)
        moved = tl.sum(tl.sum(tl.where(above, ds, 0.0), 1), 0)
        moved_x = tl.sum(tl.sum(tl.where(above, dsx, 0.0), 1), 0)
        tl.atomic_add(DOFFS + k + 1, moved)
        tl.atomic_add(DOFFS + k, -moved)
        tl.atomic_add(DSLOPE + k + 1, moved_x)
        tl.atomic_add(DSLOPE + k, -moved_x)


def _forward(Q, K, V, TAB, INV, KINK, SLOPE, OFFS, O, LSE, s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
             s_ob, s_oh, s_om, H, LQ, LK, DELTA, LO, TLEN, NK, NP, scale, KPS, s_os, s_ls, SEED, TH, KEEP,
             CAUSAL: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
             PREC: tl.constexpr, FIRE: tl.constexpr, LINEAR: tl.constexpr, KSTEPS: tl.constexpr,
             DROP: tl.constexpr):
    """Program (query block, batch·head, key split): online softmax over the key blocks it can see among
    keys ``[split·KPS, (split + 1)·KPS)``. One split (``KPS ≥ LK``) is the whole call; several (few queries
    against a long cache: flash decoding) each write their own output and log-sum-exp, ``s_os`` and
    ``s_ls`` elements apart, merged afterwards; a split with no key visible to a row writes 0 and −∞.
    ``DROP``: attention dropout, a pair's probability kept where :func:`_kept` (threshold ``TH``) and
    multiplied by ``KEEP = 1/(1 − p)``; the softmax's sums and the log-sum-exp are the undropped ones."""
    pid_m, bh, b, h, rows, dims, dmask = _program(H, BM, D, DP)
    rkey = _row_keys(_head_word(SEED, bh), rows)  # (dropout; unused, and so not computed, without)
    split = tl.program_id(2)
    q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qm + dims[None, :],
                mask=(rows[:, None] < LQ) & dmask[None, :], other=0.0)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, DP], tl.float32)
    hi = LK
    if CAUSAL:  # keys past the block's last query are hidden from all its rows
        hi = tl.minimum(LK, DELTA + (pid_m + 1) * BM)
    hi = tl.minimum(hi, (split + 1) * KPS)
    lo = split * KPS
    r0 = pid_m * BM
    # the key tiles wholly past the table's last offset for every row (starting at or before `until`), those
    # between, those wholly at or before its first (from `since`)
    near, far = _far_tiles(lo, hi, DELTA + r0 - LO - TLEN + 2 - BN, DELTA + r0 + BM - 1 - LO, BN, FIRE, LINEAR)
    kb, vb = K + b * s_kb + h * s_kh, V + b * s_vb + h * s_vh
    acc, m_i, l_i = _forward_keys(acc, m_i, l_i, q, rows, r0, lo, near, kb, vb, s_kn, s_vn, dims, dmask, TAB, INV,
                                  KINK, SLOPE, OFFS, h, DELTA, LO, TLEN, NK, NP, LQ, LK, scale, CAUSAL, BM, BN, PREC,
                                  FIRE, LINEAR, KSTEPS, 1, rkey, TH, DROP)
    acc, m_i, l_i = _forward_keys(acc, m_i, l_i, q, rows, r0, near, far, kb, vb, s_kn, s_vn, dims, dmask, TAB, INV,
                                  KINK, SLOPE, OFFS, h, DELTA, LO, TLEN, NK, NP, LQ, LK, scale, CAUSAL, BM, BN, PREC,
                                  FIRE, LINEAR, KSTEPS, 0, rkey, TH, DROP)
    acc, m_i, l_i = _forward_keys(acc, m_i, l_i, q, rows, r0, far, hi, kb, vb, s_kn, s_vn, dims, dmask, TAB, INV,
                                  KINK, SLOPE, OFFS, h, DELTA, LO, TLEN, NK, NP, LQ, LK, scale, CAUSAL, BM, BN, PREC,
                                  FIRE, LINEAR, KSTEPS, 2, rkey, TH, DROP)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # a row that saw nothing here: output 0, log-sum-exp −∞ (m_i)
    out = acc / l_i[:, None]
    if DROP:
        out = out * KEEP
    keep = rows < LQ
    tl.store(O + split * s_os + b * s_ob + h * s_oh + rows[:, None] * s_om + dims[None, :], out.to(O.dtype.element_ty),
             mask=keep[:, None] & dmask[None, :])
    tl.store(LSE + split * s_ls + bh * LQ + rows, (m_i + tl.log2(l_i)) / LOG2E, mask=keep)


@triton.jit
def _forward_keys(acc, m_i, l_i, q, rows, r0, lo, hi, K, V, s_kn, s_vn, dims, dmask, TAB, INV, KINK, SLOPE, OFFS, h,
                  DELTA, LO, TLEN, NK, NP, LQ, LK, scale, CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  PREC: tl.constexpr, FIRE: tl.constexpr, LINEAR: tl.constexpr, KSTEPS: tl.constexpr,
                  EDGE: tl.constexpr, rkey, TH, DROP: tl.constexpr):
    """The forward's online softmax over the key tiles starting at ``lo``, ``lo + BN``, … below ``hi``, with
    the bias of ``EDGE`` (:func:`_table_bias`); ``K``/``V``: this (batch, head)'s keys and values; ``DROP``:
    the rows' dropout words ``rkey`` (:func:`_row_keys`)."""
    for start in range(lo, hi, BN):
        cols = start + tl.arange(0, BN)
        kt = tl.load(K + cols[None, :] * s_kn + dims[:, None], mask=(cols[None, :] < LK) & dmask[:, None], other=0.0)
        s, _, _, _ = _tile(tl.dot(q, kt, input_precision=PREC), rows[:, None], cols[None, :], r0, r0 + BM - 1, start,
                           start + BN - 1, TAB, INV, KINK, SLOPE, OFFS, h, DELTA, LO, TLEN, NK, NP, LQ, LK, scale,
                           CAUSAL, FIRE, LINEAR, KSTEPS, EDGE)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        v = tl.load(V + cols[:, None] * s_vn + dims[None, :], mask=(cols[:, None] < LK) & dmask[None, :], other=0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROP:
            p = tl.where(_kept(rkey[:, None], cols[None, :], TH), p, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _query_rows(q_ptr, do_ptr, lse_ptr, dl_ptr, rows, dims, dmask, s_qm, s_om, LQ):
    """A query block's q, dO, log-sum-exp and δ, given each one's (batch, head) start; zeros past the
    last query."""
    keep = rows < LQ
    both = keep[:, None] & dmask[None, :]
    q = tl.load(q_ptr + rows[:, None] * s_qm + dims[None, :], mask=both, other=0.0)
    do = tl.load(do_ptr + rows[:, None] * s_om + dims[None, :], mask=both, other=0.0)
    return q, do, tl.load(lse_ptr + rows, mask=keep, other=0.0), tl.load(dl_ptr + rows, mask=keep, other=0.0)


def _backward_keys(Q, K, V, TAB, INV, KINK, SLOPE, OFFS, DO, LSE, DL, DK, DV, DTAB, DSLOPE, DOFFS, s_qb, s_qh, s_qm,
                   s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om, H, LQ, LK, DELTA, LO, TLEN, NK, NP, scale,
                   SEED, TH, KEEP, CAUSAL: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, B: tl.constexpr,
                   TABLE_GRAD: tl.constexpr, PREC: tl.constexpr, FIRE: tl.constexpr, LINEAR: tl.constexpr,
                   KSTEPS: tl.constexpr, DROP: tl.constexpr):
    """Program (key block, batch·head): dK and dV over every query block that sees a key of it, and
    (``TABLE_GRAD``) each square ``B × B`` tile's ``dS`` into the table's gradient (:func:`_table_grad`);
    with FIRE, into its pieces' gradients and, times each pair's slope, ``INV`` and ``∂ψ/∂C = |o|/(1 +
    C·|o|)``, into ``C``'s (summed over the program, one atomic add into ``DTAB[h]``)."""
    pid_n, bh, b, h, cols, dims, dmask = _program(H, B, D, DP)
    kmask = (cols[:, None] < LK) & dmask[None, :]
    k = tl.load(K + b * s_kb + h * s_kh + cols[:, None] * s_kn + dims[None, :], mask=kmask, other=0.0)
    v = tl.load(V + b * s_vb + h * s_vh + cols[:, None] * s_vn + dims[None, :], mask=kmask, other=0.0)
    dk = tl.zeros([B, DP], tl.float32)
    dv = tl.zeros([B, DP], tl.float32)
    dtab = DTAB + h * TLEN
    hword = _head_word(SEED, bh)  # (dropout: each query tile's row words start from it)
    lo_q = 0
    if CAUSAL:  # the first query that sees this block's first key, rounded down to a block
        lo_q = (tl.maximum(pid_n * B - DELTA, 0) // B) * B
    c0 = pid_n * B
    # the query tiles wholly at or before the table's first offset for every key (starting at or before
    # `until`), those between, those wholly past its last (from `since`); a far tile's dS goes to its end
    # entry, summed per key here and added once at the end
    near, far = _far_tiles(lo_q, LQ, c0 + LO - DELTA - B + 1, c0 + B - 1 + LO + TLEN - 1 - DELTA, B, FIRE, LINEAR)
    qb, dob, lseb, dlb = Q + b * s_qb + h * s_qh, DO + b * s_ob + h * s_oh, LSE + bh * LQ, DL + bh * LQ
    first = tl.zeros([B], tl.float32)  # (FIRE: C's gradient, per key)
    last = tl.zeros([B], tl.float32)
    dk, dv, first = _backward_rows(dk, dv, first, k, v, cols, c0, lo_q, near, qb, dob, lseb, dlb, s_qm, s_om, dims,
                                   dmask, TAB, INV, KINK, SLOPE, OFFS, DSLOPE, DOFFS, dtab, h, DELTA, LO, TLEN, NK, NP,
                                   LQ, LK, scale, CAUSAL, B, TABLE_GRAD, PREC, FIRE, LINEAR, KSTEPS, 2, hword, TH,
                                   KEEP, DROP)
    dk, dv, first = _backward_rows(dk, dv, first, k, v, cols, c0, near, far, qb, dob, lseb, dlb, s_qm, s_om, dims,
                                   dmask, TAB, INV, KINK, SLOPE, OFFS, DSLOPE, DOFFS, dtab, h, DELTA, LO, TLEN, NK, NP,
                                   LQ, LK, scale, CAUSAL, B, TABLE_GRAD, PREC, FIRE, LINEAR, KSTEPS, 0, hword, TH,
                                   KEEP, DROP)
    dk, dv, last = _backward_rows(dk, dv, last, k, v, cols, c0, far, LQ, qb, dob, lseb, dlb, s_qm, s_om, dims,
                                  dmask, TAB, INV, KINK, SLOPE, OFFS, DSLOPE, DOFFS, dtab, h, DELTA, LO, TLEN, NK, NP,
                                  LQ, LK, scale, CAUSAL, B, TABLE_GRAD, PREC, FIRE, LINEAR, KSTEPS, 1, hword, TH,
                                  KEEP, DROP)
    if TABLE_GRAD:  # (FIRE: C's gradient in `first`, `last` 0; TLEN is 1)
        if not LINEAR:
            tl.atomic_add(dtab, tl.sum(first, 0))
            tl.atomic_add(dtab + TLEN - 1, tl.sum(last, 0))
    keep = (cols[:, None] < LK) & dmask[None, :]
    tl.store(DK + b * s_kb + h * s_kh + cols[:, None] * s_kn + dims[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=keep)
    if DROP:
        dv = dv * KEEP
    tl.store(DV + b * s_vb + h * s_vh + cols[:, None] * s_vn + dims[None, :], dv.to(DV.dtype.element_ty), mask=keep)


@triton.jit
def _backward_rows(dk, dv, far, k, v, cols, c0, lo, hi, Q, DO, LSE, DL, s_qm, s_om, dims, dmask, TAB, INV, KINK, SLOPE,
                   OFFS, DSLOPE, DOFFS, dtab, h, DELTA, LO, TLEN, NK, NP, LQ, LK, scale, CAUSAL: tl.constexpr,
                   B: tl.constexpr, TABLE_GRAD: tl.constexpr, PREC: tl.constexpr, FIRE: tl.constexpr,
                   LINEAR: tl.constexpr, KSTEPS: tl.constexpr, EDGE: tl.constexpr, hword, TH, KEEP,
                   DROP: tl.constexpr):
    """The dK/dV program over the query tiles starting at ``lo``, ``lo + B``, … below ``hi``, with the bias
    of ``EDGE`` (:func:`_table_bias`); ``Q``, ``DO``, ``LSE``, ``DL`` at this (batch, head). ``far``, per key,
    collects what a far tile adds to its end entry's gradient (``EDGE`` 1 or 2: the row sums of ``dS``)
    and, for FIRE, ``C``'s gradient. ``DROP``: dropout, the rows' words from this head's ``hword``
    (:func:`_head_word`; ``dV`` is summed unscaled, times ``KEEP`` at the end)."""
    for start in range(lo, hi, B):
        rows = start + tl.arange(0, B)
        q, do, lse, dl = _query_rows(Q, DO, LSE, DL, rows, dims, dmask, s_qm, s_om, LQ)
        st, xt, p_lo, p_hi = _tile(tl.dot(k, tl.trans(q), input_precision=PREC), rows[None, :], cols[:, None], start,
                                   start + B - 1, c0, c0 + B - 1, TAB, INV, KINK, SLOPE, OFFS, h, DELTA, LO, TLEN, NK,
                                   NP, LQ, LK, scale, CAUSAL, FIRE, LINEAR, KSTEPS, EDGE)
        pt = tl.exp2(st - lse[None, :] * LOG2E)  # [keys, queries]; 0 where hidden
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
        if DROP:  # dV = (P ∘ Z)ᵀ dO, dS = P ∘ (dP ∘ Z − δ) (:func:`~posbias.kernels.flash.mask_backward`)
            # as (P ∘ Z) ∘ dP − P·δ: the mask selects once, on P (selecting on dP as well, its own layout,
            # took a far tile's loop body from 721 instructions without dropout to 1,559; so, 1,012;
            # sm_90, bf16, head_dim 64, counted in the binary, not timed)
            pz = tl.where(_kept(_row_keys(hword, rows)[None, :], cols[:, None], TH), pt, 0.0)
            dv += tl.dot(pz.to(do.dtype), do, input_precision=PREC)
            dst = pz * (dpt * KEEP) - pt * dl[None, :]
        else:
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
            dst = pt * (dpt - dl[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
        if TABLE_GRAD:
            if FIRE:  # ∂x = dS·slope; x = ψ·INV: ∂ψ = ∂x·INV, and ψ = log(1 + C·|o|)
                _fire_pieces_grad(dst, xt, p_lo, p_hi, KINK, DSLOPE + h * NP, DOFFS + h * NP)
                o = DELTA + rows[None, :] - cols[:, None]
                a = tl.where(o < 0, -o, o).to(tl.float32)
                dpsi = dst * _fire_slope(xt, p_lo, p_hi, KINK, SLOPE + h * NP) * tl.load(
                    INV + tl.minimum(rows, LQ - 1))[None, :]
                far += tl.sum(dpsi * a / (1.0 + tl.load(TAB) * a), 1)
            elif EDGE == 0:
                if not LINEAR:
                    _table_grad(dtab, dst, DELTA + start - c0, LO, TLEN, B)
            else:
                far += tl.sum(dst, 1)
    return dk, dv, far


@triton.jit
def _table_grad(dtab, dst, base, LO, TLEN, B: tl.constexpr):
    """Add a tile's ``dSᵀ`` (``[B keys, B queries]``, pair (key r, query c) at offset ``base + c − r``)
    into the table's gradient ``dtab`` by diagonal (float32 atomics). Row ``r`` rotated left by ``r``
    (``tl.gather``) puts each diagonal in one column, split in two at the wrap: column ``c`` holds query
    ``(r + c) mod B``, at offset ``base + c`` before the wrap and ``base + c − B`` after it, so a tile
    costs ``2B`` atomic adds instead of ``B²`` (offsets past the table's ends add to its end entries). The
    tiles wholly past an end are not brought here (:func:`_backward_rows`)."""
    lane = tl.arange(0, B)
    turned = tl.gather(dst, (lane[:, None] + lane[None, :]) % B, 1)
    low = (lane[:, None] + lane[None, :]) < B  # before the wrap
    before = tl.sum(tl.where(low, turned, 0.0), 0)
    after = tl.sum(tl.where(low, 0.0, turned), 0)
    idx = base + lane - LO
    tl.atomic_add(dtab + tl.minimum(tl.maximum(idx, 0), TLEN - 1), before)
    tl.atomic_add(dtab + tl.minimum(tl.maximum(idx - B, 0), TLEN - 1), after, mask=lane > 0)


def _backward_queries(Q, K, V, TAB, INV, KINK, SLOPE, OFFS, DO, LSE, DL, DQ, DINV, s_qb, s_qh, s_qm, s_kb, s_kh, s_kn,
                      s_vb, s_vh, s_vn, s_ob, s_oh, s_om, H, LQ, LK, DELTA, LO, TLEN, NK, NP, scale, SEED, TH,
                      KEEP, CAUSAL: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr,
                      BN: tl.constexpr, TABLE_GRAD: tl.constexpr, PREC: tl.constexpr, FIRE: tl.constexpr,
                      LINEAR: tl.constexpr, KSTEPS: tl.constexpr, DROP: tl.constexpr):
    """Program (query block, batch·head): dQ over the key blocks it sees; with FIRE (``TABLE_GRAD``) also
    each query's ``∂INV = Σ_j dS·slope·ψ = Σ_j dS·slope·x / INV`` (``x = ψ·INV``), this head's, stored to
    ``DINV``."""
    pid_m, bh, b, h, rows, dims, dmask = _program(H, BM, D, DP)
    q, do, lse, dl = _query_rows(Q + b * s_qb + h * s_qh, DO + b * s_ob + h * s_oh, LSE + bh * LQ, DL + bh * LQ,
                                 rows, dims, dmask, s_qm, s_om, LQ)
    rkey = _row_keys(_head_word(SEED, bh), rows)  # (dropout)
    dq = tl.zeros([BM, DP], tl.float32)
    dinv = tl.zeros([BM], tl.float32)
    hi = LK
    if CAUSAL:
        hi = tl.minimum(LK, DELTA + (pid_m + 1) * BM)
    r0 = pid_m * BM
    # the key tiles wholly past the table's last offset, between, wholly at or before its first (as the forward)
    near, far = _far_tiles(0, hi, DELTA + r0 - LO - TLEN + 2 - BN, DELTA + r0 + BM - 1 - LO, BN, FIRE, LINEAR)
    kb, vb = K + b * s_kb + h * s_kh, V + b * s_vb + h * s_vh
    dq, dinv = _backward_keys_of(dq, dinv, q, do, lse, dl, rows, r0, 0, near, kb, vb, s_kn, s_vn, dims, dmask, TAB,
                                 INV, KINK, SLOPE, OFFS, h, DELTA, LO, TLEN, NK, NP, LQ, LK, scale, CAUSAL, BM, BN,
                                 TABLE_GRAD, PREC, FIRE, LINEAR, KSTEPS, 1, rkey, TH, KEEP, DROP)
    dq, dinv = _backward_keys_of(dq, dinv, q, do, lse, dl, rows, r0, near, far, kb, vb, s_kn, s_vn, dims, dmask, TAB,
                                 INV, KINK, SLOPE, OFFS, h, DELTA, LO, TLEN, NK, NP, LQ, LK, scale, CAUSAL, BM, BN,
                                 TABLE_GRAD, PREC, FIRE, LINEAR, KSTEPS, 0, rkey, TH, KEEP, DROP)
    dq, dinv = _backward_keys_of(dq, dinv, q, do, lse, dl, rows, r0, far, hi, kb, vb, s_kn, s_vn, dims, dmask, TAB,
                                 INV, KINK, SLOPE, OFFS, h, DELTA, LO, TLEN, NK, NP, LQ, LK, scale, CAUSAL, BM, BN,
                                 TABLE_GRAD, PREC, FIRE, LINEAR, KSTEPS, 2, rkey, TH, KEEP, DROP)
    keep = rows < LQ
    tl.store(DQ + b * s_qb + h * s_qh + rows[:, None] * s_qm + dims[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=keep[:, None] & dmask[None, :])
    if FIRE:
        if TABLE_GRAD:
            tl.store(DINV + bh * LQ + rows, dinv / tl.load(INV + rows, mask=keep, other=1.0), mask=keep)


@triton.jit
def _backward_keys_of(dq, dinv, q, do, lse, dl, rows, r0, lo, hi, K, V, s_kn, s_vn, dims, dmask, TAB, INV, KINK, SLOPE,
                      OFFS, h, DELTA, LO, TLEN, NK, NP, LQ, LK, scale, CAUSAL: tl.constexpr, BM: tl.constexpr,
                      BN: tl.constexpr, TABLE_GRAD: tl.constexpr, PREC: tl.constexpr, FIRE: tl.constexpr,
                      LINEAR: tl.constexpr, KSTEPS: tl.constexpr, EDGE: tl.constexpr, rkey, TH, KEEP,
                      DROP: tl.constexpr):
    """The dQ program over the key tiles starting at ``lo``, ``lo + BN``, … below ``hi``, with the bias of
    ``EDGE`` (:func:`_table_bias`); ``K``/``V`` at this (batch, head); ``DROP``: the rows' dropout words
    ``rkey``."""
    for start in range(lo, hi, BN):
        cols = start + tl.arange(0, BN)
        kmask = (cols[None, :] < LK) & dmask[:, None]
        kt = tl.load(K + cols[None, :] * s_kn + dims[:, None], mask=kmask, other=0.0)
        vt = tl.load(V + cols[None, :] * s_vn + dims[:, None], mask=kmask, other=0.0)
        s, x, p_lo, p_hi = _tile(tl.dot(q, kt, input_precision=PREC), rows[:, None], cols[None, :], r0, r0 + BM - 1,
                                 start, start + BN - 1, TAB, INV, KINK, SLOPE, OFFS, h, DELTA, LO, TLEN, NK, NP, LQ,
                                 LK, scale, CAUSAL, FIRE, LINEAR, KSTEPS, EDGE)
        p = tl.exp2(s - lse[:, None] * LOG2E)  # 0 where hidden
        dp = tl.dot(do, vt, input_precision=PREC)
        if DROP:  # the mask on P, as in the dK/dV program (on dP: 984 instructions a far tile; so 796, 584 without)
            ds = tl.where(_kept(rkey[:, None], cols[None, :], TH), p, 0.0) * (dp * KEEP) - p * dl[:, None]
        else:
            ds = p * (dp - dl[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PREC)
        if FIRE:
            if TABLE_GRAD:
                dinv += tl.sum(ds * _fire_slope(x, p_lo, p_hi, KINK, SLOPE + h * NP) * x, 1)
    return dq, dinv


# (a program without one of them ignores it)
_SIZES = ["H", "LQ", "LK", "DELTA", "LO", "TLEN", "NK", "NP", "KPS", "s_os", "s_ls", "SEED", "TH"]


def interpreting() -> bool:
    """Whether Triton runs programs in its interpreter (``TRITON_INTERPRET``; ``triton.knobs`` from Triton
    3.4, the variable read as Triton reads it before)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def programs(interpret: bool) -> SimpleNamespace:
    """The three programs compiled for the GPU (``triton.jit``) or run by Triton's interpreter."""
    if interpret != interpreting():
        raise RuntimeError("Triton's interpreter runs only where TRITON_INTERPRET=1 was set before triton was "
                           "imported (tests/conftest.py sets it on machines without CUDA)" if interpret else
                           "TRITON_INTERPRET=1 is set: Triton interprets every program, none runs on the GPU")
    # the lengths, offsets and split strides are not specialised on (Triton would compile anew for 1 or a value
    # divisible by 16): one compile per dtype, head dim, causality and tiles serves every length and
    # decoding step; the strides keep their divisibility, which the loads use
    wrap = functools.partial(triton.jit, do_not_specialize=_SIZES)  # (the interpreter's where TRITON_INTERPRET=1)
    return SimpleNamespace(forward=wrap(_forward), backward_keys=wrap(_backward_keys),
                           backward_queries=wrap(_backward_queries))


# the largest shared memory one program may use (opt-in), bytes, by compute capability
SHARED_LIMIT = {80: 166_912, 90: 232_448}
# float32 whatever the inputs' dtype
_FP32_ARGS = {"TAB", "INV", "KINK", "SLOPE", "OFFS", "LSE", "DL", "DTAB", "DSLOPE", "DOFFS", "DINV"}
_TENSOR_ARGS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV", *_FP32_ARGS}


def compile_for(arch: int, dtype, *, causal: bool, head_dim: int, config: dict, table_grad: bool = True,
                kinks: int | None = None, linear: bool = False, dropout: bool = False) -> dict:
    """Compile the three programs for compute capability ``arch`` (90: H100/H200, 80: A100) without
    a GPU (Triton's ahead-of-time path: LLVM and ptxas, no driver), for inputs of ``dtype`` (torch's
    bfloat16, float16 or float32) and tiles ``config`` (one of ``table_flash.LADDERS``' lists), with the
    constants and tiles the backend launches them with (``kinks``: FIRE's programs, an MLP with that many
    kinks; ``linear``: ALiBi's; ``dropout``: with attention dropout): ``{program: {"shared": bytes of
    shared memory, "tf32": whether a dot rounds its inputs to tf32 (it must not in float32: ``PREC``),
    "registers": per thread, "spilled": bytes of stack per thread, "loop_spills": local loads and stores
    inside its loops}}``, the last three read from the binary (:func:`_registers`). A
    program that does not compile raises Triton's ``CompilationError``; one that needs more shared memory
    than the device has compiles here and fails at launch, which :data:`SHARED_LIMIT` lets a caller
    check. Stack in a Triton program (which inlines every call) is registers spilled to local memory,
    read and written inside the tile loop: what a GPU run would find slow, found here without one. Not
    where ``TRITON_INTERPRET=1``."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .table_flash import bias_constants, constants, tiles

    pointee = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    run = programs(False)
    shared = {}
    grads = {"TABLE_GRAD": table_grad}
    for name, extra in (("forward", {}), ("backward_keys", grads), ("backward_queries", grads)):
        fn, kw = getattr(run, name), tiles(name, config)
        options = {k: v for k, v in kw.items() if k.startswith("num_")}  # warps and stages: not arguments
        fixed = {**constants(dtype, head_dim, causal, dropout), **bias_constants(kinks, linear), **extra,
                 **{k: v for k, v in kw.items() if k not in options}}
        signature = {}
        for arg in fn.arg_names:
            if arg in fixed:
                signature[arg] = "constexpr"
            elif arg in _TENSOR_ARGS:
                signature[arg] = "*fp32" if arg in _FP32_ARGS else f"*{pointee}"
            else:
                signature[arg] = "fp32" if arg in ("scale", "KEEP") else "i32"
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=fixed),
                                target=GPUTarget("cuda", arch, 32), options=options)
        shared[name] = {"shared": kernel.metadata.shared, "tf32": "tf32" in kernel.asm["ptx"],
                        **_registers(kernel.asm["cubin"])}
    return shared


def _registers(cubin: bytes) -> dict:
    """:func:`register_usage` of a compiled program, read with Triton's bundled ``cuobjdump``; None each
    where the tool is missing."""
    import subprocess
    import tempfile
    from pathlib import Path

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return {"registers": None, "spilled": None, "loop_spills": None}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return register_usage(usage, sass)


def register_usage(usage: str, sass: str) -> dict:
    """``{"registers", "spilled", "loop_spills"}`` from ``cuobjdump``'s ``-res-usage`` and ``-sass`` listings:
    registers per thread and bytes of stack (its REG and STACK), and how many local-memory loads and stores
    lie inside a loop (from a backward branch's target to the branch, both included), where they would run
    once per tile; spills outside the loops (values kept across them) cost once per program."""
    import re

    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    code = [(int(m[1], 16), m[2]) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = [(int(m[1], 16), at) for at, ins in code if (m := re.search(r"\bBRA\b.*0x([0-9a-f]+)", ins))
             and int(m[1], 16) < at]
    local = [at for at, ins in code if re.search(r"\b(STL|LDL)\b", ins)]
    inside = sum(any(lo <= at <= hi for lo, hi in loops) for at in local)
    return {"registers": int(found[1]), "spilled": int(found[2]), "loop_spills": inside}
