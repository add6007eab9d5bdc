"""Rotary position embedding (Su et al. 2021) and its long-context scalings.

``θ_k = b^{−2(k−1)/d}``, k = 1..d/2, base ``b = 10000``. q and k are rotated by their positions, so
``q_i·k_j`` depends on ``i − j`` only. Channel layout: ``layout="half"`` (default) pairs channel ``k``
with ``k + d/2`` as HuggingFace's ``rotate_half`` does; ``layout="interleaved"`` pairs ``2k`` with
``2k+1`` as the RoFormer paper writes it. Both give the same attention for matching q/k layouts.

Scalings (``scaling=``), with ``factor = m / m_l`` (target over trained length ``train_len``):

* ``"pi"`` position interpolation (Chen et al. 2023): positions × ``1/factor``;
* ``"ntk"`` base scaling: ``θ'_k = (λb)^{−2(k−1)/d}``, ``λ = factor^{d/(d−2)}`` — the highest
  frequency is untouched and the lowest is stretched by exactly ``factor``;
* ``"dynamic-ntk"``: NTK with ``factor`` growing with the context: for a context of ``n > m_l``
  tokens the base is ``b · (factor·n/m_l − (factor − 1))^{d/(d−2)}`` (HuggingFace's rule); plain
  RoPE up to ``m_l``. The frequencies depend on the whole context length, so posbias rotates the
  (cached, unrotated) keys with the current length at every step. For **one** attention layer this
  makes cached decoding equal to a full forward over the same inputs. With more layers it does not:
  the cache holds keys and values computed by earlier layers when the context was shorter (other
  frequencies), while a full forward recomputes them at the final length; past ``m_l`` the last
  token's output then differs (about 1e-2 for a 2-layer model, tested);
* ``"yarn"`` (Peng et al. 2023): per-frequency blend of interpolation and extrapolation with a
  linear ramp between ``beta_fast = 32`` and ``beta_slow = 1`` rotations over ``m_l``, and
  attention temperature ``(0.1 ln factor + 1)`` applied to both q and k.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..positions import consecutive, first
from .base import Scheme, check_int, check_positive

SCALINGS = (None, "pi", "ntk", "dynamic-ntk", "yarn")
LAYOUTS = ("half", "interleaved")


def rope_frequencies(head_dim: int, base: float = 10000.0) -> Tensor:
    """Inverse frequencies ``θ_k = base^{−2(k−1)/d}``, float64 ``[head_dim/2]``."""
    return base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def ntk_lambda(factor: float, head_dim: int) -> float:
    """Base multiplier of NTK-aware scaling: ``λ = factor^{d/(d−2)}``."""
    return factor ** (head_dim / (head_dim - 2))


def yarn_frequencies(head_dim: int, base: float, factor: float, train_len: int,
                     beta_fast: float = 32.0, beta_slow: float = 1.0) -> Tensor:
    """YaRN's blended inverse frequencies (float64): interpolate low frequencies, keep high ones."""
    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(train_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the frequency (fast dims), 0: interpolate (slow dims)
    inv = rope_frequencies(head_dim, base)
    return inv / factor * (1 - extrapolate) + inv * extrapolate


class RoPE(Scheme):
    name = "rope"
    family = "rotary"
    summary = "rotary embedding of q and k (base 10000); scalings: pi, ntk, dynamic-ntk, yarn"
    paper = "Su et al. 2021, RoFormer; Chen et al. 2023 (PI); Peng et al. 2023 (YaRN)"

    def __init__(
        self,
        *,
        n_heads: int,
        head_dim: int,
        base: float = 10000.0,
        layout: str = "half",
        scaling: str | None = None,
        factor: float = 1.0,
        train_len: int | None = None,
    ) -> None:
        super().__init__(n_heads=n_heads, head_dim=head_dim)
        if head_dim % 2 or head_dim < 4:
            raise ValueError(f"rope needs an even head_dim >= 4, got {head_dim}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
        self.base = check_positive("base", base)
        if self.base <= 1:  # θ_k = base^(−2(k−1)/d) must fall with k: at or below 1 no pair turns slower than
            # one radian per token (base=1e-4 for 10⁴, say), and the long-context scalings have no slow pairs to scale
            raise ValueError(f"base must be > 1 (only then does θ_k = b^(−2(k−1)/d) fall with k; 10000 is usual), "
                             f"got {base!r}")
        self.factor = check_positive("factor", factor)
        if scaling is not None and self.factor < 1:
            raise ValueError(f"factor (target length / trained length) must be >= 1, got {factor}")
        if scaling in ("dynamic-ntk", "yarn"):
            if train_len is None:
                raise ValueError(f"scaling={scaling!r} needs train_len (the trained context length)")
            check_int("train_len", train_len, minimum=1)
        self.layout = layout
        self.scaling = scaling
        self.train_len = train_len
        self.register_buffer("inv_freq", self._static_inv_freq().float(), persistent=False)
        self._table: tuple | None = None  # (key, frequencies, first position, cos, sin): see _cos_sin

    def _static_inv_freq(self) -> Tensor:
        d = self.head_dim
        if self.scaling == "ntk":
            return rope_frequencies(d, self.base * ntk_lambda(self.factor, d))
        if self.scaling == "yarn":
            return yarn_frequencies(d, self.base, self.factor, self.train_len)  # type: ignore[arg-type]
        return rope_frequencies(d, self.base)

    def inv_frequencies(self, context_len: int | None = None) -> Tensor:
        """The ``head_dim/2`` angular frequencies in use for a context of ``context_len`` tokens."""
        if self.scaling == "dynamic-ntk" and context_len is not None and context_len > self.train_len:
            f = self.factor * context_len / self.train_len - (self.factor - 1)
            return rope_frequencies(self.head_dim, self.base * ntk_lambda(f, self.head_dim)).float().to(
                self.inv_freq.device)
        return self.inv_freq

    def effective_frequencies(self, context_len: int | None = None) -> Tensor:
        """The frequencies a distance ``i − j`` turns by, float64 ``[head_dim/2]``: :meth:`inv_frequencies`
        with PI's position factor folded in (PI divides the positions, the same as dividing θ_k)."""
        return self.inv_frequencies(context_len).double() / (self.factor if self.scaling == "pi" else 1.0)

    @property
    def shown_context(self) -> int | None:
        """The context length at which ``show`` and the wavelength plot give the frequencies in use: dynamic
        NTK's depend on it, and are shown at ``factor · train_len``; None for the others, which do not."""
        return round(self.factor * self.train_len) if self.scaling == "dynamic-ntk" else None

    def describe(self, query_pos: int | None = None) -> list[str]:
        """``posbias show rope``: per frequency pair its θ_k and wavelength, with a scaling the scaled ones
        and how much each is stretched, and with ``train_len`` the turns each makes within it (a pair
        under one turn meets angles past L that no distance of training gave it)."""
        pairs = self.head_dim // 2
        shown = list(range(pairs)) if pairs <= 16 else sorted({round(i * (pairs - 1) / 7) for i in range(8)})
        plain = rope_frequencies(self.head_dim, self.base)
        target = self.shown_context
        used = self.effective_frequencies(target)
        lines = [f"rotary pairs: θ_k = {self.base:g}^(−2k/{self.head_dim}), k = 0 … {pairs - 1} "
                 f"({'all' if len(shown) == pairs else f'{len(shown)} of {pairs}'} shown); a distance i − j "
                 "turns pair k by θ_k·(i − j), a full turn every wavelength 2π/θ_k tokens"]
        head = f"{'pair':>5} {'θ_k':>11} {'wavelength':>12}"
        if self.scaling:
            at = (f" at a context of factor · train_len = {target} (plain RoPE up to {self.train_len})"
                  if self.scaling == "dynamic-ntk" else "")
            lines.append(f"{self.scaling} with factor {self.factor:g}{at}: θ'_k, its wavelength, and the stretch θ_k/θ'_k")
            head += f" {'θ′_k':>11} {'wavelength′':>12} {'stretch':>8}"
        if self.train_len:
            head += f" {'turns in ' + str(self.train_len):>14}"
        lines.append(head)
        for k in shown:
            row = f"{k:>5} {plain[k]:>11.4g} {_tokens(2 * math.pi / plain[k]):>12}"
            if self.scaling:
                row += f" {used[k]:>11.4g} {_tokens(2 * math.pi / used[k]):>12} {plain[k] / used[k]:>8.3f}"
            if self.train_len:
                turns = float(plain[k]) * self.train_len / (2 * math.pi)
                row += f" {turns:>14.4g}" + ("  < 1 turn" if turns < 1 else "")
            lines.append(row)
        if self.train_len:
            under = int((plain * self.train_len < 2 * math.pi).sum())
            lines.append(f"{under} of {pairs} pairs turn less than once within {self.train_len} tokens: past it they meet "
                         "angles no distance of training gave them (posbias diagnose reports them for a trained model)")
        else:
            lines.append("give --train-len to see which pairs turn less than once within the training length")
        if self.attention_factor != 1.0:
            lines.append(f"YaRN temperature: q and k are each scaled by {self.attention_factor:.4f} "
                         f"(logits by {self.attention_factor ** 2:.4f})")
        return lines

    @property
    def keys_rotate_once(self) -> bool:
        """True when a key's rotation depends on its position alone, not on the context length (every
        scaling but dynamic NTK): a decoding cache may then hold rotated keys (:mod:`posbias.model`)."""
        return self.scaling != "dynamic-ntk"

    @property
    def attention_factor(self) -> float:
        """YaRN's temperature applied to q and k (1 for the other scalings)."""
        if self.scaling == "yarn" and self.factor > 1:
            return 0.1 * math.log(self.factor) + 1.0
        return 1.0

    def angles(self, pos: Tensor, context_len: int | None = None) -> Tensor:
        """``pos·θ_k`` reduced mod 2π, ``[len, d/2]`` float32. Computed in float64 (a float32
        product loses shift-invariance past about 2^20); :func:`posbias.attention` also subtracts an
        integer reference from the positions first, so attention is exact at any position."""
        p = pos.to(torch.float64)
        if self.scaling == "pi":
            p = p / self.factor
        ang = p[:, None] * self.inv_frequencies(context_len).double()[None, :]
        return torch.remainder(ang, 2 * math.pi).float()

    def rotate(self, x: Tensor, pos: Tensor, *, context_len: int | None = None) -> Tensor:
        """``x [..., len(pos), head_dim]`` rotated by the positions, in ``x``'s dtype (computed in
        float32). Differentiable in ``x``: the rotation is orthogonal, so its backward is the
        rotation by the opposite angles (:class:`_Rotate`)."""
        cos, sin = self._cos_sin(pos, context_len)
        return _Rotate.apply(x.float(), cos, sin, self.layout).to(x.dtype)

    def _cos_sin(self, pos: Tensor, context_len: int | None) -> tuple[Tensor, Tensor]:
        """``cos`` and ``sin`` of :meth:`angles` ``[len(pos), d/2]`` float32, YaRN's temperature folded
        in. A run of consecutive positions is read from a table kept for the last such run, computed
        with room for ``max(256, n/2)`` more positions and keyed by every input of the angles (the
        frequencies in use, PI's factor, the temperature, the device): decoding asks every layer, at
        every step, for the positions of the whole cache, and recomputing them in float64 cost about
        as much as the attention step itself."""
        scale = self.attention_factor
        n = len(pos)
        if n < 2 or not consecutive(pos):
            ang = self.angles(pos, context_len)
            return ang.cos().mul_(scale), ang.sin().mul_(scale)
        inv = self.inv_frequencies(context_len)
        key = (pos.device, self.scaling == "pi" and self.factor, scale, self._frequency_source(inv, context_len))
        start = first(pos)
        hit = self._table
        if hit is not None and hit[0] == key and (key[-1] is not None or torch.equal(hit[1], inv)) \
                and hit[2] <= start and start + n <= hit[2] + hit[3].shape[0]:
            a = start - hit[2]
            return hit[3][a:a + n], hit[4][a:a + n]
        run = torch.arange(start, start + n + max(256, n // 2), device=pos.device)
        ang = self.angles(run, context_len)
        # (inv itself is held: the key names it by id, which no other tensor can take while it is held)
        self._table = (key, inv if key[-1] is not None else inv.clone(), start, ang.cos().mul_(scale),
                       ang.sin().mul_(scale))
        return self._table[3][:n], self._table[4][:n]

    def _frequency_source(self, inv: Tensor, context_len: int | None) -> tuple | None:
        """What made the frequencies ``inv``, without reading them (on a GPU a read waits for it): the
        buffer and its in-place version, or the numbers dynamic NTK computes them from; None where only
        their values can tell (a buffer made in inference mode keeps no version)."""
        if inv is not self.inv_freq:
            return ("dynamic-ntk", self.base, self.factor, self.train_len, self.head_dim, context_len)
        return None if inv.is_inference() else (id(inv), inv._version)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, base={self.base}, layout={self.layout!r}, "
                f"scaling={self.scaling!r}, factor={self.factor}, train_len={self.train_len}")


def _tokens(n: float) -> str:
    """A wavelength in tokens: ``6.283``, ``264.96``, ``47,117``."""
    return f"{n:,.0f}" if n >= 1000 else f"{n:.5g}"


def _rotate_into(out: Tensor, x: Tensor, cos: Tensor, sin: Tensor, layout: str) -> Tensor:
    """``out = R x``: each channel pair ``(a, b)`` of ``x`` becomes ``(a·cos − b·sin, b·cos + a·sin)``;
    four multiply-adds over half the channels each, written in place (a product per term and a
    concatenation took seven passes, about 70 ms a decoding step against 16k cached keys)."""
    if layout == "half":
        h = x.shape[-1] // 2
        x1, x2, o1, o2 = x[..., :h], x[..., h:], out[..., :h], out[..., h:]
    else:
        x1, x2, o1, o2 = x[..., 0::2], x[..., 1::2], out[..., 0::2], out[..., 1::2]
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin)
    return out


class _Rotate(torch.autograd.Function):
    """The rotation of float32 ``x`` by tables ``cos``, ``sin`` (no gradient: positions are integers);
    the backward rotates the incoming gradient by the opposite angles (``Rᵀ = R(−θ)``)."""

    @staticmethod
    def forward(ctx, x, cos, sin, layout: str):
        ctx.save_for_backward(cos, sin)
        ctx.layout = layout
        return _rotate_into(torch.empty_like(x, memory_format=torch.contiguous_format), x, cos, sin, layout)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        g = _rotate_into(torch.empty_like(grad, memory_format=torch.contiguous_format), grad, cos, -sin, ctx.layout)
        return g, None, None, None
