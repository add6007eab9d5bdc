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
def _logits(qk, tab, r, c, r0, r1, c0, c1, DELTA, LO, TLEN, LQ, LK, scale, CAUSAL: tl.constexpr):
    """A tile's logits in base 2: ``(scale·qk + bias)·log₂e``, −∞ where a pair is hidden. ``r``/``c``
    are the tile's query and key indices, broadcastable to ``qk``'s shape (either orientation);
    ``[r0, r1]`` and ``[c0, c1]`` their ranges. A tile whose offsets all lie at or past the table's last
    entry (or at or before its first) adds that entry as a scalar: no index and no load per pair (T5's
    far tiles, most of a long call). Only a tile that reaches past the last query or key, or across the
    causal diagonal, computes a mask."""
    x = qk * scale
    if DELTA + r0 - c1 >= LO + TLEN - 1:
        x = x + tl.load(tab + TLEN - 1)
    elif DELTA + r1 - c0 <= LO:
        x = x + tl.load(tab)
    else:
        x = x + tl.load(tab + tl.minimum(tl.maximum(DELTA + r - c - LO, 0), TLEN - 1))
    x = x * LOG2E
    edge = (r1 >= LQ) | (c1 >= LK)
    if CAUSAL:
        edge = edge | (DELTA + r0 - c1 < 0)
    if edge:
        seen = (r < LQ) & (c < LK)
        if CAUSAL:
            seen = seen & (DELTA + r - c >= 0)
        x = tl.where(seen, x, float("-inf"))
    return x


