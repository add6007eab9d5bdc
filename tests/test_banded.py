"""The ``banded`` backend (issue 12's CUDA candidate) and the fused op it stands on.

On the CPU every case runs on PyTorch's CPU flash op, so the algorithm (far parts, band chunks and
their batching, the merge, the ring-attention backward, the table's diagonal sums) is checked on
every machine. The CUDA ops' call signatures and shapes are checked on the CPU too, with fake CUDA
tensors; their numbers only on a GPU (``pytest -m cuda``)."""

import pytest
import torch
import _stand_in_cuda
from _helpers import CUDA, CUDA_BUILD, NO_CUDA, REHEARSED, FakeCtx, compare, randomized, within_reference_rounding

import posbias.kernels.banded as banded
from posbias import build
from posbias.attention import attention, attention_reference, resolve, usable
from posbias.kernels import fused


@pytest.fixture(params=[24, 5])
def small_chunks(monkeypatch, request):
    """Chunks of 24 queries (at least the band's overhang: a chunk's keys reach into the next chunk's
    at most) or of 5 (fewer: into the next three), and groups of at most 3 chunks: every kind of
    band group at test sizes."""
    rows = request.param
    monkeypatch.setattr(banded, "chunk_rows",
                        lambda w, causal, device_type="cuda": max(rows, banded.overhang(w, causal)) if rows > 5 else rows)
    for cap in ("BAND_ELEMENTS", "CPU_BAND_ELEMENTS"):
        monkeypatch.setattr(banded, cap, 2 * 3 * 3 * rows * (rows + 2 * 9))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lq, lk, q0", [(301, 301, None), (37, 301, None), (1, 301, None), (90, 301, 100),
                                        (23, 23, None), (9, 9, None)])
def test_every_band_group_and_far_part_matches_the_reference(small_chunks, causal, lq, lk, q0):
    """Interior chunks batched and split across groups, end chunks on their own, far parts present or
    not, queries at the end of the keys, in their middle, or a single one."""
    for name, options in (("t5", {"num_buckets": 8, "max_distance": 10, "bidirectional": not causal}), ("offset", {"max_distance": 9})):
        compare(randomized(name, **options), "banded", causal=causal, lq=lq, lk=lk, q0=q0)


@pytest.mark.parametrize("causal", [True, False])
def test_far_parts_of_a_single_query_and_a_single_key(causal):
    """One key past the window: the last query's far-left part and, bidirectionally, the first query's
    far-right part hold one query against one key each (``_far_parts``' edges: a part is kept where it
    has a query, however few)."""
    for name, options in (("t5", {"num_buckets": 8, "max_distance": 10, "bidirectional": not causal}),
                          ("offset", {"max_distance": 9, "bidirectional": not causal})):
        scheme = randomized(name, **options)
        w = scheme.flat_beyond
        parts = banded._far_parts(w + 1, w + 1, 0, w, causal)
        assert [(p.rows, p.keys) for p in parts] == [(slice(w, w + 1), slice(0, 1))] + (
            [] if causal else [(slice(0, 1), slice(w, w + 1))])
        compare(scheme, "banded", causal=causal, lk=w + 1)
        assert banded._far_parts(w, w, 0, w, causal) == []  # no key past the window: no far part


@pytest.mark.parametrize("causal", [True, False])
def test_the_dense_band_of_cuda_matches_the_reference_too(small_chunks, monkeypatch, causal):
    """On the CPU the band runs on the fused flash op with its bias as the mask; the dense float32
    form that CUDA runs (its flash kernel takes no mask) is checked here on the CPU as well."""
    monkeypatch.setattr(banded, "flash_available", lambda x: False)
    for lq, q0 in [(301, None), (37, None), (90, 100)]:
        compare(randomized("t5", num_buckets=8, max_distance=10, bidirectional=not causal), "banded", causal=causal,
                lq=lq, q0=q0)


def test_groups_cover_every_query_once(small_chunks):
    for causal in (True, False):
        w = 10
        for lq, lk, delta, batched in [(301, 301, 0, True), (37, 301, 264, False), (90, 301, 100, True),
                                       (5, 5, 0, False)]:
            groups = banded._groups(lq, lk, delta, w, causal, banded.chunk_rows(w, causal), 6, banded.BAND_ELEMENTS)
            rows = [r for g in groups for r in range(g.r0, g.r0 + g.n * g.rows)]
            assert rows == list(range(lq))
            if banded.chunk_rows(w, causal) >= 24:  # interior chunks batched where there are several
                assert any(g.n > 1 for g in groups) == batched
            for g in groups:
                assert g.k0 >= 0 and g.k0 + (g.n - 1) * g.rows + g.keys <= lk


