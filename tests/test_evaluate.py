"""The evaluation's edges (``posbias.evaluate``): what the smallest inputs give and where it refuses.

Each number (perplexities, the study's columns, its intervals) against a hand computation, and
each check that runs before any work at its boundary: the module's own tests, so that a mutation of
it fails here (``tools/mutate.py posbias/evaluate.py tests/test_evaluate.py``)."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from _helpers import TINY

from posbias.config import ConfigError
from posbias.evaluate import (MIN_SEGMENTS, N_BOOT, SEGMENTS, bootstrap_means, check_fits, check_segments,
                              check_study_lengths, eval_budget, evaluate_length, interval, length_study, local_head,
                              ratios_to_best, spread_starts, token_losses)
from posbias.model import ModelConfig, TransformerLM


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TransformerLM(ModelConfig(scheme="alibi", **TINY)).eval()


def _window_nll(model, tokens, n):
    """Each token's loss in windows of ``n`` tiling ``tokens`` (its last token only a target), by hand."""
    out = []
    with torch.no_grad():
        for s in range(0, tokens.numel() - 1, n):
            out.append(F.cross_entropy(model(tokens[None, s:s + n])[0], tokens[s + 1:s + n + 1], reduction="none"))
    return torch.cat(out).double()


def test_a_split_of_exactly_one_window_is_scored_and_one_token_less_is_refused(model):
    """``length + 1`` tokens hold one window of ``length`` scored tokens (the first token is only
    context): it is scored, as the cross-entropy of that window; a token fewer is refused."""
    tokens = torch.randint(0, 256, (17,))
    r = evaluate_length(model, tokens, 16)
    assert r["ppl"] == pytest.approx(math.exp(_window_nll(model, tokens, 16).mean()), rel=1e-6)
    with pytest.raises(ValueError, match="^split has 15 scoreable tokens, fewer than the evaluation length 16$"):
        evaluate_length(model, tokens[:16], 16)


def test_length_one_is_an_evaluation_length_and_zero_is_not(model):
    """Windows of one token (no context: the model's unigram guess) are a length like any other."""
    tokens = torch.randint(0, 256, (65,))
    r = evaluate_length(model, tokens, 1, max_tokens=64)
    assert r["ppl"] == pytest.approx(math.exp(_window_nll(model, tokens, 1).mean()), rel=1e-6)
    with pytest.raises(ValueError, match=r"^evaluation lengths must be integers >= 1, got 0$"):
        evaluate_length(model, tokens, 0)


def test_a_study_of_one_segment_is_scored_and_of_none_refused(model):
    """``length_study`` needs one segment of the longest length; its intervals are then points."""
    tokens = torch.randint(0, 256, (200,))
    out = length_study(model, tokens, [16, 32], train_len=16, n_tokens=32, n_boot=20)
    assert out[32]["segments"] == 1 and out[32]["tokens"] == 32 and out[16]["windows"] == 2
    assert out[32]["ppl_lo"] == pytest.approx(out[32]["ppl"]) == pytest.approx(out[32]["ppl_hi"])
    with pytest.raises(ValueError, match="^31 evaluation tokens are fewer than the longest length 32$"):
        length_study(model, tokens, [16, 32], train_len=16, n_tokens=31)


@pytest.mark.parametrize("span, count", [(0, 1), (5, 0), (-1, 2)])
def test_segments_of_no_tokens_or_none_at_all_are_refused(span, count):
    with pytest.raises(ValueError, match=rf"^segments need span >= 1 and count >= 1, got span {span}, count {count}$"):
        spread_starts(100, span, count)
    assert spread_starts(100, 1, 1) == [0]
    with pytest.raises(ValueError, match="^split has 63 scoreable tokens, fewer than 1 segment of 64$"):
        spread_starts(63, 64, 2, overlap=True)


