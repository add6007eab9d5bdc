"""FIRE (Li et al. 2023, arXiv 2310.04418): functional interpolation of the bias.

``PE(i, j) = f_θ( ψ(|i − j|) / ψ(max(L, i)) )`` with ``ψ(x) = log(c·x + 1)``, ``c`` learnable (init
0.1), the threshold ``L`` learnable through a multiplier of its initial value (init 512), and
``f_θ`` an MLP ``1 → 32 → ReLU → heads``. Normalising by the query position ("progressive
interpolation") keeps the MLP's input in [0, 1] for every causal pair (j ≤ i) at any length.
FIRE depends on ``i`` as well as on ``i − j``: it is **not** Toeplitz — except below its threshold: a
query at ``i < L`` normalises by ``ψ(L)`` whatever ``i`` is, so there the bias is ``f(ψ(|i − j|)/ψ(L))``,
a function of the offset. ``posbias.attention`` runs those queries on the Toeplitz path
(:meth:`FIRE.toeplitz_rows`, :class:`FireBelowThreshold`: one MLP evaluation per offset instead of per
pair), the others blockwise; the same values bit for bit, and the same gradients to float rounding.

As in the reference code, ``|c|`` and ``|L|`` are used so the logs stay defined, and a tiny eps keeps
the denominator away from 0 at ``i = 0``.

Measured in the study (docs/study.md, "The longer CPU protocol"): past the learned threshold a query meets
another bias at the distances it was trained on (``posbias diagnose`` reports this "bias drift"), and a
model trained below its threshold breaks from there on — thresholds learned at 126 / 153 / 523 / 1809
tokens (training at 128) gave ppl@2048 5.41 / 7.38 / 3.77 / 3.27. The default stays the reference's 512;
``init_L`` sets it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..diagonals import diagonal_sums
from ..positions import first, run_start
from .base import BlockGrads, Scheme, ToeplitzScheme, _add_grads, check_int, check_positive, kept


class FIRE(Scheme):
    name = "fire"
    family = "additive"
    summary = "MLP of log-distance normalised by log of the query position (progressive interpolation)"
    paper = "Li et al. 2023, Functional Interpolation for Relative Positions Improves Long Context Transformers"
    learnable = True

    def __init__(
        self,
        *,
        n_heads: int,
        head_dim: int,
        mlp_width: int = 32,
        init_c: float = 0.1,
        init_L: float = 512.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__(n_heads=n_heads, head_dim=head_dim)
        check_int("mlp_width", mlp_width, minimum=1)
        self.mlp = nn.Sequential(nn.Linear(1, mlp_width), nn.ReLU(), nn.Linear(mlp_width, n_heads))
        self.c = nn.Parameter(torch.tensor(check_positive("init_c", init_c)))
        self.register_buffer("init_L", torch.tensor(check_positive("init_L", init_L)))
        self.L_multiplier = nn.Parameter(torch.tensor(1.0))
        self.eps = check_positive("eps", eps)

    def normalized_distance(self, q_pos: Tensor, k_pos: Tensor, out: Tensor | None = None) -> Tensor:
        """The MLP's input ``ψ(|i − j|) / ψ(max(L, i))``, ``[len(q_pos), len(k_pos)]`` float32; written
        into ``out`` (no gradient) when given: a reused buffer spares a fresh tensor's page faults
        (1.7 → 0.3 ms for 256 × 8192 pairs, measured)."""
        c = self.c.abs().float()
        den = self.denominator(q_pos)
        if out is None:
            return _log_distance(q_pos, k_pos, c) / den[:, None]
        with torch.no_grad():
            return _log_distance(q_pos, k_pos, c.detach(), out).div_(den.detach()[:, None])

    def denominator(self, q_pos: Tensor) -> Tensor:
        """``ψ(max(L, i)) + eps`` per query, float32, computed in float64 from the integer positions
        (exact normalisation at any position)."""
        qf = q_pos.to(torch.float64)
        return self._psi64(torch.maximum(qf, self.threshold().double()))

    def threshold(self) -> Tensor:
        """The learned threshold ``L = |multiplier · init_L|`` (a 0-d tensor, with its gradient)."""
        return (self.L_multiplier * self.init_L).abs()

    def _psi64(self, at: Tensor) -> Tensor:
        """``ψ(at) + eps`` computed in float64, returned in float32."""
        return (torch.log1p(self.c.abs().double() * at) + self.eps).float()

    def toeplitz_rows(self, q_pos: Tensor) -> tuple[int, ToeplitzScheme | None]:
        """Below its threshold FIRE is Toeplitz: a query at ``i < L`` normalises by ``ψ(L)`` whatever
        ``i`` is, so its bias ``f(ψ(|i − j|)/ψ(L))`` depends on ``i − j`` alone. For ascending consecutive
        ``q_pos``: how many leading queries have ``i < L``, and a Toeplitz view of this scheme
        (:class:`FireBelowThreshold`, its parameters, no copy) that gives their bias from one value per
        offset — the operations of :meth:`bias` on the same numbers, so the same values bit for bit,
        and the same gradients. A query at ``i = L`` exactly is left to the general path (there
        ``max(L, i)`` splits its gradient between the two)."""
        if len(q_pos) == 0:
            return 0, None
        # (kept while the parameters are unchanged: a decoding step's layers read L once, not once each)
        t = kept(self, "_kept_threshold", (), lambda: float(self.threshold().detach()))
        if not math.isfinite(t):  # a diverged threshold: the general path (and its NaN) as before
            return 0, None
        rows = min(len(q_pos), max(0, math.ceil(t) - first(q_pos)))  # the integers i < t from q_pos[0] on
        view = self.__dict__.get("_below_threshold")
        if view is None:  # kept outside the module tree (the view holds this module, not the reverse)
            view = self.__dict__["_below_threshold"] = FireBelowThreshold(self)
        return rows, view

    def score_mod(self, q_len: int, k_len: int, *, q_start: int | None = None, k_start: int = 0):
        """A FlexAttention ``score_mod`` computing FIRE for each (query, key) pair inside the kernel:
        the MLP unrolled into ``width`` multiply-adds on ``x = log(c·|i − j| + 1) / ψ(max(L, i))``,
        ``i − j`` in integers and the per-query denominator read from a ``[q_len]`` table computed in
        float64 (:meth:`denominator`). Queries default to the end of the keys. The captured weights
        keep their autograd graph, so FlexAttention's backward (CUDA) reaches the MLP, ``c`` and ``L``."""
        check_int("q_len", q_len, minimum=1)
        check_int("k_len", k_len, minimum=1)
        q_start = k_len - q_len if q_start is None else int(q_start)
        device = self.c.device
        den = self.denominator(torch.arange(q_start, q_start + q_len, device=device))
        shift = torch.tensor(q_start - int(k_start), device=device)  # data, not a constant to compile in
        first, last = self.mlp[0], self.mlp[2]
        width, heads = first.weight.shape[0], last.weight.shape[0]
        # Every captured tensor that needs gradients is a [heads] tensor of its own (a clone, not a view),
        # read once, with the head index. FlexAttention's CUDA backward (torch 2.11) refuses a tensor
        # indexed more than once ("multiple indexing operations on the same tensor": w1[u] for every u
        # was that) and fails to lower the gradient of a 0-d one (both found on the first GPU run, an
        # H200), and CPU inductor failed to lower the forward on views of one weight. So c and each
        # hidden unit's input weight and bias are spread over the heads; the output weights are [heads]
        # already (torch 2.6 and 2.8 cannot trace w2[h, u], a tensor index beside an integer).
        def per_head(t: Tensor) -> Tensor:
            return t.float().expand(heads).clone()

        c = per_head(self.c.abs())
        w1 = [per_head(first.weight[u, 0]) for u in range(width)]
        b1 = [per_head(first.bias[u]) for u in range(width)]
        w2 = [last.weight[:, u].float().clone() for u in range(width)]
        b2 = last.bias.float().clone()

        def mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            x = torch.log1p(c[h] * (q_idx - kv_idx + shift).abs()) / den[q_idx]
            acc = b2[h]
            for u in range(width):
                acc = acc + w2[u][h] * torch.relu(w1[u][h] * x + b1[u][h])
            return score + acc

        return mod

    def bias(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """``[heads, len(q_pos), len(k_pos)]``, evaluated piecewise (:meth:`pieces`): the same function
        as :meth:`mlp_bias` (to float rounding, gradients included) at a fraction of the cost."""
        return self.piecewise(self.normalized_distance(q_pos, k_pos))

    def piecewise(self, x: Tensor) -> Tensor:
        """The MLP at inputs ``x`` of any shape through its :meth:`pieces`, ``[heads, *x.shape]``."""
        kinks, slope, offset = self.pieces()
        seg = torch.bucketize(x.detach(), kinks)  # the linear piece each input falls on, shared by all heads
        return (F.embedding(seg, slope) * x.unsqueeze(-1) + F.embedding(seg, offset)).movedim(-1, 0)

    def bias_into(self, q_pos: Tensor, k_pos: Tensor, out: Tensor, scratch: Tensor) -> Tensor:
        """:meth:`bias` written straight into ``out``'s ``[heads, q, k]`` layout, by columns: where every
        pair of a key column lies on one linear piece (on a block of consecutive positions, most
        columns: ``x`` grows with the query and falls with the key, so a column's ``x`` spans a narrow
        range) the bias is one multiply-add with that column's (slope, offset), all columns and heads
        in one broadcast pass; a column whose ``x`` crosses kinks ``t_k`` starts from its lowest piece
        and adds ``Δslope_k · relu(x − t_k)`` for each kink crossed (the MLP is continuous, so this is
        the next piece). Positions without that structure (columns crossing many kinks) take one
        packed gather per pair (:meth:`_gather_into`). The values of :meth:`bias` to float rounding,
        tested. FIRE at 8k, the last block (8 × 256 × 8192 pairs): 25–43 → 6.6 ms, measured (forward
        2.29× → 1.65× SDPA)."""
        self._write_bias(q_pos, k_pos, out, scratch)
        return out

    def _write_bias(self, q_pos: Tensor, k_pos: Tensor, out: Tensor, scratch: Tensor,
                    x_out: Tensor | None = None) -> tuple[Tensor, Tensor, list[tuple[int, int, int]] | None]:
        """:meth:`bias_into`'s work; returns the block's structure ``(x, lo, runs)`` (:func:`_column_pieces`;
        ``runs`` None where the pairs were gathered). ``x`` lands in ``x_out`` when given (then all of
        ``scratch`` is free), else in the scratch's first pairs, valid until the scratch's next use."""
        with torch.no_grad():
            rows, keys = len(q_pos), len(k_pos)
            pairs = rows * keys
            if pairs == 0:
                return out.new_empty(rows, keys), torch.zeros(keys, dtype=torch.long, device=out.device), []
            x_in_scratch = x_out is None and out.shape[0] > 1
            if x_in_scratch:  # x in the scratch's first pairs, the rest is room for relu(x − t_k)
                free, x_out = scratch.reshape(-1)[pairs:], scratch.reshape(-1)[:pairs]
            else:  # x apart (given, or fresh for one head, whose scratch holds one slab)
                free = scratch.reshape(-1)
                x_out = torch.empty(pairs, device=out.device) if x_out is None else x_out
            x = self.normalized_distance(q_pos, k_pos, out=x_out[:pairs].view(rows, keys))
            kinks, slope, offset = (t.detach() for t in self.pieces())
            lo, runs = _column_pieces(x, kinks)
            if runs is None:  # the gather needs the whole scratch
                _gather_into(x.clone() if x_in_scratch else x, kinks, slope, offset, out, scratch)
                return x, lo, runs
            torch.addcmul(offset.T.index_select(1, lo).unsqueeze(1), slope.T.index_select(1, lo).unsqueeze(1), x,
                          out=out)
            if runs:
                jump = (slope[1:] - slope[:-1])[:, :, None, None]  # [kinks, heads, 1, 1]: the slope gained at each kink
            for k, a, b in runs:
                xs = x[:, a:b]
                above = torch.sub(xs, kinks[k], out=free[:xs.numel()].view(xs.shape)).clamp_(min=0)
                out[:, :, a:b].addcmul_(jump[k], above)
            return x, lo, runs

    def bias_grad(self, q_pos: Tensor, k_pos: Tensor, grad: Tensor) -> list[Tensor | None]:
        """:meth:`bias`'s vector-Jacobian product through its pieces: with ``m`` the piece of each
        pair, ``∂/∂offset[m, h] = Σ grad_h``, ``∂/∂slope[m, h] = Σ grad_h · x`` (sums over the pairs
        on piece ``m``) and ``∂/∂x = Σ_h grad_h · slope[m, h]``; autograd takes these on to the MLP's
        weights, ``c`` and ``L`` (the same gradients as autograd through :meth:`bias`, tested).
        By columns as in :meth:`bias_into`: every pair is first counted on its column's lowest piece
        (column sums, one index-add), then the pairs above each kink ``t_k`` that their column
        crosses move from piece ``k`` to ``k + 1``. ``grad`` is overwritten (by ``grad · x``)."""
        with torch.enable_grad():
            x = self.normalized_distance(q_pos, k_pos)
            kinks, slope, offset = self.pieces()
        with torch.no_grad():
            xv, kinks = x.detach(), kinks.detach()
            lo, runs = _column_pieces(xv, kinks) if xv.numel() else (None, None)
            if runs is None:
                d_x, d_slope, d_offset = _grad_by_pair(xv, kinks, slope.detach(), grad)
            else:
                d_x, d_slope, d_offset = _grad_by_column(xv, kinks, slope.detach(), grad, lo, runs)
        return self._parameter_vjp([(x, d_x), (slope, d_slope.T), (offset, d_offset.T)])

    def block_grads(self) -> "BlockGrads":
        """:meth:`bias_grad` summed over the blocks of one call, with one autograd pass at the end
        (:class:`_FireBlockGrads`) instead of one per block."""
        return _FireBlockGrads(self)

    def mlp_bias(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """The definition: the MLP ``1 → width → ReLU → heads`` applied to every pair (the reference
        :meth:`bias` is tested against)."""
        x = self.normalized_distance(q_pos, k_pos).unsqueeze(-1)
        first, last = self.mlp[0], self.mlp[2]
        # biases are computed in float32 whatever dtype the module was cast to
        h = torch.relu(F.linear(x, first.weight.float(), first.bias.float()))
        return F.linear(h, last.weight.float(), last.bias.float()).permute(2, 0, 1)

    def pieces(self) -> tuple[Tensor, Tensor, Tensor]:
        """The MLP as a piecewise-linear function of its scalar input: ``f_h(x) = slope[m, h]·x +
        offset[m, h]`` on piece ``m``, the pieces separated by the sorted ``kinks`` (``x = −b1_k/w1_k``
        for every hidden unit with ``w1_k ≠ 0``; at most ``width`` kinks, so ``width + 1`` pieces).
        A unit is active on a piece when ``w1_k·x + b1_k > 0`` at an interior point; then it adds
        ``w2_hk·w1_k`` to the slope and ``w2_hk·b1_k`` to the offset. Differentiable in every MLP weight.
        Without autograd they are kept while no parameter changes (:func:`~posbias.schemes.base.kept`):
        0.2 ms of a decoding step's 0.5 ms at 1k keys, measured; the blocks of one call and the steps
        of a decoding loop share them."""
        return kept(self, "_kept_pieces", (), self._pieces)

    def _pieces(self) -> tuple[Tensor, Tensor, Tensor]:
        first, last = self.mlp[0], self.mlp[2]
        w1, b1 = first.weight[:, 0].float(), first.bias.float()
        w2, b2 = last.weight.float(), last.bias.float()
        moving = w1 != 0
        kinks = torch.sort((-b1[moving] / w1[moving]).detach()).values
        if kinks.numel():  # one interior point per piece (beyond the ends: one unit outside)
            inner = torch.cat([kinks[:1] - 1, (kinks[:-1] + kinks[1:]) / 2, kinks[-1:] + 1])
        else:
            inner = torch.zeros(1, device=w1.device)
        active = ((w1.detach() * inner[:, None] + b1.detach()) > 0).float()  # [pieces, width]
        slope = (active * w1) @ w2.T  # [pieces, heads]
        offset = (active * b1) @ w2.T + b2
        return kinks, slope, offset


class FireBelowThreshold(ToeplitzScheme):
    """FIRE at the queries below its threshold, where its bias is Toeplitz: ``g_h(o) = f_h(ψ(|o|) / ψ(L))``
    (:meth:`FIRE.toeplitz_rows`). A view of one :class:`FIRE` — its parameters, nothing of its own — that
    the Toeplitz kernels run like any offset bias: one value per offset instead of one per pair, and
    the parameters' gradients from per-offset sums. Not a scheme to build (not in the registry)."""

    name = "fire"
    summary = "FIRE below its threshold (a view)"
    paper = FIRE.paper
    learnable = True
    in_study = False

    def __init__(self, fire: FIRE) -> None:
        super().__init__(n_heads=fire.n_heads, head_dim=fire.head_dim)
        self.fire = fire

    def bias_at(self, offset: Tensor) -> Tensor:
        fire = self.fire
        return fire.piecewise(_psi(fire.c.abs().float(), offset) / fire._psi64(fire.threshold().double()))


def _log_distance(q_pos: Tensor, k_pos: Tensor, c: Tensor, out: Tensor | None = None) -> Tensor:
    """``log(c·|i − j| + 1)`` for every pair, ``[len(q_pos), len(k_pos)]`` float32, ``i − j`` taken in
    integers. When both position lists are runs of step ±1 (the blocks of a sequence, keys in either
    order) every pair's offset is one of ``len(q) + len(k) − 1`` values: the log is taken once per
    offset and the pairs read it through a sliding-window view (one copy instead of five passes and a
    log per pair; 1.96 → 0.05 ms for 64 × 4160 pairs, measured)."""
    q_step, k_step = (None, None) if len(q_pos) == 1 else (_unit_step(q_pos), _unit_step(k_pos))
    if q_step is None or k_step is None:  # (one query, as in decoding: one log per pair is as cheap)
        direct = _psi(c, q_pos[:, None] - k_pos[None, :])
        return direct if out is None else out.copy_(direct)
    rows, keys = len(q_pos), len(k_pos)
    # pair (r, j) has offset d0 + q_step·r − k_step·j. Table entry t holds offset start − k_step·t, so
    # that j moves one entry forward and r moves ρ = −k_step·q_step entries; ``start`` puts the
    # smallest entry any pair reads at t = 0.
    rho = -k_step * q_step
    start = first(q_pos) - first(k_pos) + (q_step * (rows - 1) if rho < 0 else 0)
    offsets = start - k_step * torch.arange(rows + keys - 1, device=q_pos.device)
    table = _psi(c, offsets)
    windows = table.unfold(0, keys, 1)  # windows[w, j] = table[w + j]; row r reads window ρ·(r − r_first)
    # copied row by row into a row-major tensor (``flip``, or arithmetic on the overlapping view itself,
    # would lay the result out column-major)
    order = torch.arange(rows, device=q_pos.device)
    return torch.index_select(windows, 0, order if rho > 0 else order.flip(0), out=out)


def _psi(c: Tensor, offsets: Tensor) -> Tensor:
    """``ψ(|o|) = log(c·|o| + 1)`` in float32 for integer offsets ``o`` (taken in integers first)."""
    return torch.log1p(c * offsets.abs().to(torch.float32))


def _unit_step(pos: Tensor) -> int | None:
    """+1 or −1 when ``pos`` is a run of consecutive integers in that direction, else None."""
    if pos.is_floating_point() or len(pos) == 0:
        return None
    if len(pos) == 1 or run_start(pos) is not None:
        return 1
    step = int(pos[1]) - int(pos[0])
    if step not in (1, -1) or int(pos[-1]) - int(pos[0]) != step * (len(pos) - 1):
        return None
    return step if bool((pos[1:] - pos[:-1] == step).all()) else None


def _sum_by_piece(values: Tensor, seg: Tensor, pieces: int, lanes: int = 16) -> Tensor:
    """``[heads, pieces]``: ``values [heads, rows·keys]`` summed over the pairs of each piece (``seg
    [rows, keys]``). Along a row the piece changes rarely, so a plain scatter-add would add into one
    address over and over, each add waiting for the last (4.7× slower, measured); spreading
    neighbouring keys over ``lanes`` copies of each bin breaks that chain."""
    lane = torch.arange(seg.shape[-1], device=seg.device).remainder_(lanes)
    index = (seg * lanes + lane).flatten().expand(values.shape[0], -1)
    bins = values.new_zeros(values.shape[0], pieces * lanes).scatter_add_(1, index, values)
    return bins.view(values.shape[0], pieces, lanes).sum(-1)


# A block whose columns cross more kinks than this, on average per column, is written by the packed
# gather: measured break-even (H=8, 256 rows) at about 3.3 crossings per column (2k: 6.3 vs 6.3 ms);
# at 0.2-0.9 crossings (8k) columns take 7-12 ms against 26 ms gathered
MAX_CROSSINGS = 3


def _column_pieces(x: Tensor, kinks: Tensor) -> tuple[Tensor, list[tuple[int, int, int]] | None]:
    """For ``x [rows, keys]``: each column's lowest piece ``lo [keys]`` (that of its smallest ``x``), and
    the crossings ``(k, start, end)``: kink ``k`` lies inside the ``x`` range of every column in
    ``start:end`` (on a block of consecutive positions, one run of columns per kink). None when the
    columns cross more than ``MAX_CROSSINGS`` kinks each on average."""
    if x.shape[0] == 1:  # one query (decoding): a column is one pair, it crosses nothing
        return torch.bucketize(x[0], kinks), []
    lo = torch.bucketize(x.amin(0), kinks)  # amin/amax over rows: 0.23 ms for 256 × 4096, aminmax 1.65
    hi = torch.bucketize(x.amax(0), kinks)
    if int((hi - lo).sum()) > MAX_CROSSINGS * x.shape[1]:
        return lo, None
    k = torch.arange(len(kinks), device=x.device)[:, None]
    crossed = ((lo <= k) & (k < hi)).to(torch.int8)  # [kinks, keys]
    zero = crossed.new_zeros(len(kinks), 1)
    edges = torch.diff(crossed, dim=1, prepend=zero, append=zero)  # +1 where a run starts, −1 past its end
    starts, ends = torch.nonzero(edges == 1).tolist(), torch.nonzero(edges == -1).tolist()  # row-major: paired
    return lo, [(kink, a, b) for (kink, a), (_, b) in zip(starts, ends)]


def _gather_into(x: Tensor, kinks: Tensor, slope: Tensor, offset: Tensor, out: Tensor, scratch: Tensor) -> Tensor:
    """Every pair's (offset, slope) gathered by piece as one 8-byte value, half the heads at a time,
    into ``scratch`` (into a fresh buffer where ``scratch`` is not 8-byte aligned or holds less than one
    head's pairs), then one multiply-add. One packed gather instead of two costs 7.9 against 10.0 ms
    for 8 × 256 × 4160 pairs, measured."""
    seg = torch.bucketize(x, kinks)
    heads, pieces = out.shape[0], slope.shape[0]
    packed = torch.stack([offset.T, slope.T], -1).contiguous().view(torch.float64)[..., 0]  # [heads, pieces]
    step = max(1, heads // 2)  # scratch holds half the heads' values at 8 bytes per pair
    room = scratch.is_contiguous() and scratch.storage_offset() % 2 == 0 and heads >= 2
    for h in range(0, heads, step):
        part = out[h:h + step]
        pairs = (scratch.view(-1)[:2 * part.numel()].view(torch.float64).view(part.shape) if room
                 else torch.empty(part.shape, dtype=torch.float64, device=out.device))
        torch.gather(packed[h:h + step, None, :].expand(part.shape[:2] + (pieces,)), 2, seg.expand_as(part), out=pairs)
        values = pairs.view(torch.float32).view(part.shape + (2,))
        torch.addcmul(values[..., 0], values[..., 1], x, out=part)
    return out


def _grad_by_pair(x: Tensor, kinks: Tensor, slope: Tensor, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(∂/∂x [rows, keys], ∂/∂slope [heads, pieces], ∂/∂offset [heads, pieces])`` with every pair's
    piece found by ``bucketize``."""
    heads, pieces = grad.shape[0], slope.shape[0]
    seg = torch.bucketize(x, kinks)
    g = grad.reshape(heads, -1)
    d_offset = _sum_by_piece(g, seg, pieces)
    d_slope = _sum_by_piece(g * x.flatten(), seg, pieces)
    per_pair = torch.gather(slope.T[:, None, :].expand(heads, x.shape[0], pieces), 2, seg.expand_as(grad))
    return per_pair.mul_(grad).sum(0), d_slope, d_offset


def _grad_by_column(x: Tensor, kinks: Tensor, slope: Tensor, grad: Tensor, lo: Tensor,
                    runs: list[tuple[int, int, int]]) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_grad_by_pair`'s values from :func:`_column_pieces`' structure: each column's pairs on
    its lowest piece ``lo``, then for each kink ``k`` a column run crosses, the pairs with ``x > t_k``
    moved from piece ``k`` to ``k + 1`` (for ``∂/∂x``: ``Δslope_k`` added). A run's moved gradients
    are masked once into a fresh ``[heads, pairs]`` slab, then reduced by three matrix-vector
    products (over heads for ``∂/∂x``, over pairs for the moved sums and their ``x``-weighted sums):
    1.8 + 0.8 → 0.9 ms for seven runs of 67–130 columns × 128 rows, measured. Overwrites ``grad``."""
    heads, pieces = grad.shape[0], slope.shape[0]
    low_slope = slope.T.index_select(1, lo)  # [heads, keys]
    d_x = torch.mul(grad[0], low_slope[0])
    for h in range(1, heads):
        d_x.addcmul_(grad[h], low_slope[h])
    jump = slope[1:] - slope[:-1]  # [kinks, heads]
    moved = grad.new_empty(2, len(runs), heads)  # per run: Σ moved gradient, Σ moved gradient · x
    for n, (k, a, b) in enumerate(runs):
        xs = x[:, a:b]
        flat = torch.mul(grad[:, :, a:b], xs > kinks[k]).view(heads, -1)
        d_x[:, a:b] += (jump[k] @ flat).view(xs.shape)
        torch.sum(flat, 1, out=moved[0, n])
        torch.mv(flat, xs.reshape(-1), out=moved[1, n])
    d_offset = grad.new_zeros(heads, pieces).index_add_(1, lo, grad.sum(1))
    d_slope = grad.new_zeros(heads, pieces).index_add_(1, lo, grad.mul_(x).sum(1))
    if runs:
        crossed = torch.tensor([k for k, _, _ in runs], device=grad.device)
        for total, sums in zip((d_offset, d_slope), moved):  # from piece k to piece k + 1
            total.index_add_(1, crossed + 1, sums.T).index_add_(1, crossed, sums.T, alpha=-1)
    return d_x, d_slope, d_offset


class _FireBlockGrads(BlockGrads):
    """FIRE's parameter gradients over the blocks of one call. The bias is ``f(x)`` with ``x[r, j] =
    T[i_r − j] / den[r]``, ``T[o] = log(c·|o| + 1)`` and ``den[r] = ψ(max(L, i_r))``. Each block of
    consecutive queries and keys (both ascending: the blocks of a sequence) reduces its ``dS`` right
    away: to sums by linear piece for ``slope`` and ``offset`` (:func:`_grad_by_column`, as
    :meth:`FIRE.bias_grad`), and its ``∂/∂x`` to ``∂/∂T[o] = Σ_{i−j=o} ∂x/den`` (sums along the
    block's diagonals) and ``∂/∂den[r] = −Σ_j ∂x·x/den``. ``result()`` then takes all of them through
    ``T``, ``den`` and the pieces to ``c``, ``L`` and the MLP in one autograd pass: the same function,
    so the same gradients as autograd through :meth:`FIRE.bias` (to float rounding, tested), without
    a graph and a vector-Jacobian product per block. Other positions take :meth:`FIRE.bias_grad`."""

    def __init__(self, scheme: FIRE) -> None:
        super().__init__(scheme)
        with torch.no_grad():
            self.kinks, self.slope, _ = scheme.pieces()  # fixed for the whole backward pass
        self.d_slope = self.d_offset = None
        self.tables: list[tuple[Tensor, Tensor]] = []  # (offsets, ∂/∂T at them)
        self.rows: list[tuple[Tensor, Tensor]] = []  # (query positions, ∂/∂den at them)
        self.buffer: Tensor | None = None
        self.written: tuple | None = None  # (q_pos, k_pos, x, lo, runs) of the last block written

    def bias_into(self, q_pos: Tensor, k_pos: Tensor, out: Tensor, scratch: Tensor) -> Tensor:
        """:meth:`FIRE.bias_into`, keeping the block's ``x`` and column structure for its :meth:`add`
        (1.9 of 10.6 ms per 128 × 3072 block, measured)."""
        x, lo, runs = self.scheme._write_bias(q_pos, k_pos, out, scratch, x_out=self._x_buffer(out.shape[1:].numel()))
        self.written = (q_pos, k_pos, x, lo, runs)
        return out

    def _x_buffer(self, pairs: int) -> Tensor:
        if self.buffer is None or self.buffer.numel() < pairs:
            self.buffer = torch.empty(pairs, device=self.kinks.device)
        return self.buffer

    def add(self, q_pos: Tensor, k_pos: Tensor, grad: Tensor) -> None:
        if _unit_step(q_pos) != 1 or _unit_step(k_pos) != 1 or grad.numel() == 0:
            return super().add(q_pos, k_pos, grad)
        fire, rows, keys = self.scheme, len(q_pos), len(k_pos)
        with torch.no_grad():
            last, self.written = self.written, None
            if last is not None and all(len(a) == len(b) and torch.equal(a, b) for a, b in zip(last, (q_pos, k_pos))):
                x, lo, runs = last[2:]
            else:
                x_out = self._x_buffer(rows * keys)[:rows * keys].view(rows, keys)
                x = fire.normalized_distance(q_pos, k_pos, out=x_out)
                lo, runs = _column_pieces(x, self.kinks)
            if runs is None:
                d_x, d_slope, d_offset = _grad_by_pair(x, self.kinks, self.slope, grad)
            else:
                d_x, d_slope, d_offset = _grad_by_column(x, self.kinks, self.slope, grad, lo, runs)
            y = d_x.div_(fire.denominator(q_pos)[:, None])  # ∂/∂T of each pair
            self.rows.append((q_pos, torch.linalg.vecdot(y, x).neg_()))
            top = first(q_pos) - first(k_pos) + rows - 1  # the offset of diagonal 0 (row rows − 1, key 0)
            self.tables.append((top - torch.arange(rows + keys - 1, device=q_pos.device), diagonal_sums(y)))
            self.d_slope = d_slope if self.d_slope is None else self.d_slope.add_(d_slope)
            self.d_offset = d_offset if self.d_offset is None else self.d_offset.add_(d_offset)

    def result(self) -> list[Tensor | None]:
        if not self.tables:
            return self.grads
        fire = self.scheme
        with torch.enable_grad():
            offsets = torch.cat([o for o, _ in self.tables])
            table = _psi(fire.c.abs().float(), offsets)
            den = fire.denominator(torch.cat([q for q, _ in self.rows]))
            _, slope, offset = fire.pieces()
        grads = fire._parameter_vjp([(table, torch.cat([g for _, g in self.tables])),
                                     (den, torch.cat([g for _, g in self.rows])),
                                     (slope, self.d_slope.T), (offset, self.d_offset.T)])
        return _add_grads(grads, self.grads)

