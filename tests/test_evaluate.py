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


def test_a_split_of_exactly_one_window_is_scored_and_one_token_less_is_refused(model):
    """``length + 1`` tokens hold one window of ``length`` scored tokens (the first token is only
    context): it is scored, as the cross-entropy of that window; a token fewer is refused."""
    tokens = torch.randint(0, 256, (17,))
    r = evaluate_length(model, tokens, 16)
    with torch.no_grad():
        want = F.cross_entropy(model(tokens[None, :-1])[0], tokens[1:]).item()
    assert r["ppl"] == pytest.approx(math.exp(want), rel=1e-6)
    with pytest.raises(ValueError, match="^split has 15 scoreable tokens, fewer than the evaluation length 16$"):
        evaluate_length(model, tokens[:16], 16)


def test_length_one_is_an_evaluation_length_and_zero_is_not(model):
    """Windows of one token (no context: the model's unigram guess) are a length like any other."""
    tokens = torch.randint(0, 256, (65,))
    r = evaluate_length(model, tokens, 1, max_tokens=64)
    with torch.no_grad():
        want = F.cross_entropy(model(tokens[:-1, None])[:, 0], tokens[1:]).item()
    assert r["ppl"] == pytest.approx(math.exp(want), rel=1e-6)
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
