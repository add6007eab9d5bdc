"""A small decoder-only Transformer LM that takes any registered positional scheme.

Pre-norm blocks (LayerNorm → attention → residual, LayerNorm → MLP → residual), byte vocabulary by
default. The positional scheme is injected: one scheme instance is shared by all layers (T5
computes one table per stack), so attention knows nothing about which scheme it runs. Absolute
position vectors are added to the embeddings only when the scheme is ``sinusoidal``.

For unscaled schemes (T5) the query projection is initialised with an extra ``1/√head_dim`` factor,
which is how Raffel et al. fold the attention scaling into the initialisation.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .attention import BACKENDS, attention, attention_probs
from .config import check_count
from .positions import declare_run, piece, run, run_start
from .schemes import Scheme, build, get_scheme_class


@dataclass(frozen=True)
class ModelConfig:
    scheme: str  # a name in posbias.SCHEMES
    scheme_options: dict[str, Any] = field(default_factory=dict)  # keyword options of the scheme
    vocab_size: int = 256  # bytes
    d_model: int = 128  # residual width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # attention heads (head_dim = d_model / n_heads)
    mlp_ratio: int = 4  # hidden width of the MLP = mlp_ratio · d_model
    backend: str = "auto"  # attention backend (posbias.attention)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_ratio"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        get_scheme_class(self.scheme)  # an unknown name: ValueError listing the schemes, now rather than when built
        if not isinstance(self.scheme_options, dict):
            raise ValueError(f"scheme_options must be a dict of the scheme's options, got {self.scheme_options!r}")
        if self.backend != "auto" and self.backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return cls(**d)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, unscaled: bool) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.backend = cfg.backend
        if unscaled:
            with torch.no_grad():
                self.qkv.weight[: cfg.d_model].mul_(1.0 / math.sqrt(cfg.head_dim))

    def forward(self, x: Tensor, scheme: Scheme, pos: Tensor, cache: dict | None = None,
                on_probs: Callable[[Tensor], None] | None = None, probs_rows: int | None = None) -> Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k_pos = pos
        if cache is not None:  # decoding: append the new keys/values to the cache
            if getattr(scheme, "keys_rotate_once", False):
                # a key's rotation depends on its position alone: the cache holds rotated keys, and
                # attention runs without a scheme, instead of rotating the whole cache every step
                q, k = scheme.rotate(q, pos), scheme.rotate(k, pos)
                scheme = _no_bias(scheme.n_heads, scheme.head_dim)
            k, v, k_pos = _cache_append(cache, k, v, pos)
        y = attention(q, k, v, scheme, causal=True, q_pos=pos, k_pos=k_pos, backend=self.backend)
        if on_probs is not None:
            rows = n if probs_rows is None else min(probs_rows, n)
            on_probs(attention_probs(q[:, :, n - rows:], k, scheme, causal=True, q_pos=piece(pos, n - rows), k_pos=k_pos))
        return self.proj(y.transpose(1, 2).reshape(b, n, -1))


@functools.lru_cache(maxsize=16)
def _no_bias(n_heads: int, head_dim: int) -> Scheme:
    """A shared ``nope`` scheme (no state) for attention over keys rotated before they were cached."""
    return build("nope", n_heads=n_heads, head_dim=head_dim)


def _cache_append(cache: dict, k: Tensor, v: Tensor, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Append one step's keys, values and positions to a layer's cache and return views of all of
    them. The cache holds buffers with room to grow (half as much again when full), so a step copies
    its own tokens rather than the whole cache: concatenating every step copied the cache, 25 of
    60 ms per generated token at 8k keys (4 layers, d_model 256, 2 threads), measured. With autograd
    on, earlier steps may have saved views of the buffers: nothing is written into them, each step
    concatenates instead. While every step's positions continue a run from the first (generation), the
    keys' positions come back as a run too (:mod:`posbias.positions`): a decoding step reads none."""
    n = cache.get("len", 0)
    need = n + k.shape[2]
    step = run_start(pos)
    start = cache.get("start") if n else step
    cache["start"] = start if step is not None and start is not None and step == start + n else None
    new = {"k": k, "v": v, "pos": pos}  # the sequence runs along dim −2 of k and v, dim 0 of pos
    seq = {"k": 2, "v": 2, "pos": 0}
    cache["len"] = need
    if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
        for name, t in new.items():
            cache[name] = torch.cat([cache[name].narrow(seq[name], 0, n), t], seq[name]) if n else t
        return cache["k"], cache["v"], _cached_positions(cache, cache["pos"])
    if "k" not in cache or need > cache["k"].shape[2]:
        room = need + max(256, need // 2)
        for name, t in new.items():
            grown = t.new_empty(t.shape[:seq[name]] + (room,) + t.shape[seq[name] + 1:])
            if n:
                grown.narrow(seq[name], 0, n).copy_(cache[name].narrow(seq[name], 0, n))
            cache[name] = grown
    for name, t in new.items():
        cache[name].narrow(seq[name], n, t.shape[seq[name]]).copy_(t)
    k, v, k_pos = (cache[name].narrow(seq[name], 0, need) for name in new)
    return k, v, _cached_positions(cache, k_pos)


def _cached_positions(cache: dict, held: Tensor) -> Tensor:
    """The positions the cache holds, marked as the run they are where every step continued one (no new
    tensor: the next step's write into the buffer unmarks the view)."""
    return held if cache["start"] is None else declare_run(held, cache["start"])


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, unscaled: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg, unscaled)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model), nn.GELU(),
                                 nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model))

    def forward(self, x: Tensor, scheme: Scheme, pos: Tensor, cache: dict | None = None,
                on_probs: Callable[[Tensor], None] | None = None, probs_rows: int | None = None) -> Tensor:
        x = x + self.attn(self.ln1(x), scheme, pos, cache, on_probs, probs_rows)
        return x + self.mlp(self.ln2(x))


class TransformerLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.scheme = build(cfg.scheme, n_heads=cfg.n_heads, head_dim=cfg.head_dim, **cfg.scheme_options)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, self.scheme.unscaled) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, idx: Tensor, *, start: int = 0, caches: list[dict] | None = None,
                on_attention: Callable[[int, Tensor], None] | None = None,
                attention_rows: int | None = None) -> Tensor:
        """Logits ``[batch, len, vocab]`` for tokens at positions ``start … start+len−1``.

        ``on_attention(layer, probs)`` (optional) receives each layer's attention probabilities
        ``[batch, heads, len, keys]`` as the forward pass computes them (dense reference math, so
        O(len²) memory per layer; for diagnosis, not training); with ``attention_rows`` only those of
        the last ``attention_rows`` queries, ``[batch, heads, rows, keys]``, at O(rows · keys) (a
        diagnosis that reads a few queries: 5 rows of 2,048 make a hooked forward cost about a plain one)."""
        if attention_rows is not None:
            check_count("attention_rows", attention_rows)
        pos = run(start, idx.shape[1], idx.device)  # its start known: attention reads nothing of it
        x = self.embed(idx)
        absolute = self.scheme.embed(pos, self.cfg.d_model)
        if absolute is not None:
            x = x + absolute.to(x.dtype)
        for n, block in enumerate(self.blocks):
            hook = None if on_attention is None else (lambda p, n=n: on_attention(n, p))
            x = block(x, self.scheme, pos, None if caches is None else caches[n], hook, attention_rows)
        return self.head(self.ln_f(x))

    def loss(self, idx: Tensor, targets: Tensor, *, reduction: str = "mean") -> Tensor:
        logits = self(idx)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)

    def with_scheme(self, scheme: str, options: dict[str, Any]) -> "TransformerLM":
        """A new model with this model's weights and another positional scheme (or the same scheme
        with other options). When the scheme name is unchanged its learned state (a T5 table, FIRE's
        MLP) is kept; a new scheme starts from its own initialisation. When the attention scale
        changes (T5 is unscaled), the query weights absorb the ratio so ``scale · q·k`` is unchanged."""
        cfg = replace(self.cfg, scheme=scheme, scheme_options=dict(options))
        new = TransformerLM(cfg).to(next(self.parameters()).device)
        for name, child in self.named_children():
            if name != "scheme":
                getattr(new, name).load_state_dict(child.state_dict())
        if scheme == self.cfg.scheme:
            new.scheme.load_state_dict(self.scheme.state_dict())
        if new.scheme.unscaled != self.scheme.unscaled:
            ratio = new.scheme.default_scale() / self.scheme.default_scale()
            with torch.no_grad():
                for block in new.blocks:
                    block.attn.qkv.weight[: cfg.d_model].div_(ratio)
        return new

    def positional_parameters(self) -> list[nn.Parameter]:
        """The scheme's learnable parameters (T5/offset tables, KERPLE r1/r2, FIRE's MLP, c and L):
        the trainer gives them a group of their own (own learning rate, no weight decay)."""
        return list(self.scheme.parameters())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
