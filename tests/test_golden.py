"""Golden values with their provenance: SPEC §2 worked examples, the canonical T5 and ALiBi code,
KERPLE's kernels worked by hand, and the RoPE-scaling formulas."""

import math

import pytest
import torch

import posbias
from posbias import alibi_slopes, t5_bucket
from posbias.schemes.rope import ntk_lambda, rope_frequencies, yarn_frequencies


# --- T5 buckets: SPEC §2.2 worked examples (textbook formula with h = (n_b+1)/2) ---------------
def test_t5_worked_example_nb3_d5():
    o = torch.tensor([0, 1, 2, 3, 4, 5, 100])
    assert t5_bucket(o, num_buckets=4, max_distance=5).tolist() == [0, 1, 2, 2, 3, 3, 3]


def test_t5_worked_example_n33_d1024():
    b = t5_bucket(torch.arange(0, 5000), num_buckets=33, max_distance=1024)
    assert b[:16].tolist() == list(range(16))
    assert set(b[16:21].tolist()) == {16}
    assert set(b[21:27].tolist()) == {17}
    assert set(b[27:34].tolist()) == {18}
    assert int(torch.nonzero(b == 32)[0]) == 802
    assert (b[802:] == 32).all() and (b[:802] < 32).all()


def test_t5_canonical_default_offset_64():
    assert int(t5_bucket(64)) == 26
    assert int(t5_bucket(torch.tensor(64), num_buckets=32, max_distance=128)) == 26


def test_t5_defaults_are_canonical_t5():
    """Left to their defaults, the bucket function and the final bucket's start are canonical T5's (32
    buckets, max_distance 128, causal): the final bucket starts at offset 113 and bucket 30 at offset 99
    (max_distance 129 would move them to 114 and 100)."""
    from posbias.schemes.t5 import t5_last_bucket_start

    o = torch.arange(-50, 2000)
    assert torch.equal(t5_bucket(o), t5_bucket(o, num_buckets=32, max_distance=128, bidirectional=False))
    b = t5_bucket(torch.arange(0, 200))
    assert int(torch.nonzero(b == 31)[0]) == 113 and int(torch.nonzero(b == 30)[0]) == 99
    assert t5_last_bucket_start(32, 128) == 113


def test_t5_accepts_any_shape_and_magnitude():
    o = torch.randint(-(10**12), 10**12, (3, 4, 5))
    b = t5_bucket(o, bidirectional=True)
    assert b.shape == o.shape and b.min() >= 0 and b.max() <= 31
    assert t5_bucket(torch.tensor(10**15)).item() == 31


def test_t5_rejects_float_offsets():
    with pytest.raises(ValueError, match="integer"):
        t5_bucket(torch.tensor([1.5]))


