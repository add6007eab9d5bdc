"""NoPE: no positional signal at all (the causal mask alone orders the tokens)."""

from __future__ import annotations

from .base import Scheme


class NoPE(Scheme):
    name = "nope"
    family = "none"
    summary = "no positional signal; only the causal mask carries order"
    paper = "Kazemnejad et al. 2023, The Impact of Positional Encoding on Length Generalization"
