"""The ``triton`` backend (issue 12's fused CUDA candidate): flash attention reading a per-offset bias
table, in Triton.

Without a GPU its three programs run in Triton's interpreter on CPU tensors (tests/conftest.py turns
it on), with tiles of 16 so that the small inputs here span several tiles of every kind: the causal
diagonal, tiles past a T5 table's ends on either side (one sum each for the table's gradient), tiles
across the window (their diagonals summed by rotation), partial tiles at the ends, head dims padded
to a power of two. The interpreter computes what the programs say, so this checks their arithmetic
and indexing against the dense reference; whether they compile and how fast they run needs a GPU
(``pytest -m cuda``, benchmarks/gpu_check.sh)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _helpers import NO_CUDA, compare, randomized, within_reference_rounding, wrapping_programs

from posbias import build
from posbias.attention import attention, attention_reference, toeplitz_view, usable
from posbias.kernels import table_flash
from posbias.kernels.table_flash import table_flash_kernel, table_span

triton = pytest.importorskip("triton")
from posbias.kernels.table_programs import interpreting  # noqa: E402 (after the skip when triton is missing)

INTERPRETED = interpreting()
interpreted = pytest.mark.skipif(not INTERPRETED, reason="Triton's interpreter is off (CUDA machine): see the cuda tests")
ahead_of_time = pytest.mark.skipif(
    tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 4) or torch.cuda.is_available(),
    reason="Triton's ahead-of-time API as of 3.4; a GPU compiles them for real (the cuda tests)")


def check(scheme, *, causal=True, lq=50, lk=50, q0=None, k0=0, d=16, heads=3, atol=2e-5, dropout=None):
    """The interpreted programs against the reference: output, q/k/v gradients and the gradients of the
    scheme's parameters (through the table), float32. Keys at ``k0 …``, queries at ``q0 …`` (default:
    the end of the keys). ``dropout=(p, seed)``: against the reference with that dropout."""
    q, k, v = (torch.randn(2, heads, n, d, requires_grad=True) for n in (lq, lk, lk))
    k_pos = torch.arange(k0, k0 + lk)
    q_pos = torch.arange(k0 + lk - lq, k0 + lk) if q0 is None else torch.arange(q0, q0 + lq)
    run = toeplitz_view(scheme, q_pos, k_pos) or scheme  # FIRE below its threshold: what attention() hands over
    p, seed = dropout or (0.0, None)
    out = table_flash_kernel(q, k, v, run, q_pos=q_pos, k_pos=k_pos, causal=causal, scale=scheme.default_scale(),
                             interpret=True, dropout_p=p, dropout_seed=seed)
    ref = attention_reference(q, k, v, scheme, causal=causal, q_pos=q_pos, k_pos=k_pos, dropout_p=p, dropout_seed=seed)
    torch.testing.assert_close(out, ref, atol=atol, rtol=1e-4)
    g = torch.randn_like(ref)
    params = [p for p in scheme.parameters() if p.requires_grad]
    got = torch.autograd.grad((out * g).sum(), [q, k, v, *params])
    want = torch.autograd.grad((ref * g).sum(), [q, k, v, *params])
    for n, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, atol=atol * 10, rtol=1e-4, msg=lambda m, n=n: f"gradient {n}: {m}")


CASES = [  # (name, options, causal)
    ("t5", {"num_buckets": 8, "max_distance": 10}, True),
    ("t5", {"num_buckets": 8, "max_distance": 10, "bidirectional": True}, False),
    ("offset", {"max_distance": 9}, True),
    ("offset", {"max_distance": 9, "bidirectional": True}, False),
    ("offset", {"max_distance": 100, "clip": False, "bidirectional": True}, False),
    ("alibi", {}, True),
    ("alibi", {"symmetric": True}, False),
    ("kerple-log", {}, True),
    ("kerple-power", {}, False),
]


@interpreted
@pytest.mark.parametrize("name, options, causal", CASES)
@pytest.mark.parametrize("lq, lk, q0", [(50, 50, None), (37, 50, None), (1, 50, None), (5, 5, None)])
def test_every_toeplitz_scheme_matches_the_reference(name, options, causal, lq, lk, q0):
    """Self-attention with partial tiles, queries at the end of the keys (a chunk, one decoding query)
    and a call shorter than one tile."""
    check(randomized(name, **options), causal=causal, lq=lq, lk=lk, q0=q0)


@interpreted
@pytest.mark.parametrize("name, options", [("t5", {"num_buckets": 8, "max_distance": 10, "bidirectional": True}),
                                           ("kerple-log", {})])
@pytest.mark.parametrize("lq, q0", [(20, 50), (1, 140), (1, 10)])
def test_queries_anywhere_bidirectionally(name, options, lq, q0):
    """Keys at 40 … 89; queries in their middle, and one query past or before all of them: every pair
    beyond a T5 table's window on one side (a one-entry table)."""
    check(randomized(name, **options), causal=False, lq=lq, lk=50, q0=q0, k0=40)


@interpreted
@pytest.mark.parametrize("name, options", [("t5", {"num_buckets": 8, "max_distance": 10, "bidirectional": True}),
                                           ("alibi", {"symmetric": True})])
def test_lengths_one_short_of_a_whole_tile(name, options):
    """31 queries against 47 keys (tiles of 16): the last tile of each reaches exactly one row and one
    key past the end, the one case where ``r1 ≥ LQ`` and ``c1 ≥ LK`` are equalities. Bidirectionally no
    causal mask hides that key: unmasked, its zero key would weigh ``exp(bias)`` in every row's softmax."""
    check(randomized(name, **options), causal=False, lq=31, lk=47)
    check(randomized(name, **options), causal=False, lq=47, lk=31, q0=0)


@interpreted
@pytest.mark.parametrize("causal", [True, False])
def test_far_tiles_end_exactly_where_the_table_does(causal):
    """A per-offset table clipped at 18 (tiles of 16): for every query tile from row 32 on, the key tile
    just past the far run (starting at ``until + 1``) holds a pair at offset 17, and bidirectionally the
    one just before the run from ``since`` holds one at −17; a far run one tile too long would give each
    the end entry, g(±18). The forward's and both backward programs' tile splits are checked."""
    check(randomized("offset", max_distance=18, bidirectional=not causal), causal=causal, lq=80, lk=80)


@interpreted
@pytest.mark.parametrize("causal", [True, False])
def test_far_runs_of_many_tiles(causal):
    """A query at the end of 300 keys, a T5 table of 10: the far run holds 17 whole key tiles (tiles of
    16), where the other tests' runs hold at most 2. A run's end counted wrong by a fraction of a tile
    per tile (``// BLOCK`` read as ``/ BLOCK``) shows only once the run is that long: the near tiles
    after it start off the tile grid and count keys twice. Bidirectionally, the query amid the keys,
    with a far run on each side."""
    t5 = randomized("t5", num_buckets=8, max_distance=10, bidirectional=not causal)
    check(t5, causal=causal, lq=1, lk=300, q0=None if causal else 140)