def test_usable_names_what_it_needs(monkeypatch):
    q = torch.randn(1, 3, 8, 16)
    pos = torch.arange(8)
    t5 = build("t5", n_heads=3, head_dim=16)
    assert usable("banded", t5, q, q_pos=pos, k_pos=pos, causal=True) is None
    odd = build("t5", n_heads=3, head_dim=12)
    assert usable("banded", odd, q[..., :12], q_pos=pos, k_pos=pos, causal=True) is None  # the CPU op takes any
    with _stand_in_cuda.pretend_cuda(monkeypatch):  # CUDA's fused kernels want a multiple of 8
        assert usable("banded", odd, _stand_in_cuda.looks_cuda(q[..., :12]), q_pos=pos, k_pos=pos,
                      causal=True) == "needs head_dim a multiple of 8 on CUDA (got 12)"
    assert "constant beyond a window" in usable("banded", build("alibi", n_heads=3, head_dim=16), q, q_pos=pos,
                                                k_pos=pos, causal=True)
    assert "among the keys" in usable("banded", t5, q, q_pos=pos + 5, k_pos=pos, causal=True)
    assert "contiguous" in usable("banded", t5, q, q_pos=pos * 2, k_pos=pos * 2, causal=True)
    with pytest.raises(ValueError, match="chunk=0 must be a positive number of queries"):
        banded.banded_kernel(q, q, q, t5, q_pos=pos, k_pos=pos, causal=True, scale=1.0, chunk=0)


