"""Checks shared by the workflow configs, the error they raise, and the fixed thread count they run at.

A :class:`ConfigError` names the config *field* (``train_len``) and the problem; the command line
turns the field into the flag the user typed (``--train-len``), so the library never needs to know
its flags.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator

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


#: the most intra-op threads a workflow takes: more than any CPU has cores (a count past what the system
#: lets a process start aborted torch's OpenMP with no message: 20,000 did on the 2-core CI machine)
MAX_THREADS = 1024


def check_between(field: str, value: Any, low: int, high: int) -> int:
    """An ``int`` (not a bool) in ``[low, high]``, else :class:`ConfigError` naming the range."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(field, f"must be an integer in [{low}, {high}], got {value!r}")
    return value


def check_threads(field: str, value: Any) -> int:
    """An ``int`` in ``[1, MAX_THREADS]``, else :class:`ConfigError`."""
    return check_between(field, value, 1, MAX_THREADS)


#: the largest seed: ``seed · 1,000,003 + step`` (the training batches' generator seed) stays far inside
#: torch's 64-bit seed range
MAX_SEED = 2**32 - 1


def check_seed(field: str, value: Any) -> int:
    """An ``int`` in ``[0, MAX_SEED]``, else :class:`ConfigError` (torch would wrap a negative seed onto a
    large one, and reject one past 64 bits only when training starts)."""
    return check_between(field, value, 0, MAX_SEED)


def check_rate(field: str, value: Any) -> float:
    """A finite number ``> 0`` (learning rates, multipliers), else :class:`ConfigError`."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(field, f"must be a finite number > 0, got {value!r}")
    return float(value)


def check_number(field: str, value: Any, low: float, high: float = math.inf) -> float:
    """A finite number (not a bool) in ``[low, high]``, else :class:`ConfigError` naming the range."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value)
                                       and low <= value <= high):
        where = f"in [{low}, {high}]" if math.isfinite(high) else f">= {low}"
        raise ConfigError(field, f"must be a finite number {where}, got {value!r}")
    return float(value)


@contextmanager
def fixed_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` for the block, then restored. Float sums split
    across threads round differently for another count, so a workflow's numbers are bit-identical
    (on one machine) only at a fixed count, which is part of every result's key."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)
