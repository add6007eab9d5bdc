"""Packed sequences (``attention(..., document_ids=ids)``): every document attends only within itself, at
positions from 0, against an independent dense oracle (one softmax over the whole packed row with the
other documents masked out and each token's bias at its position inside its document)."""

import copy
import random
import re

import pytest
import torch
from _helpers import ATTENTION_MODULE, assert_grads_close, perturb_, random_options, randomized

import posbias
from posbias.attention import attention
from posbias.kernels.reference import dense_probs

IDS = torch.tensor([[0] * 5 + [1] * 17 + [2] + [3] * 40 + [4] * 17,  # lengths 5, 17, 1, 40, 17
                    [7] * 63 + [8] * 17])                            # 63, 17: two rows share a length


def oracle(q, k, v, scheme, ids, causal):
    """Dense attention per packed row: local positions counted by hand, a same-document mask."""
    outs = []
    for b in range(ids.shape[0]):
        row = ids[b].tolist()
        local = torch.tensor([next(i - j for j in range(i, -1, -1) if j == 0 or row[j - 1] != row[i])
                              for i in range(len(row))])
        same = ids[b][:, None] == ids[b][None, :]
        mask = same & (torch.arange(len(row))[None, :] <= torch.arange(len(row))[:, None]) if causal else same
        qb, kb = q[b:b + 1], k[b:b + 1]
        if scheme.family == "rotary":
            qb, kb = scheme.rotate(qb, local), scheme.rotate(kb, local)
        probs = dense_probs(qb, kb, scheme.bias(local, local), mask, scheme.default_scale())
        outs.append(torch.matmul(probs, v[b:b + 1].float()))
    return torch.cat(outs)


@pytest.mark.parametrize("name, options", [("t5", {"max_distance": 40}), ("t5", {"max_distance": 40, "bidirectional": True}),
                                           ("alibi", {}), ("kerple-log", {}), ("fire", {"init_L": 32.0}), ("rope", {}),
                                           ("nope", {})])
@pytest.mark.parametrize("causal", [True, False])
def test_documents_equal_the_masked_dense_oracle(name, options, causal):
    """Outputs, q/k/v gradients and the scheme's parameter gradients."""
    torch.manual_seed(0)
    s = randomized(name, **options)
    q, k, v = (torch.randn(2, 3, 80, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = attention(q, k, v, s, causal=causal, document_ids=IDS)
    ref = oracle(q, k, v, s, IDS, causal)
    torch.testing.assert_close(out.double(), ref.double(), atol=2e-5, rtol=1e-4)
    g = torch.randn_like(ref)
    params = [p for p in s.parameters() if p.requires_grad]
    got = torch.autograd.grad((out * g).sum(), [q, k, v, *params])
    want = torch.autograd.grad((ref * g).sum(), [q, k, v, *params])
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), atol=2e-4, rtol=1e-3)


def test_documents_of_one_length_run_as_one_call(monkeypatch):
    """The five distinct lengths of :data:`IDS` (5, 17, 1, 40, 63): five calls, the three 17-token
    documents of two rows in one; grouped heads and dropout pass through (each call its own stream)."""
    pa = ATTENTION_MODULE
    calls = []
    real = pa.attention

    def spy(q, *a, **kw):
        calls.append(tuple(q.shape[:3]))
        return real(q, *a, **kw)

    s = posbias.build("alibi", n_heads=4, head_dim=8)
    q, k, v = torch.randn(2, 4, 80, 8), torch.randn(2, 2, 80, 8), torch.randn(2, 2, 80, 8)
    want = attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), s, document_ids=IDS)
    monkeypatch.setattr(pa, "attention", spy)
    got = pa._with_documents(q, k, v, s, IDS, q_pos=None, k_pos=None, key_mask=None, causal=True, scale=None,
                             backend="auto", strict=True, enable_gqa=True, dropout_p=0.0, dropout_seed=None)
    torch.testing.assert_close(got, want)
    assert sorted(calls) == sorted([(1, 4, 1), (1, 4, 5), (3, 4, 17), (1, 4, 40), (1, 4, 63)])
    dropped = attention(q, k, v, s, enable_gqa=True, document_ids=IDS, dropout_p=0.3, dropout_seed=1)
    assert torch.isfinite(dropped).all() and not torch.allclose(dropped, want)


