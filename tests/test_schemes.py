"""Contract tests over every registered scheme (the registry drives the parametrisation)."""

import pytest
import torch

import posbias
from posbias import SCHEMES, build
from posbias.schemes import ToeplitzScheme
from posbias.schemes.rope import rope_frequencies

ALL = list(SCHEMES)
ADDITIVE = [n for n, c in SCHEMES.items() if c.family == "additive"]
TOEPLITZ = [n for n, c in SCHEMES.items() if issubclass(c, ToeplitzScheme)]


def randomize(scheme):
    """Give learnable tables non-trivial values so equality tests mean something."""
    with torch.no_grad():
        for p in scheme.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return scheme


@pytest.mark.parametrize("name", ALL)
def test_registry_entry(name):
    cls = SCHEMES[name]
    assert cls.name == name
    assert cls.family in ("additive", "rotary", "absolute", "none")
    assert cls.summary and cls.paper
    # `learnable` (what `show` and the study's reports say of a scheme) is whether it has parameters
    scheme = build(name, n_heads=2, head_dim=8)
    assert cls.learnable == any(p.requires_grad for p in scheme.parameters())
    # a checkpoint holds what was learned: a fixed scheme's tables (ALiBi's slopes, RoPE's frequencies)
    # are rebuilt from its options, so its state dict is empty and loads into any head count's
    assert cls.learnable or scheme.state_dict() == {}


@pytest.mark.parametrize("name", ADDITIVE)
def test_bias_shape_dtype_finite(name):
    s = randomize(build(name, n_heads=3, head_dim=16))
    q_pos, k_pos = torch.arange(5, 12), torch.arange(0, 12)
    b = s.bias(q_pos, k_pos)
    assert b.shape == (3, 7, 12) and b.dtype == torch.float32
    assert torch.isfinite(b).all()


@pytest.mark.parametrize("name", ADDITIVE)
def test_short_bias_is_corner_of_long_bias(name):
    s = randomize(build(name, n_heads=2, head_dim=16))
    long = torch.arange(4096)
    with torch.no_grad():
        big = s.bias(long, long[:64])  # rows 0..4095, first 64 keys: avoid a 4096² tensor per head
        small = s.bias(long[:64], long[:64])
    torch.testing.assert_close(small, big[:, :64, :64], rtol=0, atol=0)


@pytest.mark.parametrize("name", TOEPLITZ)
def test_translation_invariance(name):
    s = randomize(build(name, n_heads=2, head_dim=16))
    p = torch.arange(40)
    torch.testing.assert_close(s.bias(p, p), s.bias(p + 1000, p + 1000), rtol=0, atol=0)
    torch.testing.assert_close(s.bias(p, p), s.bias_at(p[:, None] - p[None, :]), rtol=0, atol=0)


FLAT_OPTIONS = [(name, {}) for name in TOEPLITZ] + [
    ("offset", {"clip": False}), ("offset", {"bidirectional": True, "max_distance": 9}),
    ("offset", {"bidirectional": True, "clip": False, "max_distance": 9}), ("t5", {"bidirectional": True}),
    ("t5", {"num_buckets": 8, "max_distance": 20})]


@pytest.mark.parametrize("name, options", FLAT_OPTIONS)
def test_flat_beyond_is_exact(name, options):
    """Past ``w = flat_beyond`` the bias is one value per head (both directions for a bidirectional
    table), and ``w`` is the first such distance: the kernels that add g(w) as a constant (windowed,
    banded, toeplitz's short row) take exactly the offsets that have it."""
    s = randomize(build(name, n_heads=2, head_dim=16, **options))
    w = s.flat_beyond
    if w is None:
        pytest.skip("no flat region")
    far = torch.arange(w, w + 5000)
    for sign in (1, -1):
        vals = s.bias_at(sign * far)
        assert (vals == vals[:, :1]).all()
        if sign == 1 or options.get("bidirectional"):  # (causal: every offset < 0 reads one masked entry)
            assert (s.bias_at(torch.tensor([sign * (w - 1)])) != vals[:, :1]).any()  # the first: w − 1 differs


