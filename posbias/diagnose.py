"""Why does a model (not) generalise to longer contexts? ``posbias diagnose CHECKPOINT``.

The report (``report.md`` + PNGs + ``diagnose.json``) has:

* **loss by position** in windows of ``length`` tokens, by ranges of ``L`` (the training length):
  a rise past ``L`` is the failure to extrapolate;
* **attention distance** per layer and head: the mean, median and 90th percentile of ``i − j``
  weighted by the attention probabilities, as a function of the query position. An over-local head
  keeps a small distance however far the query is; a head whose distance grows with the position is
  spreading attention over ever more keys (attention dilution);
* **the bias itself**: for T5, the share of query–key pairs at each length that fall into the
  final bucket (beyond ``max_distance`` every distance looks the same) and the learned table per
  head; for ALiBi, KERPLE, FIRE, T5 and offset the **effective reach** of each head — the distance
  at which the bias alone cuts attention by 100× (``bias(0) − bias(d) ≥ ln 100``);
* **passkey retrieval** (:mod:`posbias.passkey`): a copy of the model is fine-tuned on the task at
  ``L`` and tested at every length up to ``length`` and five depths.

Attention probabilities are recomputed with the dense reference math from the model's own q and k
(exact), a few windows at a time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from . import checkpoint as ckpt
from . import store
from . import passkey
from .attention import resolve
from .data import Corpus
from .schemes.base import flat_share
from .model import TransformerLM
from .schemes.t5 import T5Bias

REACH_DROP = math.log(100.0)


@torch.no_grad()
def attention_distance(model: TransformerLM, idx: Tensor, quantiles: tuple[float, ...] = (0.5, 0.9)) -> dict[str, Tensor]:
    """Attention-weighted distance ``i − j`` per layer, head and query position, averaged over the batch.

    Returns ``{"mean": [layers, heads, N], "q50": …, "q90": …}`` (one entry per quantile).
    """
    model.eval()
    b, n = idx.shape
    pos = torch.arange(n, device=idx.device)
    dist = (pos[:, None] - pos[None, :]).clamp(min=0).float()
    hidden = torch.ones(n, n, dtype=torch.bool, device=idx.device).tril().logical_not()
    x = model.embed(idx)
    absolute = model.scheme.embed(pos, model.cfg.d_model)
    if absolute is not None:
        x = x + absolute.to(x.dtype)
    out: dict[str, list[Tensor]] = {"mean": [], **{f"q{int(q * 100)}": [] for q in quantiles}}
    bias = model.scheme.bias(pos, pos)  # one scheme shared by every layer: one bias
    for block in model.blocks:
        att = block.attn
        q, k, v = att.qkv(block.ln1(x)).view(b, n, 3, att.n_heads, att.head_dim).permute(2, 0, 3, 1, 4)
        q, k, _, _, scale = resolve(q, k, v, model.scheme, q_pos=pos, k_pos=pos, scale=None)
        logits = scale * (q.float() @ k.float().transpose(-1, -2))
        if bias is not None:
            logits = logits + bias
        p = logits.masked_fill(hidden, float("-inf")).softmax(-1)  # [B, H, N, N]
        out["mean"].append((p * dist).sum(-1).mean(0))
        cum = p.flip(-1).cumsum(-1)  # index t ↔ key N−1−t, distance t − (N−1−i)
        offset = (n - 1 - pos).view(1, 1, n)
        for qn in quantiles:
            first = (cum >= qn).float().argmax(-1)  # [B, H, N]
            out[f"q{int(qn * 100)}"].append((first - offset).clamp(min=0).float().mean(0))
        x = block(x, model.scheme, pos)
    return {k: torch.stack(v) for k, v in out.items()}


@torch.no_grad()
def context_effect(model: TransformerLM, tokens: Tensor, length: int, short: int, *, windows: int,
                   device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """Per-position loss of the same tokens with the full ``length``-token context and with the
    context cut into chunks of ``short`` tokens (what the model sees at its training length).

    Returns ``(long, short)`` mean losses ``[length]`` over ``windows`` windows; their difference is
    what the extra context buys (< 0) or costs (> 0), free of the text's own difficulty.
    """
    from torch.nn import functional as F

    model.eval()
    n_avail = tokens.numel() - 1
    count = min(windows, n_avail // length)
    if count < 1:
        raise ValueError(f"the split has {n_avail} tokens, fewer than one window of {length}")
    long_sum = torch.zeros(length, dtype=torch.float64)
    short_sum = torch.zeros(length, dtype=torch.float64)
    for w in range(count):
        chunk = tokens[w * length: w * length + length + 1].long().to(device)
        x, y = chunk[:-1][None], chunk[1:][None]
        long_sum += F.cross_entropy(model(x)[0].float(), y[0], reduction="none").double().cpu()
        full = length - length % short  # whole chunks go through the model as one batch
        if full:
            logits = model(x[:, :full].reshape(-1, short)).flatten(0, 1)
            short_sum[:full] += F.cross_entropy(logits.float(), y[0, :full], reduction="none").double().cpu()
        if full < length:
            short_sum[full:] += F.cross_entropy(model(x[:, full:])[0].float(), y[0, full:],
                                                reduction="none").double().cpu()
    return long_sum / count, short_sum / count


def final_bucket_share(scheme: T5Bias, length: int) -> float:
    """Share of causal query–key pairs of a ``length``-token window that fall into T5's final bucket."""
    return flat_share(scheme.flat_beyond, length)


