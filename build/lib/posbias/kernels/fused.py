"""One fused attention call with its log-sum-exp, on either device: the building block of the
``banded`` kernel (:mod:`.banded`) and of the ``alibi`` kernel's parts (:mod:`.alibi`).

``forward(q, k, v, scale, causal)`` returns ``(out, lse, aux)``: ``out`` in the inputs' dtype,
``lse`` float32 ``[B, H, Lq]``, and ``aux`` what the matching ``backward`` needs. ``causal`` is the
*bottom-right* mask — query ``r`` of ``Lq`` sees keys ``≤ r + Lk − Lq`` — and callers keep
``Lq ≤ Lk``, so no row is empty (for ``Lq = Lk`` it is the usual causal mask). ``backward(do, q, k,
v, out, lse, aux, scale, causal)`` returns ``(dq, dk, dv)`` for *the ``out`` and ``lse`` it is
given*: called with a merged output and ``lse − c`` it gives one part's share of the gradients of
a larger attention (see :mod:`.flash`).

The ops, from PyTorch's own SDPA:

* CPU: ``_scaled_dot_product_flash_attention_for_cpu``. Its causal flag is top-left, so a
  non-square causal call is two calls merged: every query against the first ``Lk − Lq`` keys, and
  a square causal block on the rest;
* CUDA, fp16/bf16 with ``head_dim`` a multiple of 8 up to 256: the flash kernel,
  ``_scaled_dot_product_flash_attention``, whose causal flag is bottom-right for ``Lq ≠ Lk``
  (``torch.nn.attention.bias`` dispatches ``causal_lower_right`` to it for that reason);
* CUDA otherwise (float32): the memory-efficient kernel, ``_efficient_attention_forward`` in
  ``[B, L, H, D]`` layout with ``custom_mask_type = 2`` (lower right). Its log-sum-exp is padded to
  a multiple of 32 queries, and its backward wants it so.

PyTorch's flash build leaves out flash-attention's ALiBi (``FLASHATTENTION_DISABLE_ALIBI`` in its
CMake) and takes no bias, which is why the bias parts of ``banded`` are computed apart and ``alibi``
carries its bias in extra head dimensions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .flash import flash_backward, flash_forward, merge

LSE_ALIGN = 32  # the memory-efficient kernel pads its log-sum-exp to this many queries


def flash_fits(q: Tensor) -> bool:
    """True when the CUDA flash kernel takes these inputs (half precision, head_dim % 8 == 0, ≤ 256)."""
    return q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256


def forward(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor, tuple]:
    lq, lk = q.shape[2], k.shape[2]
    if q.device.type == "cuda":
        if flash_fits(q):
            out, lse, cq, ck, mq, mk, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
                q, k, v, 0.0, causal, False, scale=scale)
            return out, lse, ("flash", cq, ck, mq, mk, seed, offset)
        out, lse, seed, offset, mq, mk = torch.ops.aten._efficient_attention_forward(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, None, None, None, 0.0,
            2 if causal else 0, True, scale=scale)
        return out.transpose(1, 2), lse[..., :lq], ("efficient", seed, offset, mq, mk)
    if not causal or lq == lk:
        out, lse = flash_forward(q, k, v, scale, causal)
        return out, lse, ("cpu",)
    # bottom-right causal, Lq < Lk: every query sees the first Lk − Lq keys, then a square causal
    # block on the rest; two calls merged exactly, no [Lq, Lk] mask
    out, lse = merge([flash_forward(q, k[:, :, : lk - lq], v[:, :, : lk - lq], scale, False),
                      flash_forward(q, k[:, :, lk - lq:], v[:, :, lk - lq:], scale, True)])
    return out.to(q.dtype), lse, ("cpu",)


def backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, aux: tuple, scale: float,
             causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    do, out, lse = do.contiguous(), out.contiguous(), lse.float().contiguous()
    if aux[0] == "flash":
        _, cq, ck, mq, mk, seed, offset = aux
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            do, q, k, v, out, lse, cq, ck, mq, mk, 0.0, causal, seed, offset, scale=scale)
    if aux[0] == "efficient":
        _, seed, offset, mq, mk = aux
        lq = q.shape[2]
        padded = lse.new_zeros(*lse.shape[:2], -(-lq // LSE_ALIGN) * LSE_ALIGN)
        padded[..., :lq] = lse
        dq, dk, dv, _ = torch.ops.aten._efficient_attention_backward(  # do and out as the forward made out
            do.transpose(1, 2).contiguous(), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None,
            out.transpose(1, 2).contiguous(), None, None, mq, mk, padded, 0.0, seed, offset, 2 if causal else 0,
            False, scale=scale)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
    lq, lk = q.shape[2], k.shape[2]
    if not causal or lq == lk:
        return flash_backward(do, q, k, v, out, lse, scale, causal)
    # the two calls of the forward, each given the merged output and lse: each returns its share
    cut = lk - lq
    dq1, dk1, dv1 = flash_backward(do, q, k[:, :, :cut], v[:, :, :cut], out, lse, scale, False)
    dq2, dk2, dv2 = flash_backward(do, q, k[:, :, cut:], v[:, :, cut:], out, lse, scale, True)
    return dq1 + dq2, torch.cat([dk1, dk2], 2), torch.cat([dv1, dv2], 2)
