"""Helpers shared by the segment kernels: the fused CPU flash kernel with its log-sum-exp, dense
segments with an explicit bias, and the exact merge of partial results.

Attention over a key set split into parts merges exactly: with per-part log-sum-exps ``l_p`` and
outputs ``o_p``, ``l = logsumexp_p(l_p)`` and ``o = Σ_p exp(l_p − l) · o_p``. A part whose bias is a
per-head constant ``c`` is plain attention with ``l_p + c``. For the backward pass, the fused
backward op called with the *merged* output and ``l − c`` gives that part's exact gradients (the
probabilities it recomputes are the merged ones), as ring attention does.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

NEG = torch.finfo(torch.float32).min
LOG2E = 1.4426950408889634  # log2(e)


def flash_available(x: Tensor) -> bool:
    return x.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


class OpReads(NamedTuple):
    """What this torch's fused CPU op reads correctly (:func:`op_reads`)."""

    strided_masks: bool  # a mask whose last dimension is not contiguous (a band built by flipping a view)
    overlapping_masks: bool  # a mask whose rows overlap in memory (toeplitz's zero-copy ``unfold`` view)
    grouped: bool  # keys and values with fewer heads than the queries


@functools.lru_cache(maxsize=1)
def op_reads() -> OpReads:
    """Measured once per process, on a few pairs against dense math: which inputs the fused CPU op reads
    correctly. torch 2.6's op reads a mask as if each row were contiguous, whatever its strides, and
    fills outputs with NaN for grouped keys and values: wrong results without an error (found
    2026-12-04 when the suite ran under 2.6; 2.13 reads all three). Where a check fails,
    :func:`flash_forward` and :func:`flash_backward` hand the op a contiguous mask or repeated heads."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g) for n in (3, 5, 5))
    row = torch.randn(2, 7, generator=g)
    masks = {"strided_masks": torch.randn(2, 5, 3, generator=g).transpose(-1, -2),  # [2, 3, 5], strides (15, 1, 3)
             "overlapping_masks": row.unfold(-1, 5, 1)}  # [2, 3, 5], strides (7, 1, 1)

    def agrees(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> bool:
        kr, vr = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
        want = torch.softmax(q @ kr.transpose(-1, -2) * 0.5 + mask, -1) @ vr
        got = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask[None],
                                                                          scale=0.5)[0]
        return bool(torch.allclose(got, want, atol=1e-5))

    with torch.no_grad():
        reads = {name: agrees(q, k, v, m) for name, m in masks.items()}
        reads["grouped"] = agrees(torch.randn(1, 4, 3, 8, generator=g), k, v, torch.randn(4, 3, 5, generator=g))
    return OpReads(**reads)


def readable(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """The op's inputs as this torch reads them correctly (:func:`op_reads`): unchanged, and nothing
    looked at, on a torch that reads them all (every fused call passes here)."""
    reads = op_reads()
    if all(reads):
        return k, v, mask
    if mask is not None and mask.dim() >= 2 and mask.shape[-1] > 1:
        strided = mask.stride(-1) != 1
        overlapping = not strided and mask.shape[-2] > 1 and 0 <= mask.stride(-2) < mask.shape[-1]
        if (strided and not reads.strided_masks) or (overlapping and not reads.overlapping_masks):
            mask = mask.contiguous()
    if k.shape[1] != q.shape[1] and not reads.grouped:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
    return k, v, mask


def flash_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool,
                  mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Fused attention (top-left causal when ``causal``; ``mask`` an additive float bias with −∞ for
    hidden pairs) → (out, lse float32 ``[B, H, Lq]``). Never with zero keys: torch 2.13's op ends the
    process with a floating point exception there (callers skip such blocks: their rows are 0, lse −∞).
    Nor with keys longer than the values: the op reads as many keys as there are values, unchecked."""
    k, v, mask = readable(q, k, v, mask)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask,
                                                                          scale=scale)
    return out, lse.float()


def fused_inputs(*tensors: Tensor) -> list[Tensor]:
    """q, k, v for the fused op (at inference, and in training under a fixed bias): bf16 and fp16 as
    they are, other dtypes as float32, any strides but the last (a view of a decoding cache is not
    copied). The op multiplies reduced precision inputs with float32 accumulation and adds the
    float32 mask in float32: outputs equal to those of float32 inputs to within the output's own
    rounding (measured: bf16 0.0075 against 0.0075, fp16 0.00105 against 0.00097 from the float64
    truth, where the reference in the same precision is 0.26 and 0.073 off; its backward's bf16
    gradients 0.024–0.063 off where the reference's are 0.06–0.24); converting the cache instead
    costs more than the call (one bf16 query against 16k keys: 10× unbiased SDPA, measured)."""
    keep = tensors[0].dtype in (torch.bfloat16, torch.float16) and all(t.dtype == tensors[0].dtype for t in tensors)
    converted = [t if keep else t.float() for t in tensors]
    return [t if t.stride(-1) == 1 else t.contiguous() for t in converted]