def final_bucket_weight(scheme: T5Bias, length: int, report: dict[str, Any]) -> list[str]:
    """Per head, how much the far keys (all in the final bucket) weigh against one key at distance 0,
    from the learned table alone: ``n_far · exp(u_final − u_0)`` for a query at the end of the window.
    Above 1 the far keys together outweigh the nearest key before q·k is counted (dilution); far
    below 1 the final bucket acts as a penalty. The sentence is measured, never assumed."""
    with torch.no_grad():
        near, far = scheme.bias_at(torch.tensor([0, scheme.flat_beyond])).unbind(-1)  # u(0), u(final): [H] each
        gap = near - far
    n_far = max(0, length - scheme.flat_beyond)
    weight = [n_far * math.exp(-float(g)) for g in gap]
    report["t5_final_bucket_gap"] = [float(g) for g in gap]
    report["t5_far_weight"] = weight
    rows = ["| head | u(0) − u(final), nats | far keys' weight vs. the nearest key |", "|---|---|---|"]
    rows += [f"| {h} | {float(g):+.2f} | {w:.3g} |" for h, (g, w) in enumerate(zip(gap, weight))]
    diluted = [h for h, w in enumerate(weight) if w > 1]
    verdict = (f"In head(s) {', '.join(map(str, diluted))} the {n_far} far keys together outweigh the nearest key on the "
               "bias alone: the final bucket does not separate near from far, and attention mass can drift to the many "
               "far keys (dilution)." if diluted else
               f"In every head the {n_far} far keys together weigh less than the nearest key on the bias alone: the final "
               "bucket acts as a penalty, not as a source of dilution.")
    return ["The final bucket's learned value against the bucket of distance 0, for a query at the end of the "
            f"{length}-token window:", ""] + rows + ["", verdict]


def effective_reach(scheme, *, query_pos: int, max_distance: int) -> list[int | None]:
    """Per head: the smallest distance ``d ≤ max_distance`` with ``bias(0) − bias(d) ≥ ln 100`` (None: never)."""
    from .plot import bias_versus_distance

    d = torch.arange(0, max_distance + 1)
    curve = bias_versus_distance(scheme, d, query_pos=query_pos)  # [H, D]
    if curve is None:
        return [None] * scheme.n_heads
    drop = curve[:, :1] - curve
    hits = drop >= REACH_DROP
    return [int(torch.nonzero(h)[0]) if bool(h.any()) else None for h in hits]


def _ranges(length: int, train_len: int) -> list[tuple[int, int]]:
    """[0, L), [L, 2L), [2L, 4L), … up to ``length``."""
    rows, s = [], 0
    while s < length:
        e = min(length, train_len if s == 0 else 2 * s)
        rows.append((s, e))
        s = e
    return rows


