"""FlexAttention export: every Toeplitz scheme's and FIRE's ``score_mod`` against the reference (eager
FlexAttention, which runs on CPU without compiling), the opt-in ``flex`` backend, and its errors."""

import pytest
import torch
from _helpers import randomized

from posbias import SCHEMES, ToeplitzScheme, attention, attention_reference, build
from posbias.attention import resolve
from posbias.integrations.flex import causal_block_mask, flex_available, flex_kernel, offset_table

# (by torch's version, not by flex_available, which a test below checks: a flex_available that wrongly
# said no would otherwise skip every test here and pass)
pytestmark = pytest.mark.skipif(tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 5),
                                reason="FlexAttention came with torch 2.5")

TOEPLITZ = [n for n, c in SCHEMES.items() if issubclass(c, ToeplitzScheme)]




@pytest.mark.parametrize("name", TOEPLITZ + ["fire", "rope", "nope"])
@pytest.mark.parametrize("causal,lq,lk,q0", [(True, 77, 77, None), (False, 61, 61, None), (True, 3, 90, 87),
                                             (True, 20, 30, -5), (False, 9, 40, 3)])
def test_flex_matches_reference(name, causal, lq, lk, q0):
    torch.manual_seed(0)
    s = randomized(name)
    q, k, v = (torch.randn(2, 3, n, 16) for n in (lq, lk, lk))
    qp = None if q0 is None else torch.arange(q0, q0 + lq)
    with torch.no_grad():
        ref = attention_reference(q, k, v, s, causal=causal, q_pos=qp)
        qq, kk, _, qpos, kpos, scale = resolve(q, k, v, s, q_pos=qp, k_pos=None, scale=None)
        out = flex_kernel(qq, kk, v, s, q_pos=qpos, k_pos=kpos, causal=causal, scale=scale, compile=False)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_score_mod_method_and_table_is_linear_in_length():
    """``score_mod(q_len, k_len)`` reads a ``[heads, q_len + k_len − 1]`` table: by default the keys sit at
    0 … k_len − 1 and the queries at their end, so query qi and key ki read offset ``q_start + qi − ki``;
    ``q_start`` places the queries and ``k_start`` moves the keys (one query and one key included; pairs in
    the one-to-one buckets too, where offsets one apart read different entries)."""
    s = randomized("t5", max_distance=50)
    table = offset_table(s, 10, 300)
    assert table.shape == (3, 309) and table.dtype == torch.float32
    score, b, h = torch.zeros(()), torch.tensor(0), torch.tensor(2)
    for q_len, k_len, kw, offset in ((10, 300, {}, 290), (10, 300, {"q_start": 40}, 40),
                                     (10, 300, {"q_start": 40, "k_start": 7}, 33), (1, 300, {}, 299), (1, 1, {}, 0)):
        mod = s.score_mod(q_len, k_len, **kw)
        for qi, ki in [(0, 0), (9, 299), (3, 100), (9, 30), (0, 35)] if q_len > 1 else [(0, 0), (0, k_len // 2)]:
            got = mod(score, b, h, torch.tensor(qi), torch.tensor(ki))
            assert got.item() == pytest.approx(s.bias_at(torch.tensor([offset + qi - ki]))[2, 0].item()), (kw, qi, ki)


def test_fire_score_mod_is_fire_with_its_gradients_on_the_cpu():
    """FIRE's score_mod evaluated eagerly over every (head, query, key): FIRE's bias, and the same
    gradients to c, L and the MLP (what FlexAttention's CUDA backward differentiates). What it
    captures that needs gradients is [heads] tensors, each its own (the CUDA backward refuses a tensor
    indexed twice and fails on 0-d ones: found on an H200, torch 2.11)."""
    torch.manual_seed(0)
    s = randomized("fire")
    with torch.no_grad():
        s.L_multiplier.fill_(0.066)  # threshold 33.8 tokens: queries 28–39 on both sides of it
    lq, lk, q0 = 12, 40, 28
    mod = s.score_mod(lq, lk, q_start=q0)
    captured = [c.cell_contents for c in mod.__closure__ if isinstance(c.cell_contents, (torch.Tensor, list))]
    tensors = [t for c in captured for t in (c if isinstance(c, list) else [c]) if t.requires_grad]
    assert tensors and all(t.dim() == 1 and t.shape[0] == s.n_heads for t in tensors if t.shape != (lq,))
    assert len({t.data_ptr() for t in tensors}) == len(tensors)  # no two share storage
    h, qi, ki = torch.meshgrid(torch.arange(s.n_heads), torch.arange(lq), torch.arange(lk), indexing="ij")
    got = mod(torch.zeros(()), torch.tensor(0), h, qi, ki)
    want = s.bias(torch.arange(q0, q0 + lq), torch.arange(lk))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(want)
    g_got = torch.autograd.grad((got * w).sum(), list(s.parameters()))
    g_want = torch.autograd.grad((want * w).sum(), list(s.parameters()))
    assert float(s.threshold().detach()) == pytest.approx(33.8, abs=0.1) and all(g.abs().sum() > 0 for g in g_want)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kw, q0, k0, lq, lk", [
    ({}, 28, 0, 12, 40), ({"q_start": 3, "k_start": 7}, 3, 7, 12, 40), ({"k_start": 50}, 28, 50, 12, 40),
    ({}, 39, 0, 1, 40), ({}, 0, 0, 1, 1),
])
def test_fire_score_mod_places_its_queries_and_keys(kw, q0, k0, lq, lk):
    """Where the score_mod's indices sit: queries default to the end of the keys (the last ``q_len`` of
    ``k_len``), and keys start at ``k_start`` (the offset is taken from both starts, the
    denominator from the query's own position); one query (decoding) and one key are valid sizes."""
    torch.manual_seed(1)
    s = randomized("fire", init_L=20.0)
    mod = s.score_mod(lq, lk, **kw)
    h, qi, ki = torch.meshgrid(torch.arange(s.n_heads), torch.arange(lq), torch.arange(lk), indexing="ij")
    with torch.no_grad():
        got = mod(torch.zeros(()), torch.tensor(0), h, qi, ki)
        want = s.bias(torch.arange(q0, q0 + lq), torch.arange(k0, k0 + lk))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_flex_is_found_where_torch_has_it():
    assert flex_available()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["alibi", "fire"])
