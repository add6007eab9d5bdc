"""``attention(q, k, v, scheme, ...)``: the one entry point, and the backend choice in one place.

The logit is ``scale · q_i·k_j + PE(i, j) + Mask(i, j)``: the bias is added after
scaling; ``scale`` defaults to ``scheme.default_scale()`` — 1 for T5 (unscaled, Raffel et al. 2020),
``1/√head_dim`` otherwise. Positions default to the keys ``0 … Lk−1`` and the queries aligned to the
*end* of the keys (``Lk−Lq … Lk−1``), which is what decoding with a cache needs.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .kernels.alibi import alibi_kernel
from .kernels.banded import banded_kernel
from .kernels.blockwise import blockwise_kernel
from .kernels.dropout import check_dropout, draw_seed, dropout_kernel, group_seed, reference_dropout
from .kernels.flash import flash_available
from .kernels.flex import flex_available, flex_kernel
from .kernels.reference import (dense_probs, every_row_sees_a_key, reference_kernel, reference_probs, ungrouped,
                                visible)
from .kernels.sdpa import sdpa_kernel
from .kernels.table_flash import table_flash_kernel, table_flash_usable
from .kernels.toeplitz import toeplitz_kernel
from .kernels.windowed import windowed_kernel
from .positions import consecutive, first, highest, piece, read_ahead, run, run_start, runs
from .schemes.base import Scheme, ToeplitzScheme, as_positions, needs_grad, trains_bias

Kernel = Callable[..., Tensor]


def resolve(q: Tensor, k: Tensor, v: Tensor, scheme: Scheme, *, q_pos: Tensor | None, k_pos: Tensor | None,
            scale: float | None, enable_gqa: bool = False,
            repeat: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, float]:
    """Validate shapes, resolve positions and scale, rotate q/k for rotary schemes, and (``repeat``)
    give grouped keys and values (``enable_gqa``) one head per query head: ``(q, k, v, q_pos, k_pos, scale)``."""
    _check_shapes(q, k, v, enable_gqa)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k and v must have one dtype, got {q.dtype}, {k.dtype} and {v.dtype}; cast them first")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device} and {v.device}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if q.shape[1] != scheme.n_heads:
        raise ValueError(f"q has {q.shape[1]} heads but the scheme was built for n_heads={scheme.n_heads}")
    if q.shape[-1] != scheme.head_dim and (scheme.family == "rotary" or (scale is None and not scheme.unscaled)):
        # a rotation is built for its head_dim, and the default scale is 1/√(the scheme's head_dim): with
        # q of another head_dim it would silently be the wrong one (T5's is 1 and reads no head_dim)
        raise ValueError(f"q has head_dim {q.shape[-1]} but the scheme was built for head_dim={scheme.head_dim}"
                         + ("" if scheme.family == "rotary" else
                            f", whose default scale 1/√{scheme.head_dim} is not q's; build it with "
                            f"head_dim={q.shape[-1]} or pass scale"))
    lq, lk = q.shape[2], k.shape[2]
    # the default positions (keys 0 … Lk − 1, queries at their end) already start at 0: nothing to
    # re-reference below, and the context length is Lk (four tensor reductions less per call)
    default = q_pos is None and k_pos is None and lq <= lk
    k_pos = as_positions(k_pos, lk, q.device)
    q_pos = as_positions(q_pos, lq, q.device, start=lk - lq)
    # the one read of a call's positions (none for positions posbias made): consecutive ones go on as
    # runs, whose starts every later decision reads from the host (posbias.positions)
    # (without a bias on the CPU they are not: SDPA needs no run, only their ends where causal, and
    # there reading those costs less than checking for runs)
    if scheme.family != "none" or read_ahead(q.device):
        q_pos, k_pos = runs(q_pos, k_pos)
    q0, k0 = run_start(q_pos), run_start(k_pos)
    rotary = scheme.family == "rotary"
    # dynamic-NTK's frequencies depend on the absolute context length: read it before re-referencing
    context = (lk if default else max(highest(k_pos), highest(q_pos)) + 1) if rotary and lk and lq else 0
    if lk and lq and not default and (scheme.toeplitz or rotary or scheme.family == "none"):
        # Everything these schemes compute depends on i − j only: subtract one integer reference
        # from every position (exact in int64) so that no kernel ever turns a position like 2^40
        # into float32, where it would lose its low bits. FIRE depends on i itself and keeps it.
        if q0 is None or k0 is None:
            ref = torch.minimum(k_pos.min(), q_pos.min())
            q_pos, k_pos = q_pos - ref, k_pos - ref
        elif min(q0, k0):  # runs stay runs
            q_pos, k_pos = run(q0 - min(q0, k0), lq, q.device), run(k0 - min(q0, k0), lk, q.device)
    if rotary:
        q = scheme.rotate(q, q_pos, context_len=context)
        k = scheme.rotate(k, k_pos, context_len=context)
    if repeat:  # rotated first: the rotation is per key head, on the smaller tensor
        k, v = ungrouped(q, k, v)
    return q, k, v, q_pos, k_pos, scheme.default_scale() if scale is None else float(scale)


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, enable_gqa: bool) -> None:
    """``[batch, heads, seq, head_dim]`` inputs that fit together (k/v with fewer heads only under
    ``enable_gqa``), else ``ValueError`` naming the shapes."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [batch, heads, seq, head_dim]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape[:3] + k.shape[3:] or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads != kv_heads and not (enable_gqa and kv_heads and heads % kv_heads == 0):
        raise ValueError(
            f"q has {heads} heads but k and v have {kv_heads}; " + (
                "with enable_gqa=True the key/value heads must divide the query heads" if enable_gqa else
                "for grouped-query attention (each key/value head shared by consecutive query heads) pass "
                "enable_gqa=True"))
    if v.shape[-1] != q.shape[-1]:
        raise ValueError(f"v has head_dim {v.shape[-1]} but q and k have {q.shape[-1]}; posbias needs them equal")


