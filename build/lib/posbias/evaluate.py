"""Perplexity at many lengths: non-overlapping or sliding windows, loss by position.

Every length is scored on the same tokens, so the numbers are comparable across lengths: segments of
the longest length spread evenly over the whole split (:func:`spread_starts`), not its first tokens.
A split's text changes along it (the demo's validation split is whole source files, codec tables among
them, on which the same model's ppl@16L/ppl@L reads 0.93 for ALiBi and 9.9 for sinusoidal against 0.99
and 2.9 on the split's first 16,384 bytes), so an interval from one stretch of it speaks for that
stretch alone; spread segments make the bootstrap over segments an interval for the split. Bits per
byte = loss / ln 2 (the vocabulary is bytes).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Iterator, NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F
from tqdm.auto import tqdm

from .config import ConfigError
from .model import TransformerLM

N_BOOT = 2000  # bootstrap replicates per interval (every interval of the study, retrofit and diagnose)
# Resampling units (segments of the longest length, or windows) an evaluation scores unless told otherwise.
# Measured (docs/study.md, "Do the intervals now mean 95%?"): the study's nominal 95% interval held the split's
# value in 81-94% of random draws of 16 segments, 92-97% of 64 (offset, whose per-segment log ratio has
# excess kurtosis 29, 0.81 -> 0.92). Fewer units miss the rare stretches of text that carry the variance.
SEGMENTS = 64
# The fewest units an evaluation scores: below it an interval is no measure of the noise. Measured the same way
# (docs/study.md, "How few segments an interval needs"): random draws of 2 segments held the split's value in
# 43-55% of draws, of 4 in 63-84%, of 8 in 80-89% (16: 81-93%); one segment gives a point, held never.
MIN_SEGMENTS = 8


def eval_budget(tokens: int | None, span: int) -> int:
    """Validation tokens an evaluation scores: ``tokens`` as given, or (None) :data:`SEGMENTS` units of
    ``span`` tokens (segments of the longest length, or windows). The study, ``retrofit``,
    ``diagnose`` and :func:`evaluate_length` resolve their defaults here."""
    return SEGMENTS * span if tokens is None else tokens


# Why fewer than MIN_SEGMENTS units are refused, in the words of an error.
_TOO_FEW = ("with 2 or 4 a nominal 95% interval held the text's value in 43-84% of draws, with 1 never; "
            "docs/study.md")


def check_fits(split: Tensor, longest: int, tokens: int | None, field: str, *, unit: int = 1, least: int = 1) -> None:
    """Before any work: :class:`ConfigError` on ``field`` (the setting that made ``longest``, the
    longest evaluation length) when the validation ``split`` cannot hold :data:`MIN_SEGMENTS` segments
    of it, and on ``eval_tokens`` when the budget ``tokens`` (None: the default, cut to what the split
    holds) scores fewer or exceeds the split (found otherwise only when that length comes up, after the shorter ones and
    any fine-tune were done; and an interval over fewer is no measure of the noise). The first refusal
    names the longest length that would fit among those the job takes, multiples of ``unit`` from
    ``least`` (a study's lengths are multiples of L; a diagnosis' and a retrofit's exceed L), or says
    that none does."""
    n_avail = split.numel() - 1
    if longest > n_avail:
        raise ConfigError(field, f"{longest} exceeds the validation split's {n_avail:,} scoreable tokens "
                                 "(a shorter length, or more data)")
    held = n_avail // longest
    if held < MIN_SEGMENTS:
        most = n_avail // MIN_SEGMENTS // unit * unit
        fix = (f"a length of at most {most:,}, or more validation text" if most >= least else
               f"more validation text: the shortest length this takes, {least:,}, needs {MIN_SEGMENTS * least:,} "
               "scoreable tokens")
        raise ConfigError(field, f"{longest}: the validation split's {n_avail:,} scoreable tokens hold {held} segment"
                                 f"{'' if held == 1 else 's'} of it, fewer than the {MIN_SEGMENTS} an interval needs "
                                 f"({_TOO_FEW}); {fix}")
    if tokens is None:  # the default: as many of SEGMENTS segments as the split holds (at least MIN_SEGMENTS)
        return
    if tokens > n_avail:  # scored as what fits, while its results named the count asked for
        default = f" ({SEGMENTS} segments of {longest} unless given)" if tokens == eval_budget(None, longest) else ""
        raise ConfigError("eval_tokens", f"{tokens:,}{default} exceed the validation split's {n_avail:,} scoreable "
                                         f"tokens; give {held * longest:,} or fewer ({held} segments of {longest}), "
                                         "shorter evaluation lengths or more data")
    check_segments(tokens, longest)


def check_segments(tokens: int, span: int) -> None:
    """:class:`ConfigError` on ``eval_tokens`` when ``tokens`` hold fewer than :data:`MIN_SEGMENTS`
    segments of ``span`` tokens (the longest evaluation length)."""
    count = tokens // span
    if count < MIN_SEGMENTS:
        raise ConfigError("eval_tokens", f"{tokens:,} scores {count} segment{'' if count == 1 else 's'} of {span}, "
                                         f"fewer than the {MIN_SEGMENTS} an interval needs ({_TOO_FEW}); "
                                         f"give {MIN_SEGMENTS * span:,} or more")


def _check_lengths(lengths: Iterable[int]) -> list[int]:
    out = []
    for n in lengths:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"evaluation lengths must be integers >= 1, got {n!r}")
        out.append(n)
    if not out:
        raise ValueError("give at least one evaluation length")
    return out


def _window_losses(model: TransformerLM, tokens: Tensor, starts: list[int], length: int, batch_size: int,
                   device: str | torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """``(starts, nll [batch, length])`` for windows of ``length`` tokens at ``starts``, batch by batch;
    raises ValueError on a non-finite loss (NaN weights are not a perplexity)."""
    for b in range(0, len(starts), batch_size):
        s = torch.tensor(starts[b:b + batch_size])
        chunk = tokens[s[:, None] + torch.arange(length + 1)[None, :]].long().to(device)
        logits = model(chunk[:, :-1])
        nll = F.cross_entropy(logits.float().transpose(1, 2), chunk[:, 1:], reduction="none").double().cpu()
        if not bool(torch.isfinite(nll).all()):
            raise ValueError(f"the model gives non-finite losses at length {length} (NaN/inf weights or activations)")
        yield s, nll


def spread_starts(n_avail: int, span: int, count: int, *, overlap: bool = False) -> list[int]:
    """Starts of ``count`` segments of ``span`` tokens spread evenly over a split of ``n_avail``
    scoreable tokens: the first at 0, the last ending at the split's end, none overlapping unless
    ``overlap`` (then a short split may hold them overlapped; diagnose's attention windows) (integer
    arithmetic: positions stay exact however long the split). ValueError if they do not fit."""
    if span < 1 or count < 1:
        raise ValueError(f"segments need span >= 1 and count >= 1, got span {span}, count {count}")
    if (span if overlap else count * span) > n_avail:
        raise ValueError(f"split has {n_avail} scoreable tokens, fewer than {1 if overlap else count} "
                         f"segment{'' if overlap else 's'} of {span}")
    if count == 1:
        return [0]
    return [k * (n_avail - span) // (count - 1) for k in range(count)]


@torch.no_grad()
def evaluate_length(model: TransformerLM, tokens: Tensor, length: int, *, max_tokens: int | None = None,
                    stride: int | None = None, span: int | None = None, batch_size: int = 8,
                    device: str | torch.device = "cpu") -> dict[str, Any]:
    """Loss/perplexity with windows of ``length`` tokens.

    ``stride=None``: non-overlapping windows (:func:`token_losses`) tiling segments of ``span``
    tokens (default ``length``; give every length of a comparison the same ``span``, a multiple of
    each, and they score the same tokens) spread over the split, every position in a window is
    scored, and the loss by position inside the window is returned. ``stride=s``: sliding windows
    advancing by ``s`` over the split's first ``max_tokens`` tokens (sliding needs contiguous text);
    each window scores only its last ``s`` tokens (the first scores all), so every scored token sees
    at least ``length − s`` tokens of context. ``max_tokens=None``: :data:`SEGMENTS` segments (or
    windows, sliding) of ``span`` (``length``), as many as the split holds; a ``max_tokens`` past the
    split is a ValueError (it was scored as what fitted). ``tokens`` in the result is what was scored.
    """
    (length,) = _check_lengths([length])
    if stride is not None and not 1 <= stride <= length:
        raise ValueError(f"stride must be in [1, {length}], got {stride}")
    n_avail = tokens.numel() - 1
    budget = min(eval_budget(max_tokens, span or length), n_avail)
    if n_avail < length:
        raise ValueError(f"split has {n_avail} scoreable tokens, fewer than the evaluation length {length}")
    if max_tokens is not None and max_tokens > n_avail:  # a count asked for is scored as asked, or refused
        raise ValueError(f"max_tokens={max_tokens:,} exceeds the split's {n_avail:,} scoreable tokens; give at most "
                         f"{n_avail:,} (or None: {SEGMENTS} segments, cut to what the split holds)")
    if budget < length:  # the split is long enough: the budget asked for is not
        raise ValueError(f"{max_tokens} evaluation tokens are fewer than the evaluation length {length}")
    if stride is None:
        span = length if span is None else span
        if budget < span:
            raise ValueError(f"{budget} evaluation tokens are fewer than one segment of {span}")
        nll = token_losses(model, tokens, length, n_tokens=budget // span * span, span=span, batch_size=batch_size,
                           device=device)
        loss = float(nll.mean())
        windows = nll.view(-1, length)
        return {"eval_len": length, "loss": loss, "ppl": math.exp(loss), "bpb": loss / math.log(2),
                "tokens": nll.numel(), "stride": None, "loss_by_position": windows.mean(0).tolist(),
                "window_loss": windows.mean(1).tolist()}  # per window: for paired comparisons (ratios_to_best)
    model.eval()
    total, count = 0.0, 0
    for s, nll in _window_losses(model, tokens, list(range(0, budget - length + 1, stride)), length, batch_size,
                                 device):
        for row, st in zip(nll, s.tolist()):
            keep = row if st == 0 else row[length - stride:]
            total += float(keep.sum())
            count += keep.numel()
    loss = total / count
    return {"eval_len": length, "loss": loss, "ppl": math.exp(loss), "bpb": loss / math.log(2),
            "tokens": count, "stride": stride}


@torch.no_grad()
def token_losses(model: TransformerLM, tokens: Tensor, length: int, *, n_tokens: int, span: int | None = None,
                 batch_size: int = 8, device: str | torch.device = "cpu") -> Tensor:
    """Per-token loss (nats, float64 ``[n_tokens]``) of ``n_tokens // span`` segments of ``span``
    tokens (default ``length``) spread evenly over ``tokens`` (:func:`spread_starts`), each predicted
    inside non-overlapping windows of ``length`` tokens that tile its segment: entry ``t`` sits at
    position ``t % length`` of its window, segment after segment. ``span`` must be a multiple of
    ``length`` and ``n_tokens`` a multiple of ``span``. Raises ValueError on a non-finite loss (NaN
    weights are not a perplexity)."""
    (length,) = _check_lengths([length])
    span = length if span is None else span
    if span % length or span < length:
        raise ValueError(f"the segment span {span} must be a positive multiple of the length {length}")
    if n_tokens % span or n_tokens < span:
        raise ValueError(f"n_tokens ({n_tokens}) must be a positive multiple of the segment span {span}")
    if tokens.numel() < n_tokens + 1:
        raise ValueError(f"split has {tokens.numel() - 1} scoreable tokens, fewer than {n_tokens}")
    model.eval()
    starts = [s + j for s in spread_starts(tokens.numel() - 1, span, n_tokens // span) for j in range(0, span, length)]
    out = torch.empty(n_tokens, dtype=torch.float64)
    done = 0
    for _, nll in _window_losses(model, tokens, starts, length, batch_size, device):
        out[done: done + nll.numel()] = nll.flatten()
        done += nll.numel()
    return out


def local_head(train_len: int) -> int:
    """How many tokens at the start of a window of ``train_len`` count as robbed of local context:
    ``L/8`` (at least 1). The study's ``far_delta`` and ``posbias diagnose``'s split leave them out."""
    return max(1, train_len // 8)


def check_study_lengths(lengths: Iterable[int], train_len: int) -> list[int]:
    """The sorted distinct evaluation lengths, if they include ``train_len`` and each is a multiple of
    it that divides the longest (so every length scores the same tokens); ValueError otherwise."""
    lengths = sorted(set(_check_lengths(lengths)))
    if train_len not in lengths:
        raise ValueError(f"the evaluation lengths {' '.join(map(str, lengths))} must include the training length "
                         f"{train_len}")
    for n in lengths:
        if lengths[-1] % n or n % train_len:
            raise ValueError(f"evaluation length {n} must divide the longest ({lengths[-1]}) and be a multiple of "
                             f"the training length ({train_len}), so that every length scores the same tokens")
    return lengths


def bootstrap_means(sums: Tensor, counts: Tensor, *, n_boot: int = N_BOOT, seed: int = 0) -> Tensor:
    """Percentile-bootstrap replicates of ratio-of-sums means. ``sums``/``counts`` are ``[S, m]``: S
    resampling units (text segments) by m statistics. Every replicate draws the *same* segments for
    all m columns, so differences and ratios between columns are paired. Returns ``[n_boot, m]``."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, sums.shape[0], (n_boot, sums.shape[0]), generator=g)
    return sums[idx].sum(1) / counts[idx].sum(1)


def interval(replicates: Tensor, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap replicates."""
    lo, hi = torch.quantile(replicates.double(), torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return float(lo), float(hi)


class Paired(NamedTuple):
    """One model against the best of a comparison: perplexity ratio, its paired 95% interval, with
    several seeds the ratio seed by seed (each seed against the best's same seed), and whether this
    model is the best (ratio and interval exactly 1)."""

    ratio: float
    lo: float
    hi: float
    per_seed: tuple[float, ...] = ()
    best: bool = False


def ratios_to_best(losses: Tensor, *, n_boot: int = N_BOOT, seed: int = 0) -> list[Paired]:
    """``losses`` ``[units, models]``: each model's mean loss (nats per token) on each resampling unit
    (a text segment or window; every unit the same number of tokens), all models scored on the same
    units. For every model, its perplexity as a ratio to the best's (lowest mean loss, flagged
    ``best``) with a 95% percentile-bootstrap interval in which each replicate resamples the *same*
    units for all models: paired, so the text's difficulty, shared by every model, cancels."""
    if losses.dim() != 2 or losses.shape[0] < 1 or losses.shape[1] < 1:
        raise ValueError(f"losses must be [units, models] with at least one of each, got {tuple(losses.shape)}")
    losses = losses.double()
    point = losses.mean(0)
    best = int(point.argmin())
    reps = bootstrap_means(losses, torch.ones_like(losses), n_boot=n_boot, seed=seed)
    out = []
    for j in range(losses.shape[1]):
        lo, hi = interval((reps[:, j] - reps[:, best]).exp())
        out.append(Paired(math.exp(float(point[j] - point[best])), lo, hi, best=j == best))
    return out


STUDY_COLUMNS = 5  # per length: all tokens; the tail and the same tokens at L; the tail past L/8, and at L


def _study_columns(nll: dict[int, Tensor], lengths: list[int], train_len: int,
                   segments: int) -> tuple[Tensor, Tensor]:
    """Per-segment loss sums and token counts ``[segments, STUDY_COLUMNS · len(lengths)]`` for
    :func:`length_study`: per length, every token; the last ``L`` tokens of each window and the same
    tokens scored in windows of ``L``; those tokens past their first ``L/8``, and the same at ``L``."""
    longest = lengths[-1]
    pos = torch.arange(segments * longest)
    seg = lambda x: x.view(segments, longest).sum(1)  # noqa: E731
    base = nll[train_len]
    head = local_head(train_len)
    cols_sum, cols_cnt = [], []
    for n in lengths:
        tail = ((pos % n) >= n - train_len).double()
        kept = ((pos % n) >= n - train_len + head).double()  # the tail past its first L/8 tokens
        cols_sum += [seg(nll[n]), seg(nll[n] * tail), seg(base * tail), seg(nll[n] * kept), seg(base * kept)]
        cols_cnt += [torch.full((segments,), float(longest), dtype=torch.float64), seg(tail), seg(tail),
                     seg(kept), seg(kept)]
    return torch.stack(cols_sum, 1), torch.stack(cols_cnt, 1)


def length_study(model: TransformerLM, tokens: Tensor, lengths: Iterable[int], *, train_len: int,
                 n_tokens: int, batch_size: int = 8, device: str | torch.device = "cpu", n_boot: int = N_BOOT,
                 seed: int = 0) -> dict[int, dict[str, Any]]:
    """Score the same ``n_tokens`` tokens at every length and summarise each length with intervals.

    The resampling unit of the bootstrap is a *segment* of ``max(lengths)`` tokens, the segments
    spread evenly over the split (:func:`spread_starts`), so the interval speaks for the split's text
    and not one stretch of it: every length scores every segment (its windows tile the segment), so
    one resample of segments serves all lengths and the ratio ``ppl@n / ppl@train_len`` gets a
    paired interval.

    Two views per length ``n``:

    * ``ppl``: every token of every window (non-overlapping windows; the average over context sizes
      0 … n−1). Mixes "uses more context" with "breaks past L".
    * ``tail``: only the last ``train_len`` tokens of each window, whose context is ``n − L … n − 1``
      tokens; ``tail_delta`` is their loss minus the loss of *the same tokens* scored in windows of
      ``train_len``. Negative: the longer context helps; positive: the model breaks past L.
    * ``far_delta``: the same, over the tail's tokens past its first ``L/8`` (:func:`local_head`).
      In windows of ``L`` those first tokens have almost no context, so ``tail_delta`` is mostly
      their local context coming back; the others keep at least ``L/8`` tokens of it either way,
      and for them Δ is what the distant keys themselves do (< 0: used, ≈ 0: ignored, > 0: they
      disturb the model).
    """
    lengths = check_study_lengths(lengths, train_len)
    longest = lengths[-1]
    segments = n_tokens // longest
    if segments < 1:
        raise ValueError(f"{n_tokens} evaluation tokens are fewer than the longest length {longest}")
    total = segments * longest
    nll = {n: token_losses(model, tokens, n, n_tokens=total, span=longest, batch_size=batch_size, device=device)
           for n in lengths}
    sums, counts = _study_columns(nll, lengths, train_len, segments)
    point = sums.sum(0) / counts.sum(0)
    reps = bootstrap_means(sums, counts, n_boot=n_boot, seed=seed)
    cols = STUDY_COLUMNS
    i_base = cols * lengths.index(train_len)
    out: dict[int, dict[str, Any]] = {}
    for k, n in enumerate(lengths):
        a, t, tb, f, fb = (cols * k + c for c in range(cols))
        ppl_lo, ppl_hi = interval(reps[:, a].exp())
        r_lo, r_hi = interval((reps[:, a] - reps[:, i_base]).exp())
        tail_lo, tail_hi = interval(reps[:, t].exp())
        d_lo, d_hi = interval(reps[:, t] - reps[:, tb])
        f_lo, f_hi = interval(reps[:, f] - reps[:, fb])
        loss = float(point[a])
        by_pos = nll[n].view(-1, n).mean(0)
        out[n] = {
            "eval_len": n, "loss": loss, "ppl": math.exp(loss), "ppl_lo": ppl_lo, "ppl_hi": ppl_hi,
            "bpb": loss / math.log(2), "ratio": math.exp(loss - float(point[i_base])), "ratio_lo": r_lo,
            "ratio_hi": r_hi, "tail_ppl": math.exp(float(point[t])), "tail_ppl_lo": tail_lo, "tail_ppl_hi": tail_hi,
            "tail_delta": float(point[t] - point[tb]), "tail_delta_lo": d_lo, "tail_delta_hi": d_hi,
            "far_delta": float(point[f] - point[fb]), "far_delta_lo": f_lo, "far_delta_hi": f_hi,
            "tokens": total, "windows": total // n, "segments": segments,
            # mean loss of each segment (nats per token): what a paired comparison between two models
            # scored on the same tokens resamples (posbias.report.study's paired table)
            "segment_loss": (sums[:, a] / longest).tolist(),
            "loss_by_position": by_pos.tolist() if n == longest else None,
        }
    return out


def evaluate_lengths(model: TransformerLM, tokens: Tensor, lengths: Iterable[int], *, progress: bool = False,
                     **kwargs: Any) -> list[dict[str, Any]]:
    lengths = _check_lengths(lengths)
    return [evaluate_length(model, tokens, n, **kwargs)
            for n in tqdm(lengths, desc="evaluate", disable=not progress, leave=False)]
