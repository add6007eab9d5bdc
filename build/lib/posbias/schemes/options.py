"""Typed scheme options: what each scheme's keyword options are, checked by type at ``build``.

A scheme's options are the keyword-only parameters of its ``__init__`` (beyond ``n_heads`` and
``head_dim``); their annotations are the types. ``check_option`` enforces them in the library (a
bool option takes a bool, never the string ``"false"``, which Python would read as True);
``parse_option`` turns command-line text into the typed value. Both raise ``ValueError`` naming the
option, the bad value and what is allowed.
"""

from __future__ import annotations

import inspect
import math
import typing
from collections.abc import Mapping
from typing import Any

__all__ = ["OptionSpec", "option_specs", "check_option", "parse_option", "options_text"]

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


class OptionSpec(typing.NamedTuple):
    name: str
    default: Any
    kind: type  # bool, int, float or str
    optional: bool  # None is allowed

    def describe(self) -> str:
        kind = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}[self.kind]
        return f"{kind}{' or none' if self.optional else ''}"


def option_specs(cls: type) -> dict[str, OptionSpec]:
    """The typed keyword options of scheme class ``cls``, in signature order."""
    hints = typing.get_type_hints(cls.__init__)
    out: dict[str, OptionSpec] = {}
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.kind is not p.KEYWORD_ONLY or p.name in ("n_heads", "head_dim"):
            continue
        hint = hints.get(p.name, type(p.default))
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = type(None) in typing.get_args(hint)
        kind = args[0] if args else hint
        if kind not in (bool, int, float, str):
            raise TypeError(f"{cls.__name__}.{p.name}: option type {hint!r} is not bool/int/float/str")
        out[p.name] = OptionSpec(p.name, p.default, kind, optional)
    return out


def check_option(scheme: str, spec: OptionSpec, value: Any) -> Any:
    """``value`` if it has the option's type (ints are accepted for float options), else ValueError."""
    if value is None and spec.optional:
        return None
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[spec.kind]
    if not ok:
        raise ValueError(f"{spec.name} must be {spec.describe()} (scheme {scheme!r}), got {value!r}")
    if spec.kind is float:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{spec.name} must be a finite number (scheme {scheme!r}), got {value!r}")
    return value


def parse_option(scheme: str, spec: OptionSpec, text: str) -> Any:
    """The typed value of command-line ``text`` for option ``spec``."""
    low = text.strip().lower()
    if spec.optional and low == "none":
        return None
    try:
        if spec.kind is bool:
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError
        if spec.kind is int:
            return int(text)
        if spec.kind is float:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
            return value
    except ValueError:
        raise ValueError(f"{spec.name} must be {spec.describe()} (scheme {scheme!r}), got {text!r}") from None
    return text


def options_text(options: Mapping[str, Any], empty: str) -> str:
    """Scheme options as every message, log line and report writes them, ``max_distance=17, bidirectional=False``
    in the given order, or ``empty`` where there are none (a Python dict was printed in the study's
    training line)."""
    return ", ".join(f"{k}={v}" for k, v in options.items()) or empty