@interpreted
def test_fire_below_its_threshold_runs_as_its_toeplitz_view():
    """Every query below FIRE's threshold L: the call is Toeplitz, and FIRE's MLP, c and L receive
    their gradients through the table."""
    fire = randomized("fire", init_L=200)
    check(fire, lq=60, lk=60)


def fire_with_kinks_inside(init_L: float):
    """FIRE (3 heads) with random weights and every one of its 32 hidden units' kinks inside the MLP's
    inputs ``x ∈ (0, 1)``: tiles whose ``x`` crosses several pieces (a random FIRE has a few there)."""
    fire = randomized("fire", init_L=init_L)
    with torch.no_grad():
        w = fire.mlp[0].weight[:, 0]
        fire.mlp[0].bias.copy_(-w * torch.rand(w.shape[0]))
    return fire


def fire_with_kinks_at(at: torch.Tensor, L: float):
    """FIRE (3 heads) with random weights, its kinks exactly at ``x = at`` (the last ``len(at)`` of its 32
    hidden units; the others get zero input weight, so no kink) and its threshold at ``L``."""
    fire = randomized("fire", init_L=20.0)
    with torch.no_grad():
        w = fire.mlp[0].weight[:, 0]
        w[:-len(at)] = 0.0
        fire.mlp[0].bias[-len(at):] = -w[-len(at):] * at
        fire.L_multiplier.fill_(L / float(fire.init_L))
    return fire


@interpreted
@pytest.mark.parametrize("causal, lq, lk, q0, k0", [
    (True, 50, 50, None, 0), (True, 37, 50, None, 0), (True, 1, 50, None, 0), (False, 40, 50, 30, 5),
    (False, 1, 50, 200, 0)])
def test_fire_past_its_threshold_matches_the_reference(causal, lq, lk, q0, k0):
    """FIRE with most queries past its threshold (L ≈ 20): the MLP per pair from its pieces, the per-query
    denominator; output, q/k/v gradients and the gradients of the MLP, c and L. Self-attention, a chunk,
    one decoding query, queries amid the keys and past them."""
    torch.manual_seed(5)
    check(fire_with_kinks_inside(20.0), causal=causal, lq=lq, lk=lk, q0=q0, k0=k0, atol=1e-5)


