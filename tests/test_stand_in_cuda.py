"""The stand-ins of ``tests/_stand_in_cuda.py`` against a kernel they were not written from: PyTorch's CPU
flash attention op and its backward, for each mask the CUDA ops take.

The 95 stand-in tests trust the stand-ins' values: what posbias does with a CUDA op's output, log-sum-exp
and gradients is checked against what the stand-in returns. Here each stand-in meets the real CPU op on
the same float32 inputs: the output, the log-sum-exp (natural log of the scaled scores), and dq, dk, dv
from a backward given the forward's output and log-sum-exp, in the order the op's schema names them.

The CPU op's causal flag is top-left. The memory-efficient op's ``custom_mask_type = 1`` is that mask;
the bottom-right one (the flash op's ``is_causal``, the memory-efficient op's type 2) is the top-left one
on the queries preceded by ``Lk − Lq`` more, whose rows are then dropped (each row of attention depends on
its own query alone). What the CUDA ops do on a GPU is checked there alone (``pytest -m cuda``)."""

import pytest
import torch

import _stand_in_cuda

CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
CPU_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
SCALE = 0.3
SHAPES = [(37, 37), (20, 50), (1, 50)]  # (Lq, Lk): square, a block of queries at the keys' end, decoding


def cpu_op(q, k, v, do, mask: str):
    """(out, lse, dq, dk, dv) of the CPU op for ``[B, H, L, D]`` inputs under ``mask`` (none, top-left,
    bottom-right), the backward given the op's own out and lse."""
    lead = k.shape[2] - q.shape[2] if mask == "bottom-right" else 0
    pad = lambda x: torch.cat([x.new_zeros(*x.shape[:2], lead, x.shape[3]), x], 2)  # noqa: E731
    qq, dd = pad(q), pad(do)  # the leading rows' zero gradient adds nothing to dk and dv
    out, lse = CPU(qq, k, v, 0.0, mask != "none", scale=SCALE)
    dq, dk, dv = CPU_BACKWARD(dd, qq, k, v, out, lse, 0.0, mask != "none", scale=SCALE)
    return out[:, :, lead:], lse[:, :, lead:], dq[:, :, lead:], dk, dv


def inputs(lq, lk):
    torch.manual_seed(lq * 100 + lk)
    return [torch.randn(2, 3, n, 16) for n in (lq, lk, lk, lq)]  # q, k, v, the output's gradient


def same(got, want, what):
    assert got.dtype == want.dtype == torch.float32, what
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("lq, lk", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_the_flash_stand_in_is_the_cpu_op_with_a_bottom_right_causal_mask(lq, lk, causal):
    """The flash op's stand-in, forward and backward, with ``is_causal`` the bottom-right mask."""
    q, k, v, do = inputs(lq, lk)
    want = cpu_op(q, k, v, do, "bottom-right" if causal else "none")
    ops = _stand_in_cuda.StandIn()
    out, lse, cq, ck, mq, mk, seed, offset, _ = ops.flash_forward(q, k, v, 0.0, causal, False, scale=SCALE)
    grads = ops.flash_backward(do, q, k, v, out, lse, cq, ck, mq, mk, 0.0, causal, seed, offset, scale=SCALE)
    for got, expected, what in zip((out, lse, *grads), want, ("out", "lse", "dq", "dk", "dv"), strict=True):
        same(got, expected, what)


@pytest.mark.parametrize("lq, lk", SHAPES)
@pytest.mark.parametrize("mask_type, mask", [(0, "none"), (1, "top-left"), (2, "bottom-right")])
def test_the_memory_efficient_stand_in_is_the_cpu_op_in_its_layout_and_padding(lq, lk, mask_type, mask):
    """The memory-efficient op's stand-in: ``[B, L, H, D]`` tensors, ``custom_mask_type`` 0, 1 and 2,
    and its log-sum-exp padded to a multiple of 32 queries (a NaN tail here), which its backward takes
    back."""
    q, k, v, do = inputs(lq, lk)
    want = cpu_op(q, k, v, do, mask)
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    ops = _stand_in_cuda.StandIn()
    out, lse, seed, offset, mq, mk = ops.efficient_forward(t(q), t(k), t(v), None, None, None, None, None, 0.0,
                                                           mask_type, True, scale=SCALE)
    assert lse.shape == (2, 3, 32 * -(-lq // 32)) and lse[..., lq:].isnan().all() and (mq, mk) == (lq, lk)
    dq, dk, dv, _ = ops.efficient_backward(t(do).contiguous(), t(q), t(k), t(v), None, out, None, None, mq, mk,
                                              lse, 0.0, seed, offset, mask_type, False, scale=SCALE)
    got = (t(out), lse[..., :lq], t(dq), t(dk), t(dv))
    for g, expected, what in zip(got, want, ("out", "lse", "dq", "dk", "dv"), strict=True):
        same(g, expected, what)


def test_a_backward_is_refused_the_seed_of_another_forward():
    """Each forward's philox seed names it; a backward with another's lengths or mask is refused."""
    q, k, v, do = inputs(20, 50)
    ops = _stand_in_cuda.StandIn()
    first = ops.flash_forward(q, k, v, 0.0, True, False, scale=SCALE)
    ops.flash_forward(q, k, v, 0.0, False, False, scale=SCALE)
    out, lse, cq, ck, mq, mk, seed, offset, _ = first
    ops.flash_backward(do, q, k, v, out, lse, cq, ck, mq, mk, 0.0, True, seed, offset, scale=SCALE)
    with pytest.raises(AssertionError, match="given the seed of a forward of"):
        ops.flash_backward(do, q, k, v, out, lse, cq, ck, mq, mk, 0.0, False, seed, offset, scale=SCALE)
