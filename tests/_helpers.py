"""Helpers shared by the test files."""

import importlib
import re
import time
from pathlib import Path

import pytest
import torch

from posbias import build
from posbias.attention import attention, attention_reference
from posbias.testing import rounding_errors, rule_holds

#: the module ``posbias.attention``, for monkeypatching what it holds (the package's attribute of that name,
#: and so ``import posbias.attention as m``, is the function)
ATTENTION_MODULE = importlib.import_module("posbias.attention")

TINY = dict(d_model=32, n_layers=2, n_heads=2)  # a model of about 40k weights, for workflows in seconds
TINY_L = 48  # the training length :func:`tiny_checkpoint` records
#: a study of seconds (add --schemes …, --data and --out)
STUDY = ["--train-len", "16", "--eval-lens", "16", "32", "--steps", "4", "--batch-size", "4", "--d-model", "32",
         "--layers", "1", "--heads", "2", "--eval-tokens", "256", "--quiet"]

NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, NO_CUDA])  # ``pytest -m cuda`` runs these alone
DEVICES = ["cpu", CUDA]  # a CUDA case and its CPU twin
#: the CUDA case rehearsed on the CPU: ``device`` is "cuda", run under :func:`_stand_in_cuda.pretend_cuda`
#: (conftest), so the CUDA branches run, on the stand-in CUDA ops, wherever there is no GPU
STAND_IN = pytest.param("cuda", id="stand-in", marks=[pytest.mark.stand_in_cuda, pytest.mark.skipif(
    torch.cuda.is_available(), reason="a GPU runs the CUDA case itself")])
REHEARSED = [*DEVICES, STAND_IN]
#: the path ``auto`` takes on CUDA for each scheme while ``CUDA_VALIDATED`` is ("banded", "alibi") (what a GPU run
#: validated on 2026-12-04): plain SDPA for the rotary and unbiased ones, banded for a table, the native ALiBi
#: path, the reference's blocks for the rest
CUDA_PATHS = {"sinusoidal": "sdpa", "nope": "sdpa", "rope": "sdpa", "t5": "banded", "offset": "banded",
              "alibi": "alibi", "kerple-log": "blockwise", "kerple-power": "blockwise", "fire": "blockwise"}
# fake CUDA tensors (PyTorch's meta kernels) run on any CUDA build of torch, GPU or not, from torch 2.11 (2.11-2.15
# ran them without a GPU; 2.6's and 2.8's fake mode reach the CUDA runtime and fail without a driver)
CUDA_BUILD = pytest.mark.skipif(
    not torch.backends.cuda.is_built() or not (torch.cuda.is_available() or torch.__version__ >= (2, 11)),
    reason="fake CUDA tensors need a CUDA build of torch (2.11 or newer, or a GPU)")


