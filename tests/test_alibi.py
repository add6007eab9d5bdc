"""The ``alibi`` kernel's two paths: the CPU one (float32, one extra column) and the native one, issue
12's extra-dimension candidate for CUDA (the inputs' dtype, head_dim padded to a multiple of 8, the
bias split over three bf16/fp16 columns). The native path runs on the CPU flash op here, so its
arithmetic is checked on every machine; its CUDA calls under fake CUDA tensors; its numbers on a
GPU (``pytest -m cuda``)."""

import functools

import _stand_in_cuda
import pytest
import torch
from _helpers import CUDA_BUILD, NO_CUDA, REHEARSED, FakeCtx, compare, randomized, within_reference_rounding

import posbias.kernels.alibi as alibi
from posbias import build
from posbias.attention import BACKENDS, attention, attention_reference, usable


@pytest.fixture
def native(monkeypatch):
    """``backend="alibi"`` runs the native path, in blocks of 64 queries (several blocks at test sizes)."""
    monkeypatch.setitem(BACKENDS, "alibi", functools.partial(alibi.alibi_kernel, native=True, block=64))


@pytest.mark.parametrize("lq, lk, q0", [(301, 301, None), (37, 301, None), (1, 301, None), (90, 301, 100),
                                        (64, 64, None), (5, 5, None), (300, 301, 1)])
def test_native_path_matches_the_reference(native, lq, lk, q0):
    """Outputs and q/k/v gradients in float32: blocks with and without earlier keys (a single one: the
    queries from position 1), queries at the end of the keys, in their middle, a single one (decoding)."""
    compare(build("alibi", n_heads=3, head_dim=16), "alibi", lq=lq, lk=lk, q0=q0)


@pytest.mark.parametrize("head_dim", [8, 24, 32])
def test_native_path_with_a_scale_that_is_no_power_of_two(native, head_dim):
    """The queries' extra columns hold ``c``, the power of two nearest ``1/scale`` (exact in every dtype),
    and the keys' hold the slopes over ``scale·c``: 1 where the scale is a power of two (head_dim 16 or
    64, as elsewhere in these tests), 0.71 or 1.41 at head_dim 8, 24 and 32."""
    compare(build("alibi", n_heads=3, head_dim=head_dim), "alibi", lq=90, lk=301)


