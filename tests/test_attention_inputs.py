"""What ``attention`` does with its inputs before a kernel runs: each shape check on its own, the head_dim a
scheme's rotation or default scale reads, positions given or left to their defaults (one call either way,
checked against rotations and biases written out by hand), what the backend choice reads of the device,
and which part of FIRE runs on the Toeplitz path. Each test pins what a mutant of ``posbias/attention.py``
got past the kernel tests (docs/mutation-testing.md, campaign 8)."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from _helpers import ATTENTION_MODULE as att

from posbias import build
from posbias.attention import attention, attention_probs, attention_reference, toeplitz_prefix, usable


def test_each_shape_check_refuses_on_its_own():
    """One tensor of the wrong rank, k and v of different lengths, another batch, another head_dim: each
    alone, with its whole message (none of them hides behind another), in each entry point."""
    s = build("alibi", n_heads=2, head_dim=8)
    good = torch.randn(1, 2, 5, 8)
    flat = torch.randn(2, 5, 8)
    for fn in (attention, attention_reference):
        for i in range(3):
            args = [good, good, good]
            args[i] = flat
            got = ", ".join(str(tuple(t.shape)) for t in args)
            with pytest.raises(ValueError, match=re.escape(f"q, k, v must be [batch, heads, seq, head_dim]; got {got}")):
                fn(*args, s)
        for q, k, v in [(good, torch.randn(1, 2, 6, 8), good),  # k and v of different lengths
                        (torch.randn(2, 2, 5, 8), good, good),  # another batch
                        (good, torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))]:  # q's head_dim not k's
            shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
            with pytest.raises(ValueError, match=re.escape(f"incompatible shapes {shapes}")):
                fn(q, k, v, s)
        v_alone = "v has head_dim 4 but q and k have 8; posbias needs them equal"
        with pytest.raises(ValueError, match=re.escape(v_alone)):
            fn(good, good, torch.randn(1, 2, 5, 4), s)  # v's head_dim alone (not its length 5)
    with pytest.raises(ValueError, match=re.escape("got (2, 5, 8), (1, 2, 5, 8), (1, 2, 5, 8)")):
        attention_probs(flat, good, s)


@pytest.mark.parametrize("fn", [attention, attention_reference, attention_probs])
def test_grouped_key_heads_need_enable_gqa_in_every_entry_point(fn):
    """Fewer key/value heads than query heads are refused unless ``enable_gqa=True`` asks for grouping, in
    the reference and the probabilities as in ``attention`` (its default is off everywhere)."""
    s = build("t5", n_heads=4, head_dim=8)
    q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    args = (q, k, s) if fn is attention_probs else (q, k, k, s)
    with pytest.raises(ValueError, match="q has 4 heads but k and v have 2; for grouped-query attention .* "
                                         "pass enable_gqa=True"):
        fn(*args)
    assert fn(*args, enable_gqa=True).shape[:3] == (1, 4, 6)


@pytest.mark.parametrize("name", ["alibi", "kerple-log", "fire", "nope"])
def test_a_scheme_built_for_another_head_dim_is_refused_where_its_default_scale_reads_it(name):
    """The default scale is 1/√ of the *scheme's* head_dim: q of another head_dim would have run with the
    wrong scale, silently (ALiBi built for 16 on q of 8 scaled by 1/4, not 1/√8). It is refused, naming
    both and the way out; with the scale given it runs, and its bias (which reads no head_dim) is that of
    the scheme built for q."""
    torch.manual_seed(0)
    wide = build(name, n_heads=2, head_dim=16)
    narrow = build(name, n_heads=2, head_dim=8)
    narrow.load_state_dict(wide.state_dict())
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    for fn in (attention, attention_reference):
        with pytest.raises(ValueError, match=re.escape(
                "q has head_dim 8 but the scheme was built for head_dim=16, whose default scale 1/√16 is not q's; "
                "build it with head_dim=8 or pass scale")):
            fn(q, k, v, wide)
        torch.testing.assert_close(fn(q, k, v, wide, scale=1 / math.sqrt(8)), fn(q, k, v, narrow), atol=0, rtol=0)
    with pytest.raises(ValueError, match="whose default scale"):
        attention_probs(q, k, wide)


def test_t5_reads_no_head_dim_and_a_rotation_always_does():
    """T5 is unscaled: its bias and scale read no head_dim, so q of another one runs as the scheme built for
    it. A rotation is built for its head_dim: refused even with a scale given."""
    torch.manual_seed(0)
    t5, t5_narrow = build("t5", n_heads=2, head_dim=16), build("t5", n_heads=2, head_dim=8)
    t5_narrow.load_state_dict(t5.state_dict())
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v, t5), attention(q, k, v, t5_narrow), atol=0, rtol=0)
    rope = build("rope", n_heads=2, head_dim=16)
    for scale in (None, 0.5):
        with pytest.raises(ValueError, match=r"q has head_dim 8 but the scheme was built for head_dim=16$"):
            attention(q, k, v, rope, scale=scale)


def _rotated_by_hand(s, q, k, v, q_pos, k_pos, context):
    """RoPE written out: q and k rotated at their positions with the frequencies of a ``context``-token
    context, then every key seen (bidirectional)."""
    rotated = (s.rotate(t, pos, context_len=context) for t, pos in ((q, q_pos), (k, k_pos)))
    return F.scaled_dot_product_attention(*rotated, v)


def test_dynamic_ntk_reads_the_context_of_the_positions_given_whichever_are():
    """Dynamic NTK's frequencies depend on the context, the highest position + 1 among queries *and* keys.
    Queries past the keys (only q_pos given), keys far on (only k_pos given), both given or neither: each
    call rotates with the context its positions make, as written out by hand."""
    torch.manual_seed(0)
    s = build("rope", n_heads=2, head_dim=16, scaling="dynamic-ntk", factor=2.0, train_len=16)
    lq, lk = 6, 40
    q, k, v = torch.randn(1, 2, lq, 16), torch.randn(1, 2, lk, 16), torch.randn(1, 2, lk, 16)
    cases = [({}, torch.arange(lk - lq, lk), torch.arange(lk), lk),
             ({"q_pos": torch.arange(lk, lk + lq)}, torch.arange(lk, lk + lq), torch.arange(lk), lk + lq),
             ({"k_pos": torch.arange(100, 100 + lk)}, torch.arange(lk - lq, lk), torch.arange(100, 100 + lk), 100 + lk),
             ({"q_pos": torch.tensor([3, 9, 50, 51, 70, 71]), "k_pos": torch.arange(lk) * 2},
              torch.tensor([3, 9, 50, 51, 70, 71]), torch.arange(lk) * 2, 79)]
    for kw, q_pos, k_pos, context in cases:
        want = _rotated_by_hand(s, q, k, v, q_pos, k_pos, context)
        torch.testing.assert_close(attention(q, k, v, s, causal=False, **kw), want, atol=2e-6, rtol=1e-5, msg=str(kw))
        other = _rotated_by_hand(s, q, k, v, q_pos, k_pos, context - 2)  # the test can tell contexts apart
        assert not torch.allclose(other, want, atol=1e-4), kw


@pytest.mark.parametrize("name", ["rope", "alibi", "t5"])
def test_positions_that_are_not_a_run_are_exact_past_2_to_the_40(name):
    """Positions that are not consecutive are brought near 0 by subtracting the lowest of them, in int64,
    before any kernel reads them: at 2^40 + p the output is that at p (RoPE's angles in float32 would
    lose the low bits of 2^40 + p otherwise)."""
    torch.manual_seed(0)
    s = build(name, n_heads=2, head_dim=16)
    q, k, v = (torch.randn(1, 2, 6, 16) for _ in range(3))
    q_pos, k_pos = torch.tensor([5, 6, 9, 14, 20, 21]), torch.tensor([0, 3, 5, 9, 14, 21])
    near = attention(q, k, v, s, q_pos=q_pos, k_pos=k_pos)
    far = attention(q, k, v, s, q_pos=q_pos + 2**40, k_pos=k_pos + 2**40)
    torch.testing.assert_close(far, near, atol=2e-6, rtol=1e-5)


def test_fire_reads_its_query_positions_where_they_do_not_start_at_zero():
    """FIRE's bias reads the query's own position past its threshold, so its positions are never shifted
    (only Toeplitz, rotary and unbiased schemes are): queries and keys at 100 … 139 get the bias
    ``FIRE.bias`` gives there, written out by hand, not the one at 0 … 39."""
    torch.manual_seed(0)
    s = build("fire", n_heads=2, head_dim=16, init_L=8.0)
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    pos = torch.arange(100, 140)

    def by_hand(p):
        logits = q @ k.transpose(-1, -2) / 4.0 + s.bias(p, p).detach()
        logits = logits.masked_fill(torch.ones(40, 40, dtype=torch.bool).triu(1), -math.inf)
        return torch.softmax(logits, -1) @ v

    with torch.no_grad():
        got = attention(q, k, v, s, q_pos=pos, k_pos=pos)
        torch.testing.assert_close(got, by_hand(pos), atol=2e-6, rtol=1e-5)
        assert not torch.allclose(got, by_hand(pos - 100), atol=1e-3)


def test_the_fused_op_paths_need_cpu_or_cuda_tensors_and_banded_reads_head_dim_only_on_cuda():
    """``banded`` and ``alibi`` run on a fused op with its log-sum-exp: refused on any other device (here
    ``meta``), before their positions are read; on the CPU ``banded`` takes any head_dim (the multiple of 8
    is CUDA's need)."""
    pos = torch.arange(8)
    meta = torch.empty(1, 2, 8, 12, device="meta")
    for name, scheme in (("banded", build("t5", n_heads=2, head_dim=12, max_distance=40)),
                         ("alibi", build("alibi", n_heads=2, head_dim=12))):
        assert usable(name, scheme, meta, q_pos=pos, k_pos=pos, causal=True) == (
            "needs a fused attention op with its log-sum-exp: CPU or CUDA tensors, not meta")
        assert usable(name, scheme, torch.randn(1, 2, 8, 12), q_pos=pos, k_pos=pos, causal=True) is None


class _Spy:
    """Records the queries and keys each call of the Toeplitz kernel gets."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __call__(self, q, k, v, scheme, **kw):
        self.calls.append((q.shape[2], k.shape[2], kw["q_pos"], kw["k_pos"]))
        return self.kernel(q, k, v, scheme, **kw)


@pytest.mark.parametrize("k0, q0", [(0, 0), (10, 60)])
def test_fire_runs_its_queries_below_its_threshold_on_toeplitz_with_the_keys_they_see(monkeypatch, k0, q0):
    """FIRE with only its first queries below L: those run on ``toeplitz`` (causally over the keys up to the
    last of them only), the rest blockwise; together the reference's output. Queries at 60 … 259 over keys
    at 10 … 259, L = 180: 78 queries (to where the blockwise blocks read a multiple of 64 keys), 128 keys."""
    torch.manual_seed(0)
    s = build("fire", n_heads=2, head_dim=16, init_L=180.0)
    lk = 250 if k0 else 200
    lq = lk - (q0 - k0)
    q, k, v = torch.randn(1, 2, lq, 16), torch.randn(1, 2, lk, 16), torch.randn(1, 2, lk, 16)
    q_pos, k_pos = torch.arange(q0, q0 + lq), torch.arange(k0, k0 + lk)
    rows, view = toeplitz_prefix(s, q, q_pos, k_pos)
    assert view is not None and 0 < rows < lq and q_pos[rows - 1] < 180 and (q0 - k0 + rows) % 64 == 0
    spy = _Spy(att.toeplitz_kernel)
    monkeypatch.setattr(att, "toeplitz_kernel", spy)
    with torch.no_grad():
        got = attention(q, k, v, s, q_pos=q_pos, k_pos=k_pos)
        torch.testing.assert_close(got, attention_reference(q, k, v, s, q_pos=q_pos, k_pos=k_pos), atol=2e-5, rtol=1e-4)
    seen = int(q_pos[rows - 1]) - k0 + 1
    assert [c[:2] for c in spy.calls] == [(rows, seen)]
    assert torch.equal(spy.calls[0][3], k_pos[:seen])
    if k0:
        assert (rows, seen) == (78, 128)


def test_without_the_fused_cpu_op_fire_goes_whole_or_as_its_toeplitz_view(monkeypatch):
    """Where the fused CPU op is missing (as on CUDA, where no Toeplitz path for FIRE is validated), FIRE
    with some queries below L runs whole on the general path (``toeplitz_prefix`` is ``(0, None)``); with
    every query below it runs as its Toeplitz view (all rows, the view), whichever path then takes it."""
    monkeypatch.setattr(att, "flash_available", lambda q: False)
    q, pos = torch.randn(1, 2, 200, 16), torch.arange(200)
    v = torch.randn(1, 2, 200, 16)
    some = build("fire", n_heads=2, head_dim=16, init_L=150.0)
    assert toeplitz_prefix(some, q, pos, pos) == (0, None)
    every = build("fire", n_heads=2, head_dim=16, init_L=200.0)
    rows, view = toeplitz_prefix(every, q, pos, pos)
    assert rows == 200 and view is every.toeplitz_rows(pos)[1]
    with torch.no_grad():
        for s in (some, every):
            assert att.choose_backend(s, q, q_pos=pos, k_pos=pos, causal=True) == "blockwise"
            torch.testing.assert_close(attention(q, q, v, s), attention_reference(q, q, v, s), atol=2e-5, rtol=1e-4)


def test_positions_are_one_dimensional_and_one_per_token():
    """A ``[1, L]`` tensor holds the right number of positions but is refused (it would broadcast), as is a
    1-D tensor of another length."""
    s = build("t5", n_heads=2, head_dim=8)
    q = torch.randn(1, 2, 8, 8)
    for bad in (torch.arange(8)[None], torch.arange(7)):
        with pytest.raises(ValueError, match=re.escape(f"positions must be a 1-D tensor of length 8, got shape "
                                                       f"{tuple(bad.shape)}")):
            attention(q, q, q, s, k_pos=bad)


def test_probabilities_keep_their_graph_to_q_and_k_under_a_fixed_bias():
    """``attention_probs`` writes a bias in place only where no gradient is wanted: with q or k requiring one
    and a bias with no parameters (ALiBi) the probabilities keep their graph, and their gradients are the
    reference's."""
    from posbias.kernels.reference import reference_probs

    torch.manual_seed(0)
    s = build("alibi", n_heads=2, head_dim=8)
    q = torch.randn(1, 2, 7, 8, requires_grad=True)
    k = torch.randn(1, 2, 7, 8)
    probs = attention_probs(q, k, s)
    assert probs.requires_grad
    (g,) = torch.autograd.grad((probs * torch.arange(7.0)).sum(), q)
    pos = torch.arange(7)
    want = reference_probs(q, k, s, q_pos=pos, k_pos=pos, causal=True, scale=s.default_scale())
    (w,) = torch.autograd.grad((want * torch.arange(7.0)).sum(), q)
    torch.testing.assert_close(g, w)


def test_flex_on_the_cpu_is_refused_only_where_a_gradient_is_wanted():
    """FlexAttention has no CPU backward: ``flex`` is refused on the CPU where q, k, v or the scheme's
    parameters want a gradient, not merely because autograd is on."""
    from posbias.kernels.flex import flex_available

    if not flex_available():
        pytest.skip("this torch has no FlexAttention")
    pos = torch.arange(8)
    why = "FlexAttention has no backward pass on CPU (use torch.no_grad() or another backend)"
    alibi, t5 = build("alibi", n_heads=2, head_dim=8), build("t5", n_heads=2, head_dim=8)
    q = torch.randn(1, 2, 8, 8)
    assert torch.is_grad_enabled()
    assert usable("flex", alibi, q, q_pos=pos, k_pos=pos, causal=True) is None  # autograd on, nothing to train
    assert usable("flex", alibi, q.requires_grad_(), q_pos=pos, k_pos=pos, causal=True) == why
    assert usable("flex", t5, q.detach(), q_pos=pos, k_pos=pos, causal=True) == why  # its table trains
    with torch.no_grad():
        assert usable("flex", t5, q, q_pos=pos, k_pos=pos, causal=True) is None


@pytest.mark.parametrize("name", ["nope", "rope", "alibi"])
def test_queries_before_some_keys_see_only_the_keys_up_to_them(name):
    """Causal attention where the keys run past the queries: one query at 5 over keys 0 … 9 sees keys 0 … 5,
    and a query at 0 over keys 1 … 4 sees none (0, never NaN), on the automatic path and the reference
    alike, against the keys it sees written out by hand."""
    torch.manual_seed(0)
    s = build(name, n_heads=2, head_dim=8)
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    want = attention(q, k[:, :, :6], v[:, :, :6], s, q_pos=torch.tensor([5]), k_pos=torch.arange(6), causal=False)
    q2 = torch.randn(1, 2, 2, 8)
    for fn in (attention, attention_reference):
        torch.testing.assert_close(fn(q, k, v, s, q_pos=torch.tensor([5]), k_pos=torch.arange(10)), want)
        out = fn(q2, k[:, :, :4], v[:, :, :4], s, q_pos=torch.tensor([0, 5]), k_pos=torch.arange(1, 5))
        assert torch.equal(out[:, :, 0], torch.zeros(1, 2, 8))
        torch.testing.assert_close(out[:, :, 1:], fn(q2[:, :, 1:], k[:, :, :4], v[:, :, :4], s, q_pos=torch.tensor([5]),
                                                      k_pos=torch.arange(1, 5), causal=False))
        one = fn(q2, k[:, :, :1], v[:, :, :1], s, q_pos=torch.tensor([0, 5]), k_pos=torch.tensor([3]))  # one key
        assert torch.equal(one[:, :, 0], torch.zeros(1, 2, 8))
        torch.testing.assert_close(one[:, :, 1], v[:, :, 0])  # the one key it sees takes all its weight


def test_grouped_heads_on_sdpa_whatever_the_lengths():
    """SDPA's own grouping is asked for by the head counts, whatever the lengths: here 2 queries over 4 keys
    (each length equal to the other tensor's head count) and 6 over 6."""
    torch.manual_seed(0)
    s = build("nope", n_heads=4, head_dim=8)
    for lq, lk in ((2, 4), (6, 6)):
        q, k, v = torch.randn(1, 4, lq, 8), torch.randn(1, 2, lk, 8), torch.randn(1, 2, lk, 8)
        want = attention_reference(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), s)
        torch.testing.assert_close(attention(q, k, v, s, enable_gqa=True, backend="sdpa"), want, atol=2e-6, rtol=1e-5)
