"""The checks every workflow config shares (posbias.config): each bound included where it says so, a bool
never taken for a number, non-finite numbers refused, and the message naming the field, the range and the
value. The configs' own tests check which field uses which check; here each check is read at its edges."""

import math

import pytest
import torch

from posbias import config
from posbias.config import (MAX_SEED, MAX_THREADS, ConfigError, check_between, check_count, check_number, check_rate,
                            check_seed, check_threads, fixed_threads)


def refused(check, *args, message, **kwargs):
    with pytest.raises(ConfigError) as got:
        check("field", *args, **kwargs)
    assert str(got.value) == f"field {message}" and got.value.field == "field"
    assert got.value.problem == message


def test_a_count_is_an_int_from_its_minimum():
    assert check_count("field", 1) == 1 and check_count("field", 0, minimum=0) == 0
    refused(check_count, 0, message="must be an integer >= 1, got 0")
    refused(check_count, True, message="must be an integer >= 1, got True")  # a bool is an int to Python
    refused(check_count, 2.0, message="must be an integer >= 1, got 2.0")
    refused(check_count, 1, minimum=2, message="must be an integer >= 2, got 1")


def test_between_includes_both_ends():
    assert check_between("field", 3, 3, 5) == 3 and check_between("field", 5, 3, 5) == 5
    for bad in (2, 6, True, 4.0, "4"):
        refused(check_between, bad, 3, 5, message=f"must be an integer in [3, 5], got {bad!r}")


def test_threads_and_seeds_span_their_whole_ranges():
    assert MAX_THREADS == 1024 and MAX_SEED == 2**32 - 1
    assert check_threads("field", 1) == 1 and check_threads("field", MAX_THREADS) == MAX_THREADS
    refused(check_threads, 0, message="must be an integer in [1, 1024], got 0")
    refused(check_threads, MAX_THREADS + 1, message="must be an integer in [1, 1024], got 1025")
    assert check_seed("field", 0) == 0 and check_seed("field", MAX_SEED) == MAX_SEED
    refused(check_seed, -1, message="must be an integer in [0, 4294967295], got -1")
    refused(check_seed, MAX_SEED + 1, message="must be an integer in [0, 4294967295], got 4294967296")


def test_a_rate_is_a_finite_number_above_zero():
    assert check_rate("field", 3) == 3.0 and isinstance(check_rate("field", 3), float)
    assert check_rate("field", 1e-12) == 1e-12
    for bad in (0, 0.0, -1e-3, math.inf, math.nan, True, "0.1", None):
        refused(check_rate, bad, message=f"must be a finite number > 0, got {bad!r}")


def test_a_number_lies_in_its_closed_range():
    assert check_number("field", 0, 0.0, 1.0) == 0.0 and isinstance(check_number("field", 0, 0.0, 1.0), float)
    assert check_number("field", 1.0, 0.0, 1.0) == 1.0 and check_number("field", 1e300, 0.0) == 1e300
    for bad in (-0.5, 1.5, math.nan, math.inf, True, "0.5"):
        refused(check_number, bad, 0.0, 1.0, message=f"must be a finite number in [0.0, 1.0], got {bad!r}")
    # no upper bound: said as one
    for bad in (-1, math.inf, math.nan):
        refused(check_number, bad, 0.0, message=f"must be a finite number >= 0.0, got {bad!r}")


def test_fixed_threads_sets_the_count_and_restores_it_even_on_an_error():
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    with fixed_threads(other):
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="inside"), fixed_threads(other):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before
    assert config.quiet("anything") is None
