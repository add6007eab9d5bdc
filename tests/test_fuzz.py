"""Randomised differential test: ``posbias.attention`` against the float64 dense reference on
combinations no hand-written case lists together.

Each case draws, from its own seed, a scheme with its options (T5 causal or bidirectional with any
bucket count, offset clipped or not, ALiBi plain or symmetric, KERPLE, FIRE, RoPE with a scaling,
NoPE) and random learned values; batch, heads, grouped key/value heads, head_dim, query and key
lengths (one query to 700 keys); causal or not; default positions or explicit ones (up to 2²⁰, queries
before, at or past the end of the keys); a key mask (right, left or scattered padding, rows with no
key); the automatic backend or a forced one (``strict=False``); non-contiguous inputs (the transposed
views a model's ``view(b, n, h, d).transpose(1, 2)`` gives); training or not, with gradients to any
subset of q, k, v and to the scheme; dropout (against the reference with the same seed).

The oracle knows nothing of posbias' kernels: per sequence, the reference on the kept keys alone
with their own positions (a query that sees no key: 0), in float64. A case's seed is in the failure
message: ``pytest tests/test_fuzz.py -k 'case_17'`` and :func:`draw` rebuild it.
"""

import random
from dataclasses import dataclass, field

import pytest
import torch

from _helpers import assert_grads_close, perturb_, random_options

from posbias import attention, attention_reference, build

BACKENDS = ["auto"] * 4 + ["sdpa", "windowed", "alibi", "blockwise", "toeplitz", "banded", "reference"]
CASES = 150


@dataclass
class Case:
    seed: int
    scheme: str
    options: dict
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    lq: int
    lk: int
    causal: bool
    starts: tuple[int, int] | None  # first query and key position; None: the defaults
    padding: str | None
    backend: str
    train: bool
    grads: tuple[bool, bool, bool]
    transposed: tuple[bool, bool, bool]
    dropout: float
    state: dict = field(default_factory=dict, repr=False)


