"""The ``flex`` backend: compiled FlexAttention with a scheme's ``score_mod``.

FlexAttention is imported only when these functions are called; ``import posbias`` never imports
it. On CPU, PyTorch's FlexAttention has no backward pass (forward and inference only), and
compiling it takes seconds per new shape (``dynamic=False``: torch 2.13's dynamic-shape CPU kernel
fails to build after an earlier compile).

Shapes are therefore bucketed: the kernel sees queries and keys padded to :func:`length_bucket`
(four lengths per octave), the padded keys hidden by the block mask and the padded query rows
dropped, and everything that changes from call to call within a bucket (where the queries start,
how many keys are real) reaches the compiled kernel as tensor data, never as a Python constant it
would guard on. Decoding, one more key per step, compiles once per bucket instead of once per step
(which, past dynamo's limit of 8 recompilations, silently fell back to eager FlexAttention: 165 ms
per step at 2k keys on CPU, measured).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..positions import first
from ..schemes.base import Scheme


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


def length_bucket(n: int) -> int:
    """The length the compiled kernel sees for ``n`` queries or keys: ``n`` rounded up to a power of
    two up to 128, above that to a multiple of a quarter of its octave (129 → 160, 2000 → 2048,
    2049 → 2560): at most 25% padding, four compiled shapes per doubling of the length."""
    n = int(n)
    if n <= 128:
        return 1 << max(0, n - 1).bit_length()
    step = 1 << (n.bit_length() - 3)  # a quarter of the octave [2^e, 2^(e+1)) that holds n
    return -(-n // step) * step


@functools.lru_cache(maxsize=64)
def _padded_block_mask(q_pad: int, k_pad: int, delta: int, k_len: int, causal: bool, device: str):
    """The block mask over the padded shape: keys at or past ``k_len`` hidden and, when causal, query
    ``i`` sees keys ``j ≤ i + delta``. ``delta`` and ``k_len`` are captured as tensors, so the
    compiled kernel does not specialise on them."""
    fa = require_flex()
    limits = torch.tensor([delta, k_len], device=device)

    def visible(b, h, q_idx, kv_idx):
        real = kv_idx < limits[1]
        return real & (q_idx + limits[0] >= kv_idx) if causal else real

    return fa.create_block_mask(visible, None, None, q_pad, k_pad, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    return torch.compile(require_flex().flex_attention, dynamic=False)


def reset_compiled() -> None:
    """Forget every compiled FlexAttention. Each new (scheme, length bucket) compiles anew, and past
    dynamo's recompile limit (8 by default; raised to 64 for this kernel's own calls) torch silently
    runs *eager* FlexAttention, about 10× slower on CPU (measured); the benchmark calls this before
    each cell."""
    torch._dynamo.reset()
    _compiled_flex.cache_clear()


RECOMPILE_LIMIT = 64  # compiled shapes kept for this kernel: 16 octaves of length buckets

# ``kernel_options`` handed to FlexAttention on CUDA (None: PyTorch's defaults). On an H200 with torch 2.11
# (2026-12-04) the default configuration for a table score_mod in bf16 at head_dim 64 needed 245,760 bytes of
# shared memory, more than the 232,448 there, and did not compile; {"BLOCK_M": 64, "BLOCK_N": 64} compiled
# (forward 2.60x unbiased SDPA at 8k). Left at None until a GPU run has measured training with a setting
# (``benchmarks/bench_cuda_candidates.py --flex-options``), as issue 12 asks of every CUDA path.
CUDA_KERNEL_OPTIONS: dict | None = None


def kernel_options(device_type: str) -> dict:
    """The extra keyword arguments for FlexAttention on a device: ``kernel_options`` on CUDA where
    :data:`CUDA_KERNEL_OPTIONS` is set, none elsewhere (PyTorch's defaults)."""
    return {"kernel_options": dict(CUDA_KERNEL_OPTIONS)} if CUDA_KERNEL_OPTIONS and device_type == "cuda" else {}


def _pad_to(x: Tensor, length: int) -> Tensor:
    """``x`` padded with zeros along the sequence to ``length``, always contiguous: the compiled
    kernel guards on strides, and a cache's slice at an exact bucket length would compile anew."""
    if x.shape[2] == length:
        return x.contiguous()
    return torch.nn.functional.pad(x, (0, 0, 0, length - x.shape[2]))


def flex_kernel(q: Tensor, k: Tensor, v: Tensor, scheme: Scheme, *, q_pos: Tensor, k_pos: Tensor, causal: bool,
                scale: float, compile: bool = True) -> Tensor:
    """The ``flex`` backend of :func:`posbias.attention`: contiguous positions; a scheme with a
    ``score_mod`` (every Toeplitz scheme: a per-offset table; FIRE: its MLP per pair) or no bias.
    Lengths are padded to :func:`length_bucket` (module docstring); exact, the padding is masked."""
    fa = require_flex()
    lq, lk = q.shape[2], k.shape[2]
    q_pad, k_pad = length_bucket(lq), length_bucket(lk)
    q0, k0 = first(q_pos), first(k_pos)
    mod = None
    if scheme.family == "additive":
        # no backward on CPU: keep autograd out of what the score_mod captures
        with torch.set_grad_enabled(torch.is_grad_enabled() and q.device.type != "cpu"):
            mod = scheme.score_mod(q_pad, k_pad, q_start=q0, k_start=k0)
    mask = None
    if causal or k_pad != lk:
        mask = _padded_block_mask(q_pad, k_pad, q0 - k0, lk, causal, str(q.device))
    if q.device.type == "cpu" and not torch.is_grad_enabled():  # it refuses inputs that require grad on CPU
        q, k, v = q.detach(), k.detach(), v.detach()
    q, k, v = _pad_to(q, q_pad), _pad_to(k, k_pad), _pad_to(v, k_pad)
    options = kernel_options(q.device.type)
    if not compile:
        return fa.flex_attention(q, k, v, score_mod=mod, block_mask=mask, scale=scale, **options)[:, :, :lq]
    # (torch 2.6 names the setting cache_size_limit)
    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    with torch._dynamo.config.patch(**{name: max(getattr(torch._dynamo.config, name), RECOMPILE_LIMIT)}):
        return _compiled_flex()(q, k, v, score_mod=mod, block_mask=mask, scale=scale, **options)[:, :, :lq]
