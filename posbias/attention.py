"""``attention(q, k, v, scheme, ...)``: the one entry point, and the backend choice in one place.

The logit is ``scale · q_i·k_j + PE(i, j) + Mask(i, j)`` (SPEC §1): the bias is added after
scaling; ``scale`` defaults to ``scheme.default_scale()`` — 1 for T5 (unscaled, Raffel et al. 2020),
``1/√head_dim`` otherwise. Positions default to the keys ``0 … Lk−1`` and the queries aligned to the
*end* of the keys (``Lk−Lq … Lk−1``), which is what decoding with a cache needs.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .kernels.reference import reference_kernel
from .schemes.base import Scheme, as_positions

Kernel = Callable[..., Tensor]


def resolve(q: Tensor, k: Tensor, v: Tensor, scheme: Scheme, *, q_pos: Tensor | None,
            k_pos: Tensor | None, scale: float | None) -> tuple[Tensor, Tensor, Tensor, Tensor, float]:
    """Validate shapes, resolve positions and scale, and rotate q/k for rotary schemes."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [batch, heads, seq, head_dim]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape[:3] + k.shape[3:] or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] != scheme.n_heads:
        raise ValueError(f"q has {q.shape[1]} heads but the scheme was built for n_heads={scheme.n_heads}")
    if scheme.family == "rotary" and q.shape[-1] != scheme.head_dim:
        raise ValueError(f"q has head_dim {q.shape[-1]} but the scheme was built for head_dim={scheme.head_dim}")
    lq, lk = q.shape[2], k.shape[2]
    k_pos = as_positions(k_pos, lk, q.device)
    q_pos = as_positions(q_pos, lq, q.device, start=lk - lq)
    if scheme.family == "rotary":
        context = int(max(int(k_pos.max()), int(q_pos.max())) + 1) if lk and lq else 0
        q = scheme.rotate(q, q_pos, context_len=context)
        k = scheme.rotate(k, k_pos, context_len=context)
    return q, k, q_pos, k_pos, scheme.default_scale() if scale is None else float(scale)


def attention_reference(q: Tensor, k: Tensor, v: Tensor, scheme: Scheme, *, causal: bool = True,
                        scale: float | None = None, q_pos: Tensor | None = None,
                        k_pos: Tensor | None = None) -> Tensor:
    """The plain dense reference every fast path is tested against."""
    q, k, q_pos, k_pos, scale = resolve(q, k, v, scheme, q_pos=q_pos, k_pos=k_pos, scale=scale)
    return reference_kernel(q, k, v, scheme, q_pos=q_pos, k_pos=k_pos, causal=causal, scale=scale)


BACKENDS: dict[str, Kernel] = {"reference": reference_kernel}


def choose_backend(scheme: Scheme, q: Tensor, k: Tensor, *, causal: bool) -> str:
    """The automatic backend choice (the only place that decides)."""
    return "reference"


def attention(q: Tensor, k: Tensor, v: Tensor, scheme: Scheme, *, causal: bool = True,
              scale: float | None = None, q_pos: Tensor | None = None, k_pos: Tensor | None = None,
              backend: str = "auto") -> Tensor:
    """Exact attention with a positional scheme; ``[batch, heads, Lq, head_dim]`` out.

    ``backend="auto"`` picks the fastest exact path for the scheme and inputs; any name in
    :data:`BACKENDS` forces that path (all are exact against ``"reference"``).
    """
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: auto, {', '.join(BACKENDS)}")
    q, k, q_pos, k_pos, scale = resolve(q, k, v, scheme, q_pos=q_pos, k_pos=k_pos, scale=scale)
    name = choose_backend(scheme, q, k, causal=causal) if backend == "auto" else backend
    return BACKENDS[name](q, k, v, scheme, q_pos=q_pos, k_pos=k_pos, causal=causal, scale=scale)