def attention_reference(q: Tensor, k: Tensor, v: Tensor, scheme: Scheme, *, causal: bool = True,
                        scale: float | None = None, q_pos: Tensor | None = None,
                        k_pos: Tensor | None = None, enable_gqa: bool = False, dropout_p: float = 0.0,
                        dropout_seed: int | None = None) -> Tensor:
    """The plain dense reference every fast path is tested against (with ``dropout_p``, the dense
    probabilities times the whole dropout mask of :mod:`~posbias.kernels.dropout`)."""
    dropout_p, dropout_seed = _dropout_args("reference", True, dropout_p, dropout_seed)
    q, k, v, q_pos, k_pos, scale = resolve(q, k, v, scheme, q_pos=q_pos, k_pos=k_pos, scale=scale,
                                           enable_gqa=enable_gqa)
    if q.shape[2] == 0 or k.shape[2] == 0:
        return _empty(q, k, v)
    if dropout_p > 0:
        return reference_dropout(q, k, v, scheme, q_pos=q_pos, k_pos=k_pos, causal=causal, scale=scale,
                                 p=dropout_p, seed=dropout_seed)
    return reference_kernel(q, k, v, scheme, q_pos=q_pos, k_pos=k_pos, causal=causal, scale=scale)


def attention_probs(q: Tensor, k: Tensor, scheme: Scheme, *, causal: bool = True, scale: float | None = None,
                    q_pos: Tensor | None = None, k_pos: Tensor | None = None, enable_gqa: bool = False) -> Tensor:
    """The attention probabilities ``[batch, heads, Lq, Lk]`` (float32, dense reference math) that
    :func:`attention` applies to the values: what diagnostics read, at O(Lq·Lk) memory. Where no
    gradient is asked for, a Toeplitz bias is written by :meth:`~posbias.schemes.base.ToeplitzScheme.bias_into`
    from its ``Lq + Lk − 1`` per-offset values (a strided view) instead of each of the ``Lq·Lk`` offsets
    bucketed on its own: the same values, so the same probabilities bit for bit (tested), and a
    diagnosis's hooked forward at N = 4,096 (T5, 4 heads) in about a third of the time."""
    q, k, _, q_pos, k_pos, scale = resolve(q, k, k, scheme, q_pos=q_pos, k_pos=k_pos, scale=scale,
                                           enable_gqa=enable_gqa)
    scheme = toeplitz_view(scheme, q_pos, k_pos) or scheme  # FIRE below its threshold: the same bias, bit for bit
    if needs_grad(scheme, q, k) or not isinstance(scheme, ToeplitzScheme):
        return reference_probs(q, k, scheme, q_pos=q_pos, k_pos=k_pos, causal=causal, scale=scale)
    with torch.no_grad():  # bias_into takes no scratch for a Toeplitz scheme
        bias = scheme.bias_into(q_pos, k_pos, q.new_empty((q.shape[1], len(q_pos), len(k_pos)), dtype=torch.float32),
                                q.new_empty(0, dtype=torch.float32))
        return dense_probs(q, k, bias, visible(q_pos, k_pos, causal), scale)