@pytest.mark.parametrize("is_native", [False, True])
def test_the_kernel_reads_positions_from_the_first_key(is_native):
    """Handed positions that do not start at 0 (``attention`` re-references them first): keys from 1000,
    queries among them, both paths, against the reference."""
    s = build("alibi", n_heads=3, head_dim=16)
    q, k, v = (torch.randn(1, 3, n, 16) for n in (150, 180, 180))
    q_pos, k_pos = torch.arange(1030, 1180), torch.arange(1000, 1180)
    got = alibi.alibi_kernel(q, k, v, s, q_pos=q_pos, k_pos=k_pos, causal=True, scale=0.25, native=is_native,
                             block=64)
    torch.testing.assert_close(got, attention_reference(q, k, v, s, q_pos=q_pos, k_pos=k_pos), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("device", REHEARSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_native_path_in_low_precision_within_the_references_own_rounding(native, dtype, device):
    within_reference_rounding(build("alibi", n_heads=3, head_dim=16), dtype, device, backend="alibi")


def _error(dtype, n, pieces=alibi.HALF_PIECES, block=None):
    """Max output error of the native path and of the reference in ``dtype``, both against the float32
    truth, for 8 heads (slopes 1/2 … 1/256) at length ``n``."""
    torch.manual_seed(0)
    s = build("alibi", n_heads=8, head_dim=64)
    q, k, v = (torch.randn(1, 8, n, 64).to(dtype) for _ in range(3))
    pos = torch.arange(n)
    truth = attention_reference(q.float(), k.float(), v.float(), s).double()
    got = alibi.alibi_kernel(q, k, v, s, q_pos=pos, k_pos=pos, causal=True, scale=0.125, native=True,
                             block=block, pieces=pieces)
    ref = attention_reference(q, k, v, s)
    return (got.double() - truth).abs().max().item(), (ref.double() - truth).abs().max().item()


def test_one_rounded_bias_column_is_not_enough():
    """Why the bias is split: in bf16 one column holding ``m(j − r)`` rounds it by up to 2⁻⁹ of its size,
    a large error in a 400-query block; three columns reach float32's precision (measured at 3,000
    queries in one block: one column 4.36 off, two or three 0.0080, the bf16 reference 0.0078)."""
    one, ref = _error(torch.bfloat16, 400, pieces=1)
    three, _ = _error(torch.bfloat16, 400)
    assert one > 0.5 and three <= 2 * ref


def test_native_path_at_length_past_one_block_in_bf16():
    """The default bf16 blocks (4,096 queries) at 5,000: a block with earlier keys and one without."""
    got, ref = _error(torch.bfloat16, 5000)
    assert got <= 2 * ref + torch.finfo(torch.bfloat16).eps


def test_native_path_keeps_positions_past_2_24_exact(native):
    s = build("alibi", n_heads=3, head_dim=16)
    q, k, v = (torch.randn(1, 3, 200, 16).to(torch.bfloat16) for _ in range(3))
    far = torch.arange(2**40, 2**40 + 200)
    near = torch.arange(200)
    got = attention(q, k, v, s, backend="alibi", q_pos=far, k_pos=far)
    torch.testing.assert_close(got, attention(q, k, v, s, backend="alibi", q_pos=near, k_pos=near))


def test_usable_names_what_it_needs():
    q = torch.randn(1, 3, 8, 16)
    pos = torch.arange(8)
    s = build("alibi", n_heads=3, head_dim=16)
    assert usable("alibi", s, q, q_pos=pos, k_pos=pos, causal=True) is None
    assert "causal linear bias" in usable("alibi", s, q, q_pos=pos, k_pos=pos, causal=False)
    assert "causal linear bias" in usable("alibi", build("t5", n_heads=3, head_dim=16), q, q_pos=pos,
                                              k_pos=pos, causal=True)
    assert "among the keys" in usable("alibi", s, q, q_pos=pos + 5, k_pos=pos, causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_native_path_is_cudas_default_rehearsed_on_the_stand_in_ops(monkeypatch, dtype):
    """``backend="alibi"`` on pretended CUDA (:func:`_stand_in_cuda.pretend_cuda`) takes the native
    path without being asked: float32 in 512-query blocks on the memory-efficient op, with its padded
    log-sum-exp (queries over two blocks, in one, and one query), exact against the reference with every
    gradient; bf16 in one 4,096-query block on the flash op, head_dim 16 + 3 bias columns padded to 24,
    within the reference's own rounding."""
    s = build("alibi", n_heads=3, head_dim=16)
    with _stand_in_cuda.pretend_cuda(monkeypatch) as ops:
        if dtype == torch.float32:
            for lq in (600, 37, 1):
                compare(s, "alibi", device="cuda", lq=lq, lk=600)
        else:
            within_reference_rounding(s, dtype, device="cuda", lq=300, lk=600, backend="alibi")
    kernel = "efficient" if dtype == torch.float32 else "flash"
    assert set(ops.calls) == {kernel, f"{kernel} backward"}


@CUDA_BUILD
@pytest.mark.parametrize("dtype, d, backward", [(torch.bfloat16, 64, True), (torch.float16, 128, True),
                                                (torch.bfloat16, 256, False), (torch.float32, 64, False)])
def test_cuda_calls_have_the_right_signatures_and_shapes_on_fake_tensors(dtype, d, backward):
    """The native path's CUDA calls under fake CUDA tensors (argument order, layouts, shapes): flash
    attention at head_dim 64 + 8 and 128 + 8 with its backward, the memory-efficient kernel where flash
    does not fit (bf16 at 256 + 8; float32, whose backward's meta kernel does not match its schema)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), torch.no_grad():
        q, k, v = (torch.randn(2, 4, 700, d, device="cuda", dtype=dtype) for _ in range(3))
        slopes = torch.rand(4, device="cuda")
        pieces = 1 if dtype == torch.float32 else alibi.HALF_PIECES
        width = -(-(d + pieces) // 8) * 8
        ctx = FakeCtx(True, True, True, False)
        out = alibi._ALiBi.forward(ctx, q, k, v, slopes, 0, 0, d ** -0.5, 256, pieces, width)
        assert out.shape == q.shape and out.dtype == dtype and out.device.type == "cuda"
        if backward:
            grads = alibi._ALiBi.backward(ctx, torch.randn_like(out))[:3]
            assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
            assert [g.dtype for g in grads] == [dtype] * 3


@pytest.mark.cuda
@NO_CUDA
@pytest.mark.parametrize("lq", [None, 37, 1])
def test_native_path_on_cuda_matches_the_reference(lq):
    """float32 on CUDA: the memory-efficient kernel, head_dim 16 + 1 padded to 24."""
    compare(randomized("alibi"), "alibi", lq=lq, device="cuda")
