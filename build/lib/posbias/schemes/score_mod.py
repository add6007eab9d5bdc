"""A Toeplitz bias as a per-offset table, and the FlexAttention ``score_mod`` that reads it.

A Toeplitz bias ``PE(i, j) = g_h(i − j)`` over ``Lq`` queries and ``Lk`` keys takes only
``Lq + Lk − 1`` distinct offsets, so a ``score_mod`` needs one ``[heads, Lq + Lk − 1]`` float32
table — O(N) memory, never an ``[N, N]`` tensor — indexed by ``q_idx − kv_idx + Lk − 1``. Queries
may start later than the keys (decoding with a cache): ``q_start`` (default ``Lk − Lq``, queries
aligned to the end of the keys, as in :func:`posbias.attention`) is folded into the table.

Pure tensor code: nothing here imports FlexAttention (the compiled kernel is
:mod:`posbias.kernels.flex`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .base import ToeplitzScheme, check_int

ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def offset_table(scheme: ToeplitzScheme, q_len: int, k_len: int, *, q_start: int | None = None, k_start: int = 0,
                 device: torch.device | str | None = None) -> Tensor:
    """``[heads, q_len + k_len − 1]`` float32 bias: entry ``t`` is the bias at offset
    ``(q_start − k_start) + t − (k_len − 1)``, i.e. at ``q_idx − kv_idx`` for ``t = q_idx − kv_idx + k_len − 1``."""
    if not isinstance(scheme, ToeplitzScheme):
        raise ValueError(f"a per-offset score_mod needs a Toeplitz scheme (bias depends on i − j only); "
                         f"{type(scheme).__name__} is not one")
    check_int("q_len", q_len, minimum=1)
    check_int("k_len", k_len, minimum=1)
    q_start = k_len - q_len if q_start is None else int(q_start)
    if device is None:
        device = next((b.device for b in list(scheme.parameters()) + list(scheme.buffers())), torch.device("cpu"))
    shift = (q_start - int(k_start)) - (k_len - 1)
    offsets = torch.arange(shift, shift + q_len + k_len - 1, device=device)
    return scheme.bias_at(offsets).float().contiguous()


def score_mod(scheme: ToeplitzScheme, q_len: int, k_len: int, *, q_start: int | None = None, k_start: int = 0,
              table: Tensor | None = None) -> ScoreMod:
    """A FlexAttention ``score_mod`` adding ``scheme``'s bias ``g_h(i − j)`` from a per-offset table.

    ``q_start``/``k_start`` are the absolute positions of the first query and key (default: queries
    aligned to the end of the keys). Gradients reach the scheme's parameters through the table where
    FlexAttention has a backward pass (CUDA).
    """
    if table is None:
        table = offset_table(scheme, q_len, k_len, q_start=q_start, k_start=k_start)
    base = k_len - 1

    def mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score + table[h, q_idx - kv_idx + base]

    return mod