@interpreted
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="guard pages by mprotect (Linux)")
@pytest.mark.parametrize("side", ["after", "before"])
def test_the_programs_touch_nothing_past_either_end_of_their_tensors(side):
    """A masked load one element too wide reads a value the next mask hides, so no output shows it; on a
    GPU it may fault. tests/_guard_pages.py runs the three programs with every tensor they get ending
    (or starting) at a page no one may touch, so such a read is a segmentation fault there: in a
    subprocess, whose faulthandler traceback names the program's line."""
    run = subprocess.run([sys.executable, "-X", "faulthandler", str(Path(__file__).with_name("_guard_pages.py")), side],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    where = "past a tensor's end" if side == "after" else "before a tensor's start"
    what = f"a segmentation fault: a program touched memory {where}" if run.returncode == -signal.SIGSEGV else (
        f"exit {run.returncode}")
    assert run.returncode == 0, f"{what}\n{run.stderr[-4000:]}"


@interpreted
@pytest.mark.parametrize("kinks", [31, 30])
def test_fire_whose_kink_count_is_one_or_two_short_of_a_power_of_two(kinks):
    """The programs find the piece of a tile's smallest and largest ``x`` by a binary search over the
    ``NK + 1`` answers in ``KSTEPS`` steps (``NK``'s bit length). At 32 kinks the steps have room to
    spare; at 31 and 30 (a unit with zero input weight has no kink) a range one or two answers longer
    would need one more step, and the search would stop one short on piece 1 (between the first two
    kinks). So here the first kink is at ``x = 0.01`` and the others past 0.95: the tiles near the
    diagonal have their largest ``x`` on piece 1. Past the threshold."""
    torch.manual_seed(7)
    fire = fire_with_kinks_at(torch.cat([torch.tensor([0.01]), torch.linspace(0.95, 0.999, kinks - 1)]), L=10.0)
    assert fire.pieces()[0].numel() == kinks  # (the queries from 10 on are past the threshold)
    check(fire, lq=40, lk=40, atol=1e-5)


@interpreted
def test_fire_with_a_query_at_its_threshold_and_a_random_mlp():
    """A threshold that is an integer a query sits on (``max(L, i)`` ties: autograd splits ``L``'s gradient
    as the reference does), and a FIRE as randomized elsewhere (few kinks inside its inputs)."""
    torch.manual_seed(6)
    fire = fire_with_kinks_inside(20.0)
    with torch.no_grad():
        fire.L_multiplier.fill_(30 / float(fire.init_L))
    check(fire, lq=50, lk=50, atol=1e-5)
    check(randomized("fire", init_L=20.0), lq=50, lk=50)


@interpreted
def test_alibi_forms_its_line_in_place_exactly(monkeypatch):
    """Causal ALiBi (fixed slopes) reaches the programs as its heads' ``−m`` alone (``LINEAR``: no table,
    the bias formed per pair), symmetric ALiBi as a table; both match the reference, outputs bit-near."""
    seen = []
    forward = table_flash._forward
    monkeypatch.setattr(table_flash, "_forward",
                        lambda q, k, v, bias, *a: seen.append(bias) or forward(q, k, v, bias, *a))
    check(randomized("alibi"), lq=50, lk=50)
    check(randomized("alibi", symmetric=True), causal=False, lq=30, lk=50, q0=10)
    assert [b[0].dim() for b in seen] == [1, 2]
    torch.testing.assert_close(seen[0][0], -randomized("alibi").slopes)


@interpreted
def test_positions_past_two_to_the_31_and_a_fire_without_kinks():
    """Offsets and positions past int32 (Triton passes such an argument as int64, a compile of its own)
    stay exact: T5 with one query 2^33 past its keys, FIRE at 2^33 (its denominator in float64, as the
    reference's); and FIRE whose hidden units all have zero input weight (no kinks: one piece)."""
    torch.manual_seed(8)
    check(randomized("t5", num_buckets=8, max_distance=10, bidirectional=True), causal=False, lq=3, lk=50,
          q0=2**33, k0=5)
    fire = fire_with_kinks_inside(20.0)
    check(fire, lq=3, lk=50, q0=2**33, k0=2**33 - 47, atol=1e-5)
    with torch.no_grad():
        fire.mlp[0].weight.zero_()
    assert fire.pieces()[0].numel() == 0
    check(fire, lq=40, lk=40)


@interpreted
@pytest.mark.parametrize("name, options, causal, lq, q0, k0", [
    ("t5", {"num_buckets": 8, "max_distance": 10}, True, 50, None, 0),
    ("offset", {"max_distance": 9, "bidirectional": True}, False, 37, 5, 0),
    ("alibi", {}, True, 37, None, 0),
    ("kerple-log", {}, False, 20, 50, 40),
    ("fire", {"init_L": 20.0}, True, 37, None, 0)])
def test_dropout_matches_the_reference_with_the_same_mask(name, options, causal, lq, q0, k0):
    """Attention dropout inside the programs (p = 0.3): the mask drawn per tile in the forward and again in
    the backward is the reference's pair for pair, so output, q/k/v gradients and the scheme's
    gradients agree: a table (T5 causal; offset bidirectional), ALiBi's line, KERPLE with queries amid
    the keys, FIRE past its threshold; a seed past 2^31 (an int32 argument of its bits)."""
    torch.manual_seed(9)
    check(randomized(name, **options), causal=causal, lq=lq, lk=50, q0=q0, k0=k0, dropout=(0.3, 3_000_000_017))


def test_the_seeds_word_reaches_the_programs_as_the_int32_of_its_bits():
    """``dropout_args``: ``fmix(seed)`` as the signed 32-bit integer with its bits (a word from 2³¹ on is
    negative), the threshold a pair's signed word is dropped below, and ``1/(1 − p)``."""
    from posbias.kernels.dropout import drop_threshold, seed_word

    assert seed_word(1) < 2**31 <= seed_word(2)  # (the seeds below: one word each side)
    for seed in (0, 1, 2, 12_345, 2**32 - 1):
        word, th, keep = table_flash.dropout_args(0.3, seed)
        assert -(2**31) <= word < 2**31 and (word - seed_word(seed)) % 2**32 == 0, seed
        assert (th, keep) == (drop_threshold(0.3), 1 / 0.7)
    assert table_flash.dropout_args(0.3, 2)[0] == seed_word(2) - 2**32 < 0
    # the edge, from fmix inverted: the seeds whose words are 2³¹ − 1 (the largest int32) and 2³¹ (its least)
    assert seed_word(3_695_671_179) == 2**31 - 1 and table_flash.dropout_args(0.3, 3_695_671_179)[0] == 2**31 - 1
    assert seed_word(3_906_290_832) == 2**31 and table_flash.dropout_args(0.3, 3_906_290_832)[0] == -(2**31)


@interpreted
@pytest.mark.parametrize("p, seed, splits", [(0.5, 0, 1), (0.1, 2**32 - 1, 3), (0.3, 2, 1)])
def test_the_programs_drop_exactly_the_pairs_the_reference_drops(p, seed, splits):
    """With values the identity (one key per dimension) the output is each row's probabilities times
    ``1/(1 − p)`` where kept: zero exactly at the pairs :func:`~posbias.kernels.dropout.dropped_reference`
    (the mask's 64-bit definition) drops, for 4 batches × 3 heads (the hash's (batch, head) word), with
    the keys split for inference too (flash decoding's parts merged)."""
    from posbias.kernels.dropout import dropped_reference

    s = randomized("t5", num_buckets=8, max_distance=10, bidirectional=True).requires_grad_(False)
    q, k = torch.randn(4, 3, 40, 32), torch.randn(4, 3, 32, 32)
    v = torch.eye(32).expand(4, 3, 32, 32)
    q_pos, k_pos = torch.arange(40), torch.arange(32)
    with torch.no_grad():
        out = table_flash_kernel(q, k, v, s, q_pos=q_pos, k_pos=k_pos, causal=False, scale=0.25, interpret=True,
                                 splits=splits, dropout_p=p, dropout_seed=seed)
        probs = attention_reference(q, k, v, s, causal=False, scale=0.25, q_pos=q_pos, k_pos=k_pos)
    drop = dropped_reference(seed, p, 4, 3, torch.arange(40), torch.arange(32))
    assert 0.5 * p < drop.float().mean() < 1.5 * p
    assert torch.equal(out == 0, drop)
    torch.testing.assert_close(out, probs.masked_fill(drop, 0) / (1 - p), atol=1e-6, rtol=1e-5)


@interpreted
@pytest.mark.parametrize("splits", [2, 5])
def test_fire_with_the_keys_split_and_in_half_precision(splits):
    torch.manual_seed(7)
    fire = fire_with_kinks_inside(20.0).requires_grad_(False)
    q, k, v = torch.randn(2, 3, 3, 16), torch.randn(2, 3, 90, 16), torch.randn(2, 3, 90, 16)
    q_pos, k_pos = torch.arange(87, 90), torch.arange(90)
    with torch.no_grad():
        out = table_flash_kernel(q, k, v, fire, q_pos=q_pos, k_pos=k_pos, causal=True, scale=fire.default_scale(),
                                 interpret=True, splits=splits)
    torch.testing.assert_close(out, attention_reference(q, k, v, fire), atol=1e-5, rtol=1e-4)
    if splits == 2:
        within_reference_rounding(fire_with_kinks_inside(20.0), torch.float16, lq=70, lk=70, run=interpreted_at_the_end)


@interpreted
@pytest.mark.parametrize("d", [8, 17, 64])
def test_head_dims_padded_to_a_power_of_two(d):
    """8 to tl.dot's least (16); 17, a power of two and one, to 32."""
    check(randomized("t5", num_buckets=8, max_distance=10), lq=40, lk=40, d=d)


def test_the_programs_constants_pad_the_head_dim_no_wider_than_needed_and_keep_float32_exact():
    """``constants``: ``DP``, the head dim padded to the next power of two and at least 16 (``tl.dot``'s
    least), no wider: a padded column is loaded and multiplied for nothing, which no output shows. Dots in
    float32 at IEEE precision (tf32 would round their inputs on a GPU), 16-bit ones as they are."""
    for d, dp in [(1, 16), (8, 16), (16, 16), (17, 32), (32, 32), (33, 64), (64, 64), (65, 128), (128, 128),
                  (129, 256), (256, 256)]:
        assert table_flash.constants(torch.bfloat16, d, True)["DP"] == dp, d
    assert [table_flash.constants(t, 64, False)["PREC"] for t in (torch.float32, torch.bfloat16, torch.float16)] == [
        "ieee", None, None]
    assert table_flash.constants(torch.float32, 24, False, dropout=True) == {
        "CAUSAL": False, "D": 24, "DP": 32, "PREC": "ieee", "DROP": True}


@interpreted
def test_a_table_that_does_not_train_is_left_alone():
    """Without gradients to the scheme the backward skips the table's sums (and returns none)."""
    s = randomized("t5", num_buckets=8, max_distance=10).requires_grad_(False)
    q, k, v = (torch.randn(1, 3, 40, 16, requires_grad=True) for _ in range(3))
    pos = torch.arange(40)
    out = table_flash_kernel(q, k, v, s, q_pos=pos, k_pos=pos, causal=True, scale=1.0, interpret=True)
    ref = attention_reference(q, k, v, s)
    got = torch.autograd.grad(out.square().sum(), [q, k, v])
    want = torch.autograd.grad(ref.square().sum(), [q, k, v])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)


def interpreted_at_the_end(q, k, v, scheme):
    """:func:`table_flash_kernel` in the interpreter, queries at the end of the keys."""
    lq, lk = q.shape[2], k.shape[2]
    return table_flash_kernel(q, k, v, scheme, q_pos=torch.arange(lk - lq, lk), k_pos=torch.arange(lk), causal=True,
                              scale=scheme.default_scale(), interpret=True)


