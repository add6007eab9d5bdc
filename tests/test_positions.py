"""Runs of positions (posbias.positions): a run's start is known without reading the tensor, a changed
tensor is never taken for the run it was, and a call reads its positions at most once (none where
posbias made them): on a GPU each read makes the host wait."""

import copy
import io

import pytest
import torch
from torch.overrides import TorchFunctionMode

import _stand_in_cuda
from _helpers import CUDA_BUILD, CUDA_PATHS, NO_CUDA
from posbias import build
from posbias.attention import attention, attention_reference, choose_backend
from posbias.model import ModelConfig, TransformerLM
from posbias import positions
from posbias.positions import consecutive, first, highest, lowest, piece, run, run_start, runs, starts

SCHEMES = ["nope", "rope", "offset", "t5", "alibi", "kerple-log", "fire"]


class HostReads(TorchFunctionMode):
    """Counts the reads of a tensor's values into Python (``int(t)``, ``bool(t)``, ``t.item()``,
    ``t.tolist()``...): on CUDA, each one waits for the device."""

    READS = {"item", "tolist", "__bool__", "__int__", "__index__", "__float__", "equal"}

    def __init__(self):
        super().__init__()
        self.count, self._inside = 0, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        counted = getattr(func, "__name__", "") in self.READS and not self._inside  # (one read calls others)
        if counted:
            self.count += 1
            self._inside = True
        try:
            return func(*args, **(kwargs or {}))
        finally:
            if counted:
                self._inside = False


def reads(fn):
    with HostReads() as mode:
        fn()
    return mode.count


def test_a_run_answers_without_reading_its_values():
    pos = run(7, 5)
    assert pos.tolist() == [7, 8, 9, 10, 11] and pos.dtype == torch.int64
    answers = []
    assert reads(lambda: answers.extend([run_start(pos), first(pos), lowest(pos), highest(pos), consecutive(pos)])) == 0
    assert answers == [7, 7, 7, 11, True]
    plain = torch.arange(7, 12)  # the same values, not made by run(): read
    assert run_start(plain) is None
    assert reads(lambda: answers.extend([first(plain), lowest(plain), highest(plain)])) == 3
    assert answers[5:] == [7, 7, 11]


@pytest.mark.parametrize("change", ["in place", "through a view", "through its base"])
def test_a_changed_run_is_read_again_never_taken_for_the_run_it_was(change):
    pos = run(3, 6)
    if change == "in place":
        pos.add_(10)
    elif change == "through a view":
        pos[2:].fill_(0)
    else:  # a piece of a run, whose whole then changes
        whole = run(0, 8)
        pos = piece(whole, 2)
        whole.mul_(2)
    assert run_start(pos) is None
    assert (first(pos), int(pos[-1])) == {"in place": (13, 18), "through a view": (3, 0),
                                          "through its base": (4, 14)}[change]
    assert consecutive(pos) == (change == "in place")


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copy_carries_no_run_of_its_own(how):
    """A deep copy (or a saved and loaded tensor) keeps Python attributes, the run's record with them;
    the record names the tensor it was made for, so the copy is read like any other tensor (were it
    trusted, a copy later changed in place as often as the original had been would pass for a run)."""
    pos = run(5, 4)
    if how == "deepcopy":
        other = copy.deepcopy(pos)
    else:
        buf = io.BytesIO()
        torch.save(pos, buf)
        buf.seek(0)
        other = torch.load(buf)
    assert torch.equal(other, pos) and run_start(other) is None and run_start(pos) == 5
    other.add_(1)
    assert first(other) == 6


def test_pieces_of_a_run_are_runs():
    pos = run(100, 10)
    for start, stop in [(0, 3), (4, None), (-3, None), (2, -2), (9, 10), (10, None), (0, 0)]:
        part = piece(pos, start, stop)
        assert torch.equal(part, pos[start:stop])
        if len(part):
            assert run_start(part) == int(part[0])
    plain = torch.tensor([4, 2, 9])
    assert run_start(piece(plain, 1)) is None and piece(plain, 1).tolist() == [2, 9]