def _forward(Q, K, V, TAB, O, LSE, s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om,
             H, LQ, LK, DELTA, LO, TLEN, scale, KPS, s_os, s_ls, CAUSAL: tl.constexpr, D: tl.constexpr,
             DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """Program (query block, batch·head, key split): online softmax over the key blocks it can see among
    keys ``[split·KPS, (split + 1)·KPS)``. One split (``KPS ≥ LK``) is the whole call; several (few queries
    against a long cache: flash decoding) each write their own output and log-sum-exp, ``s_os`` and
    ``s_ls`` elements apart, merged afterwards; a split with no key visible to a row writes 0 and −∞."""
    pid_m, bh, b, h, rows, dims, dmask = _program(H, BM, D, DP)
    split = tl.program_id(2)
    q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qm + dims[None, :],
                mask=(rows[:, None] < LQ) & dmask[None, :], other=0.0)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, DP], tl.float32)
    tab = TAB + h * TLEN
    hi = LK
    if CAUSAL:  # keys past the block's last query are hidden from all its rows
        hi = tl.minimum(LK, DELTA + (pid_m + 1) * BM)
    hi = tl.minimum(hi, (split + 1) * KPS)
    for start in range(split * KPS, hi, BN):
        cols = start + tl.arange(0, BN)
        kt = tl.load(K + b * s_kb + h * s_kh + cols[None, :] * s_kn + dims[:, None],
                     mask=(cols[None, :] < LK) & dmask[:, None], other=0.0)
        s = _logits(tl.dot(q, kt, input_precision=PREC), tab, rows[:, None], cols[None, :], pid_m * BM,
                    pid_m * BM + BM - 1, start, start + BN - 1, DELTA, LO, TLEN, LQ, LK, scale, CAUSAL)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        v = tl.load(V + b * s_vb + h * s_vh + cols[:, None] * s_vn + dims[None, :],
                    mask=(cols[:, None] < LK) & dmask[None, :], other=0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # a row that saw nothing here: output 0, log-sum-exp −∞ (m_i)
    out = acc / l_i[:, None]
    keep = rows < LQ
    tl.store(O + split * s_os + b * s_ob + h * s_oh + rows[:, None] * s_om + dims[None, :], out.to(O.dtype.element_ty),
             mask=keep[:, None] & dmask[None, :])
    tl.store(LSE + split * s_ls + bh * LQ + rows, (m_i + tl.log2(l_i)) / LOG2E, mask=keep)


@triton.jit
def _query_rows(q_ptr, do_ptr, lse_ptr, dl_ptr, rows, dims, dmask, s_qm, s_om, LQ):
    """A query block's q, dO, log-sum-exp and δ, given each one's (batch, head) start; zeros past the
    last query."""
    keep = rows < LQ
    both = keep[:, None] & dmask[None, :]
    q = tl.load(q_ptr + rows[:, None] * s_qm + dims[None, :], mask=both, other=0.0)
    do = tl.load(do_ptr + rows[:, None] * s_om + dims[None, :], mask=both, other=0.0)
    return q, do, tl.load(lse_ptr + rows, mask=keep, other=0.0), tl.load(dl_ptr + rows, mask=keep, other=0.0)


def _backward_keys(Q, K, V, TAB, DO, LSE, DL, DK, DV, DTAB, s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                   s_ob, s_oh, s_om, H, LQ, LK, DELTA, LO, TLEN, scale, CAUSAL: tl.constexpr, D: tl.constexpr,
                   DP: tl.constexpr, B: tl.constexpr, TABLE_GRAD: tl.constexpr, PREC: tl.constexpr):
    """Program (key block, batch·head): dK and dV over every query block that sees a key of it, and
    (``TABLE_GRAD``) each square ``B × B`` tile's ``dS`` into the table's gradient (:func:`_table_grad`)."""
    pid_n, bh, b, h, cols, dims, dmask = _program(H, B, D, DP)
    kmask = (cols[:, None] < LK) & dmask[None, :]
    k = tl.load(K + b * s_kb + h * s_kh + cols[:, None] * s_kn + dims[None, :], mask=kmask, other=0.0)
    v = tl.load(V + b * s_vb + h * s_vh + cols[:, None] * s_vn + dims[None, :], mask=kmask, other=0.0)
    dk = tl.zeros([B, DP], tl.float32)
    dv = tl.zeros([B, DP], tl.float32)
    tab = TAB + h * TLEN
    dtab = DTAB + h * TLEN
    lo_q = 0
    if CAUSAL:  # the first query that sees this block's first key, rounded down to a block
        lo_q = (tl.maximum(pid_n * B - DELTA, 0) // B) * B
    for start in range(lo_q, LQ, B):
        rows = start + tl.arange(0, B)
        q, do, lse, dl = _query_rows(Q + b * s_qb + h * s_qh, DO + b * s_ob + h * s_oh, LSE + bh * LQ, DL + bh * LQ,
                                     rows, dims, dmask, s_qm, s_om, LQ)
        st = _logits(tl.dot(k, tl.trans(q), input_precision=PREC), tab, rows[None, :], cols[:, None], start,
                     start + B - 1, pid_n * B, pid_n * B + B - 1, DELTA, LO, TLEN, LQ, LK, scale, CAUSAL)
        pt = tl.exp2(st - lse[None, :] * LOG2E)  # [keys, queries]; 0 where hidden
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
        dst = pt * (dpt - dl[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
        if TABLE_GRAD:
            _table_grad(dtab, dst, DELTA + start - pid_n * B, LO, TLEN, B)
    keep = (cols[:, None] < LK) & dmask[None, :]
    tl.store(DK + b * s_kb + h * s_kh + cols[:, None] * s_kn + dims[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=keep)
    tl.store(DV + b * s_vb + h * s_vh + cols[:, None] * s_vn + dims[None, :], dv.to(DV.dtype.element_ty), mask=keep)


@triton.jit
def _table_grad(dtab, dst, base, LO, TLEN, B: tl.constexpr):
    """Add a tile's ``dSᵀ`` (``[B keys, B queries]``, pair (key r, query c) at offset ``base + c − r``)
    into the table's gradient ``dtab`` by diagonal (float32 atomics). Row ``r`` rotated left by ``r``
    (``tl.gather``) puts each diagonal in one column, split in two at the wrap: column ``c`` holds query
    ``(r + c) mod B``, at offset ``base + c`` before the wrap and ``base + c − B`` after it, so a tile
    costs ``2B`` atomic adds instead of ``B²``. A tile wholly past the table's last entry or before
    its first (T5's far pairs) is one sum and one add."""
    if base - (B - 1) >= LO + TLEN - 1:
        tl.atomic_add(dtab + TLEN - 1, tl.sum(tl.sum(dst, 1), 0))
    elif base + (B - 1) <= LO:
        tl.atomic_add(dtab, tl.sum(tl.sum(dst, 1), 0))
    else:
        lane = tl.arange(0, B)
        turned = tl.gather(dst, (lane[:, None] + lane[None, :]) % B, 1)
        low = (lane[:, None] + lane[None, :]) < B  # before the wrap
        before = tl.sum(tl.where(low, turned, 0.0), 0)
        after = tl.sum(tl.where(low, 0.0, turned), 0)
        idx = base + lane - LO
        tl.atomic_add(dtab + tl.minimum(tl.maximum(idx, 0), TLEN - 1), before)
        tl.atomic_add(dtab + tl.minimum(tl.maximum(idx - B, 0), TLEN - 1), after, mask=lane > 0)


def _backward_queries(Q, K, V, TAB, DO, LSE, DL, DQ, s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                      s_ob, s_oh, s_om, H, LQ, LK, DELTA, LO, TLEN, scale, CAUSAL: tl.constexpr, D: tl.constexpr,
                      DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """Program (query block, batch·head): dQ over the key blocks it sees."""
    pid_m, bh, b, h, rows, dims, dmask = _program(H, BM, D, DP)
    q, do, lse, dl = _query_rows(Q + b * s_qb + h * s_qh, DO + b * s_ob + h * s_oh, LSE + bh * LQ, DL + bh * LQ,
                                 rows, dims, dmask, s_qm, s_om, LQ)
    dq = tl.zeros([BM, DP], tl.float32)
    tab = TAB + h * TLEN
    hi = LK
    if CAUSAL:
        hi = tl.minimum(LK, DELTA + (pid_m + 1) * BM)
    for start in range(0, hi, BN):
        cols = start + tl.arange(0, BN)
        kmask = (cols[None, :] < LK) & dmask[:, None]
        kt = tl.load(K + b * s_kb + h * s_kh + cols[None, :] * s_kn + dims[:, None], mask=kmask, other=0.0)
        vt = tl.load(V + b * s_vb + h * s_vh + cols[None, :] * s_vn + dims[:, None], mask=kmask, other=0.0)
        s = _logits(tl.dot(q, kt, input_precision=PREC), tab, rows[:, None], cols[None, :], pid_m * BM,
                    pid_m * BM + BM - 1, start, start + BN - 1, DELTA, LO, TLEN, LQ, LK, scale, CAUSAL)
        p = tl.exp2(s - lse[:, None] * LOG2E)  # 0 where hidden
        ds = p * (tl.dot(do, vt, input_precision=PREC) - dl[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PREC)
    tl.store(DQ + b * s_qb + h * s_qh + rows[:, None] * s_qm + dims[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=(rows[:, None] < LQ) & dmask[None, :])


_SIZES = ["H", "LQ", "LK", "DELTA", "LO", "TLEN", "KPS", "s_os", "s_ls"]  # (a program without one ignores it)


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
_TENSOR_ARGS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "TAB", "LSE", "DL", "DTAB"}
_FP32_ARGS = {"TAB", "LSE", "DL", "DTAB"}  # float32 whatever the inputs' dtype


def compile_for(arch: int, dtype, *, causal: bool, head_dim: int, config: dict, table_grad: bool = True) -> dict:
    """Compile the three programs for compute capability ``arch`` (90: H100/H200, 80: A100) without
    a GPU (Triton's ahead-of-time path: LLVM and ptxas, no driver), for inputs of ``dtype`` (torch's
    bfloat16, float16 or float32) and tiles ``config`` (one of ``table_flash.CUDA_CONFIGS``), with the
    constants and tiles the backend launches them with: ``{program: shared memory bytes}``. A program
    that does not compile raises Triton's ``CompilationError``; one that needs more shared memory than
    the device has compiles here and fails at launch, which :data:`SHARED_LIMIT` lets a caller check.
    Not where ``TRITON_INTERPRET=1``."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .table_flash import constants, tiles

    pointee = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    run = programs(False)
    shared = {}
    for name, extra in (("forward", {}), ("backward_keys", {"TABLE_GRAD": table_grad}), ("backward_queries", {})):
        fn, kw = getattr(run, name), tiles(name, config)
        options = {k: v for k, v in kw.items() if k.startswith("num_")}  # warps and stages: not arguments
        fixed = {**constants(dtype, head_dim, causal), **extra, **{k: v for k, v in kw.items() if k not in options}}
        signature = {}
        for arg in fn.arg_names:
            if arg in fixed:
                signature[arg] = "constexpr"
            elif arg in _TENSOR_ARGS:
                signature[arg] = "*fp32" if arg in _FP32_ARGS else f"*{pointee}"
            else:
                signature[arg] = "fp32" if arg == "scale" else "i32"
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=fixed),
                                target=GPUTarget("cuda", arch, 32), options=options)
        shared[name] = kernel.metadata.shared
    return shared