class FakeCtx:
    """What ``torch.autograd.Function`` hands forward and backward, for calling them directly on fake
    CUDA tensors (the autograd engine itself wants a real CUDA device)."""

    def __init__(self, *needs_input_grad: bool) -> None:
        self.needs_input_grad = needs_input_grad

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def random_options(rng, name: str) -> dict:
    """Options of scheme ``name`` drawn from ``rng`` (a ``random.Random``): T5 causal or bidirectional
    with any bucket count, offset clipped or not, ALiBi plain or symmetric, RoPE with a scaling."""
    if name == "t5":
        buckets, both = rng.choice([4, 8, 16, 32]), rng.random() < 0.4
        return dict(num_buckets=buckets, bidirectional=both, max_distance=rng.choice([buckets // 2 + 2, 20, 64, 128]))
    if name == "offset":
        return dict(max_distance=rng.choice([3, 16, 100]), bidirectional=rng.random() < 0.4, clip=rng.random() < 0.7)
    if name == "alibi":
        return dict(symmetric=rng.random() < 0.3)
    if name == "rope" and rng.random() < 0.5:
        return dict(scaling=rng.choice(["pi", "ntk", "yarn"]), factor=rng.choice([2.0, 4.0]), train_len=64)
    return {}


def perturb_(scheme, generator=None):
    """The scheme's learned values moved from their initialisation: tables far from 0, FIRE and KERPLE
    nearby (where they stay well-defined)."""
    big = scheme.name in ("t5", "offset")
    with torch.no_grad():
        for p in scheme.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * (1.0 if big else 0.1))
    return scheme


def randomized(name, **options):
    """A scheme with its learnable parameters moved well away from their initialisation."""
    s = build(name, n_heads=3, head_dim=16, **options)
    with torch.no_grad():
        for p in s.parameters():
            p.add_(torch.randn_like(p) * 0.7)
    return s


def compare(scheme, backend, *, causal=True, lq=None, lk=301, q0=None, dtype=torch.float32, atol=2e-4, device="cpu",
            batch=2, **kw):
    """``backend`` against the dense reference on ``device``: outputs, q/k/v gradients and the
    scheme's parameter gradients (``scheme`` is moved to ``device``); ``kw`` goes to both calls."""
    lq = lq or lk
    scheme.to(device)
    q, k, v = (torch.randn(batch, scheme.n_heads, n, scheme.head_dim, dtype=dtype, device=device,
                           requires_grad=True) for n in (lq, lk, lk))
    if q0 is not None:
        kw["q_pos"] = torch.arange(q0, q0 + lq, device=device)
    out = attention(q, k, v, scheme, causal=causal, backend=backend, **kw)
    ref = attention_reference(q, k, v, scheme, causal=causal, **kw)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=1e-4)
    g = torch.randn_like(ref)
    params = [p for p in scheme.parameters() if p.requires_grad]
    got = torch.autograd.grad((out * g).sum(), [q, k, v] + params, allow_unused=True)
    want = torch.autograd.grad((ref * g).sum(), [q, k, v] + params, allow_unused=True)
    assert_grads_close(got, want, atol=atol * 10, rtol=1e-3)


def assert_grads_close(got, want, *, atol=0.0, rtol=0.0, scaled=0.0, names=None, context=""):
    """Two lists of gradients equal pair by pair: a missing one (None: nothing reached that input) and
    the other none or exactly zero; otherwise within ``atol + scaled · max(1, |want|)`` and ``rtol``."""
    for n, (a, b) in enumerate(zip(got, want)):
        name = names[n] if names else n
        if a is None or b is None:
            other = a if b is None else b
            assert other is None or not other.abs().any(), f"gradient of {name}: one side has none {context}"
            continue
        tol = atol + scaled * max(1.0, float(b.detach().abs().max()) if b.numel() else 0.0)
        torch.testing.assert_close(a.double(), b.double(), atol=tol, rtol=rtol,
                                   msg=lambda m, name=name: f"gradient of {name} {context}\n{m}")


def assert_same_grads(out, ref, inputs, *, atol=2e-4, rtol=1e-3):
    """The gradients of ``out`` and ``ref`` (under one random output gradient) with respect to ``inputs``
    agree."""
    g = torch.randn_like(ref)
    got = torch.autograd.grad((out * g).sum(), inputs)
    want = torch.autograd.grad((ref * g).sum(), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def within_reference_rounding(scheme, dtype, device="cpu", *, lq=300, lk=300, grad=True, run=attention, **kw):
    """In bf16/fp16 a fast path is judged by the reference run in the same precision
    (:mod:`posbias.testing`, the rule the precision benchmark applies too): against the float32 truth,
    its output and q/k/v gradients may be at most twice as far off as the reference's own, plus one
    unit of the format's precision. ``lq`` queries at the end of ``lk`` keys; ``grad=False`` judges the
    output alone, computed without autograd (the inference paths). ``kw`` goes to
    :func:`posbias.attention` (a forced backend, say), or to ``run(q, k, v, scheme, **kw)`` in its place."""
    errors = rounding_errors(scheme, dtype, device=device, lq=lq, lk=lk, grad=grad, run=run, **kw)
    assert rule_holds(errors), errors


def far_rows_case():
    """Queries 600 past their last key under a steep learned bias (KERPLE-power, r2 up to 1.1): every logit
    a row sees is near −600, and so is its float32 log-sum-exp. ``(scheme, q, k, v, q_pos, k_pos, g)``,
    ``g`` a float64 weight for the output whose gradients the tests compare; seeded."""
    torch.manual_seed(0)
    s = build("kerple-power", n_heads=4, head_dim=32)
    with torch.no_grad():
        s.r1.copy_(torch.tensor([0.5, 1.0, 1.5, 1.4]))
        s.r2.copy_(torch.tensor([0.9, 1.0, 1.1, 0.8]))
    q, k, v = (torch.randn(1, 4, n, 32) for n in (200, 300, 300))
    g = torch.randn(1, 4, 200, 32, dtype=torch.float64)
    return s, q, k, v, torch.arange(700, 900), torch.arange(300), g


def one_line_error(capsys, code, *needles):
    """The command failed the way users are promised: status 2, one line on stderr, no traceback,
    naming each of ``needles``."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def main_timed(capsys, argv):
    """Run ``posbias ARGV`` (it must succeed) and return what it printed, having checked its closing
    ``done in N s``: said once, and N no more than the seconds measured around the call."""
    from posbias.cli import main

    t0 = time.perf_counter()
    assert main(argv) == 0
    wall = time.perf_counter() - t0
    said = "".join(capsys.readouterr())
    took = [int(n) for n in re.findall(r"done in (\d+) s", said)]
    assert len(took) == 1 and took[0] <= wall + 0.5, (took, wall)
    return said


def tiny_checkpoint(path, scheme, **options):
    """A :data:`TINY` model of ``scheme`` with its positional parameters moved from their initial
    values, saved at ``path`` as trained at :data:`TINY_L`."""
    from posbias import checkpoint as ckpt
    from posbias.model import ModelConfig, TransformerLM

    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(scheme=scheme, scheme_options=options, **TINY))
    with torch.no_grad():
        for p in model.scheme.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    ckpt.save_checkpoint(path, model, extra={"train": {"seq_len": TINY_L}})
    return path


def figures_drawn(monkeypatch):
    """``{file name: keyword arguments}`` of every bucket map, heatmap and curve figure a command then
    asks for (none is drawn): what goes into a figure, where a file of the right name is not enough."""
    from posbias import plot

    drawn = {}

    def keep(path, kwargs):
        drawn[Path(path).name] = kwargs
        return Path(path)

    monkeypatch.setattr(plot, "plot_bucket_map", lambda path, **kw: keep(path, kw))
    monkeypatch.setattr(plot, "plot_bias_heatmaps", lambda scheme, path, **kw: keep(path, kw))
    monkeypatch.setattr(plot, "plot_bias_curves", lambda schemes, path, **kw: keep(path, kw))
    return drawn


class RunsOnLoad:
    """A pickled object whose loading would create ``marker`` (as a hostile ``trainer.pt`` or
    ``pytorch_model.bin`` could run anything): reading it with ``weights_only=True`` must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def block_written_out(block, x, scheme, q_pos, k_pos, rows=None):
    """One of the model's pre-norm blocks from its parts, for the last ``rows`` of ``x`` (default all):
    ``h = x + proj(attention(ln1(x)))`` with the reference attention at the positions given, then
    ``h + mlp(ln2(h))``."""
    b, n, d = x.shape
    rows = n if rows is None else rows
    heads = block.attn.n_heads
    q, k, v = block.attn.qkv(block.ln1(x)).view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    y = attention(q[:, :, n - rows:], k, v, scheme, causal=True, q_pos=q_pos, k_pos=k_pos, backend="reference")
    h = x[:, n - rows:] + block.attn.proj(y.transpose(1, 2).reshape(b, rows, d))
    return h + block.mlp(block.ln2(h))


def wrapping_programs(wrap):
    """A stand-in for :func:`posbias.kernels.table_programs.programs` whose every program is ``wrap(program)``
    (``program[grid](*args)`` is how the backend launches one): for a test to spy on or guard each launch."""
    from types import SimpleNamespace

    from posbias.kernels import table_programs

    unwrapped = table_programs.programs
    return lambda interpret: SimpleNamespace(**{name: wrap(p) for name, p in vars(unwrapped(interpret)).items()})