def test_one_document_per_row_is_the_plain_call():
    s = randomized("t5", max_distance=40)
    q, k, v = (torch.randn(2, 3, 30, 16) for _ in range(3))
    same = attention(q, k, v, s, document_ids=torch.tensor([[3] * 30, [1] * 30]))
    assert torch.equal(same, attention(q, k, v, s))


@pytest.mark.parametrize("kw, message", [
    ({"document_ids": torch.zeros(2, 30)}, "document_ids must be an integer tensor"),
    ({"document_ids": torch.zeros(2, 30, dtype=torch.bool)}, "document_ids must be an integer tensor"),
    ({"document_ids": torch.zeros(2, 29, dtype=torch.long)}, r"\[batch, L\] = \[2, 30\]"),
    ({"document_ids": [0] * 30}, "document_ids must be an integer tensor"),
    ({"document_ids": torch.zeros(2, 30, dtype=torch.long), "q_pos": torch.arange(30)}, "without q_pos, k_pos and key_mask"),
    ({"document_ids": torch.zeros(2, 30, dtype=torch.long), "key_mask": torch.ones(2, 30, dtype=torch.bool)},
     "give padding a document id of its own"),
])
def test_bad_document_ids(kw, message):
    s = posbias.build("alibi", n_heads=3, head_dim=16)
    q = torch.randn(2, 3, 30, 16)
    with pytest.raises(ValueError, match=message):
        attention(q, q, q, s, **kw)


def test_document_ids_need_self_attention_and_the_message_says_what_came():
    """Packed documents are self-attention: keys of another length than the queries are refused, naming
    the shape wanted, the keys' length and what came (whole message)."""
    s = posbias.build("alibi", n_heads=3, head_dim=16)
    q, k = torch.randn(2, 3, 30, 16), torch.randn(2, 3, 25, 16)
    with pytest.raises(ValueError, match=re.escape(
            "document_ids must be an integer tensor [batch, L] = [2, 30] for self-attention (q and k of L tokens; "
            "k has 25), got torch.int64 of shape (2, 30)")):
        attention(q, k, k, s, document_ids=torch.zeros(2, 30, dtype=torch.long))


@pytest.mark.parametrize("seed", [pytest.param(s, id=f"case_{s}") for s in range(40)])
def test_random_packings_equal_the_oracle(seed):
    """Random schemes and options, batch 1–3, rows of 1–400 tokens cut into documents of 1–300 tokens
    (ids negative too, never repeated within a row), causal or not, the automatic or a forced backend:
    outputs and every gradient against the oracle (its scheme in float64)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    name = rng.choice(["t5", "offset", "alibi", "kerple-log", "kerple-power", "fire", "rope", "nope"])
    options = random_options(rng, name)
    s = perturb_(posbias.build(name, n_heads=rng.choice([2, 4]), head_dim=rng.choice([8, 16]), **options))
    batch, length = rng.choice([1, 2, 3]), rng.choice([1, 3, 50, 200, 400])
    ids = torch.empty(batch, length, dtype=torch.long)
    for b in range(batch):
        at, doc = 0, rng.randrange(-5, 5)
        while at < length:
            n = rng.choice([1, 1, 2, 7, 30, 129, 300])
            ids[b, at:at + n] = doc
            at, doc = at + n, doc + rng.choice([1, 3, 17])
    causal = rng.random() < 0.7 or getattr(s, "bidirectional", None) is False
    backend = rng.choice(["auto", "auto", "blockwise", "toeplitz", "banded", "windowed", "sdpa", "reference"])
    q, k, v = (torch.randn(batch, s.n_heads, length, s.head_dim, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    exact = copy.deepcopy(s).double()
    out = attention(q.float(), k.float(), v.float(), s, causal=causal, document_ids=ids, backend=backend, strict=False)
    ref = oracle(q, k, v, exact, ids, causal).double()
    torch.testing.assert_close(out.double(), ref, atol=3e-4 * max(1.0, float(ref.detach().abs().max())), rtol=0)
    g = torch.randn_like(ref)
    got = torch.autograd.grad((out.double() * g).sum(), [q, k, v, *s.parameters()], allow_unused=True)
    want = torch.autograd.grad((ref * g).sum(), [q, k, v, *exact.parameters()], allow_unused=True)
    assert_grads_close(got, want, scaled=2e-3, context=f"{name} {options}")
