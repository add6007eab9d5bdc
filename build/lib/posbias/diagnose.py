"""Why does a model (not) generalise to longer contexts? ``posbias diagnose CHECKPOINT``.

The diagnosis measures:

* **loss by position** in windows of ``length`` tokens, by ranges of ``L`` (the training length),
  against the same tokens with the context cut at ``L``: a rise past ``L`` is the failure to
  extrapolate. Δ past ``L`` is split (:func:`context_split`) between the first ``L/8`` tokens of
  each cut chunk, which the cut robs of local context, and the rest, for which Δ is what the
  distant keys themselves do. The same windows are scored once more with
  attention cut to the ``L`` nearest keys (:class:`WithinWindow`, a counterfactual): full − window
  is what the keys beyond ``L`` do directly, causally (:func:`window_split`), and window − cut at
  each chunk's last position (the same keys in the first layer) what far tokens do through the layers;
* **attention distance** per layer and head: the mean, median and 90th percentile of ``i − j``
  weighted by the attention probabilities (read from the model's own forward pass,
  ``on_attention``), as a function of the query position. An over-local head keeps a small distance
  however far the query is; a head whose distance grows with the position spreads attention over ever
  more keys (attention dilution). Beside it, the **attention mass on keys farther than** ``L``
  by query position: the share of attention that goes to distances never seen in training;
* **the bias itself**: for a learned bias that is constant past an offset (T5's final bucket, the
  offset table's clipped entry) the share of query–key pairs that fall there and how much those far
  keys weigh against the nearest key; for every additive scheme the **effective reach** of each
  head — the distance at which the bias alone cuts attention by 100× (``bias(0) − bias(d) ≥ ln 100``)
  — and its **drift** (:func:`bias_drift`): how far the bias over the trained distances moves
  between a query at ``L − 1`` and one at the window's end (0 unless the bias depends on ``i``);
* **rotary angles** (:func:`rotary_angles`): for RoPE, the frequency pairs that never turned a full
  circle within ``L`` and meet, past it, angles no distance of training gave them;
* **passkey retrieval** (:mod:`posbias.passkey`): a copy of the model is fine-tuned on the task at
  ``L`` and tested at every length up to ``length`` and five depths, whole keys and byte by byte
  (one copy per seed of ``passkey_seeds``; the cells are their mean, each copy's kept beside it, for
  copies of one model can read far apart), and :func:`answer_attention` measures where the queries
  that predict the answer bytes look: on the key's digits at all, and on the one digit each byte
  copies (where the heads look, not a test of copying: exact copies have put little of any head there).

Shape: :class:`DiagnoseConfig` → :func:`run_diagnose` → :class:`DiagnoseResult` →
:mod:`posbias.report.diagnose` (``report.md``, ``diagnose.json``, PNGs).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from . import checkpoint as ckpt
from . import passkey, store
from .config import ConfigError, Log, check_count, check_threads, fixed_threads, quiet
from .data import Corpus
from .evaluate import bootstrap_means, check_fits, eval_budget, interval, local_head, spread_starts, token_losses
from .model import ModelConfig, TransformerLM
from .schemes.base import Scheme, ToeplitzScheme, flat_share
from .schemes.rope import RoPE, rope_frequencies
from .store import device_memory, free_memory, memory_text

REACH_DROP = math.log(100.0)
ANSWER_SEED = 5678  # answer_attention's passkey samples (the grid draws from 1234, the fine-tune's probe from 4321)
ANSWER_SAMPLES = 8  # answer_attention's samples at each of the five depths


@torch.no_grad()
def attention_distance(model: TransformerLM, idx: Tensor, quantiles: tuple[float, ...] = (0.5, 0.9),
                       beyond: int | None = None) -> dict[str, Tensor]:
    """Attention-weighted distance ``i − j`` per layer, head and query position, averaged over the batch.

    Returns ``{"mean": [layers, heads, N], "q50": …, "q90": …}`` (one entry per quantile) and, with
    ``beyond`` (the training length, say), ``"beyond"``: the attention mass on keys at distance
    ``≥ beyond`` — 0 for queries before ``beyond``, and past it the share of attention that goes to
    distances the model never saw in training. Growing with the query position, it is attention
    dilution measured on the model itself rather than inferred from the bias. The rows of ``idx`` go
    through the model one at a time: a layer's probabilities are ``[heads, N, N]`` (1 GiB at N = 8192
    with 4 heads), not that times the batch."""
    model.eval()
    n = idx.shape[1]
    pos = torch.arange(n, device=idx.device)
    dist = (pos[:, None] - pos[None, :]).clamp(min=0).float()
    offset = (n - 1 - pos).view(1, 1, n)
    out: dict[str, list[Tensor]] = {"mean": [], **{f"q{int(q * 100)}": [] for q in quantiles}}
    far = None
    if beyond is not None:
        check_count("beyond", beyond)
        far = (dist >= beyond).float()
        out["beyond"] = []

    def record(layer: int, p: Tensor) -> None:  # p: [1, H, N, N], one window; layers come in order
        out["mean"].append((p * dist).sum(-1)[0])
        if far is not None:
            out["beyond"].append((p * far).sum(-1)[0])
        cum = p.flip(-1).cumsum(-1)  # index t ↔ key N−1−t, distance t − (N−1−i)
        for qn in quantiles:
            # the first t with cum ≥ qn: a binary search, for cum never falls along t (sums of p ≥ 0); a
            # row that never reaches qn gets 0, as an argmax over all-False would (0.65 of 1.25 s per layer
            # at N = 4096 with 4 heads went to that argmax)
            first = torch.searchsorted(cum, cum.new_full((*cum.shape[:-1], 1), qn)).squeeze(-1)  # [1, H, N]
            first = first.masked_fill(first == n, 0)
            out[f"q{int(qn * 100)}"].append((first - offset).clamp(min=0).float()[0])

    for row in idx:
        model(row[None], on_attention=record)
    # [windows · layers, H, N] → the mean over the windows, [layers, H, N]
    return {k: torch.stack(v).view(idx.shape[0], -1, *v[0].shape).mean(0) for k, v in out.items()}


def last_rows(probs: Tensor, rows: int) -> Tensor:
    """The last ``rows`` query rows of one sequence's attention probabilities ``[1, heads, N, keys]``,
    as ``[heads, rows, keys]`` in storage of their own: a view would keep the layer's whole
    ``[heads, N, keys]`` alive for as long as the rows are kept (every layer's, until the forward
    pass ends: 1.9 against 1.4 GB peak for the demo model at N = 4096, measured). :func:`answer_attention`
    now asks the model for those rows alone (``attention_rows``), so what it copies is already small;
    the copy still guards a caller that hands it the whole matrix."""
    return probs[0, :, -rows:].clone()


@torch.no_grad()
def answer_attention(model: TransformerLM, length: int, *, samples: int = ANSWER_SAMPLES, digits: int = 5,
                     device: str | torch.device = "cpu") -> dict[str, list]:
    """Where the queries that predict a passkey's answer bytes attend, on ``samples`` samples of
    ``length`` bytes at each of the five default depths (their own seed, :data:`ANSWER_SEED`). The
    query that predicts answer byte k is the byte before it (for the first, the question's ``=``);
    the key's k-th digit is the one that byte copies. Returns
    ``{"key": [layers][heads][k], "place": [layers][heads][k]}``: the attention mass, averaged over the
    samples, on the key's digits (the only digits before the answer: the filler has none), and on
    the k-th of them alone."""
    check_count("samples", samples)
    model.eval()
    g = torch.Generator().manual_seed(ANSWER_SEED + length)
    batch = torch.cat([passkey.make_batch(samples, length, digits=digits, generator=g, depths=[d])
                       for d in passkey.default_depths(5)])
    key = place = torch.zeros(())
    for row in batch:
        places = torch.nonzero((row >= ord("0")) & (row <= ord("9"))).flatten()[:digits].to(device)
        probs: list[Tensor] = []
        model(row[None, :-1].long().to(device), on_attention=lambda layer, p: probs.append(last_rows(p, digits)),
              attention_rows=digits)
        on_key = torch.stack(probs).float()[..., places]  # [layers, heads, answer byte, key place]
        key = key + on_key.sum(-1).cpu()
        place = place + on_key.diagonal(dim1=-2, dim2=-1).cpu()
    return {"key": (key / len(batch)).tolist(), "place": (place / len(batch)).tolist()}


@torch.no_grad()
def context_effect(model: TransformerLM, tokens: Tensor, length: int, short: int, *, windows: int,
                   device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """Per-position loss of the same tokens with the full ``length``-token context and with the
    context cut into chunks of ``short`` tokens (what the model sees at its training length).

    Returns ``(long, short)`` losses ``[windows, length]``, one row per window (fewer when the split
    is short), the windows spread evenly over the split (:func:`posbias.evaluate.spread_starts`: an
    interval over them speaks for the split's text, not its first stretch), so that means and their
    intervals come from the same numbers; their difference is
    what the extra context buys (< 0) or costs (> 0), free of the text's own difficulty.
    """
    from torch.nn import functional as F

    model.eval()
    n_avail = tokens.numel() - 1
    count = min(windows, n_avail // length)
    if count < 1:
        raise ValueError(f"the split has {n_avail} tokens, fewer than one window of {length}")
    long_sum = token_losses(model, tokens, length, n_tokens=count * length, device=device).view(count, length)
    short_sum = torch.zeros(count, length, dtype=torch.float64)
    for w, start in enumerate(spread_starts(n_avail, length, count)):  # token_losses's windows
        chunk = tokens[start: start + length + 1].long().to(device)
        x, y = chunk[:-1][None], chunk[1:][None]
        full = length - length % short  # whole chunks go through the model as one batch
        if full:
            logits = model(x[:, :full].reshape(-1, short)).flatten(0, 1)
            short_sum[w, :full] = F.cross_entropy(logits.float(), y[0, :full], reduction="none").double().cpu()
        if full < length:
            short_sum[w, full:] = F.cross_entropy(model(x[:, full:])[0].float(), y[0, full:],
                                                  reduction="none").double().cpu()
    return long_sum, short_sum


def _position_sets(length: int, train_len: int) -> tuple[Tensor, Tensor]:
    """Boolean ``[length]``: the positions past ``L`` among the first ``L/8`` of their ``L``-chunk
    (robbed of local context by the cut), and the other positions past ``L`` (which keep it)."""
    pos = torch.arange(length)
    past = pos >= train_len
    starts = past & (pos % train_len < local_head(train_len))
    return starts, past & ~starts


KEPT = "the rest past L"  # the label of context_split's second set


def kept_row(split: list[tuple]) -> tuple | None:
    """:func:`context_split`'s row of the tokens that keep local context (None where it has none)."""
    return next((row for row in split if row[0].startswith(KEPT)), None)


def context_split(long_w: Tensor, short_w: Tensor, train_len: int) -> list[tuple[str, float, float, float | None, float | None]]:
    """Where the context effect past L comes from. Cut into chunks of ``L``, the first ``L/8``
    tokens of every chunk after the first lose their local context; every other token past ``L``
    keeps at least ``L/8`` tokens of it. Δ (full − cut, ``[windows, length]`` losses from
    :func:`context_effect`) over the first set is what restoring that local context buys; over the
    second, what the far context does for tokens that already have local context — the part that
    tells whether a model *uses* (Δ < 0), ignores (≈ 0) or is disturbed by (Δ > 0) distant keys.

    Returns ``(label, share of all positions, mean Δ over the set, lo, hi)`` per set, the interval a
    95% bootstrap over windows (None with one window); ``share × mean`` of both rows add up to the
    mean Δ over all positions (positions before ``L`` have Δ = 0)."""
    head = local_head(train_len)
    starts, kept = _position_sets(long_w.shape[1], train_len)
    rows = []
    for label, sel in ((f"first {head} of each cut chunk (local context restored)", starts),
                       (f"{KEPT} (≥ {head} tokens of local context either way)", kept)):
        if not bool(sel.any()):
            continue
        delta = long_w[:, sel] - short_w[:, sel]
        rows.append((label, float(sel.float().mean()), float(delta.mean()), *delta_interval(delta)))
    return rows


class Counterfactual(Scheme):
    """A trained scheme's bias changed on purpose, to see what a model does without some part of it
    (:class:`WithinWindow`, :class:`ClampFar`): additive, at ``inner``'s scale, with ``inner``'s rotation
    and absolute embedding (identity and none for a bias). Not registered: these exist only inside a
    diagnosis or an experiment."""

    family = "additive"
    paper = "—"
    in_study = False

    def __init__(self, inner: Scheme) -> None:
        super().__init__(n_heads=inner.n_heads, head_dim=inner.head_dim)
        self.inner = inner

    def default_scale(self) -> float:
        return self.inner.default_scale()

    def rotate(self, x: Tensor, pos: Tensor, *, context_len: int | None = None) -> Tensor:
        return self.inner.rotate(x, pos, context_len=context_len)

    def embed(self, pos: Tensor, dim: int) -> Tensor | None:
        return self.inner.embed(pos, dim)


class WithinWindow(Counterfactual):
    """``inner``'s bias with every key at distance ``≥ window`` hidden: a sliding window of the
    training length laid over a trained model (the counterfactual :func:`window_effect` scores). Any
    scheme: one without a bias (RoPE, NoPE, sinusoidal) keeps its family, so attention still rotates
    or embeds as it does, and its :meth:`bias` is the mask alone, which only the backends that add a
    bias to every family read (:func:`hiding`)."""

    name = "within-window"
    summary = "a scheme's bias, keys at distance >= window hidden (diagnosis only)"

    def __init__(self, inner: Scheme, window: int) -> None:
        super().__init__(inner)
        self.window = check_count("window", window)
        self.family = inner.family  # (an instance's: attention rotates q/k of a rotary inner)

    def hidden(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """``[len(q_pos), len(k_pos)]``: True for the pairs this counterfactual hides."""
        return (q_pos[:, None] - k_pos[None, :]) >= self.window

    def bias(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        bias = self.inner.bias(q_pos, k_pos)
        if bias is None:
            bias = torch.zeros(self.n_heads, len(q_pos), len(k_pos), device=q_pos.device)
        return bias.masked_fill(self.hidden(q_pos, k_pos), float("-inf"))


# The backend every counterfactual runs on: the one that adds any scheme's bias (for a scheme without
# one, the mask alone) block by block; the fused kernels read a bias only from additive schemes, and
# the structured ones need the Toeplitz or ALiBi bias a counterfactual no longer is. For an additive
# scheme it is what ``auto`` picks anyway (a checkpoint may name another backend in its config).
MASKED_BACKEND = "blockwise"


@contextmanager
def hiding(model: TransformerLM, scheme: WithinWindow) -> Iterator[TransformerLM]:
    """``model`` with ``scheme`` (a counterfactual of ``model.scheme``) in every layer, on
    :data:`MASKED_BACKEND`; its scheme and backends restored after."""
    inner, backends = model.scheme, [b.attn.backend for b in model.blocks]
    model.scheme = scheme
    for b in model.blocks:
        b.attn.backend = MASKED_BACKEND
    try:
        yield model
    finally:
        model.scheme = inner
        for b, name in zip(model.blocks, backends):
            b.attn.backend = name


class ClampFar(Counterfactual):
    """``inner``'s bias with every key at distance ``≥ limit`` given the bias at distance ``limit − 1``
    for the same query: what a model does past ``L`` when no distance meets a bias training did not
    give it (``docs/experiments/far_clamp.py``). Key positions must be ``0 … n − 1`` (they index the bias)."""

    name = "clamp-far"
    summary = "a scheme's bias, distances >= limit given the bias at limit - 1 (experiments only)"

    def __init__(self, inner: Scheme, limit: int) -> None:
        super().__init__(inner)
        self.limit = check_count("limit", limit)

    def bias(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        if not torch.equal(k_pos, torch.arange(k_pos.numel(), device=k_pos.device)):
            raise ValueError("ClampFar needs key positions 0 … n − 1")
        full = self.inner.bias(q_pos, k_pos)  # [H, Nq, Nk]
        nearest_allowed = torch.maximum(k_pos[None, :], q_pos[:, None] - (self.limit - 1)).clamp(min=0)
        return torch.gather(full, 2, nearest_allowed.expand(full.shape[0], -1, -1))


class HideFarFiller(WithinWindow):
    """:class:`WithinWindow` **except** the positions in ``keep`` (a passkey sample's key statement,
    :func:`posbias.passkey.statement_span`), which stay visible at any distance: the key stays at its
    distance with its bias, and only the filler past the training distance is gone
    (:func:`far_filler_scores`)."""

    name = "hide-far-filler"
    summary = "a scheme's bias, keys at distance >= window hidden except the kept positions (diagnosis only)"

    def __init__(self, inner: Scheme, window: int, keep: range) -> None:
        super().__init__(inner, window)
        self.keep = keep

    def hidden(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        kept = (k_pos >= self.keep.start) & (k_pos < self.keep.stop)
        return super().hidden(q_pos, k_pos) & ~kept[None, :]


def far_filler_scores(model: TransformerLM, length: int, depth: float, window: int, **kwargs) -> dict[str, Any]:
    """:func:`posbias.passkey.scores` of the cell (``length``, ``depth``) on the same samples with the
    filler at distance ``≥ window`` hidden in every layer (:class:`HideFarFiller`, any scheme: see
    :func:`hiding`; the model is restored after). Against the cell as it is: retrieval that comes back
    was lost to the filler beyond ``window`` (what it takes of the attention, or writes into the residual
    stream), not to the key's distance, which is unchanged. ``docs/experiments/far_filler.py`` hides it
    layer by layer."""
    keep = passkey.statement_span(length, depth, kwargs.get("digits", 5))
    with hiding(model, HideFarFiller(model.scheme, window, keep)):
        return passkey.scores(model, length, depth, **kwargs)


def window_effect(model: TransformerLM, tokens: Tensor, length: int, window: int, count: int, *,
                  device: str | torch.device = "cpu") -> Tensor:
    """Per-position loss ``[count, length]`` of ``count`` windows of ``length`` tokens spread over the
    split (:func:`context_effect`'s, given its count) with attention cut to keys at distance ``< window``: the
    same model, the same windows, every key farther back hidden. Against the full context this is
    what the keys beyond ``window`` do, causally (any scheme: see :func:`hiding`; the model is restored
    after)."""
    with hiding(model, WithinWindow(model.scheme, window)):
        return token_losses(model, tokens, length, n_tokens=count * length, device=device).view(count, length)


def chunk_ends(length: int, train_len: int) -> Tensor:
    """Boolean ``[length]``: the last position of every ``L``-chunk after the first (``kL + L − 1``,
    ``k ≥ 1``). There a sliding window of ``L`` and the context cut at ``L`` show the first layer the
    same keys (the chunk), so what differs between them comes from tokens at distance ``≥ L`` reaching
    the query through the keys' states in lower layers (and, for absolute positions or a bias that
    moves with the query position, such as FIRE's past its threshold, from the cut restarting the
    positions at 0)."""
    pos = torch.arange(length)
    return (pos >= train_len) & (pos % train_len == train_len - 1)


def window_split(long_w: Tensor, window_w: Tensor, short_w: Tensor,
                 train_len: int) -> list[tuple[str, float, float | None, float | None]]:
    """Over the tokens past ``L`` that keep local context (:func:`context_split`'s second set), Δ
    split in two: full context − window of ``L`` (what the keys beyond ``L`` do directly) and window
    of ``L`` − cut at ``L`` (the context beyond the chunk's start that the window shows); they add up
    to that set's Δ. The window is not a clean near/far split for a model of several layers: a key
    within ``L`` carries, in its state, tokens up to ``L − 1`` farther back per layer below. So a third
    row, not part of the sum, gives window − cut at :func:`chunk_ends`, where both show the first
    layer the same keys: what far tokens do through the layers; absent when the window holds no chunk
    end (``length < 2 L``: an empty mean would be NaN). Rows ``(label, mean, lo, hi)``, intervals a 95%
    bootstrap over windows."""
    _, kept = _position_sets(long_w.shape[1], train_len)
    if not bool(kept.any()):
        return []
    rows = []
    ends = chunk_ends(long_w.shape[1], train_len)
    for label, a, b, sel in (
            (f"keys at distance ≥ {train_len} (full − window of {train_len})", long_w, window_w, kept),
            (f"keys within {train_len} before the chunk's start, and what they carry (window of {train_len} − cut)",
             window_w, short_w, kept),
            ("far tokens through the layers (window − cut at each chunk's last position, the same keys in layer 1)",
             window_w, short_w, ends)):
        if not bool(sel.any()):
            continue
        delta = (a - b)[:, sel]
        rows.append((label, float(delta.mean()), *delta_interval(delta)))
    return rows


def has_final_entry(scheme: Scheme) -> bool:
    """True for a learned Toeplitz bias that is constant past an offset (T5's final bucket, the offset
    table's clipped entry): the diagnosis then measures that entry."""
    return isinstance(scheme, ToeplitzScheme) and scheme.learnable and scheme.flat_beyond is not None


def final_bucket_share(scheme: ToeplitzScheme, length: int) -> float:
    """Share of causal query–key pairs of a ``length``-token window that fall past ``flat_beyond``."""
    return flat_share(scheme.flat_beyond, length)


def final_bucket_weight(scheme: ToeplitzScheme, length: int) -> tuple[list[float], list[float]]:
    """Per head: the gap ``u(0) − u(final)`` in nats, and how much the far keys (all on the final
    entry) weigh against one key at distance 0 on the bias alone, ``n_far · exp(u_final − u_0)``,
    for a query at the end of a ``length``-token window. Above 1 the far keys together outweigh the
    nearest key before q·k is counted (dilution); far below 1 the final entry acts as a penalty."""
    with torch.no_grad():
        near, far = scheme.bias_at(torch.tensor([0, scheme.flat_beyond])).unbind(-1)  # [H] each
        gap = [float(g) for g in near - far]
    n_far = max(0, length - scheme.flat_beyond)
    return gap, [n_far * math.exp(-g) for g in gap]


def effective_reach(scheme: Scheme, *, query_pos: int, max_distance: int) -> list[int | None]:
    """Per head: the smallest distance ``d ≤ max_distance`` with ``bias(0) − bias(d) ≥ ln 100`` (None: never)."""
    d = torch.arange(0, max_distance + 1)
    curve = scheme.bias_by_distance(d, query_pos=query_pos)  # [H, D]
    if curve is None:
        return [None] * scheme.n_heads
    drop = curve[:, :1] - curve
    hits = drop >= REACH_DROP
    return [int(torch.nonzero(h)[0]) if bool(h.any()) else None for h in hits]


def bias_drift(scheme: Scheme, *, train_len: int, length: int) -> list[float] | None:
    """Per head: how far the bias over the distances seen in training (``0 … L−1``) moves between a
    query at ``L − 1`` and one at ``length − 1``, in nats: ``max_d |Δb(d) − Δb(0)|``, each curve taken
    relative to its distance-0 value (a constant per query changes no attention). 0 for every
    Toeplitz scheme, whose bias depends on ``i − j`` alone; for FIRE, which normalises distances by
    the query position past its threshold, it is the bias change a model meets past training at the
    very distances it was trained on. None for a scheme without a bias."""
    d = torch.arange(train_len)
    at_l = scheme.bias_by_distance(d, query_pos=train_len - 1)
    if at_l is None:
        return None
    at_end = scheme.bias_by_distance(d, query_pos=length - 1)
    moved = (at_end - at_end[:, :1]) - (at_l - at_l[:, :1])
    return [float(x) for x in moved.abs().amax(-1)]


def rotary_angles(scheme: Scheme, *, train_len: int, length: int) -> dict[str, list] | None:
    """For a rotary scheme, per frequency pair ``k`` (``head_dim/2`` of them): its wavelength ``2π/θ_k``
    in tokens, the angle ``θ_k·(L − 1)`` it turned through over the longest distance of training (the
    base frequencies: a retrofitted checkpoint was trained before its scaling), and the angle it turns
    through over the window's longest distance with the frequencies in use there (scaling, PI's
    position factor and dynamic NTK's context included). ``unseen``: the pairs that never completed a
    turn within ``L`` and whose angle at the window's end goes past ``θ_k·L`` — angles farther round
    the circle than any distance of training put them. None for a scheme that does not rotate."""
    if not isinstance(scheme, RoPE):
        return None
    # the float32 frequencies a model turns by (its inv_freq), so that an unscaled window's angles are
    # training's to the last bit: against float64 ones a window of L + 1 put a pair past θ·L by rounding
    base = rope_frequencies(scheme.head_dim, scheme.base).float().double()
    used = scheme.effective_frequencies(length)
    trained, end = base * (train_len - 1), used * (length - 1)
    unseen = (base * train_len < 2 * math.pi) & (end > base * train_len)
    return {"wavelength": (2 * math.pi / base).tolist(), "train_angle": trained.tolist(), "end_angle": end.tolist(),
            "unseen": unseen.tolist()}


def delta_interval(delta: Tensor) -> tuple[float, float] | tuple[None, None]:
    """95% bootstrap interval of the mean of ``delta`` ``[windows, positions]`` (full − cut loss of the
    same tokens), resampling windows; ``(None, None)`` with a single window, which has no spread to
    read (None, not NaN: results never hold a non-finite number)."""
    if delta.shape[0] < 2:
        return None, None
    per_window = delta.mean(1, keepdim=True)
    reps = bootstrap_means(per_window, torch.ones_like(per_window))[:, 0]
    return interval(reps)


def _ranges(length: int, train_len: int) -> list[tuple[int, int]]:
    """[0, L), [L, 2L), [2L, 4L), … up to ``length``."""
    rows, s = [], 0
    while s < length:
        e = min(length, train_len if s == 0 else 2 * s)
        rows.append((s, e))
        s = e
    return rows


@dataclass(frozen=True)
class DiagnoseConfig:
    length: int | None = None  # window examined (default 8 × the training length)
    windows: int = 4  # validation windows for the attention statistics
    # validation tokens for the loss by position (at least one window; spread over the split; None:
    # evaluate.SEGMENTS windows of `length`)
    eval_tokens: int | None = None
    passkey_steps: int = 2400  # passkey fine-tune steps of a copy (0: no passkey test)
    passkey_until: float = 0.0  # > 0: the copy stops once it solves this share of a probe at L (0: every step)
    passkey_samples: int = 24  # passkey samples per (length, depth) cell
    # seeds of the passkey fine-tunes' batches, one copy each (the test samples keep theirs); the cells
    # are the mean over the copies, and each copy's own are kept (copies of one model can differ far more
    # than the samples' interval says)
    passkey_seeds: tuple[int, ...] = (0,)
    device: str = "cpu"  # cpu or cuda[:N]
    threads: int = 2  # torch intra-op threads, fixed for reproducible results

    def __post_init__(self) -> None:
        if self.length is not None:
            check_count("length", self.length, minimum=2)
        for name in ("windows", "passkey_samples"):
            check_count(name, getattr(self, name))
        check_threads("threads", self.threads)
        if self.eval_tokens is not None:
            check_count("eval_tokens", self.eval_tokens)
        check_count("passkey_steps", self.passkey_steps, minimum=0)
        passkey.check_seeds("passkey_seeds", self.passkey_seeds)
        passkey.check_until("passkey_until", self.passkey_until)


@dataclass
class DiagnoseResult:
    """Every measurement of a diagnosis; :meth:`to_json` is ``diagnose.json``."""

    checkpoint: str
    scheme_name: str
    options: dict[str, Any]
    train_len: int
    length: int
    scheme: Scheme  # the checkpoint's trained scheme (for the bias picture)
    loss_windows: int  # windows behind the loss by position
    loss_by_position: list[float]  # full context
    loss_by_position_cut_at_L: list[float]  # the same tokens, context cut into chunks of L
    # (positions, full, cut, Δ lo, Δ hi) per range [0, L), [L, 2L), …: Δ = full − cut with its 95%
    # interval over the windows (None with one window)
    loss_by_range: list[tuple[str, float, float, float | None, float | None]]
    # "mean"/"q50"/"q90" (distance), "beyond" (mass at distance ≥ L): [layers][heads][query position]
    attention_distance: dict[str, list]
    final_entry_share: dict[int, float] = field(default_factory=dict)  # window → share past flat_beyond
    final_entry_gap: list[float] = field(default_factory=list)  # per head, u(0) − u(final)
    far_weight: list[float] = field(default_factory=list)  # per head, n_far · exp(u_final − u_0)
    effective_reach: list[int | None] | None = None  # per head (additive schemes), query at length − 1
    reach_at_L: list[int | None] | None = None  # the same for a query at L − 1
    bias_drift: list[float] | None = None  # per head: the bias's change over distances < L, query L−1 → length−1
    rotary: dict[str, list] | None = None  # rotary schemes: per frequency pair, rotary_angles()
    passkey: dict[str, dict[str, float]] | None = None  # length → depth → accuracy, mean over the copies
    passkey_digits: dict[str, dict[str, list[float]]] | None = None  # length → depth → score per byte, mean over copies
    # one per passkey seed: {"seed", "passkey", "passkey_digits" (that copy's grids), "attention" (length →
    # answer_attention() of the copy), "fit" (its fine-tune: passkey.teach's record); with several lengths also
    # "hidden", "hidden_digits": the grids past L with the far filler hidden (far_filler_scores)}
    passkey_copies: list[dict[str, Any]] = field(default_factory=list)
    passkey_max_steps: int = 0  # the steps each copy was given (its fit["steps"]: those it trained)
    passkey_until: float = 0.0  # the probe accuracy at L that would end a fine-tune (0: none, it trained every step)
    passkey_samples: int = 0
    passkey_seeds: list[int] = field(default_factory=list)  # the seeds of the copies' fine-tune batches
    passkey_skipped: str = ""  # why a requested passkey test did not run
    passkey_lr_mult: float = 1.0  # the passkey fine-tune's positional learning-rate multiplier (the training one)
    threads: int = 2  # torch intra-op threads the measurements ran at
    loss_delta_interval: tuple[float | None, float | None] = (None, None)  # of Δ over all positions
    # Δ past L split into the cut chunks' first L/8 tokens and the rest: (label, share, mean Δ, lo, hi)
    context_split: list[tuple[str, float, float, float | None, float | None]] = field(default_factory=list)
    # the rest's Δ split by a sliding window of L: keys beyond L, the window's keys before the chunk (label, Δ, lo, hi);
    # a third row, window − cut at the chunks' last positions: far tokens through the layers
    window_split: list[tuple[str, float, float | None, float | None]] = field(default_factory=list)
    corpus: dict[str, Any] = field(default_factory=dict)  # the fingerprint of the text measured on
    trained_corpus: dict[str, Any] | None = None  # the one the checkpoint records it was trained on
    retrofit: dict[str, Any] | None = None  # a retrofitted checkpoint's method, target length and fine-tune steps
    cache: str | None = None  # the name of its cache file (``cache-<key>.json``), by which ``posbias clean`` judges it

    def copy_accuracy(self, length: str) -> list[float]:
        """Each passkey copy's accuracy at ``length`` (mean over the depths), in the order of the seeds."""
        return [passkey.mean_accuracy(c["passkey"], length) for c in self.passkey_copies]

    def hidden_accuracy(self, length: str) -> list[float] | None:
        """Each copy's accuracy at ``length`` (past L) with the far filler hidden, in the order of the
        seeds; None where it was not measured (a diagnosis from before the measurement)."""
        if not self.passkey_copies or any(length not in c.get("hidden", {}) for c in self.passkey_copies):
            return None
        return [passkey.mean_accuracy(c["hidden"], length) for c in self.passkey_copies]

    def to_json(self) -> dict[str, Any]:
        skip = {"scheme"}
        return {"scheme" if k == "scheme_name" else k: getattr(self, k) for k in self.__dataclass_fields__
                if k not in skip}


def source_key(path: str | Path, cfg: DiagnoseConfig, corpus: Corpus) -> str:
    """What every cached measurement of a diagnosis depends on besides its own settings
    (:func:`posbias.checkpoint.job_key`): the checkpoint, the corpus, the device (by CPU or GPU model),
    the thread count, torch and the code (``store.JOB_CODE["diagnose"]``). Each measurement adds its own settings to its name in the cache
    (window length, windows, passkey steps and samples), so a re-run with another ``--length`` reuses
    the passkey-tuned copy and every passkey cell it already has."""
    return ckpt.job_key(path, corpus=corpus.fingerprint, settings={"threads": cfg.threads}, job="diagnose",
                        device=cfg.device)


class _Cache(store.JobCache):
    """A diagnosis's measurements in ``out/cache-<key>.json`` (in memory only without ``out``)."""

    def __init__(self, out: Path | None, key: str, log: Log, device: str) -> None:
        super().__init__(None if out is None else out / f"cache-{key}.json", "diagnose", device)
        self.name = f"cache-{key}.json"
        self.log = log

    def get(self, name: str, what: str, make: Callable[[], Any]) -> Any:
        """The entry ``name``, made by ``make`` (and saved) unless a run with the same key made it."""
        if name in self.data:
            self.log(f"{what}: reusing {self.name}")
        else:
            self.log(f"{what} …")
            self.put(name, make())
        return self.data[name]


def run_diagnose(path: str | Path, cfg: DiagnoseConfig, *, corpus: Corpus, progress: bool = False,
                 log: Log = quiet, out: str | Path | None = None) -> DiagnoseResult:
    """Measure the checkpoint at ``path`` at ``cfg.threads`` threads (:func:`posbias.report.diagnose.write`
    renders the result). Given the output folder ``out``, every measurement is kept there as it is
    made, in ``cache-<key>.json`` under :func:`source_key`, and the passkey-tuned copy in
    ``models/passkey-ft<steps>[-until<accuracy>]-<key>/`` (its progress in ``last/`` while it trains, so that an
    interrupted fine-tune continues): a re-run, interrupted or with other settings, measures only what
    it lacks. Without ``out``, nothing is written."""
    store.check_device(cfg.device)
    with fixed_threads(cfg.threads):
        result = _diagnose(path, cfg, corpus, progress, log, None if out is None else Path(out))
    result.threads = cfg.threads
    return result


#: the peak memory of :func:`attention_distance` on one window, in units of one layer's float32
#: ``[heads, N, N]`` probabilities (the probabilities, the logits they came from and the statistics'
#: temporaries): measured 3.50 on the demo's T5 (4 heads) at N = 2,048, 4,096 and 6,144
ATTENTION_PEAK = 3.5


def examined_length(path: str | Path, cfg: "DiagnoseConfig", corpus: Corpus, name: str | None = None, *,
                    meta: dict[str, Any] | None = None) -> int:
    """The window a diagnosis of the checkpoint at ``path`` examines: ``cfg.length``, by default 8 × L.
    :class:`ConfigError` before any work unless

    * it exceeds L: every measurement is of what happens past L, and at or below it the context "cut
      at L" is the full one, so Δ would be rounding between two batch shapes, which an interval can
      still put on one side of 0 (a "helps" verdict on nothing, seen);
    * it fits the validation split, and so do ``cfg.windows`` distinct windows of it (they may overlap);
    * the attention statistics fit the device: their peak, :data:`ATTENTION_PEAK` × one layer's float32
      ``[heads, N, N]``, within the memory it has in all (beyond it a run is killed, or thrashes, after
      the loss measurements, with no message).

    ``name`` names the model in the messages (default: ``path``); ``meta`` is the checkpoint's
    ``config.json`` when the caller has read it."""
    meta = ckpt.read_meta(path) if meta is None else meta
    train_len = ckpt.train_len(path, meta)
    name = str(path) if name is None else name
    n = 8 * train_len if cfg.length is None else cfg.length
    if n <= train_len:
        raise ConfigError("length", f"must exceed the training length L = {train_len} of {name} (a diagnosis "
                                    f"measures what happens past L), got {n}")
    check_fits(corpus.val, n, cfg.eval_tokens, "length", least=train_len + 1)
    distinct = corpus.val.numel() - n  # window starts 0 … (scoreable tokens − n): the attention windows may overlap
    if cfg.windows > distinct:
        raise ConfigError("windows", f"{cfg.windows} exceeds the {distinct:,} distinct windows of {n} tokens that the "
                                     "validation split holds; give at most that many")
    heads = int(meta["model"].get("n_heads", ModelConfig.n_heads))
    need, have = attention_peak(heads, n), device_memory(cfg.device)
    if have is not None and need > have:
        raise ConfigError("length", f"{n} needs about {memory_text(need)} for the attention statistics of {name} "
                                    f"({ATTENTION_PEAK:g} × {heads} heads × {n}² float32 at their peak), more than "
                                    f"the {memory_text(have)} this {cfg.device} has; a shorter --length")
    return n


def attention_peak(heads: int, n: int) -> float:
    """Bytes :func:`attention_distance` holds at its peak on windows of ``n`` tokens (:data:`ATTENTION_PEAK`)."""
    return ATTENTION_PEAK * heads * n * n * 4


def memory_note(heads: int, n: int, device: str) -> str | None:
    """A note when the attention statistics' peak exceeds the memory ``device`` has free now (other
    processes hold the rest; :func:`examined_length` has checked it against all the memory there is):
    the run may then swap, or be killed, with no message of its own. None when it fits, or where the free
    memory cannot be read."""
    need, free = attention_peak(heads, n), free_memory(device)
    if free is None or need <= free:
        return None
    return (f"note: the attention statistics at {n} tokens need about {memory_text(need)} at their peak and this "
            f"{device} has {memory_text(free)} free now; the run may swap or be killed (free memory, or a "
            f"shorter --length)")


def _tensor(rows: list) -> Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _diagnose(path: str | Path, cfg: DiagnoseConfig, corpus: Corpus, progress: bool, log: Log,
              out: Path | None) -> DiagnoseResult:
    meta = ckpt.read_meta(path)
    length = examined_length(path, cfg, corpus, meta=meta)
    model = ckpt.load_model(path).to(cfg.device).eval()
    train_len = ckpt.train_len(path, meta)
    key = source_key(path, cfg, corpus)
    cache = _Cache(out, key, log, cfg.device)
    windows_loss = max(1, eval_budget(cfg.eval_tokens, length) // length)

    def losses() -> dict[str, list]:
        long_w, short_w = context_effect(model, corpus.val, length, train_len, windows=windows_loss,
                                         device=cfg.device)
        got = {"long": long_w.tolist(), "short": short_w.tolist()}
        log(f"the same windows with attention cut to the {train_len} nearest keys …")
        got["window"] = window_effect(model, corpus.val, length, train_len, long_w.shape[0],
                                      device=cfg.device).tolist()
        return got

    def distances() -> dict[str, list]:
        note = memory_note(model.cfg.n_heads, length, cfg.device)
        if note:
            log(note)
        starts = spread_starts(corpus.val.numel() - 1, length, cfg.windows, overlap=True)
        idx = torch.stack([corpus.val[s:s + length] for s in starts]).long().to(cfg.device)
        return {k: v.tolist() for k, v in attention_distance(model, idx, beyond=train_len).items()}

    got = cache.get(f"loss:{length}:{windows_loss}", "loss by position", losses)
    long_w, short_w = _tensor(got["long"]), _tensor(got["short"])
    ad = cache.get(f"attention:{length}:{cfg.windows}", "attention distance per layer and head", distances)
    long_loss, short_loss = long_w.mean(0), short_w.mean(0)
    result = DiagnoseResult(
        str(path), model.cfg.scheme, model.cfg.scheme_options, train_len, length, model.scheme, long_w.shape[0],
        long_loss.tolist(), short_loss.tolist(),
        [(f"{a}–{b - 1}", float(long_loss[a:b].mean()), float(short_loss[a:b].mean()),
          *delta_interval(long_w[:, a:b] - short_w[:, a:b])) for a, b in _ranges(length, train_len)], ad)
    result.corpus, result.trained_corpus, result.retrofit = corpus.fingerprint, meta.get("corpus"), meta.get("retrofit")
    result.cache = cache.name
    result.loss_delta_interval = delta_interval(long_w - short_w)
    result.context_split = context_split(long_w, short_w, train_len)
    if "window" in got:
        result.window_split = window_split(long_w, _tensor(got["window"]), short_w, train_len)
    _measure_bias(result)
    if cfg.passkey_steps > 0 and train_len >= passkey.overhead(5):
        result.passkey_lr_mult = ckpt.pos_lr_mult(meta)
        for k, seed in enumerate(cfg.passkey_seeds, 1):
            if len(cfg.passkey_seeds) > 1:
                log(f"passkey copy {k}/{len(cfg.passkey_seeds)} (batches of seed {seed}):")
            result.passkey_copies.append(_passkey(
                model, cfg, seed, result, length, progress, log, cache,
                None if out is None else out / "models" / f"passkey-{_fit_name(cfg, seed)}-{key}"))
        result.passkey, result.passkey_digits = (passkey.mean_of([c[part] for c in result.passkey_copies])
                                                 for part in ("passkey", "passkey_digits"))
        result.passkey_max_steps, result.passkey_until = cfg.passkey_steps, cfg.passkey_until
        result.passkey_samples, result.passkey_seeds = cfg.passkey_samples, list(cfg.passkey_seeds)
    elif cfg.passkey_steps > 0:
        result.passkey_skipped = (f"the training length {train_len} is shorter than a passkey sample "
                                  f"({passkey.overhead(5)} bytes)")
    return result


def _measure_bias(result: DiagnoseResult) -> None:
    scheme, L, length = result.scheme, result.train_len, result.length
    if has_final_entry(scheme):
        lens = sorted({n for n in (L, 2 * L, 4 * L, 8 * L, 16 * L) if n <= length} | {length})
        result.final_entry_share = {n: final_bucket_share(scheme, n) for n in lens}
        result.final_entry_gap, result.far_weight = final_bucket_weight(scheme, length)
    if scheme.family == "additive":
        result.effective_reach = effective_reach(scheme, query_pos=length - 1, max_distance=16 * length)
        result.reach_at_L = effective_reach(scheme, query_pos=L - 1, max_distance=16 * length)
        result.bias_drift = bias_drift(scheme, train_len=L, length=length)
    result.rotary = rotary_angles(scheme, train_len=L, length=length)


def _fit_name(cfg: DiagnoseConfig, seed: int) -> str:
    """A passkey copy's fine-tune in a name: ``ft2400`` (2,400 steps), ``ft2400-until0.9`` (fewer once
    0.9 of the probe at L is solved), ``ft2400-seed1`` (batches of another seed than 0)."""
    return (f"ft{cfg.passkey_steps}" + (f"-until{cfg.passkey_until:g}" if cfg.passkey_until else "")
            + (f"-seed{seed}" if seed else ""))


def _passkey(model: TransformerLM, cfg: DiagnoseConfig, seed: int, result: DiagnoseResult, length: int,
             progress: bool, log: Log, cache: _Cache, mdir: Path | None) -> dict[str, Any]:
    """One copy's passkey grids over L, 2L, … ≤ ``length`` and five depths, accuracy and the score per
    answer byte (:func:`posbias.passkey.scores`), and the answer queries' attention
    (:func:`answer_attention`) at each length, the grids past L once more with the far filler
    hidden (:func:`far_filler_scores`), with the record of its fine-tune (steps trained,
    probes) from batches of ``seed`` (an entry of :attr:`DiagnoseResult.passkey_copies`); each cell
    from ``cache`` where a run made it. The copy fine-tuned on the task is made (and kept in ``mdir``)
    only for what is missing."""
    train_len = result.train_len
    lens, n = [], train_len
    while n <= length:
        lens.append(n)
        n *= 2
    depths = passkey.default_depths(5)
    tag = _fit_name(cfg, seed)
    fit = f"passkey-fit:{tag}"
    names = {(n, d): f"passkey:{n}:{d}:{tag}:{cfg.passkey_samples}" for n in lens for d in depths}
    looks = {n: f"passkey-attention:{n}:{tag}" for n in lens}
    # past L: the same cells with the far filler hidden (far_filler_scores)
    hidden = {(n, d): f"passkey-hidden:{n}:{d}:{tag}:{cfg.passkey_samples}" for n in lens[1:] for d in depths}
    known = {cell: cache.data[name] for cell, name in names.items() if name in cache.data}
    if (len(known) < len(names) or fit not in cache.data
            or any(name not in cache.data for name in [*looks.values(), *hidden.values()])):
        copy = _passkey_copy(model, cfg, seed, result.passkey_lr_mult, train_len, progress, log, mdir, cache, fit)
        log(f"passkey grid: {len(names) - len(known)} of {len(names)} cells ({len(lens)} lengths × {len(depths)} "
            f"depths), {cfg.passkey_samples} samples each …")
        grid = passkey.accuracy_grid(copy, lens, depths, progress=progress, known=known, measure=passkey.scores,
                                     on_cell=lambda n, d, a: cache.put(names[n, d], a),
                                     samples=cfg.passkey_samples, device=cfg.device)
        for n, look in looks.items():
            if look not in cache.data:
                log(f"passkey: where the answer queries attend at {n} …")
                cache.put(look, answer_attention(copy, n, device=cfg.device))
        todo = [cell for cell, name in hidden.items() if name not in cache.data]
        if todo:
            log(f"passkey: {len(todo)} cells past L again, the filler at distance ≥ {train_len} hidden …")
        for n, d in todo:
            cache.put(hidden[n, d], far_filler_scores(copy, n, d, train_len, samples=cfg.passkey_samples,
                                                      device=cfg.device))
    else:
        log(f"passkey grid: reusing {cache.name}")
        grid = {n: {d: known[n, d] for d in depths} for n in lens}
    solved, digits = _named_scores(grid)
    got = {"seed": seed, "passkey": solved, "passkey_digits": digits,
           "attention": {str(n): cache.data[look] for n, look in looks.items()}, "fit": cache.data[fit]}
    if hidden:
        got["hidden"], got["hidden_digits"] = _named_scores(
            {n: {d: cache.data[hidden[n, d]] for d in depths} for n in lens[1:]})
    return got


def _named_scores(grid: dict[int, dict[float, dict[str, Any]]]) -> tuple[dict, dict]:
    """A grid of :func:`posbias.passkey.scores` as two JSON grids, length → depth (strings) → whole keys
    solved, and → the score of each answer byte."""
    return tuple({str(n): {str(d): v for d, v in row.items()} for n, row in part.items()}
                 for part in passkey.split_scores(grid))


def _passkey_copy(model: TransformerLM, cfg: DiagnoseConfig, seed: int, mult: float, train_len: int, progress: bool,
                  log: Log, mdir: Path | None, cache: _Cache, fit: str) -> TransformerLM:
    """A copy of ``model`` fine-tuned on passkey retrieval at ``train_len`` from batches of ``seed``
    (every step, or until it solves ``cfg.passkey_until`` of the probe at L): the one in ``mdir`` when
    a run made it (its record in ``cache`` under ``fit``), else trained now (its progress in
    ``mdir/last`` meanwhile), saved there and recorded (:func:`posbias.passkey.teach`)."""
    if mdir is not None and ckpt.exists(mdir) and fit in cache.data:
        log(f"passkey: reusing the fine-tuned copy in {mdir}")
        return ckpt.load_model(mdir).to(cfg.device)
    until = f" (fewer once it solves {cfg.passkey_until:g} of a probe at L)" if cfg.passkey_until else ""
    log(f"passkey: fine-tuning a copy for {cfg.passkey_steps} steps at {train_len}{until} …")
    copy = model.with_scheme(model.cfg.scheme, model.cfg.scheme_options)
    seen = f"{fit}:probes"  # each probe as it is made (an interrupted fine-tune's record stays whole)
    record = passkey.teach(copy, length=train_len, steps=cfg.passkey_steps, until=cfg.passkey_until,
                           probes=cache.data.get(seen), keep=lambda probed: cache.put(seen, probed), device=cfg.device,
                           progress=progress, resume=None if mdir is None else mdir / "last", replace_other=True,
                           pos_lr_mult=mult, seed=seed, log=log)
    if mdir is not None:
        ckpt.save_checkpoint(mdir, copy, extra={"passkey": {"length": train_len, "max_steps": cfg.passkey_steps,
                                                            "until": cfg.passkey_until, **record}})
    cache.put(fit, record)
    log(f"passkey: {passkey.fit_sentence(record)}")
    return copy