def test_the_study_columns_are_the_losses_of_the_tokens_they_name(model):
    """``length_study``'s views against a hand computation on a split that holds its segments exactly:
    ``ppl`` over every token; ``tail_ppl`` over the last L tokens of each window of n; ``tail_delta``
    those tokens' loss minus the same tokens' loss in windows of L; ``far_delta`` the same past the
    tail's first L/8 tokens; ``segment_loss`` each segment's mean; ``loss_by_position`` at the longest
    length the mean over windows per position."""
    L, longest = 16, 32
    tokens = torch.randint(0, 256, (2 * longest + 1,))  # two segments of 32, side by side
    out = length_study(model, tokens, [L, longest], train_len=L, n_tokens=2 * longest, n_boot=20)
    at_l, at_n = _window_nll(model, tokens, L), _window_nll(model, tokens, longest)
    pos = torch.arange(2 * longest) % longest
    tail, far = pos >= longest - L, pos >= longest - L + L // 8
    r = out[longest]
    assert r["ppl"] == pytest.approx(math.exp(at_n.mean()), rel=1e-6)
    assert r["tail_ppl"] == pytest.approx(math.exp(at_n[tail].mean()), rel=1e-6)
    assert r["tail_delta"] == pytest.approx(float(at_n[tail].mean() - at_l[tail].mean()), abs=1e-6)
    assert r["far_delta"] == pytest.approx(float(at_n[far].mean() - at_l[far].mean()), abs=1e-6)
    assert r["ratio"] == pytest.approx(math.exp(at_n.mean() - at_l.mean()), rel=1e-6)
    assert r["segment_loss"] == pytest.approx(at_n.view(2, longest).mean(1).tolist(), rel=1e-6)
    assert r["loss_by_position"] == pytest.approx(at_n.view(2, longest).mean(0).tolist(), rel=1e-6)
    assert out[L]["tail_delta"] == 0.0 == out[L]["far_delta"] and out[L]["loss_by_position"] is None


def test_sliding_windows_score_the_first_window_whole_and_then_each_stride(model):
    """``stride=s``: the first window's every token, then the last ``s`` tokens of each window after it
    (each scored with ``length − s`` tokens of context at least)."""
    tokens = torch.randint(0, 256, (49,))
    r = evaluate_length(model, tokens, 16, max_tokens=48, stride=8)
    losses = []
    with torch.no_grad():
        for st in range(0, 48 - 16 + 1, 8):
            row = F.cross_entropy(model(tokens[None, st:st + 16])[0], tokens[st + 1:st + 17], reduction="none")
            losses.append(row if st == 0 else row[8:])
    every = torch.cat(losses).double()
    assert r["tokens"] == every.numel() == 48 and r["loss"] == pytest.approx(float(every.mean()), rel=1e-6)
    # a stride that does not tile the budget: windows at 0, 11 and 22 only (one at 33 would end past 48)
    odd = evaluate_length(model, tokens, 16, max_tokens=48, stride=11)
    assert odd["tokens"] == 16 + 11 + 11


# -- the budget checks a study, retrofit and diagnose run before any work ------------------------------
def _split(n_avail):
    return torch.zeros(n_avail + 1, dtype=torch.uint8)  # n_avail scoreable tokens (the first is context only)


def test_a_split_holds_a_length_when_it_holds_eight_segments_of_it():
    """``check_fits``: a length needs :data:`MIN_SEGMENTS` segments of the split (exactly 8 pass, a
    token fewer does not); a length past the split is its own error; the refusals name what would fit."""
    check_fits(_split(8 * 32), 32, None, "eval_lens")
    with pytest.raises(ConfigError, match=r"^eval_lens 32: the validation split's 255 scoreable tokens hold 7 segments "
                                          r"of it, fewer than the 8 an interval needs \(with 2 or 4 .*; a length of at "
                                          r"most 31, or more validation text$"):
        check_fits(_split(8 * 32 - 1), 32, None, "eval_lens")
    with pytest.raises(ConfigError, match=r"^train_len 32: .* hold 1 segment of it, fewer than the 8"):
        check_fits(_split(32), 32, None, "train_len")  # the whole split is one segment: not too long, too few
    check_fits(_split(32), 4, None, "x")  # a length of exactly a split's eighth
    # the longest that fits among the lengths the job takes: multiples of `unit`, from `least`; or none
    with pytest.raises(ConfigError, match=r"; a length of at most 24, or more validation text$"):
        check_fits(_split(8 * 31), 32, None, "eval_lens", unit=8, least=8)  # 31 fits, 24 is the multiple of 8
    with pytest.raises(ConfigError, match=r"; a length of at most 31, or more validation text$"):
        check_fits(_split(8 * 31), 32, None, "length", least=31)
    with pytest.raises(ConfigError, match=r"; more validation text: the shortest length this takes, 32, needs 256 "
                                          r"scoreable tokens$"):
        check_fits(_split(8 * 31), 32, None, "length", least=32)
    with pytest.raises(ConfigError, match=r"; more validation text: the shortest length this takes, 32, needs"):
        check_fits(_split(8 * 31), 64, None, "eval_lens", unit=32, least=32)
    with pytest.raises(ConfigError, match=r"; a length of at most 1, or more validation text$"):
        check_fits(_split(15), 2, None, "x")  # by default any length from 1 is one the job takes
    with pytest.raises(ConfigError, match=r"^eval_lens 33 exceeds the validation split's 32 scoreable tokens "
                                          r"\(a shorter length, or more data\)$"):
        check_fits(_split(32), 33, None, "eval_lens")