@pytest.mark.parametrize("name", ALL)
def test_no_maximum_length(name):
    s = build(name, n_heads=2, head_dim=16)
    q = torch.randn(1, 2, 3, 16)
    k = torch.randn(1, 2, 5, 16)
    far = torch.arange(10**6, 10**6 + 5)
    out = posbias.attention(q, k, k, s, q_pos=far[-3:], k_pos=far)
    assert torch.isfinite(out).all()


def test_fire_progressive_interpolation_in_unit_interval_at_100k():
    s = build("fire", n_heads=2, head_dim=16)
    with torch.no_grad():
        s.c.fill_(0.37)
        s.L_multiplier.fill_(0.01)  # threshold L = 5.12: normalisation by the query position is active
    q_pos = torch.tensor([0, 1, 7, 1000, 54321, 99_999])
    k_pos = torch.arange(0, 100_000, 97)
    x = s.normalized_distance(q_pos, k_pos)
    causal = k_pos[None, :] <= q_pos[:, None]
    assert x[causal].min() >= 0 and x[causal].max() <= 1
    assert x[-1, 0] > 0.99  # the farthest key maps to ~1: the whole range is used


@pytest.mark.parametrize("q_pos, k_pos", [
    (torch.arange(5, 40), torch.arange(0, 60)),            # a causal block, keys in order
    (torch.arange(5, 40), torch.arange(59, -1, -1)),       # keys reversed
    (torch.arange(39, 4, -1), torch.arange(0, 60)),        # queries reversed
    (torch.arange(39, 4, -1), torch.arange(59, -1, -1)),
    (torch.tensor([70]), torch.arange(100, 20, -1)),       # one query (decoding)
    (torch.arange(100, 130), torch.tensor([5])),           # one key
    (torch.tensor([3, 7, 1, 9]), torch.arange(12)),        # not a run: the direct formula
    (torch.arange(2**24 + 10, 2**24 + 20), torch.arange(0, 2**24 + 20, 2**20)),  # past float32 integers
])
def test_fire_log_distance_table_is_the_direct_formula(q_pos, k_pos):
    """The sliding-window table of ``log(c·|i − j| + 1)`` gives every pair its own offset's value,
    whatever the order of either run, with offsets taken in integers; and its gradient to ``c``."""
    from posbias.schemes.fire import _log_distance

    c = torch.tensor(0.37, requires_grad=True)
    got = _log_distance(q_pos, k_pos, c)
    want = torch.log1p(c * (q_pos[:, None] - k_pos[None, :]).abs().to(torch.float32))
    torch.testing.assert_close(got, want, atol=0, rtol=2e-7)
    assert got.is_contiguous()
    g = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad((got * g).sum(), c)[0], torch.autograd.grad((want * g).sum(), c)[0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pos, step", [
    ([3, 4, 5], 1), ([5, 4, 3], -1), ([0, -1, -2, -3], -1), ([1, 0], -1), ([7], 1),  # runs either way
    ([], None), ([0, 2, 4], None), ([3, 2, 0], None), ([4, 3, 1, 2, 0], None),  # not runs (the last: ends fit)
    ([0, 1, 3, 2, 4], None), ([5, 4, 4, 3, 2], None),
])
def test_fire_unit_step_finds_runs_in_either_direction(pos, step):
    """``_unit_step`` decides whether a block takes FIRE's sliding-window log table: +1 or −1 for a
    run of consecutive integers (read from the values, positions not marked as runs), None for
    anything else — gaps, a run whose ends fit but whose middle does not, floats."""
    from posbias.schemes.fire import _unit_step

    assert _unit_step(torch.tensor(pos, dtype=torch.long)) == step
    if pos:
        assert _unit_step(torch.tensor(pos, dtype=torch.float32)) is None


