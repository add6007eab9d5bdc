"""Every backend against the reference: outputs, input gradients and bias-parameter gradients;
causal and bidirectional; query offsets; lengths not divisible by any block size; empty rows."""

import copy

import pytest
import torch
from _helpers import ATTENTION_MODULE, REHEARSED, assert_same_grads, compare, far_rows_case, randomized

import posbias
from posbias import SCHEMES, build
from posbias.attention import (BACKENDS, attention, attention_probs, attention_reference, choose_backend,
                               toeplitz_prefix, toeplitz_view)
from posbias.kernels.reference import reference_probs

CASES = [
    ("t5", "windowed", {"max_distance": 40}, True),
    ("t5", "windowed", {"max_distance": 40, "bidirectional": True}, False),
    ("t5", "windowed", {}, True),  # canonical 32/128: the window exceeds a block
    ("offset", "windowed", {"max_distance": 17}, True),
    ("offset", "windowed", {"max_distance": 17, "bidirectional": True}, False),
    ("offset", "windowed", {"max_distance": 9, "clip": False}, True),
    ("alibi", "alibi", {}, True),
    ("kerple-log", "blockwise", {}, True),
    ("kerple-power", "blockwise", {}, True),
    ("kerple-log", "toeplitz", {}, True),  # learnable: r1/r2 gradients through the row's anti-diagonal sums
    ("kerple-power", "toeplitz", {}, False),
    ("t5", "toeplitz", {"max_distance": 40}, True),  # learnable table
    ("t5", "toeplitz", {"max_distance": 40, "bidirectional": True}, False),
    ("offset", "toeplitz", {"max_distance": 17}, True),
    ("alibi", "toeplitz", {}, True),
    ("fire", "blockwise", {"init_L": 32.0}, True),
    ("fire", "blockwise", {}, False),
    ("alibi", "blockwise", {"symmetric": True}, False),
    ("t5", "blockwise", {"max_distance": 40}, True),  # a Toeplitz block's offsets row and diagonal sums
    ("t5", "blockwise", {"max_distance": 40, "bidirectional": True}, False),
    ("offset", "blockwise", {"max_distance": 17}, True),
    ("t5", "banded", {"max_distance": 40}, True),  # the CUDA candidate, here on the CPU's fused op
    ("t5", "banded", {"max_distance": 40, "bidirectional": True}, False),
    ("t5", "banded", {}, True),
    ("offset", "banded", {"max_distance": 17}, True),
    ("offset", "banded", {"max_distance": 17, "bidirectional": True}, False),
    ("offset", "banded", {"max_distance": 9, "clip": False}, True),
]


@pytest.mark.parametrize("name, backend, options, causal", CASES)
def test_backend_matches_reference(name, backend, options, causal):
    compare(randomized(name, **options), backend, causal=causal)


@pytest.mark.parametrize("name, backend, options, causal", CASES)
def test_backend_with_query_offset(name, backend, options, causal):
    """Chunked evaluation / KV cache: 37 queries at the end of 301 keys."""
    compare(randomized(name, **options), backend, causal=causal, lq=37)


@pytest.mark.parametrize("name, options", [("kerple-log", {}), ("kerple-power", {}), ("alibi", {"symmetric": True}),
                                           ("t5", {"max_distance": 40})])
@pytest.mark.parametrize("causal, lq", [(True, None), (False, None), (True, 37)])
def test_toeplitz_backend_with_a_fixed_bias(name, options, causal, lq):
    """The fused-kernel Toeplitz path: outputs and q/k/v gradients (the bias is a constant here)."""
    s = randomized(name, **options).requires_grad_(False)
    compare(s, "toeplitz", causal=causal, lq=lq, lk=333)
    compare(s, "toeplitz", causal=causal, lk=1200)  # several blocks of 512


@pytest.mark.parametrize("backend", ["windowed", "banded"])
@pytest.mark.parametrize("name, options, causal", [("t5", {"max_distance": 40}, True),
                                                   ("t5", {"max_distance": 40, "bidirectional": True}, False),
                                                   ("offset", {"max_distance": 17}, True)])
def test_a_frozen_table_trains_the_rest_through_the_band_kernels(backend, name, options, causal):
    """A bias that does not train (a frozen table, as when fine-tuning the rest of a model) under the
    windowed and banded kernels: the band's backward on the fused op with the table as its mask instead
    of the dense pass a trained table needs; q/k/v gradients against the reference, over several blocks
    with flat parts on both sides."""
    compare(randomized(name, **options).requires_grad_(False), backend, causal=causal, lk=700)


def test_blockwise_causal_blocks_read_the_keys_up_to_their_last_query():
    """``blockwise``'s blocks ``(start, end, keys)``: a causal block reads only the keys up to its last
    query where the keys are sorted (a run, or increasing positions; searched on the device there), all
    of them where they are not sorted or the call hides nothing (queries after every key: a decoding
    step); a bidirectional call reads them all."""
    from posbias.kernels.blockwise import _Blocks
    from posbias.positions import run

    pos = torch.arange(10)
    for runs in (False, True):  # positions made as runs (their starts known on the host) or plain tensors
        at = (lambda start: run(start, 10)) if runs else (lambda start: pos + start)
        assert list(_Blocks(at(0), at(0), True, 4)) == [(0, 4, 4), (4, 8, 8), (8, 10, 10)]
        assert list(_Blocks(at(3), at(0), True, 4)) == [(0, 4, 7), (4, 8, 10), (8, 10, 10)]  # past the first keys
        assert list(_Blocks(at(0), at(5), True, 4)) == [(0, 4, 0), (4, 8, 3), (8, 10, 5)]  # before them
    assert list(_Blocks(pos, pos * 2, True, 4)) == [(0, 4, 2), (4, 8, 4), (8, 10, 5)]  # sorted, not a run
    for keys, causal in [(torch.tensor([3, 1, 4, 0, 2, 9, 8, 7, 6, 5]), True), (pos, False), (pos - 20, True),
                         (torch.tensor([0, 9, 1, 8, 2, 7, 3, 6, 4, 5]), True)]:  # the first key the lowest, no more
        assert list(_Blocks(pos, keys, causal, 4)) == [(0, 4, 10), (4, 8, 10), (8, 10, 10)], (keys, causal)
    assert list(_Blocks(pos[:1], pos[:1], True, 4)) == [(0, 1, 1)]


def test_blockwise_trains_a_batch_larger_than_its_heads():
    """The scratch buffers of a trained bias's backward blocks hold batch × heads rows of pairs: a batch
    of 4 over one head (the buffer read as ``[B, H, rows, keys]``), against the reference."""
    compare(build("kerple-log", n_heads=1, head_dim=16), "blockwise", causal=True, lk=300, batch=4)


@pytest.mark.parametrize("frozen", [False, True])
def test_windowed_blocks_without_a_band_or_without_keys(frozen):
    """``windowed``'s blocks where a part is empty, trained table or frozen: queries whose every key lies
    beyond the window (the flat part alone, no band), and a whole block of queries before the first key
    (no part at all: rows 0, no gradient), its last query just before that key."""
    from posbias.kernels.windowed import BLOCK

    s = randomized("t5", max_distance=40).requires_grad_(not frozen)
    compare(s, "windowed", lq=37, q0=400)
    compare(s, "windowed", lq=BLOCK + 44, lk=301, q0=-BLOCK)


@pytest.mark.parametrize("causal", [True, False])
def test_windowed_builds_one_band_mask_for_its_interior_blocks(monkeypatch, causal):
    """The band's mask depends on the block's offsets only, so the blocks whose band lies inside the keys
    share one, built once in the forward and once in the backward: the first block's (its band cut by
    the first key), the interior blocks', and (bidirectional) the last block's, cut by the last key."""
    from posbias.kernels import windowed

    built, band = [], windowed._band
    monkeypatch.setattr(windowed, "_band", lambda vals, qa, qb, ka, kb, *a: built.append((qa - ka, qb - qa, kb - ka))
                        or band(vals, qa, qb, ka, kb, *a))
    s = randomized("t5", max_distance=40, bidirectional=not causal)
    q = torch.randn(1, s.n_heads, 6 * windowed.BLOCK, 16, requires_grad=True)
    attention(q, q, q, s, causal=causal, backend="windowed").sum().backward()
    once = built[:len(built) // 2]  # the forward's
    assert len(once) == len(set(once)) == (2 if causal else 3) and built == once * 2, built


@pytest.mark.parametrize("name, options, causal", [("t5", {"max_distance": 40}, True),
                                                   ("t5", {"max_distance": 40, "bidirectional": True}, False),
                                                   ("alibi", {}, True), ("kerple-log", {}, True)])
@pytest.mark.parametrize("lq, q0", [(1, None), (37, None), (5, 100), (5, -2), (3, -5), (3, -3)])
def test_toeplitz_few_queries_at_inference(monkeypatch, name, options, causal, lq, q0):
    """Decoding and short chunks without gradients reverse the queries instead of the key cache: the
    same outputs as the reference, at the end of the keys, in their middle (causal: later keys
    hidden), partly and wholly before them (rows with no visible key give 0), the last one just before
    the first key (no key to hand the fused op, which torch 2.13 answers with a floating point
    exception that ends the process)."""
    from posbias.kernels import toeplitz

    few, calls = toeplitz._few_queries, []
    monkeypatch.setattr(toeplitz, "_few_queries", lambda *a: calls.append(1) or few(*a))
    s = randomized(name, **options)
    q, k, v = (torch.randn(2, 3, n, 16) for n in (lq, 301, 301))
    kw = {} if q0 is None else {"q_pos": torch.arange(q0, q0 + lq)}
    with torch.no_grad():
        out = attention(q, k, v, s, causal=causal, backend="toeplitz", **kw)
        ref = attention_reference(q, k, v, s, causal=causal, **kw)
    assert calls == [1]
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name, options", [("t5", {"max_distance": 40}), ("t5", {"max_distance": 40, "bidirectional": True}),
                                           ("offset", {"max_distance": 9, "clip": False}),
                                           ("offset", {"max_distance": 9, "bidirectional": True}), ("kerple-log", {})])
def test_toeplitz_row_evaluates_a_flat_bias_on_its_window_only(name, options):
    """The per-offset row of a call: a bias flat beyond ``w`` is evaluated on ``−w … w`` and its edge
    values expanded, which gives the same values as evaluating every offset, and the same parameter
    gradients; ranges across the window, inside it, and wholly on one flat side."""
    from posbias.kernels.toeplitz import _row

    s = randomized(name, **options)
    params = [p for p in s.parameters() if p.requires_grad]
    for lo, hi in [(-300, 300), (0, 300), (-300, 0), (50, 300), (-300, -50), (-3, 4), (100, 100), (-41, 41)]:
        want = s.bias_at(torch.arange(lo, hi + 1)).float()
        got = _row(s, lo, hi, torch.device("cpu"))
        assert torch.equal(got, want), (lo, hi)
        g = torch.randn_like(want)
        for a, b in zip(torch.autograd.grad((got * g).sum(), params), torch.autograd.grad((want * g).sum(), params)):
            torch.testing.assert_close(a, b)