def test_a_budget_of_tokens_is_checked_against_the_split_and_the_segments_it_scores():
    """``eval_tokens``: at most the split's scoreable tokens (all of them pass; one more is refused,
    naming the segments that fit, and the default's own count where it was the default), and at least
    8 segments of the longest length (``check_segments``: 8 pass, a token fewer scores 7)."""
    split = _split(10 * 32 + 5)  # 325 scoreable tokens: 10 segments of 32
    check_fits(split, 32, 325, "eval_lens")
    check_fits(split, 32, 8 * 32, "eval_lens")
    with pytest.raises(ConfigError, match=r"^eval_tokens 326 exceed the validation split's 325 scoreable tokens; give "
                                          r"320 or fewer \(10 segments of 32\), shorter evaluation lengths or more data$"):
        check_fits(split, 32, 326, "eval_lens")
    with pytest.raises(ConfigError, match=r"^eval_tokens 2,048 \(64 segments of 32 unless given\) exceed"):
        check_fits(split, 32, eval_budget(None, 32), "eval_lens")
    with pytest.raises(ConfigError, match=r"^eval_tokens 255 scores 7 segments of 32, fewer than the 8 an interval needs "
                                          r"\(.*\); give 256 or more$"):
        check_fits(split, 32, 8 * 32 - 1, "eval_lens")
    with pytest.raises(ConfigError, match=r"^eval_tokens 40 scores 1 segment of 32, fewer"):
        check_segments(40, 32)
    check_segments(8 * 32, 32)
    assert eval_budget(None, 32) == SEGMENTS * 32 == 2048 and eval_budget(100, 32) == 100 and MIN_SEGMENTS == 8


def test_segments_are_spread_evenly_from_the_first_token_to_the_last():
    """Integer starts, the first at 0 and the last ending at the split's end; segments that tile the
    split exactly fit; overlapping ones need only one segment's room."""
    assert spread_starts(100, 10, 4) == [0, 30, 60, 90]
    assert spread_starts(40, 10, 4) == [0, 10, 20, 30]  # exactly the split
    with pytest.raises(ValueError, match="^split has 39 scoreable tokens, fewer than 4 segments of 10$"):
        spread_starts(39, 10, 4)
    assert spread_starts(12, 10, 3, overlap=True) == [0, 1, 2]
    big = 2 ** 53 + 7  # positions stay exact where a float would round them
    assert spread_starts(big, 3, 2) == [0, big - 3]


def test_token_losses_refuse_a_span_or_count_that_does_not_tile(model):
    tokens = torch.randint(0, 256, (65,))
    for span in (24, 8):  # not a multiple of 16, or shorter than it
        with pytest.raises(ValueError, match=f"^the segment span {span} must be a positive multiple of the length 16$"):
            token_losses(model, tokens, 16, n_tokens=48, span=span)
    for n in (40, 16):  # not a multiple of the span 32, or less than it
        with pytest.raises(ValueError, match=rf"^n_tokens \({n}\) must be a positive multiple of the segment span 32$"):
            token_losses(model, tokens, 16, n_tokens=n, span=32)
    with pytest.raises(ValueError, match="^split has 63 scoreable tokens, fewer than 64$"):
        token_losses(model, tokens[:64], 16, n_tokens=64)
    assert token_losses(model, tokens, 16, n_tokens=64).shape == (64,)  # 64 scoreable tokens: all of them
    with pytest.raises(ValueError, match="^the model gives non-finite losses at length 16"):
        broken = TransformerLM(ModelConfig(scheme="alibi", **TINY)).eval()
        with torch.no_grad():
            next(broken.parameters()).fill_(float("nan"))
        token_losses(broken, tokens, 16, n_tokens=16)


