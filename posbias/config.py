"""Checks shared by the workflow configs, and the error they raise.

A :class:`ConfigError` names the config *field* (``train_len``) and the problem; the command line
turns the field into the flag the user typed (``--train-len``), so the library never needs to know
its flags.
"""

from __future__ import annotations

import math
from typing import Any, Callable

#: the progress callback every workflow takes: one line of text per event
Log = Callable[[str], None]


def quiet(message: str) -> None:
    """The default :data:`Log`: say nothing."""


class ConfigError(ValueError):
    """A bad config value: ``field`` is the config field, ``problem`` the rest of the sentence."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem


def check_count(field: str, value: Any, *, minimum: int = 1) -> int:
    """An ``int`` (not a bool) ``>= minimum``, else :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(field, f"must be an integer >= {minimum}, got {value!r}")
    return value


def check_rate(field: str, value: Any) -> float:
    """A finite number ``> 0`` (learning rates, multipliers), else :class:`ConfigError`."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(field, f"must be a finite number > 0, got {value!r}")
    return float(value)