def _empty(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """No queries: an empty output. No keys: every row sees nothing, and rows without a visible key
    are 0 (the reference's convention). Connected to the inputs, so an empty batch still backpropagates."""
    return q.new_zeros(*q.shape[:3], v.shape[-1]) + (q.sum() + k.sum() + v.sum()) * 0


BACKENDS: dict[str, Kernel] = {
    "reference": reference_kernel,
    "sdpa": sdpa_kernel,
    "windowed": windowed_kernel,
    "alibi": alibi_kernel,
    "blockwise": blockwise_kernel,
    "toeplitz": toeplitz_kernel,
    "flex": flex_kernel,  # opt-in: compiled FlexAttention (compiles per shape; no backward on CPU)
    "banded": banded_kernel,  # far parts in one fused call each, the band dense (CPU training; a CUDA candidate)
    "triton": table_flash_kernel,  # CUDA: flash attention reading a per-offset table, in Triton (a CUDA candidate)
}


# Backends that take grouped keys and values (``enable_gqa``) as they are: ``sdpa`` passes them to SDPA's
# own ``enable_gqa``; ``toeplitz`` and ``blockwise`` hand them at inference to the fused CPU op, which
# reads one key/value head per group of query heads itself, and repeat them (``ungrouped``) on their
# other paths. The rest get them repeated here. Repeating a decoding cache on every call cost one query
# against 16k keys 5.9× the multi-head call; read as it is, 0.69× (t5, 2 key/value heads for 8, measured).
GROUPED_HEADS = ("sdpa", "toeplitz", "blockwise")


def usable(name: str, scheme: Scheme, q: Tensor, *, q_pos: Tensor, k_pos: Tensor, causal: bool) -> str | None:
    """None if backend ``name`` can run these inputs exactly, else the reason it cannot."""
    if name in ("reference", "blockwise"):
        return None
    if name == "sdpa":
        if scheme.family == "additive":
            return "scheme adds a bias"
        return None if every_row_sees_a_key(q_pos, k_pos, causal) else "rows without visible keys"
    # what the scheme and the device need is checked before the positions are: a consecutive-positions
    # check reads the tensors (one sync), and a decoding step tries several backends
    def contiguous() -> bool:
        return consecutive(q_pos) and consecutive(k_pos)

    if name == "flex":
        return _flex_usable(scheme, q, contiguous)
    if name == "triton":  # (FIRE with every query below its threshold comes as its Toeplitz view: attention())
        return table_flash_usable(scheme, q, q_pos, k_pos, causal, contiguous)
    if name == "banded":
        return _fused_device(q) or _banded_usable(scheme, q, q_pos, k_pos, contiguous)
    if name == "alibi":  # on CUDA the native extra-dimension path (issue 12 candidate)
        return _fused_device(q) or _alibi_usable(scheme, q_pos, k_pos, causal, contiguous)
    if name not in ("windowed", "toeplitz"):
        return f"unknown backend {name!r}"
    if not flash_available(q):
        return "needs the fused CPU flash kernel (CPU tensors)"
    if name == "windowed" and not (isinstance(scheme, ToeplitzScheme) and scheme.flat_beyond is not None):
        return "needs a Toeplitz bias constant beyond a window"
    if name == "toeplitz" and not isinstance(scheme, ToeplitzScheme):
        rows, view = scheme.toeplitz_rows(q_pos)
        if view is None:
            return "needs a Toeplitz bias"
        if not contiguous():
            return "needs contiguous positions"
        if rows < len(q_pos):
            return (f"needs a Toeplitz bias at every query; this one is at the first {rows} of {len(q_pos)} "
                    "(FIRE: the queries below its threshold L)")
        return None
    return None if contiguous() else "needs contiguous positions"


def _queries_among_keys(q_pos: Tensor, k_pos: Tensor) -> bool:
    """Contiguous positions with every query's own position among the keys."""
    q0, k0 = first(q_pos), first(k_pos)
    return k0 <= q0 and q0 + q_pos.numel() <= k0 + k_pos.numel()


def _fused_device(q: Tensor) -> str | None:
    """None where :mod:`posbias.kernels.fused` has an op: CUDA, or the CPU with its flash kernel."""
    if q.device.type == "cuda" or flash_available(q):
        return None
    return f"needs a fused attention op with its log-sum-exp: CPU or CUDA tensors, not {q.device.type}"


def _alibi_usable(scheme: Scheme, q_pos: Tensor, k_pos: Tensor, causal: bool,
                  contiguous: Callable[[], bool]) -> str | None:
    if not isinstance(scheme, ToeplitzScheme) or scheme.linear_slopes is None or not causal:
        return "needs a causal linear bias (ALiBi)"
    if not contiguous():
        return "needs contiguous positions"
    return None if _queries_among_keys(q_pos, k_pos) else "needs every query position among the keys"


def _banded_usable(scheme: Scheme, q: Tensor, q_pos: Tensor, k_pos: Tensor,
                   contiguous: Callable[[], bool]) -> str | None:
    if not (isinstance(scheme, ToeplitzScheme) and scheme.flat_beyond is not None):
        return "needs a Toeplitz bias constant beyond a window"
    if not contiguous():
        return "needs contiguous positions"
    if not _queries_among_keys(q_pos, k_pos):
        return "needs every query position among the keys"
    if q.device.type == "cuda" and q.shape[-1] % 8:
        return f"needs head_dim a multiple of 8 on CUDA (got {q.shape[-1]})"
    return None


def _flex_usable(scheme: Scheme, q: Tensor, contiguous: Callable[[], bool]) -> str | None:
    if not flex_available():
        return f"needs torch.nn.attention.flex_attention (torch {torch.__version__} has none)"
    if scheme.family == "additive" and not callable(getattr(scheme, "score_mod", None)):
        return "needs a scheme with a score_mod (every Toeplitz bias, FIRE) or no bias"
    if q.device.type == "cpu" and needs_grad(scheme, q):
        return "FlexAttention has no backward pass on CPU (use torch.no_grad() or another backend)"
    return None if contiguous() else "needs contiguous positions"


TOEPLITZ_TRAINS_BELOW = 2560  # keys: below, a learnable windowed table trains faster on toeplitz (measured)
BANDED_BIDIRECTIONAL_FROM = 4096  # keys: from here bidirectional training takes banded over windowed (measured)
# keys from which causal training of such a table takes banded over toeplitz: the crossing moves with the CPU
# (about 2.5k on a Xeon, 3k on a Zen 3, 4k on a Zen 4; choose_backend), 3k costs at most ~6% on any of them
CAUSAL_BANDED_FROM = 3072

# CUDA fast paths that a GPU run has validated (``pytest -m cuda`` and ``benchmarks/gpu_check.sh``,
# docs/attention.md), in the order ``auto`` tries them. Issue 12's rule: until a path is listed here,
# ``auto`` keeps CUDA tensors on plain SDPA (no bias) or ``blockwise``; forcing ``backend="flex"``
# (or ``accelerate(model, backend=...)``) runs a candidate meanwhile. Each is tried where it runs
# exactly (banded: T5/offset only; alibi: causal ALiBi only), so the faster candidate for a scheme goes
# first. Validated 2026-12-04 on an NVIDIA H200, torch 2.11.0+cu130: their CUDA tests pass (float32
# against the reference, bf16/fp16 within the reference's own rounding, few queries, bidirectional
# T5) and, bf16, H=8, d=64, causal, fwd+bwd × unbiased SDPA at 8k / 16k / 32k: banded T5 7.2 / 4.0 /
# 2.6, offset 6.8 / 4.0 / 2.7; alibi 4.6 / 4.0 / 3.3; where ``blockwise`` (the fallback) was 3,467
# (T5), 3,932 (offset) and 269 (ALiBi) at 8k (benchmarks/bench_cuda_candidates.py). ``flex`` is not
# validated: on that machine its default kernel configuration failed to compile a table score_mod in
# bf16 at head_dim 64 (shared memory 245,760 > 232,448 bytes) and FIRE's backward failed to lower.
# ``triton`` (every Toeplitz scheme and FIRE, written after that run) has not run on a GPU yet: its place,
# once its tests pass there, is first, where it is faster than banded and alibi.
CUDA_VALIDATED: tuple[str, ...] = ("banded", "alibi")


def _candidates(device_type: str, trains: bool, keys: int, causal: bool) -> tuple[str, ...]:
    """The fast backends ``auto`` tries, fastest first, before the general fallbacks."""
    if device_type != "cpu":
        return ("sdpa", *CUDA_VALIDATED)
    if trains and keys >= (CAUSAL_BANDED_FROM if causal else TOEPLITZ_TRAINS_BELOW):
        if causal or keys >= BANDED_BIDIRECTIONAL_FROM:
            return ("sdpa", "banded", "windowed", "toeplitz", "alibi")
        return ("sdpa", "windowed", "toeplitz", "alibi")
    return ("sdpa", "toeplitz", "windowed", "alibi")


def choose_backend(scheme: Scheme, q: Tensor, *, q_pos: Tensor, k_pos: Tensor, causal: bool) -> str:
    """The automatic backend choice (the only place that decides): the fastest exact path.

    Measured on 2-core CPUs (``benchmarks/bench_attention.py``, docs/attention.md): for a Toeplitz bias the
    reversed-key ``toeplitz`` path is the fastest at inference and for fixed biases in training (ALiBi
    fwd+bwd 1.16× vs 1.63× for ``alibi``). A learnable bias constant beyond a window (T5, offset)
    trains faster with the band as the only dense part from 2.5k–4k keys on (causally from
    :data:`CAUSAL_BANDED_FROM`, see below), and faster ``toeplitz`` below, where the merge's fixed
    per-block costs show (fwd+bwd, 7 interleaved pairs, 2 threads, 2026-11-24: t5 at 1k / 1.5k / 2k 1.35× / 1.24× / 1.22× windowed vs 1.28× / 1.37× / 1.41× toeplitz;
    offset 1.30× / 1.29× / 1.24× vs 1.17× / 1.42× / 1.40×). Since toeplitz's backward blocks were capped
    at 128 rows (:func:`~posbias.kernels.flash.backward_rows`) the crossing moved from 1.5k to 2k keys,
    and to 2.5k once toeplitz's dense backward summed its blocks in place (2026-12-01, 7–9 pairs, band
    path / toeplitz: causal banded t5 at 2k / 2.3k / 2.5k / 3k 1.14–1.15 / 1.01 / 0.95 / 0.91, offset
    1.03 / 0.98 / 0.95 / 0.94; bidirectional windowed t5 at 2k / 2.3k / 2.5k 1.10 / 1.07 / 0.95;
    before the in-place sums, causal banded t5 at 1.5k / 2k / 2.5k / 3k 1.05 / 1.03–1.10 / 0.96 / 0.90,
    offset 1.12 / 0.97–0.99 / 0.90 / 0.88, bidirectional windowed t5 at 1.5k / 2k / 3k 1.05 / 0.99 /
    0.93). Of the two band paths, ``banded`` (the far
    keys of all queries in one fused call) trains faster than ``windowed`` (one far call per query
    block) causally from 3k keys and as fast from 1.5k, and bidirectionally from 4k (2026-12-01, 7
    pairs, ratio banded / windowed: causal t5 at 1.5k / 2k / 3k / 4k / 8k / 16k 1.01 / 0.99 / 0.92 /
    0.87 / 0.76 / 0.71, offset 0.97 / 0.98 / 0.91 / 0.81 / 0.77; bidirectional, after the band's
    forward moved onto the fused op, t5 at 2k / 3k / 4k / 6k 1.06 / 0.99 / 0.91–0.97 / 0.83, offset
    at 3k / 4k 0.96 / 0.94). The causal crossing between toeplitz and banded moves with the CPU (ratio
    banded / toeplitz, fwd+bwd, H=8, d=64, 2 threads, denormals flushed, 5–9 interleaved pairs): on a
    Xeon with AVX-512 and AMX (2026-12-01) t5 0.95 / 0.91 and offset 0.95 / 0.94 at 2.5k / 3k; on a Zen 3
    with AVX2 (2026-12-03) t5 1.13 / 0.97 / 0.98 and offset 1.09 / 1.03 / 1.00 at 2.5k / 3k / 4k; on a
    Zen 4 with AVX-512 (2026-12-04) t5 1.06 / 1.04 / 0.99 / 0.86 / 0.82 and offset 1.13 / 1.06 / 0.99 /
    0.90 / 0.83 at 2.5k / 3k / 4k / 6k / 8k. Banded from 2.5k cost up to 13% on two of the three; from 3k
    (:data:`CAUSAL_BANDED_FROM`) the worst is the Zen 4's 4–6% at 3k–4k and the Xeon's 5% at 2.5k–3k. On
    CUDA: :data:`CUDA_VALIDATED`. Where every query of FIRE is below its threshold, :func:`attention`
    hands this its Toeplitz view (there FIRE is Toeplitz), which takes ``toeplitz``; where only the first
    ones are, it runs those on ``toeplitz`` and the rest ``blockwise`` (:func:`toeplitz_prefix`)."""
    order = _candidates(q.device.type, trains_bias(scheme), len(k_pos), causal)
    for name in order:
        if usable(name, scheme, q, q_pos=q_pos, k_pos=k_pos, causal=causal) is None:
            return name
    if scheme.family != "additive":
        return "reference"  # only rows with no visible key remain: the reference returns 0 for them
    return "blockwise"


def attention(q: Tensor, k: Tensor, v: Tensor, scheme: Scheme, *, causal: bool = True,
              scale: float | None = None, q_pos: Tensor | None = None, k_pos: Tensor | None = None,
              backend: str = "auto", strict: bool = True, enable_gqa: bool = False,
              key_mask: Tensor | None = None, dropout_p: float = 0.0, dropout_seed: int | None = None,
              document_ids: Tensor | None = None) -> Tensor:
    """Exact attention with a positional scheme; ``[batch, heads, Lq, head_dim]`` out. Long because its
    docstring is the reference of every argument.

    ``q_pos`` and ``k_pos``, 1-D integer tensors, give the queries' and keys' positions; by default the
    keys sit at ``0 … Lk − 1`` and the queries at the end of them. Given positions are read once a call
    (on a GPU a read waits for it), positions made by :func:`posbias.positions.run` not at all, nor
    the defaults.

    ``key_mask``, a bool ``[batch, Lk]`` tensor, True where a key takes part (padding: False), hides keys
    per sequence; kept keys keep their positions, so offsets are those of the unpadded sequence.
    Sequences with the same mask run together on their kept keys only — a contiguous run of them (right
    or left padding) as a slice, on the same fast paths as an unpadded batch; scattered keys as a
    gather, with positions that are not consecutive (exact, slower backends). A query that sees no
    kept key gets 0.

    ``document_ids``, an integer ``[batch, L]`` tensor (self-attention, ``Lq = Lk = L``), packs several
    documents into one sequence: each run of equal ids is a document that attends only within itself, at
    positions counted from 0 at its start (as if it were alone; FIRE, whose bias reads the query's own
    position, sees exactly that). Documents of one length run as one batch. Not with ``q_pos``, ``k_pos``
    or ``key_mask`` (give padding an id of its own).

    ``enable_gqa=True`` takes grouped-query keys and values, ``[batch, kv_heads, Lk, head_dim]`` with
    ``kv_heads`` dividing ``heads``, shared by consecutive query heads as in
    ``scaled_dot_product_attention(..., enable_gqa=True)``; the bias stays per query head (the scheme is
    built for ``heads``). Without it, different head counts raise ``ValueError`` rather than broadcast.

    ``dropout_p > 0`` drops each attention probability with that probability and scales the others by
    ``1/(1 − p)``, as ``scaled_dot_product_attention(..., dropout_p=p)`` does (and, like it, whatever
    the module's training mode: pass ``p if self.training else 0``). It runs on
    :mod:`~posbias.kernels.dropout` (blocked, O(N) memory, every scheme, gradients to the bias too), on
    CUDA inside the ``triton`` programs where ``backend="triton"`` is forced (or once a GPU run has
    validated them, :func:`dropout_in_triton`), or on the dense reference with ``backend="reference"``;
    a pair's mask is a hash of ``dropout_seed`` and its indices, so all give the same result for one
    seed. ``dropout_seed`` (an int in [0, 2³² − 1]) defaults to one drawn from torch's default CPU
    generator, which ``torch.manual_seed`` fixes (inside ``torch.compile`` the compiled graph's own
    generator draws it: a fresh mask every call, reproducible, not eager's draw).

    ``backend="auto"`` picks the fastest exact path for the scheme and inputs (see
    :func:`choose_backend`); any name in :data:`BACKENDS` forces that path, and a forced path that
    cannot run these inputs exactly raises ``ValueError`` with the reason, or with ``strict=False``
    gives way to the automatic choice (a model-wide preference, as ``accelerate(model, backend=...)``
    sets, that one-token decoding steps or a CPU backward may not suit).
    """
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: auto, {', '.join(BACKENDS)}")
    dropout_p, dropout_seed = _dropout_args(backend, strict, dropout_p, dropout_seed)
    if key_mask is not None or document_ids is not None:
        kw = dict(causal=causal, scale=scale, backend=backend, strict=strict, enable_gqa=enable_gqa,
                  dropout_p=dropout_p, dropout_seed=dropout_seed)
        if document_ids is not None:
            return _with_documents(q, k, v, scheme, document_ids, q_pos=q_pos, k_pos=k_pos, key_mask=key_mask, **kw)
        return _with_key_mask(q, k, v, scheme, key_mask, q_pos=q_pos, k_pos=k_pos, **kw)
    q, k, v, q_pos, k_pos, scale = resolve(q, k, v, scheme, q_pos=q_pos, k_pos=k_pos, scale=scale,
                                           enable_gqa=enable_gqa, repeat=False)
    if q.shape[2] == 0 or k.shape[2] == 0:
        return _empty(q, k, v)
    if dropout_p > 0:
        return _with_dropout(q, k, v, scheme, backend, strict, q_pos=q_pos, k_pos=k_pos, causal=causal, scale=scale,
                             p=dropout_p, seed=dropout_seed)
    # FIRE below its threshold is Toeplitz there: found once, before a forced path is checked (forced
    # blockwise, reference and flex keep FIRE itself; one that gives way becomes auto)
    rows, view = 0, None
    if backend in VIEW_TAKERS:
        scheme, rows, view = _toeplitz_queries(scheme, q, q_pos, k_pos)
    name = backend
    if backend != "auto":
        why = usable(backend, scheme, q, q_pos=q_pos, k_pos=k_pos, causal=causal)
        if why is not None and strict:
            raise ValueError(f"backend {backend!r} cannot run this input exactly: {why}")
        if why is not None:
            name = "auto"  # gives way to the automatic choice
            if backend not in VIEW_TAKERS:
                scheme, rows, view = _toeplitz_queries(scheme, q, q_pos, k_pos)
    if name == "auto":
        name = choose_backend(scheme, q, q_pos=q_pos, k_pos=k_pos, causal=causal)
    if name not in GROUPED_HEADS:
        k, v = ungrouped(q, k, v)
    if rows and name == "blockwise":  # FIRE at its first queries only: those still run on toeplitz
        return _below_and_past(q, k, v, scheme, view, rows, q_pos=q_pos, k_pos=k_pos, causal=causal, scale=scale)
    return BACKENDS[name](q, k, v, scheme, q_pos=q_pos, k_pos=k_pos, causal=causal, scale=scale)


def _toeplitz_part(scheme: Scheme, q_pos: Tensor, k_pos: Tensor) -> tuple[int, ToeplitzScheme | None]:
    """:meth:`~posbias.schemes.base.Scheme.toeplitz_rows` of a scheme that is not Toeplitz as a whole, on
    contiguous positions; ``(0, None)`` for any other."""
    if scheme.family != "additive" or isinstance(scheme, ToeplitzScheme) or not len(q_pos):
        return 0, None
    if not (consecutive(q_pos) and consecutive(k_pos)):
        return 0, None
    return scheme.toeplitz_rows(q_pos)


def toeplitz_view(scheme: Scheme, q_pos: Tensor, k_pos: Tensor) -> ToeplitzScheme | None:
    """The Toeplitz view of a scheme that is not Toeplitz as a whole but is at every one of these
    queries (FIRE with every query below its threshold), on contiguous positions; else None. Its bias
    is the scheme's bit for bit, so paths that write the bias block by block (dropout, the
    probabilities diagnostics read) take its per-offset writer and gradient sums instead."""
    rows, view = _toeplitz_part(scheme, q_pos, k_pos)
    return view if rows == len(q_pos) else None


VIEW_TAKERS = ("auto", "toeplitz", "triton")  # the backends FIRE below its threshold reaches as its Toeplitz view


def _toeplitz_queries(scheme: Scheme, q: Tensor, q_pos: Tensor,
                      k_pos: Tensor) -> tuple[Scheme, int, ToeplitzScheme | None]:
    """``(scheme, rows, view)`` for :func:`attention`: FIRE's Toeplitz view in its place where every query
    is below its threshold; else the scheme, with :func:`toeplitz_prefix`'s count and view."""
    rows, view = toeplitz_prefix(scheme, q, q_pos, k_pos)
    return (view, 0, None) if rows == len(q_pos) else (scheme, rows, view)


def toeplitz_prefix(scheme: Scheme, q: Tensor, q_pos: Tensor, k_pos: Tensor) -> tuple[int, ToeplitzScheme | None]:
    """How many leading queries ``auto`` runs on the ``toeplitz`` path when the scheme as a whole is not
    Toeplitz but is at those queries (FIRE below its threshold, :meth:`~posbias.schemes.fire.FIRE.toeplitz_rows`),
    and the Toeplitz view they run with: 0 unless the positions are contiguous. Every query below L: the
    call runs as the view on any device (CUDA's paths, ``triton`` included, then see a Toeplitz scheme).
    Some of them: 0 unless the fused CPU op is there (they run on ``toeplitz``). Rows are independent in
    attention, so the two parts are simply stacked. Where only some
    queries are below, the count is rounded down so that the blockwise part's causal blocks end on a
    multiple of 64 keys (starting it at query 455 instead of 448 cost 10%, measured). FIRE with every
    query below L, forward+backward (H = 8, d = 64, 2 threads, 7 interleaved pairs, docs/attention.md):
    0.55–0.72 of the all-blockwise time at 512–8k keys, 1.13–1.50× SDPA; with L = 455 at 2k–8k, within
    the noise of it."""
    rows, view = _toeplitz_part(scheme, q_pos, k_pos)
    if not rows or (rows < len(q_pos) and not flash_available(q)):
        return 0, None
    if rows < len(q_pos):  # the blockwise part then starts where its blocks read a multiple of 64 keys
        rows = max(0, rows - (first(q_pos) - first(k_pos) + rows) % 64)
    return rows, view


def _below_and_past(q: Tensor, k: Tensor, v: Tensor, scheme: Scheme, view: ToeplitzScheme, rows: int, *,
                    q_pos: Tensor, k_pos: Tensor, causal: bool, scale: float) -> Tensor:
    """The first ``rows`` queries on ``toeplitz`` with the scheme's Toeplitz ``view``, the others
    ``blockwise``, stacked. Causally the first ones see only the keys up to the last of them: the Toeplitz
    path's reversed copies of the keys and values, and their gradients, then cover those keys alone."""
    seen = min(k.shape[2], max(1, first(q_pos) + rows - 1 - first(k_pos) + 1)) if causal else k.shape[2]
    below = toeplitz_kernel(q[:, :, :rows], k[:, :, :seen], v[:, :, :seen], view, q_pos=piece(q_pos, 0, rows),
                            k_pos=piece(k_pos, 0, seen), causal=causal, scale=scale)
    past = blockwise_kernel(q[:, :, rows:], k, v, scheme, q_pos=piece(q_pos, rows), k_pos=k_pos, causal=causal,
                            scale=scale)
    return torch.cat([below, past], 2)


def _dropout_args(backend: str, strict: bool, p: object, seed: object) -> tuple[float, int | None]:
    """:func:`attention`'s dropout arguments checked (a forced backend without dropout is refused when
    ``strict``), and the seed drawn where dropout is on and none was given."""
    p, seed = check_dropout(p, seed)
    if p > 0 and backend not in ("auto", *DROPOUT_BACKENDS) and strict:
        raise ValueError(f"backend {backend!r} has no attention dropout; with dropout_p > 0 use backend='auto' "
                         "(posbias.kernels.dropout), 'triton' (CUDA) or 'reference'")
    return p, draw_seed() if p > 0 and seed is None else seed


DROPOUT_BACKENDS = ("reference", "triton")  # the backends that may be forced with dropout_p > 0


def dropout_in_triton(backend: str, device_type: str) -> bool:
    """Whether attention dropout asked with this backend (forced, or a model-wide preference) goes to the
    ``triton`` programs on this device, where they run the inputs: CUDA, with ``triton`` forced, or
    ``auto`` once a GPU run has validated it (:data:`CUDA_VALIDATED`). Elsewhere dropout runs on
    :mod:`~posbias.kernels.dropout`'s blocks (the same mask)."""
    return device_type == "cuda" and (backend == "triton" or (backend == "auto" and "triton" in CUDA_VALIDATED))


def _with_dropout(q: Tensor, k: Tensor, v: Tensor, scheme: Scheme, backend: str, strict: bool, *, q_pos: Tensor,
                  k_pos: Tensor, causal: bool, scale: float, p: float, seed: int) -> Tensor:
    """:func:`attention` with dropout: the dense reference (``backend="reference"``, the oracle), the
    ``triton`` programs (:func:`dropout_in_triton`; a forced one that cannot run the inputs raises when
    ``strict``), else the dropout kernel's blocks. Each draws the same mask for one seed. FIRE with every
    query below its threshold goes as its Toeplitz view (its blocks: 0.83–0.88 of the time)."""
    k, v = ungrouped(q, k, v)
    kw = dict(q_pos=q_pos, k_pos=k_pos, causal=causal, scale=scale)
    if backend == "reference":
        return reference_dropout(q, k, v, scheme, p=p, seed=seed, **kw)
    scheme = toeplitz_view(scheme, q_pos, k_pos) or scheme
    if backend == "triton" or dropout_in_triton(backend, q.device.type):
        why = usable("triton", scheme, q, q_pos=q_pos, k_pos=k_pos, causal=causal)
        if why is None:
            return table_flash_kernel(q, k, v, scheme, dropout_p=p, dropout_seed=seed, **kw)
        if backend == "triton" and strict:
            raise ValueError(f"backend 'triton' cannot run this input exactly: {why}")
    return dropout_kernel(q, k, v, scheme, p=p, seed=seed, **kw)


def _with_documents(q: Tensor, k: Tensor, v: Tensor, scheme: Scheme, document_ids: Tensor, *, q_pos: Tensor | None,
                    k_pos: Tensor | None, key_mask: Tensor | None, **kw) -> Tensor:
    """:func:`attention` over packed documents: every run of equal ``document_ids`` alone, from position 0;
    the runs of one length gathered into one batch (one call per distinct length)."""
    _check_shapes(q, k, v, kw["enable_gqa"])
    batch, length = q.shape[0], q.shape[2]
    ids = document_ids
    if (not isinstance(ids, Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool
            or tuple(ids.shape) != (batch, length) or k.shape[2] != length):
        got = f"{ids.dtype} of shape {tuple(ids.shape)}" if isinstance(ids, Tensor) else type(ids)
        raise ValueError(f"document_ids must be an integer tensor [batch, L] = [{batch}, {length}] for self-attention "
                         f"(q and k of L tokens; k has {k.shape[2]}), got {got}")
    if q_pos is not None or k_pos is not None or key_mask is not None:
        raise ValueError("document_ids gives each document its own positions from 0 and hides the other documents: "
                         "pass it without q_pos, k_pos and key_mask (give padding a document id of its own)")
    ids = ids.to(q.device)
    new = torch.ones_like(ids, dtype=torch.bool)
    new[:, 1:] = ids[:, 1:] != ids[:, :-1]
    rows, starts = new.nonzero(as_tuple=True)  # each document's sequence and first token, in order
    if rows.numel() == batch:  # one document per sequence: the plain call
        return attention(q, k, v, scheme, **kw)
    last = torch.ones_like(rows, dtype=torch.bool)
    last[:-1] = rows[1:] != rows[:-1]
    lengths = torch.where(last, length, torch.cat([starts[1:], starts[-1:]])) - starts
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [batch, L, heads, head_dim]: a document is a slice
    seed, parts, where = kw.pop("dropout_seed"), [], []
    sizes = torch.unique(lengths).tolist()
    for g, n in enumerate(sizes):
        docs = (lengths == n).nonzero().squeeze(1)
        tok = starts[docs, None] + torch.arange(n, device=q.device)
        seq = rows[docs, None].expand_as(tok)
        kw["dropout_seed"] = group_seed(seed, g, len(sizes))
        out = attention(*(t[seq, tok].transpose(1, 2) for t in (qt, kt, vt)), scheme, **kw)
        parts.append(out.transpose(1, 2).reshape(-1, *out.shape[1:2], out.shape[-1]))
        where.append((seq * length + tok).reshape(-1))
    flat = torch.cat(parts)[torch.cat(where).argsort()]  # every token once: the inverse permutation
    return flat.view(batch, length, q.shape[1], -1).transpose(1, 2)


def _with_key_mask(q: Tensor, k: Tensor, v: Tensor, scheme: Scheme, key_mask: Tensor, *, q_pos: Tensor | None,
                   k_pos: Tensor | None, **kw) -> Tensor:
    """:func:`attention` with keys hidden per sequence: each group of sequences with one mask attends to
    its kept keys at their own positions (hiding a key and leaving it out are the same softmax)."""
    _check_shapes(q, k, v, kw["enable_gqa"])
    batch, lq, lk = q.shape[0], q.shape[2], k.shape[2]
    if not isinstance(key_mask, Tensor) or key_mask.dtype != torch.bool or tuple(key_mask.shape) != (batch, lk):
        got = f"{key_mask.dtype} of shape {tuple(key_mask.shape)}" if isinstance(key_mask, Tensor) else type(key_mask)
        raise ValueError(f"key_mask must be a bool tensor [batch, Lk] = [{batch}, {lk}] (True: the key takes part), "
                         f"got {got}")
    key_mask = key_mask.to(q.device)
    if key_mask.numel() == 0 or bool(key_mask.all()):  # nothing hidden (or nothing to hide): a plain call
        return attention(q, k, v, scheme, q_pos=q_pos, k_pos=k_pos, **kw)
    k_pos = as_positions(k_pos, lk, q.device)
    q_pos = as_positions(q_pos, lq, q.device, start=lk - lq)  # aligned to the end of *all* the keys
    masks, group = torch.unique(key_mask, dim=0, return_inverse=True)
    outs, order = [], []
    seed = kw.pop("dropout_seed")
    for g, mask in enumerate(masks):
        kw["dropout_seed"] = group_seed(seed, g, len(masks))
        rows = (group == g).nonzero().squeeze(1)
        whole = rows.numel() == batch  # one mask for the batch: no copy of q, k, v
        qg, kg, vg = (q, k, v) if whole else (q[rows], k[rows], v[rows])
        kept = mask.nonzero().squeeze(1)
        n = kept.numel()
        a, b = torch.stack([kept[0], kept[-1]]).tolist() if n else (0, -1)
        if n == lk:  # every key (this group's mask hides none)
            kp = k_pos
        elif n and b - a + 1 == n:  # one run of keys: a view
            kg, vg, kp = kg[:, :, a:b + 1], vg[:, :, a:b + 1], piece(k_pos, a, b + 1)
        else:
            kg, vg, kp = kg[:, :, kept], vg[:, :, kept], k_pos[kept]
        outs.append(attention(qg, kg, vg, scheme, q_pos=q_pos, k_pos=kp, **kw))
        order.append(rows)
    if len(outs) == 1:
        return outs[0]
    return torch.cat(outs).index_select(0, torch.cat(order).argsort())