def test_evaluate_length_checks_its_stride_and_budget_and_reports_bits_per_byte(model):
    tokens = torch.randint(0, 256, (65,))
    for bad in (0, 17):
        with pytest.raises(ValueError, match=f"^stride must be in \\[1, 16\\], got {bad}$"):
            evaluate_length(model, tokens, 16, stride=bad)
    for good in (1, 16):
        assert evaluate_length(model, tokens, 16, stride=good, max_tokens=32)["stride"] == good
    with pytest.raises(ValueError, match="^max_tokens=65 exceeds the split's 64 scoreable tokens; give at most 64 "):
        evaluate_length(model, tokens, 16, max_tokens=65)
    with pytest.raises(ValueError, match="^15 evaluation tokens are fewer than the evaluation length 16$"):
        evaluate_length(model, tokens, 16, max_tokens=15)
    with pytest.raises(ValueError, match="^20 evaluation tokens are fewer than one segment of 32$"):
        evaluate_length(model, tokens, 16, max_tokens=20, span=32)
    r = evaluate_length(model, tokens, 16, max_tokens=40)  # cut to whole windows: 2 of 16, at 0 and 48
    assert r["tokens"] == 32 and len(r["window_loss"]) == 2 and len(r["loss_by_position"]) == 16
    assert r["bpb"] == pytest.approx(r["loss"] / math.log(2)) and r["ppl"] == pytest.approx(math.exp(r["loss"]))
    by_hand = torch.stack([_window_nll(model, tokens[s:s + 17], 16) for s in (0, 48)])
    assert r["loss_by_position"] == pytest.approx(by_hand.mean(0).tolist(), rel=1e-6)
    assert r["window_loss"] == pytest.approx(by_hand.mean(1).tolist(), rel=1e-6)
    s = evaluate_length(model, tokens, 16, max_tokens=32, stride=16)  # sliding by a whole window: tiles 0-32
    assert s["bpb"] == pytest.approx(s["loss"] / math.log(2))
    assert s["loss"] == pytest.approx(float(_window_nll(model, tokens[:33], 16).mean()), rel=1e-6)


def test_the_local_head_is_an_eighth_of_l_and_at_least_one_token():
    assert [local_head(n) for n in (1, 7, 8, 16, 17, 64)] == [1, 1, 1, 2, 2, 8]


def test_study_lengths_include_l_and_divide_the_longest():
    assert check_study_lengths([64, 16, 32, 16], 16) == [16, 32, 64]
    with pytest.raises(ValueError, match="^the evaluation lengths 32 64 must include the training length 16$"):
        check_study_lengths([64, 32], 16)
    with pytest.raises(ValueError, match=r"^evaluation length 48 must divide the longest \(64\) and be a multiple of "
                                         r"the training length \(16\)"):
        check_study_lengths([16, 48, 64], 16)
    with pytest.raises(ValueError, match=r"^evaluation length 24 must divide the longest \(48\) and be a multiple of "
                                         r"the training length \(16\)"):
        check_study_lengths([16, 24, 48], 16)  # 24 divides 48 but is no multiple of 16
    with pytest.raises(ValueError, match="^give at least one evaluation length$"):
        check_study_lengths([], 16)


# -- intervals ---------------------------------------------------------------------------------------
def test_bootstrap_replicates_are_paired_ratio_of_sums_means_from_the_units():
    """Every replicate draws the same units for every column (a column that is another plus 1 stays
    exactly 1 above it), is a ratio of sums (weights by the counts), is reproducible by its seed, and
    lies within the units' range."""
    g = torch.Generator().manual_seed(1)
    a = torch.rand(30, 1, generator=g, dtype=torch.float64)
    counts = torch.randint(1, 5, (30, 1), generator=g).double()
    sums = torch.cat([a * counts, (a + 1) * counts], 1)
    reps = bootstrap_means(sums, counts.expand(30, 2), n_boot=500, seed=3)
    assert reps.shape == (500, 2)
    assert torch.allclose(reps[:, 1] - reps[:, 0], torch.ones(500, dtype=torch.float64))
    assert bool((reps[:, 0] >= a.min() - 1e-12).all() and (reps[:, 0] <= a.max() + 1e-12).all())
    assert torch.equal(reps, bootstrap_means(sums, counts.expand(30, 2), n_boot=500, seed=3))
    assert not torch.equal(reps, bootstrap_means(sums, counts.expand(30, 2), n_boot=500, seed=4))
    assert bootstrap_means(sums, counts.expand(30, 2)).shape == (N_BOOT, 2) and N_BOOT == 2000
    # a ratio of sums, not a mean of ratios: two units (1 of 1 token, 3 over 3 tokens) drawn together read 1.0
    two = bootstrap_means(torch.tensor([[1.0], [3.0]], dtype=torch.float64),
                          torch.tensor([[1.0], [3.0]], dtype=torch.float64), n_boot=50)
    assert torch.allclose(two, torch.ones_like(two))
    # a replicate draws as many units as there are, any of them: of units 0 and 1, means 0, 1/2 and 1
    halves = bootstrap_means(torch.tensor([[0.0], [1.0]], dtype=torch.float64), torch.ones(2, 1, dtype=torch.float64),
                             n_boot=400)
    assert set(halves.flatten().tolist()) == {0.0, 0.5, 1.0}