def test_flex_backend_compiled_matches_reference(name, monkeypatch):
    """Compiled (CPU inductor) by default: FIRE's forward failed to lower until its score_mod captured
    each weight as a tensor of its own."""
    from posbias.kernels import flex

    compiled, real = [], flex._compiled_flex
    monkeypatch.setattr(flex, "_compiled_flex", lambda: compiled.append(1) or real())
    torch.manual_seed(0)
    s = randomized(name)
    q, k, v = (torch.randn(1, 3, 256, 16) for _ in range(3))
    with torch.no_grad():
        out = attention(q, k, v, s, backend="flex")
        ref = attention_reference(q, k, v, s)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert compiled == [1]


def test_flex_backend_refuses_what_it_cannot_do_exactly():
    q = torch.randn(1, 3, 8, 16)
    class NoScoreMod(type(build("fire", n_heads=3, head_dim=16))):
        score_mod = None

    with pytest.raises(ValueError, match="needs a scheme with a score_mod"):
        attention(q, q, q, NoScoreMod(n_heads=3, head_dim=16), backend="flex")
    with pytest.raises(ValueError, match="no backward pass on CPU"):
        attention(q, q, q, build("t5", n_heads=3, head_dim=16), backend="flex")
    with pytest.raises(ValueError, match="contiguous"):
        with torch.no_grad():
            attention(q, q, q, build("alibi", n_heads=3, head_dim=16), backend="flex",
                      q_pos=torch.arange(0, 16, 2), k_pos=torch.arange(0, 16, 2))
    with pytest.raises(ValueError, match="Toeplitz"):
        offset_table(build("fire", n_heads=3, head_dim=16), 4, 4)


