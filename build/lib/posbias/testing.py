"""The rule a fast path is held to in half precision, in one place: the test suite
(``tests/_helpers.within_reference_rounding``) and ``benchmarks/bench_precision.py`` both judge by it.

In bfloat16 or float16 no path is exact, the reference included. A path is judged by the reference run
in the same precision: against the float32 truth (the same rounded inputs, computed in float32), its
output and q/k/v gradients may be at most twice as far off as the reference's own, plus one unit of
the format's precision times the largest value of the truth.

>>> import torch, posbias
>>> from posbias.testing import rounding_errors, rule_holds
>>> errors = rounding_errors(posbias.build("alibi", n_heads=3, head_dim=16), torch.bfloat16, lq=8, lk=64)
>>> rule_holds(errors)
True
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .attention import attention, attention_reference
from .schemes import Scheme

__all__ = ["rounding_errors", "rule_holds"]


def rounding_errors(scheme: Scheme, dtype: torch.dtype, *, lq: int, lk: int, device: str | torch.device = "cpu",
                    heads: int = 3, head_dim: int = 16, grad: bool = True,
                    run: Callable[..., Tensor] = attention, **kw) -> list[tuple[float, float, float]]:
    """``(path error, reference error, allowance)`` for the output and, with ``grad``, the q, k and v
    gradients (under one random output gradient): each error is the largest distance to the truth, the
    allowance one unit of ``dtype`` times the truth's largest magnitude. q, k, v of std 2 are drawn in
    ``dtype`` from torch's global generator, ``lq`` queries at the end of ``lk`` keys; the path is
    ``run(q, k, v, scheme, **kw)`` (by default :func:`posbias.attention`, ``kw`` a forced backend, say),
    computed without autograd where ``grad`` is False (the inference paths). ValueError where the path
    returns another dtype than its inputs'."""
    scheme = scheme.to(device)
    low = [(torch.randn(1, heads, n, head_dim, device=device) * 2).to(dtype).requires_grad_(grad) for n in (lq, lk, lk)]
    exact = [t.detach().float().requires_grad_(grad) for t in low]
    g = torch.randn(1, heads, lq, head_dim, device=device)
    results = []
    for fn, inputs, extra in ((run, low, kw), (attention_reference, low, {}), (attention_reference, exact, {})):
        with torch.set_grad_enabled(grad):
            out = fn(*inputs, scheme, **extra)
        results.append([out, *(torch.autograd.grad((out.float() * g).sum(), inputs) if grad else [])])
    if results[0][0].dtype != dtype:
        raise ValueError(f"the path returned {results[0][0].dtype} for {dtype} inputs")
    unit = torch.finfo(dtype).eps
    errors = []
    for fast, ref, truth in zip(*results):
        truth = truth.detach().double()
        err = lambda x: (x.detach().double() - truth).abs().max().item()  # noqa: E731
        errors.append((err(fast), err(ref), unit * truth.abs().max().item()))
    return errors


def rule_holds(errors: list[tuple[float, float, float]]) -> bool:
    """Whether every tensor's error is at most twice the reference's plus its allowance."""
    return all(fast <= 2 * ref + allowance for fast, ref, allowance in errors)
