"""Plain, obviously correct attention: dense logits, dense bias, mask, softmax (float32).

``out_i = Σ_j softmax_j(scale · q_i·k_j + PE(i, j) + Mask(i, j)) · v_j``, with Mask = −∞ where
``j > i`` in causal attention. A row with no visible key returns 0 (never NaN), and its gradients
are 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..positions import highest, lowest
from ..schemes.base import Scheme


def hides_nothing(q_pos: Tensor, k_pos: Tensor) -> bool:
    """True when the causal mask hides no pair: no key comes after the first query (a decoding step)."""
    return len(q_pos) == 0 or len(k_pos) == 0 or highest(k_pos) <= lowest(q_pos)


def every_row_sees_a_key(q_pos: Tensor, k_pos: Tensor, causal: bool) -> bool:
    """True when no query row is left without a visible key (the fused kernels would give it NaN)."""
    return not causal or len(q_pos) == 0 or (len(k_pos) > 0 and lowest(q_pos) >= lowest(k_pos))


def ungrouped(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Grouped keys and values (``attention(..., enable_gqa=True)``: ``[B, Hk, L, D]`` with ``Hk``
    dividing q's heads) as one head per query head: query head ``h`` reads head ``h // (H / Hk)``, as
    ``scaled_dot_product_attention(..., enable_gqa=True)`` (``repeat_interleave``) does. A copy, for the
    paths that need one head per query head; autograd sums the copies' gradients back onto the shared
    head. Multi-head k and v are returned as they are."""
    heads = q.shape[1]
    if k.shape[1] == heads:
        return k, v
    b, hk, n, d = k.shape
    return tuple(t[:, :, None].expand(b, hk, heads // hk, n, d).reshape(b, heads, n, d) for t in (k, v))


def visible(q_pos: Tensor, k_pos: Tensor, causal: bool) -> Tensor | None:
    """Boolean ``[Lq, Lk]`` of visible pairs (``j ≤ i``), or None when everything is visible."""
    if not causal or hides_nothing(q_pos, k_pos):
        return None
    return k_pos[None, :] <= q_pos[:, None]


def dense_probs(q: Tensor, k: Tensor, bias: Tensor | None, mask: Tensor | None, scale: float) -> Tensor:
    """Float32 attention probabilities ``[B, H, Lq, Lk]`` from an explicit dense bias and mask
    (rows with no visible key are 0). The logits are scaled, biased and masked in place: autograd allows
    it (the product's backward reads q and k, not the product) and a ``[B, H, Lq, Lk]`` buffer is not
    allocated three more times (a diagnosis's hooked forward at N = 4,096 with 4 heads: 1.3 → 0.85 s)."""
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(scale)
    if bias is not None:
        logits.add_(bias.float())
    if mask is not None:
        # a finite floor (not −inf) keeps fully masked rows free of NaN in forward and backward
        logits.masked_fill_(~mask, torch.finfo(torch.float32).min)
    p = torch.softmax(logits, dim=-1)
    if mask is not None:
        p = p * mask.any(dim=-1, keepdim=True)
    return p


def dense_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, mask: Tensor | None,
                    scale: float) -> Tensor:
    """Attention with an explicit dense bias ``[H, Lq, Lk]`` and visibility mask ``[Lq, Lk]``."""
    return torch.matmul(dense_probs(q, k, bias, mask, scale), v.float()).to(q.dtype)


def reference_probs(q: Tensor, k: Tensor, scheme: Scheme, *, q_pos: Tensor, k_pos: Tensor, causal: bool,
                    scale: float) -> Tensor:
    return dense_probs(q, k, scheme.bias(q_pos, k_pos), visible(q_pos, k_pos, causal), scale)


def reference_kernel(q: Tensor, k: Tensor, v: Tensor, scheme: Scheme, *, q_pos: Tensor, k_pos: Tensor,
                     causal: bool, scale: float) -> Tensor:
    return dense_attention(q, k, v, scheme.bias(q_pos, k_pos), visible(q_pos, k_pos, causal), scale)
