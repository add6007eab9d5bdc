"""KERPLE (Chi et al. 2022): conditionally positive definite kernels of the distance.

``kerple-log``:   ``PE = −r1 · log(1 + r2 · |i − j|)``
``kerple-power``: ``PE = −r1 · |i − j|^r2``  with ``0 < r2 ≤ 2``

``r1, r2`` are learnable per head and kept positive by clamping in the forward pass, as the
reference code does (clamp at ``eps``; ``r2 ≤ 2`` for the power kernel). The distance is ``|i − j|``
for both directions, as in the reference implementation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import ToeplitzScheme, bias_float

_EPS = 1e-2  # reference code's clamp floor


class _Kerple(ToeplitzScheme):
    learnable = True
    paper = "Chi et al. 2022, KERPLE: Kernelized Relative Positional Embedding for Length Extrapolation"

    def __init__(self, *, n_heads: int, head_dim: int) -> None:
        super().__init__(n_heads=n_heads, head_dim=head_dim)
        # reference initialisation: r1 ~ U(0, 2), r2 ~ U(0, 1) (deterministic under torch.manual_seed)
        self.r1 = nn.Parameter(torch.rand(n_heads) * 2)
        self.r2 = nn.Parameter(torch.rand(n_heads))

    def params(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def kernel(self, dist: Tensor, r1: Tensor, r2: Tensor) -> Tensor:
        raise NotImplementedError

    def bias_at(self, offset: Tensor) -> Tensor:
        r1, r2 = (bias_float(p) for p in self.params())
        shape = (-1,) + (1,) * offset.dim()
        dist = offset.abs().to(r1.dtype).unsqueeze(0)
        return self.kernel(dist, r1.view(shape), r2.view(shape))


class KerpleLog(_Kerple):
    name = "kerple-log"
    summary = "learned logarithmic penalty -r1*log(1+r2*|i-j|) per head"

    def params(self) -> tuple[Tensor, Tensor]:
        return self.r1.clamp(min=_EPS), self.r2.clamp(min=_EPS)

    def kernel(self, dist: Tensor, r1: Tensor, r2: Tensor) -> Tensor:
        return -r1 * torch.log1p(r2 * dist)


class KerplePower(_Kerple):
    name = "kerple-power"
    summary = "learned power penalty -r1*|i-j|^r2 per head, 0 < r2 <= 2"
    in_study = False  # the study runs KERPLE's log variant, the one Chi et al. recommend

    def params(self) -> tuple[Tensor, Tensor]:
        return self.r1.clamp(min=_EPS), self.r2.clamp(min=_EPS, max=2.0)

    def kernel(self, dist: Tensor, r1: Tensor, r2: Tensor) -> Tensor:
        # d^r2 has an infinite r2-gradient at d = 0 (0 · log 0): evaluate at d ≥ 1 and zero it there
        pos = dist > 0
        return -r1 * torch.where(pos, dist.clamp(min=1.0).pow(r2), torch.zeros_like(dist))