def run_diagnose(path: str | Path, out: str | Path, *, corpus: Corpus, length: int | None = None,
                 windows: int = 4, eval_tokens: int = 8192, passkey_steps: int = 600, passkey_samples: int = 24,
                 device: str = "cpu", progress: bool = True, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    meta = ckpt.read_meta(path)
    model = ckpt.load_model(path).to(device).eval()
    train_len = int(meta.get("train", {}).get("seq_len") or 0)
    if train_len < 1:
        raise ValueError(f"{str(path)!r} records no training length (meta 'train.seq_len')")
    length = length or 8 * train_len
    if length < 2:
        raise ValueError(f"--length must be >= 2, got {length}")
    out = store.check_out_dir(out)
    with store.FolderLock(out):
        return _run_diagnose(path, out, model, train_len, length, corpus, windows, eval_tokens, passkey_steps,
                             passkey_samples, device, progress, log)


def _run_diagnose(path, out: Path, model: TransformerLM, train_len: int, length: int, corpus: Corpus, windows: int,
                  eval_tokens: int, passkey_steps: int, passkey_samples: int, device: str, progress: bool,
                  log: Callable[[str], None]) -> dict[str, Any]:
    scheme = model.scheme
    report: dict[str, Any] = {"checkpoint": str(path), "scheme": model.cfg.scheme, "options": model.cfg.scheme_options,
                              "train_len": train_len, "length": length}
    lines = [f"# Diagnosis of `{path}`", "",
             f"Scheme **{model.cfg.scheme}** {model.cfg.scheme_options or ''}, trained at L = {train_len} tokens; "
             f"examined at {length} tokens ({length / train_len:g} L).", ""]

    # 1. loss by position: the same tokens with the full context and with the context cut at L
    log("loss by position …")
    windows_loss = max(1, max(eval_tokens, length) // length)
    long_loss, short_loss = context_effect(model, corpus.val, length, train_len, windows=windows_loss, device=device)
    report["loss_by_position"] = long_loss.tolist()
    report["loss_by_position_cut_at_L"] = short_loss.tolist()
    rows = _ranges(length, train_len)
    report["loss_by_range"] = [(f"{a}–{b - 1}", float(long_loss[a:b].mean()), float(short_loss[a:b].mean()))
                               for a, b in rows]
    total_long, total_short = float(long_loss.mean()), float(short_loss.mean())
    lines += ["## Loss by position", "",
              f"The same {windows_loss * length} validation bytes scored in {length}-token windows (full context) and with "
              f"the context cut into chunks of L = {train_len} (what the model saw in training). Δ < 0: the extra context "
              "helps; Δ > 0: it hurts.", "",
              "| positions | loss, full context | loss, context cut at L | Δ |", "|---|---|---|---|"]
    lines += [f"| {r} | {lo:.4f} | {sh:.4f} | {lo - sh:+.4f} |" for r, lo, sh in report["loss_by_range"]]
    lines += [f"| all | {total_long:.4f} | {total_short:.4f} | {total_long - total_short:+.4f} |", "",
              f"Perplexity {math.exp(total_long):.3f} with the full context vs {math.exp(total_short):.3f} cut at L: the "
              f"extra context {'hurts' if total_long > total_short + 0.005 else 'helps' if total_long < total_short - 0.005 else 'changes little'}.",
              "", "![loss by position](loss_by_position.png)", ""]

    # 2. attention distance
    log("attention distance per layer and head …")
    windows = max(1, windows)
    starts = torch.linspace(0, corpus.val.numel() - length - 1, windows).long()
    idx = torch.stack([corpus.val[s:s + length] for s in starts]).long().to(device)
    ad = attention_distance(model, idx)
    report["attention_distance"] = {k: v.tolist() for k, v in ad.items()}
    lines += ["## Attention distance", "",
              f"Attention-weighted distance i − j at the last {length // 4} query positions (uniform attention over "
              f"all earlier keys would give a mean of about {3 * length / 8:.0f}; a head that attended only to keys within L "
              f"would stay below {train_len}).", "",
              "| layer | head | mean | median | 90th pct | at query ≈ L: mean |", "|---|---|---|---|---|---|"]
    tail = slice(length - length // 4, length)
    at_l = slice(max(0, train_len - 8), min(length, train_len + 8))
    for layer in range(ad["mean"].shape[0]):
        for h in range(ad["mean"].shape[1]):
            lines.append(f"| {layer} | {h} | {ad['mean'][layer, h, tail].mean():.1f} | {ad['q50'][layer, h, tail].mean():.1f} | "
                         f"{ad['q90'][layer, h, tail].mean():.1f} | {ad['mean'][layer, h, at_l].mean():.1f} |")
    lines += ["", "![attention distance](attention_distance.png)", ""]

    # 3. the bias
    if model.cfg.scheme == "t5":
        lens = [n for n in (train_len, 2 * train_len, 4 * train_len, 8 * train_len, 16 * train_len) if n <= length]
        lens = sorted(set(lens + [length]))
        shares = {n: final_bucket_share(scheme, n) for n in lens}
        report["t5_final_bucket_share"] = shares
        lines += ["## T5 buckets", "",
                  f"{scheme.num_buckets} buckets, max_distance {scheme.max_distance}: the final bucket starts at distance "
                  f"{scheme.flat_beyond}. Share of causal query–key pairs in the final bucket:", "",
                  "| window | share in final bucket |", "|---|---|"] + [f"| {n} | {s:.1%} |" for n, s in shares.items()]
        lines += [""] + final_bucket_weight(scheme, length, report) + [""]
    if scheme.family == "additive":
        reach = effective_reach(scheme, query_pos=length - 1, max_distance=16 * length)
        report["effective_reach"] = reach
        lines += ["## Effective reach of the bias", "",
                  f"Distance at which the bias alone cuts attention by 100× (query at position {length - 1}; "
                  f"'never' = not within {16 * length}):", "",
                  "| head | reach |", "|---|---|"] + [f"| {h} | {r if r is not None else 'never'} |" for h, r in enumerate(reach)]
        lines += ["", "![bias](bias_vs_distance.png)", ""]

    # 4. passkey
    if passkey_steps > 0 and train_len >= passkey.overhead(5):
        log(f"passkey: fine-tuning a copy for {passkey_steps} steps at {train_len} …")
        copy = TransformerLM(model.cfg).to(device)
        copy.load_state_dict(model.state_dict())
        passkey.train_passkey(copy, length=train_len, steps=passkey_steps, device=device, progress=progress)
        lens, n = [], train_len
        while n <= length:
            lens.append(n)
            n *= 2
        depths = passkey.default_depths(5)
        log(f"passkey grid: {len(lens)} lengths × {len(depths)} depths × {passkey_samples} samples …")
        grid = passkey.accuracy_grid(copy, lens, depths, samples=passkey_samples, device=device, progress=progress)
        report["passkey"] = {str(n): {str(d): a for d, a in row.items()} for n, row in grid.items()}
        lines += ["## Passkey retrieval", "",
                  f"A copy fine-tuned for {passkey_steps} steps on passkey samples of {train_len} bytes; accuracy over "
                  f"{passkey_samples} samples per cell (depth 0 = key at the start of the window):", "",
                  "| length | " + " | ".join(f"depth {d}" for d in depths) + " | mean |", "|---" * (len(depths) + 2) + "|"]
        for n, row in grid.items():
            lines.append(f"| {n} | " + " | ".join(f"{row[d]:.2f}" for d in depths) + f" | {passkey.mean_accuracy(grid, n):.2f} |")
        lines += ["", "![passkey](passkey.png)", ""]
    elif passkey_steps > 0:
        lines += ["## Passkey retrieval", "", f"Skipped: the training length {train_len} is shorter than a passkey "
                  f"sample ({passkey.overhead(5)} bytes).", ""]

    store.write_json(out / "diagnose.json", report)
    store.write_text(out / "report.md", "\n".join(lines))
    try:
        _plots(report, model, out)
    except ValueError as exc:  # matplotlib missing: the report and JSON are still written
        log(f"plots skipped: {exc}")
    return report


def _plots(report: dict[str, Any], model: TransformerLM, out: Path) -> None:
    from .plot import _pyplot, _save, plot_bias_curves

    plt = _pyplot()
    L, n = report["train_len"], report["length"]
    k = max(1, n // 64)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss_by_position", "full context"), ("loss_by_position_cut_at_L", f"context cut at L = {L}")):
        losses = torch.tensor(report[key])
        smooth = torch.nn.functional.avg_pool1d(losses[None, None], k, k)[0, 0] if k > 1 else losses
        ax.plot((torch.arange(len(smooth)) * k + k / 2).numpy(), smooth.numpy(), label=label)
    ax.axvline(L, color="grey", ls="--", lw=1, label=f"training length {L}")
    ax.set_xlabel("position in the window")
    ax.set_ylabel("loss (nats/byte)")
    ax.set_title(f"{report['scheme']}: loss by position")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, out / "loss_by_position.png")

    mean = torch.tensor(report["attention_distance"]["mean"])
    layers = mean.shape[0]
    fig, axes = plt.subplots(1, layers, figsize=(3.2 * layers, 3.2), squeeze=False, sharey=True)
    x = torch.arange(n)
    for layer in range(layers):
        ax = axes[0, layer]
        for h in range(mean.shape[1]):
            ax.plot(x.numpy(), mean[layer, h].numpy(), lw=1, label=f"head {h}")
        ax.plot(x.numpy(), (x / 2).numpy(), color="grey", ls=":", lw=1, label="uniform")
        ax.axvline(L, color="grey", ls="--", lw=1)
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("query position")
    axes[0, 0].set_ylabel("mean attention distance i − j")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{report['scheme']}: how far each head looks", y=1.0)
    fig.tight_layout(rect=(0, 0, 1, 0.95))  # room for the figure title above the panel titles
    _save(fig, out / "attention_distance.png")

    if model.scheme.family == "additive":
        plot_bias_curves([model.scheme], out / "bias_vs_distance.png", max_distance=n,
                         title=f"learned/fixed bias per head ({report['scheme']})")

    if "passkey" in report:
        grid = report["passkey"]
        lens = list(grid)
        depths = list(grid[lens[0]])
        data = [[grid[m][d] for d in depths] for m in lens]
        fig, ax = plt.subplots(figsize=(6, 0.5 * len(lens) + 2))
        im = ax.imshow(data, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(depths)), depths)
        ax.set_yticks(range(len(lens)), lens)
        ax.set_xlabel("depth of the key (0 = start of the window)")
        ax.set_ylabel("context length")
        for i, row in enumerate(data):
            for j, a in enumerate(row):
                ax.text(j, i, f"{a:.2f}", ha="center", va="center", color="white" if a < 0.6 else "black", fontsize=8)
        fig.colorbar(im, ax=ax, label="accuracy")
        ax.set_title(f"{report['scheme']}: passkey retrieval (trained at {L})")
        _save(fig, out / "passkey.png")


# -- CLI glue ---------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("checkpoint", help="a posbias checkpoint folder")
    p.add_argument("--length", type=int, help="window examined (default 8 × the training length)")
    p.add_argument("--windows", type=int, default=4, help="validation windows for the attention statistics")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--passkey-steps", type=int, default=600, help="0 skips the passkey test")
    p.add_argument("--passkey-samples", type=int, default=24)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", help="a local text file or folder instead of the embedded default")
    p.add_argument("--out", help="default: runs/diagnose-<checkpoint name>")
    p.add_argument("--quiet", action="store_true")


def run_from_args(args, say: Callable[[str], None] = print) -> None:
    import time

    from .data import load_corpus

    ckpt.require(args.checkpoint)
    for flag in ("windows", "eval_tokens", "passkey_samples"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.passkey_steps < 0:
        raise ValueError(f"--passkey-steps must be >= 0, got {args.passkey_steps}")
    out = Path(args.out or f"runs/diagnose-{Path(args.checkpoint).resolve().parent.name}")
    t0 = time.perf_counter()
    run_diagnose(args.checkpoint, out, corpus=load_corpus(args.data), length=args.length, windows=args.windows,
                 eval_tokens=args.eval_tokens, passkey_steps=args.passkey_steps, passkey_samples=args.passkey_samples,
                 device=args.device, progress=not args.quiet, log=say)
    say(f"done in {time.perf_counter() - t0:.0f} s; report {out / 'report.md'}")