@interpreted
@pytest.mark.parametrize("name", ["t5", "kerple-log"])
def test_half_precision_within_the_references_own_rounding(name):
    """float16 inputs, judged by the reference in float16 (``within_reference_rounding``); bf16 dots
    are wrong in Triton 3.9's interpreter itself, so bf16 is left to the CUDA tests."""
    within_reference_rounding(randomized(name), torch.float16, lq=70, lk=70, run=interpreted_at_the_end)


@interpreted
@pytest.mark.parametrize("causal, lq, q0", [(True, 1, None), (True, 37, None), (False, 20, 30), (False, 1, 200)])
@pytest.mark.parametrize("splits", [2, 3, 7])
def test_inference_with_the_keys_split_matches_the_reference(causal, lq, q0, splits):
    """Flash decoding: the keys cut into parts of whole key tiles, each part's output and log-sum-exp
    merged; a part that some row sees nothing of (the causal chunk's early rows and the last part, or 7
    parts of 16 keys for 100 keys: 7 asked, 7 made) weighs 0."""
    s = randomized("kerple-log" if causal else "t5", **({} if causal else {"bidirectional": True}))
    q = torch.randn(2, 3, lq, 16)
    k, v = torch.randn(2, 3, 100, 16), torch.randn(2, 3, 100, 16)
    k_pos = torch.arange(100)
    q_pos = torch.arange(100 - lq, 100) if q0 is None else torch.arange(q0, q0 + lq)
    with torch.no_grad():
        out = table_flash_kernel(q, k, v, s, q_pos=q_pos, k_pos=k_pos, causal=causal, scale=s.default_scale(),
                                 interpret=True, splits=splits)
        ref = attention_reference(q, k, v, s, causal=causal, q_pos=q_pos, k_pos=k_pos)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert table_flash.key_splits(q, 100_000) == 1  # (off CUDA the keys are never split by default)


@interpreted
def test_the_forward_program_is_launched_over_as_many_parts_as_asked_and_training_over_one(monkeypatch):
    """The parts the split test's outputs cannot show (an unsplit call gives the same output): the
    forward's grid, read at each launch. 100 keys in 2, 3 and 7 parts are made as 2, 3 and 7 (parts of
    64, 48 and 16 keys: whole tiles of 16); an inference call that names no split takes ``key_splits``'
    (1 off CUDA); a call that autograd records runs unsplit whatever it asks (its backward reads one
    log-sum-exp per row, and the parts' buffers would only cost memory)."""
    from posbias.kernels import table_programs

    grids = []

    class Spy:
        def __init__(self, program):
            self.program = program

        def __getitem__(self, grid):
            grids.append(tuple(grid))
            return self.program[grid]

    monkeypatch.setattr(table_programs, "programs", wrapping_programs(Spy))
    s = randomized("t5")
    q, k, v = torch.randn(2, 3, 1, 16), torch.randn(2, 3, 100, 16), torch.randn(2, 3, 100, 16)
    q_pos, k_pos = torch.tensor([99]), torch.arange(100)

    def run(splits=None):  # (None: the default, key_splits'); the grids of this call's launches alone
        grids.clear()
        return table_flash_kernel(q, k, v, s, q_pos=q_pos, k_pos=k_pos, causal=True, scale=s.default_scale(),
                                  interpret=True, splits=splits)

    with torch.no_grad():
        for n in (2, 3, 7):
            run(n)
            assert grids == [(1, 6, n)]
        run()
        assert grids == [(1, 6, 1)]
    q.requires_grad_(True)
    run(3).sum().backward()
    assert grids[0] == (1, 6, 1) and len(grids) == 3  # the forward unsplit, then the two backward programs


def test_the_table_holds_the_offsets_of_the_pairs_cut_to_the_window():
    t5 = build("t5", n_heads=2, head_dim=16, num_buckets=8, max_distance=10)  # constant beyond w
    w = t5.flat_beyond
    kerple = build("kerple-log", n_heads=2, head_dim=16)
    assert table_span(kerple, 0, 50, 50, True) == (0, 49)  # causal: offsets 0 … 49
    assert table_span(kerple, 0, 50, 50, False) == (-49, 49)
    assert table_span(kerple, 49, 1, 50, True) == (0, 49)  # one decoding query
    assert table_span(kerple, 10, 20, 50, False) == (-39, 29)
    assert table_span(t5, 0, 50, 50, True) == (0, w)
    assert table_span(t5, 0, 50, 50, False) == (-w, w)
    assert table_span(t5, 100, 1, 50, False) == (w, w)  # every pair past the window: one entry
    assert table_span(t5, -100, 1, 50, False) == (-w, -w)


def test_one_configuration_for_every_head_dim_of_a_kind_and_back(monkeypatch):
    """``use_cuda_configs`` (the candidates benchmark's ``--table-config``) puts one ladder at every width
    of its kind, leaves the other kind's, and forgets which configuration fitted; ``restore_cuda_configs``
    gives back the module's ladders."""
    monkeypatch.setattr(table_flash, "LADDERS", dict(table_flash.LADDERS))  # (the module's own left alone)
    monkeypatch.setattr(table_flash, "_FITS", {("forward", 0, torch.bfloat16, 64, False, False): 1})
    before = dict(table_flash.LADDERS)
    mine = [{"forward": {"BM": 32, "BN": 32, "num_warps": 4, "num_stages": 1},
             "backward": {"B": 16, "num_warps": 2, "num_stages": 1}}]
    table_flash.use_cuda_configs(mine)  # a table's, by default
    assert table_flash.LADDERS == {key: mine if key[0] == "table" else before[key] for key in before}
    assert table_flash._FITS == {}
    table_flash._FITS[("forward", 0, torch.bfloat16, 64, True, False)] = 1
    table_flash.use_cuda_configs(mine, fire=True)
    assert table_flash.LADDERS == dict.fromkeys(before, mine) and table_flash._FITS == {}
    table_flash.restore_cuda_configs()
    assert table_flash.LADDERS == before and table_flash._FITS == {}


def cuda_query(shape, dtype=torch.bfloat16):
    """A stand-in for a query tensor on a CUDA device: the device, shape and dtype, all the host side's
    rules read of it, so they run without a GPU."""
    from types import SimpleNamespace

    return SimpleNamespace(device=torch.device("cuda"), shape=shape, dtype=dtype)