def _dense(q, k, v, scale, causal):
    """The fused op's contract in plain float64: bottom-right causal, out and lse."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if causal:
        lq, lk = s.shape[-2:]
        s = s.masked_fill(torch.arange(lk)[None, :].to(s.device) > torch.arange(lq)[:, None].to(s.device) + lk - lq,
                          float("-inf"))
    return torch.softmax(s, -1) @ v.double(), torch.logsumexp(s, -1)


@pytest.mark.parametrize("device, dtype", [("cpu", torch.float32), pytest.param("cuda", torch.float32, marks=CUDA.marks),
                                           pytest.param("cuda", torch.bfloat16, marks=CUDA.marks),
                                           ("stand-in", torch.float32), ("stand-in", torch.bfloat16)])
@pytest.mark.parametrize("causal, lq, lk", [(True, 64, 64), (True, 37, 100), (True, 1, 100), (False, 37, 100)])
def test_fused_op_forward_and_backward(monkeypatch, device, dtype, causal, lq, lk):
    """Out and lse against float64; the backward given (out, lse − c) returns the gradients of
    softmax with that lse (what the banded merge relies on), checked against autograd of the dense form.
    ``stand-in``: the CUDA branches on the CPU, with the CUDA ops replaced by :mod:`_stand_in_cuda`'s
    (the calls bound to the ops' schemas, their meta kernels' shapes, the documented masks and
    layouts): bf16 to the flash op, float32 to the memory-efficient one with its padded log-sum-exp."""
    q, k, v = (torch.randn(2, 3, n, 16, device="cpu" if device == "stand-in" else device).to(dtype)
               for n in (lq, lk, lk))
    inputs = (q, k, v)
    if device == "stand-in":
        ops = _stand_in_cuda.install(monkeypatch)
        inputs = tuple(map(_stand_in_cuda.looks_cuda, inputs))
    out, lse, aux = fused.forward(*inputs, 0.3, causal)
    assert lse.dtype == torch.float32 and lse.shape == (2, 3, lq) and out.dtype == dtype
    want_o, want_l = _dense(q, k, v, 0.3, causal)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), want_o, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), want_l, atol=tol, rtol=tol)
    do = torch.randn_like(out)
    grads = fused.backward(do, *inputs, out, lse, aux, 0.3, causal)
    if device == "stand-in":
        kernel = "flash" if dtype == torch.bfloat16 else "efficient"
        assert ops.calls == [kernel, f"{kernel} backward"]
    qq, kk, vv = (t.double().requires_grad_() for t in (q, k, v))
    o, _ = _dense(qq, kk, vv, 0.3, causal)
    want = torch.autograd.grad((o * do.double()).sum(), [qq, kk, vv])
    for a, b in zip(grads, want):
        torch.testing.assert_close(a.double(), b, atol=tol * 10, rtol=tol * 10)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lq", [600, 37, 1])
def test_the_kernel_as_it_runs_on_cuda_rehearsed_on_the_stand_in_ops(monkeypatch, causal, lq):
    """``banded`` with every CUDA branch taken, on the CPU (:func:`_stand_in_cuda.pretend_cuda`): chunks
    of 256 queries, the CUDA band budget, far parts in the inputs' dtype — float32 on the
    memory-efficient op with its padded log-sum-exp, exact against the reference with every gradient
    (table included); bf16 within the reference's own rounding, its far parts on the flash op, but those
    of at most ``FLOAT32_FAR_ROWS`` queries on the memory-efficient one in float32 in training (on the
    CPU they all go float32 to the CPU op), and on the flash op again without autograd."""
    with _stand_in_cuda.pretend_cuda(monkeypatch) as ops:
        for name, options in (("t5", {"num_buckets": 8, "max_distance": 10, "bidirectional": not causal}),
                              ("offset", {"max_distance": 9, "bidirectional": not causal})):
            compare(randomized(name, **options), "banded", device="cuda", causal=causal, lq=lq, lk=600)
        assert set(ops.calls) == {"efficient", "efficient backward"}
        t5 = randomized("t5", num_buckets=8, max_distance=10, bidirectional=not causal)
        for grad in (True, False):
            ops.calls.clear()
            within_reference_rounding(t5, torch.bfloat16, device="cuda", lq=lq, lk=600, grad=grad, backend="banded")
            kernel = "efficient" if grad and lq <= banded.FLOAT32_FAR_ROWS else "flash"
            assert set(ops.calls) == ({kernel, f"{kernel} backward"} if grad else {kernel})


def test_the_cuda_flash_kernel_takes_half_precision_at_head_dims_of_multiples_of_8_up_to_256():
    """``fused.flash_fits``, read on CUDA alone (elsewhere the CPU op runs), so no CPU test reached it: its
    rule reads q's dtype and shape only. fp16 and bf16 at head_dim 8, 64, 72, 128, 256 go to the flash
    kernel; float32, and head dims not a multiple of 8 or past 256, to the memory-efficient one."""
    def fits(d, dtype=torch.bfloat16):
        return fused.flash_fits(torch.empty(1, 1, 1, d, dtype=dtype))

    for dtype in (torch.float16, torch.bfloat16):
        assert all(fits(d, dtype) for d in (8, 64, 72, 128, 256)), dtype
        assert not any(fits(d, dtype) for d in (4, 12, 100, 260, 264, 512)), dtype
    assert not fits(64, torch.float32) and not fits(64, torch.float64)


@CUDA_BUILD
def test_cuda_calls_have_the_right_signatures_and_shapes_on_fake_tensors():
    """The banded kernel's CUDA calls run under fake CUDA tensors (PyTorch's meta kernels: argument
    order, layouts and the shapes they return) on any CUDA build of torch, GPU or not (PyPI's default
    Linux wheel is one), so a GPU session does not spend its minutes on a wrong call. Backward through
    the bf16 flash kernel too; the float32 memory-efficient backward's meta kernel does not match its
    own schema in PyTorch 2.11–2.13 (``got multiple values for argument 'scale'``), so only its
    forward runs here."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    w = 20
    for dtype, causal, lq in [(torch.bfloat16, True, 300), (torch.bfloat16, False, 300), (torch.bfloat16, True, 7),
                              (torch.float32, True, 300)]:
        with FakeTensorMode(), torch.no_grad():
            q = torch.randn(2, 4, lq, 64, device="cuda", dtype=dtype)
            k, v = (torch.randn(2, 4, 600, 64, device="cuda", dtype=dtype) for _ in range(2))
            vals = torch.randn(4, 2 * w + 1, device="cuda")  # the table, offsets −w … w
            ctx = FakeCtx(True, True, True, True)
            out = banded._Banded.forward(ctx, q, k, v, vals, 600 - lq, w, causal, 0.125, banded.chunk_rows(w, causal))
            assert out.shape == q.shape and out.dtype == torch.float32 and out.device.type == "cuda"
            if dtype == torch.bfloat16:
                grads = banded._Banded.backward(ctx, torch.randn_like(out))[:4]
                assert [g.shape for g in grads] == [q.shape, k.shape, v.shape, vals.shape]
                assert [g.dtype for g in grads] == [dtype, dtype, dtype, torch.float32]