@pytest.mark.parametrize("q_pos, k_pos, logs", [
    (torch.arange(5, 40), torch.arange(0, 60), 35 + 60 - 1),
    (torch.arange(5, 40), torch.arange(59, -1, -1), 35 + 60 - 1),
    (torch.arange(39, 4, -1), torch.arange(0, 60), 35 + 60 - 1),
    (torch.arange(39, 4, -1), torch.arange(59, -1, -1), 35 + 60 - 1),
    (torch.arange(5, 7), torch.arange(0, 60), 2 + 60 - 1),           # two queries: a run already
    (torch.tensor([70]), torch.arange(100, 20, -1), 80),            # one query: one log per pair
    (torch.tensor([3, 7, 1, 9]), torch.arange(12), 4 * 12),         # not a run: one log per pair
])
def test_fire_log_distance_takes_one_log_per_offset_on_runs(monkeypatch, q_pos, k_pos, logs):
    """On two runs of consecutive positions every pair's offset is one of ``rows + keys − 1`` values,
    and the table takes the log of those alone (one per pair only where the positions are no runs, or
    for a single query)."""
    from posbias.schemes import fire

    taken, psi = [], fire._psi
    monkeypatch.setattr(fire, "_psi", lambda c, o: taken.append(o.numel()) or psi(c, o))
    fire._log_distance(q_pos, k_pos, torch.tensor(0.37))
    assert taken == [logs]


def test_fire_smallest_mlp_and_no_queries():
    """One hidden unit is a valid MLP (``mlp_width`` ≥ 1; 0 is refused, naming the value); a call
    with no queries has no rows below the threshold."""
    s = build("fire", n_heads=2, head_dim=8, mlp_width=1)
    assert s.mlp[0].out_features == 1
    p = torch.arange(20)
    torch.testing.assert_close(s.bias(p, p), s.mlp_bias(p, p), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="mlp_width.*0"):
        build("fire", n_heads=2, head_dim=8, mlp_width=0)
    assert s.toeplitz_rows(torch.arange(0)) == (0, None)


def test_fire_is_not_toeplitz():
    s = build("fire", n_heads=2, head_dim=16, init_L=4.0)
    p = torch.arange(30)
    assert not torch.allclose(s.bias(p, p), s.bias(p + 100, p + 100))


def test_kerple_power_gradient_finite_at_zero_distance():
    s = build("kerple-power", n_heads=2, head_dim=16)
    p = torch.arange(10)
    s.bias(p, p).sum().backward()
    assert torch.isfinite(s.r1.grad).all() and torch.isfinite(s.r2.grad).all()


def test_offset_clip_versus_untrained_entries():
    clipped = randomize(build("offset", n_heads=1, head_dim=8, max_distance=4))
    raw = build("offset", n_heads=1, head_dim=8, max_distance=4, clip=False)
    raw.load_state_dict(clipped.state_dict())
    o = torch.arange(0, 10)
    assert torch.equal(clipped.bias_at(o)[0, :4], clipped.table[:4, 0])  # offset k reads entry k
    assert torch.equal(clipped.bias_at(o)[0, 4:], clipped.table[4, 0].expand(6))
    assert torch.equal(raw.bias_at(o)[0, 5:], torch.zeros(5))  # no trained parameter past the table
    assert torch.equal(raw.bias_at(o)[0, :5], clipped.bias_at(o)[0, :5])


def test_offset_defaults_and_the_study_leaves_an_unclipped_table_alone():
    # defaults (a change would change every model built without options): causal, D = 128, clipped
    s = build("offset", n_heads=2, head_dim=8)
    assert (s.max_distance, s.bidirectional, s.clip, s.table.shape) == (128, False, True, (129, 2))
    from posbias.schemes import OffsetBias

    assert OffsetBias.study_defaults(4, {}) == {"max_distance": 1}  # D may be 1 (entry 1 sees 6 of 10 pairs)
    assert OffsetBias.study_defaults(64, {"clip": False}) == {}  # unclipped: its D is the user's, or 128


