"""The one contract every positional scheme implements, and the conventions (SPEC §1).

Conventions, written once:

* positions are 0-based integers; ``i`` is the query position, ``j`` the key position;
* **offset = i − j** (query minus key). Causal attention sees offsets ≥ 0. The canonical T5 code
  uses ``j − i``; that conversion happens in :func:`posbias.t5_bucket` and nowhere else;
* q, k, v are ``[batch, heads, seq, head_dim]``; a bias is ``[heads, len(q_pos), len(k_pos)]`` in
  float32 and broadcasts over the batch;
* the logit is ``scale · q_i·k_j + PE(i, j) + Mask(i, j)``: posbias adds the bias *after* scaling
  (as the canonical ALiBi code does; the textbook puts PE inside the ``/√d``, which differs only by
  a constant factor on the bias). ``scale`` defaults to ``1/√head_dim`` except for T5, which uses
  unscaled logits (Raffel et al. 2020);
* no scheme has a maximum sequence length.

Four families share the contract:

* ``additive``: :meth:`Scheme.bias` returns the bias; Toeplitz schemes (bias depends only on
  ``i − j``) derive from :class:`ToeplitzScheme` and implement :meth:`ToeplitzScheme.bias_at`;
* ``rotary``: :meth:`Scheme.rotate` rotates q and k by their positions;
* ``absolute``: :meth:`Scheme.embed` returns vectors added to the token embeddings;
* ``none``: nothing (NoPE).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

__all__ = ["Scheme", "ToeplitzScheme", "check_bool", "check_int", "check_positive"]

FAMILIES = ("additive", "rotary", "absolute", "none")


def check_int(name: str, value: object, *, minimum: int, hint: str = "") -> int:
    """Validate an integer hyper-parameter; the error names the value and the valid range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}{hint}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}{hint}")
    return value


def check_bool(name: str, value: object) -> bool:
    """Validate a boolean option: a real bool (the string ``"false"`` is truthy in Python)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_positive(name: str, value: object) -> float:
    """Validate a strictly positive finite float hyper-parameter."""
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite number (> 0), got {value!r}")
    return v


def flat_share(start: int, length: int) -> float:
    """Share of the causal query–key pairs of a ``length``-token window (``i ≥ j``) whose offset is
    ``≥ start``: the pairs that a final T5 bucket or a clipped offset entry starting at ``start`` sees."""
    if start >= length:
        return 0.0
    far = length - max(start, 0)
    return far * (far + 1) / (length * (length + 1))


def as_positions(pos: Tensor | None, length: int, device: torch.device, *, start: int = 0) -> Tensor:
    """Positions as a 1-D int64 tensor; ``arange(start, start+length)`` when ``pos`` is None."""
    if pos is None:
        return torch.arange(start, start + length, device=device)
    pos = torch.as_tensor(pos, device=device)
    if pos.dim() != 1 or pos.numel() != length:
        raise ValueError(f"positions must be a 1-D tensor of length {length}, got shape {tuple(pos.shape)}")
    if pos.dtype.is_floating_point:
        raise ValueError(f"positions must be integers, got dtype {pos.dtype}")
    return pos.long()


class Scheme(nn.Module):
    """Base class of every positional scheme. Subclasses are final; hyper-parameters are keyword-only.

    Class attributes describe the scheme for the registry, the CLI, the plots and the kernels.
    """

    name: ClassVar[str]
    family: ClassVar[str]
    summary: ClassVar[str]  # one line for `posbias list`
    paper: ClassVar[str]  # citation for the README table
    toeplitz: ClassVar[bool] = False  # bias depends on i − j only
    learnable: ClassVar[bool] = False
    unscaled: ClassVar[bool] = False  # T5: logits are not divided by √head_dim

    def __init__(self, *, n_heads: int, head_dim: int) -> None:
        super().__init__()
        self.n_heads = check_int("n_heads", n_heads, minimum=1)
        self.head_dim = check_int("head_dim", head_dim, minimum=1)

    # -- scale --------------------------------------------------------------------------------
    def default_scale(self) -> float:
        """Multiplier of ``q·k``: 1 for T5 (SPEC §2.2, unscaled), ``1/√head_dim`` otherwise."""
        return 1.0 if self.unscaled else 1.0 / math.sqrt(self.head_dim)

    # -- additive -----------------------------------------------------------------------------
    def bias(self, q_pos: Tensor, k_pos: Tensor) -> Tensor | None:
        """``[heads, len(q_pos), len(k_pos)]`` float32 bias, or None for non-additive schemes."""
        return None

    # -- rotary -------------------------------------------------------------------------------
    def rotate(self, x: Tensor, pos: Tensor, *, context_len: int | None = None) -> Tensor:
        """Rotate ``x [..., seq, head_dim]`` by positions ``pos``; identity for other families."""
        return x

    # -- absolute -----------------------------------------------------------------------------
    def embed(self, pos: Tensor, dim: int) -> Tensor | None:
        """``[len(pos), dim]`` vectors added to token embeddings, or None."""
        return None

    @classmethod
    def study_defaults(cls, train_len: int, options: dict) -> dict:
        """Options the length study uses for this scheme at training length ``train_len`` unless the
        user sets them (``options`` are the user's). Default: the class defaults, nothing added."""
        return {}

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, head_dim={self.head_dim}"


class ToeplitzScheme(Scheme):
    """An additive bias that depends on the offset ``i − j`` only: ``PE(i, j) = g_h(i − j)``.

    Subclasses implement :meth:`bias_at`; :meth:`bias` follows. Fast kernels use two more facts:
    :meth:`bias_at` needs O(length) numbers for a whole ``[N, N]`` bias, and :attr:`flat_beyond`
    (when not None) is an offset ``w ≥ 0`` with ``g(o) = g(w)`` for every ``o ≥ w`` and
    ``g(−o) = g(−w)`` for every ``o ≥ w`` (the bias is constant outside a band of width ``w``).
    """

    family: ClassVar[str] = "additive"
    toeplitz: ClassVar[bool] = True

    def bias_at(self, offset: Tensor) -> Tensor:
        """``[heads, *offset.shape]`` float32 bias for integer offsets ``i − j`` of any shape."""
        raise NotImplementedError

    @property
    def flat_beyond(self) -> int | None:
        return None

    @property
    def linear_slopes(self) -> Tensor | None:
        """``m_h`` when the bias is exactly ``−m_h·(i − j)`` for every offset (causal ALiBi), else None."""
        return None

    def bias(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        return self.bias_at(q_pos[:, None] - k_pos[None, :])

    def score_mod(self, q_len: int, k_len: int, *, q_start: int | None = None, k_start: int = 0):
        """A FlexAttention ``score_mod`` reading a ``[heads, q_len + k_len − 1]`` per-offset table
        (O(N) memory); see :mod:`posbias.integrations.flex`. Queries default to the end of the keys."""
        from ..integrations.flex import score_mod

        return score_mod(self, q_len, k_len, q_start=q_start, k_start=k_start)
