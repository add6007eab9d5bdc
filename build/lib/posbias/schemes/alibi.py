"""ALiBi (Press et al. 2022): a fixed linear penalty ``PE(i, j) = −m_h · (i − j)``.

Causal attention uses ``−m_h · (i − j)`` as written (the masked upper triangle then holds positive
values that the mask removes); ``symmetric=True`` gives ``−m_h · |i − j|`` for bidirectional use.
Slopes: for ``n`` heads, ``n`` a power of two, ``m_k = 2^(−8k/n)``, k = 1..n; otherwise the slopes of
the largest power of two ``p < n`` followed by every other slope (1st, 3rd, …) of the ``2p`` sequence.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import ToeplitzScheme, check_bool, check_int

__all__ = ["ALiBi", "alibi_slopes"]


def _power_of_two_slopes(n: int) -> list[float]:
    return [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]


def alibi_slopes(n_heads: int) -> Tensor:
    """Head slopes of Press et al. (2022) as a float32 tensor ``[n_heads]`` (8 heads: 1/2 … 1/256)."""
    check_int("n_heads", n_heads, minimum=1)
    p = 2 ** int(math.floor(math.log2(n_heads)))
    slopes = _power_of_two_slopes(p)
    if p < n_heads:
        slopes += _power_of_two_slopes(2 * p)[0::2][: n_heads - p]
    return torch.tensor(slopes, dtype=torch.float32)


class ALiBi(ToeplitzScheme):
    name = "alibi"
    summary = "fixed linear penalty -m_h*(i-j), geometric head slopes 2^(-8k/n)"
    paper = "Press et al. 2022, Train Short, Test Long (ALiBi)"

    def __init__(self, *, n_heads: int, head_dim: int, symmetric: bool = False) -> None:
        super().__init__(n_heads=n_heads, head_dim=head_dim)
        self.symmetric = check_bool("symmetric", symmetric)
        self.register_buffer("slopes", alibi_slopes(n_heads), persistent=False)

    @property
    def linear_slopes(self) -> Tensor | None:
        return None if self.symmetric else self.slopes

    def bias_at(self, offset: Tensor) -> Tensor:
        o = offset.to(torch.float32)
        if self.symmetric:
            o = o.abs()
        return -self.slopes.view(-1, *([1] * offset.dim())) * o

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, symmetric={self.symmetric}"