def test_offset_bidirectional_mirrors():
    s = randomize(build("offset", n_heads=1, head_dim=8, max_distance=3, bidirectional=True))
    assert s.table.shape == (7, 1)
    o = torch.tensor([-5, -3, -1, 0, 1, 3, 5])
    idx, _ = s.index(o)
    assert idx.tolist() == [6, 6, 4, 0, 1, 3, 3]


def test_sinusoidal_embedding_values():
    s = build("sinusoidal", n_heads=1, head_dim=8)
    e = s.embed(torch.arange(3), 4)
    # PE[p, 0] = sin(p), PE[p, 1] = cos(p), PE[p, 2] = sin(p/100), PE[p, 3] = cos(p/100)
    p = torch.arange(3, dtype=torch.float64)
    ref = torch.stack([p.sin(), p.cos(), (p / 100).sin(), (p / 100).cos()], 1).float()
    torch.testing.assert_close(e, ref)


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("t5", {"num_buckets": 1}, "num_buckets must be >= 2, got 1"),
        ("t5", {"num_buckets": 3, "bidirectional": True}, "num_buckets must be >= 4"),
        ("t5", {"num_buckets": 32, "max_distance": 16}, "max_distance must be >= 17, got 16"),
        ("t5", {"num_buckets": 32.5}, "num_buckets must be an integer"),
        ("offset", {"max_distance": 0}, "max_distance must be >= 1, got 0"),
        ("rope", {"scaling": "linear"}, "scaling must be one of"),
        ("rope", {"scaling": "yarn", "factor": 4.0}, "needs train_len"),
        ("rope", {"scaling": "ntk", "factor": 0.5}, "factor .* must be >= 1"),
        ("rope", {"base": 1.0}, r"base must be > 1 \(only then does θ_k = b\^\(−2\(k−1\)/d\) fall with k; .*got 1.0"),
        ("rope", {"base": 1e-4}, "base must be > 1"),
        ("fire", {"init_c": -1.0}, "init_c must be a positive"),
        ("t5", {"buckets": 3},
         r"^scheme 't5' has no option\(s\) buckets; valid: num_buckets, max_distance, bidirectional$"),
        ("nope", {"buckets": 3}, r"^scheme 'nope' has no option\(s\) buckets; valid: none$"),
        # a bool is an int to Python, not an integer or a number to an option
        ("t5", {"num_buckets": True}, r"num_buckets must be an integer \(scheme 't5'\), got True"),
        ("rope", {"scaling": "ntk", "factor": True}, r"factor must be a number \(scheme 'rope'\), got True"),
    ],
)
def test_bad_hyperparameters(name, options, match):
    with pytest.raises(ValueError, match=match):
        build(name, n_heads=2, head_dim=16, **options)


@pytest.mark.parametrize("name, pairs, match", [
    ("t5", ["buckets=3"], r"^scheme 't5' has no option buckets; valid: num_buckets, max_distance, bidirectional$"),
    ("nope", ["x=3"], r"^scheme 'nope' has no option x; valid: none$"),
])
def test_parsed_options_name_the_valid_ones(name, pairs, match):
    from posbias.schemes import parse_options

    with pytest.raises(ValueError, match=match):
        parse_options(name, pairs)


def test_bad_heads_head_dim_and_names():
    with pytest.raises(ValueError, match="n_heads must be >= 1, got 0"):
        build("alibi", n_heads=0, head_dim=16)
    with pytest.raises(ValueError, match="even head_dim"):
        build("rope", n_heads=2, head_dim=15)
    with pytest.raises(ValueError, match="unknown scheme 'xpos'; valid schemes: sinusoidal, rope, nope"):
        build("xpos", n_heads=2, head_dim=16)