def test_auto_backend_choice_follows_the_measurements():
    """Toeplitz biases: the reversed-key toeplitz path, except a learnable bias constant beyond a window
    in training (only the band dense): causally banded from 3072 keys, bidirectionally windowed from
    2560 and banded from 4096, windowed where banded cannot run (queries outside the keys). Gradients,
    length and causality decide, not the scheme's name. FIRE is Toeplitz below its threshold: toeplitz
    there, blockwise where a query reaches it (the queries below then run toeplitz: ``toeplitz_prefix``)."""
    for n, causal, cases in [
            (8, True, [("kerple-log", True, "toeplitz"), ("kerple-log", False, "toeplitz"), ("t5", True, "toeplitz"),
                       ("t5", False, "toeplitz"), ("offset", True, "toeplitz"), ("alibi", True, "toeplitz"),
                       ("fire", True, "toeplitz"), ("rope", True, "sdpa")]),
            (3071, True, [("t5", True, "toeplitz"), ("offset", True, "toeplitz")]),
            (2559, False, [("t5", True, "toeplitz")]),
            (3072, True, [("t5", True, "banded"), ("offset", True, "banded"), ("t5", False, "toeplitz"),
                          ("kerple-log", True, "toeplitz")]),
            (2560, False, [("t5", True, "windowed")]),
            (4095, False, [("t5", True, "windowed")]),
            (4096, False, [("t5", True, "banded")])]:
        q, pos = torch.randn(1, 3, n, 16), torch.arange(n)
        for name, trains, want in cases:
            options = {"bidirectional": True} if not causal else {}
            with torch.set_grad_enabled(trains):
                got = choose_backend(randomized(name, **options), q, q_pos=pos, k_pos=pos, causal=causal)
                assert got == want, (n, causal, name, trains)
    with torch.enable_grad():  # queries before the keys they see: banded cannot, windowed can
        q, pos = torch.randn(1, 3, 3000, 16), torch.arange(3000)
        assert choose_backend(randomized("t5"), q, q_pos=pos, k_pos=pos + 1, causal=False) == "windowed"
    q, pos = torch.randn(1, 3, 200, 16), torch.arange(200)
    # below L: all queries toeplitz; some: the first ones, to where the blockwise blocks read a multiple of 64 keys
    for init_L, want, rows in [(200.0, "toeplitz", 200), (199.5, "toeplitz", 200), (199.0, "blockwise", 192),
                               (150.0, "blockwise", 128), (63.0, "blockwise", 0), (0.5, "blockwise", 0)]:
        fire = build("fire", n_heads=3, head_dim=16, init_L=init_L)
        assert choose_backend(fire, q, q_pos=pos, k_pos=pos, causal=True) == want, init_L
        assert toeplitz_prefix(fire, q, pos, pos)[0] == rows, init_L
    fire = build("fire", n_heads=3, head_dim=16, init_L=160.0)
    assert toeplitz_prefix(fire, q[:, :, :100], pos[:100] + 100, pos)[0] == 28  # 100 … 127, then blocks from 128
    assert toeplitz_prefix(fire, q, pos + 160, pos)[0] == 0  # every query past L
    assert toeplitz_prefix(fire, q, pos * 2, pos) == (0, None)  # not consecutive: the general path


@pytest.mark.parametrize("name", ["kerple-log", "t5"])
def test_toeplitz_training_step_matches_the_reference_over_several_blocks(name):
    """Parameter gradients summed over many blocks (1100 keys, blocks of 512) and a batch of 2."""
    compare(randomized(name), "toeplitz", causal=True, lk=1100)


@pytest.mark.parametrize("name", ["t5", "offset", "kerple-log", "fire"])
def test_rows_without_visible_keys_are_zero_not_nan(name):
    s = randomized(name)
    backend = choose_backend(s, torch.zeros(1, 3, 1, 16), q_pos=torch.arange(-3, 9), k_pos=torch.arange(20),
                             causal=True)
    compare(s, backend, lq=12, lk=20, q0=-3)
    q = torch.randn(1, 3, 12, 16)
    k = torch.randn(1, 3, 20, 16)
    out = attention(q, k, k, s, q_pos=torch.arange(-3, 9))
    assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3]))
    if backend == "toeplitz":  # a whole block of queries before the keys, its last just before the first key
        from posbias.kernels.toeplitz import forward_block

        compare(s, "toeplitz", lq=300, lk=301, q0=-forward_block(301))


@pytest.mark.parametrize("name, options", [("offset", {"max_distance": 17}), ("t5", {"max_distance": 40}),
                                           ("t5", {"max_distance": 40, "bidirectional": True})])
@pytest.mark.parametrize("far", [0, 1, 2])
@pytest.mark.parametrize("backend", ["windowed", "banded"])
def test_a_block_whose_first_query_sees_few_far_keys(name, options, far, backend):
    """The far part's edge: the block's first query sees exactly ``far`` keys at offset >= w (a far part
    of one key was dropped by a `windowed` mutant that every other case passed)."""
    s = randomized(name, **options)
    w = s.flat_beyond
    compare(s, backend, lk=w - 1 + far + 50, lq=50, causal=not options.get("bidirectional", False))


@pytest.mark.parametrize("name, options", [("fire", {}), ("t5", {"max_distance": 40, "bidirectional": True}),
                                           ("alibi", {"symmetric": True})])
@pytest.mark.parametrize("train", [False, True])
def test_blockwise_over_several_blocks_reads_every_key_it_may(name, options, train):
    """Without a causal mask every block reads every key, the keys after its last query included; and a
    causal call whose keys are not in order reads them all too (the cut to the keys before a block's last
    query holds for sorted keys only: a mutant that cut unsorted ones passed every other case)."""
    s = randomized(name, **options).requires_grad_(train)
    compare(s, "blockwise", causal=False, lk=700)  # blocks of 256 query rows: three
    keys = torch.randperm(700)
    compare(s, "blockwise", causal=True, lk=700, k_pos=keys, q_pos=torch.arange(700))
    compare(s, "blockwise", causal=True, lk=2, k_pos=torch.tensor([1, 0]), q_pos=torch.arange(2))  # the fewest


@pytest.mark.parametrize("lk", [1, 2, 255, 256, 257, 513, 1000])
def test_odd_lengths_and_blocks(lk):
    compare(randomized("t5", max_distance=20), "windowed", lk=lk)
    compare(randomized("alibi"), "alibi", lk=lk)


def test_alibi_long_sequence_stays_exact_in_float32():
    s = build("alibi", n_heads=3, head_dim=16)
    q, k, v = (torch.randn(1, 3, 4096, 16) for _ in range(3))
    with torch.no_grad():
        torch.testing.assert_close(attention(q, k, v, s, backend="alibi"), attention(q, k, v, s, backend="blockwise"),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(SCHEMES))
def test_auto_matches_reference_for_every_scheme(name):
    s = randomized(name)
    compare(s, "auto", lk=130)


@pytest.mark.parametrize("name", list(SCHEMES))
def test_prefill_then_decode_equals_full_forward(name):
    """Token-by-token decoding with a growing cache equals the full forward pass."""
    s = randomized(name)
    q, k, v = (torch.randn(1, 3, 40, 16) for _ in range(3))
    with torch.no_grad():
        full = attention(q, k, v, s)
        steps = [attention(q[:, :, :25], k[:, :, :25], v[:, :, :25], s)]
        for t in range(25, 40):
            steps.append(attention(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], s))
    torch.testing.assert_close(torch.cat(steps, 2), full, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend, method, shape", [("blockwise", "bias", (3, 1, 5000)),
                                                   ("toeplitz", "bias_at", (3, 5000))])
def test_decoding_bias_is_linear_in_cache_length(backend, method, shape):
    """One query against K keys: blockwise builds a [H, 1, K] bias, toeplitz a row of K offsets —
    never [H, K, K]."""
    s = randomized("kerple-log")
    seen = []
    orig = getattr(s, method)

    def spy(*args):
        b = orig(*args)
        seen.append(tuple(b.shape))
        return b

    setattr(s, method, spy)
    q, k = torch.randn(1, 3, 1, 16), torch.randn(1, 3, 5000, 16)
    attention(q, k, k, s, backend=backend)
    assert seen == [shape]


