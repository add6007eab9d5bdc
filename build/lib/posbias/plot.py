"""Pictures of the schemes: bucket maps, bias heatmaps, bias-versus-distance curves, T5 vs ALiBi, and
the wavelengths of rotary schemes (what a long-context scaling does to each frequency pair).

matplotlib is imported inside the functions (it is the ``plot`` extra); every function writes one
PNG and returns its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from . import store
from .schemes import Scheme, ToeplitzScheme, t5_bucket
from .schemes.t5 import check_t5


def pyplot():
    """matplotlib's pyplot on the Agg backend, or ValueError naming the extra to install."""
    try:
        import matplotlib
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise ValueError("plotting needs matplotlib: pip install 'posbias[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` (folders created; atomically, :func:`posbias.store.replacing`), close it,
    return the path."""
    path = Path(path)
    import matplotlib.pyplot as plt

    try:
        with store.replacing(path) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path


def plot_bucket_map(path: str | Path, *, num_buckets: int = 32, max_distance: int = 128,
                    bidirectional: bool = False, span: int | None = None) -> Path:
    """Bucket index against offset ``i − j``: one-to-one, then logarithmic, then the final bucket."""
    check_t5(num_buckets, max_distance, bidirectional)
    plt = pyplot()
    span = span or 2 * max_distance
    lo = -span if bidirectional else 0
    off = torch.arange(lo, span + 1)
    b = t5_bucket(off, num_buckets=num_buckets, max_distance=max_distance, bidirectional=bidirectional)
    per_dir = num_buckets // 2 if bidirectional else num_buckets
    exact = per_dir // 2
    fig, ax = plt.subplots(figsize=(8, 4.2))
    ax.step(off.numpy(), b.numpy(), where="post", color="tab:blue", lw=1.6, label="bucket b(i−j)")
    ax.axvspan(0, exact, color="tab:green", alpha=0.12, label=f"one-to-one (offsets < {exact})")
    ax.axvline(max_distance, color="tab:red", ls="--", lw=1, label=f"max_distance = {max_distance}")
    if bidirectional:
        ax.axvspan(-exact, 0, color="tab:green", alpha=0.12)
        ax.axvline(-max_distance, color="tab:red", ls="--", lw=1)
    ax.set_xlabel("offset i − j (query minus key)")
    ax.set_ylabel("bucket index")
    kind = "bidirectional" if bidirectional else "causal"
    ax.set_title(f"T5 bucket map ({kind}): num_buckets = {num_buckets} (n_b + 1), max_distance = {max_distance}")
    ax.set_yticks(range(0, num_buckets, max(1, num_buckets // 8)))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right" if not bidirectional else "upper left", fontsize=8)
    return save_figure(fig, path)


def _causal_view(bias: torch.Tensor) -> torch.Tensor:
    n = bias.shape[-1]
    masked = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    return bias.masked_fill(masked, float("nan"))


#: positions a heatmap draws per axis at most: a panel is about 330 pixels wide at the figures' dpi, so
#: more only cost time and memory (8 heads at 2,048 tokens took 52 s and 1.5 GB; 100,000 could not allocate)
HEATMAP_POSITIONS = 512


def heatmap_positions(length: int) -> torch.Tensor:
    """The positions a ``length``-token heatmap draws: all of them up to :data:`HEATMAP_POSITIONS`, else
    that many spread evenly from 0 to ``length − 1`` (increasing, both ends included), each pixel the
    exact bias of its pair."""
    if length <= HEATMAP_POSITIONS:
        return torch.arange(length)
    return torch.linspace(0, length - 1, HEATMAP_POSITIONS, dtype=torch.float64).round().long()


def plot_bias_heatmaps(scheme: Scheme, path: str | Path, *, length: int = 64, causal: bool = True,
                       max_heads: int = 8, note: str = "") -> Path:
    """Per-head ``[length, length]`` heatmaps of ``PE(i, j)`` on **one colour scale** for the whole
    figure (so heads with different slopes look different); masked pairs are left blank. Past
    :data:`HEATMAP_POSITIONS` tokens the rows and columns are evenly spaced positions
    (:func:`heatmap_positions`), the axes in true positions."""
    plt = pyplot()
    pos = heatmap_positions(length)
    with torch.no_grad():
        bias = scheme.bias(pos, pos)
    if bias is None:
        raise ValueError(f"scheme {scheme.name!r} adds no attention bias (family {scheme.family!r})")
    bias = bias.float().cpu()
    if causal:
        bias = _causal_view(bias)
    heads = min(scheme.n_heads, max_heads)
    cols = min(4, heads)
    rows = (heads + cols - 1) // cols
    shown = bias[:heads]
    finite = shown[torch.isfinite(shown)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.0 * rows), squeeze=False)
    thousands = None
    if length >= 10_000:  # 25000 50000 75000 run into each other under a 3-inch panel
        from matplotlib.ticker import FuncFormatter, MaxNLocator

        thousands = FuncFormatter(lambda v, _: f"{v / 1000:g}k")
    im = None
    for h in range(rows * cols):
        ax = axes[h // cols][h % cols]
        if h >= heads:
            ax.axis("off")
            continue
        im = ax.imshow(shown[h].numpy(), cmap="viridis", interpolation="nearest", vmin=vmin, vmax=vmax,
                       extent=(-0.5, length - 0.5, length - 0.5, -0.5))
        if thousands is not None:
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_locator(MaxNLocator(4))
                axis.set_major_formatter(thousands)
        ax.set_title(f"head {h}", fontsize=9)
        ax.set_xlabel("key j", fontsize=8)
        ax.set_ylabel("query i", fontsize=8)
    drawn = "" if len(pos) == length else f", {len(pos)} positions drawn per axis"
    fig.suptitle(f"{scheme.name}: bias PE(i, j) per head ({length} tokens{drawn}){note}")
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    cax = fig.add_axes((0.92, 0.15, 0.015, 0.7))
    fig.colorbar(im, cax=cax, label="bias (one scale for all heads)")
    return save_figure(fig, path)


def plain_log_ticks(ax, axis: str = "y") -> None:
    """Plain numbers (6, 8, 10, 20) on a log axis instead of 6×10⁰, readable at small ranges too."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    target = ax.yaxis if axis == "y" else ax.xaxis
    lo, hi = ax.get_ylim() if axis == "y" else ax.get_xlim()
    span = hi / lo if lo > 0 else 100.0
    # under a factor of 3 (a typical perplexity range) every integer mantissa gets a tick
    subs = tuple(range(1, 10)) if span < 3 else (1.0, 2.0, 3.0, 5.0)
    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    target.set_major_locator(LogLocator(base=10, subs=subs))
    target.set_major_formatter(fmt)
    target.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def plot_bias_curves(schemes: Sequence[Scheme], path: str | Path, *, max_distance: int = 512,
                     title: str = "bias versus distance", names: Sequence[str] | None = None,
                     log_distance: bool = False, trained: int | Sequence[int | None] | None = None) -> Path:
    """One panel per scheme, one line per head: ``PE`` against the distance ``i − j`` (``log_distance``:
    symlog axis, so distances 0–64 are not squeezed into a corner of a linear axis to 1024). A
    bidirectional scheme (a T5 encoder) is drawn over ``−max_distance … max_distance``: keys after the
    query (``i − j < 0``) have buckets of their own. ``trained``: the training length L (one for all, or
    one per scheme, None where unknown); distances ≥ L, which no training pair had, are shaded."""
    plt = pyplot()
    keep = [n for n, s in enumerate(schemes) if s.family == "additive"]
    lens = [trained] * len(schemes) if trained is None or isinstance(trained, int) else list(trained)
    names, lens = [(names[n] if names else schemes[n].name) for n in keep], [lens[n] for n in keep]
    schemes = [schemes[n] for n in keep]
    if not schemes:
        raise ValueError("no additive scheme to plot")
    cols = min(3, len(schemes))
    rows = (len(schemes) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    for n, s in enumerate(schemes):
        ax = axes[n // cols][n % cols]
        d = torch.arange(-max_distance if getattr(s, "bidirectional", False) else 0, max_distance + 1)
        b = s.bias_by_distance(d)
        cmap = plt.get_cmap("plasma")
        for h in range(b.shape[0]):
            ax.plot(d.numpy(), b[h].numpy(), color=cmap(h / max(1, b.shape[0] - 1) * 0.9), lw=1.2,
                    label=f"head {h}" if b.shape[0] <= 8 else None)
        # a bias that reads the query's position too (FIRE) is drawn for one query: the one at the largest distance
        ax.set_title(names[n] + ("" if isinstance(s, ToeplitzScheme) else f" (query at position {max_distance})"),
                     fontsize=10)
        if lens[n] is not None and lens[n] <= max_distance:
            _shade_unseen(ax, lens[n], max_distance, bool(d[0] < 0))
        if log_distance:
            ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("distance i − j" + (" (log scale)" if log_distance else "")
                      + ("; < 0: keys after the query" if d[0] < 0 else ""))
        ax.set_ylabel("bias")
        ax.grid(alpha=0.3)
        if n == 0 and b.shape[0] <= 8:
            ax.legend(fontsize=6, ncol=2)
    for n in range(len(schemes), rows * cols):
        axes[n // cols][n % cols].axis("off")
    shaded = sorted({n for n in lens if n is not None and n <= max_distance})
    if shaded:
        at = f"L = {shaded[0]}" if len(shaded) == 1 else "each model's L"
        title += f"\nshaded: distances ≥ {at}, which no training pair had"
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def _shade_unseen(ax: Any, train_len: int, max_distance: int, both: bool) -> None:
    """Grey over the distances ≥ ``train_len`` (both signs for a bidirectional panel): no training pair had
    them, so what is drawn there was never fitted to data."""
    ax.axvspan(train_len, max_distance, color="grey", alpha=0.12, lw=0)
    if both:
        ax.axvspan(-max_distance, -train_len, color="grey", alpha=0.12, lw=0)


def plot_rotary_wavelengths(schemes: Sequence[Scheme], path: str | Path, *, names: Sequence[str] | None = None,
                            trained: Sequence[int | None] | None = None) -> Path:
    """The wavelength ``2π/θ'_k`` (tokens, log axis) of every frequency pair of each rotary scheme, with
    plain RoPE of each base and head size as a dashed reference: where a scaling stretches a pair and by
    how much (PI: all by the factor; NTK: the lowest by the factor, the highest not at all; YaRN: a ramp).
    Dynamic NTK is drawn at a context of ``factor · train_len`` (:meth:`RoPE.describe`). A scheme's
    ``train_len`` (or its length in ``trained``, one per scheme: a checkpoint's recorded L) is a horizontal
    line: pairs above it turn less than once over the trained distances."""
    from .schemes.rope import RoPE, rope_frequencies

    plt = pyplot()
    keep = [(names[n] if names else s.name, s, (trained[n] if trained else None) or s.train_len)
            for n, s in enumerate(schemes) if isinstance(s, RoPE)]
    if not keep:
        raise ValueError("no rotary scheme to plot")
    fig, (ax, stretch) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    plain_drawn, lens = set(), set()
    colors = plt.get_cmap("tab10")
    for n, (label, s, length) in enumerate(keep):
        if length:
            lens.add(length)
        k = torch.arange(s.head_dim // 2)
        plain = rope_frequencies(s.head_dim, s.base)
        if (s.base, s.head_dim) not in plain_drawn:
            plain_drawn.add((s.base, s.head_dim))
            unscaled = [name for name, r, _ in keep if (r.base, r.head_dim) == (s.base, s.head_dim)
                        and r.scaling is None]
            ax.plot(k.numpy(), (2 * torch.pi / plain).numpy(), color="k", lw=1,
                    ls=("--", ":", "-.", (0, (5, 1, 1, 1)))[(len(plain_drawn) - 1) % 4],
                    label=f"plain RoPE (base {s.base:g}, {s.head_dim // 2} pairs)"
                          + (f": {', '.join(unscaled)}" if unscaled else ""))
        if s.scaling is None:  # (factor does nothing without a scaling): the plain line, which names it
            continue
        target = s.shown_context
        at = f" at {target} tokens" if target else ""
        used = s.effective_frequencies(target)
        ax.plot(k.numpy(), (2 * torch.pi / used).numpy(), color=colors(n % 10), lw=1.6, label=f"{label}{at}")
        stretch.plot(k.numpy(), (plain / used).numpy(), color=colors(n % 10), lw=1.6)
    stretch.axhline(1.0, color="k", ls="--", lw=1)
    stretch.set_xlabel("frequency pair k")
    stretch.set_ylabel("stretch θ_k / θ′_k (1: the pair as trained)")
    stretch.set_title("how much each pair is slowed")
    stretch.grid(alpha=0.3)
    for length in sorted(lens):
        ax.axhline(length, color="grey", lw=0.8, ls=":")
        ax.text(0, length, f" L = {length}: pairs above turn < once in training", fontsize=7, va="bottom",
                color="dimgrey")
    ax.set_yscale("log")
    ax.set_xlabel("frequency pair k (θ_k = base^(−2k/d))")
    ax.set_ylabel("wavelength 2π/θ′_k (tokens)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title("rotary wavelengths: what each scaling stretches")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_t5_vs_alibi(path: str | Path, *, length: int = 16, num_buckets: int = 8, max_distance: int = 12,
                     slope: float = 0.5) -> Path:
    """The textbook's side-by-side: which T5 parameter ``u_b`` each pair uses, and ALiBi's penalty."""
    plt = pyplot()
    pos = torch.arange(length)
    off = pos[:, None] - pos[None, :]
    buckets = _causal_view(t5_bucket(off, num_buckets=num_buckets, max_distance=max_distance).float()[None])[0]
    alibi = _causal_view((-slope * off.float())[None])[0]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 5))
    im1 = a1.imshow(buckets.numpy(), cmap="tab20", interpolation="nearest", vmin=0, vmax=19)
    im2 = a2.imshow(alibi.numpy(), cmap="magma", interpolation="nearest")
    show_text = length <= 16
    for i in range(length):
        for j in range(i + 1):
            if show_text:
                a1.text(j, i, f"u{int(buckets[i, j])}", ha="center", va="center", fontsize=6)
                a2.text(j, i, f"{alibi[i, j]:.1f}".replace("-0.0", "0"), ha="center", va="center",
                        fontsize=6, color="white" if alibi[i, j] < alibi.nanmean() else "black")
    a1.set_title(f"T5: pair (i, j) uses u_b(i−j)\nnum_buckets={num_buckets}, max_distance={max_distance}")
    a2.set_title(f"ALiBi: −m·(i−j), m = {slope}")
    for ax in (a1, a2):
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
    fig.colorbar(im1, ax=a1, fraction=0.046, pad=0.04, label="bucket")
    fig.colorbar(im2, ax=a2, fraction=0.046, pad=0.04, label="bias")
    fig.suptitle("T5 bucketed bias (learned, shared per bucket) vs ALiBi (fixed linear penalty)")
    fig.tight_layout()
    return save_figure(fig, path)
