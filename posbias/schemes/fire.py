"""FIRE (Li et al. 2023, arXiv 2310.04418): functional interpolation of the bias.

``PE(i, j) = f_θ( ψ(|i − j|) / ψ(max(L, i)) )`` with ``ψ(x) = log(c·x + 1)``, ``c`` learnable (init
0.1), the threshold ``L`` learnable through a multiplier of its initial value (init 512), and
``f_θ`` an MLP ``1 → 32 → ReLU → heads``. Normalising by the query position ("progressive
interpolation") keeps the MLP's input in [0, 1] for every causal pair (j ≤ i) at any length.
FIRE depends on ``i`` as well as on ``i − j``: it is **not** Toeplitz.

As in the reference code, ``|c|`` and ``|L|`` are used so the logs stay defined, and a tiny eps keeps
the denominator away from 0 at ``i = 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Scheme, check_int, check_positive


class FIRE(Scheme):
    name = "fire"
    family = "additive"
    summary = "MLP of log-distance normalised by log of the query position (progressive interpolation)"
    paper = "Li et al. 2023, Functional Interpolation for Relative Positions Improves Long Context Transformers"
    learnable = True

    def __init__(
        self,
        *,
        n_heads: int,
        head_dim: int,
        mlp_width: int = 32,
        init_c: float = 0.1,
        init_L: float = 512.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__(n_heads=n_heads, head_dim=head_dim)
        check_int("mlp_width", mlp_width, minimum=1)
        self.mlp = nn.Sequential(nn.Linear(1, mlp_width), nn.ReLU(), nn.Linear(mlp_width, n_heads))
        self.c = nn.Parameter(torch.tensor(check_positive("init_c", init_c)))
        self.register_buffer("init_L", torch.tensor(check_positive("init_L", init_L)))
        self.L_multiplier = nn.Parameter(torch.tensor(1.0))
        self.eps = check_positive("eps", eps)

    def normalized_distance(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """The MLP's input ``ψ(|i − j|) / ψ(max(L, i))``, ``[len(q_pos), len(k_pos)]`` float32."""
        c = self.c.abs().float()
        threshold = (self.L_multiplier * self.init_L).abs().float()
        # i − j in integers first; the query position itself enters only through a log
        qf = q_pos.to(torch.float64)
        dist = (q_pos[:, None] - k_pos[None, :]).abs().to(torch.float32)
        num = torch.log1p(c * dist)
        den = (torch.log1p(c.double() * torch.maximum(qf, threshold.double())) + self.eps).float()
        return num / den[:, None]

    def bias(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        x = self.normalized_distance(q_pos, k_pos).unsqueeze(-1)
        first, last = self.mlp[0], self.mlp[2]
        # biases are computed in float32 whatever dtype the module was cast to
        h = torch.relu(F.linear(x, first.weight.float(), first.bias.float()))
        return F.linear(h, last.weight.float(), last.bias.float()).permute(2, 0, 1)