@pytest.mark.cuda
@NO_CUDA
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", ["t5", "offset"])
def test_banded_on_cuda_matches_the_reference(name, causal):
    options = {"max_distance": 20, "bidirectional": not causal} if name == "t5" else {"max_distance": 17}
    compare(randomized(name, **options), "banded", causal=causal, device="cuda")
    compare(randomized(name, **options), "banded", causal=causal, lq=37, device="cuda")


@pytest.mark.parametrize("device", REHEARSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lq", [300, 1])
def test_banded_in_low_precision_within_the_references_own_rounding(dtype, device, lq):
    """The far parts on CUDA's flash kernel in bf16/fp16 (on the CPU in float32; in training a far part
    of few queries in float32 on CUDA too), the band in float32: as close to the float32 truth as the
    reference in the same precision, for every query of 300 keys and for the last alone."""
    within_reference_rounding(randomized("t5", max_distance=20), dtype, device, lq=lq, backend="banded")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_far_part_under_large_logits_in_half_precision_is_as_close_as_the_reference(dtype):
    """T5's unscaled logits, here of std 32 (q, k, v of std 2, head_dim 64), two queries past 168 far
    keys: q/k/v's gradients against the float64 truth on the same rounded inputs within 1.5× the
    reference's own error. Measured: equal to it; while the CPU's fused op ran the far part in half
    precision, 1.8× (bf16, q: 0.157 against 0.088) and 1.7× (fp16, k: 0.021 against 0.012)."""
    torch.manual_seed(3)
    s = build("t5", n_heads=2, head_dim=64)
    with torch.no_grad():
        s.table.normal_()
    q = (torch.randn(2, 2, 2, 64) * 2).to(dtype)
    k, v = ((torch.randn(2, 2, 300, 64) * 2).to(dtype) for _ in range(2))
    q_pos, k_pos = torch.arange(295, 297), torch.arange(300)
    g = torch.randn(2, 2, 2, 64).to(dtype).double()

    def grads(backend, t):
        inputs = [x.to(t).requires_grad_() for x in (q, k, v)]
        run = attention_reference if backend == "exact" else lambda *a, **kw: attention(*a, backend=backend, **kw)
        out = run(*inputs, s if backend != "exact" else s.double(), q_pos=q_pos, k_pos=k_pos)
        return torch.autograd.grad((out.double() * g).sum(), inputs)

    truth = grads("exact", torch.float64)
    s.float()
    mine, ref = grads("banded", dtype), grads("reference", dtype)
    for name, a, b, t in zip("qkv", mine, ref, truth):
        err, base = float((a.double() - t).abs().max()), float((b.double() - t).abs().max())
        assert err <= 1.5 * base + 1e-6, (name, err, base)


def test_resolve_keeps_banded_inputs_exact():
    """Positions past 2^24 reach the kernel as small integers (resolve subtracts one reference), so
    the band's offsets stay exact in any dtype."""
    s = randomized("t5", num_buckets=8, max_distance=10)
    q = torch.randn(1, 3, 40, 16)
    pos = torch.arange(2**40, 2**40 + 40)
    _, _, _, qp, kp, _ = resolve(q, q, q, s, q_pos=pos, k_pos=pos, scale=None)
    assert int(qp[0]) == 0
    torch.testing.assert_close(attention(q, q, q, s, backend="banded", q_pos=pos, k_pos=pos),
                               attention_reference(q, q, q, s, q_pos=pos, k_pos=pos))


@pytest.mark.parametrize("causal", [True, False])
def test_the_band_is_placed_by_the_queries_distance_from_the_first_key(causal):
    """Keys from position 1000 on (a window of a longer cache) and queries among them, through
    ``attention`` and handed to the kernel itself (``attention`` first re-references positions to 0):
    the band follows the query's position minus the first key's, not the positions themselves; and
    chunks of a single query, the smallest the kernel takes, give the reference too."""
    s = randomized("t5", num_buckets=8, max_distance=10, bidirectional=not causal)
    compare(s, "banded", causal=causal, lq=90, q0=1100, k_pos=torch.arange(1000, 1301))
    q, k, v = (torch.randn(1, 3, n, 16) for n in (12, 15, 15))
    q_pos, k_pos = torch.arange(1003, 1015), torch.arange(1000, 1015)
    with torch.no_grad():
        got = banded.banded_kernel(q, k, v, s, q_pos=q_pos, k_pos=k_pos, causal=causal, scale=1.0, chunk=1)
        want = attention_reference(q, k, v, s, q_pos=q_pos, k_pos=k_pos, causal=causal, scale=1.0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