def draw(seed: int) -> Case:
    """The case of ``seed``: every choice from one ``random.Random(seed)``."""
    rng = random.Random(seed)
    name = rng.choice(["t5", "t5", "offset", "alibi", "kerple-log", "kerple-power", "fire", "rope", "nope"])
    options = random_options(rng, name)
    heads = rng.choice([2, 4, 8])
    kv_heads = rng.choice([h for h in (1, 2, heads) if heads % h == 0]) if rng.random() < 0.25 else heads
    lk = rng.choice([1, 5, 17, 64, 130, 300, 700])
    lq = rng.choice([1, 2, lk, lk, max(1, lk // 3)])
    causal = rng.random() < 0.6
    starts = None
    if rng.random() < 0.5:
        k0 = rng.choice([0, 0, 7, 1000, 2**20])
        q0 = max(0, k0 + lk - lq + rng.choice([0, 0, -3, 5]))
        starts = (q0, k0)
    padding = rng.choice([None, None, "right", "left", "scattered"])
    train = rng.random() < 0.6
    dropout = rng.choice([0.0, 0.0, 0.0, 0.3]) if padding is None else 0.0
    return Case(seed, name, options, rng.choice([1, 2, 3]), heads, kv_heads, rng.choice([8, 16, 32, 64]), lq, lk,
                causal, starts, padding, rng.choice(BACKENDS), train, tuple(rng.random() < 0.6 for _ in range(3)),
                tuple(rng.random() < 0.5 for _ in range(3)), dropout, {"rng": rng.randrange(2**31)})


def _key_mask(c: Case, g: torch.Generator) -> torch.Tensor | None:
    if c.padding is None:
        return None
    mask = torch.ones(c.batch, c.lk, dtype=torch.bool)
    for b in range(c.batch):
        cut = int(torch.randint(0, c.lk + 1, (), generator=g))  # keys kept (cut = 0: none)
        if c.padding == "right":
            mask[b, cut:] = False
        elif c.padding == "left":
            mask[b, : c.lk - cut] = False
        else:
            mask[b] = torch.rand(c.lk, generator=g) < 0.7
    return mask


def _oracle(c: Case, scheme, q, k, v, q_pos, k_pos, key_mask, seed):
    """Per sequence: the float64 reference on the kept keys with their own positions (the whole batch
    in one call without a mask: the dropout mask hashes each sequence's index in the batch)."""
    k_pos = torch.arange(c.lk) if k_pos is None else k_pos
    q_pos = k_pos[-1] - c.lq + 1 + torch.arange(c.lq) if q_pos is None else q_pos  # queries end with the keys
    args = dict(dropout_p=c.dropout, dropout_seed=seed) if c.dropout else {}
    if key_mask is None:
        return attention_reference(q, k, v, scheme, causal=c.causal, q_pos=q_pos, k_pos=k_pos,
                                   enable_gqa=c.kv_heads != c.heads, **args)
    rows = []
    for b in range(c.batch):
        keep = torch.ones(c.lk, dtype=torch.bool) if key_mask is None else key_mask[b]
        if not bool(keep.any()):
            rows.append(torch.zeros(1, c.heads, c.lq, c.head_dim, dtype=torch.float64) + 0 * q[b:b + 1].sum())
            continue
        rows.append(attention_reference(q[b:b + 1], k[b:b + 1, :, keep], v[b:b + 1, :, keep], scheme, causal=c.causal,
                                        q_pos=q_pos, k_pos=k_pos[keep], enable_gqa=c.kv_heads != c.heads, **args))
    return torch.cat(rows)


def _transposed(t: torch.Tensor, yes: bool) -> torch.Tensor:
    return t.transpose(1, 2).contiguous().transpose(1, 2) if yes else t


@pytest.mark.parametrize("seed", [pytest.param(s, id=f"case_{s}") for s in range(CASES)])
def test_attention_equals_the_reference_on_random_cases(seed):
    c = draw(seed)
    torch.manual_seed(seed)  # the schemes' own initialisation (KERPLE, FIRE) too: a case is its seed alone
    g = torch.Generator().manual_seed(c.state["rng"])
    scheme = perturb_(build(c.scheme, n_heads=c.heads, head_dim=c.head_dim, **c.options), g)
    exact = build(c.scheme, n_heads=c.heads, head_dim=c.head_dim, **c.options).double()
    exact.load_state_dict({n: t.double() if t.is_floating_point() else t for n, t in scheme.state_dict().items()})
    q = torch.randn(c.batch, c.heads, c.lq, c.head_dim, generator=g)
    k, v = (torch.randn(c.batch, c.kv_heads, c.lk, c.head_dim, generator=g) for _ in range(2))
    q_pos = k_pos = None
    if c.starts is not None:
        q_pos, k_pos = torch.arange(c.starts[0], c.starts[0] + c.lq), torch.arange(c.starts[1], c.starts[1] + c.lk)
    key_mask = _key_mask(c, g)
    inputs = [_transposed(t, tr).requires_grad_(c.train and need) for t, tr, need in zip((q, k, v), c.transposed, c.grads)]
    ref_inputs = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    for p in (*scheme.parameters(), *exact.parameters()):
        p.requires_grad_(c.train)
    seed_arg = dict(dropout_p=c.dropout, dropout_seed=1234) if c.dropout else {}

    out = attention(*inputs, scheme, causal=c.causal, q_pos=q_pos, k_pos=k_pos, backend=c.backend, strict=False,
                    enable_gqa=c.kv_heads != c.heads, key_mask=key_mask, **seed_arg)
    ref = _oracle(c, exact, *ref_inputs, q_pos, k_pos, key_mask, 1234)
    assert out.shape == ref.shape and out.dtype == torch.float32, c
    assert bool(torch.isfinite(out).all()), c
    torch.testing.assert_close(out.double(), ref, atol=2e-4 * max(1.0, float(ref.detach().abs().max())), rtol=0, msg=lambda m: f"{c}\n{m}")
    if not (c.train and out.requires_grad and ref.requires_grad):
        return
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (out.double() * go).sum().backward()
    mine = [(n, t, r) for n, t, r in zip("qkv", inputs, ref_inputs) if t.requires_grad]
    mine += [(n, p, e) for (n, p), e in zip(scheme.named_parameters(), exact.parameters())]
    want = torch.autograd.grad((ref * go).sum(), [r for _, _, r in mine], allow_unused=True)
    assert_grads_close([t.grad for _, t, _ in mine], want, scaled=1e-3, names=[n for n, _, _ in mine], context=str(c))
