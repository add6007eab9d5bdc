"""Helpers shared by the test files."""

import torch

from posbias import build


def randomized(name, **options):
    """A scheme with its learnable parameters moved well away from their initialisation."""
    s = build(name, n_heads=3, head_dim=16, **options)
    with torch.no_grad():
        for p in s.parameters():
            p.add_(torch.randn_like(p) * 0.7)
    return s