@pytest.mark.parametrize("together", [False, True])
def test_runs_reads_only_what_it_does_not_know_and_keeps_other_positions(together, monkeypatch):
    """On the CPU each unknown value is read as it is needed (a read is no wait there); on CUDA they are
    read together, one wait for the device: that branch runs here on CPU tensors (``together``)."""
    if together:
        monkeypatch.setattr(positions, "read_ahead", lambda device: True)
    made, given, scattered, one, empty = run(0, 6), torch.arange(20, 26), torch.tensor([3, 5, 6]), torch.tensor([9]), \
        torch.zeros(0, dtype=torch.int64)
    out = []
    assert reads(lambda: out.extend(runs(made, given, scattered, one, empty))) == (1 if together else 4)  # (a start, a check, a check, a start)
    assert out[0] is made and out[2] is scattered and out[4] is empty
    assert run_start(out[1]) == 20 and torch.equal(out[1], given) and run_start(out[3]) == 9
    assert run_start(given) is None  # the caller's tensor is left as it was (no record on it)
    assert reads(lambda: runs(*out[:2])) == 0
    assert starts(made, given, scattered, one, empty, torch.arange(3.0)) == [0, 20, None, 9, None, None]


def test_a_run_made_in_inference_mode_is_one():
    with torch.inference_mode():
        pos = run(4, 3)
        assert run_start(pos) == 4 and run_start(piece(pos, 1)) == 5


@pytest.mark.parametrize("name", SCHEMES)
def test_attention_reads_no_positions_it_made_and_the_given_ones_once(name, monkeypatch):
    """Default positions (posbias's own) are not read at all: a decoding step, inference and training
    (forward and backward) read no tensor value into Python for any scheme but FIRE, whose training
    reads its learned threshold and the MLP's kinks. Given positions are read once, in one wait for the
    device (here on CPU tensors, the CUDA way of reading them). The outputs are those of the reference."""
    import sys

    for where in (positions, sys.modules["posbias.attention"]):  # (attention's resolve holds the name too; the
        # package's attribute posbias.attention is the function)
        monkeypatch.setattr(where, "read_ahead", lambda device: True)
    scheme = build(name, n_heads=2, head_dim=16)
    torch.manual_seed(0)
    for lq, lk in [(1, 300), (1, 600), (300, 300)]:  # (FIRE's decoding query at 599: past its threshold 512)
        q, k, v = (torch.randn(1, 2, n, 16) for n in (lq, lk, lk))
        with torch.no_grad():
            attention(q, k, v, scheme)  # (values kept on the scheme are made on a first call)
            out = []
            assert reads(lambda: out.append(attention(q, k, v, scheme))) == 0, (lq, lk)
            torch.testing.assert_close(out[0], attention_reference(q, k, v, scheme), atol=2e-5, rtol=1e-4)
            given = dict(q_pos=torch.arange(lk - lq, lk), k_pos=torch.arange(lk))
            assert reads(lambda: attention(q, k, v, scheme, **given)) == 1
    q, k, v = (torch.randn(1, 2, 300, 16, requires_grad=True) for _ in range(3))
    training = reads(lambda: attention(q, k, v, scheme).sum().backward())
    assert training == 0 or (name == "fire" and training <= 4), training


def test_a_decoding_model_reads_no_positions():
    """Generation through the model's KV cache: every step's query positions and the cache's key
    positions are runs, so a step reads nothing (T5 and ALiBi; the logits are the uncached model's)."""
    for name in ["t5", "alibi"]:
        torch.manual_seed(0)
        model = TransformerLM(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, scheme=name)).eval()
        idx = torch.randint(0, 50, (1, 12))
        caches = [{} for _ in model.blocks]
        with torch.no_grad():
            model(idx[:, :8], caches=caches)
            steps = []
            for t in range(8, 12):
                assert reads(lambda: steps.append(model(idx[:, t:t + 1], start=t, caches=caches))) == 0, (name, t)
            whole = model(idx)
        torch.testing.assert_close(torch.cat(steps, 1), whole[:, 8:], atol=1e-5, rtol=1e-4)