@pytest.mark.slow
def test_docs_flex_snippet_runs_as_written():
    """docs/attention.md's FlexAttention block, executed verbatim (it compiles: seconds on CPU)."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "attention.md").read_text()
    section = page[page.index("## FlexAttention: a `score_mod`"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "docs/attention.md", "exec"), {})


def _bench_module():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_attention.py"
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dynamo, tracing a score_mod, looks its module up by name
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.parametrize("name", ["t5", "offset", "alibi", "kerple-log"])
def test_benchmarks_hand_written_score_mod_is_the_scheme(name):
    """The benchmark's user-style anchor (formula per pair, attention-gym style) computes the same
    attention as the reference, so comparing against it compares speed only (eager FlexAttention)."""
    from torch.nn.attention.flex_attention import flex_attention

    s = randomized(name)
    mod = _bench_module().hand_written_score_mod(name, s)
    q, k, v = (torch.randn(1, 3, 150, 16) for _ in range(3))
    with torch.no_grad():
        out = flex_attention(q, k, v, score_mod=mod, block_mask=causal_block_mask(150, 150),
                             scale=s.default_scale())
        ref = attention_reference(q, k, v, s)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_length_buckets():
    from posbias.kernels.flex import length_bucket

    got = {n: length_bucket(n) for n in (1, 2, 3, 37, 128, 129, 160, 161, 1000, 1024, 1025, 2000, 2048, 2049)}
    assert got == {1: 1, 2: 2, 3: 4, 37: 64, 128: 128, 129: 160, 160: 160, 161: 192, 1000: 1024, 1024: 1024,
                   1025: 1280, 2000: 2048, 2048: 2048, 2049: 2560}
    for n in range(1, 5000):
        b = length_bucket(n)
        assert n <= b and (n <= 128 or b <= 1.25 * n)  # at most 25% padding past 128


@pytest.mark.slow
def test_flex_decoding_compiles_once_per_length_bucket():
    """One query per step against a growing cache (a slice of a longer buffer): exact at every step,
    and compiled once per length bucket (126-128 keys: one shape; 129-131: the next), not per step."""
    from torch._dynamo.utils import counters

    from posbias.kernels.flex import reset_compiled

    torch.manual_seed(0)
    s = randomized("t5", max_distance=50)
    cache_k, cache_v = (torch.randn(1, 3, 200, 16) for _ in range(2))
    reset_compiled()
    counters.clear()
    with torch.no_grad():
        for n in range(126, 132):
            q = torch.randn(1, 3, 1, 16)
            k, v = cache_k[:, :, :n], cache_v[:, :, :n]
            out = attention(q, k, v, s, backend="flex")
            torch.testing.assert_close(out, attention_reference(q, k, v, s), atol=2e-5, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == 2


def test_t5_bucket_traces_in_a_users_score_mod_after_other_score_mods():
    """Regression: once eager FlexAttention had traced FIRE's score_mod, a user's T5 score_mod calling
    ``t5_bucket`` failed to trace (``Unsupported: BUILD_STRING``: its argument check formatted a value
    dynamo had made symbolic into an error hint). The checks now run eagerly only."""
    from torch.nn.attention.flex_attention import flex_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 3, 40, 16) for _ in range(3))
    with torch.no_grad():
        for name in ("fire", "t5"):
            s = randomized(name)
            mod = _bench_module().hand_written_score_mod(name, s) if name == "t5" else s.score_mod(40, 40)
            out = flex_attention(q, k, v, score_mod=mod, block_mask=causal_block_mask(40, 40), scale=s.default_scale())
            torch.testing.assert_close(out, attention_reference(q, k, v, s), atol=2e-5, rtol=1e-4)


def test_kernel_options_reach_flex_on_cuda_only(monkeypatch):
    """``CUDA_KERNEL_OPTIONS`` (unset by default: PyTorch's own configuration) goes to FlexAttention on
    CUDA alone; on the CPU the flex backend is unchanged with it set."""
    import posbias.kernels.flex as fk

    assert fk.CUDA_KERNEL_OPTIONS is None and fk.kernel_options("cuda") == {} and fk.kernel_options("cpu") == {}
    monkeypatch.setattr(fk, "CUDA_KERNEL_OPTIONS", {"BLOCK_M": 64, "BLOCK_N": 64})
    assert fk.kernel_options("cuda") == {"kernel_options": {"BLOCK_M": 64, "BLOCK_N": 64}}
    assert fk.kernel_options("cpu") == {}
    s = randomized("t5", max_distance=20)
    q, k, v = (torch.randn(1, 3, 50, 16) for _ in range(3))
    with torch.no_grad():
        qq, kk, _, qpos, kpos, scale = resolve(q, k, v, s, q_pos=None, k_pos=None, scale=None)
        out = flex_kernel(qq, kk, v, s, q_pos=qpos, k_pos=kpos, causal=True, scale=scale, compile=False)
        torch.testing.assert_close(out, attention_reference(q, k, v, s), atol=2e-5, rtol=1e-4)


def test_the_causal_block_mask_places_queries_and_keys():
    """``causal_block_mask``'s rule in absolute positions: query ``i`` (from ``q_start``, by default the
    end of the keys) sees key ``j`` (from ``k_start``) when ``j ≤ i``; cached per shape and offset."""
    qi, kj = torch.arange(4)[:, None], torch.arange(6)[None, :]
    zero = torch.tensor(0)
    for kw, q0, k0 in (({}, 2, 0), ({"q_start": 3, "k_start": 1}, 3, 1), ({"q_start": 0, "k_start": 2}, 0, 2)):
        mask = causal_block_mask(4, 6, **kw)
        assert torch.equal(mask.mask_mod(zero, zero, qi, kj), kj + k0 <= qi + q0), kw
    assert causal_block_mask(4, 6, q_start=3, k_start=1) is causal_block_mask(4, 6, q_start=2, k_start=0)


def test_the_compiled_kernel_has_room_for_its_length_buckets(monkeypatch):
    """Each compiled call runs with dynamo's recompile limit raised to ``RECOMPILE_LIMIT`` (64 shapes:
    below it torch falls back to eager FlexAttention silently, ~10× slower), and the limit is back after.
    (The compiled function is replaced by eager FlexAttention here: nothing compiles.)"""
    from posbias.kernels import flex

    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    before, seen = getattr(torch._dynamo.config, name), []

    def eager(*a, **kw):
        seen.append(getattr(torch._dynamo.config, name))
        return flex.require_flex().flex_attention(*a, **kw)

    monkeypatch.setattr(flex, "_compiled_flex", lambda: eager)
    s, q = build("alibi", n_heads=2, head_dim=16), torch.randn(1, 2, 8, 16)
    with torch.no_grad():
        out = attention(q, q, q, s, backend="flex")
    torch.testing.assert_close(out, attention_reference(q, q, q, s), atol=2e-5, rtol=1e-4)
    assert flex.RECOMPILE_LIMIT == 64 and seen == [max(before, 64)] and getattr(torch._dynamo.config, name) == before


def test_inputs_that_require_grad_run_under_no_grad_on_the_cpu():
    """FlexAttention on CPU refuses inputs that require grad even under ``torch.no_grad()`` (it has no
    backward there): the kernel hands it detached copies, and the values are the reference's."""
    s = randomized("t5")
    q, k, v = (torch.randn(1, s.n_heads, 8, 16, requires_grad=True) for _ in range(3))
    pos = torch.arange(8)
    with torch.no_grad():
        out = flex_kernel(q, k, v, s, q_pos=pos, k_pos=pos, causal=True, scale=1.0, compile=False)
        ref = attention_reference(q, k, v, s)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