def test_the_shared_checks_at_their_edges():
    """A bool is no integer count (``n_heads=True`` was one head); a rate of exactly 0 is no positive number;
    a query position runs from 0 to 2^63 − 1 inclusive (int64 positions), each with its whole message."""
    from posbias.schemes.base import INT64_MAX, check_positive

    with pytest.raises(ValueError, match=r"^n_heads must be an integer >= 1, got True$"):
        build("alibi", n_heads=True, head_dim=16)
    with pytest.raises(ValueError, match=r"^head_dim must be an integer >= 1, got False$"):
        build("alibi", n_heads=2, head_dim=False)
    with pytest.raises(ValueError, match=r"^init_c must be a positive finite number \(> 0\), got 0.0$"):
        check_positive("init_c", 0.0)
    assert check_positive("init_c", 5e-324) == 5e-324  # the smallest positive float is positive
    assert build("alibi", n_heads=1, head_dim=1).head_dim == 1  # the smallest head
    t5 = build("t5", n_heads=1, head_dim=16)
    with pytest.raises(ValueError, match=r"^offsets 50 puts the key before position 0 for a query at query_pos 10; "
                                         r"give offsets up to 10$"):
        t5.at_offsets([1, 50, 3], query_pos=10)
    for at in (0, INT64_MAX):  # a Toeplitz bias reads no query position; the bounds are still checked
        assert t5.at_offsets([0], query_pos=at)[2].split()[0] == "0"
    assert [line.split()[:2] for line in t5.at_offsets([INT64_MAX, -INT64_MAX])[2:4]] == [
        [str(INT64_MAX), "31"], [str(-INT64_MAX), "0"]]  # |i − j| of int64 positions, both ends
    with pytest.raises(ValueError, match=rf"^offsets {-INT64_MAX - 1} is out of range; valid: -{INT64_MAX} \.\.\. "
                                         rf"{INT64_MAX} \(\|i - j\| of int64 positions\)$"):
        t5.at_offsets([-INT64_MAX - 1])
    for at in (-1, INT64_MAX + 1):
        with pytest.raises(ValueError, match=rf"^query_pos must be a position in \[0, {INT64_MAX}\], got {at}$"):
            t5.at_offsets([0], query_pos=at)


def test_a_kept_value_is_reused_for_an_equal_key_of_the_same_kind_only():
    """``kept`` (a scheme's cache of values made from its parameters) reuses a value only for an equal
    key: a tensor of positions, the run of the same positions (keyed by what makes it) and a plain int
    are three keys, and a tensor is never taken as equal to something that is not one."""
    from posbias.positions import run
    from posbias.schemes.base import kept

    s = build("t5", n_heads=1, head_dim=16)
    made = []

    def make():
        made.append(len(made))
        return made[-1]

    with torch.no_grad():
        keys = (torch.tensor([3]), run(3, 1, torch.device("cpu")), 3, 3, torch.tensor([3]), torch.tensor([3]))
        assert [kept(s, "_probe", (key,), make) for key in keys] == [0, 1, 2, 2, 3, 3]
        assert kept(s, "_probe", (3, 4), make) == 4  # a longer key is another key
        alibi = build("alibi", n_heads=2, head_dim=16)  # its slopes are a buffer, no parameter
        assert [kept(alibi, "_probe", (), make) for _ in range(2)] == [5, 5]
        alibi.slopes.mul_(2)  # a buffer changed in place: the value is made anew
        assert kept(alibi, "_probe", (), make) == 6


def test_the_bias_table_names_the_query_only_for_a_bias_that_reads_it():
    """``posbias show --query-pos``: FIRE's table says which query it is for; a Toeplitz bias's is the same
    for every query, so its header names none (nor without a position); learnable schemes say their values
    are the initial ones."""
    header = "bias by distance i-j (rows: heads{})"
    learnable = " — learnable, values at initialisation"
    for name, at_100 in (("kerple-log", header.format("") + learnable), ("alibi", header.format("")),
                         ("fire", header.format(", query at position 100") + learnable)):
        s = build(name, n_heads=2, head_dim=16)
        assert s.describe(query_pos=100)[0] == at_100, name
        assert s.describe()[0] == header.format("") + (learnable if s.learnable else ""), name
    fire = build("fire", n_heads=2, head_dim=16)
    assert fire.describe(query_pos=100)[1].split()[-1] == "64"  # the distances up to the query's position
    assert fire.describe(query_pos=64)[1].split()[-1] == "64" and fire.describe(query_pos=63)[1].split()[-1] == "32"