@CUDA_BUILD
@pytest.mark.parametrize("name, path", [(n, CUDA_PATHS[n]) for n in ("t5", "offset", "alibi", "rope", "nope", "kerple-log")])
@pytest.mark.parametrize("lq, train", [(1, False), (300, False), (300, True)])
def test_the_cuda_paths_read_nothing_checked_on_fake_tensors(name, path, lq, train):
    """Under fake CUDA tensors (PyTorch's meta kernels: shapes, no values, and reading one raises) on any
    CUDA build of torch, GPU or not, ``attention`` chooses the CUDA path ``auto`` takes (banded for T5
    and offset, the native ALiBi path, SDPA for RoPE and NoPE, blocks for KERPLE) and runs it, a decoding step, inference and a training forward,
    without reading a value: the dispatch and the kernels' CUDA branches decide from runs alone. (The
    code before runs failed here at its first ``int(q_pos[0])``. FIRE is left out: it reads its learned
    threshold, once while its parameters are unchanged without autograd, every call in training.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from posbias.positions import run

    scheme = build(name, n_heads=4, head_dim=64)  # (built on real tensors: T5 finds its last bucket by a search)
    with FakeTensorMode(allow_non_fake_inputs=True), torch.set_grad_enabled(train):
        scheme = scheme.to("cuda")
        q = torch.randn(1, 4, lq, 64, device="cuda", dtype=torch.bfloat16, requires_grad=train)
        k, v = (torch.randn(1, 4, 600, 64, device="cuda", dtype=torch.bfloat16, requires_grad=train) for _ in range(2))
        assert choose_backend(scheme, q, q_pos=run(600 - lq, lq, "cuda"), k_pos=run(0, 600, "cuda"), causal=True) == path
        out = attention(q, k, v, scheme)
        assert out.shape == q.shape and out.device.type == "cuda"


@pytest.mark.cuda
@NO_CUDA
@pytest.mark.parametrize("name, backend, train", [
    ("t5", "auto", False), ("alibi", "auto", False), ("t5", "auto", True), ("alibi", "auto", True),
    ("t5", "triton", False), ("alibi", "triton", False), ("fire", "triton", False), ("t5", "triton", True)])
def test_a_call_on_cuda_waits_for_nothing(name, backend, train):
    """On CUDA a call with posbias's own positions never makes the host wait for the device (PyTorch's
    sync debug mode raises at the first wait): a decoding step (one query against 4k keys) after a
    first call, and a training step's forward and backward."""
    scheme = build(name, n_heads=8, head_dim=64).cuda()
    lq = 1024 if train else 1
    q, k, v = (torch.randn(1, 8, n, 64, device="cuda", dtype=torch.bfloat16, requires_grad=train)
               for n in (lq, 4096, 4096))
    if not train:
        scheme.requires_grad_(False)
    with torch.set_grad_enabled(train):
        attention(q, k, v, scheme, backend=backend).float().sum().backward() if train else \
            attention(q, k, v, scheme, backend=backend)  # compiles, keeps what a step reuses
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = attention(q, k, v, scheme, backend=backend)
            if train:
                out.float().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("name, train, dropout", [
    ("t5", False, 0.0), ("alibi", False, 0.0), ("kerple-log", False, 0.0), ("t5", True, 0.0), ("offset", True, 0.0),
    ("alibi", True, 0.0), ("kerple-log", True, 0.0), ("t5", True, 0.1)])
