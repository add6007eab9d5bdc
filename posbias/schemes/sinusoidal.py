"""Absolute sinusoidal embeddings added to the input: ``PE[p, 2k] = sin(p / 10000^{2k/d})``,
``PE[p, 2k+1] = cos(p / 10000^{2k/d})`` (Vaswani et al. 2017)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Scheme, check_positive


class Sinusoidal(Scheme):
    name = "sinusoidal"
    family = "absolute"
    summary = "absolute sin/cos vectors added to token embeddings (no attention bias)"
    paper = "Vaswani et al. 2017, Attention Is All You Need"

    def __init__(self, *, n_heads: int, head_dim: int, base: float = 10000.0) -> None:
        super().__init__(n_heads=n_heads, head_dim=head_dim)
        self.base = check_positive("base", base)

    def embed(self, pos: Tensor, dim: int) -> Tensor:
        if dim % 2:
            raise ValueError(f"sinusoidal embeddings need an even model width, got {dim}")
        k = torch.arange(0, dim, 2, device=pos.device, dtype=torch.float64)
        inv = torch.exp(-math.log(self.base) * k / dim)
        ang = pos.to(torch.float64)[:, None] * inv[None, :]
        out = torch.stack([ang.sin(), ang.cos()], dim=-1).reshape(len(pos), dim)
        return out.float()