@pytest.mark.parametrize("name", ["kerple-log", "fire", "alibi", "t5"])
def test_the_offsets_table_notes_keys_after_the_query_for_a_causal_bias_only(name):
    """A negative offset is a key after the query, hidden in causal attention: said under the table of a
    causal bias (schemes without a ``bidirectional`` or ``symmetric`` option included), not for offset 0
    alone, and not for a two-sided bias."""
    note = "offsets < 0: keys after the query (j > i), hidden in causal attention"
    s = build(name, n_heads=2, head_dim=16)
    assert not s.two_sided and note in s.at_offsets([-2, 0], query_pos=5) and note not in s.at_offsets([0, 5])
    if name in ("alibi", "t5"):
        both = build(name, n_heads=2, head_dim=16, **({"symmetric": True} if name == "alibi" else {"bidirectional": True}))
        assert both.two_sided and note not in both.at_offsets([-2, 0], query_pos=5)


def test_illustrative_tables_and_gradients_of_frozen_tables():
    """A learned table drawn before training gets ``−log(1 + index) · f_h`` with head factors 0.5 … 2 (a
    table of zeros draws as nothing); a frozen table's bias gradient is None, blockwise and per offset."""
    t5 = build("t5", n_heads=4, head_dim=16)
    assert t5.illustrate_() == "illustrative table"
    idx = torch.arange(t5.table.shape[0], dtype=torch.float32)[:, None]
    torch.testing.assert_close(t5.table.detach(), -torch.log1p(idx) * torch.tensor([[0.5, 1.0, 1.5, 2.0]]))
    t5.table.requires_grad_(False)
    pos = torch.arange(6)
    grad = torch.ones(4, 6, 6)
    assert t5.bias_grad(pos, pos, grad.clone()) == [None]
    acc = t5.block_grads()
    acc.add(pos, pos, grad.clone())
    assert acc.result() == [None]
    assert build("alibi", n_heads=4, head_dim=16).bias_grad(pos, pos, grad) == []


def test_tables_print_zero_unsigned_and_show_a_bias_from_the_query_at_the_largest_distance():
    """``show``'s tables print an ALiBi bias of −m·0 = −0.0 as 0.000; the distances are the powers of two to
    1024; a bias that reads the query's position is tabulated for one query at the largest distance, or
    at 0 where every distance is negative."""
    alibi = build("alibi", n_heads=2, head_dim=16)
    assert alibi.describe()[1:3] == [
        "head         0        1        2        4        8       16       32       64      128      256      512     1024",
        "   0     0.000   -0.062   -0.125   -0.250   -0.500   -1.000   -2.000   -4.000   -8.000  -16.000  -32.000  -64.000"]
    assert alibi.at_offsets([0])[2] == "       0     0.000     0.000"
    fire = randomize(build("fire", n_heads=2, head_dim=16, init_L=0.5))  # a threshold below 1: position 0 ≠ 1
    with torch.no_grad():
        for distances, i in (([-3, -1], 0), ([2, 9, 5], 9)):
            d = torch.tensor(distances)
            assert torch.equal(fire.bias_by_distance(d), fire.bias(torch.tensor([i]), i - d)[:, 0, :]), distances


def test_flat_share_counts_every_pair_from_a_start_at_or_below_zero_and_none_from_the_window_on():
    """The share of a window's causal pairs at offsets ≥ start: all of them from 0 (or below), one pair in
    L(L+1)/2 from L − 1, none from L on."""
    from posbias.schemes.base import flat_share

    assert flat_share(0, 64) == flat_share(-5, 64) == 1.0
    assert flat_share(63, 64) == pytest.approx(1 / 2080) and flat_share(64, 64) == flat_share(65, 64) == 0.0


