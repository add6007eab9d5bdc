"""The one contract every positional scheme implements, and the conventions.

Conventions, written once:

* positions are 0-based integers; ``i`` is the query position, ``j`` the key position;
* **offset = i − j** (query minus key). Causal attention sees offsets ≥ 0. The canonical T5 code
  uses ``j − i``; that conversion happens in :func:`posbias.t5_bucket` and nowhere else;
* q, k, v are ``[batch, heads, seq, head_dim]``; a bias is ``[heads, len(q_pos), len(k_pos)]`` in
  float32 and broadcasts over the batch;
* the logit is ``scale · q_i·k_j + PE(i, j) + Mask(i, j)``: posbias adds the bias *after* scaling
  (as the canonical ALiBi code does; the textbook puts PE inside the ``/√d``, which differs only by
  a constant factor on the bias). ``scale`` defaults to ``1/√head_dim`` except for T5, which uses
  unscaled logits (Raffel et al. 2020);
* no scheme has a maximum sequence length.

Four families share the contract:

* ``additive``: :meth:`Scheme.bias` returns the bias; Toeplitz schemes (bias depends only on
  ``i − j``) derive from :class:`ToeplitzScheme` and implement :meth:`ToeplitzScheme.bias_at`;
* ``rotary``: :meth:`Scheme.rotate` rotates q and k by their positions;
* ``absolute``: :meth:`Scheme.embed` returns vectors added to the token embeddings;
* ``none``: nothing (NoPE).
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import Tensor, nn

from ..diagonals import diagonal_sums
from ..positions import consecutive, first, run, run_start

__all__ = ["Scheme", "ToeplitzScheme", "check_bool", "check_int", "check_positive"]

FAMILIES = ("additive", "rotary", "absolute", "none")


def check_int(name: str, value: object, *, minimum: int, hint: str = "") -> int:
    """Validate an integer hyper-parameter; the error names the value and the valid range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}{hint}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}{hint}")
    return value


def check_bool(name: str, value: object) -> bool:
    """Validate a boolean option: a real bool (the string ``"false"`` is truthy in Python)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_positive(name: str, value: object) -> float:
    """Validate a strictly positive finite float hyper-parameter."""
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite number (> 0), got {value!r}")
    return v


def flat_share(start: int, length: int) -> float:
    """Share of the causal query–key pairs of a ``length``-token window (``i ≥ j``) whose offset is
    ``≥ start``: the pairs that a final T5 bucket or a clipped offset entry starting at ``start`` sees."""
    if start >= length:
        return 0.0
    far = length - max(start, 0)
    return far * (far + 1) / (length * (length + 1))


INT64_MAX = 2**63 - 1  # positions are int64; an offset's magnitude |i − j| must be one too


def bias_float(t: Tensor) -> Tensor:
    """A scheme's parameter as its bias is computed from it: float32 (bf16/fp16 parameters too: the bias
    stays exact for a low-precision model), float64 for a scheme in float64 — the reference the tests take
    as exact, whose bias in float32 near −600 (KERPLE-power, a 3,100-token row) moved a gradient by 1e-3."""
    return t.to(torch.promote_types(torch.float32, t.dtype))


def _check_query_pos(query_pos: int | None, offsets: Sequence[int] = ()) -> None:
    """ValueError for an offset whose magnitude is no int64 (|−2⁶³| is not: it would wrap to itself and
    give a NaN or a bias of the wrong sign), a query position outside [0, 2⁶³ − 1], or one that
    ``offsets`` would put keys before 0 from."""
    for d in offsets:
        if not -INT64_MAX <= d <= INT64_MAX:
            raise ValueError(f"offsets {d} is out of range; valid: -{INT64_MAX} ... {INT64_MAX} (|i - j| of int64 "
                             "positions)")
    if query_pos is None:
        return
    if not 0 <= query_pos <= INT64_MAX:
        raise ValueError(f"query_pos must be a position in [0, {INT64_MAX}], got {query_pos}")
    if offsets and max(offsets) > query_pos:
        raise ValueError(f"offsets {max(offsets)} puts the key before position 0 for a query at query_pos "
                         f"{query_pos}; give offsets up to {query_pos}")


def trains_bias(scheme: nn.Module) -> bool:
    """True when autograd will want gradients for the scheme's parameters."""
    return torch.is_grad_enabled() and any(p.requires_grad for p in scheme.parameters())