def flash_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
                   causal: bool, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    if k.shape[1] != q.shape[1]:  # (callers repeat grouped heads before a backward: the sums are per query head)
        raise ValueError("flash_backward needs keys and values with the queries' head count")
    _, _, mask = readable(q, k, v, mask)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do.contiguous(), q, k, v, out.contiguous(), lse.contiguous(), 0.0, causal, attn_mask=mask, scale=scale)


def merge(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Exact merge of (out, lse) parts; rows with no visible key get out 0 and lse −∞."""
    lse = torch.logsumexp(torch.stack([p[1] for p in parts]), dim=0)
    safe = lse.clamp(min=NEG)  # −∞ rows: every weight below becomes exp(−∞) = 0
    out = sum(torch.exp(l - safe).unsqueeze(-1) * o.float() for o, l in parts)
    return out, lse


def mask_backward(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, lse: Tensor, delta: Tensor, mask: Tensor,
                  scale: float, work: Tensor | None = None, dropped: Tensor | None = None,
                  keep_scale: float = 1.0, whole_rows: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One block's (dq, dk, dv) and ``dS = P ∘ (dP − δ)`` summed over the batch ``[H, rows, keys]``, for
    attention with the additive ``mask`` (−∞ at hidden pairs), from its log-sum-exp and ``δ = rowsum(dO ∘ O)``:
    five matmuls, in place where possible. Measured faster than the fused backward op plus the two
    matmuls ``dS`` would need on top. ``work`` (from :func:`block_work`, reused block after block)
    holds ``P`` and ``dP``: fresh tensors of this size cost their page faults every block; with a batch
    of one the returned ``dS`` is a view of ``work[0]``, valid until the buffer's next use.

    With attention dropout (:mod:`~posbias.kernels.dropout`: ``dropped``, bool ``[B, H, rows, keys]``,
    True where a probability was zeroed, the others multiplied by ``keep_scale = 1/(1 − p)``) the output
    was ``O = (P ∘ Z) V``, ``Z = keep_scale · ¬dropped``: then ``dV = (P ∘ Z)ᵀ dO`` and ``dS = P ∘ (dP ∘ Z − δ)``
    with ``dP = dO Vᵀ``, and ``δ = rowsum(dO ∘ O)`` still (``Σ_j P_ij Z_ij dP_ij = dO_i · O_i``).

    ``whole_rows``: the block holds every key its rows see (toeplitz, blockwise, dropout; not the band
    of ``windowed`` or ``banded``). A block with a large log-sum-exp (beyond :data:`WIDE_LSE`: rows
    whose every key lies far under a steep bias, e.g. queries past a padded sequence's last key) is
    then worked out as a softmax's backward is: ``P`` renormalised over its rows and
    ``δ = Σ_j P_ij dP_ij`` from this ``P``. ``exp(S − lse)`` with a float32 ``lse`` near −600 is off
    by a whole row's factor of up to 3e-5, and a ``δ`` from the forward's output no longer cancels the
    row's ``dP``: q/k/v's gradients were 3.6–60× further from exact attention on the same bias than
    SDPA's math path (now 0.6–1.0×), and KERPLE-power's ``r1``/``r2`` failed 2 of 21,500 fuzzed cases.
    That path costs 1.03–1.10× a training step (t5 1k, kerple-log and fire 2k, when every block takes
    it); below the threshold nothing changes, bit for bit."""
    shape = q.shape[:-1] + k.shape[-2:-1]
    size = shape.numel()
    p_out = dp_out = None
    if work is not None:
        p_out, dp_out = work[0, :size].view(shape), work[1, :size].view(shape)
    qs = q if scale == 1 else q * scale  # the scale on the block's queries, not on its logits: one pass less
    p = torch.matmul(qs, k.transpose(-1, -2), out=p_out).add_(mask)
    # exp(x) as 2^(x·log2 e): torch's float exp (MKL's) slows 30-80× on inputs below about −87, whose
    # results underflow — far pairs under a steep bias, the hidden half of a diagonal block (−∞), a
    # trained KERPLE-power bias everywhere — while exp2 keeps its speed (2M elements, 1 thread: exp
    # 167 ms at −90 and 21 ms at −∞ against 2.3–6.9 ms at −50; exp2 with the multiply 3–5 ms
    # everywhere, measured)
    p = p.sub_(lse.unsqueeze(-1).clamp(min=NEG)).mul_(LOG2E).exp2_()
    # (on a GPU always: reading the lse there would make the host wait, block after block)
    softmax = whole_rows and (lse.device.type != "cpu" or _wide(lse))
    if softmax:  # (rows that see no key: P = 0, left 0)
        total = p.sum(-1, keepdim=True)
        p.mul_(torch.where(total > 0, total.reciprocal(), 0.0))
    if dropped is None:
        dv = torch.matmul(p.transpose(-1, -2), dout)
        dp = torch.matmul(dout, v.transpose(-1, -2), out=dp_out)
    else:  # P ∘ Z in dP's buffer first (its ¬dropped entries; keep_scale on the smaller dV), then dP there
        pz = torch.where(dropped, p.new_zeros(()), p, out=dp_out)
        dv = torch.matmul(pz.transpose(-1, -2), dout).mul_(keep_scale)
        dp = torch.matmul(dout, v.transpose(-1, -2), out=dp_out).masked_fill_(dropped, 0.0).mul_(keep_scale)
    if softmax:
        delta = torch.matmul(p.unsqueeze(-2), dp.unsqueeze(-1)).view(p.shape[:-1])
    ds = p.mul_(dp.sub_(delta.unsqueeze(-1)))
    dq = torch.matmul(ds, k)
    if scale != 1:
        dq.mul_(scale)
    dk = torch.matmul(ds.transpose(-1, -2), qs)
    # batch 1: ``dS`` itself (a view of ``work``; a sum would write a fresh tensor, page faults included)
    return dq, dk, dv, ds[0] if ds.shape[0] == 1 else ds.sum(0)


#: the largest |log-sum-exp| at which :func:`mask_backward` takes ``exp(S − lse)`` as it comes. Measured
#: with a constant bias ``c`` (which changes no probability, only the lse), the largest q/k/v gradient
#: error relative to float64 (toeplitz, 512 tokens): 6e-7 at c = 0, 8.5e-7 at −32, 2.2e-6 at −64, 4.2e-6
#: at −128, 2.8e-5 at −600 (the softmax path: 5.4e-7, 6.3e-7, 9.6e-7, 1.8e-6, 1.6e-5). A row that sees
#: its own key stays well within 64: the demo's models at 64 and 512 tokens reach 10 (KERPLE-log), 14
#: (offset), 23 (FIRE) and 31 (T5, whose logits are unscaled; random q and k of head_dim 64 give it 30–35),
#: so those train on the usual path and pay nothing
WIDE_LSE = 64.0


def _wide(lse: Tensor) -> bool:
    """Whether a finite log-sum-exp of ``lse`` lies beyond ±:data:`WIDE_LSE` (a row that sees no key is −∞)."""
    return bool((lse.abs() > WIDE_LSE).logical_and_(lse > NEG).any())


def backward_rows(q: Tensor, keys: int) -> int:
    """Query rows per block of :func:`mask_backward`: ``P`` and ``dP`` of at most about 16 MB each, so
    the block's passes over them stay in cache, and at most 128, so that causal blocks skip most of
    the hidden half (a block computes its full rectangle up to its last query). Measured (t5 through
    the toeplitz backward, H=8, d=64, 2 threads, fwd+bwd ratio to SDPA, median of 7 pairs): at 4k,
    128 rows → 1.37× vs 512 → 1.94×; at 8k, 64–128 rows → 1.41–1.44× vs 512 → 1.89×; on the
    2026-12-01 machine at 512 / 1k / 2k, 128 rows → 1.18 / 1.22 / 1.46× against 1.73 / 1.62 / 1.70×
    with the 512 / 512 / 256 rows of a 512-row cap (64 rows: 1.25 / 1.41)."""
    return max(64, min(128, (1 << 22) // max(1, q.shape[0] * q.shape[1] * keys)))


def block_work(size: int, device: torch.device) -> Tensor:
    """Two flat float32 scratch buffers of ``size`` elements, allocated once per call and reused by every
    block (``mask_backward``'s ``P`` and ``dP``, a block's bias and its scratch)."""
    return torch.empty(2, size + size % 2, dtype=torch.float32, device=device)  # even: 8-byte aligned rows
