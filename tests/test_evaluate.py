"""The evaluation's edges (``posbias.evaluate``): what the smallest inputs give and where it refuses.

The numbers themselves (perplexities, intervals, the study's columns) are tested against hand
computations in test_study.py and test_golden.py; here, the boundaries a mutation campaign found
untested."""

import math

import pytest
import torch
import torch.nn.functional as F
from _helpers import TINY

from posbias.evaluate import evaluate_length, length_study, spread_starts
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
