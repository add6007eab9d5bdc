"""FlexAttention export: a ``score_mod`` that reads a per-offset table, for any Toeplitz scheme.

A Toeplitz bias (SPEC §1: ``PE(i, j) = g_h(i − j)``) over ``Lq`` queries and ``Lk`` keys takes only
``Lq + Lk − 1`` distinct offsets, so the ``score_mod`` captures one ``[heads, Lq + Lk − 1]`` float32
table — O(N) memory, never an ``[N, N]`` tensor — and indexes it with ``q_idx − kv_idx + Lk − 1``.
Queries may start later than the keys (decoding with a cache): ``q_start`` (default ``Lk − Lq``,
queries aligned to the end of the keys, as in :func:`posbias.attention`) is folded into the table.

Use it directly with PyTorch's FlexAttention in your own model::

    from torch.nn.attention.flex_attention import flex_attention
    score_mod = scheme.score_mod(q_len, k_len)             # any ToeplitzScheme
    out = flex_attention(q, k, v, score_mod=score_mod, block_mask=causal_block_mask(q_len, k_len),
                         scale=scheme.default_scale())      # T5: unscaled (scale 1)

or through posbias: ``posbias.attention(..., backend="flex")``. FlexAttention is imported only when
these functions are called; ``import posbias`` never imports it. On CPU, PyTorch's FlexAttention
has no backward pass (forward and inference only), and compiling it takes seconds per new shape.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor

__all__ = ["offset_table", "score_mod", "causal_block_mask", "flex_available", "flex_kernel"]

ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def flex_available() -> bool:
    """True when this PyTorch has ``torch.nn.attention.flex_attention``."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _require_flex():
    if not flex_available():
        raise ValueError(f"FlexAttention needs torch.nn.attention.flex_attention (PyTorch >= 2.5); "
                         f"this is torch {torch.__version__}")
    from torch.nn.attention import flex_attention as fa

    return fa


def offset_table(scheme, q_len: int, k_len: int, *, q_start: int | None = None, k_start: int = 0,
                 device: torch.device | str | None = None) -> Tensor:
    """``[heads, q_len + k_len − 1]`` float32 bias: entry ``t`` is the bias at offset
    ``(q_start − k_start) + t − (k_len − 1)``, i.e. at ``q_idx − kv_idx`` for ``t = q_idx − kv_idx + k_len − 1``."""
    from ..schemes.base import ToeplitzScheme, check_int

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
    return scheme.bias_at(offsets).float()


def score_mod(scheme, q_len: int, k_len: int, *, q_start: int | None = None, k_start: int = 0,
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


@functools.lru_cache(maxsize=64)
def _cached_block_mask(q_len: int, k_len: int, delta: int, device: str):
    fa = _require_flex()

    def causal(b, h, q_idx, kv_idx):
        return q_idx + delta >= kv_idx

    return fa.create_block_mask(causal, None, None, q_len, k_len, device=device)


def causal_block_mask(q_len: int, k_len: int, *, q_start: int | None = None, k_start: int = 0,
                      device: torch.device | str = "cpu"):
    """Cached causal ``BlockMask`` (query ``i`` sees keys ``j ≤ i`` in absolute positions)."""
    q_start = k_len - q_len if q_start is None else int(q_start)
    return _cached_block_mask(int(q_len), int(k_len), q_start - int(k_start), str(torch.device(device)))


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    return torch.compile(_require_flex().flex_attention, dynamic=False)


def flex_kernel(q: Tensor, k: Tensor, v: Tensor, scheme, *, q_pos: Tensor, k_pos: Tensor, causal: bool,
                scale: float, compile: bool = True) -> Tensor:
    """The ``flex`` backend of :func:`posbias.attention`: contiguous positions, Toeplitz or no bias."""
    fa = _require_flex()
    lq, lk = q.shape[2], k.shape[2]
    q0, k0 = int(q_pos[0]), int(k_pos[0])
    mod = None
    if scheme.family == "additive":
        table = offset_table(scheme, lq, lk, q_start=q0, k_start=k0, device=q.device)
        if q.device.type == "cpu":  # no backward on CPU: keep autograd out of the captured table
            table = table.detach()
        mod = score_mod(scheme, lq, lk, table=table)
    mask = causal_block_mask(lq, lk, q_start=q0, k_start=k0, device=q.device) if causal else None
    fn = _compiled_flex() if compile else fa.flex_attention
    if q.device.type == "cpu" and not torch.is_grad_enabled():  # it refuses inputs that require grad on CPU
        q, k, v = q.detach(), k.detach(), v.detach()
    return fn(q, k, v, score_mod=mod, block_mask=mask, scale=scale)