def test_offsets_table_columns_line_up_at_any_width():
    """``posbias show --offsets``: the offsets column is at least 8 wide (``offset`` and two spaces) and
    wider for long offsets; each head's column at least 10 — the exact lines."""
    alibi = build("alibi", n_heads=2, head_dim=16)
    assert alibi.at_offsets([0, 3]) == [
        "bias at the offsets asked for (rows: offsets i-j; columns: heads)",
        "  offset    head 0    head 1",
        "       0     0.000     0.000",
        "       3    -0.188    -0.012",
    ]
    assert alibi.at_offsets([0, 123456789012])[1:] == [  # 2 + 12 digits; 2 + 15 characters of bias
        "        offset           head 0           head 1",
        "             0            0.000            0.000",
        "  123456789012  -7716049408.000   -482253088.000",
    ]


def test_build_takes_a_label_as_the_study_names_schemes():
    """``build("t5@max_distance=64,bidirectional=true")`` is the scheme the study trains under that label;
    an option given twice (in the label twice, or in the label and as a keyword) is refused, not the last
    taken silently."""
    labelled = build("t5@max_distance=64,bidirectional=true", n_heads=2, head_dim=16)
    typed = build("t5", n_heads=2, head_dim=16, max_distance=64, bidirectional=True)
    assert labelled.extra_repr() == typed.extra_repr()
    assert build("rope@scaling=yarn,factor=4", n_heads=2, head_dim=16, train_len=64).extra_repr() == \
        build("rope", n_heads=2, head_dim=16, scaling="yarn", factor=4.0, train_len=64).extra_repr()
    with pytest.raises(ValueError, match="option max_distance is given twice: in the label"):
        build("t5@max_distance=64", n_heads=2, head_dim=16, max_distance=32)
    with pytest.raises(ValueError, match=r"option max_distance is given twice \(64 and '32'\)"):
        build("t5@max_distance=64,max_distance=32", n_heads=2, head_dim=16)
    with pytest.raises(ValueError, match="max_distance must be >= 17, got 3"):
        build("t5@max_distance=3", n_heads=2, head_dim=16)


def _rotated(s, x, pos, context_len=None):
    """The rotation written out from :meth:`RoPE.angles` (no table, no cache): the definition."""
    ang = s.angles(pos, context_len)
    cos, sin = ang.cos() * s.attention_factor, ang.sin() * s.attention_factor
    x1, x2 = (x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]) if s.layout == "half" else (x[..., 0::2], x[..., 1::2])
    a, b = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    return torch.cat([a, b], -1) if s.layout == "half" else torch.stack([a, b], -1).flatten(-2)


