"""The registry of positional schemes: the single source of scheme names.

Adding a scheme is one file in this folder and one line in :data:`SCHEMES`; the CLI, the plots, the
benchmark and the contract tests iterate over this dict.
"""

from __future__ import annotations

import inspect
from typing import Any

from .alibi import ALiBi, alibi_slopes
from .base import Scheme, ToeplitzScheme
from .fire import FIRE
from .kerple import KerpleLog, KerplePower
from .nope import NoPE
from .offset import OffsetBias
from .rope import RoPE, ntk_lambda, rope_frequencies, yarn_frequencies
from .sinusoidal import Sinusoidal
from .t5 import T5Bias, t5_bucket, t5_last_bucket_start

SCHEMES: dict[str, type[Scheme]] = {
    cls.name: cls
    for cls in (NoPE, Sinusoidal, OffsetBias, T5Bias, ALiBi, KerpleLog, KerplePower, FIRE, RoPE)
}


def scheme_options(name: str) -> dict[str, Any]:
    """The keyword options a scheme takes beyond ``n_heads``/``head_dim``, with their defaults."""
    cls = get_scheme_class(name)
    sig = inspect.signature(cls.__init__)
    return {
        p.name: p.default
        for p in sig.parameters.values()
        if p.kind is p.KEYWORD_ONLY and p.name not in ("n_heads", "head_dim")
    }


def get_scheme_class(name: str) -> type[Scheme]:
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(f"unknown scheme {name!r}; valid schemes: {', '.join(SCHEMES)}") from None


def build(name: str, *, n_heads: int, head_dim: int, **options: Any) -> Scheme:
    """Construct a registered scheme: ``build("t5", n_heads=8, head_dim=64, num_buckets=32)``.

    Unknown options raise ``ValueError`` listing the options the scheme accepts.
    """
    cls = get_scheme_class(name)
    valid = scheme_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"scheme {name!r} has no option(s) {', '.join(unknown)}; valid: {', '.join(valid) or 'none'}"
        )
    return cls(n_heads=n_heads, head_dim=head_dim, **options)


__all__ = [
    "SCHEMES", "Scheme", "ToeplitzScheme", "build", "get_scheme_class", "scheme_options",
    "NoPE", "Sinusoidal", "OffsetBias", "T5Bias", "ALiBi", "KerpleLog", "KerplePower", "FIRE", "RoPE",
    "t5_bucket", "t5_last_bucket_start", "alibi_slopes", "rope_frequencies", "ntk_lambda",
    "yarn_frequencies",
]
