"""The reference attention itself: against a hand-written softmax, masks, scales, positions."""

import math

import pytest
import torch

import posbias
from posbias import SCHEMES, attention_reference, build


def test_matches_handwritten_alibi():
    s = build("alibi", n_heads=2, head_dim=4)
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    out = attention_reference(q, k, v, s)
    i = torch.arange(5)
    for h, m in enumerate(s.slopes.tolist()):
        logits = q[0, h] @ k[0, h].T / 2.0 - m * (i[:, None] - i[None, :])
        logits = logits.masked_fill(i[None, :] > i[:, None], -math.inf)
        torch.testing.assert_close(out[0, h], torch.softmax(logits, -1) @ v[0, h])


def test_t5_is_unscaled_and_others_scaled():
    q, k, v = (torch.randn(1, 1, 6, 16) for _ in range(3))
    t5 = build("t5", n_heads=1, head_dim=16)
    nope = build("nope", n_heads=1, head_dim=16)
    torch.testing.assert_close(attention_reference(q, k, v, t5), attention_reference(q, k, v, nope, scale=1.0))
    torch.testing.assert_close(attention_reference(q, k, v, nope),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_default_query_positions_are_aligned_to_the_end():
    s = build("alibi", n_heads=2, head_dim=8)
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    full = attention_reference(q, k, v, s)
    last = attention_reference(q[:, :, -2:], k, v, s)
    torch.testing.assert_close(last, full[:, :, -2:])


def test_fully_masked_rows_are_zero_and_gradients_finite():
    s = build("t5", n_heads=1, head_dim=8)
    q = torch.randn(1, 1, 3, 8, requires_grad=True)
    k = torch.randn(1, 1, 3, 8, requires_grad=True)
    out = attention_reference(q, k, k, s, q_pos=torch.tensor([-2, -1, 0]), k_pos=torch.tensor([0, 1, 2]))
    assert torch.equal(out[0, 0, :2], torch.zeros(2, 8))
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


@pytest.mark.parametrize("name", list(SCHEMES))
def test_bidirectional_runs(name):
    s = build(name, n_heads=2, head_dim=8)
    q, k, v = (torch.randn(2, 2, 7, 8) for _ in range(3))
    out = posbias.attention(q, k, v, s, causal=False)
    assert out.shape == q.shape and torch.isfinite(out).all()


def test_shape_errors():
    s = build("alibi", n_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="3 heads but the scheme was built for n_heads=2"):
        posbias.attention(*(torch.randn(1, 3, 4, 8) for _ in range(3)), s)
    with pytest.raises(ValueError, match=r"\[batch, heads, seq, head_dim\]"):
        posbias.attention(*(torch.randn(2, 4, 8) for _ in range(3)), s)
    with pytest.raises(ValueError, match="unknown backend"):
        posbias.attention(*(torch.randn(1, 2, 4, 8) for _ in range(3)), s, backend="magic")