def test_keys_are_split_where_the_query_blocks_and_heads_leave_multiprocessors_idle(monkeypatch):
    """``key_splits``' rule on a CUDA device of 132 multiprocessors (an H100), read through a stand-in for
    the query tensor: no split once the programs (query blocks × batch × heads) fill the device; else
    enough parts for about two programs per multiprocessor, each of at least SPLIT_KEYS keys."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))

    def splits(batch, heads, lq, lk, d=64):
        n = table_flash.key_splits(cuda_query((batch, heads, lq, d)), lk)
        assert type(n) is int  # (a part count: the programs' grid and the outputs' first dimension)
        return n

    assert table_flash.SPLIT_KEYS == 1024
    assert splits(1, 8, 1, 32_768) == 32  # 8 decoding programs: min(32 parts of 1,024 keys, ⌈264 / 8⌉ = 33)
    assert splits(1, 8, 1, 1 << 20) == 33  # two programs per multiprocessor
    assert splits(1, 8, 1, 4_096) == 4
    assert splits(1, 8, 1, 1_000) == 1  # under one part's keys
    assert splits(2, 4, 17, 65_536) == 33  # 17 queries (past DECODE_ROWS): one 128-row tile, 8 programs
    assert splits(1, 66, 16, 65_536) == 4  # 16 queries, one 16-row tile: 66 programs, ⌈264 / 66⌉
    assert splits(1, 8, 200, 65_536) == 17  # two 128-row tiles (the ladder's first): 16 programs
    assert splits(1, 4, 200, 65_536, d=256) == 17  # head dim 256: the widest ladder's 64-row tiles, 4 of them
    assert splits(1, 132, 1, 65_536) == 1  # the heads alone fill every multiprocessor
    assert splits(1, 131, 1, 65_536) == 3  # one short: ⌈264 / 131⌉


def test_each_head_dim_and_dtype_climbs_the_ladder_of_its_width():
    """``ladder`` by width, ``head_dim × bytes per element / 2``: up to 64 the narrow tiles, up to 128 the
    wide, past that the widest (float32 counts twice a 16-bit width), past 256 the widest still; FIRE's
    own ladders; a decoding forward tries the 16-row tiles first."""
    ladders = table_flash.LADDERS
    for d, dtype, width in [(16, torch.bfloat16, 64), (64, torch.float16, 64), (32, torch.float32, 64),
                            (96, torch.bfloat16, 128), (128, torch.bfloat16, 128), (64, torch.float32, 128),
                            (256, torch.bfloat16, 256), (128, torch.float32, 256), (256, torch.float32, 256)]:
        for fire in (False, True):
            kind = "fire" if fire else "table"
            assert table_flash.ladder(fire, d, dtype=dtype) is ladders[(kind, width)], (d, dtype, kind)
            assert table_flash.ladder(fire, d, True, dtype) == [table_flash.DECODE_TILES, *ladders[(kind, width)]]
    assert table_flash.ladder(True, 64)[0]["backward"] != table_flash.ladder(False, 64)[0]["backward"]


def test_every_configuration_of_the_ladders_is_one_triton_can_compile():
    """The compile tests build each ladder's first configuration only; the others are reached on a GPU
    whose shared memory the first overflows, so a tile Triton cannot build would fail there and then.
    Every configuration, the decoding tiles and the smallest included: tiles powers of two of at least 16
    (``tl.arange`` takes powers of two, ``tl.dot`` at least 16), warps a power of two, at least one stage;
    a forward and a backward part each; within a ladder none larger than the one before (first that
    fits), and the smallest tiles last in each."""
    def power_of_two(n, least=1):
        return isinstance(n, int) and n >= least and n & (n - 1) == 0

    def area(part):
        return part.get("BM", part.get("B")) * part.get("BN", part.get("B"))

    ladders = [*table_flash.LADDERS.values(), [table_flash.DECODE_TILES]]
    for configs in ladders:
        for config in configs:
            assert set(config) == ({"forward"} if config is table_flash.DECODE_TILES else {"forward", "backward"})
            for part, tiles in config.items():
                sizes = [tiles[k] for k in ("BM", "BN", "B") if k in tiles]
                assert sizes and all(power_of_two(n, 16) for n in sizes), (part, tiles)
                assert power_of_two(tiles["num_warps"]) and tiles["num_stages"] >= 1, (part, tiles)
        for part in ("forward", "backward"):
            areas = [area(c[part]) for c in configs if part in c]
            assert areas == sorted(areas, reverse=True), (part, configs)
    assert all(configs[-1] is table_flash._SMALLEST for configs in table_flash.LADDERS.values())


def test_each_program_takes_the_first_configuration_that_fits_and_remembers_it(monkeypatch):
    """Triton refuses to load a program that needs more shared memory than the device has
    (``OutOfResources``, before it runs): the next configuration is tried, and the one that ran is
    where that program starts next time (a decoding step's forward, which tries 16-row tiles first,
    apart); none fitting is an error naming each refusal."""
    from triton.runtime.autotuner import OutOfResources  # (where Triton's own compiler imports it from)

    monkeypatch.setattr(table_flash, "LADDERS", {("table", 256): [{"forward": {"BM": n}} for n in (128, 64, 32)],
                                                 ("table", 8): [{"forward": {"BM": 8}}]})  # (head dims up to 8)
    monkeypatch.setattr(table_flash, "_FITS", {})
    q, tried = torch.zeros(1, 1, 17, 16), []  # more queries than DECODE_ROWS: the ladder alone

    def launch(cfg):
        tried.append(cfg["BM"])
        if cfg["BM"] > 32 + 32 * (q.dtype == torch.float16):
            raise OutOfResources(cfg["BM"] * 1000, 70_000, "shared memory")

    table_flash._launch("forward", q, False, launch)
    assert tried == [128, 64, 32]
    table_flash._launch("forward", q, False, launch)
    assert tried == [128, 64, 32, 32]  # remembered
    table_flash._launch("forward", torch.zeros(1, 1, 40, 16), False, launch)  # another length: the same program
    assert tried == [128, 64, 32, 32, 32]
    table_flash._launch("forward", torch.zeros(1, 1, 17, 32), False, launch)  # another head dim: its own search
    assert tried == [128, 64, 32, 32, 32, 128, 64, 32]
    table_flash._launch("forward", torch.zeros(1, 1, 17, 4), False, launch)  # head dim 4 in float32, width 8:
    assert tried[8:] == [8]  # the narrow ladder (read from the head dim, not from the 17 queries)
    q = q.half()  # another dtype: its own search
    table_flash._launch("forward", q, False, launch)
    assert tried[9:] == [128, 64]
    q, tried = torch.zeros(1, 1, table_flash.DECODE_ROWS, 16), []  # a decoding step (up to 16 queries): the
    # decoding tiles first, remembered apart
    table_flash._launch("forward", q, False, launch)
    table_flash._launch("forward", torch.zeros(1, 1, 17, 16), False, launch)
    assert tried == [table_flash.DECODE_TILES["forward"]["BM"], 32]
    monkeypatch.setattr(table_flash, "_FITS", {})
    monkeypatch.setattr(table_flash, "LADDERS", {("table", 256): [{"forward": {"BM": 128}}]})
    q = torch.zeros(1, 1, 17, 16)
    with pytest.raises(RuntimeError, match=r"forward program fits none of its tile configurations on cpu "
                                           r"\(torch.float32, head_dim 16\): \{'BM': 128\}: out of resource: shared memory"):
        table_flash._launch("forward", q, False, launch)


COMPILER = """
import contextlib, io, json, os, sys, traceback
channel = os.fdopen(os.dup(1), "w")  # the answers; anything else written to stdout (a tool's output) goes to stderr
os.dup2(2, 1)
for line in sys.stdin:
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            exec(json.loads(line), {})
        answer = {"printed": printed.getvalue()}
    except BaseException:
        answer = {"error": traceback.format_exc()}
    channel.write(json.dumps(answer) + "\\n")
    channel.flush()