def test_rope_table_follows_an_in_place_change_of_its_frequencies():
    """The kept cos/sin table is keyed by the frequency buffer's in-place version and by PI's factor:
    frequencies changed in place (a user's own scaling), or another factor, are not served from the
    table made with the old ones."""
    s = posbias.build("rope", n_heads=2, head_dim=16)
    x, pos = torch.randn(1, 2, 100, 16), torch.arange(100)
    torch.testing.assert_close(s.rotate(x, pos), _rotated(s, x, pos), atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        s.inv_freq.mul_(0.5)
    torch.testing.assert_close(s.rotate(x, pos), _rotated(s, x, pos), atol=1e-6, rtol=1e-5)
    with torch.inference_mode():  # a buffer made in inference mode keeps no version: its values are compared
        frozen = posbias.build("rope", n_heads=2, head_dim=16)
        frozen.rotate(x, pos)
        frozen.inv_freq.mul_(0.5)
        torch.testing.assert_close(frozen.rotate(x, pos), _rotated(frozen, x, pos), atol=1e-6, rtol=1e-5)
    pi = posbias.build("rope", n_heads=2, head_dim=16, scaling="pi", factor=2.0)  # PI's factor is in the key too
    pi.rotate(x, pos)
    pi.factor = 4.0
    torch.testing.assert_close(pi.rotate(x, pos), _rotated(pi, x, pos), atol=1e-6, rtol=1e-5)


def test_rope_table_serves_a_decoding_loop_from_one_computation(monkeypatch):
    """Decoding asks for the positions of the whole cache at every step: the first run's table has room
    for 256 more positions, so the next 256 steps (each one longer, the last ending exactly at the
    table's end) read it without computing an angle, and the step past it computes a new table."""
    s, plain = posbias.build("rope", n_heads=2, head_dim=16), posbias.build("rope", n_heads=2, head_dim=16)
    computed = []
    real = s.angles
    monkeypatch.setattr(s, "angles", lambda pos, context_len=None: computed.append(len(pos)) or real(pos, context_len))
    x = torch.randn(1, 2, 400, 16)
    for n in range(100, 357):
        torch.testing.assert_close(s.rotate(x[:, :, :n], torch.arange(n)), _rotated(plain, x[:, :, :n], torch.arange(n)),
                                   atol=1e-6, rtol=1e-5)
    assert computed == [356]  # one table of 100 + 256 positions
    computed.clear()
    s.rotate(x[:, :, :357], torch.arange(357))
    assert computed == [357 + 256]


def test_rope_rotates_a_long_run_at_a_huge_position_in_integers():
    """A run of 600 positions from 2^40: the kept table's positions are integers (a float32 position
    there would be off by up to 2^16), so the rotation equals its definition."""
    s = posbias.build("rope", n_heads=2, head_dim=16)
    x, pos = torch.randn(1, 2, 600, 16), torch.arange(2**40, 2**40 + 600)
    torch.testing.assert_close(s.rotate(x, pos), _rotated(s, x, pos), atol=1e-5, rtol=1e-5)


def test_rope_accepts_its_smallest_head_dim_and_base():
    """head_dim 4 (two pairs) and any base above 1 build; head_dim 2 and base 1 are refused."""
    for head_dim, base in ((4, 10000.0), (16, 1.5)):
        s = posbias.build("rope", n_heads=1, head_dim=head_dim, base=base)
        assert torch.equal(s.inv_freq, rope_frequencies(head_dim, base).float())
    assert posbias.build("rope", n_heads=1, head_dim=16, scaling="dynamic-ntk", factor=2.0, train_len=1).train_len == 1
    with pytest.raises(ValueError, match="train_len must be >= 1, got 0"):
        posbias.build("rope", n_heads=1, head_dim=16, scaling="yarn", factor=2.0, train_len=0)
    with pytest.raises(ValueError, match="even head_dim >= 4, got 2"):
        posbias.build("rope", n_heads=1, head_dim=2)
    with pytest.raises(ValueError, match=r"base must be > 1 .*got 1\.0"):
        posbias.build("rope", n_heads=1, head_dim=16, base=1.0)


@pytest.mark.parametrize("options", [{}, {"layout": "interleaved"}, {"scaling": "yarn", "factor": 4.0, "train_len": 16},
                                     {"scaling": "dynamic-ntk", "factor": 2.0, "train_len": 16},
                                     {"scaling": "pi", "factor": 2.0}])
def test_rope_rotation_and_its_table_cache(options):
    """RoPE's rotation against its definition, call after call: runs of positions served from the kept
    table (a sub-run), past it (recomputed), elsewhere (negative positions), scattered positions, a
    dynamic-NTK context that changes the frequencies, and the gradient (the opposite rotation)."""
    s = posbias.build("rope", n_heads=2, head_dim=16, **options)
    x = torch.randn(1, 2, 600, 16, requires_grad=True)
    calls = [(torch.arange(0, 100), None), (torch.arange(10, 50), None), (torch.arange(0, 600), None),
             (torch.arange(-40, 60), None), (torch.tensor([5, 3, 900, 2]), None), (torch.arange(0, 100), 40),
             (torch.arange(0, 100), 80), (torch.arange(0, 100), None)]
    for pos, context in calls:
        xs = x[:, :, : len(pos)]
        got = s.rotate(xs, pos, context_len=context)
        want = _rotated(s, xs, pos, context)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        g = torch.randn_like(got)
        torch.testing.assert_close(torch.autograd.grad((got * g).sum(), x)[0], torch.autograd.grad((want * g).sum(), x)[0],
                                   atol=1e-6, rtol=1e-5)
