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

    def describe(self, query_pos: int | None = None) -> list[str]:
        """``posbias show sinusoidal``: the wavelengths of the embedding's pairs and what attention can read
        of position from it, the similarity ``PE(i)·PE(j)/(d/2) = mean_k cos(ω_k (i − j))``, which
        depends on ``i − j`` alone, by distance."""
        dim = self.n_heads * self.head_dim
        dist = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
        emb = self.embed(torch.tensor([0, *dist]), dim).double()
        # position 0 against position d: (sin 0, cos 0) = (0, 1) in every pair, so the sum is Σ_k cos(ω_k d)
        sim = (emb[1:] @ emb[0]) / (dim // 2)
        return [f"embedding of width {dim} (heads × head_dim) added to the tokens: {dim // 2} sin/cos pairs, "
                f"wavelengths 2π·{self.base:g}^(2k/{dim}) from {2 * math.pi:.2f} to "
                f"{2 * math.pi * self.base ** ((dim - 2) / dim):,.0f} tokens",
                "similarity PE(i)·PE(j) / (d/2) by distance i-j (the same at every i; 1 at distance 0)",
                "     " + "".join(f"{d:>9}" for d in dist),
                "     " + "".join(f"{x:>9.3f}" for x in sim.tolist())]