def _canonical_bucket(relative_position, bidirectional, num_buckets, max_distance):
    """Mesh-TensorFlow / HF `_relative_position_bucket`, transcribed (relative_position = j − i)."""
    ret = 0
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        ret += (n < 0).to(torch.long) * num_buckets
        n = torch.abs(n)
    else:
        n = torch.max(n, torch.zeros_like(n))
    max_exact = num_buckets // 2
    is_small = n < max_exact
    val_if_large = max_exact + (
        torch.log(n.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.long)
    val_if_large = torch.min(val_if_large, torch.full_like(val_if_large, num_buckets - 1))
    return ret + torch.where(is_small, n, val_if_large)


CONFIGS = [(32, 128), (33, 1024), (4, 5), (8, 12), (2, 2), (3, 2), (64, 256), (16, 17), (128, 4096), (7, 100)]
# (3, 2): one exact bucket, so offset 1 is the first log one, at log(1/1) = 0 exactly


@pytest.mark.parametrize("num_buckets, max_distance", CONFIGS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_t5_equals_canonical_transcription(num_buckets, max_distance, bidirectional):
    if bidirectional and (num_buckets < 4 or max_distance <= num_buckets // 4):
        pytest.skip("invalid bidirectional configuration")
    offsets = torch.arange(-3 * max_distance - 50, 3 * max_distance + 50)
    ours = t5_bucket(offsets, num_buckets=num_buckets, max_distance=max_distance, bidirectional=bidirectional)
    ref = _canonical_bucket(-offsets, bidirectional, num_buckets, max_distance)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("num_buckets, max_distance", CONFIGS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_t5_equals_transformers_bit_for_bit(num_buckets, max_distance, bidirectional):
    t5mod = pytest.importorskip("transformers.models.t5.modeling_t5")
    if bidirectional and (num_buckets < 4 or max_distance <= num_buckets // 4):
        pytest.skip("invalid bidirectional configuration")
    offsets = torch.arange(-4 * max_distance - 50, 4 * max_distance + 50)
    # include the points where log(o/e)/log(D/e)·m is an exact integer: o = e·(D/e)^(k/m)
    per = num_buckets // 2 if bidirectional else num_buckets
    e, m = per // 2, per - per // 2
    exact = [round(e * (max_distance / e) ** (k / m)) for k in range(m + 1)]
    extra = torch.tensor(exact + [-x for x in exact], dtype=torch.long)
    offsets = torch.cat([offsets, extra, extra + 1, extra - 1])
    ref = t5mod.T5Attention._relative_position_bucket(
        -offsets, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
    ours = t5_bucket(offsets, num_buckets=num_buckets, max_distance=max_distance, bidirectional=bidirectional)
    assert torch.equal(ours, ref)


def test_t5_table_has_num_buckets_entries():
    s = posbias.build("t5", n_heads=4, head_dim=8, num_buckets=32)
    assert s.table.shape == (32, 4)  # n_b + 1 = 32 parameters per head, not n_b = 31
    assert t5_bucket(torch.arange(10**6)).max().item() == 31


def test_t5_attention_is_unscaled():
    s = posbias.build("t5", n_heads=1, head_dim=64)
    assert s.default_scale() == 1.0
    assert posbias.build("alibi", n_heads=1, head_dim=64).default_scale() == 0.125


# --- ALiBi slopes: Press et al. 2022 and their reference `get_slopes` --------------------------
def _press_get_slopes(n):
    """Transcription of the ALiBi authors' get_slopes (ofirpress/attention_with_linear_biases)."""
    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + _press_get_slopes(2 * closest)[0::2][: n - closest]


def test_alibi_slopes_8_heads():
    assert alibi_slopes(8).tolist() == [1 / 2**k for k in range(1, 9)]


def test_alibi_slopes_16_heads():
    torch.testing.assert_close(alibi_slopes(16), torch.tensor([2 ** (-k / 2) for k in range(1, 17)]))


def test_alibi_slopes_12_heads_explicit():
    expected = [2.0**-k for k in range(1, 9)] + [2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(expected))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 7, 8, 12, 20, 24, 40, 64, 96])
def test_alibi_slopes_match_reference(n):
    torch.testing.assert_close(alibi_slopes(n), torch.tensor(_press_get_slopes(n), dtype=torch.float32))


def test_alibi_bias_values():
    s = posbias.build("alibi", n_heads=2, head_dim=8)
    p = torch.arange(4)
    b = s.bias(p, p)
    # 2 heads: slopes 2^(-8·1/2) = 1/16 and 2^(-8·2/2) = 1/256
    assert b[0, 3, 0].item() == -3 / 16 and b[1, 3, 1].item() == -2 / 256
    sym = posbias.build("alibi", n_heads=2, head_dim=8, symmetric=True).bias(p, p)
    assert sym[0, 0, 3].item() == -3 / 16 and b[0, 0, 3].item() == 3 / 16


# --- KERPLE: the kernels of Chi et al. 2022 (SPEC §2.4) and their reference code's clamp and init --
def _kerple(name, r1, r2):
    s = posbias.build(name, n_heads=len(r1), head_dim=8)
    with torch.no_grad():
        s.r1.copy_(torch.tensor(r1))
        s.r2.copy_(torch.tensor(r2))
    return s


def test_kerple_log_values():
    # PE = −r1 · log(1 + r2 · |i − j|), worked by hand: head 0 r1 = 2, r2 = 0.5; head 1 r1 = 0.25, r2 = 3
    s = _kerple("kerple-log", [2.0, 0.25], [0.5, 3.0])
    p = torch.arange(5)
    b = s.bias(p, p)
    assert b[0, 3, 0].item() == pytest.approx(-2 * math.log(2.5), rel=1e-6)   # offset 3: −2·log 2.5
    assert b[1, 4, 3].item() == pytest.approx(-0.25 * math.log(4.0), rel=1e-6)  # offset 1: −¼·log 4
    assert b[:, 2, 2].tolist() == [0.0, 0.0]                                    # offset 0
    assert torch.equal(b[:, 0, 3], b[:, 3, 0])                                  # |i − j|: both directions alike


def test_kerple_power_values():
    # PE = −r1 · |i − j|^r2: head 0 r1 = 0.5, r2 = 1.5; head 1 r1 = 3, r2 = 2 (the cap, kept)
    s = _kerple("kerple-power", [0.5, 3.0], [1.5, 2.0])
    p = torch.arange(5)
    b = s.bias(p, p)
    assert b[0, 4, 0].item() == pytest.approx(-0.5 * 4**1.5, rel=1e-6)  # −4
    assert b[0, 1, 0].item() == pytest.approx(-0.5, rel=1e-6)           # offset 1: −r1 whatever r2
    assert b[1, 3, 0].item() == pytest.approx(-27.0, rel=1e-6)
    assert b[1, 0, 2].item() == pytest.approx(-12.0, rel=1e-6)
    assert b[:, 1, 1].tolist() == [0.0, 0.0]


def test_kerple_clamps_at_the_reference_floor_and_power_cap():
    # the reference code clamps both parameters at eps = 1e-2, and the power kernel's r2 at 2
    p = torch.arange(3)
    log = _kerple("kerple-log", [-5.0], [0.0]).bias(p, p)
    assert log[0, 1, 0].item() == pytest.approx(-0.01 * math.log1p(0.01), rel=1e-6)
    power = _kerple("kerple-power", [0.0], [7.0]).bias(p, p)
    assert power[0, 2, 0].item() == pytest.approx(-0.01 * 2**2, rel=1e-6)
    tiny = _kerple("kerple-power", [1.0], [-1.0]).bias(p, p)
    assert tiny[0, 2, 0].item() == pytest.approx(-(2**0.01), rel=1e-6)


@pytest.mark.parametrize("name", ["kerple-log", "kerple-power"])
def test_kerple_initialisation_is_the_references(name):
    # reference initialisation: r1 ~ U(0, 2), r2 ~ U(0, 1), per head
    torch.manual_seed(0)
    s = posbias.build(name, n_heads=256, head_dim=8)
    assert 0 < s.r1.min() and 1.9 < s.r1.max() < 2 and 0 < s.r2.min() and 0.95 < s.r2.max() < 1


# --- FIRE: its MLP and initial values (SPEC §2.5; Li et al. 2023) -------------------------------
def test_fire_architecture_and_initial_values():
    # f_θ: 1 → 32 → ReLU → heads; c learnable, init 0.1; threshold L = 512 · a learnable multiplier (init 1)
    s = posbias.build("fire", n_heads=3, head_dim=8)
    first, relu, last = s.mlp
    assert (first.in_features, first.out_features, last.in_features, last.out_features) == (1, 32, 32, 3)
    assert isinstance(relu, torch.nn.ReLU)
    assert s.c.item() == pytest.approx(0.1) and s.c.requires_grad
    assert s.init_L.item() == 512.0 and not s.init_L.requires_grad
    assert s.L_multiplier.item() == 1.0 and s.L_multiplier.requires_grad
    # the denominator ψ(max(L, i)) + eps, eps = 1e-6 (it keeps ψ away from 0 at i = 0 for any c, L):
    # computed in float64 from the integer position, then rounded once to float32
    assert s.eps == 1e-6
    for i in (0, 1, 511, 512, 513, 100_000, 2**40):
        want = torch.tensor(math.log1p(s.c.item() * max(i, 512)) + 1e-6, dtype=torch.float64).float()
        assert s.denominator(torch.tensor([i])).item() == want.item(), i


# --- RoPE and its scalings (SPEC §2.6) -------------------------------------------------------------
def test_rope_frequencies():
    f = rope_frequencies(8, 10000.0)
    torch.testing.assert_close(f, torch.tensor([1.0, 0.1, 0.01, 0.001], dtype=torch.float64))


def test_ntk_lambda_formula_and_extreme_frequencies():
    d, factor = 64, 8.0
    lam = ntk_lambda(factor, d)
    assert lam == pytest.approx(8.0 ** (64 / 62))
    s = posbias.build("rope", n_heads=1, head_dim=d, scaling="ntk", factor=factor)
    plain = rope_frequencies(d)
    assert s.inv_freq[0].item() == pytest.approx(plain[0].item())  # highest frequency untouched
    assert (plain[-1] / s.inv_freq[-1]).item() == pytest.approx(factor, rel=1e-5)  # lowest stretched by m/m_l


def test_pi_scales_positions():
    s = posbias.build("rope", n_heads=1, head_dim=8, scaling="pi", factor=4.0)
    plain = posbias.build("rope", n_heads=1, head_dim=8)
    torch.testing.assert_close(s.angles(torch.tensor([8])), plain.angles(torch.tensor([2])))


def test_dynamic_ntk_is_plain_within_trained_length():
    s = posbias.build("rope", n_heads=1, head_dim=16, scaling="dynamic-ntk", factor=2.0, train_len=64)
    plain = posbias.build("rope", n_heads=1, head_dim=16)
    torch.testing.assert_close(s.inv_frequencies(64), plain.inv_freq)
    longer = s.inv_frequencies(256)  # HF rule: base · (f·n/m_l − (f − 1))^(d/(d−2))
    expected = rope_frequencies(16, 10000.0 * ntk_lambda(2.0 * 256 / 64 - 1.0, 16)).float()
    torch.testing.assert_close(longer, expected)


def test_yarn_blend_and_temperature():
    d, base, factor, L = 64, 10000.0, 4.0, 128
    inv = yarn_frequencies(d, base, factor, L)
    plain = rope_frequencies(d, base)
    assert inv[0] == plain[0]  # fastest dims extrapolate (kept)
    assert inv[-1] == pytest.approx(plain[-1] / factor)  # slowest dims interpolate
    s = posbias.build("rope", n_heads=1, head_dim=d, scaling="yarn", factor=factor, train_len=L)
    assert s.attention_factor == pytest.approx(0.1 * math.log(4.0) + 1)
    for f in (1.5, 2.0):  # any factor above 1 has the temperature, 1 has none
        s = posbias.build("rope", n_heads=1, head_dim=d, scaling="yarn", factor=f, train_len=L)
        assert s.attention_factor == pytest.approx(0.1 * math.log(f) + 1) and s.attention_factor > 1
    assert posbias.build("rope", n_heads=1, head_dim=d, scaling="yarn", factor=1.0, train_len=L).attention_factor == 1.0


@pytest.mark.parametrize("head_dim, base, train_len", [
    (64, 10000.0, 128),  # the usual case: a ramp of several pairs between the two correction dimensions
    (64, 10000.0, 6),  # both correction dimensions clamp to 0: low == high, the ramp's width is 0.001
    (8, 10.0, 400),  # beta_slow's dimension (7.2) past head_dim − 1: clamped to 7, a ramp over pairs 1 … 3
])
def test_yarn_matches_transformers_when_installed(head_dim, base, train_len):
    """YaRN's blend is transformers' ``yarn`` rope, the two clamped edges of its ramp included."""
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, max_position_embeddings=4 * train_len,
                      rope_theta=base,
                      rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": train_len})
    try:
        inv, attn_factor = rope_utils.ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    except Exception as exc:  # pragma: no cover - API drift across transformers versions
        pytest.skip(f"transformers' yarn init has another signature here: {exc}")
    s = posbias.build("rope", n_heads=4, head_dim=head_dim, base=base, scaling="yarn", factor=4.0, train_len=train_len)
    torch.testing.assert_close(s.inv_freq, inv.float(), rtol=1e-5, atol=1e-8)
    assert s.attention_factor == pytest.approx(attn_factor)
    plain = rope_frequencies(head_dim, base)
    ramp = (plain / s.inv_freq.double() - 1) / 3  # 0 where a pair is kept, 1 where interpolated by the factor
    assert 0 < int((ramp < 1e-6).sum()) < head_dim // 2  # a real blend: some pairs kept, some interpolated


@pytest.mark.parametrize("n", [64, 128, 200, 512, 1000])
def test_dynamic_ntk_and_pi_match_transformers_when_installed(n):
    """Dynamic NTK's frequencies for a context of n tokens (trained length 128) are transformers'
    ``dynamic`` rope at ``seq_len=n`` (plain RoPE up to 128), and PI's angles are those of its ``linear``
    rope (the frequencies divided by the factor) at every position."""
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    from transformers import LlamaConfig

    def hf(kind):
        cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=128, rope_theta=10000.0,
                          rope_scaling={"rope_type": kind, "factor": 4.0})
        try:
            return rope_utils.ROPE_INIT_FUNCTIONS[kind](cfg, "cpu", seq_len=n)[0].float()
        except Exception as exc:  # pragma: no cover - API drift across transformers versions
            pytest.skip(f"transformers' {kind} init has another signature here: {exc}")

    dyn = posbias.build("rope", n_heads=4, head_dim=64, scaling="dynamic-ntk", factor=4.0, train_len=128)
    torch.testing.assert_close(dyn.inv_frequencies(n), hf("dynamic"), rtol=1e-5, atol=1e-8)
    pi = posbias.build("rope", n_heads=4, head_dim=64, scaling="pi", factor=4.0, train_len=128)
    pos = torch.arange(n)
    ours, theirs = pi.angles(pos).double(), pos[:, None].double() * hf("linear").double()[None, :]  # (ours mod 2π)
    for f in (torch.cos, torch.sin):
        torch.testing.assert_close(f(ours), f(theirs), rtol=0, atol=2e-5)


@pytest.mark.parametrize("scaling", [None, "pi", "ntk", "dynamic-ntk", "yarn"])
def test_every_scaling_at_factor_one_is_plain_rope(scaling):
    plain = posbias.build("rope", n_heads=2, head_dim=16)
    s = posbias.build("rope", n_heads=2, head_dim=16, scaling=scaling, factor=1.0, train_len=50)  # context 50 ≤ train_len
    x, pos = torch.randn(1, 2, 50, 16), torch.arange(50)
    torch.testing.assert_close(s.rotate(x, pos, context_len=50), plain.rotate(x, pos, context_len=50))
    default = posbias.build("rope", n_heads=2, head_dim=16, scaling=scaling, train_len=50)  # factor left out: 1
    assert default.factor == 1.0
    for n in (50, 200):  # 200: dynamic NTK past train_len scales by n / train_len at factor 1
        torch.testing.assert_close(default.inv_frequencies(n), s.inv_frequencies(n), rtol=0, atol=0)
        torch.testing.assert_close(default.effective_frequencies(n), s.effective_frequencies(n), rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rope_relative_and_layouts(layout):
    s = posbias.build("rope", n_heads=1, head_dim=8, layout=layout)
    q, k = torch.randn(8), torch.randn(8)
    def dot(i, j):
        return (s.rotate(q[None], torch.tensor([i])) * s.rotate(k[None], torch.tensor([j]))).sum()
    torch.testing.assert_close(dot(7, 3), dot(107, 103), rtol=1e-4, atol=1e-4)
    # layout check: position 1 rotates pair (0, d/2) for "half" and pair (0, 1) for "interleaved"
    e0 = torch.zeros(8)
    e0[0] = 1.0
    r = s.rotate(e0[None], torch.tensor([1]))[0]
    partner = 4 if layout == "half" else 1
    assert r[partner].item() == pytest.approx(math.sin(1.0), abs=1e-6)
    assert r[0].item() == pytest.approx(math.cos(1.0), abs=1e-6)


def test_rope_half_layout_matches_transformers_rotate_half():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    s = posbias.build("rope", n_heads=2, head_dim=16)
    x = torch.randn(1, 2, 10, 16)
    pos = torch.arange(10)
    ang = s.angles(pos)
    emb = torch.cat([ang, ang], dim=-1)
    ref, _ = llama.apply_rotary_pos_emb(x, x, emb.cos()[None], emb.sin()[None])
    torch.testing.assert_close(s.rotate(x, pos), ref)