def test_a_call_on_the_cuda_paths_reads_nothing_rehearsed_on_the_stand_in_ops(name, train, dropout, monkeypatch):
    """``test_a_call_on_cuda_waits_for_nothing`` without a GPU: under :func:`_stand_in_cuda.pretend_cuda`
    the paths ``auto`` takes on CUDA (banded, the native ALiBi path, blocks for KERPLE) run their CUDA
    branches (training with attention dropout: the dropout kernel), and no value of a CUDA tensor is read
    into Python (``item``, ``tolist``, ``bool``, ``int``, ``float``, ``index``; counted on the class, so the
    backward's reads count too; a CPU tensor's, a dropout seed's, is no wait) in a decoding step after a
    first call, or in a training step's forward and backward; positions given as tensors are read once,
    all together. It found the dropout kernel's table
    gradient reading its offsets' ends from the device, two waits a backward on a GPU."""
    read, inside = [], []
    for method in sorted(HostReads.READS - {"equal"}):  # (torch.equal is a function, no method of a tensor)
        def counted(t, *args, _real=getattr(torch.Tensor, method), _name=method, **kwargs):
            # a read of a CUDA tensor waits for the device; the stand-in ops' own checks read, a kernel does not;
            # a read passes through the mode and comes back here once more (counted once)
            if isinstance(t, _stand_in_cuda.CudaLooking) and not _stand_in_cuda.standing_in() and not inside:
                read.append(_name)
            inside.append(1)
            try:
                return _real(t, *args, **kwargs)
            finally:
                inside.pop()
        monkeypatch.setattr(torch.Tensor, method, counted)
    with _stand_in_cuda.pretend_cuda(monkeypatch):
        scheme = build(name, n_heads=4, head_dim=16).to("cuda").requires_grad_(train)
        lq = 300 if train else 1
        q, k, v = (torch.randn(1, 4, n, 16, device="cuda", dtype=torch.bfloat16, requires_grad=train)
                   for n in (lq, 600, 600))
        with torch.set_grad_enabled(train):
            attention(q, k, v, scheme, dropout_p=dropout)  # (a first call: what a step reuses)
            read.clear()
            out = attention(q, k, v, scheme, dropout_p=dropout)
            if train:
                torch.autograd.grad(out.float().sum(), [q, k, v])
        assert choose_backend(scheme, q, q_pos=run(600 - lq, lq), k_pos=run(0, 600), causal=True) == CUDA_PATHS[name]
        assert read == []
        with torch.no_grad():  # positions given as tensors: read once, together (one wait)
            attention(q, k, v, scheme, q_pos=torch.arange(600 - lq, 600, device="cuda"),
                      k_pos=torch.arange(600, device="cuda"))
        assert len(read) == 1, read


def test_same_compares_runs_by_start_and_length_and_others_by_value():
    """:func:`positions.same` is ``torch.equal`` for positions, two runs answering without a read: the
    same start and length are the same positions; another start or another length are not."""
    assert positions.same(run(3, 4), run(3, 4))
    assert not positions.same(run(3, 4), run(4, 4))
    assert not positions.same(run(3, 4), run(3, 5))
    given = torch.tensor([3, 4, 5, 6])
    assert positions.same(given, given.clone()) and positions.same(run(3, 4), given)
    assert not positions.same(given, torch.tensor([3, 4, 5, 7]))  # same shape, another value
    assert not positions.same(given, torch.tensor([3, 4, 5]))  # another shape
    assert not positions.same(run(3, 3), given)


@pytest.mark.parametrize("gathered", [False, True], ids=["one by one", "read together"])
def test_two_positions_that_do_not_step_by_one_are_not_consecutive(gathered, monkeypatch):
    """Two positions are the shortest case a step is checked in (one is consecutive by itself): 3, 7 is
    not a run, 3, 4 is; the same where positions are read together, as on CUDA (forced here)."""
    monkeypatch.setattr(positions, "read_ahead", lambda device: gathered)
    gap, step, one = torch.tensor([3, 7]), torch.tensor([3, 4]), torch.tensor([9])
    assert not consecutive(gap) and consecutive(step) and consecutive(one)
    assert starts(gap, step, one) == [None, 3, 9]
    assert starts(torch.tensor([3, 7, 8]), torch.tensor([5, 6, 7])) == [None, 5]