@pytest.mark.parametrize("name", ["t5", "alibi", "kerple-log", "fire"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_close_to_fp32(name, dtype):
    s = randomized(name)
    q, k, v = (torch.randn(1, 3, 300, 16) for _ in range(3))
    with torch.no_grad():
        ref = attention_reference(q, k, v, s)
        low = attention(q.to(dtype), k.to(dtype), v.to(dtype), s)
    assert low.dtype == dtype
    torch.testing.assert_close(low.float(), ref, atol=3e-2, rtol=3e-2)


def test_bias_stays_float32_for_bf16_model():
    s = build("alibi", n_heads=4, head_dim=8).to(torch.bfloat16)
    p = torch.arange(4000, 4100)
    b = s.bias(p, p)
    assert b.dtype == torch.float32
    assert len(torch.unique(b[-1, -1])) == 100  # adjacent keys keep distinct biases at position ~4k


def test_forced_backend_that_cannot_run_raises():
    s = build("kerple-log", n_heads=3, head_dim=16)
    q = torch.randn(1, 3, 8, 16)
    with pytest.raises(ValueError, match="backend 'windowed' cannot run this input exactly"):
        attention(q, q, q, s, backend="windowed")
    with pytest.raises(ValueError, match="contiguous positions"):
        attention(q, q, q, build("t5", n_heads=3, head_dim=16), backend="windowed",
                  q_pos=torch.arange(0, 16, 2), k_pos=torch.arange(0, 16, 2))


def test_a_preferred_backend_gives_way_when_not_strict(monkeypatch):
    """``strict=False``: a backend that cannot run these inputs yields to the automatic choice (same
    numbers as ``auto``); one that can is taken as asked."""
    att = ATTENTION_MODULE
    s = randomized("kerple-log")
    q = torch.randn(1, 3, 40, 16)
    ran = []
    for name in ("windowed", "blockwise", "toeplitz"):  # the three paths these calls may take
        real = att.BACKENDS[name]
        monkeypatch.setitem(att.BACKENDS, name, lambda *a, _n=name, _f=real, **kw: ran.append(_n) or _f(*a, **kw))
    got = attention(q, q, q, s, backend="windowed", strict=False)  # KERPLE has no window: not usable
    torch.testing.assert_close(got, attention(q, q, q, s))
    assert ran == [choose_backend(s, q, q_pos=torch.arange(40), k_pos=torch.arange(40), causal=True)] * 2
    ran.clear()
    attention(q, q, q, s, backend="blockwise", strict=False)
    assert ran == ["blockwise"]


def test_non_contiguous_positions_fall_back_exactly():
    s = randomized("t5")
    pos = torch.tensor([0, 3, 4, 10, 11, 50, 51, 52])
    q = torch.randn(1, 3, 8, 16)
    torch.testing.assert_close(attention(q, q, q, s, q_pos=pos, k_pos=pos),
                               attention_reference(q, q, q, s, q_pos=pos, k_pos=pos))


def test_every_backend_listed_is_tested():
    # flex is tested in test_flex.py, banded here and in test_banded.py, triton in test_table_flash.py, the others here
    assert set(BACKENDS) == {"reference", "sdpa", "windowed", "alibi", "blockwise", "toeplitz", "flex", "banded",
                             "triton"}


@pytest.mark.parametrize("seed", range(4))
def test_fire_piecewise_bias_equals_its_mlp(seed):
    """FIRE's bias is evaluated piece by piece; the MLP itself is the reference (outputs and every
    parameter's gradient), including a hidden unit whose input weight is 0 (no kink)."""
    torch.manual_seed(seed)
    s = build("fire", n_heads=3, head_dim=8, init_L=32.0)
    with torch.no_grad():
        for p in s.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        s.mlp[0].weight[seed] = 0.0
    pos = torch.arange(0, 300)
    fast, slow = s.bias(pos, pos), s.mlp_bias(pos, pos)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(fast)
    for a, b in zip(torch.autograd.grad((fast * g).sum(), list(s.parameters())),
                    torch.autograd.grad((slow * g).sum(), list(s.parameters()))):
        # float32 sums over 90,000 pairs in another order: tolerance relative to the gradient's scale
        torch.testing.assert_close(a, b, atol=float(1e-4 * b.abs().max()) + 1e-6, rtol=1e-3)


@pytest.mark.parametrize("outside, inside", [(0, (0.05, 0.75)), (2, (0.05, 0.75)), (30, (0.4, 0.4))])
def test_fire_piecewise_bias_equals_its_mlp_below_and_past_every_kink(outside, inside):
    """Kinks inside the inputs' range, units turning on and off, and a unit of input weight 0 that is
    always on: the pieces below the first kink and past the last are used too (random weights put the
    outer kinks far outside [0, 1], where no input reaches; a wrong first or last piece passed the test
    above). ``outside`` kinks lie below every input; with 30 of them (from −3 to −2) the one kink inside
    (0.4) lies 2.4 past the one before it, so each piece's own interior point must decide which
    units it turns on (one of a neighbour's within 1 of a kink would not)."""
    s = build("fire", n_heads=2, head_dim=8, init_L=32.0)
    width = s.mlp[0].weight.shape[0]
    kinks = torch.cat([torch.linspace(-3.0, -2.0, outside), torch.linspace(*inside, width - 1 - outside)])
    sign = torch.tensor([1.0, -1.0]).repeat(width)[:width - 1]
    with torch.no_grad():
        w1 = torch.cat([torch.zeros(1), sign * (1 + torch.rand(width - 1))])  # unit 0: no kink, relu(0.5)
        s.mlp[0].weight[:, 0] = w1
        s.mlp[0].bias.copy_(torch.cat([torch.tensor([0.5]), -kinks * w1[1:]]))
        s.mlp[2].weight.normal_()
    pos = torch.arange(0, 300)
    x = s.normalized_distance(pos, pos)[torch.ones(300, 300).tril().bool()]
    assert x.min() < kinks[outside] and x.max() > kinks[-1]
    fast, slow = s.bias(pos, pos), s.mlp_bias(pos, pos)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def fire_at(init_L: float, seed: int = 0):
    """FIRE with its MLP and ``c`` moved from their initialisation and its threshold at ``init_L`` exactly."""
    torch.manual_seed(seed)
    s = build("fire", n_heads=3, head_dim=16, init_L=init_L)
    with torch.no_grad():
        for p in [s.c, *s.mlp.parameters()]:
            p.add_(torch.randn_like(p) * 0.5)
    return s


def test_fire_below_its_threshold_is_its_toeplitz_view_bit_for_bit():
    """At queries i < L the view's per-offset bias (:class:`FireBelowThreshold`) is FIRE's own bias, to
    the bit, with the same gradients; at i = L and past it, FIRE differs (the view says nothing there)."""
    s = fire_at(100.0)
    rows, view = s.toeplitz_rows(torch.arange(0, 300))
    assert rows == 100 and s.toeplitz_rows(torch.arange(0, 300))[1] is view  # one view per scheme
    assert list(view.parameters()) == list(s.parameters()) and "_below_threshold" not in s.state_dict()
    q_pos, k_pos = torch.arange(0, 100), torch.arange(0, 300)
    fast, slow = view.bias(q_pos, k_pos), s.bias(q_pos, k_pos)
    assert torch.equal(fast, slow)
    g = torch.randn_like(fast)
    for a, b in zip(torch.autograd.grad((fast * g).sum(), list(s.parameters())),
                    torch.autograd.grad((slow * g).sum(), list(s.parameters()))):
        torch.testing.assert_close(a, b, atol=float(1e-4 * b.abs().max()) + 1e-6, rtol=1e-3)
    assert not torch.equal(view.bias(torch.arange(100, 102), k_pos), s.bias(torch.arange(100, 102), k_pos)[:, :1].expand(-1, 2, -1))
    assert s.toeplitz_rows(torch.arange(150, 160)) == (0, view)  # past L: no row
    twin = copy.deepcopy(s)  # a copy's view reads the copy
    assert twin.toeplitz_rows(q_pos)[1].fire is twin
    with torch.no_grad():
        s.L_multiplier.fill_(float("nan"))
    assert s.toeplitz_rows(q_pos)[0] == 0  # a diverged threshold: the general path


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("init_L, lq, q0, rows", [(400.0, None, None, 301), (150.5, None, None, 128),
                                                  (70.0, None, None, 64), (1.0, None, None, 0), (160.0, 100, 100, 28),
                                                  (150.0, 1, None, 0), (400.0, 1, None, 1)])
def test_fire_runs_its_queries_below_the_threshold_on_the_toeplitz_path(causal, init_L, lq, q0, rows):
    """``auto`` runs FIRE's queries below L on ``toeplitz`` (all of them, or the first ones stacked on
    ``blockwise`` for the rest): outputs, q/k/v gradients and every parameter's gradient (c, L, the MLP)
    equal the reference; decoding below and past L too."""
    s = fire_at(init_L)
    lq_, q0_ = lq or 301, 301 - (lq or 301) if q0 is None else q0
    q_pos = torch.arange(q0_, q0_ + lq_)
    assert toeplitz_prefix(s, torch.zeros(1, 3, lq_, 16), q_pos, torch.arange(301))[0] == rows
    compare(s, "auto", causal=causal, lq=lq, q0=q0, lk=301)


def test_fire_forced_toeplitz_only_where_every_query_is_below_the_threshold():
    s = fire_at(100.0)
    q = torch.randn(1, 3, 100, 16)
    torch.testing.assert_close(attention(q, q, q, s, backend="toeplitz"), attention_reference(q, q, q, s))
    q = torch.randn(1, 3, 101, 16)
    with pytest.raises(ValueError, match="first 100 of 101"):
        attention(q, q, q, s, backend="toeplitz")
    out = attention(q, q, q, s, backend="blockwise")  # forced: blockwise for every query
    torch.testing.assert_close(out, attention_reference(q, q, q, s))


def test_fire_below_its_threshold_lends_its_view_to_dropout_and_to_the_probabilities():
    """Dropout and the probabilities diagnostics read take the Toeplitz view where every query is
    below L: the probabilities bit for bit those of FIRE's own bias; dropout equal to its oracle."""
    s = fire_at(400.0)
    q, k = torch.randn(2, 3, 300, 16), torch.randn(2, 3, 300, 16)
    pos = torch.arange(300)
    assert toeplitz_view(s, pos, pos) is s.toeplitz_rows(pos)[1]
    assert toeplitz_view(s, torch.arange(300, 600), pos) is None and toeplitz_view(s, pos * 2, pos) is None
    for causal in (True, False):
        with torch.no_grad():
            got = attention_probs(q, k, s, causal=causal)
            want = reference_probs(q, k, s, q_pos=pos, k_pos=pos, causal=causal, scale=0.25)
        assert torch.equal(got, want)
    compare(s, "auto", lk=300, dropout_p=0.2, dropout_seed=7)


def test_fire_decoding_below_the_threshold_keeps_its_row_until_a_parameter_moves():
    """Decoding below L reads the Toeplitz view's kept per-offset row; a step of the optimizer (a
    parameter written in place) makes it anew."""
    s = fire_at(400.0)
    k = torch.randn(1, 3, 200, 16)
    q = torch.randn(1, 3, 1, 16)
    with torch.no_grad():
        first = attention(q, k, k, s)
        view = s.toeplitz_rows(torch.arange(199, 200))[1]
        kept_row = view.__dict__["_kept_row"][2]
        torch.testing.assert_close(first, attention_reference(q, k, k, s))
        attention(q, k, k, s)
        assert view.__dict__["_kept_row"][2] is kept_row
        s.mlp[2].weight.add_(0.5)
        torch.testing.assert_close(attention(q, k, k, s), attention_reference(q, k, k, s))
        assert view.__dict__["_kept_row"][2] is not kept_row


@pytest.mark.parametrize("causal, lq, q0", [(True, None, None), (False, None, None), (True, 37, None), (True, 1, None),
                                            (True, 20, 0)])
def test_blockwise_inference_on_the_fused_kernel(causal, lq, q0):
    """At inference the blockwise path hands each block's dense bias to the fused kernel (FIRE)."""
    s = randomized("fire", init_L=32.0)
    lk = 700
    lq = lq or lk
    q, k, v = (torch.randn(2, 3, n, 16) for n in (lq, lk, lk))
    kw = {} if q0 is None else {"q_pos": torch.arange(q0, q0 + lq)}
    with torch.no_grad():
        out = attention(q, k, v, s, causal=causal, backend="blockwise", **kw)
        ref = attention_reference(q, k, v, s, causal=causal, **kw)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name, options", [("fire", {"init_L": 32.0}), ("fire", {}), ("kerple-log", {})])
def test_bias_into_and_bias_grad_agree_with_bias(name, options):
    """The block kernels' hooks: ``bias_into`` writes :meth:`bias`'s values, ``bias_grad`` returns what
    autograd through :meth:`bias` gives (FIRE overrides both; KERPLE takes the defaults)."""
    s = randomized(name, **options)
    qp, kp = torch.arange(200, 264), torch.arange(0, 264)
    want = s.bias(qp, kp)
    out, scratch = torch.empty_like(want), torch.empty_like(want)
    torch.testing.assert_close(s.bias_into(qp, kp, out, scratch), want.detach(), atol=1e-6, rtol=1e-6)
    g = torch.randn_like(want)
    ref = torch.autograd.grad((want * g).sum(), list(s.parameters()), allow_unused=True)
    for a, b in zip(s.bias_grad(qp, kp, g), ref):
        assert (a is None) == (b is None)
        if b is not None:
            torch.testing.assert_close(a, b, atol=float(1e-4 * b.abs().max()) + 1e-6, rtol=1e-3)


def kinks_across_the_unit_interval(s):
    """FIRE ``s`` with its hidden units' kinks ``−b1/w1`` spread evenly over [0.02, 0.98], where its inputs lie."""
    with torch.no_grad():
        s.mlp[0].bias.copy_(-torch.linspace(0.02, 0.98, s.mlp[0].bias.numel()) * s.mlp[0].weight[:, 0])


@pytest.mark.parametrize("heads", [1, 3, 8])
@pytest.mark.parametrize("odd_offset", [False, True])
def test_fire_bias_into_packed_gather_on_block_buffers(heads, odd_offset):
    """FIRE's ``bias_into`` on the kernels' flat buffers: the packed (offset, slope) gather, half the
    heads at a time, in the scratch where it is 8-byte aligned, in a fresh buffer where it is not (an
    odd storage offset) or too small (one head). Every case writes :meth:`bias`'s values."""
    from posbias.schemes.fire import _column_pieces

    s = build("fire", n_heads=heads, head_dim=16, init_L=8.0)
    torch.manual_seed(heads)
    with torch.no_grad():
        for p in s.parameters():
            p.add_(torch.randn_like(p) * 0.7)
    kinks_across_the_unit_interval(s)
    g = torch.Generator().manual_seed(heads)
    qp, kp = torch.randperm(400, generator=g)[:33], torch.randperm(400, generator=g)[:333]  # no runs
    assert _column_pieces(s.normalized_distance(qp, kp).detach(), s.pieces()[0].detach())[1] is None  # the gather
    shape = (heads, len(qp), len(kp))
    size = heads * len(qp) * len(kp)  # odd for 1 and 3 heads: the scratch after ``out`` starts at an odd offset
    flat = torch.full((2 * size + 2,), float("nan"))
    start = 1 if odd_offset else 0
    out, scratch = flat[start:start + size].view(shape), flat[start + size:start + 2 * size].view(shape)
    torch.testing.assert_close(s.bias_into(qp, kp, out, scratch), s.bias(qp, kp).detach(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("heads", [1, 8])
@pytest.mark.parametrize("q_pos, k_pos", [
    (torch.arange(300, 364), torch.arange(0, 364)),          # a causal block past the threshold L
    (torch.arange(300, 364), torch.arange(0, 700)),          # keys past the queries (not causal)
    (torch.arange(363, 299, -1), torch.arange(363, -1, -1)),  # both runs reversed
    (torch.tensor([5000]), torch.arange(0, 5001)),           # one query (decoding)
    (torch.arange(300, 302), torch.arange(0, 302)),          # two queries: their columns still cross kinks
    (torch.arange(10, 40), torch.tensor([5])),                 # one key: its column crosses kinks
    (torch.arange(2**24 + 200, 2**24 + 230), torch.arange(2**24 - 400, 2**24 + 230)),  # past float32 integers
])
def test_fire_bias_into_by_columns(heads, q_pos, k_pos):
    """FIRE's ``bias_into`` on blocks of consecutive positions: one multiply-add per column's piece and
    ``Δslope · relu(x − t_k)`` where a column crosses kinks. Kinks inside the block's range are
    crossed (so the corrections run, but for a single query), every pair gets :meth:`bias`'s value and
    ``bias_grad`` (pairs moved across the kinks their column crosses) autograd's gradients."""
    from posbias.schemes.fire import _column_pieces

    s = build("fire", n_heads=heads, head_dim=16, init_L=8.0)
    torch.manual_seed(1)
    with torch.no_grad():
        s.mlp[0].weight.copy_(torch.randn_like(s.mlp[0].weight))
        s.mlp[0].bias.copy_(-4 * torch.rand_like(s.mlp[0].bias) * s.mlp[0].weight[:, 0])  # kinks in [0, 4]
        s.mlp[2].weight.normal_()
    x = s.normalized_distance(q_pos, k_pos).detach()
    _, runs = _column_pieces(x, s.pieces()[0].detach())
    assert runs is not None and (runs or len(q_pos) == 1)  # a column of one pair crosses no kink
    out, scratch = (torch.full((heads, len(q_pos), len(k_pos)), float("nan")) for _ in range(2))
    torch.testing.assert_close(s.bias_into(q_pos, k_pos, out, scratch), s.bias(q_pos, k_pos).detach(),
                               atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(s.normalized_distance(q_pos, k_pos, out=torch.empty_like(x)), x, atol=0, rtol=0)
    # bias_grad by the same columns: autograd's gradients through bias(), for every parameter
    want = s.bias(q_pos, k_pos)
    g = torch.randn_like(want)
    ref = torch.autograd.grad((want * g).sum(), list(s.parameters()))
    for name, a, b in zip([n for n, _ in s.named_parameters()], s.bias_grad(q_pos, k_pos, g.clone()), ref):
        torch.testing.assert_close(a, b, atol=float(1e-4 * b.abs().max()) + 1e-6, rtol=1e-3, msg=name)


@pytest.mark.parametrize("rows, keys", [(50, 400), (400, 50)])
def test_fire_bias_into_takes_the_gather_where_columns_cross_many_kinks(rows, keys):
    """Positions in no order: a column's pairs span many pieces, so ``bias_into`` gathers per pair and
    ``bias_grad`` finds each pair's piece (more keys than queries, and more queries than keys)."""
    from posbias.schemes.fire import _column_pieces

    s = randomized("fire", init_L=8.0)
    g = torch.Generator().manual_seed(0)
    q_pos, k_pos = torch.randperm(400, generator=g)[:rows], torch.randperm(400, generator=g)[:keys]
    x = s.normalized_distance(q_pos, k_pos).detach()
    kinks_across_the_unit_interval(s)
    assert _column_pieces(x, s.pieces()[0].detach())[1] is None
    out, scratch = (torch.empty(s.n_heads, len(q_pos), len(k_pos)) for _ in range(2))
    want = s.bias(q_pos, k_pos)
    torch.testing.assert_close(s.bias_into(q_pos, k_pos, out, scratch), want.detach(), atol=1e-6, rtol=1e-6)
    g = torch.randn_like(want)
    ref = torch.autograd.grad((want * g).sum(), list(s.parameters()))
    for a, b in zip(s.bias_grad(q_pos, k_pos, g.clone()), ref):
        torch.testing.assert_close(a, b, atol=float(1e-4 * b.abs().max()) + 1e-6, rtol=1e-3)


def test_fire_block_grads_sum_autograd_over_blocks():
    """FIRE's per-call accumulator: blocks of consecutive positions reduced by piece and by diagonal,
    one autograd pass at the end; a block of scattered positions takes ``bias_grad``. The sum equals
    autograd through ``bias`` block by block, for every parameter (queries below and above ``L``),
    whether or not the block's bias was written through the accumulator just before."""
    s = randomized("fire", init_L=40.0)
    blocks = [(torch.arange(0, 37), torch.arange(0, 37)), (torch.arange(37, 101), torch.arange(0, 101)),
              (torch.arange(150, 153), torch.arange(20, 300)), (torch.tensor([90, 5, 60]), torch.arange(0, 91)),
              (torch.arange(5, 6), torch.arange(0, 1))]
    acc, want = s.block_grads(), None
    for n, (q_pos, k_pos) in enumerate(blocks):
        bias = s.bias(q_pos, k_pos)
        g = torch.randn_like(bias)
        out, scratch = torch.empty_like(bias), torch.empty_like(bias)
        if n % 2 == 0:  # as the kernels do: the block's mask written through the accumulator, which keeps x
            torch.testing.assert_close(acc.bias_into(q_pos, k_pos, out, scratch), bias.detach(), atol=1e-6, rtol=1e-6)
        elif n == 1:  # another block written last: its structure must not be taken for this one's
            acc.bias_into(q_pos[:-1], k_pos, out[:, :-1], scratch[:, :-1])
        acc.add(q_pos, k_pos, g.clone())
        ref = torch.autograd.grad((bias * g).sum(), list(s.parameters()))
        want = list(ref) if want is None else [a + b for a, b in zip(want, ref)]
    for name, a, b in zip([n for n, _ in s.named_parameters()], acc.result(), want):
        torch.testing.assert_close(a, b, atol=float(1e-4 * b.abs().max()) + 1e-6, rtol=1e-3, msg=name)


def test_fire_block_grads_take_no_autograd_pass_per_block_of_consecutive_positions(monkeypatch):
    """What the accumulator is for: a block of consecutive positions is reduced without a
    vector-Jacobian product of its own (``bias_grad`` runs for the scattered block alone), a block
    written through the accumulator just before reuses its ``x`` (no second ``normalized_distance``),
    and an empty block adds nothing."""
    from posbias.schemes.fire import FIRE

    s = randomized("fire", init_L=40.0)
    calls = {"bias_grad": 0, "normalized_distance": 0}
    for name in calls:
        method = getattr(FIRE, name)
        def counted(self, *a, _method=method, _name=name, **kw):
            calls[_name] += 1
            return _method(self, *a, **kw)
        monkeypatch.setattr(FIRE, name, counted)
    acc = s.block_grads()
    blocks = [(torch.arange(37, 101), torch.arange(0, 101)), (torch.arange(150, 153), torch.arange(20, 300)),
              (torch.tensor([90, 5, 60]), torch.arange(0, 91)), (torch.arange(0), torch.arange(5))]
    for n, (q_pos, k_pos) in enumerate(blocks):
        grad = torch.randn(s.n_heads, len(q_pos), len(k_pos))
        before = dict(calls)
        if n == 0:
            out = torch.empty_like(grad)
            acc.bias_into(q_pos, k_pos, out, torch.empty_like(grad))
            before = dict(calls)
        acc.add(q_pos, k_pos, grad)
        added = {k: calls[k] - before[k] for k in calls}
        if n == 0:
            assert added == {"bias_grad": 0, "normalized_distance": 0}  # x kept from bias_into
        elif n == 1:
            assert added == {"bias_grad": 0, "normalized_distance": 1}
        else:  # scattered positions, and the empty block: the general path
            assert added["bias_grad"] == 1
    grads = acc.result()
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)


def test_fire_pairs_exactly_on_a_kink_take_its_lower_piece_in_every_path():
    """A pair whose ``x`` is a kink exactly (a hidden unit's ``−b1/w1``): the bias is continuous there,
    but the gradient to the MLP depends on which piece the pair is counted on. ``bias`` (bucketize)
    counts it on the lower piece; the by-columns gradient must too (only pairs strictly above a kink
    move to the next piece), or it differs from autograd by that pair's ``grad · w2 · x``."""
    from posbias.schemes.fire import _column_pieces

    torch.manual_seed(0)
    s = randomized("fire", init_L=8.0)
    q_pos, k_pos = torch.arange(300, 364), torch.arange(0, 364)
    x = s.normalized_distance(q_pos, k_pos).detach()
    r, j = 40, 150
    with torch.no_grad():  # unit 0's kink at x[r, j], exactly: −b1/w1 with w1 = 1
        s.mlp[0].weight[0, 0] = 1.0
        s.mlp[0].bias[0] = -x[r, j]
        s.mlp[2].weight[:, 0] = 3.0
    kinks = s.pieces()[0].detach()
    assert bool((kinks == x[r, j]).any()) and bool((x[:, j].amin() < x[r, j]) & (x[r, j] < x[:, j].amax()))
    assert _column_pieces(x, kinks)[1] is not None  # by columns, where the pair could be moved past its kink
    want = s.bias(q_pos, k_pos)
    g = torch.zeros_like(want)
    g[:, r, j] = 1.0  # the pair on the kink alone
    ref = torch.autograd.grad((want * g).sum(), list(s.parameters()))
    for name, a, b in zip([n for n, _ in s.named_parameters()], s.bias_grad(q_pos, k_pos, g.clone()), ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    acc = s.block_grads()
    acc.add(q_pos, k_pos, g.clone())
    for name, a, b in zip([n for n, _ in s.named_parameters()], acc.result(), ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("rows, keys", [(1, 1), (1, 7), (5, 3), (4, 7), (4, 8), (4, 9), (16, 300)])
@pytest.mark.parametrize("layout", ["contiguous", "rows of a larger block", "keys of a wider block", "transposed",
                                    "broadcast along keys"])
def test_diagonal_and_antidiagonal_sums(rows, keys, layout):
    """The kernels' sums along a block's diagonals (offset tables, FIRE's log-distance table) and
    anti-diagonals (toeplitz's reversed keys), batched over heads, against ``diagonal()``: narrow
    blocks through the padded copy, wide ones (``keys ≥ 2·rows``) through strided views of the block
    itself with the two corners apart; a view into a larger buffer (storage offset) gives the same sums,
    and so do the blocks whose rows are not stored ``keys`` apart or whose keys are not adjacent (the
    padded copy): the keys of a wider block, a transposed block, and a row broadcast along the keys
    (stride 0, as autograd hands the gradient of a sum), which the strided views would misread."""
    from posbias.diagonals import antidiagonal_sums, diagonal_sums

    torch.manual_seed(rows * 1000 + keys)
    if layout == "contiguous":
        y = torch.randn(3, rows, keys, dtype=torch.float64)
    elif layout == "rows of a larger block":
        y = torch.randn(2, 3, rows + 3, keys, dtype=torch.float64)[1, :, 2:rows + 2]
    elif layout == "keys of a wider block":
        y = torch.randn(3, rows, keys + 5, dtype=torch.float64)[..., 2:keys + 2]
    elif layout == "transposed":
        y = torch.randn(3, keys, rows, dtype=torch.float64).transpose(1, 2)
    else:
        y = torch.randn(3, rows, keys, dtype=torch.float64)[..., :1].expand(3, rows, keys)
    want = torch.stack([y.diagonal(u - (rows - 1), 1, 2).sum(-1) for u in range(rows + keys - 1)], -1)
    torch.testing.assert_close(diagonal_sums(y), want)
    torch.testing.assert_close(diagonal_sums(y[0]), want[0])
    flipped = torch.stack([y.flip(1).diagonal(u - (rows - 1), 1, 2).sum(-1) for u in range(rows + keys - 1)], -1)
    torch.testing.assert_close(antidiagonal_sums(y), flipped)
    torch.testing.assert_close(antidiagonal_sums(y[1]), flipped[1])


@pytest.mark.parametrize("frozen", [(), ("c", "L_multiplier"), ("mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias")])
def test_fire_trains_on_the_fused_blocks_across_many_blocks(frozen):
    """Training FIRE on the fused kernel, five query blocks of 64: q/k/v gradients and those of the
    parameters that train (the others get none)."""
    s = randomized("fire", init_L=32.0)
    for name, p in s.named_parameters():
        p.requires_grad_(name not in frozen)
    q, k, v = (torch.randn(2, 3, 301, 16, requires_grad=True) for _ in range(3))
    out = posbias.kernels.blockwise.blockwise_kernel(q, k, v, s, q_pos=torch.arange(301), k_pos=torch.arange(301),
                                                     causal=True, scale=0.25, block=64)
    ref = attention_reference(q, k, v, s)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    g = torch.randn_like(ref)
    params = [p for p in s.parameters() if p.requires_grad]
    got = torch.autograd.grad((out * g).sum(), [q, k, v] + params)
    want = torch.autograd.grad((ref * g).sum(), [q, k, v] + params)
    # the last layer's bias gradient is Σ dS = 0 up to float32 cancellation in either summation
    # order, so the tolerance is relative to the largest gradient, not to each one
    scale = max(float(b.abs().max()) for b in want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5 * scale, rtol=1e-3)


def test_blockwise_without_the_fused_kernel_matches_reference(monkeypatch):
    """Where the fused CPU kernel is missing (CUDA), blocks run the reference, checkpointed in training."""
    monkeypatch.setattr(posbias.kernels.blockwise, "flash_available", lambda x: False)
    compare(randomized("fire", init_L=32.0), "blockwise", lq=37)
    compare(randomized("kerple-log"), "blockwise", causal=False)


@pytest.mark.parametrize("name", ["t5", "fire"])
def test_low_precision_decoding_reads_the_cache_as_it_is(name, monkeypatch):
    """Without autograd a bf16 cache reaches the fused op as it is — no float32 copy of every key and
    value per step (10× unbiased SDPA at 16k keys, measured) — read in place from a strided view of a
    buffer with room to grow; the output is bf16."""
    module = posbias.kernels.toeplitz if name == "t5" else posbias.kernels.blockwise
    seen = []
    original = module.flash_forward

    def spy(q, k, v, *args, **kwargs):
        seen.append((k.dtype, k.data_ptr(), v.data_ptr()))
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(module, "flash_forward", spy)
    s = randomized(name).to(torch.bfloat16)
    buffer = torch.randn(2, 1, 3, 4096, 16).to(torch.bfloat16)  # a cache of 4096 slots, 3000 filled
    k, v = buffer[0, :, :, :3000], buffer[1, :, :, :3000]
    q = torch.randn(1, 3, 1, 16).to(torch.bfloat16)
    with torch.no_grad():
        out = attention(q, k, v, s)
    assert out.dtype == torch.bfloat16
    assert seen == [(torch.bfloat16, k.data_ptr(), v.data_ptr())]


@pytest.mark.parametrize("name, native", [("alibi", True), ("kerple-log", False)])
def test_low_precision_training_under_a_fixed_bias_stays_in_its_dtype(name, native, monkeypatch):
    """Training under a fixed bias (ALiBi) runs the fused op forward and backward in bf16 with the
    float32 bias (the gradients' precision: ``test_devices``); a bias that trains (KERPLE) computes
    in float32, where its table's gradient needs dS."""
    seen = []
    original = posbias.kernels.toeplitz.flash_forward

    def spy(q, *args, **kwargs):
        seen.append(q.dtype)
        return original(q, *args, **kwargs)

    monkeypatch.setattr(posbias.kernels.toeplitz, "flash_forward", spy)
    s = randomized(name)
    q, k, v = (torch.randn(1, 3, 300, 16).to(torch.bfloat16).requires_grad_() for _ in range(3))
    out = attention(q, k, v, s)
    out.float().sum().backward()
    assert out.dtype == q.grad.dtype == k.grad.dtype == v.grad.dtype == torch.bfloat16
    assert set(seen) == {torch.bfloat16 if native else torch.float32}


def test_toeplitz_decoding_row_kept_for_the_layers_of_a_step():
    """Without autograd a decoding call's reversed row is kept for the next call with the same offsets
    (the model's next layer), and made again once the table changes in place or the offsets move."""
    s = randomized("t5", max_distance=40)
    q, k, v = torch.randn(1, s.n_heads, 1, 16), torch.randn(1, s.n_heads, 300, 16), torch.randn(1, s.n_heads, 300, 16)
    with torch.no_grad():
        for change in (None, "table", "offsets"):
            if change == "table":
                s.table.add_(0.5)  # as an optimizer step
            q_pos = torch.tensor([299 if change != "offsets" else 250])
            got = attention(q, k, v, s, q_pos=q_pos)
            held = s.__dict__["_kept_row"][2]
            assert attention(q, k, v, s, q_pos=q_pos) is not None and s.__dict__["_kept_row"][2] is held
            torch.testing.assert_close(got, attention_reference(q, k, v, s, q_pos=q_pos), atol=2e-5, rtol=1e-5)


def test_blockwise_decoding_mask_kept_only_for_the_same_positions_and_parameters():
    """Without autograd a one-block call's mask (FIRE at decoding) is kept for the model's next layer:
    reused for equal positions and unchanged parameters, and made again when the positions differ —
    including a position tensor written in place after the call, as a cache buffer is — when a
    parameter changes in place (an optimizer step) and when autograd is on."""
    s = randomized("fire", init_L=32.0)
    q, k, v = torch.randn(1, 3, 1, 16), torch.randn(1, 3, 200, 16), torch.randn(1, 3, 200, 16)
    pos = torch.arange(200)

    def check(q_pos, k_pos):
        got = attention(q, k, v, s, q_pos=q_pos, k_pos=k_pos)
        want = attention_reference(q, k, v, s, q_pos=q_pos, k_pos=k_pos)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)

    with torch.no_grad():
        q_pos = pos[199:].clone()
        check(q_pos, pos)
        mask = s.__dict__["_kept_mask"][2]
        check(pos[199:], pos.clone())  # equal positions, other tensors: reused
        assert s.__dict__["_kept_mask"][2] is mask
        q_pos += 50  # the first call's tensor, written in place: the mask of query 249 is made, not 199's reused
        check(q_pos, pos)
        assert s.__dict__["_kept_mask"][2] is not mask
        mask = s.__dict__["_kept_mask"][2]
        s.mlp[2].bias.add_(1.0)  # in place, as an optimizer step
        check(q_pos, pos)
        assert s.__dict__["_kept_mask"][2] is not mask
        check(torch.tensor([120]), pos)  # causal: the keys after 120 hidden, in the kept mask too
    s.__dict__.pop("_kept_mask")
    check(pos[199:], pos)  # autograd on: nothing kept
    assert "_kept_mask" not in s.__dict__


def test_toeplitz_window_kept_between_calls_only_while_nothing_changed():
    """Without autograd the window of a flat bias is evaluated once and reused; an in-place change
    of the table (an optimizer step), a new table, other offsets or autograd on each give the values
    of the scheme as it is now."""
    from posbias.kernels.toeplitz import _row, _window

    s = randomized("t5", max_distance=40)
    fresh = lambda lo, hi: s.bias_at(torch.arange(lo, hi + 1)).float()  # noqa: E731
    cpu = torch.device("cpu")
    with torch.no_grad():
        assert torch.equal(_row(s, -5, 300, cpu), fresh(-5, 300))
        w = s.flat_beyond  # the row of offsets −5 … 300 evaluates −5 … w
        assert _window(s, w, -5, w, cpu) is _window(s, w, -5, w, cpu)  # kept
        s.table.add_(1.0)  # in place, as an optimizer step
        assert torch.equal(_row(s, -5, 300, cpu), fresh(-5, 300))
        s.table = torch.nn.Parameter(torch.randn_like(s.table))  # a new table
        assert torch.equal(_row(s, -5, 300, cpu), fresh(-5, 300))
        assert torch.equal(_row(s, 0, 30, cpu), fresh(0, 30))
    with torch.inference_mode():  # a scheme made here has inference tensors, which keep no version: not kept
        s2 = randomized("t5", max_distance=40)
        _row(s2, 0, 300, cpu)
        s2.table.add_(1.0)
        assert torch.equal(_row(s2, 0, 300, cpu), s2.bias_at(torch.arange(0, 301)).float())
    row = _row(s, 0, 300, cpu)  # autograd on: a row with a graph to the table
    (g,) = torch.autograd.grad(row.sum(), s.table)
    assert g.abs().sum() > 0


@pytest.mark.parametrize("name, backend", [("nope", "sdpa"), ("rope", "sdpa"), ("t5", "toeplitz"), ("t5", "banded"),
                                           ("alibi", "auto"), ("kerple-log", "toeplitz"), ("fire", "blockwise")])
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_query_attention_equals_repeated_heads(name, backend, kv_heads):
    """``enable_gqa=True``: query head h reads key/value head h // (H / Hk), as SDPA's enable_gqa does;
    outputs and the gradients of the shared k/v heads and of the scheme equal those of the heads
    repeated by hand."""
    torch.manual_seed(0)
    s = build(name, n_heads=4, head_dim=16)
    q = torch.randn(2, 4, 70, 16, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, 90, 16, requires_grad=True) for _ in range(2))
    out = attention(q, k, v, s, backend=backend, enable_gqa=True)
    kr, vr = (t.repeat_interleave(4 // kv_heads, dim=1) for t in (k, v))
    ref = attention_reference(q, kr, vr, s)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(attention_reference(q, k, v, s, enable_gqa=True), ref, atol=0, rtol=0)
    if name == "nope":  # the grouping is SDPA's own (queries aligned to the end of the keys)
        mask = torch.ones(70, 90, dtype=torch.bool).tril(90 - 70)
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        torch.testing.assert_close(out, sdpa, atol=2e-5, rtol=1e-4)
    assert_same_grads(out, ref, [q, k, v, *(p for p in s.parameters() if p.requires_grad)])


def test_mismatched_heads_dtypes_and_devices_are_refused():
    s = build("t5", n_heads=4, head_dim=16)
    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="q has 4 heads but k and v have 2; .* pass enable_gqa=True"):
        attention(q, k, k, s)
    with pytest.raises(ValueError, match="key/value heads must divide the query heads"):
        attention(q, k[:, :1].expand(1, 3, 8, 16), k[:, :1].expand(1, 3, 8, 16), s, enable_gqa=True)
    with pytest.raises(ValueError, match="one dtype, got torch.float32, torch.float64 and torch.float32"):
        attention(q, q.double(), q, s)
    with pytest.raises(ValueError, match="one dtype"):
        attention_reference(q, q, q.half(), s)
    meta = torch.randn(1, 4, 8, 16, device="meta")
    with pytest.raises(ValueError, match="one device, got cpu, meta and cpu"):
        attention(q, meta, q, s)
    # positions are integers: a float, complex or bool tensor is refused (bool once read as 0s and 1s)
    for bad in (torch.arange(8.0), torch.arange(8) + 0j, torch.arange(8) > 0):
        with pytest.raises(ValueError, match=f"positions must be integers, got dtype {bad.dtype}"):
            attention(q, q, q, s, q_pos=bad)
        with pytest.raises(ValueError, match="positions must be integers"):
            attention_probs(q, q, s, k_pos=bad)
    with pytest.raises(ValueError, match="a mask of keys goes in key_mask"):
        attention(q, q, q, s, k_pos=torch.ones(8, dtype=torch.bool))
    for small in (torch.uint8, torch.int16, torch.int32):  # other integer types are read as they are
        assert torch.equal(attention(q, q, q, s, q_pos=torch.arange(8, dtype=small)), attention(q, q, q, s))


KEY_MASKS = {
    "right padding": lambda lk: [[True] * (lk - 2 * b) + [False] * (2 * b) for b in range(3)],
    "left padding": lambda lk: [[False] * (5 * b) + [True] * (lk - 5 * b) for b in range(3)],
    "scattered, one row hidden entirely": lambda lk: [[j % 3 != 1 for j in range(lk)], [False] * lk,
                                                      [j % 3 != 1 for j in range(lk)]],
    "nothing hidden": lambda lk: [[True] * lk] * 3,
}


@pytest.mark.parametrize("name", list(SCHEMES))
def test_attention_probs_without_grad_are_the_reference_bit_for_bit(name):
    """Without autograd (a diagnosis) attention_probs writes the bias from the scheme's per-offset
    values and works in place: the reference's numbers exactly, for every scheme, causal or not, a
    decoding step, a gap in the positions, grouped key heads, rows that see no key; with autograd it is
    the reference itself, gradients included."""
    from posbias.attention import resolve
    from posbias.kernels.reference import reference_probs

    torch.manual_seed(2)
    s = randomized(name) if SCHEMES[name].learnable else build(name, n_heads=3, head_dim=16)
    cases = [(37, 37, {}), (37, 37, {"causal": False}), (1, 37, {}),
             (5, 9, {"q_pos": torch.tensor([3, 4, 5, 9, 10]), "k_pos": torch.arange(9) * 2}),
             (2, 4, {"q_pos": torch.tensor([0, 5]), "k_pos": torch.arange(1, 5)}),  # row 0 sees no key
             (6, 6, {"enable_gqa": True, "causal": False})]
    for lq, lk, kw in cases:
        q = torch.randn(2, 3, lq, 16)
        k = torch.randn(2, 1 if kw.get("enable_gqa") else 3, lk, 16)
        with torch.no_grad():
            got = attention_probs(q, k, s, **kw)
        # what attention_probs always did: the inputs resolved as for attention, then the reference
        q_r, k_r, _, q_pos, k_pos, scale = resolve(q, k, k, s, q_pos=kw.get("q_pos"), k_pos=kw.get("k_pos"),
                                                   scale=None, enable_gqa=kw.get("enable_gqa", False))
        want = reference_probs(q_r, k_r, s, q_pos=q_pos, k_pos=k_pos, causal=kw.get("causal", True), scale=scale)
        assert torch.equal(got, want), (name, lq, lk, kw)
    q = torch.randn(1, 3, 12, 16, requires_grad=True)
    k = torch.randn(1, 3, 12, 16, requires_grad=True)
    p = attention_probs(q, k, s)
    assert p.requires_grad and p.grad_fn is not None


@pytest.mark.parametrize("mask_kind", KEY_MASKS)
@pytest.mark.parametrize("name", ["t5", "alibi", "kerple-log", "fire", "rope", "nope"])
def test_key_mask_equals_renormalised_probabilities(name, mask_kind):
    """``key_mask``: the output is the full attention's probabilities restricted to the kept keys and
    renormalised (an independent formula: one dense softmax over all keys), with 0 for a query that
    keeps no visible key; q/k/v and scheme gradients too."""
    torch.manual_seed(1)
    s = randomized(name) if SCHEMES[name].learnable else build(name, n_heads=3, head_dim=16)
    lq, lk = 40, 48
    q = torch.randn(3, 3, lq, 16, requires_grad=True)
    k, v = (torch.randn(3, 3, lk, 16, requires_grad=True) for _ in range(2))
    mask = torch.tensor(KEY_MASKS[mask_kind](lk))
    out = posbias.attention(q, k, v, s, key_mask=mask)
    p = attention_probs(q, k, s) * mask[:, None, None, :]
    total = p.sum(-1, keepdim=True)
    want = (p / total.clamp_min(1e-30)) @ v  # a query with no kept visible key: p = 0, so 0
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)
    assert_same_grads(out, want, [q, k, v, *(p for p in s.parameters() if p.requires_grad)])


def test_key_mask_runs_padded_sequences_on_the_fast_path(monkeypatch):
    """Right and left padding keep one run of keys: the sequences go as slices to the backend an unpadded
    batch takes (toeplitz for t5), one call per distinct mask; a bad mask is one clear error."""
    seen = []
    real = BACKENDS["toeplitz"]
    monkeypatch.setitem(BACKENDS, "toeplitz", lambda q, k, *a, **kw: seen.append(tuple(k.shape)) or real(q, k, *a, **kw))
    s = build("t5", n_heads=2, head_dim=16)
    q = torch.randn(4, 2, 64, 16)
    mask = torch.ones(4, 64, dtype=torch.bool)
    mask[1, 50:] = False
    mask[3, :10] = False
    out = posbias.attention(q, q, q, s, key_mask=mask)
    assert sorted(seen) == [(1, 2, 50, 16), (1, 2, 54, 16), (2, 2, 64, 16)]
    torch.testing.assert_close(out[[0, 2]], posbias.attention(q[[0, 2]], q[[0, 2]], q[[0, 2]], s))
    with pytest.raises(ValueError, match=r"key_mask must be a bool tensor \[batch, Lk\] = \[4, 64\].*torch.int64"):
        posbias.attention(q, q, q, s, key_mask=mask.long())
    with pytest.raises(ValueError, match="key_mask must be a bool tensor"):
        posbias.attention(q, q, q, s, key_mask=mask[:, :63])
    seen.clear()  # nothing hidden: one plain call; no keys or no sequences: the empty result
    torch.testing.assert_close(posbias.attention(q, q, q, s, key_mask=torch.ones_like(mask)), posbias.attention(q, q, q, s))
    assert seen == [(4, 2, 64, 16)] * 2
    none = torch.zeros(4, 2, 0, 16)
    assert not posbias.attention(q, none, none, s, key_mask=torch.ones(4, 0, dtype=torch.bool)).any()
    assert posbias.attention(q[:0], q[:0], q[:0], s, key_mask=mask[:0]).shape == (0, 2, 64, 16)


def test_key_mask_with_grouped_queries_and_decoding():
    """One query against a padded cache, with grouped key/value heads: the kept keys only."""
    s = build("alibi", n_heads=4, head_dim=16)
    q = torch.randn(2, 4, 1, 16)
    k, v = torch.randn(2, 2, 30, 16), torch.randn(2, 2, 30, 16)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[0, :7] = False
    out = posbias.attention(q, k, v, s, key_mask=mask, enable_gqa=True)
    first = posbias.attention(q[:1], k[:1, :, 7:], v[:1, :, 7:], s, enable_gqa=True, q_pos=torch.tensor([29]),
                              k_pos=torch.arange(7, 30))
    torch.testing.assert_close(out[:1], first)
    torch.testing.assert_close(out[1:], posbias.attention(q[1:], k[1:], v[1:], s, enable_gqa=True))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["t5", "alibi"])
def test_attention_inside_torch_compile_equals_eager(name):
    """A user's compiled model calling ``posbias.attention``: dynamo breaks the graph where posbias reads
    positions and shapes (about 10–20 s of compiling on the CPU), and the output and every gradient equal
    eager's."""
    torch._dynamo.reset()
    s = randomized(name) if SCHEMES[name].learnable else build(name, n_heads=3, head_dim=16)
    q, k, v = (torch.randn(2, 3, 300, 16, requires_grad=True) for _ in range(3))
    inputs = [q, k, v, *(p for p in s.parameters() if p.requires_grad)]

    def f(q, k, v):
        return posbias.attention(q, k, v, s) * 1.5

    out, ref = torch.compile(f)(q, k, v), f(q, k, v)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert_same_grads(out, ref, inputs, atol=2e-5, rtol=1e-4)


def test_readme_quick_start_runs_as_written():
    """The README's first code block, executed verbatim; its padded call equals attention on the 3000
    real keys (the 1096 queries after them see those same keys); its dropout call ran."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    env: dict = {}
    exec(compile(code, "README.md", "exec"), env)
    q, k, v, scheme = env["q"], env["k"], env["v"], env["scheme"]
    want = attention(q, k[:, :, :3000], v[:, :, :3000], scheme, q_pos=torch.arange(4096), k_pos=torch.arange(3000))
    torch.testing.assert_close(env["out"], want)
    dropped = env["train"]  # the dropout call: finite, and not the call without dropout
    assert torch.isfinite(dropped).all() and not torch.allclose(dropped, attention(q, k, v, scheme), atol=1e-3)


@pytest.mark.parametrize("device", REHEARSED)
@pytest.mark.parametrize("name", ["t5", "alibi", "fire", "rope"])
def test_key_mask_with_grouped_heads_on_every_device(name, device):
    """Both at once, on the automatic backend of each device (the CUDA twin runs where a GPU is): a
    left- and a right-padded sequence with 2 key/value heads for 4 query heads equal the renormalised
    dense softmax over the repeated heads, gradients included."""
    torch.manual_seed(2)
    s = build(name, n_heads=4, head_dim=16).to(device)
    q = torch.randn(2, 4, 50, 16, device=device, requires_grad=True)
    k, v = (torch.randn(2, 2, 50, 16, device=device, requires_grad=True) for _ in range(2))
    mask = torch.ones(2, 50, dtype=torch.bool, device=device)
    mask[0, :9], mask[1, 41:] = False, False
    out = attention(q, k, v, s, key_mask=mask, enable_gqa=True)
    kr, vr = (t.repeat_interleave(2, dim=1) for t in (k, v))
    p = attention_probs(q, kr, s) * mask[:, None, None, :]
    want = (p / p.sum(-1, keepdim=True).clamp_min(1e-30)) @ vr
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)
    assert_same_grads(out, want, [q, k, v, *(x for x in s.parameters() if x.requires_grad)])


@pytest.mark.parametrize("name", ["t5", "alibi", "kerple-log", "fire", "rope", "nope"])
@pytest.mark.parametrize("lq", [1, 7, 90])  # decoding, a chunk, prefill
def test_grouped_heads_read_as_they_are_at_inference(name, lq, monkeypatch):
    """At inference the grouped keys and values reach the attention op itself uncopied — SDPA (its own
    ``enable_gqa``) for rope/nope, the fused CPU op for toeplitz and blockwise (it reads one key/value
    head per group of query heads) — and every scheme's output equals the reference over heads
    repeated by hand."""
    import posbias.kernels.blockwise as bw
    import posbias.kernels.toeplitz as tp

    seen = []  # the key/value heads each attention op was given

    def spy(real):
        return lambda q, k, *a, **kw: seen.append(k.shape[1]) or real(q, k, *a, **kw)

    for module in (tp, bw):
        monkeypatch.setattr(module, "flash_forward", spy(module.flash_forward))
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        spy(torch.nn.functional.scaled_dot_product_attention))
    torch.manual_seed(3)
    s = build(name, n_heads=4, head_dim=16)
    q, k, v = torch.randn(2, 4, lq, 16), torch.randn(2, 2, 90, 16), torch.randn(2, 2, 90, 16)
    with torch.no_grad():
        out = attention(q, k, v, s, enable_gqa=True)
    assert seen and set(seen) == {2}, seen
    monkeypatch.undo()
    ref = attention_reference(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), s)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["kerple-power", "kerple-log"])
@pytest.mark.parametrize("shift", [1.0, 2.0])  # steep heads: r1 up to ~4, KERPLE-power's r2 up to its clamp at 2
def test_toeplitz_parameter_gradients_are_as_close_to_float64_as_the_reference(name, shift):
    """The bias-parameter gradient summed along 1,100 diagonals (blocks of 512) in float32 is float32
    rounding, no worse conditioned than the dense reference: against the same attention computed wholly
    in float64, both within 1e-4 of the largest gradient, the Toeplitz sums within 10× the reference's
    error (measured over 5 seeds × 3 steepnesses: reference 1e-7 – 7e-6, toeplitz 1e-7 – 2e-5)."""
    torch.manual_seed(1)
    s = build(name, n_heads=3, head_dim=16)
    with torch.no_grad():
        for p in s.parameters():
            p.add_(torch.randn_like(p) * 0.7 + shift)
    params = [p for p in s.parameters() if p.requires_grad]
    q, k, v, g = (torch.randn(1, 3, 1100, 16) for _ in range(4))
    pos = torch.arange(1100)
    off = pos[:, None] - pos[None, :]
    s.double()
    logits = (q.double() @ k.double().transpose(-1, -2)) * 16 ** -0.5 + s.bias_at(off)
    truth = torch.softmax(logits.masked_fill(off < 0, float("-inf")), -1) @ v.double()
    want = torch.autograd.grad((truth * g.double()).sum(), params)
    s.float()
    for backend in ("reference", "toeplitz"):
        out = attention(q, k, v, s, causal=True, backend=backend)
        got = torch.autograd.grad((out * g).sum(), params)
        err = max(float((a.double() - w).abs().max() / w.abs().max()) for a, w in zip(got, want))
        assert err < 1e-4, (backend, err)
        if backend == "reference":
            ref_err = err
    assert err <= 10 * ref_err + 2e-6, (err, ref_err)


@pytest.mark.parametrize("backend", ["toeplitz", "blockwise"])
def test_rows_whose_keys_all_lie_far_get_a_softmax_backward(backend):
    """Queries 600 past their last key under a steep learned bias (KERPLE-power, r2 up to 1.1): every
    logit a row sees is near −600, and so is its float32 log-sum-exp, off by up to 3e-5 there. ``exp(S −
    lse)`` then carries that error over the whole row, and ``δ = dO · O`` from the forward no longer
    cancels the row's ``dP``; the backward blocks renormalise such rows and take ``δ`` from their own
    ``P`` (:func:`~posbias.kernels.flash.mask_backward`).

    q/k/v's gradients against exact attention on the same (float32) bias values: within 3× SDPA's math
    path on the dense bias (measured 0.6–1.0×; before, 3.6×, 7× and 60× for q, k and v, as torch's
    fused flash backward still gives). The parameters' against a computation in float64 throughout,
    the bias included (the float32 bias is itself off by its rounding near −600, for every path alike):
    within 3× SDPA's (measured toeplitz 1.3–1.7×, blockwise 0.5–0.8×; before, 2.3–2.4×)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    s, q, k, v, q_pos, k_pos, g = far_rows_case()

    def grads(run, scheme, dtype):
        inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = run(*inputs, scheme)
        return torch.autograd.grad((out.double() * g).sum(), inputs + list(scheme.parameters()))

    def sdpa(q_, k_, v_, scheme):
        with sdpa_kernel(SDPBackend.MATH):
            return scaled_dot_product_attention(q_, k_, v_, attn_mask=scheme.bias(q_pos, k_pos)[None],
                                                scale=scheme.default_scale())

    def float64_throughout(q_, k_, v_, scheme):
        dist = (q_pos[:, None] - k_pos[None, :]).double()
        bias = -scheme.r1.view(-1, 1, 1) * dist.pow(scheme.r2.view(-1, 1, 1))
        return torch.softmax(q_ @ k_.transpose(-1, -2) * 32 ** -0.5 + bias, -1) @ v_

    on_the_bias = grads(lambda *a: attention_reference(*a, q_pos=q_pos, k_pos=k_pos), copy.deepcopy(s).double(),
                        torch.float64)
    exact = grads(float64_throughout, copy.deepcopy(s).double(), torch.float64)
    mine = grads(lambda *a: attention(*a, q_pos=q_pos, k_pos=k_pos, backend=backend), s, torch.float32)
    base = grads(sdpa, s, torch.float32)
    for n, name in enumerate(["q", "k", "v", "r1", "r2"]):
        truth = on_the_bias[n] if n < 3 else exact[n]
        errors = [float((got[n].double() - truth).abs().max() / truth.abs().max()) for got in (mine, base)]
        assert errors[0] <= 3 * errors[1], (name, errors)


def test_rows_of_a_usual_log_sum_exp_take_the_backward_unchanged():
    """Where every finite log-sum-exp of a block lies within ±64 (:data:`~posbias.kernels.flash.WIDE_LSE`;
    a row that sees its own key, unless its logits are large) or is −∞ (a row that sees no key), the
    whole-rows backward is the usual one, bit for bit; past it a row's ``dS`` sums to 0."""
    from posbias.kernels.flash import mask_backward

    torch.manual_seed(0)
    q, k, v, dout = (torch.randn(1, 2, n, 16) for n in (8, 12, 12, 8))
    mask = torch.zeros(2, 8, 12)
    mask[:, 0] = float("-inf")  # a row that sees no key
    lse = torch.logsumexp(q @ k.transpose(-1, -2) * 0.25 + mask, -1)
    delta = torch.randn(1, 2, 8)
    usual = mask_backward(q, k, v, dout, lse, delta, mask, 0.25)
    whole = mask_backward(q, k, v, dout, lse, delta, mask, 0.25, whole_rows=True)
    for a, b in zip(usual, whole):
        assert torch.equal(a, b)
    far = mask - 500.0
    lse_far = torch.logsumexp(q @ k.transpose(-1, -2) * 0.25 + far, -1)
    lse_far[:, :, 1:] += 3e-5 * 500  # the float32 rounding of a wide log-sum-exp, exaggerated
    dq, dk, dv, ds = mask_backward(q, k, v, dout, lse_far, delta, far, 0.25, whole_rows=True)
    torch.testing.assert_close(ds[:, 1:].sum(-1), torch.zeros(2, 7), atol=1e-5, rtol=0)  # Σ_j dS_ij = 0: a softmax's
    assert not ds[:, 0].any()  # the row that sees no key: nothing


@pytest.mark.parametrize("scale", [1.0, 0.25, 2.0])
@pytest.mark.parametrize("batch", [1, 2])
def test_a_blocks_backward_is_autograds_through_a_dense_softmax(scale, batch):
    """:func:`~posbias.kernels.flash.mask_backward` on one block against autograd through
    ``softmax(scale·q·kᵀ + mask)·v``: q, k and v's gradients, and ``dS`` (the gradient of the logits,
    which the kernels turn into the bias's) summed over the batch. Scales 1 (T5: unscaled, the queries
    taken as they are), the default 1/√d, and one a user passes above 1; a batch of one writes ``P`` and
    ``dP`` into the reused scratch buffer, and its ``dS`` is a view of it."""
    from posbias.kernels.flash import block_work, mask_backward

    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, 2, n, 16, dtype=torch.float64).requires_grad_() for n in (6, 9, 9))
    mask = torch.randn(2, 6, 9, dtype=torch.float64)
    mask[:, 0, 4:] = float("-inf")
    logits = q @ k.transpose(-1, -2) * scale + mask
    logits.retain_grad()
    out = torch.softmax(logits, -1) @ v
    dout = torch.randn_like(out)
    (out * dout).sum().backward()
    lse = torch.logsumexp(logits.detach(), -1).float()
    delta = (dout * out.detach()).sum(-1).float()
    work = block_work(6 * 9 * 2 * batch, q.device) if batch == 1 else None
    got = mask_backward(*(t.detach().float() for t in (q, k, v, dout)), lse, delta, mask.float(), scale, work=work)
    for name, a, b in zip("qkvS", got, (q.grad, k.grad, v.grad, logits.grad.sum(0))):
        assert (a.double() - b).abs().max() <= 1e-5 * b.abs().max(), name


def test_wide_log_sum_exps_and_the_rows_per_block():
    """Rules read by no output, each measured (their docstrings): a block takes the softmax backward when
    a finite log-sum-exp lies beyond ±64 (−∞, a row without keys, does not count, nor its clamped value);
    a backward block has at most 128 rows, at least 64, and otherwise ``P``'s 4M float32 elements (16 MB)
    over batch × heads × keys; a forward block of ``toeplitz`` has an eighth of the keys, from 256 to 1024."""
    from posbias.kernels.flash import WIDE_LSE, _wide, backward_rows
    from posbias.kernels.toeplitz import forward_block

    assert WIDE_LSE == 64.0
    for values, wide in [([63.9, -63.9, 0.0], False), ([64.0], False), ([64.1], True), ([-64.1], True),
                         ([float("-inf"), 10.0], False), ([float("-inf"), -70.0], True),
                         ([torch.finfo(torch.float32).min], False)]:  # a −∞ clamped to float32's lowest
        assert _wide(torch.tensor(values)) is wide, values
    for (b, h, keys), rows in [((1, 8, 1024), 128), ((1, 8, 4096), 128), ((1, 8, 5000), 104), ((2, 8, 8192), 64),
                               ((1, 1, 0), 128)]:
        got = backward_rows(torch.empty(b, h, 1, 1), keys)
        assert got == rows and isinstance(got, int), ((b, h, keys), got)
    assert [forward_block(n) for n in (1, 2055, 2056, 4100, 8192, 8200, 9000, 65536)] == [256, 256, 257, 512, 1024,
                                                                                            1024, 1024, 1024]


def test_the_fused_ops_inputs_keep_half_precision_and_else_go_float32():
    """:func:`~posbias.kernels.flash.fused_inputs`: bf16 or fp16 throughout stay as they are; anything
    else (float64, or half precision mixed with another dtype) goes float32; a last dimension that is
    not contiguous is copied, other strides are kept (a view of a decoding cache)."""
    from posbias.kernels.flash import fused_inputs

    for dtypes, want in [((torch.bfloat16,) * 3, torch.bfloat16), ((torch.float16,) * 3, torch.float16),
                         ((torch.float64,) * 3, torch.float32), ((torch.bfloat16, torch.float32, torch.float32),
                                                                 torch.float32),
                         ((torch.float16, torch.float16, torch.bfloat16), torch.float32)]:
        got = fused_inputs(*(torch.randn(1, 2, 3, 4, dtype=d) for d in dtypes))
        assert [t.dtype for t in got] == [want] * 3, dtypes
    cache = torch.randn(1, 2, 10, 4)
    view, strided = fused_inputs(cache[:, :, :5], cache.transpose(-1, -2))
    assert view.data_ptr() == cache.data_ptr() and not view.is_contiguous()
    assert strided.stride(-1) == 1 and torch.equal(strided, cache.transpose(-1, -2))


def test_inputs_an_older_fused_op_misreads_are_handed_to_it_in_a_form_it_reads(monkeypatch):
    """torch 2.6's fused CPU op reads a mask as if its rows were contiguous and returns NaN for grouped
    keys and values (2.8: the grouped case), without an error. :func:`~posbias.kernels.flash.op_reads`
    measures what the installed op reads; where a check fails, masks go in contiguous and heads repeated.
    Here the checks are made to fail: the paths that hand those inputs (windowed's band mask of two
    blocks, toeplitz's masks whose rows overlap in memory, for a prompt and for a few queries against
    a cache, grouped decoding on toeplitz and blockwise) still equal the reference, and the op sees no
    strided or overlapping mask and no grouped heads."""
    from posbias.kernels import flash

    reads = flash.op_reads()
    if torch.__version__ >= (2, 13):  # what this project's torch reads (2.6: strided masks and grouped heads not)
        assert reads == flash.OpReads(True, True, True)
    monkeypatch.setattr(flash, "op_reads", lambda: flash.OpReads(False, False, False))
    seen = []
    real = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    class Op:  # records what the op is handed
        def __call__(self, q, k, v, *args, attn_mask=None, **kw):
            seen.append((q.shape[1] == k.shape[1], attn_mask is None or attn_mask.is_contiguous()))
            return real(q, k, v, *args, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", Op())
    torch.manual_seed(0)
    s = randomized("t5", max_distance=40, bidirectional=True)
    q, k, v = (torch.randn(2, s.n_heads, 301, 16) for _ in range(3))
    with torch.no_grad():
        torch.testing.assert_close(attention(q, k, v, s, causal=False, backend="windowed"),
                                   attention_reference(q, k, v, s, causal=False), atol=2e-5, rtol=1e-4)
        a = randomized("alibi")
        for lq in (301, 3):  # a prompt, then three queries at the end of the cache
            qa = torch.randn(1, a.n_heads, lq, 16)
            torch.testing.assert_close(attention(qa, k[:1], v[:1], a, backend="toeplitz"),
                                       attention_reference(qa, k[:1], v[:1], a), atol=2e-5, rtol=1e-4)
        for name in ("t5", "fire"):
            g = randomized(name)
            q1, k1, v1 = torch.randn(1, g.n_heads, 1, 16), *(torch.randn(1, 1, 90, 16) for _ in range(2))
            torch.testing.assert_close(attention(q1, k1, v1, g, enable_gqa=True),
                                       attention_reference(q1, k1, v1, g, enable_gqa=True), atol=2e-5, rtol=1e-4)
    assert seen and all(same_heads and contiguous for same_heads, contiguous in seen)


def test_inputs_are_copied_only_where_the_op_would_misread_them(monkeypatch):
    """:func:`~posbias.kernels.flash.readable` copies a mask only where this torch misreads its layout and
    repeats grouped heads only where it misreads those: a copied ``[H, L, L]`` mask or repeated keys
    would cost what the zero-copy views save. A mask whose last dimension is not contiguous (a
    flipped view, every second key) is *strided*; one whose rows start less than a row apart (an
    ``unfold`` window, a row broadcast over queries, stride 0) is *overlapping*; a single row, a
    single key, a contiguous mask and one whose rows are further apart than a row are neither."""
    from posbias.kernels import flash

    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 4, 5, 8)
    row = torch.randn(2, 7)
    strided, overlapping = "strided_masks", "overlapping_masks"  # what each mask is, by the OpReads field it needs
    masks = {"strided": (torch.randn(2, 5, 3).transpose(-1, -2), strided),
             "strided 2-D": (torch.randn(5, 3).t(), strided),
             "every second key": (torch.randn(2, 3, 10)[..., ::2], strided),
             "two keys": (torch.randn(2, 2, 3).transpose(-1, -2), strided),
             "one strided row": (torch.randn(2, 5, 3).mT[:, :1], strided),
             "overlapping": (row.unfold(-1, 5, 1), overlapping),
             "broadcast rows": (row[:, None, :5].expand(2, 3, 5), overlapping),
             "two overlapping rows": (row.unfold(-1, 5, 1)[:, :2], overlapping),
             "rows three apart": (torch.randn(2, 11).unfold(-1, 5, 3), overlapping),
             "contiguous": (torch.randn(2, 3, 5), None), "rows further apart": (torch.randn(2, 3, 9)[..., :5], None),
             "one row": (row.unfold(-1, 5, 1)[:, :1], None), "one key": (torch.randn(2, 1, 3).transpose(-1, -2), None)}
    for reads in [flash.OpReads(False, True, True), flash.OpReads(True, False, True), flash.OpReads(True, True, True)]:
        monkeypatch.setattr(flash, "op_reads", lambda reads=reads: reads)
        for name, (mask, kind) in masks.items():
            misread = kind is not None and not getattr(reads, kind)
            k_out, v_out, got = flash.readable(q, k, k, mask)
            assert k_out is k and v_out is k, name
            assert torch.equal(got, mask) and (got.is_contiguous() if misread else got is mask), (reads, name)
    k2 = torch.randn(1, 2, 5, 8)
    for grouped in (True, False):
        monkeypatch.setattr(flash, "op_reads", lambda grouped=grouped: flash.OpReads(True, True, grouped))
        k_out, v_out, _ = flash.readable(q, k2, k2, None)
        assert (k_out is k2) if grouped else torch.equal(k_out, k2.repeat_interleave(2, 1))
        assert flash.readable(q, k, k, None)[0] is k  # the queries' head count: nothing to repeat


TOEPLITZ_OPTIONS = [("t5", {"max_distance": 40}), ("t5", {"max_distance": 40, "bidirectional": True}),
                    ("offset", {"max_distance": 17}), ("offset", {"max_distance": 9, "clip": False}),
                    ("alibi", {}), ("alibi", {"symmetric": True}), ("kerple-log", {}), ("kerple-power", {})]


@pytest.mark.parametrize("name, options", TOEPLITZ_OPTIONS)
def test_toeplitz_bias_from_its_offsets_is_the_per_pair_bias(name, options):
    """A Toeplitz scheme's ``bias`` at consecutive positions (its offsets once, laid out as windows) and
    ``bias_into`` (a strided view of them, copied out) against ``bias_at`` on every pair's offset: equal
    values (bit for bit but KERPLE-power's pow) also past 2^24, with queries before, inside and after the
    keys, blocks wider than tall and taller than wide; gradients equal to rounding; other positions take
    the per-pair form itself."""
    s = randomized(name, **options)

    def per_pair(qp, kp):
        return s.bias_at(qp[:, None] - kp[None, :])

    for q0, k0, rows, keys in [(0, 0, 64, 64), (100, 0, 7, 130), (0, 50, 9, 20), (2**40, 2**40 - 300, 33, 301),
                               (5, 5, 1, 40), (5, 5, 40, 1), (0, 2, 9, 4), (7, 30, 2, 6), (100, 90, 6, 2)]:
        qp, kp = torch.arange(q0, q0 + rows), torch.arange(k0, k0 + keys)
        got, want = s.bias(qp, kp), per_pair(qp, kp)
        with torch.no_grad():
            written = s.bias_into(qp, kp, torch.empty(s.n_heads, rows, keys), torch.empty(0))
        assert got.shape == want.shape == (s.n_heads, rows, keys)
        for values in (got, written):
            if name == "kerple-power":  # pow's vectorised and scalar loops round its last bit apart
                torch.testing.assert_close(values, want, atol=1e-6, rtol=1e-6)
            else:
                assert torch.equal(values, want), (q0, k0, rows, keys)
        g = torch.randn_like(want)
        params = [p for p in s.parameters() if p.requires_grad]
        if params:
            for a, b in zip(torch.autograd.grad((got * g).sum(), params), torch.autograd.grad((want * g).sum(), params)):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    scattered = torch.tensor([0, 3, 4, 9])
    for qp in (scattered, torch.arange(5, 9)):  # keys that are no run, queries that are one or not
        assert torch.equal(s.bias(qp, scattered), per_pair(qp, scattered))
        with torch.no_grad():
            written = s.bias_into(qp, scattered, torch.empty(s.n_heads, 4, 4), torch.empty(s.n_heads, 4, 4))
        assert torch.equal(written, per_pair(qp, scattered).detach())


@pytest.mark.parametrize("name, options", TOEPLITZ_OPTIONS + [("fire", {"init_L": 32.0})])
@pytest.mark.parametrize("causal", [True, False])
def test_dense_blockwise_path_matches_the_reference(monkeypatch, name, options, causal):
    """The blockwise path CUDA runs (dense blocks, checkpointed in training), forced on the CPU: output,
    q/k/v and parameter gradients against the reference, at the end of a longer cache too."""
    import posbias.kernels.blockwise as bw

    monkeypatch.setattr(bw, "flash_available", lambda q: False)
    if causal or options.get("bidirectional") or options.get("symmetric") or name.startswith("kerple"):
        compare(randomized(name, **options), "blockwise", causal=causal, lk=301)
        compare(randomized(name, **options), "blockwise", causal=causal, lq=37, lk=301)


@pytest.mark.parametrize("backend", ["banded", "windowed", "alibi"])
@pytest.mark.parametrize("init_L", [1000.0, 150.0])
def test_a_forced_backend_that_gives_way_runs_fire_below_its_threshold_exactly(backend, init_L):
    """A forced path that cannot run FIRE, with ``strict=False``, gives way to the automatic choice, which
    takes FIRE's Toeplitz view where every query is below its threshold (1000) and splits where only
    the first are (150): outputs and every gradient against the reference. (Handing the view over only
    for ``auto`` itself once sent FIRE to the Toeplitz kernel as it is: found by tests/test_fuzz.py.)"""
    from _helpers import assert_grads_close

    s = fire_at(init_L)
    q, k, v = (torch.randn(2, 3, 300, 16, requires_grad=True) for _ in range(3))
    out = attention(q, k, v, s, backend=backend, strict=False)
    ref = attention_reference(q, k, v, s)
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-4)
    g = torch.randn_like(ref)
    inputs = [q, k, v, *s.parameters()]
    assert_grads_close(torch.autograd.grad((out * g).sum(), inputs), torch.autograd.grad((ref * g).sum(), inputs),
                       atol=2e-3, rtol=1e-3)
