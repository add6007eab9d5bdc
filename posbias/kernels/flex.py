"""The ``flex`` backend: compiled FlexAttention with a scheme's per-offset ``score_mod``.

FlexAttention is imported only when these functions are called; ``import posbias`` never imports
it. On CPU, PyTorch's FlexAttention has no backward pass (forward and inference only), and
compiling it takes seconds per new shape (``dynamic=False``: torch 2.13's dynamic-shape CPU kernel
fails to build after an earlier compile).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..schemes.base import Scheme
from ..schemes.score_mod import offset_table, score_mod


def flex_available() -> bool:
    """True when this PyTorch has ``torch.nn.attention.flex_attention``."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def require_flex():
    """The ``torch.nn.attention.flex_attention`` module, or a ValueError naming the torch version."""
    if not flex_available():
        raise ValueError(f"FlexAttention needs torch.nn.attention.flex_attention (PyTorch >= 2.5); "
                         f"this is torch {torch.__version__}")
    from torch.nn.attention import flex_attention as fa

    return fa


@functools.lru_cache(maxsize=64)
def _cached_block_mask(q_len: int, k_len: int, delta: int, device: str):
    fa = require_flex()

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
    return torch.compile(require_flex().flex_attention, dynamic=False)


def reset_compiled() -> None:
    """Forget every compiled FlexAttention. Each new (scheme, length) compiles anew, and past dynamo's
    recompile limit (8 by default) torch silently runs *eager* FlexAttention, about 10× slower on
    CPU (measured); call this between unrelated shapes, as the benchmark does per cell."""
    torch._dynamo.reset()
    _compiled_flex.cache_clear()


def flex_kernel(q: Tensor, k: Tensor, v: Tensor, scheme: Scheme, *, q_pos: Tensor, k_pos: Tensor, causal: bool,
                scale: float, compile: bool = True) -> Tensor:
    """The ``flex`` backend of :func:`posbias.attention`: contiguous positions, Toeplitz or no bias."""
    fa = require_flex()
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
