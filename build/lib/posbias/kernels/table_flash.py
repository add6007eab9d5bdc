"""Exact flash attention on CUDA for every additive scheme (T5, offset, ALiBi, KERPLE, FIRE), in Triton:
the ``triton`` backend, issue 12's CUDA candidate for a fused kernel with the bias inside it.

A Toeplitz bias is ``g_h(i − j)`` (SPEC: the per-offset bias), so one call needs ``g`` at the
offsets its pairs have, at most ``Lq + Lk − 1`` of them, and for a scheme constant beyond a window
``w`` (T5's last bucket, a clipped table) only the ``2w + 1`` from ``−w`` to ``w``. That table is
computed by the scheme (:meth:`~posbias.schemes.base.ToeplitzScheme.bias_at`, differentiable) and
read inside the kernels of :mod:`.table_programs`, one float32 value per pair, added to the float32
logit: no ``[N, N]`` bias, no rounding of the bias to the inputs' dtype, extra memory O(N)
(the table and one log-sum-exp per row). The backward pass recomputes the probabilities per tile
(flash attention 2's two programs, one for dK/dV and one for dQ) and sums ``dS = P ∘ (dP − δ)`` along
each tile's diagonals into the table's gradient, which autograd carries on to the scheme's
parameters (T5's bucket table, KERPLE's r1/r2, …).

FIRE is Toeplitz only below its threshold (there :func:`~posbias.attention.attention` hands over its
Toeplitz view, a table as above). Past it the bias ``f(ψ(|i − j|) / ψ(max(L, i)))`` also depends on the
query, so the kernels read the denominator's reciprocal per query (an O(N) table) and ``c``, form
``ψ(|o|) = log(1 + c·|o|)`` per pair, and evaluate the MLP per pair from its linear pieces
(:meth:`~posbias.schemes.fire.FIRE.pieces`; a tile spans few of them): the reference's bias to float
rounding, and gradients to the MLP, ``c`` and ``L`` through the pieces, the reciprocals and ``c``
(autograd from there). Causal ALiBi (fixed slopes) reads no table either: ``−m·o`` per pair.

Attention dropout runs inside the programs: each tile hashes its pairs' (batch·head, row, column) into
the mask of :mod:`~posbias.kernels.dropout` in 32-bit integer arithmetic (the row's part once per row),
the forward and the backward alike, so nothing is stored and every pair is dropped as the dropout
kernel and the reference drop it; the softmax's sums and the log-sum-exp stay the undropped ones.

Lengths are runtime arguments, not compile-time constants, and not specialised on (Triton would
otherwise compile anew for a length of 1 or one divisible by 16): a new length or a decoding step reuses
the compiled programs. Without autograd the keys
of a call with few queries are split into parts run side by side and merged by their log-sum-exps
(flash decoding, :func:`key_splits`).

Not yet validated on a GPU (``posbias.attention.CUDA_VALIDATED``): ``auto`` does not take it until a
GPU run has passed its CUDA tests. On the CPU the same programs run in Triton's interpreter
(``interpret=True``, tests only: slow), which checks their arithmetic against the reference.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import Tensor

from ..positions import first
from ..schemes.base import ToeplitzScheme, needs_grad
from ..schemes.fire import FIRE
from .dropout import drop_threshold, seed_word

# Tile sizes (queries × keys) of the forward and of the backward's square tiles on CUDA, with the
# programs' warps and pipeline stages, largest first, by bias kind (a table, or FIRE's MLP) and width
# (head dim × bytes per element / 2: a float32 row weighs what a 16-bit row twice as wide does; up to
# 64, 128, 256): each program runs with the first that fits the device's shared memory (Triton refuses
# a launch that does not, before it starts), remembered per device, dtype, head dim and kind. Not yet
# timed on a GPU; chosen so that the programs keep their values in registers. Compiled ahead of time for
# sm_90 (H100/H200; tests/test_table_flash.py), no program of each ladder's first configuration, nor the
# decoding tiles, loads or stores a spilled register inside its loops (``table_programs.compile_for``'s
# ``loop_spills``), in bf16 at head_dim 64, 128 and 256, with attention dropout or without, and in
# float32 at 64 (and a table's at 128): Triton 3.9 and 3.7 (torch 2.11's) alike. 4 warps on 128 × 64
# tiles, the first choice before, did so 55 times in the forward's loops and 177 times in the dK/dV
# program's; float32 at head_dim 64 with bf16's tiles, 4,019 times in the dK/dV program's. FIRE's
# backward holds more values per pair, so its tiles are smaller there (64 × 64 with 8 warps: 40 in its
# loops). Some do spill (2026-12-05, Triton 3.9): on sm_80 (A100) the table's dK/dV program at head_dim
# 64 in bf16 (15 in its loops, 38 with dropout) and its forward in float32 (155; Triton 3.7: 0); FIRE's
# float32 forward at head_dim 128 (133; 435 on sm_80) and float32 at 256. The first forward at head_dim
# 64 needs 90,112 bytes of shared memory on sm_90 (232,448 available) and 106,496 on sm_80 (166,912).
# benchmarks/bench_cuda_candidates.py --table-config JSON runs one configuration alone (:func:`use_cuda_configs`).
MAX_HEAD_DIM = 256
_SMALLEST = {"forward": {"BM": 32, "BN": 32, "num_warps": 4, "num_stages": 1},
             "backward": {"B": 16, "num_warps": 2, "num_stages": 1}}
_NARROW = [  # widths up to 64 (head dims up to 64 in 16 bits), a table's
    {"forward": {"BM": 128, "BN": 64, "num_warps": 8, "num_stages": 3},
     "backward": {"B": 64, "num_warps": 8, "num_stages": 2}},
    {"forward": {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 2},
     "backward": {"B": 32, "num_warps": 4, "num_stages": 2}},
    _SMALLEST]
_WIDE = [  # widths 65-128 (head dims up to 128 in 16 bits, up to 64 in float32), a table's or FIRE's
    {"forward": {"BM": 128, "BN": 32, "num_warps": 8, "num_stages": 3},
     "backward": {"B": 32, "num_warps": 8, "num_stages": 2}},
    {"forward": {"BM": 64, "BN": 32, "num_warps": 4, "num_stages": 2},
     "backward": {"B": 16, "num_warps": 4, "num_stages": 1}},
    _SMALLEST]
_WIDEST = [  # widths past 128 (head dim 256 in 16 bits, 128 and 256 in float32), a table's or FIRE's
    {"forward": {"BM": 64, "BN": 32, "num_warps": 8, "num_stages": 2},
     "backward": {"B": 16, "num_warps": 4, "num_stages": 1}}, _SMALLEST]
LADDERS = {  # (kind, the largest width served: head dim × bytes per element / 2) → configurations
    ("table", 64): _NARROW,
    ("table", 128): _WIDE,
    ("table", 256): _WIDEST,
    # FIRE past its threshold (the MLP per pair): the table's forward tiles, smaller backward ones
    ("fire", 64): [{**_NARROW[0], "backward": {"B": 32, "num_warps": 4, "num_stages": 2}},
                   {**_NARROW[1], "backward": {"B": 32, "num_warps": 4, "num_stages": 1}}, _SMALLEST],
    ("fire", 128): _WIDE,
    ("fire", 256): _WIDEST,
}
# A forward with at most DECODE_ROWS queries (a decoding step, a short chunk) first tries 16-row tiles: a
# 128-row tile would compute 128 rows for one, and a step reads the cache, so compute it need not do
# is time. Compiled for sm_90 (bf16) they spill nothing at head_dim 64 and 128, table and FIRE.
DECODE_ROWS = 16
DECODE_TILES = {"forward": {"BM": 16, "BN": 32, "num_warps": 4, "num_stages": 3}}
_FITS: dict[tuple, int] = {}  # (program, device, dtype, head dim, FIRE, decoding) → the first configuration that fits


def ladder(fire: bool, head_dim: int, decoding: bool = False, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """The configurations a table's (or FIRE's) programs try at this head dim and dtype, first that fits;
    a ``decoding`` forward (at most :data:`DECODE_ROWS` queries) tries :data:`DECODE_TILES` first. A
    float32 row holds the bytes of a 16-bit row twice as wide, so the ladders are by width, ``head_dim ×
    bytes per element / 2`` (past the widest, the widest's)."""
    kind = "fire" if fire else "table"
    width = head_dim * dtype.itemsize // 2
    widths = [d for k, d in LADDERS if k == kind]
    configs = LADDERS[(kind, min([d for d in widths if d >= width] or [max(widths)]))]
    return [DECODE_TILES, *configs] if decoding else configs


def use_cuda_configs(configs: list[dict], *, fire: bool = False) -> None:
    """Run the CUDA programs of a table (or FIRE) at every head dim with these configurations (the form
    of :data:`LADDERS`' lists), first that fits; :func:`restore_cuda_configs` undoes it."""
    kind = "fire" if fire else "table"
    for key in LADDERS:
        if key[0] == kind:
            LADDERS[key] = configs
    _FITS.clear()


_CHOSEN = {key: list(configs) for key, configs in LADDERS.items()}


def restore_cuda_configs() -> None:
    """The ladders as this module defines them."""
    LADDERS.update({key: list(configs) for key, configs in _CHOSEN.items()})
    _FITS.clear()


# In the interpreter (tests on CPU tensors): small tiles, so that small inputs span several of them.
INTERPRET_CONFIG = {"forward": {"BM": 16, "BN": 16}, "backward": {"B": 16}}
SPLIT_KEYS = 1024  # keys per part, at least, where an inference call's keys are split (:func:`key_splits`)


@functools.cache
def triton_missing() -> str | None:
    """None if the ``triton`` package is installed (every CUDA build of torch ships it) and has what the
    programs use (``tl.gather``, Triton 3.2, torch 2.6's), else what is missing."""
    if importlib.util.find_spec("triton") is None:
        return "needs the triton package (shipped with CUDA builds of torch)"
    import triton
    import triton.language as tl

    if not hasattr(tl, "gather"):
        return f"needs triton 3.2 or newer (tl.gather; this is {triton.__version__})"
    return None


def table_span(scheme: ToeplitzScheme, delta: int, lq: int, lk: int, causal: bool) -> tuple[int, int]:
    """The offsets ``[lo, hi]`` whose bias the table holds: those of the call's pairs (query ``i`` and
    key ``j`` at offset ``delta + i − j``; causally ``≥ 0`` only), cut to ``[−w, w]`` for a scheme
    constant beyond ``w`` (every pair past the cut reads the end entry)."""
    lo, hi = delta - (lk - 1), delta + lq - 1
    if causal:
        lo = max(lo, 0)
    w = getattr(scheme, "flat_beyond", None)  # (FIRE has none)
    if w is not None:
        lo, hi = max(lo, -w), min(hi, w)
    if lo > hi:  # (pairs all on one side of the window: one entry stands for them all)
        lo = hi = max(min(lo, w), -w) if w is not None else lo
    return lo, hi


def constants(dtype: torch.dtype, head_dim: int, causal: bool, dropout: bool = False) -> dict:
    """The programs' compile-time constants for inputs of ``dtype``: causality, the head dim and its power
    of two (at least 16, what ``tl.dot`` takes), the dots' precision (float32 exact, no tf32;
    bf16/fp16 dots are exact as they are), and whether they drop probabilities (attention dropout)."""
    return {"CAUSAL": causal, "D": head_dim, "DP": max(16, 1 << (head_dim - 1).bit_length()),
            "PREC": "ieee" if dtype == torch.float32 else None, "DROP": dropout}


NO_DROPOUT = (0, 0, 1.0)


def dropout_args(p: float, seed: int) -> tuple[int, int, float]:
    """The programs' dropout arguments ``(SEED, TH, KEEP)`` for rate ``p`` and a 32-bit ``seed``
    (:mod:`~posbias.kernels.dropout`'s mask, pair for pair): ``fmix(seed)`` as the int32 with its bits
    (an int32 argument whatever the seed: no recompile per seed), the signed threshold a pair's word is
    dropped below, and ``1/(1 − p)``; :data:`NO_DROPOUT` without dropout."""
    word = seed_word(seed)
    return word - (1 << 32) * (word >= 1 << 31), drop_threshold(p), 1.0 / (1.0 - p)


def bias_constants(kinks: int | None = None, linear: bool = False) -> dict:
    """The programs' compile-time constants for the bias: a per-offset table (the default), ALiBi's line
    (``linear``), or FIRE's MLP with ``kinks`` kinks (``KSTEPS``: the binary search's steps among them,
    enough for ``kinks + 1`` answers)."""
    return {"FIRE": kinks is not None, "LINEAR": linear, "KSTEPS": max(1, (kinks or 0).bit_length())}


def _bias_args(bias: tuple[Tensor, ...]) -> tuple[list[Tensor], list[int], dict]:
    """The programs' bias arguments from a call's bias tensors: a per-offset table ``[H, TLEN]``; ALiBi's
    ``−m`` ``[H]`` (one dimension: the line); or FIRE's ``c`` ``[1]``, the denominators' reciprocals, its
    kinks padded with one ``+∞``, slopes and offsets ``[H, NP]``. Returns the pointers ``TAB, INV, KINK,
    SLOPE, OFFS`` (the first standing for those a bias does not use), the sizes ``TLEN, NK, NP`` and
    :func:`bias_constants`."""
    if len(bias) == 1:
        return [bias[0]] * 5, [bias[0].shape[-1], 0, 1], bias_constants(linear=bias[0].dim() == 1)
    c, _, kinks, slope, _ = bias
    return list(bias), [c.shape[0], kinks.numel() - 1, slope.shape[1]], bias_constants(kinks.numel() - 1)


PART = {"forward": "forward", "backward_keys": "backward", "backward_queries": "backward"}  # program → config part


def tiles(program: str, config: dict) -> dict:
    """One program's keyword arguments from a configuration (one of :data:`LADDERS`' lists): its part's
    tiles, warps and stages, the dQ program's square tiles ``B`` as its ``BM`` and ``BN``."""
    kw = dict(config[PART[program]])
    if program == "backward_queries":
        kw["BM"] = kw["BN"] = kw.pop("B")
    return kw


def _launch(program: str, q: Tensor, interpret: bool, launch, fire: bool = False) -> None:
    """``launch(kwargs)`` (one program's :func:`tiles`) with the first configuration that fits the device.
    Triton checks a compiled program's shared memory against the device's when it loads it, before
    anything runs, so a refused one has written nothing (the table's gradient is accumulated by
    atomics: a program that ran must never run twice)."""
    if interpret:
        return launch(tiles(program, INTERPRET_CONFIG))
    from triton.runtime.autotuner import OutOfResources  # (where Triton's own compiler imports it from)

    decoding = program == "forward" and q.shape[2] <= DECODE_ROWS
    configs = ladder(fire, q.shape[-1], decoding, q.dtype)
    key = (program, q.device.index, q.dtype, q.shape[-1], fire, decoding)
    first, refused = _FITS.get(key, 0), []
    for n in range(first, len(configs)):
        try:
            launch(tiles(program, configs[n]))
        except OutOfResources as e:
            refused.append(f"{configs[n][PART[program]]}: {e}")
            continue
        _FITS[key] = n
        return None
    raise RuntimeError(f"the triton backend's {program} program fits none of its tile configurations on {q.device} "
                       f"({q.dtype}, head_dim {q.shape[-1]}): " + "; ".join(refused))


def _strides(*tensors: Tensor) -> list[int]:
    return [s for t in tensors for s in t.stride()[:3]]


def key_splits(q: Tensor, lk: int, fire: bool = False) -> int:
    """How many parts the keys of an inference call are split into (flash decoding): on CUDA, enough
    for about two programs per multiprocessor where the query blocks and heads alone leave them idle
    (one query against a long cache: ``batch · heads`` programs, each reading every key alone), with at
    least :data:`SPLIT_KEYS` keys a part. Not yet measured on a GPU."""
    if q.device.type != "cuda":
        return 1
    rows = ladder(fire, q.shape[-1], q.shape[2] <= DECODE_ROWS, q.dtype)[0]["forward"]["BM"]
    programs = _cdiv(q.shape[2], rows) * q.shape[0] * q.shape[1]
    units = torch.cuda.get_device_properties(q.device).multi_processor_count
    if programs >= units:
        return 1
    return max(1, min(lk // SPLIT_KEYS, _cdiv(2 * units, programs)))


def _forward(q: Tensor, k: Tensor, v: Tensor, bias: tuple[Tensor, ...], delta: int, lo: int, causal: bool,
             scale: float, interpret: bool, drop: tuple | None, splits: int | None = 1) -> tuple[Tensor, Tensor]:
    """(output in the inputs' dtype, log-sum-exp float32); ``drop``: :func:`dropout_args` or None. With
    ``splits > 1`` the keys are cut into that many parts of whole key tiles, each part's output and
    log-sum-exp written apart (float32) and merged here: ``lse = logsumexp_s lse_s``, ``out = Σ_s
    exp(lse_s − lse) out_s`` (a part a row sees nothing of has ``lse_s = −∞`` and weighs 0);
    ``splits=None``: :func:`key_splits`'."""
    from .table_programs import programs

    b, h, lq, d = q.shape
    lk = k.shape[2]
    program, made = programs(interpret).forward, {}
    pointers, (tlen, nk, np_), kind = _bias_args(bias)
    splits = key_splits(q, lk, kind["FIRE"]) if splits is None else splits

    def launch(cfg: dict) -> None:
        per = lk if splits <= 1 else _cdiv(_cdiv(lk, splits), cfg["BN"]) * cfg["BN"]  # keys per part
        n = _cdiv(lk, per)
        out = torch.empty_like(q) if n == 1 else q.new_empty(n, b, h, lq, d, dtype=torch.float32)
        lse = torch.empty(*out.shape[:-1], dtype=torch.float32, device=q.device)
        program[(_cdiv(lq, cfg["BM"]), b * h, n)](
            q, k, v, *pointers, out, lse, *_strides(q, k, v, out if n == 1 else out[0]), h, lq, lk, delta, lo,
            tlen, nk, np_, scale, per, 0 if n == 1 else out.stride(0), 0 if n == 1 else lse.stride(0),
            *(drop or NO_DROPOUT), **constants(q.dtype, d, causal, drop is not None), **kind, **cfg)
        made.update(out=out, lse=lse)

    _launch("forward", q, interpret, launch, kind["FIRE"])
    out, lse = made["out"], made["lse"]
    if out.dim() == 5:
        total = torch.logsumexp(lse, 0)
        out, lse = ((lse - total).exp()[..., None] * out).sum(0).to(q.dtype), total
    return out, lse


class _TableFlash(torch.autograd.Function):
    """``(q, k, v, (delta, lo, causal, scale, interpret, drop), *bias)``: the bias tensors of :func:`_bias_args`."""

    @staticmethod
    def forward(ctx, q, k, v, args: tuple, *bias):
        out, lse = _forward(q, k, v, bias, *args)
        ctx.save_for_backward(q, k, v, out, lse, *bias)
        ctx.args = args
        return out

    @staticmethod
    def backward(ctx, dout):
        from .table_programs import programs

        q, k, v, out, lse, *bias = ctx.saved_tensors
        delta, lo, causal, scale, interpret, drop = ctx.args
        b, h, lq, d = q.shape
        lk = k.shape[2]
        dout = dout.contiguous()
        dl = (dout.float() * out.float()).sum(-1)  # δ_i = dO_i · O_i
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        pointers, (tlen, nk, np_), kind = _bias_args(bias)
        train = any(ctx.needs_input_grad[4:])
        fire = kind["FIRE"]
        # the bias's gradients, each a stand-in pointer (the table) where nothing is written to it: the
        # table's (FIRE: c's, per head), FIRE's pieces' (per head) and reciprocal denominators' (per batch·head)
        dtab = torch.zeros(h, tlen, device=q.device) if train else pointers[0]
        dslope, doffs = (torch.zeros_like(bias[3]), torch.zeros_like(bias[4])) if fire and train else (dtab, dtab)
        dinv = torch.empty(b * h, lq, device=q.device) if fire and train else dtab
        fixed = {**constants(q.dtype, d, causal, drop is not None), **kind, "TABLE_GRAD": train}
        strides = _strides(q, k, v, dout)
        sizes = (h, lq, lk, delta, lo, tlen, nk, np_, scale, *(drop or NO_DROPOUT))
        run = programs(interpret)
        _launch("backward_keys", q, interpret, lambda kw: run.backward_keys[(_cdiv(lk, kw["B"]), b * h)](
            q, k, v, *pointers, dout, lse, dl, dk, dv, dtab, dslope, doffs, *strides, *sizes, **fixed, **kw), fire)
        _launch("backward_queries", q, interpret, lambda kw: run.backward_queries[(_cdiv(lq, kw["BM"]), b * h)](
            q, k, v, *pointers, dout, lse, dl, dq, dinv, *strides, *sizes, **fixed, **kw), fire)
        if not train:
            grads = [None] * len(bias)
        elif not fire:
            grads = [dtab]
        else:
            grads = [dtab.sum(0), dinv.sum(0), None, dslope, doffs]
        return dq, dk, dv, None, *grads


def _cdiv(n: int, block: int) -> int:
    return -(-n // block)


def table_flash_kernel(q: Tensor, k: Tensor, v: Tensor, scheme: ToeplitzScheme | FIRE, *, q_pos: Tensor,
                       k_pos: Tensor, causal: bool, scale: float, interpret: bool = False,
                       splits: int | None = None, dropout_p: float = 0.0, dropout_seed: int | None = None) -> Tensor:
    """Contiguous positions (causally, the first query's position at or past the first key's: every
    query sees a key); the dispatcher checks. Without autograd the keys may be split into ``splits``
    parts (default :func:`key_splits`). ``interpret=True`` runs Triton's interpreter on CPU tensors
    (tests). ``dropout_p > 0`` (with ``dropout_seed``, an int in [0, 2³² − 1]) drops attention
    probabilities inside the programs with the mask of :mod:`~posbias.kernels.dropout`, pair for pair
    (the mask is a hash of the seed and the pair's indices, computed per tile in the forward and again
    in the backward: nothing stored)."""
    delta = first(q_pos) - first(k_pos)
    lq, lk = q.shape[2], k.shape[2]
    if isinstance(scheme, FIRE):  # c, 1 / the denominator per query, the MLP's pieces (module docstring)
        kinks, slope, offset = scheme.pieces()
        lo, bias = 0, (scheme.c.abs().float().reshape(1), 1 / scheme.denominator(q_pos.to(q.device)),
                       torch.cat([kinks.detach(), kinks.new_full((1,), float("inf"))]), slope.T.contiguous(),
                       offset.T.contiguous())
    elif scheme.linear_slopes is not None and not scheme.linear_slopes.requires_grad:  # ALiBi: −m·o in place
        lo, bias = 0, (-scheme.linear_slopes.float().contiguous(),)
    else:
        lo, hi = table_span(scheme, delta, lq, lk, causal)
        bias = (scheme.bias_at(torch.arange(lo, hi + 1, device=q.device)).float().contiguous(),)  # [H, hi − lo + 1]
    q, k, v = (t.contiguous() for t in (q, k, v))
    drop = None
    if dropout_p > 0:
        if dropout_seed is None:
            raise ValueError("dropout_p > 0 needs a dropout_seed (attention() draws one)")
        drop = dropout_args(dropout_p, dropout_seed)
    args = (delta, lo, causal, float(scale), interpret, drop)
    if not needs_grad(scheme, q, k, v):  # inference: no autograd node, the keys split where that helps
        return _forward(q, k, v, bias, *args, splits)[0]
    return _TableFlash.apply(q, k, v, args, *bias)


def table_flash_usable(scheme, q: Tensor, q_pos: Tensor, k_pos: Tensor, causal: bool, contiguous) -> str | None:
    """None if the ``triton`` backend runs these inputs exactly, else why not (on CUDA tensors only;
    the tests reach the interpreter through :func:`table_flash_kernel` itself)."""
    if q.device.type != "cuda":
        return f"needs CUDA tensors (Triton), not {q.device.type}"
    missing = triton_missing()
    if missing:
        return missing
    if not isinstance(scheme, (ToeplitzScheme, FIRE)):
        return "needs a Toeplitz bias (T5, offset, ALiBi, KERPLE) or FIRE"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"needs float16, bfloat16 or float32 inputs, not {q.dtype}"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"needs head_dim at most {MAX_HEAD_DIM} (got {q.shape[-1]})"
    if not contiguous():
        return "needs contiguous positions"
    if causal and first(q_pos) < first(k_pos):
        return "needs the first query at or past the first key (causal: every query sees a key)"
    return None
