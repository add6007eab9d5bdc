"""The registry of positional schemes: the single source of scheme names.

Adding a scheme is one file in this folder and one line in :data:`SCHEMES`: ``posbias list``/``show``/
``plot``, the length study (:attr:`Scheme.in_study`, :meth:`Scheme.study_defaults`), the benchmark and
the contract tests iterate over this dict and read the scheme's own properties
(``tests/test_architecture.py`` adds a toy scheme and checks each of them).
"""

from __future__ import annotations

from typing import Any

from .alibi import ALiBi, alibi_slopes
from .base import Scheme, ToeplitzScheme
from .fire import FIRE
from .kerple import KerpleLog, KerplePower
from .nope import NoPE
from .offset import OffsetBias
from .options import OptionSpec, check_option, option_specs, parse_option
from .rope import RoPE, ntk_lambda, rope_frequencies, yarn_frequencies
from .sinusoidal import Sinusoidal
from .t5 import T5Bias, t5_bucket, t5_last_bucket_start

SCHEMES: dict[str, type[Scheme]] = {
    cls.name: cls
    for cls in (Sinusoidal, RoPE, NoPE, OffsetBias, T5Bias, ALiBi, KerpleLog, KerplePower, FIRE)
}


def scheme_options(name: str) -> dict[str, Any]:
    """The keyword options a scheme takes beyond ``n_heads``/``head_dim``, with their defaults."""
    return {k: spec.default for k, spec in option_specs(get_scheme_class(name)).items()}


def check_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` checked against scheme ``name``: known names, typed values (ValueError otherwise)."""
    specs = option_specs(get_scheme_class(name))
    unknown = sorted(set(options) - set(specs))
    if unknown:
        raise ValueError(
            f"scheme {name!r} has no option(s) {', '.join(unknown)}; valid: {', '.join(specs) or 'none'}"
        )
    return {k: check_option(name, specs[k], v) for k, v in options.items()}


def parse_options(name: str, pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["max_distance=17", "bidirectional=false"]`` → typed options of scheme ``name``."""
    specs = option_specs(get_scheme_class(name))
    out: dict[str, Any] = {}
    for pair in pairs:
        key, eq, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise ValueError(f"scheme option {pair!r} must look like KEY=VALUE")
        if key not in specs:
            raise ValueError(f"scheme {name!r} has no option {key}; valid: {', '.join(specs) or 'none'}")
        if key in out:  # the last would win silently
            raise ValueError(f"scheme {name!r}: option {key} is given twice ({out[key]!r} and {text.strip()!r}); "
                             "give it once")
        out[key] = parse_option(name, specs[key], text)
    return out


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """A scheme with options in one word: ``"t5@max_distance=17,num_buckets=32"`` → ``("t5", {...})``."""
    name, at, rest = spec.partition("@")
    get_scheme_class(name)
    if at and not rest:
        raise ValueError(f"scheme spec {spec!r} has '@' but no KEY=VALUE after it")
    return name, parse_options(name, rest.split(",") if rest else [])


def spec_label(name: str, options: dict[str, Any]) -> str:
    """The inverse of :func:`parse_spec`: a readable label for a scheme with explicit options."""
    if not options:
        return name
    return name + "@" + ",".join(f"{k}={v}" for k, v in sorted(options.items()))


def get_scheme_class(name: str) -> type[Scheme]:
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(f"unknown scheme {name!r}; valid schemes: {', '.join(SCHEMES)}") from None


def with_label(name: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``name`` (a scheme name, or a label ``"t5@max_distance=64"``) and more ``options`` → the scheme name
    and every option; one given both in the label and in ``options`` is a ValueError (neither wins)."""
    if "@" not in name:
        return name, dict(options)
    name, labelled = parse_spec(name)
    twice = sorted(set(labelled) & set(options))
    if twice:
        raise ValueError(f"option {twice[0]} is given twice: in the label ({twice[0]}={labelled[twice[0]]!r}) "
                         f"and again ({twice[0]}={options[twice[0]]!r}); give it once")
    return name, {**labelled, **options}


def build(name: str, *, n_heads: int, head_dim: int, **options: Any) -> Scheme:
    """Construct a registered scheme: ``build("t5", n_heads=8, head_dim=64, num_buckets=32)``.

    ``name`` may be a label with options, as ``posbias extrapolate`` takes schemes and its results name
    them: ``build("t5@max_distance=64", n_heads=8, head_dim=64)``; an option given both in the label and
    as a keyword raises ``ValueError``. Unknown options raise ``ValueError`` listing the options the
    scheme accepts; a value of the wrong type (``clip="false"``) raises ``ValueError`` naming the type
    the option takes.
    """
    name, options = with_label(name, options)
    cls = get_scheme_class(name)
    return cls(n_heads=n_heads, head_dim=head_dim, **check_options(name, options))


__all__ = [
    "SCHEMES", "Scheme", "ToeplitzScheme", "build", "get_scheme_class", "scheme_options", "check_options",
    "parse_options", "parse_spec", "spec_label", "with_label", "OptionSpec", "option_specs",
    "NoPE", "Sinusoidal", "OffsetBias", "T5Bias", "ALiBi", "KerpleLog", "KerplePower", "FIRE", "RoPE",
    "t5_bucket", "t5_last_bucket_start", "alibi_slopes", "rope_frequencies", "ntk_lambda",
    "yarn_frequencies",
]