"""


@pytest.fixture(scope="module")
def compiled_ahead():
    """Run code (which prints JSON) where Triton compiles rather than interprets: a process of its own,
    without ``TRITON_INTERPRET``, started once for the module (each start imports torch and Triton,
    ~2 s) and given each test's code in a fresh namespace."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryFile("w+") as errors, subprocess.Popen(
            [sys.executable, "-c", COMPILER], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors,
            text=True) as proc:  # (leaving: stdin closed, which ends it, and waited for)

        def run(code: str) -> dict:
            proc.stdin.write(json.dumps(code) + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            if not line:
                errors.seek(0)
                raise AssertionError(f"the compiling process ended: {errors.read()[-3000:]}")
            answer = json.loads(line)
            assert "error" not in answer, answer["error"][-3000:]
            return json.loads(answer["printed"].strip().splitlines()[-1])

        yield run


FIRST_FIT = """
import json
import torch
from posbias.kernels.table_flash import ladder
from posbias.kernels.table_programs import SHARED_LIMIT, compile_for
found = {}
for arch in (80, 90):
    for n, config in enumerate(ladder(False, HEAD_DIM, dtype=DTYPE)):
        used = compile_for(arch, DTYPE, causal=CAUSAL, head_dim=HEAD_DIM, config=config, table_grad=CAUSAL)
        if max(u["shared"] for u in used.values()) <= SHARED_LIMIT[arch]:
            found[arch] = [n, used]
            break
print(json.dumps(found))
"""


@ahead_of_time
@pytest.mark.parametrize("dtype, d, causal", [
    ("bfloat16", 64, True), pytest.param("float32", 64, True, marks=pytest.mark.slow),
    pytest.param("bfloat16", 128, False, marks=pytest.mark.slow),
    pytest.param("float16", 256, True, marks=pytest.mark.slow)])
def test_the_programs_compile_for_a100_and_h100_without_a_gpu(compiled_ahead, dtype, d, causal):
    """Triton's ahead-of-time path (LLVM and ptxas, no driver) compiles the three programs for sm_80 and
    sm_90: what the interpreter cannot check (a global that is not a constexpr failed here first). For
    each, some configuration fits the shared memory (the one the backend then runs); in bf16 at
    head_dim 64, the training case of issue 12, the first and largest does on both."""
    code = FIRST_FIT.replace("DTYPE", f"torch.{dtype}").replace("CAUSAL", str(causal)).replace("HEAD_DIM", str(d))
    found = compiled_ahead(code)
    assert set(found) == {"80", "90"}, found
    if (dtype, d) == ("bfloat16", 64):
        assert found["80"][0] == found["90"][0] == 0, found


SPILLS = """
import json
import torch
from posbias.kernels.table_flash import DECODE_TILES, ladder
from posbias.kernels.table_programs import compile_for
first = ladder(KINKS is not None, HEAD_DIM, dtype=DTYPE)[0]
used = {arch: compile_for(arch, DTYPE, causal=True, head_dim=HEAD_DIM, table_grad=not LINEAR, config=first,
                          kinks=KINKS, linear=LINEAR, dropout=DROPOUT) for arch in ARCHS}
used[90]["decode"] = compile_for(90, DTYPE, causal=True, head_dim=HEAD_DIM, table_grad=not LINEAR,
                                   config={**first, **DECODE_TILES}, kinks=KINKS, linear=LINEAR,
                                   dropout=DROPOUT)["forward"]
print(json.dumps(used))
"""


def _slow(*case):
    return pytest.param(*case, marks=pytest.mark.slow)


@ahead_of_time
@pytest.mark.parametrize("kinks, linear, d, dropout, dtype", [
    (None, False, 64, False, "bfloat16"), _slow(32, False, 64, False, "bfloat16"), _slow(None, True, 64, False, "bfloat16"),
    _slow(None, False, 128, False, "bfloat16"), _slow(32, False, 128, False, "bfloat16"),
    _slow(None, False, 64, True, "bfloat16"), _slow(32, False, 64, True, "bfloat16"),
    _slow(None, False, 256, False, "bfloat16"), _slow(32, False, 256, False, "bfloat16"),
    _slow(None, False, 64, False, "float32"), _slow(32, False, 64, False, "float32"),
    _slow(None, False, 128, False, "float32")])
def test_the_first_tiles_keep_their_values_in_registers(compiled_ahead, kinks, linear, d, dropout, dtype):
    """Compiled for sm_90 (H100/H200) in bf16 at head_dim 64 and 128, training (issue 12's target), the
    first configuration of each ladder loads or stores no spilled register inside the loops of any of its
    three programs (a few bytes kept across them cost once a program), nor do the decoding tiles, for a
    table, ALiBi's line (formed in place; its slopes are fixed) and FIRE's MLP (32 kinks), with attention
    dropout too (its mask hashed per pair); so at head_dim 256, and in float32 (its ladder that of a 16-bit
    head dim twice as wide) at 64 and, for a table, 128. The first case compiles them for sm_80 too (some
    spill there, recorded in ``table_flash``); the slow ones for sm_90 alone, to keep the suite short. No
    dot rounds its inputs to tf32: in float32 they are exact, which the interpreter cannot show (its dots
    are numpy's)."""
    code = SPILLS.replace("KINKS", str(kinks)).replace("LINEAR", str(linear)).replace("HEAD_DIM", str(d))
    code = code.replace("DROPOUT", str(dropout)).replace("DTYPE", f"torch.{dtype}")
    code = code.replace("ARCHS", "(80, 90)" if (kinks, linear, d, dropout, dtype) == (None, False, 64, False,
                                                                                         "bfloat16") else "(90,)")
    used = compiled_ahead(code)
    assert {program: u["loop_spills"] for program, u in used["90"].items()} == dict.fromkeys(used["90"], 0), used
    assert all(u["registers"] <= 255 for u in used["90"].values()), used
    assert not any(u["tf32"] for arch in used.values() for u in arch.values()), used  # float32 stays exact


OLD_FIRST = """
import json
import torch
from posbias.kernels.table_programs import compile_for
old = {"forward": {"BM": 128, "BN": 64, "num_warps": 4, "num_stages": 3},
       "backward": {"B": 64, "num_warps": 4, "num_stages": 2}}
print(json.dumps(compile_for(90, torch.bfloat16, causal=True, head_dim=64, config=old)))
"""


@pytest.mark.slow
@ahead_of_time
def test_spills_inside_the_loops_are_found_where_there_are_some(compiled_ahead):
    """The count the register test relies on is not blind: the first tiles before 8 warps (128 × 64, 4
    warps) load and store spilled registers inside the forward's and the dK/dV program's loops."""
    used = compiled_ahead(OLD_FIRST)
    assert used["forward"]["loop_spills"] > 0 and used["backward_keys"]["loop_spills"] > 0, used
    assert used["forward"]["spilled"] > 0 and used["forward"]["registers"] == 255, used


def test_loop_spills_count_the_local_loads_and_stores_between_a_backward_branch_and_its_target():
    """``register_usage`` of a made-up ``cuobjdump`` listing: a loop runs from a backward branch's target to
    the branch, both included; the local loads and stores (``LDL``/``STL``) in there count, the ones
    before or after it, and those of a forward branch's span, do not. The branches' targets are hex."""
    from posbias.kernels.table_programs import register_usage

    sass = "\n".join(f"        /*{at:04x}*/                   {ins} ;" for at, ins in [
        (0x00, "STL [R1], R2"),  # before the loop
        (0x10, "LDL R3, [R1]"),  # the loop's first instruction: the branch's target
        (0x20, "FFMA R4, R5, R6, R4"),
        (0x30, "STL [R1+0x4], R4"),
        (0x40, "@P0 BRA 0x10"),  # the backward branch: 0x10 … 0x40 is the loop
        (0x50, "BRA 0x70"),  # forward: no loop
        (0x60, "LDL R7, [R1+0x4]"),  # after the loop
        (0x70, "EXIT"),
        (0x190, "LDL R8, [R1+0x8]"),  # a loop of two instructions, whose target read in base 17 (442) would
        (0x1a0, "@P1 BRA 0x190"),  # lie past its branch (416)
        (0x1b0, "EXIT")])
    usage = "Function _forward:\n REG:168 STACK:16 SHARED:0"
    assert register_usage(usage, sass) == {"registers": 168, "spilled": 16, "loop_spills": 3}


def test_the_backend_runs_on_cuda_only_and_says_so():
    """On CPU tensors ``usable`` names the device; a forced ``triton`` refuses in one line, or gives
    way to the automatic choice with ``strict=False``."""
    s = build("t5", n_heads=2, head_dim=16)
    q = torch.randn(1, 2, 8, 16)
    pos = torch.arange(8)
    assert usable("triton", s, q, q_pos=pos, k_pos=pos, causal=True) == "needs CUDA tensors (Triton), not cpu"
    with pytest.raises(ValueError, match="backend 'triton' cannot run this input exactly: needs CUDA tensors"):
        attention(q, q, q, s, backend="triton")
    torch.testing.assert_close(attention(q, q, q, s, backend="triton", strict=False), attention_reference(q, q, q, s))


def test_the_rules_past_the_device_check_read_through_a_stand_in_cuda_query(monkeypatch):
    """``table_flash_usable`` on a CUDA device, without a GPU: a stand-in for the query tensor (its device,
    shape and dtype are all the rules read). Each rule refuses in its own words, naming the bad value;
    every input on the right side of all of them runs, at each rule's edge."""
    t5 = build("t5", n_heads=2, head_dim=16)
    pos = torch.arange(8)

    def why(scheme=t5, dtype=torch.bfloat16, d=64, q_pos=pos, k_pos=pos, causal=True, contiguous=True):
        q = cuda_query((1, 2, len(q_pos), d), dtype)
        return table_flash.table_flash_usable(scheme, q, q_pos, k_pos, causal, lambda: contiguous)

    assert why() is None
    for scheme in (build("alibi", n_heads=2, head_dim=16), build("fire", n_heads=2, head_dim=16)):
        assert why(scheme) is None
    assert why(build("rope", n_heads=2, head_dim=16)) == "needs a Toeplitz bias (T5, offset, ALiBi, KERPLE) or FIRE"
    assert why(dtype=torch.float16) is None and why(dtype=torch.float32) is None
    assert why(dtype=torch.float64) == "needs float16, bfloat16 or float32 inputs, not torch.float64"
    assert why(d=table_flash.MAX_HEAD_DIM) is None and table_flash.MAX_HEAD_DIM == 256
    assert why(d=257) == "needs head_dim at most 256 (got 257)"
    assert why(contiguous=False) == "needs contiguous positions"
    late_keys = torch.arange(4, 12)
    assert why(q_pos=torch.arange(3, 8), k_pos=late_keys) == (
        "needs the first query at or past the first key (causal: every query sees a key)")
    assert why(q_pos=torch.arange(4, 8), k_pos=late_keys) is None  # the first query at the first key
    assert why(q_pos=torch.arange(3, 8), k_pos=late_keys, causal=False) is None
    monkeypatch.setattr(table_flash, "triton_missing", lambda: "needs the triton package")
    assert why() == "needs the triton package"


def test_a_missing_triton_or_one_without_gather_is_named(monkeypatch):
    """``triton_missing`` (cached per process): None here; without the package, or with one older than
    ``tl.gather`` (3.2), the reason, with the version found."""
    import importlib.util

    import triton.language as tl

    find_spec, missing = importlib.util.find_spec, table_flash.triton_missing
    missing.cache_clear()
    try:
        assert missing() is None
        with monkeypatch.context() as m:
            m.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))
            missing.cache_clear()
            assert missing() == "needs the triton package (shipped with CUDA builds of torch)"
        with monkeypatch.context() as m:
            m.delattr(tl, "gather")
            missing.cache_clear()
            assert missing() == f"needs triton 3.2 or newer (tl.gather; this is {triton.__version__})"
    finally:
        missing.cache_clear()
    assert missing() is None