def needs_grad(scheme: nn.Module, *tensors: Tensor) -> bool:
    """True when autograd will want gradients from a call: of ``tensors`` (q, k, v) or of the scheme."""
    return trains_bias(scheme) or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def kept(scheme: nn.Module, slot: str, key: tuple, make: Callable[[], Any]) -> Any:
    """``make()``, computed from ``scheme``'s parameters and buffers, kept on the scheme under ``slot``
    and reused while nothing that made it changed: ``key`` (what the caller's value depends on besides
    the scheme; tensors in it are compared by value, and copied, so a caller writing into them later
    cannot make a stale value match; runs of positions by their start and length, without a read) and
    every parameter and buffer (storage and in-place version, which an optimizer step or a loaded state
    moves). Only without autograd: with it, ``make()`` runs every time and keeps its graph. Never for
    inference tensors, which keep no version. The storages are held with the value, so no later tensor
    can take one of their addresses."""
    if torch.is_grad_enabled():
        return make()
    key = tuple(_run_or_tensor(k) for k in key)
    tensors = _state(scheme)
    if any(t.is_inference() for t in [*tensors, *key] if isinstance(t, Tensor)):
        return make()
    versions = tuple((t.data_ptr(), t._version) for t in tensors)
    held = scheme.__dict__.get(slot)
    if held is None or held[1] != versions or not _same_key(held[0], key):
        key = tuple(k.detach().clone() if isinstance(k, Tensor) else k for k in key)
        held = (key, versions, make(), tensors)  # (the tensors themselves: no operator, the same storages)
        scheme.__dict__[slot] = held
    return held[2]


def _run_or_tensor(k: Any) -> Any:
    """A key entry of :func:`kept`: a run of positions as what makes it (comparing two tensors by value
    reads them, and on a GPU waits for it), anything else as it is."""
    start = run_start(k) if isinstance(k, Tensor) else None
    return k if start is None else ("run", start, k.shape[0], k.device)


def _state(module: nn.Module) -> list[Tensor]:
    """Every parameter and buffer of ``module`` and its children (a shared one may come twice): what
    ``[*parameters(), *buffers()]`` gives, without their generators' bookkeeping (a third of
    :func:`kept`'s time in a decoding step)."""
    found: list[Tensor] = []
    stack = [module]
    while stack:
        m = stack.pop()
        found += [t for t in m._parameters.values() if t is not None]
        found += [t for t in m._buffers.values() if t is not None]
        stack += [c for c in m._modules.values() if c is not None]
    return found


