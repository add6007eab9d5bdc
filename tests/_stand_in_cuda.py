"""Stand-ins for the four CUDA attention ops that :mod:`posbias.kernels.fused` calls, so that its CUDA
branches run, and are checked for their numbers, on a machine without a GPU.

``fused.forward`` chooses the CUDA ops by ``q.device.type``. A :class:`CudaLooking` tensor is a CPU
tensor that says it is on CUDA; :func:`install` replaces ``torch.ops.aten``'s flash and
memory-efficient ops (forward and backward) by functions that

* bind the call to the op's own schema, by name, and check each argument against its declared type
  (what the dispatcher would refuse), and refuse what posbias must never ask for: dropout, a bias,
  variable-length batches, the ``[Lq, Lk]`` debug mask, or a log-sum-exp not computed;
* where PyTorch has a meta kernel for the op (every one but the memory-efficient backward, whose meta
  kernel in torch 2.13 does not take its ``out`` argument), run it on meta copies of the arguments,
  so that the shapes and dtypes returned are the real op's;
* compute the values in float64 on the CPU with the semantics PyTorch documents for each op: the
  flash op's ``is_causal`` is the bottom-right mask for ``Lq != Lk`` (``torch.nn.attention.bias``
  sends ``causal_lower_right`` to it for that reason); the memory-efficient op's ``custom_mask_type``
  is 0 (none), 1 (causal from the top left) or 2 (from the bottom right), its tensors are
  ``[B, L, H, D]``, and its log-sum-exp is padded to a multiple of 32 queries (the pad is written as
  NaN here, so that a caller reading it sees it); each backward uses the ``out`` and log-sum-exp it
  is given, as the kernels do.

The philox seed and offset of each forward carry a call number that the backward checks, with the
lengths and mask that call had. The real kernels' numbers are checked on a GPU alone
(``pytest -m cuda``); these stand-ins check what posbias does with them.

:class:`PretendCuda`, a torch function mode, carries the pretence through a whole computation: what is
asked for on CUDA is made on the CPU and reads as CUDA. :func:`pretend_cuda` puts the two together
for a block (the backward pass and checkpoint's recomputation included); ``tests/conftest.py`` runs
every test case marked ``stand_in_cuda`` (``_helpers.STAND_IN``, the third case of ``REHEARSED``) in it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from copy import deepcopy

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

try:  # imported now, with the real ops: its import (which torch.testing.assert_close does lazily) reads their overloads
    import torch.distributed.tensor  # noqa: F401
except ImportError:  # a torch built without distributed
    pass

ALIGN = 32  # the memory-efficient op's log-sum-exp is padded to a multiple of this many queries
#: the real ops, held before :func:`install` replaces them, for their schemas and meta kernels
OPS = {name: getattr(torch.ops.aten, name) for name in (
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
    "_efficient_attention_forward", "_efficient_attention_backward")}


CUDA = torch.device("cuda")  # made once, outside any mode (under one, ``torch.device(…)`` is a call it sees)


class CudaLooking(torch.Tensor):
    """A CPU tensor whose ``device`` reads CUDA: what makes ``fused.forward`` call the CUDA ops."""

    @property
    def device(self):
        return CUDA

    def __deepcopy__(self, memo):  # (torch's own wants new_empty to keep the subclass, which it does not here)
        if id(self) not in memo:
            with torch._C.DisableTorchFunction():  # a leaf, as the original is (a parameter must be)
                copy = looks_cuda(self.detach().as_subclass(torch.Tensor).clone()).requires_grad_(self.requires_grad)
            memo[id(self)] = copy
            # with its attributes: nn.Parameter makes a parameter of a subclass by marking it _is_param
            copy.__dict__.update(deepcopy(self.__dict__, memo))
        return memo[id(self)]


def looks_cuda(t: Tensor) -> Tensor:
    return t.as_subclass(CudaLooking)


def _cpu_device(x):
    if isinstance(x, torch.device) and x.type == "cuda":
        return torch.device("cpu")
    return "cpu" if isinstance(x, str) and (x == "cuda" or x.startswith("cuda:")) else x


def _each(fn, x):
    """``fn`` on ``x``, or on each item of a plain tuple, list or dict (a ``torch.Size`` or a named
    tuple of results is left as it is)."""
    if type(x) in (tuple, list):
        return type(x)(_each(fn, y) for y in x)
    if type(x) is dict:
        return {key: _each(fn, y) for key, y in x.items()}
    return fn(x)


def _device_kind(x) -> str | None:
    if isinstance(x, CudaLooking):
        return "cuda"
    if isinstance(x, torch.device):
        return x.type
    if isinstance(x, str) and x.split(":")[0] in ("cpu", "cuda"):
        return x.split(":")[0]
    return None


def _asked(func, args, kwargs) -> str | None:
    """The device a call asks for by name ("cuda", "cpu"), or None where its inputs decide."""
    name = getattr(func, "__name__", "")
    if name in ("cpu", "cuda"):
        return name
    if kwargs.get("device") is not None:
        return _device_kind(kwargs["device"]) or "cpu"
    if name == "to":  # t.to(device), t.to(other) or t.to(dtype)
        kinds = [k for k in map(_device_kind, args[1:]) if k] + [
            "cpu" for a in args[1:] if type(a) is torch.Tensor]
        return kinds[0] if kinds else None
    return None


def _any_cuda(x) -> bool:
    if type(x) in (tuple, list):
        return any(map(_any_cuda, x))
    if type(x) is dict:
        return any(map(_any_cuda, x.values()))
    return isinstance(x, CudaLooking)


class PretendCuda(TorchFunctionMode):
    """Under this mode a CPU computation reads as CUDA where CUDA would be: a device asked for as CUDA (a
    factory's ``device=q.device``, ``.to(q.device)``, ``.cuda()``) is the CPU, and a tensor made so, or
    from a :class:`CudaLooking` tensor, is :class:`CudaLooking`; one made on the CPU (``torch.tensor(3)``,
    ``.cpu()``, ``.to("cpu")``) stays a plain CPU tensor, as it would beside a GPU. With :func:`install`'s
    stand-ins, ``posbias.attention`` runs its CUDA branches (the backend rules, the kernels' CUDA sizes and
    dtypes, the fused CUDA ops) on any machine."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        asked = _asked(func, args, kwargs)
        cuda = asked == "cuda" if asked else _any_cuda((args, kwargs))
        if func is torch._C._nn._parse_to:  # (Module.to's parsing: it makes nothing, and its CUDA is the tensors')
            return func(*args, **kwargs)
        # (a mode is off while its __torch_function__ runs: a function handed on, checkpoint's, is put back under it)
        args = tuple(_pretended(a) if inspect.isfunction(a) else a for a in _each(_cpu_device, args))
        out = func(*args, **_each(_cpu_device, kwargs))
        if cuda:  # (a parameter: what .to gives back unchanged, which Module.to makes a parameter again)
            return _each(lambda x: looks_cuda(x) if type(x) in (torch.Tensor, torch.nn.Parameter) else x, out)
        if asked == "cpu":
            return _each(lambda x: _plain(x) if isinstance(x, CudaLooking) else x, out)
        return out


def _pretended(fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with PretendCuda():
            return fn(*args, **kwargs)
    return run


_depth = [0]  # stand-in calls under way


def standing_in() -> bool:
    """Whether a stand-in op is running (what it reads of its tensors is not the caller's reading)."""
    return _depth[0] > 0


def _unpretended(fn):
    """A stand-in runs as plain CPU code: no :class:`PretendCuda`, no subclass dispatch."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        _depth[0] += 1
        try:
            with torch._C.DisableTorchFunction():
                return fn(*args, **kwargs)
        finally:
            _depth[0] -= 1
    return run


def _plain(x):
    return x.as_subclass(torch.Tensor) if isinstance(x, torch.Tensor) else x


def _fits(value, jit_type) -> bool:
    kind = jit_type.kind()
    if kind == "OptionalType":
        return value is None or _fits(value, jit_type.getElementType())
    if kind == "TensorType":  # None passes as an undefined tensor (the flash op's dense cum_seq_q and _k)
        return value is None or isinstance(value, torch.Tensor)
    if kind == "BoolType":
        return isinstance(value, bool)
    if kind in ("IntType", "SymIntType"):
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "FloatType":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    raise AssertionError(f"no check for a {jit_type} argument")


def bind(op, args, kwargs) -> dict:
    """The call's arguments by the names of ``op``'s schema, each checked against its declared type."""
    schema = op.default._schema
    positional = [a for a in schema.arguments if not a.kwarg_only]
    assert len(args) <= len(positional), f"{schema.name}: {len(args)} positional arguments, at most {len(positional)}"
    names = {a.name for a in schema.arguments}
    assert set(kwargs) <= names, f"{schema.name}: no argument {sorted(set(kwargs) - names)}"
    bound = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    bound.update(zip((a.name for a in positional), args))
    bound.update(kwargs)
    for a in schema.arguments:
        assert a.name in bound, f"{schema.name}: {a.name} not given"
        assert _fits(bound[a.name], a.type), f"{schema.name}: {a.name} = {bound[a.name]!r} is not a {a.type}"
    return {name: _plain(value) for name, value in bound.items()}


def _meta(op, args, kwargs):
    to_meta = lambda x: torch.empty_like(_plain(x), device="meta") if isinstance(x, torch.Tensor) else x
    return op(*map(to_meta, args), **{k: to_meta(v) for k, v in kwargs.items()})


def _same_layout(got, meta, what: str) -> None:
    assert got.shape == meta.shape and got.dtype == meta.dtype, (
        f"{what}: {tuple(got.shape)} {got.dtype}, the op's meta kernel gives {tuple(meta.shape)} {meta.dtype}")


def _scores(q, k, scale, mask: str):
    """Scaled float64 scores of ``[B, H, L, D]`` inputs, masked as ``mask`` says (none, top-left,
    bottom-right)."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    lq, lk = s.shape[-2:]
    shift = {"none": None, "top-left": 0, "bottom-right": lk - lq}[mask]
    if shift is not None:
        s = s.masked_fill(torch.arange(lk)[None, :] > torch.arange(lq)[:, None] + shift, float("-inf"))
    return s


def _grads(do, q, k, v, out, lse, scale, mask: str):
    """dq, dk, dv from the ``out`` and ``lse`` given (``[B, H, Lq]``), as a flash backward computes them."""
    p = torch.exp(_scores(q, k, scale, mask) - lse.double()[..., None])
    do = do.double()
    ds = p * (do @ v.double().transpose(-1, -2) - (do * out.double()).sum(-1, keepdim=True))
    return (ds @ k.double()) * scale, (ds.transpose(-1, -2) @ q.double()) * scale, p.transpose(-1, -2) @ do


class StandIn:
    """The installed stand-ins: ``calls`` names each op called, in order."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.forwards: list[tuple] = []  # per forward: (Lq, Lk, mask, kernel)

    def _token(self, meta_seed, meta_offset, lq, lk, mask, kernel):
        n = len(self.forwards)
        self.forwards.append((lq, lk, mask, kernel))
        return (torch.full(meta_seed.shape, n, dtype=meta_seed.dtype),
                torch.full(meta_offset.shape, n + 1000, dtype=meta_offset.dtype))

    def _check_token(self, seed, offset, lq, lk, mask, kernel):
        n = int(seed.reshape(-1)[0])
        assert 0 <= n < len(self.forwards) and (seed == n).all() and (offset == n + 1000).all(), (
            "the backward's philox seed and offset are not one forward's")
        assert self.forwards[n] == (lq, lk, mask, kernel), (
            f"a backward of {(lq, lk, mask, kernel)} given the seed of a forward of {self.forwards[n]}")

    @staticmethod
    def _scale(a, d):
        return a["scale"] if a["scale"] is not None else 1 / math.sqrt(d)

    @_unpretended
    def flash_forward(self, *args, **kwargs):
        op = OPS["_scaled_dot_product_flash_attention"]
        self.calls.append("flash")
        a = bind(op, args, kwargs)
        assert a["dropout_p"] == 0 and not a["return_debug_mask"], "no dropout and no [Lq, Lk] debug mask"
        q, k, v = a["query"], a["key"], a["value"]
        meta = _meta(op, args, kwargs)
        mask = "bottom-right" if a["is_causal"] else "none"
        s = _scores(q, k, self._scale(a, q.shape[-1]), mask)
        lse = torch.logsumexp(s, -1)
        out = (torch.exp(s - lse[..., None]) @ v.double()).to(q.dtype)
        lse = lse.float()
        _same_layout(out, meta[0], "flash out")
        _same_layout(lse, meta[1], "flash logsumexp")
        seed, offset = self._token(meta[6], meta[7], q.shape[2], k.shape[2], mask, "flash")
        return (out, lse, meta[2], meta[3], meta[4], meta[5], seed, offset, torch.empty(meta[8].shape, dtype=q.dtype))

    @_unpretended
    def flash_backward(self, *args, **kwargs):
        op = OPS["_scaled_dot_product_flash_attention_backward"]
        self.calls.append("flash backward")
        a = bind(op, args, kwargs)
        q, k, v = a["query"], a["key"], a["value"]
        assert a["dropout_p"] == 0
        assert (a["max_q"], a["max_k"]) == (q.shape[2], k.shape[2]), "max_q and max_k are the lengths"
        assert a["cum_seq_q"] is None and a["cum_seq_k"] is None, "no variable-length batch"
        mask = "bottom-right" if a["is_causal"] else "none"
        self._check_token(a["philox_seed"], a["philox_offset"], q.shape[2], k.shape[2], mask, "flash")
        lse = a["logsumexp"]
        assert lse.dtype == torch.float32 and lse.shape == q.shape[:3], "the forward's [B, H, Lq] float32 logsumexp"
        grads = _grads(a["grad_out"], q, k, v, a["out"], lse, self._scale(a, q.shape[-1]), mask)
        meta = _meta(op, args, kwargs)
        grads = tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v)))
        for g, m, what in zip(grads, meta, ("dq", "dk", "dv")):
            _same_layout(g, m, f"flash {what}")
        return grads

    @_unpretended
    def efficient_forward(self, *args, **kwargs):
        op = OPS["_efficient_attention_forward"]
        self.calls.append("efficient")
        a = bind(op, args, kwargs)
        assert a["dropout_p"] == 0 and a["bias"] is None, "no dropout and no bias"
        assert a["cu_seqlens_q"] is a["cu_seqlens_k"] is a["max_seqlen_q"] is a["max_seqlen_k"] is None
        assert a["seqlen_k"] is None and a["window_size"] is None
        assert a["compute_log_sumexp"], "posbias needs the log-sum-exp"
        mask = {0: "none", 1: "top-left", 2: "bottom-right"}[a["custom_mask_type"]]
        q, k, v = (a[n].transpose(1, 2) for n in ("query", "key", "value"))  # [B, L, H, D] → [B, H, L, D]
        meta = _meta(op, args, kwargs)
        s = _scores(q, k, self._scale(a, q.shape[-1]), mask)
        lse = torch.logsumexp(s, -1)
        out = (torch.exp(s - lse[..., None]) @ v.double()).to(q.dtype).transpose(1, 2)
        lq = q.shape[2]
        padded = torch.full((*lse.shape[:2], -(-lq // ALIGN) * ALIGN), float("nan"))
        padded[..., :lq] = lse
        _same_layout(out, meta[0], "efficient out")
        _same_layout(padded, meta[1], "efficient logsumexp")
        seed, offset = self._token(meta[2], meta[3], lq, k.shape[2], mask, "efficient")
        assert (meta[4], meta[5]) == (lq, k.shape[2])
        return out, padded, seed, offset, meta[4], meta[5]

    @_unpretended
    def efficient_backward(self, *args, **kwargs):
        op = OPS["_efficient_attention_backward"]
        self.calls.append("efficient backward")
        a = bind(op, args, kwargs)
        assert a["dropout_p"] == 0 and a["bias"] is None and not a["bias_requires_grad"]
        assert a["cu_seqlens_q"] is None and a["cu_seqlens_k"] is None and a["window_size"] is None
        q, k, v, do, out = (a[n].transpose(1, 2) for n in ("query", "key", "value", "grad_out_", "out"))
        lq, lk = q.shape[2], k.shape[2]
        assert (a["max_seqlen_q"], a["max_seqlen_k"]) == (lq, lk), "max_seqlen_q and max_seqlen_k are the lengths"
        mask = {0: "none", 1: "top-left", 2: "bottom-right"}[a["custom_mask_type"]]
        self._check_token(a["philox_seed"], a["philox_offset"], lq, lk, mask, "efficient")
        lse = a["logsumexp"]
        assert lse.dtype == torch.float32 and lse.shape == (*q.shape[:2], -(-lq // ALIGN) * ALIGN), (
            f"the logsumexp padded as the forward gives it, not {tuple(lse.shape)}")
        assert do.shape == out.shape == q.shape
        dq, dk, dv = _grads(do, q, k, v, out, lse[..., :lq], self._scale(a, q.shape[-1]), mask)
        return (*(g.to(t.dtype).transpose(1, 2) for g, t in zip((dq, dk, dv), (q, k, v))), torch.empty(()))


def install(monkeypatch) -> StandIn:
    """The four CUDA ops replaced by stand-ins (undone with ``monkeypatch``)."""
    stand_in = StandIn()
    fns = (stand_in.flash_forward, stand_in.flash_backward, stand_in.efficient_forward, stand_in.efficient_backward)
    for name, fn in zip(OPS, fns):
        monkeypatch.setattr(torch.ops.aten, name, fn)
    return stand_in


@contextlib.contextmanager
def pretend_cuda(monkeypatch):
    """A block in which CPU tensors read as CUDA (:class:`PretendCuda`), the CUDA ops are
    :func:`install`'s stand-ins, and the backward pass runs under the mode too (``torch.autograd.grad``
    is itself a function the mode hands on with the mode off, so the engine is put back under it:
    custom autograd Functions' backwards and checkpoint's recomputation). Yields the stand-ins, whose
    ``calls`` list the ops called."""
    stand_in = install(monkeypatch)
    # the engine's one entry (torch.autograd.grad and backward call it by this name)
    monkeypatch.setattr(torch.autograd, "_engine_run_backward", _pretended(torch.autograd._engine_run_backward))
    # checkpoint compares each recomputed tensor's device with the saved one's, and autograd hands it a saved
    # tensor's plain Python object or its CudaLooking one by turns: it reads the device the storage is on
    checks = torch.utils.checkpoint._allowed_determinism_checks_to_fns
    monkeypatch.setitem(checks, "default", lambda x: {"shape": x.shape, "dtype": x.dtype,
                                                     "device": torch.Tensor.device.__get__(x)})
    # Module.to("cuda") swaps in new parameters (CudaLooking ones) rather than changing the old ones' data
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        with PretendCuda():
            yield stand_in
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