@interpreted
def test_the_interpreters_mend_patches_the_language_once_a_launch_and_computes_bit_for_bit_the_same(monkeypatch):
    """tests/_triton_interpreter.py's speed mend (conftest applies it): Triton's own ``_patch_lang`` runs
    once per launch (and once for the helpers of ``triton.language`` itself, whose module sees the language
    another way) instead of once more per helper call (here 7-10 modules patched a launch against 616-1054);
    the language is Triton's again after each launch; the programs' outputs and gradients are bit for bit
    those of the unmended interpreter."""
    import triton.language as tl
    import triton.runtime.interpreter as interpreter

    mended = interpreter._patch_lang
    if not getattr(mended, "once_per_launch", False):  # (Triton 3.9's shape, which the mend checks for)
        assert not triton.__version__.startswith("3.9."), "the mend no longer applies to Triton 3.9"
        pytest.skip(f"the mend leaves Triton {triton.__version__}'s interpreter alone (another shape)")
    counts = []
    builtin = interpreter._patch_builtin  # what every patch of the language calls, per module patched
    monkeypatch.setattr(interpreter, "_patch_builtin", lambda *a: (counts.append(a[0]), builtin(*a))[1])
    per_launch = []  # how many modules each launch patched, helpers included
    launch = interpreter.GridExecutor.__call__

    def counted(self, *args, **kwargs):
        before = len(counts)
        try:
            return launch(self, *args, **kwargs)
        finally:
            per_launch.append(len(counts) - before)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", counted)

    def run():
        torch.manual_seed(3)
        scheme = randomized("t5", num_buckets=8, max_distance=10)
        q, k, v = (torch.randn(1, 3, 40, 16, requires_grad=True) for _ in range(3))
        pos = torch.arange(40)
        out = table_flash_kernel(q, k, v, scheme, q_pos=pos, k_pos=pos, causal=True,
                                 scale=scheme.default_scale(), interpret=True)
        return [out, *torch.autograd.grad(out.square().sum(), [q, k, v, *scheme.parameters()])]

    got = run()
    once = per_launch[:]
    # forward, dK/dV, dQ: each patched the language for itself and once for triton.language's own helpers
    assert len(once) == 3 and max(once) <= 2 * min(once), once
    assert tl.core.is_builtin(tl.program_id) and tl.core.is_builtin(tl.tensor.__add__)  # Triton's again
    per_launch.clear()
    monkeypatch.setattr(interpreter, "_patch_lang", mended.original)
    want = run()
    assert min(per_launch) > 20 * max(once), (per_launch, once)  # unmended: once more for every helper call
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_the_interpreter_is_refused_where_it_is_off_and_the_gpu_where_it_is_on():
    """And ``table_flash_kernel`` runs the GPU's programs unless told to interpret (every other test here
    says ``interpret=True``): under the interpreter its default is refused."""
    from posbias.kernels.table_programs import programs

    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1" if not INTERPRETED else "none runs on the GPU"):
        programs(not INTERPRETED)
    if INTERPRETED:
        s, q, pos = build("t5", n_heads=2, head_dim=16), torch.randn(1, 2, 8, 16), torch.arange(8)
        with pytest.raises(RuntimeError, match="none runs on the GPU"):
            table_flash_kernel(q, q, q, s, q_pos=pos, k_pos=pos, causal=True, scale=1.0)