def _same_key(a: tuple, b: tuple) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, Tensor) or isinstance(y, Tensor):
            if not (isinstance(x, Tensor) and isinstance(y, Tensor) and x.dtype == y.dtype and x.shape == y.shape
                    and x.device == y.device and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


def as_positions(pos: Tensor | None, length: int, device: torch.device, *, start: int = 0) -> Tensor:
    """Positions as a 1-D int64 tensor; ``arange(start, start+length)`` when ``pos`` is None (a
    :func:`~posbias.positions.run`, its start known without a read)."""
    if pos is None:
        return run(start, length, device)
    pos = torch.as_tensor(pos, device=device)
    if pos.dim() != 1 or pos.numel() != length:
        raise ValueError(f"positions must be a 1-D tensor of length {length}, got shape {tuple(pos.shape)}")
    if pos.dtype.is_floating_point or pos.dtype.is_complex or pos.dtype == torch.bool:
        # a bool tensor would pass as positions 0 and 1 (a key mask handed as positions, say)
        raise ValueError(f"positions must be integers, got dtype {pos.dtype}"
                         + (" (a mask of keys goes in key_mask)" if pos.dtype == torch.bool else ""))
    return pos.long()


class Scheme(nn.Module):
    """Base class of every positional scheme. Subclasses are final; hyper-parameters are keyword-only.

    Class attributes describe the scheme for the registry, the CLI, the plots and the kernels.
    """

    name: ClassVar[str]
    family: ClassVar[str]
    summary: ClassVar[str]  # one line for `posbias list`
    paper: ClassVar[str]  # citation for the README table
    toeplitz: ClassVar[bool] = False  # bias depends on i − j only
    learnable: ClassVar[bool] = False
    unscaled: ClassVar[bool] = False  # T5: logits are not divided by √head_dim
    in_study: ClassVar[bool] = True  # run by `posbias extrapolate` unless --schemes says otherwise

    def __init__(self, *, n_heads: int, head_dim: int) -> None:
        super().__init__()
        self.n_heads = check_int("n_heads", n_heads, minimum=1)
        self.head_dim = check_int("head_dim", head_dim, minimum=1)

    # -- scale --------------------------------------------------------------------------------
    def default_scale(self) -> float:
        """Multiplier of ``q·k``: 1 for T5 (Raffel et al. 2020: unscaled), ``1/√head_dim`` otherwise."""
        return 1.0 if self.unscaled else 1.0 / math.sqrt(self.head_dim)

    # -- additive -----------------------------------------------------------------------------
    def bias(self, q_pos: Tensor, k_pos: Tensor) -> Tensor | None:
        """``[heads, len(q_pos), len(k_pos)]`` float32 bias, or None for non-additive schemes."""
        return None

    def bias_into(self, q_pos: Tensor, k_pos: Tensor, out: Tensor, scratch: Tensor) -> Tensor:
        """Write :meth:`bias` into ``out`` (contiguous float32 ``[heads, len(q_pos), len(k_pos)]``) and
        return it, with ``scratch`` (same shape) free to use; no gradient. Kernels that run block after
        block reuse two buffers this way: on CPU a fresh tensor of tens of MB is new pages from the OS
        (glibc maps large blocks afresh), and faulting them in costs more than writing them. Override
        when the bias can be written in place. A scheme without a bias writes zeros."""
        with torch.no_grad():
            bias = self.bias(q_pos, k_pos)
            return out.zero_() if bias is None else out.copy_(bias)

    def bias_grad(self, q_pos: Tensor, k_pos: Tensor, grad: Tensor) -> list[Tensor | None]:
        """The vector-Jacobian product of :meth:`bias`: ``∂⟨grad, bias(q_pos, k_pos)⟩ / ∂θ`` for every
        parameter θ in ``self.parameters()`` order (None where θ is frozen or unused). Kernels that
        produce the bias's gradient ``grad`` block by block call this instead of keeping an autograd
        graph per block, and may overwrite ``grad`` (their scratch). By default autograd through
        :meth:`bias`; override when cheaper."""
        with torch.enable_grad():
            return self._parameter_vjp([(self.bias(q_pos, k_pos), grad)])

    def block_grads(self) -> "BlockGrads":
        """An accumulator for :meth:`bias_grad` over the query blocks of one call: ``add`` each block's
        gradient, then ``result()``. By default one :meth:`bias_grad` per block, summed; a scheme whose
        per-block reduction is cheaper than a vector-Jacobian product per block overrides this (FIRE)."""
        return BlockGrads(self)

    def _parameter_vjp(self, pairs: list[tuple[Tensor, Tensor]]) -> list[Tensor | None]:
        """``Σ ⟨g, t⟩``'s gradient for every parameter (``self.parameters()`` order, None where frozen
        or unused), over the ``(t, g)`` pairs whose ``t`` depends on a parameter that trains."""
        params = list(self.parameters())
        outs = [(t, g) for t, g in pairs if t.requires_grad]
        want = [p for p in params if p.requires_grad]
        if not outs or not want:
            return [None] * len(params)
        got = iter(torch.autograd.grad([t for t, _ in outs], want, [g for _, g in outs], allow_unused=True))
        return [next(got) if p.requires_grad else None for p in params]

    def toeplitz_rows(self, q_pos: Tensor) -> tuple[int, "ToeplitzScheme | None"]:
        """For ascending consecutive query positions: how many leading queries have a bias that depends
        on ``i − j`` alone, and a :class:`ToeplitzScheme` giving it there — which the Toeplitz kernels
        then run. ``(0, None)`` by default; FIRE overrides it (Toeplitz below its threshold)."""
        return 0, None

    # -- rotary -------------------------------------------------------------------------------
    def rotate(self, x: Tensor, pos: Tensor, *, context_len: int | None = None) -> Tensor:
        """Rotate ``x [..., seq, head_dim]`` by positions ``pos``; identity for other families."""
        return x

    # -- absolute -----------------------------------------------------------------------------
    def embed(self, pos: Tensor, dim: int) -> Tensor | None:
        """``[len(pos), dim]`` vectors added to token embeddings, or None."""
        return None

    @classmethod
    def study_defaults(cls, train_len: int, options: dict) -> dict:
        """Options the length study uses for this scheme at training length ``train_len`` unless the
        user sets them (``options`` are the user's). Default: the class defaults, nothing added."""
        return {}

    # -- what a user sees ---------------------------------------------------------------------
    def bias_by_distance(self, distances: Tensor, *, query_pos: int | None = None) -> Tensor | None:
        """``[heads, len(distances)]`` float32 bias at offsets ``i − j = distances`` for one query at
        ``query_pos`` (default: the largest distance, so keys run down to position 0, or 0 where every
        distance is negative); None for a scheme without a bias. Toeplitz schemes ignore ``query_pos``."""
        if self.family != "additive":
            return None
        with torch.no_grad():
            i = max(0, int(distances.max())) if query_pos is None else int(query_pos)
            return self.bias(torch.tensor([i]), i - distances)[:, 0, :].float()

    def describe(self, query_pos: int | None = None) -> list[str]:
        """Lines ``posbias show`` prints after the header: by default the bias by distance per head, for a
        bias that reads the query's position too at ``query_pos`` (default: the largest distance shown;
        distances past it would put keys before position 0 and are left out)."""
        if self.family != "additive":
            return [f"family {self.family!r}: no attention bias to tabulate"]
        _check_query_pos(query_pos)
        dist = [d for d in (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if query_pos is None or d <= query_pos]
        b = self.bias_by_distance(torch.tensor(dist), query_pos=query_pos)
        at = "" if query_pos is None or self.toeplitz else f", query at position {query_pos}"
        lines = [f"bias by distance i-j (rows: heads{at})"
                 + (" — learnable, values at initialisation" if self.learnable else ""),
                 "head " + "".join(f"{d:>9}" for d in dist)]
        return lines + [f"{h:>4} " + "".join(f"{x + 0.0:>9.3f}" for x in b[h].tolist()) for h in range(b.shape[0])]

    @property
    def two_sided(self) -> bool:
        """True for a bias over keys on both sides of the query, an encoder's (a bidirectional T5 or offset
        table, a symmetric ALiBi): its pictures show the whole matrix, not the causal half."""
        return bool(getattr(self, "bidirectional", False) or getattr(self, "symmetric", False))

    def at_offsets(self, offsets: list[int], query_pos: int | None = None) -> list[str]:
        """Lines ``posbias show --offsets`` prints: the bias each head adds at these offsets ``i − j`` (for a
        bias that reads the query's position, one query at ``query_pos``, default the largest offset)."""
        if self.family != "additive":
            raise ValueError(f"offsets need a scheme with an attention bias; {self.name!r} is {self.family!r}")
        _check_query_pos(query_pos, offsets)
        at = max(0, *offsets) if query_pos is None else query_pos  # bias_by_distance's default, said below
        b = self.bias_by_distance(torch.tensor(offsets), query_pos=at)
        heads = b.shape[0]
        where = "" if self.toeplitz else f", for one query at position {at}"
        cells = [[f"{b[h, n].item() + 0.0:.3f}" for h in range(heads)] for n in range(len(offsets))]
        wide = max(10, 2 + max(len(c) for row in cells for c in row))  # columns apart at any magnitude
        first = max(8, 2 + max(len(str(d)) for d in offsets))
        lines = [f"bias at the offsets asked for{where} (rows: offsets i-j; columns: heads)",
                 f"{'offset':>{first}}" + self._offset_header() + "".join(f"{'head ' + str(h):>{wide}}" for h in range(heads))]
        for d, row in zip(offsets, cells):
            lines.append(f"{d:>{first}}" + self._offset_cell(d) + "".join(f"{c:>{wide}}" for c in row))
        if any(d < 0 for d in offsets) and not self.two_sided:
            lines.append("offsets < 0: keys after the query (j > i), hidden in causal attention")
        return lines + self._offset_notes(offsets)

    def _offset_header(self) -> str:
        """Extra columns of :meth:`at_offsets` before the heads (T5: the bucket)."""
        return ""

    def _offset_cell(self, offset: int) -> str:
        return ""

    def _offset_notes(self, offsets: list[int]) -> list[str]:
        return []

    def illustrate_(self) -> str:
        """Prepare the scheme for a picture and say what the picture shows: ``"fixed"``, or
        ``"at initialisation"`` for learnable schemes. Table schemes, whose tables start at 0,
        override this to fill an illustrative table."""
        return "at initialisation" if self.learnable else "fixed"

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, head_dim={self.head_dim}"


class BlockGrads:
    """:meth:`Scheme.bias_grad` summed over blocks: ``add(q_pos, k_pos, grad)`` per block (``grad`` may
    be overwritten), ``result()`` the summed gradients in ``scheme.parameters()`` order (None where a
    parameter is frozen or unused)."""

    def __init__(self, scheme: Scheme) -> None:
        self.scheme = scheme
        self.grads: list[Tensor | None] = [None] * len(list(scheme.parameters()))

    def bias_into(self, q_pos: Tensor, k_pos: Tensor, out: Tensor, scratch: Tensor) -> Tensor:
        """:meth:`Scheme.bias_into`, for a block whose gradient comes next: an accumulator may keep
        what it computed on the way."""
        return self.scheme.bias_into(q_pos, k_pos, out, scratch)

    def add(self, q_pos: Tensor, k_pos: Tensor, grad: Tensor) -> None:
        self.grads = _add_grads(self.grads, self.scheme.bias_grad(q_pos, k_pos, grad))

    def result(self) -> list[Tensor | None]:
        return self.grads


class ToeplitzBlockGrads(BlockGrads):
    """A Toeplitz bias's gradient over blocks: each block of consecutive positions reduced to one sum per
    offset (:func:`~posbias.diagonals.diagonal_sums`: the pairs on a diagonal share their offset), and
    one vector-Jacobian product of :meth:`ToeplitzScheme.bias_at` over the offsets of all the blocks in
    :meth:`result` — instead of a scatter of every pair's gradient per block (a T5 table's
    ``index_put`` was 44% of a blocked training step at 2k, measured). Other blocks: the default."""

    def __init__(self, scheme: "ToeplitzScheme") -> None:
        super().__init__(scheme)
        self.tops: list[tuple[int, int]] = []  # per block: its largest offset and how many it has
        self.sums: list[Tensor] = []

    def add(self, q_pos: Tensor, k_pos: Tensor, grad: Tensor) -> None:
        if len(q_pos) < 1 or len(k_pos) < 1 or not (consecutive(q_pos) and consecutive(k_pos)):
            return super().add(q_pos, k_pos, grad)
        # the block's offsets run down by one from its largest (:func:`_diagonal_offsets`), kept as numbers:
        # posbias's own positions are runs, whose first values are known without reading them, so on CUDA
        # neither this nor result() waits for the device (the offsets as a tensor cost two waits a backward)
        self.tops.append((first(q_pos) - first(k_pos) + len(q_pos) - 1, len(q_pos) + len(k_pos) - 1))
        self.sums.append(diagonal_sums(grad))

    def result(self) -> list[Tensor | None]:
        if self.sums:
            lo, hi = min(top - n + 1 for top, n in self.tops), max(top for top, _ in self.tops)
            device = self.sums[0].device
            at = torch.cat([torch.arange(top - lo, top - lo - n, -1, device=device) for top, n in self.tops])
            grad = self.sums[0].new_zeros(self.sums[0].shape[0], hi - lo + 1).index_add_(
                1, at, torch.cat(self.sums, dim=1))
            span = torch.arange(lo, hi + 1, device=device)
            with torch.enable_grad():
                self.grads = _add_grads(self.grads, self.scheme._parameter_vjp([(self.scheme.bias_at(span), grad)]))
            self.tops, self.sums = [], []
        return self.grads


def _diagonal_offsets(q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """The offsets of a block of consecutive positions in :func:`~posbias.diagonals.diagonal_sums`'
    order: ``c + rows − 1 − u`` for ``u < rows + keys − 1``, with ``c = q_pos[0] − k_pos[0]``."""
    rows, keys = len(q_pos), len(k_pos)
    top = q_pos[0] - k_pos[0] + rows - 1
    return top - torch.arange(rows + keys - 1, device=q_pos.device)


def _add_grads(into: list[Tensor | None], more: list[Tensor | None]) -> list[Tensor | None]:
    """Parameter gradients summed entry by entry (None counts as 0; ``into``'s tensors are added to)."""
    return [a if b is None else b if a is None else a.add_(b) for a, b in zip(into, more)]


def illustrative_table_(table: nn.Parameter) -> str:
    """Fill a learned ``[entries, heads]`` table, in place, with ``u = −log(1 + index) · head factor``
    (head factors 0.5 … 2): a table that starts at 0 draws as nothing. Returns what the picture shows."""
    with torch.no_grad():
        idx = torch.arange(table.shape[0], dtype=torch.float32, device=table.device)[:, None]
        table.copy_(-torch.log1p(idx) * torch.linspace(0.5, 2.0, table.shape[1], device=table.device)[None, :])
    return "illustrative table"


class ToeplitzScheme(Scheme):
    """An additive bias that depends on the offset ``i − j`` only: ``PE(i, j) = g_h(i − j)``.

    Subclasses implement :meth:`bias_at`; :meth:`bias` follows. Fast kernels use two more facts:
    :meth:`bias_at` needs O(length) numbers for a whole ``[N, N]`` bias, and :attr:`flat_beyond`
    (when not None) is an offset ``w ≥ 0`` with ``g(o) = g(w)`` for every ``o ≥ w`` and
    ``g(−o) = g(−w)`` for every ``o ≥ w`` (the bias is constant outside a band of width ``w``).
    """

    family: ClassVar[str] = "additive"
    toeplitz: ClassVar[bool] = True

    def bias_at(self, offset: Tensor) -> Tensor:
        """``[heads, *offset.shape]`` float32 bias for integer offsets ``i − j`` of any shape."""
        raise NotImplementedError

    @property
    def flat_beyond(self) -> int | None:
        return None

    @property
    def linear_slopes(self) -> Tensor | None:
        """``m_h`` when the bias is exactly ``−m_h·(i − j)`` for every offset (causal ALiBi), else None."""
        return None

    def bias(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """:meth:`bias_at` at every pair's offset. A block of consecutive positions evaluates it on its
        ``rows + keys − 1`` offsets alone and lays them out as windows (``unfold``, rows flipped): the
        same values (bit for bit; KERPLE-power's ``pow`` to its last bit, which its vectorised and scalar
        loops round apart) from R + K − 1 evaluations instead of R·K (a T5 table buckets each offset
        once), and a backward that sums each window's gradient along the diagonals (``unfold``'s own)
        where indexing per pair scattered R·K gradients into a table of a few dozen entries: the likely
        cause (inferred, not profiled) of the dense paths' T5 and offset training at about 3,500×
        unbiased SDPA at 8k on an H200, against 270–520× for ALiBi, KERPLE and FIRE
        (benchmarks/results-cuda-2026-12-04-h200.md). On the CPU the dense blockwise path trains T5 in
        0.76× and offset in 0.88× of the per-pair time at 2k (``benchmarks/bench_dense_blocks.py``)."""
        rows, keys = len(q_pos), len(k_pos)
        if rows < 2 or keys < 2 or not (consecutive(q_pos) and consecutive(k_pos)):
            return self.bias_at(q_pos[:, None] - k_pos[None, :])
        # window r' of the offsets in diagonal order is block row rows − 1 − r'
        return self.bias_at(_diagonal_offsets(q_pos, k_pos)).unfold(-1, keys, 1).flip(-2)

    def bias_into(self, q_pos: Tensor, k_pos: Tensor, out: Tensor, scratch: Tensor) -> Tensor:
        """A block of consecutive positions from its ``rows + keys − 1`` offsets: :meth:`bias_at` on them
        (a T5 table's bucketing per offset, not per pair), then the rows of a zero-copy view copied out
        (the view ``z[r' + t]`` is the block with its rows reversed; ``index_select`` writes them back in
        order). Other positions: the default. ``scratch`` is never used (it may be empty)."""
        rows, keys = len(q_pos), len(k_pos)
        if rows < 2 or keys < 2 or not (consecutive(q_pos) and consecutive(k_pos)):
            return super().bias_into(q_pos, k_pos, out, scratch)
        with torch.no_grad():
            z = self.bias_at(_diagonal_offsets(q_pos, k_pos)).float().contiguous()  # [H, rows + keys − 1]
            view = z.as_strided((z.shape[0], rows, keys), (z.stride(0), 1, 1))  # row r' is block row rows−1−r'
            return torch.index_select(view, 1, torch.arange(rows - 1, -1, -1, device=z.device), out=out)

    def block_grads(self) -> "BlockGrads":
        return ToeplitzBlockGrads(self)

    def bias_by_distance(self, distances: Tensor, *, query_pos: int | None = None) -> Tensor:
        with torch.no_grad():
            return self.bias_at(distances).float()

    def score_mod(self, q_len: int, k_len: int, *, q_start: int | None = None, k_start: int = 0):
        """A FlexAttention ``score_mod`` reading a ``[heads, q_len + k_len − 1]`` per-offset table
        (O(N) memory); see :mod:`posbias.schemes.score_mod`. Queries default to the end of the keys."""
        from .score_mod import score_mod

        return score_mod(self, q_len, k_len, q_start=q_start, k_start=k_start)