def test_an_interval_is_the_central_share_of_the_replicates():
    reps = torch.linspace(0, 1, 1001)
    assert interval(reps) == pytest.approx((0.025, 0.975))
    assert interval(reps, level=0.5) == pytest.approx((0.25, 0.75))


def test_ratios_to_the_best_are_paired_and_flag_the_best():
    """A model 0.1 nats worse on every unit reads exp(0.1) with an interval of that point alone (paired:
    the units' own spread cancels); the best reads exactly 1; the third is its own distance."""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(20, generator=g, dtype=torch.float64) * 3  # units of very different difficulty
    out = ratios_to_best(torch.stack([base + 0.1, base, base + 0.3 * torch.rand(20, generator=g,
                                                                                dtype=torch.float64)], 1), n_boot=200)
    assert [p.best for p in out] == [False, True, False]
    assert out[1] == (1.0, 1.0, 1.0, (), True)
    assert out[0].ratio == pytest.approx(math.exp(0.1)) and out[0].lo == pytest.approx(math.exp(0.1))
    assert out[0].hi == pytest.approx(math.exp(0.1))
    assert 1 < out[2].lo < out[2].ratio < out[2].hi < math.exp(0.3)
    for bad in (torch.zeros(3), torch.zeros(0, 2), torch.zeros(2, 0), torch.zeros(1, 1, 1)):  # no table, units, models
        with pytest.raises(ValueError, match=rf"^losses must be \[units, models\] with at least one of each, got "
                                             rf"{re.escape(str(tuple(bad.shape)))}$"):
            ratios_to_best(bad)
    assert ratios_to_best(torch.tensor([[2.0]]))[0] == (1.0, 1.0, 1.0, (), True)
    one_unit = ratios_to_best(torch.tensor([[2.0, 2.5]]))  # one unit: a ratio, its interval a point
    assert one_unit[1][:3] == pytest.approx((math.exp(0.5),) * 3) and one_unit[0].best and not one_unit[1].best
    assert ratios_to_best(torch.tensor([[2.0], [3.0]]))[0][:3] == (1.0, 1.0, 1.0)  # one model: the best


def test_each_study_interval_holds_its_point(model):
    """On several segments of text every interval brackets its point (a Δ's interval taken on the sum
    of the two losses instead of their difference would not)."""
    torch.manual_seed(1)
    tokens = torch.randint(0, 256, (8 * 64 + 1,))
    out = length_study(model, tokens, [32, 16, 64], train_len=16, n_tokens=8 * 64 + 5, n_boot=300)
    assert list(out) == [16, 32, 64]
    for n, r in out.items():
        keys = ("ppl", "tail_ppl") + (("ratio", "tail_delta", "far_delta") if n > 16 else ())
        for key in keys:
            assert r[f"{key}_lo"] <= r[key] <= r[f"{key}_hi"], (n, key)
            assert r[f"{key}_lo"] < r[f"{key}_hi"], (n, key)
        assert r["windows"] == 512 // n and type(r["windows"]) is int and r["segments"] == 8 and r["tokens"] == 512
        assert len(r["segment_loss"]) == 8 and r["bpb"] == pytest.approx(r["loss"] / math.log(2))
    assert out[16]["ratio"] == 1.0 == out[16]["ratio_lo"] == out[16]["ratio_hi"]
    assert len(out[64]["loss_by_position"]) == 64 and out[32]["loss_by_position"] is None