def test_the_interpreter_is_read_from_tritons_knobs_where_it_has_them(monkeypatch):
    """From Triton 3.4 a program runs as ``triton.knobs.runtime.interpret`` says, and the knob reads
    ``TRITON_INTERPRET`` only where nobody set it: ``interpreting`` follows the knob, here set against the
    variable both ways. The knob is set in its object's ``__dict__``, as its setter keeps it, without the
    setter's own change to the variable. Before 3.4 (no knobs, here removed) the variable alone, read as
    those releases read it: 1, true, on or yes in any case; anything else or nothing is off."""
    from posbias.kernels.table_programs import interpreting

    if getattr(triton, "knobs", None) is not None:
        for knob in (True, False):
            monkeypatch.setitem(vars(triton.knobs.runtime), "interpret", knob)
            monkeypatch.setenv("TRITON_INTERPRET", "0" if knob else "1")
            assert interpreting() is knob
        monkeypatch.delattr(triton, "knobs")
    for value, on in [("1", True), ("true", True), ("On", True), ("YES", True), ("0", False), ("", False),
                      ("no", False), (None, False)]:
        if value is None:
            monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        else:
            monkeypatch.setenv("TRITON_INTERPRET", value)
        assert interpreting() is on, value


@pytest.mark.cuda
@NO_CUDA
@pytest.mark.parametrize("name, options, causal", CASES + [
    ("fire", {"init_L": 1000}, True), ("fire", {"init_L": 40}, True), ("fire", {"init_L": 40}, False)])
def test_triton_backend_matches_the_reference_on_cuda(name, options, causal):
    """Compiled on the GPU: float32 (no tf32) against the reference, training shape and 37 queries at
    the end, gradients to the scheme's parameters included."""
    compare(randomized(name, **options), "triton", causal=causal, device="cuda")
    compare(randomized(name, **options), "triton", causal=causal, lq=37, device="cuda")


@pytest.mark.cuda
@NO_CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["t5", "alibi", "kerple-log", "fire"])
def test_triton_backend_within_the_references_own_rounding(name, dtype):
    within_reference_rounding(randomized(name), dtype, "cuda", backend="triton")
    within_reference_rounding(randomized(name), dtype, "cuda", lq=1, lk=3000, grad=False, backend="triton")


@pytest.mark.cuda
@NO_CUDA
@pytest.mark.parametrize("name, options", [("t5", {}), ("alibi", {}), ("kerple-log", {}), ("fire", {"init_L": 40})])
def test_triton_dropout_matches_the_reference_on_cuda(name, options):
    """Dropout inside the compiled programs: the reference's mask pair for pair (the hash's 32-bit
    arithmetic on the GPU), float32, outputs and every gradient, training and 37 queries at the end."""
    for lq in (None, 37):
        compare(randomized(name, **options), "triton", lq=lq, device="cuda", dropout_p=0.2, dropout_seed=2**31 + 5)


@pytest.mark.cuda
@NO_CUDA
def test_triton_backend_with_grouped_heads_padding_and_packed_documents_on_cuda():
    """What attention() hands the backend around it: grouped keys and values (repeated first), a right
    padding mask (the kept keys as a slice) and packed documents (each from position 0), against the
    reference with the same arguments."""
    s = randomized("kerple-log").to("cuda")
    q = torch.randn(2, 3, 90, 16, device="cuda")
    kv = [torch.randn(2, 1, 90, 16, device="cuda") for _ in range(2)]
    torch.testing.assert_close(attention(q, *kv, s, backend="triton", enable_gqa=True),
                               attention_reference(q, *kv, s, enable_gqa=True), atol=2e-5, rtol=1e-4)
    k, v = torch.randn_like(q), torch.randn_like(q)
    mask = torch.ones(2, 90, dtype=torch.bool, device="cuda")
    mask[1, 70:] = False
    torch.testing.assert_close(attention(q, k, v, s, backend="triton", key_mask=mask),
                               attention(q, k, v, s, backend="reference", key_mask=mask), atol=2e-5, rtol=1e-4)
    docs = torch.tensor([[0] * 40 + [1] * 50, [0] * 90], device="cuda")
    torch.testing.assert_close(attention(q, k, v, s, backend="triton", document_ids=docs),
                               attention(q, k, v, s, backend="reference", document_ids=docs), atol=2e-5, rtol=1e-4)


@pytest.mark.cuda
@NO_CUDA
def test_a_new_length_reuses_the_compiled_programs():
    """Lengths are runtime arguments that Triton does not specialise on: after the first calls (a prefill
    and a step of 3 queries, whose 16-row tiles compile apart, and one with dropout), calls at 1,024
    tokens (a multiple of 16, 1,001 not), decoding steps (one query; split keys) and dropout with other
    rates and seeds (a seed of 16 or past 2^31 included) compile nothing new."""
    from posbias.kernels.table_programs import programs

    s = randomized("t5").to("cuda")
    forward = programs(False).forward

    def compiled() -> int:  # Triton 3.2+ keeps (kernels, …) per device; older ones a dict per device
        caches = getattr(forward, "device_caches", None)
        return sum(len(c[0]) for c in caches.values()) if caches is not None else sum(map(len, forward.cache.values()))

    def call(lq: int, lk: int, **dropout) -> None:
        q, k = torch.randn(1, 3, lq, 16, device="cuda"), torch.randn(1, 3, lk, 16, device="cuda")
        with torch.no_grad():
            attention(q, k, k, s, backend="triton", **dropout)

    call(1001, 1001)
    call(3, 1001)  # (a decoding step's forward has tiles of its own: compiled once too)
    call(1001, 1001, dropout_p=0.1, dropout_seed=1)  # (with dropout: compiled once, whatever the seed)
    before = compiled()
    call(1024, 1024)
    call(1, 1024)
    call(1, 5000)
    call(1024, 1024, dropout_p=0.2, dropout_seed=2**32 - 1)
    call(1001, 1001, dropout_p=0.1, dropout_seed=16)
    assert compiled() == before
