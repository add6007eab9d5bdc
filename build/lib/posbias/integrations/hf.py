"""Hugging Face ``transformers`` models on posbias attention, outputs unchanged.

Two things live here:

* **conversion** between ``transformers`` configs/weights and posbias schemes:
  :func:`scheme_from_hf` (T5, mT5, UMT5, Switch Transformers, Pop2Piano: ``relative_attention_bias.weight``
  is ``[num_buckets, heads]``, encoder bidirectional, decoder causal; BLOOM: ALiBi slopes from the head count) and
  :func:`t5_to_hf` (a posbias :class:`~posbias.schemes.t5.T5Bias` back to the config fields and weight);
  MPT: ALiBi with the slopes the model builds; :func:`schemes_from_pretrained` reads them from a saved
  model folder without building the model (``posbias plot --checkpoint`` draws them);
* **acceleration**: :func:`accelerate` makes a T5-family, BLOOM or MPT model run its positional
  self-attention through :func:`posbias.attention` — the T5 bias is never materialised as
  ``[heads, N, N]`` (HF builds it from an N² bucketing), ALiBi rides on a fused kernel — and
  :func:`restore` undoes it.

Padding masks run on posbias too (as :func:`posbias.attention`'s ``key_mask``), where the mask is
"these keys for every query" (and causal) — checked element by element; for BLOOM, whose ALiBi
counts positions over the kept keys, only where each sequence keeps one run of keys (left or right
padding). Attention dropout while training runs on posbias too on the CPU (``attention(...,
dropout_p=...)``: the same dropout of the probabilities, from posbias' own per-pair mask, in O(N)
memory; :data:`DROPOUT_DEVICES`), and on CUDA inside the ``triton`` programs where
``accelerate(model, backend="triton")`` asks for them (:func:`~posbias.attention.dropout_in_triton`).
What stays on the original ``transformers`` code path (exact by construction): cross-attention, any
other mask, ``output_attentions`` (for T5 the model's eager attention, which returns the weights,
whatever implementation the model had), and dropout elsewhere. For T5 in those cases the dense bias is still built
from posbias' O(N) per-offset table and handed to SDPA, so it is cheaper than the original too.

Usage with a real checkpoint (downloads happen in *your* code, never in posbias)::

    from transformers import T5EncoderModel
    from posbias.integrations.hf import accelerate
    model = accelerate(T5EncoderModel.from_pretrained("google/flan-t5-base"))

Written against the ``transformers`` 5.x attention interface; ``transformers`` is imported only
when a function here is called.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..attention import BACKENDS, attention, dropout_in_triton
from ..positions import run
from ..schemes.alibi import ALiBi
from ..schemes.rope import RoPE
from ..schemes.t5 import T5Bias

__all__ = ["scheme_from_hf", "schemes_from_pretrained", "t5_to_hf", "accelerate", "restore", "ATTN_IMPLEMENTATION"]

ATTN_IMPLEMENTATION = "posbias"
# model types whose attention is transformers' T5 attention (a "Copied from T5" class: the same bucketing,
# table and attention interface); LongT5 (local attention with its own bias) and UDOP (a 2-D bias added
# to the table's) are not
T5_FAMILY = ("t5", "mt5", "umt5", "switch_transformers", "pop2piano")
ALIBI_FAMILY = ("bloom", "mpt")
_MARK = "_posbias_accelerated"


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ValueError("the Hugging Face integration needs transformers: pip install 'posbias[hf]'") from None
    if too_old(transformers.__version__):
        raise ValueError(f"posbias.integrations.hf needs transformers >= {'.'.join(map(str, TRANSFORMERS_FROM))} "
                         f"(T5 through its attention interface); found {transformers.__version__}: "
                         "pip install -U 'posbias[hf]'")
    return transformers


# The first transformers release this integration runs on: from 5.15 T5 goes through the attention
# interface and takes its bias's first query position as ``past_seen_tokens``; 5.0-5.14 fail
# tests/test_hf.py (5.0, 5.5.4, 5.10.4, 5.13.1 and 5.14.0 run; 5.15.0 to 5.25.0 pass).
TRANSFORMERS_FROM = (5, 15)


def too_old(version: str) -> bool:
    """Whether a transformers ``version`` predates :data:`TRANSFORMERS_FROM`."""
    return _release(version) < TRANSFORMERS_FROM


def _release(version: str) -> tuple[int, ...]:
    """A version's first two release numbers, read by ``packaging`` (a dependency of transformers):
    ``"5.16.0.dev0"`` is ``(5, 16)``."""
    from packaging.version import Version

    return Version(version).release[:2]


# -- conversion -------------------------------------------------------------------------------
def _heads(config: Any) -> int:
    for name in ("num_heads", "n_head", "num_attention_heads", "n_heads"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise ValueError(f"cannot find the head count in {type(config).__name__}")


def scheme_from_hf(config: Any, weight: Tensor | None = None, *, decoder: bool | None = None) -> T5Bias | ALiBi:
    """The posbias scheme equal to a ``transformers`` model's positional bias.

    T5 family: a :class:`T5Bias` with ``num_buckets``/``max_distance`` from the config,
    ``bidirectional = not decoder`` (``decoder`` defaults to ``config.is_decoder``), and the table
    copied from ``weight`` (``relative_attention_bias.weight``, ``[num_buckets, heads]``) when given.
    BLOOM: an :class:`ALiBi` scheme (slopes from the head count, as ``transformers`` computes them).
    MPT (with ``attn_config.alibi``): an :class:`ALiBi` scheme with the slopes ``transformers`` gives MPT
    (those of ``alibi_bias_max = 8``, the paper's: ``transformers`` 5 builds MPT's bias with its default
    maximum, whatever ``attn_config.alibi_bias_max`` says).
    """
    kind = getattr(config, "model_type", None)
    if kind in T5_FAMILY:
        decoder = bool(getattr(config, "is_decoder", False)) if decoder is None else decoder
        scheme = T5Bias(n_heads=_heads(config), head_dim=config.d_kv,
                        num_buckets=config.relative_attention_num_buckets,
                        max_distance=config.relative_attention_max_distance, bidirectional=not decoder)
        if weight is not None:
            want = (config.relative_attention_num_buckets, _heads(config))
            if tuple(weight.shape) != want:
                raise ValueError(f"relative_attention_bias.weight must be [num_buckets, heads] = {list(want)}, "
                                 f"got {list(weight.shape)}")
            with torch.no_grad():
                scheme.table.copy_(weight.detach().float())
        return scheme
    if kind == "mpt":
        if not config.attn_config.alibi:
            raise ValueError("this MPT config has attn_config.alibi = False: no positional bias to convert")
        from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

        return _mpt_alibi(config.n_heads, config.d_model // config.n_heads,
                          _mpt_slopes(build_mpt_alibi_tensor, config.n_heads))
    if kind in ALIBI_FAMILY:
        heads = _heads(config)
        return ALiBi(n_heads=heads, head_dim=config.hidden_size // heads)
    raise ValueError(f"model_type {kind!r} is not supported; supported: {', '.join(T5_FAMILY + ALIBI_FAMILY)}")


# transformers' rope_type → posbias's RoPE scaling (the others — llama3, longrope, … — have no exact equivalent)
ROPE_TYPES = {"default": None, "linear": "pi", "dynamic": "dynamic-ntk", "yarn": "yarn"}


def rope_from_hf(config: Any) -> dict[str, RoPE]:
    """The rotary embedding of a ``transformers`` config as posbias :class:`RoPE` schemes, one per layer
    type (``{"": …}``, or ``{"full_attention": …, "sliding_attention": …}`` where the config gives each its
    own parameters): base ``rope_theta``, the rotated dimensions (``head_dim`` × ``partial_rotary_factor``)
    and the scaling (``linear`` → PI, ``dynamic`` → dynamic NTK from ``max_position_embeddings``, ``yarn``
    → YaRN from ``original_max_position_embeddings``). Each is checked against ``transformers``' own
    frequencies and attention factor (dynamic NTK at twice its length): a configuration posbias cannot
    reproduce exactly (another rope type, YaRN's ``beta_fast``/``mscale``/``truncate`` options) is a
    ValueError naming it, never an approximation."""
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or not params:
        raise ValueError(f"model_type {getattr(config, 'model_type', None)!r} has no rope parameters")
    # per layer type where the config gives each its own dict (transformers 5.15's Gemma 3 also keeps a
    # top-level rope_type "default" with rope_theta None beside them, which it warns about and never uses)
    groups = {k: v for k, v in params.items() if isinstance(v, dict)} or {"": params}
    try:
        return {layer: _rope_of(config, p, layer) for layer, p in groups.items()}
    except (KeyError, AttributeError, TypeError) as exc:  # a config laid out otherwise: said, not a traceback
        raise ValueError(f"the rope parameters of model_type {getattr(config, 'model_type', None)!r} cannot be "
                         f"read ({type(exc).__name__}: {exc})") from None


def _rope_of(config: Any, p: dict, layer: str) -> RoPE:
    kind = p.get("rope_type", p.get("type", "default"))
    where = f" ({layer})" if layer else ""
    if kind not in ROPE_TYPES:
        known = ", ".join(f"{k} → {v or 'plain'}" for k, v in ROPE_TYPES.items())
        raise ValueError(f"rope_type {kind!r}{where} has no exact equivalent in posbias (it has {known})")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    dim = int(head_dim * (p.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None) or 1.0))
    options: dict[str, Any] = {"base": float(p["rope_theta"]), "scaling": ROPE_TYPES[kind]}
    if kind == "linear":
        options["factor"] = float(p["factor"])
    elif kind == "dynamic":
        options.update(factor=float(p["factor"]), train_len=int(config.max_position_embeddings))
    elif kind == "yarn":
        trained = int(p.get("original_max_position_embeddings") or config.max_position_embeddings)
        options.update(factor=float(p.get("factor") or config.max_position_embeddings / trained), train_len=trained)
    scheme = RoPE(n_heads=heads, head_dim=dim, **options)
    if kind != "default":  # the same frequencies and attention factor as transformers computes, or refused
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        context = 2 * int(config.max_position_embeddings) if kind == "dynamic" else None
        inv, attention_factor = ROPE_INIT_FUNCTIONS[kind](config, "cpu", context, **({"layer_type": layer} if layer else {}))
        ours = scheme.effective_frequencies(context).float()
        if ours.shape != inv.shape or not torch.allclose(ours, inv.float(), rtol=1e-5, atol=0) \
                or abs(scheme.attention_factor - float(attention_factor)) > 1e-6:
            raise ValueError(f"rope_type {kind!r}{where} with {p} gives other frequencies or attention factor in "
                             "transformers than posbias's scaling of the same name: no exact equivalent")
    return scheme


# a T5-family self-attention table: layer 0 of each stack (T5, mT5) or of every layer (UMT5)
_T5_TABLE = re.compile(r"(?:^|\.)(encoder|decoder)\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.weight$")
_WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")


def schemes_from_pretrained(path: str | Path) -> dict[str, T5Bias | ALiBi | RoPE]:
    """The positional biases of a ``transformers`` model saved in a local folder (``save_pretrained``
    or a downloaded snapshot), as posbias schemes by part: ``{"encoder": …, "decoder": …}`` for T5
    and mT5 (the table of block 0, which every layer of its stack shares), ``"encoder layer 3"`` …
    for UMT5 (a table in every layer), ``{"": ALiBi}`` for BLOOM and MPT (their fixed slopes); for any
    other model with rope parameters (Llama, Mistral, Qwen, …) its rotation (:func:`rope_from_hf`).

    Reads ``config.json`` and, of the weights, the bias tables alone (safetensors or ``.bin``,
    sharded or not): the model is never built and nothing is downloaded, so a multi-GB checkpoint
    costs a few kB of reading. ValueError naming the folder for a folder without ``config.json``, a
    model type without a positional bias posbias knows, or weights without the tables."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{str(folder)!r} is not a Hugging Face model folder (no config.json)")
    _transformers()
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{str(folder / 'config.json')!r} cannot be read as a transformers config: "
                         f"{str(exc).splitlines()[0][:200]}") from None
    if config.model_type in ALIBI_FAMILY:
        return {"": scheme_from_hf(config)}
    if config.model_type not in T5_FAMILY:
        if isinstance(getattr(config, "rope_parameters", None), dict) and config.rope_parameters:
            return rope_from_hf(config)  # no bias: the rotation, read from config.json alone
        raise ValueError(f"{str(folder)!r} holds a {config.model_type!r} model; positional biases are read from "
                         f"{', '.join(T5_FAMILY + ALIBI_FAMILY)} models, rotations from models with rope parameters")
    tables = {}
    for key, weight in _read_weights(folder, _T5_TABLE).items():
        part, layer = _T5_TABLE.search(key).groups()
        tables[(part != "encoder", int(layer), part)] = weight
    if not tables:
        raise ValueError(f"the weights in {str(folder)!r} hold no relative_attention_bias table")
    per_layer = len(tables) > len({part for _, _, part in tables})
    return {(f"{part} layer {layer}" if per_layer else part): scheme_from_hf(config, w, decoder=part == "decoder")
            for (_, layer, part), w in sorted(tables.items())}


def _read_weights(folder: Path, pattern: re.Pattern) -> dict[str, Tensor]:
    """The tensors of a saved model whose names match ``pattern``, read from the files that hold them."""
    name = next((n for n in _WEIGHT_FILES if (folder / n).is_file()), None)
    if name is None:
        raise ValueError(f"{str(folder)!r} has no weights ({' / '.join(_WEIGHT_FILES)})")
    if name.endswith(".index.json"):
        try:
            weight_map = json.loads((folder / name).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{str(folder / name)!r} is not a weight index ({type(exc).__name__})") from None
        files = sorted({f for k, f in weight_map.items() if pattern.search(k)})
    else:
        files = [name]
    out: dict[str, Tensor] = {}
    for f in files:
        try:
            if f.endswith(".safetensors"):
                from safetensors import safe_open

                with safe_open(str(folder / f), framework="pt") as st:
                    out.update({k: st.get_tensor(k) for k in st.keys() if pattern.search(k)})
            else:
                state = torch.load(folder / f, map_location="cpu", weights_only=True, mmap=True)
                out.update({k: t for k, t in state.items() if pattern.search(k)})
        except Exception as exc:  # safetensors and torch.load raise their own types for damaged files
            raise ValueError(f"{str(folder / f)!r} cannot be read ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    return out


def t5_to_hf(scheme: T5Bias) -> tuple[dict[str, Any], Tensor]:
    """The ``transformers`` T5 config fields and ``relative_attention_bias.weight`` of a posbias T5 bias."""
    if not isinstance(scheme, T5Bias):
        raise ValueError(f"t5_to_hf needs a T5Bias scheme, got {type(scheme).__name__}")
    fields = {"relative_attention_num_buckets": scheme.num_buckets,
              "relative_attention_max_distance": scheme.max_distance,
              "num_heads": scheme.n_heads, "d_kv": scheme.head_dim, "is_decoder": not scheme.bidirectional}
    return fields, scheme.table.detach().clone()


# -- masks ------------------------------------------------------------------------------------
def mask_kind(mask: Tensor | None, q_start: int, lq: int, lk: int, *, causal_if_none: bool,
              hides: bool = False) -> tuple[str, Tensor | None] | None:
    """What a ``transformers`` mask asks for: ``("full" | "causal", keys)``, where ``keys`` is None or a
    bool ``[batch, lk]`` key mask (padding: :func:`posbias.attention`'s ``key_mask``), or None for
    anything else (the mask then goes to transformers' own path).

    The mask counts only if it *is* "these keys, for every query" (and causal): checked element by
    element against that reconstruction. Boolean masks are True where attention is allowed (``hides``:
    True where a pair is hidden, MPT's); float masks are additive (0 or very negative). A padded query
    that sees no key at all is such a row too.

    Every layer of a model gets the same mask, and the check reads all of it (``[4, 1, N, N]``: 60 ms at
    2k, 240 ms at 4k, measured), so the answer is kept on the mask tensor, keyed by its in-place version
    and this call's arguments: one reading per forward pass, not one per layer (not for inference-mode
    tensors, which keep no version).
    """
    if mask is None:
        return ("causal" if causal_if_none else "full"), None
    return _kept_reading(mask, ("kind", q_start, lq, lk, hides), lambda: _read_mask(mask, q_start, lq, lk, hides))


def mask_documents(mask: Tensor | None, length: int) -> tuple[str, Tensor] | None:
    """Packed documents in a self-attention mask over ``length`` tokens (query 0 at position 0):
    ``("full" | "causal", ids)`` where the mask is block-diagonal — each run of tokens attends only
    within itself, fully or causally — with ``ids`` ``[batch, length]`` numbering the runs
    (:func:`posbias.attention`'s ``document_ids``); None for any other mask. Element by element
    against that reconstruction, read once per mask as :func:`mask_kind`'s reading is. A document's
    positions restart at 0 in posbias, which equals the whole sequence's positions for a bias of the
    offset alone (T5's)."""
    if mask is None:
        return None
    return _kept_reading(mask, ("documents", length), lambda: _read_documents(mask, length))


def _kept_reading(mask: Tensor, key: tuple, read: Callable[[], Any]) -> Any:
    """``read()``, kept on the mask tensor under ``key`` and its in-place version (every layer gets the
    same mask); inference-mode tensors, which keep no version, are read every time."""
    if mask.is_inference():
        return read()
    kept = getattr(mask, "_posbias_readings", None)
    if kept is None or kept[0] != mask._version:
        kept = (mask._version, {})
        mask._posbias_readings = kept
    if key not in kept[1]:
        kept[1][key] = read()
    return kept[1][key]


def _allowed(mask: Tensor, hides: bool = False) -> Tensor | None:
    """A transformers mask as bool, True where attention is allowed; None for a float mask that is
    not additive (0 or very negative)."""
    if mask.dtype == torch.bool:
        return ~mask if hides else mask
    low = torch.finfo(mask.dtype).min / 2
    if not bool(((mask == 0) | (mask <= low)).all()):
        return None
    return mask == 0


def _read_documents(mask: Tensor, length: int) -> tuple[str, Tensor] | None:
    """:func:`mask_documents`' reading of one mask."""
    allowed = _allowed(mask)
    if allowed is None or allowed.dim() != 4 or allowed.shape[1] != 1 or allowed.shape[-2:] != (length, length):
        return None
    a = allowed[:, 0]
    i = torch.arange(1, length, device=mask.device)
    starts = ~a[:, i, i - 1]  # query i cannot see key i − 1: a document starts at i
    ids = torch.cat([starts.new_zeros(a.shape[0], 1, dtype=torch.long), starts.long().cumsum(-1)], -1)
    same = ids[:, :, None] == ids[:, None, :]
    if torch.equal(a, same):
        return "full", ids
    pos = torch.arange(length, device=mask.device)
    if torch.equal(a, same & (pos[:, None] >= pos[None, :])):
        return "causal", ids
    return None


def _read_mask(mask: Tensor, q_start: int, lq: int, lk: int, hides: bool) -> tuple[str, Tensor | None] | None:
    """:func:`mask_kind`'s reading of one mask."""
    allowed = _allowed(mask, hides)
    if allowed is None:
        return None
    if allowed.dim() != 4 or allowed.shape[1] != 1 or allowed.shape[-1] != lk or allowed.shape[-2] not in (1, lq):
        return None
    # [batch, 1, 1, lk] (Switch Transformers' encoder mask): the same keys for every query, read as the
    # full mask it broadcasts to (a view)
    allowed = allowed.expand(-1, -1, lq, -1)
    if bool(allowed.all()):
        return "full", None
    keys = allowed.any(dim=-2)  # [batch, 1, lk]: the keys some query may see
    # one candidate, from the first query's row (it sees every such key only without causality), then
    # one element-by-element check of the whole mask against it
    kind = "full" if torch.equal(allowed[:, :, 0, :], keys) else "causal"
    want = keys[:, :, None, :]
    if kind == "causal":
        i = torch.arange(q_start, q_start + lq, device=mask.device)[:, None]
        want = want & (i >= torch.arange(lk, device=mask.device)[None, :])
    if not bool((allowed == want).all()):
        return None
    return kind, None if bool(keys.all()) else keys[:, 0]


def _batch_rows(rows: Tensor | None, batch: int) -> Tensor | None:
    """A mask's reading per sequence (kept keys, or document ids) for every sequence of the batch (a
    mask of batch 1 applies to all)."""
    return None if rows is None else rows.expand(batch, -1)


def _runs(keys: Tensor) -> bool:
    """Whether each row's kept keys are one run (left or right padding, not scattered)."""
    kept = keys.long()
    starts = (kept[:, 1:] > kept[:, :-1]).sum(-1) + kept[:, 0]  # times a run begins
    return bool((starts <= 1).all())


# Keys from which inference (prefill and decoding steps, autograd off) runs on posbias; calls on
# fewer keys keep transformers' own path (BLOOM's attention; T5's SDPA with the dense bias, built once
# per stack from the per-offset table), whose fixed cost per call is lower. Training always takes
# posbias. Measured (2026-12-01, greedy generate of 32 tokens, accelerated / unpatched, median of 5
# alternating pairs, posbias taking every call): a random BLOOM (hidden 256, 4 layers, 8 heads) with
# prompts of 64 / 128 / 256 / 512 / 1024 / 2048 tokens 1.30 / 1.27 / 1.21 / 1.06 / 0.76 / 0.44; a
# random T5 (d_model 256, 4 + 4 layers, 8 heads) with 64 / 1024 input tokens 1.22 / 0.84 (its
# decoder's self-attention runs on a cache of at most 32 keys).
POSBIAS_FROM = 512


def _few_keys_at_inference(lk: int) -> bool:
    """True where a call keeps transformers' own path: autograd off and fewer than ``POSBIAS_FROM`` keys."""
    return lk < POSBIAS_FROM and not torch.is_grad_enabled()


# Devices whose attention dropout runs on posbias (:mod:`posbias.kernels.dropout`). On the CPU it is 1.25-1.39x
# faster than transformers' path for a T5 and holds O(N) memory (docs/huggingface.md). On CUDA, transformers'
# SDPA has a fused kernel with a dense bias and dropout, while posbias' dropout kernel is a Python loop of dense
# blocks that no GPU run has timed yet (issue 12: until a GPU run validates a path, it is not taken);
# there training with dropout keeps transformers' path, as before, unless the model asks for the ``triton``
# backend, whose programs drop the probabilities themselves (:func:`~posbias.attention.dropout_in_triton`).
DROPOUT_DEVICES = ("cpu",)


def _takes_dropout(p: float, t: Tensor, backend: str = "auto") -> bool:
    """Whether a call with attention dropout ``p`` may run on posbias with this backend preference: no
    dropout, a device of :data:`DROPOUT_DEVICES`, or dropout inside the ``triton`` programs."""
    return p == 0 or t.device.type in DROPOUT_DEVICES or dropout_in_triton(backend, t.device.type)


# -- T5 family --------------------------------------------------------------------------------
@dataclass
class LazyT5Bias:
    """Stands in for HF's dense ``position_bias`` and travels through the stack like it: the
    scheme (sharing the model's ``relative_attention_bias.weight``) and the first query position."""

    scheme: T5Bias
    q_start: int
    backend: str = "auto"  # accelerate(model, backend=...): preferred where it runs exactly
    # every layer of a stack gets the same shapes: densify once per stack
    _dense: dict = field(default_factory=dict, repr=False)

    def dense(self, lq: int, lk: int, dtype: torch.dtype) -> Tensor:
        key = (lq, lk, dtype)
        if key not in self._dense:
            dev = self.scheme.table.device
            q_pos = torch.arange(self.q_start, self.q_start + lq, device=dev)
            self._dense[key] = self.scheme.bias(q_pos, torch.arange(lk, device=dev))[None].to(dtype)
        return self._dense[key]


def _t5_compute_bias(scheme: T5Bias, query_length: int, key_length: int, device=None, past_seen_tokens=0, *,
                     posbias_backend: str = "auto"):
    return LazyT5Bias(scheme, int(past_seen_tokens), posbias_backend)


def _posbias_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                       dropout: float = 0.0, scaling: float | None = None, position_bias: Any = None, **kwargs):
    """The ``transformers`` attention-interface function registered as ``"posbias"``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if kwargs.get("output_attentions"):  # weights asked for: the model's own eager attention, which returns them
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is not None:  # (SDPA, like posbias, has none to give: it returned () with a warning)
            lq, lk = query.shape[2], key.shape[2]
            if isinstance(position_bias, LazyT5Bias):
                position_bias = position_bias.dense(lq, lk, query.dtype)
            mask = _additive_mask(module, attention_mask, lq, lk, query, kwargs.get("is_causal"))
            return eager(module, query, key, value, mask, scaling=scaling, dropout=dropout,
                         position_bias=position_bias, **kwargs)
    if isinstance(position_bias, LazyT5Bias):
        lq, lk = query.shape[2], key.shape[2]
        bias, batch = position_bias, query.shape[0]
        kw = None  # posbias.attention's arguments for what the mask asks, where posbias can run it
        if not _few_keys_at_inference(lk) and _takes_dropout(dropout, query, bias.backend):
            kind = mask_kind(attention_mask, bias.q_start, lq, lk, causal_if_none=not bias.scheme.bidirectional)
            docs = mask_documents(attention_mask, lq) if kind is None and bias.q_start == 0 and lq == lk else None
            if kind is not None:  # these keys for every query (padding)
                kw = dict(causal=kind[0] == "causal", key_mask=_batch_rows(kind[1], batch),
                          q_pos=run(bias.q_start, lq, query.device), k_pos=run(0, lk, query.device))
            elif docs is not None:  # packed sequences: a block-diagonal mask
                kw = dict(causal=docs[0] == "causal", document_ids=_batch_rows(docs[1], batch))
        if kw is not None:
            out = attention(query, key, value, bias.scheme, scale=scaling, backend=bias.backend, strict=False,
                            dropout_p=dropout, **kw)
            return out.transpose(1, 2).contiguous(), None
        position_bias = position_bias.dense(lq, lk, query.dtype)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  position_bias=position_bias, **kwargs)


def _additive_mask(module: nn.Module, mask: Tensor | None, lq: int, lk: int, like: Tensor,
                   is_causal: bool | None) -> Tensor | None:
    """The mask the ``"posbias"`` implementation was handed (SDPA's: boolean, or None where SDPA's own
    ``is_causal`` applies) as the additive one transformers' eager attention adds to its logits: None
    stands for causal (top-left, as SDPA reads it) on a causal module with more than one query, else for
    no mask."""
    if mask is not None and mask.dtype != torch.bool:
        return mask
    if mask is None:
        causal = (getattr(module, "is_causal", True) if is_causal is None else is_causal) and lq > 1
        if not causal:
            return None
        mask = torch.ones(lq, lk, dtype=torch.bool, device=like.device).tril()
    return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(~mask, torch.finfo(like.dtype).min)


def _register() -> None:
    _transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, _posbias_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def _is_t5_attention(m: nn.Module) -> bool:
    return hasattr(m, "compute_bias") and hasattr(m, "has_relative_attention_bias") and hasattr(m, "relative_attention_num_buckets")


def _t5_scheme(m: nn.Module) -> T5Bias:
    scheme = scheme_from_hf(m.config, decoder=bool(m.is_decoder))
    scheme.table = m.relative_attention_bias.weight  # shared: training and state_dict stay HF's
    return scheme


# -- BLOOM ------------------------------------------------------------------------------------
def _bloom_forward(module: nn.Module, original, hidden_states: Tensor, residual: Tensor, alibi: Tensor,
                   attention_mask: Tensor | None, layer_past=None, use_cache: bool = False,
                   output_attentions: bool = False, *, posbias_backend: str = "auto", **kwargs):
    from transformers.models.bloom.modeling_bloom import dropout_add

    b, lq, _ = hidden_states.shape
    past = layer_past.get_seq_length(module.layer_idx) if layer_past is not None else 0
    lk = attention_mask.shape[-1] if attention_mask is not None else past + lq
    kind = None if _few_keys_at_inference(lk) else mask_kind(attention_mask, lk - lq, lq, lk, causal_if_none=True)
    if kind is not None and kind[1] is not None and not _runs(kind[1]):
        kind = None  # BLOOM counts key positions over the kept keys only: the same offsets for one run of them
    dropout = module.attention_dropout.p if module.training else 0.0
    if kind is None or output_attentions or not _takes_dropout(dropout, hidden_states, posbias_backend) or (
            module.pretraining_tp > 1 and module.slow_but_exact):
        return original(hidden_states, residual, alibi, attention_mask, layer_past=layer_past, use_cache=use_cache,
                        output_attentions=output_attentions, **kwargs)
    q, k, v = module._reshape(module.query_key_value(hidden_states))
    if layer_past is not None:
        k, v = layer_past.update(k, v, module.layer_idx)
    scheme = _bloom_scheme(module.num_heads, module.head_dim, str(q.device))
    out = attention(q, k, v, scheme, causal=kind[0] == "causal", scale=module.inv_norm_factor, backend=posbias_backend,
                    strict=False, key_mask=_batch_rows(kind[1], b), dropout_p=dropout)
    context = out.transpose(1, 2).reshape(b, lq, module.num_heads * module.head_dim)
    return dropout_add(module.dense(context), residual, module.hidden_dropout, module.training), None


@functools.lru_cache(maxsize=16)
def _bloom_scheme(n_heads: int, head_dim: int, device: str) -> ALiBi:
    return ALiBi(n_heads=n_heads, head_dim=head_dim).to(device)


# -- MPT --------------------------------------------------------------------------------------
def _mpt_slopes(build, n_heads: int) -> tuple[float, ...]:
    """The head slopes of the bias ``build`` (transformers' ``build_mpt_alibi_tensor``, or a model's
    method of that name) makes for ``n_heads`` and two keys: ``[heads, 1, 2]`` = ``(−m, 0)`` per head.
    Read from transformers rather than computed again: version 5 builds MPT's bias with its default
    ``alibi_bias_max = 8`` (the paper's slopes) whatever ``attn_config.alibi_bias_max`` says."""
    return tuple(float(x) for x in -build(n_heads, 2, device="cpu")[:, 0, 0])


def _mpt_alibi(n_heads: int, head_dim: int, slopes: tuple[float, ...]) -> ALiBi:
    scheme = ALiBi(n_heads=n_heads, head_dim=head_dim)
    scheme.slopes.copy_(torch.tensor(slopes, dtype=torch.float32))
    return scheme


@functools.lru_cache(maxsize=16)
def _mpt_scheme(n_heads: int, head_dim: int, slopes: tuple[float, ...], device: str) -> ALiBi:
    """One scheme per shape, slopes and device, shared by the layers (as :func:`_bloom_scheme`)."""
    return _mpt_alibi(n_heads, head_dim, slopes).to(device)


def _mpt_block_forward(block: nn.Module, original, *args, output_attentions: bool = False, **kwargs):
    """MPT's block knows whether attention weights are wanted; its attention module is not told."""
    block.attn._posbias_weights_wanted = output_attentions
    return original(*args, output_attentions=output_attentions, **kwargs)


def _mpt_forward(module: nn.Module, original, hidden_states: Tensor, position_bias: Tensor,
                 attention_mask: Tensor | None = None, *, posbias_backend: str = "auto", **kwargs):
    """MPT's self-attention on posbias. Its bias ``−m·(K − 1 − j)`` (built for ``config.max_seq_len``
    keys and cut to the last K) differs from ``−m·(i − j)`` by a constant per query, which softmax
    ignores; posbias has no ``max_seq_len``, so the accelerated model also runs longer inputs, where
    transformers' path cannot add its bias. MPT's mask is True where a pair is *hidden*.

    The layer's KV cache comes as ``cache`` (transformers 5.25) or ``past_key_values`` (5.20 and
    other releases before the rename): either is read, and it stays in ``kwargs`` under the name it
    came with for transformers' own path. Reading only ``cache`` left an older release's cache
    unfilled on posbias' path, and greedy generation then diverged from the unpatched model's."""
    name = "past_key_values" if "past_key_values" in kwargs else "cache"
    cache = kwargs.get(name)
    b, lq, _ = hidden_states.shape
    past = cache.get_seq_length(module.layer_idx) if cache is not None else 0
    lk = past + lq
    kind = None if _few_keys_at_inference(lk) else mask_kind(attention_mask, past, lq, lk, causal_if_none=True,
                                                             hides=True)
    dropout = module.attn_dropout_p if module.training else 0.0
    if kind is None or getattr(module, "_posbias_weights_wanted", False) or not _takes_dropout(dropout, hidden_states,
                                                                                               posbias_backend):
        return original(hidden_states, position_bias, attention_mask=attention_mask, **kwargs)
    mixed = module.Wqkv(hidden_states)
    if module.clip_qkv:
        mixed = mixed.clamp(min=-module.clip_qkv, max=module.clip_qkv)
    q, k, v = (t.reshape(b, lq, module.n_heads, module.head_dim).transpose(1, 2) for t in mixed.chunk(3, dim=2))
    if cache is not None:
        k, v = cache.update(k, v, module.layer_idx, kwargs={key: x for key, x in kwargs.items() if key != name})
    scheme = _mpt_scheme(module.n_heads, module.head_dim, module._posbias_slopes, str(q.device))
    out = attention(q, k, v, scheme, causal=kind[0] == "causal", scale=module.softmax_scale, backend=posbias_backend,
                    strict=False, key_mask=_batch_rows(kind[1], b), dropout_p=dropout)
    return module.out_proj(out.transpose(1, 2).reshape(b, lq, module.n_heads * module.head_dim)), None


# -- patching ---------------------------------------------------------------------------------
def accelerate(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Run ``model``'s positional self-attention on posbias; returns the same model (patched in place).

    T5 family (T5, Flan-T5, mT5, UMT5, Switch Transformers, Pop2Piano): each ``relative_attention_bias``
    becomes a posbias T5 bias sharing the weight, layers pass a lazy bias instead of ``[1, heads, N, N]``, and the model's
    attention implementation becomes ``"posbias"`` (SDPA for everything that is not positional
    self-attention). BLOOM and MPT: self-attention goes through posbias' fused ALiBi path. Inference on fewer
    than :data:`POSBIAS_FROM` keys keeps transformers' own path, faster there; training always takes posbias.
    Outputs equal the unpatched model's to float32 tolerance; :func:`restore` undoes it.

    ``backend``: ``"auto"`` (the fastest exact path for each call, :func:`posbias.attention.choose_backend`)
    or one of :data:`posbias.attention.BACKENDS` to prefer, e.g. ``"flex"`` on a GPU; a call the
    preferred path cannot run exactly (a one-token decoding step on ``alibi``, training through
    ``flex`` on the CPU, …) takes the automatic choice instead.
    """
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not a posbias backend; valid: auto, {', '.join(BACKENDS)}")
    _transformers()
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in T5_FAMILY + ALIBI_FAMILY:
        raise ValueError(f"accelerate supports model_type {', '.join(T5_FAMILY + ALIBI_FAMILY)}; got {kind!r}")
    if getattr(model, _MARK, None) is not None:
        return model
    patch = _patch_t5 if kind in T5_FAMILY else _patch_mpt if kind == "mpt" else _patch_bloom
    patched, undo = patch(model, backend)
    if patched == 0:
        raise ValueError(f"found no positional self-attention to accelerate in {type(model).__name__}")
    object.__setattr__(model, _MARK, undo)
    return model


def _patch_t5(model: nn.Module, backend: str) -> tuple[int, list]:
    """Lazy biases in every T5 attention with a table, the ``"posbias"`` implementation in every config:
    (layers patched, the configs' previous implementations)."""
    _register()
    patched, previous, leaky = 0, {}, False
    for m in model.modules():
        if _is_t5_attention(m) and m.has_relative_attention_bias:
            m.compute_bias = functools.partial(_t5_compute_bias, _t5_scheme(m), posbias_backend=backend)
            patched += 1
            leaky = leaky or (m.is_decoder and getattr(m, "is_causal", True) is False)
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and id(cfg) not in previous:
            previous[id(cfg)] = (cfg, cfg._attn_implementation)
    if not patched:  # nothing to accelerate: the configs are left as they are (accelerate refuses)
        return 0, []
    for cfg, _ in previous.values():
        cfg._attn_implementation = ATTN_IMPLEMENTATION
    if leaky:  # transformers 5.15-5.17 build UMT5 so (5.18 sets is_causal): its decoder then sees later tokens
        warnings.warn(f"this {type(model).__name__}'s decoder self-attention has is_causal = False (transformers "
                      f"{_transformers().__version__}; UMT5 gets it from 5.18): under SDPA with no decoder mask, a "
                      "forward pass over several decoder tokens lets each see the later ones. The accelerated decoder "
                      "is causal, so there its outputs differ from the unpatched model's (generate() feeds one "
                      "decoder token at a time and is unaffected)", stacklevel=3)
    return patched, list(previous.values())


def _patch_mpt(model: nn.Module, backend: str) -> tuple[int, list]:
    if not model.config.attn_config.alibi:
        raise ValueError("this MPT model has attn_config.alibi = False: no positional bias to accelerate")
    # the slopes the model itself builds its bias with (transformers 5 ignores attn_config.alibi_bias_max)
    builder = next((m for m in model.modules() if hasattr(m, "build_mpt_alibi_tensor")), None)
    if builder is None:  # no MPT model inside: nothing to patch (accelerate says so)
        return 0, []
    slopes = _mpt_slopes(builder.build_mpt_alibi_tensor, model.config.n_heads)
    patched = 0
    for m in model.modules():
        if type(m).__name__ == "MptBlock":
            m.forward = functools.partial(_mpt_block_forward, m, type(m).forward.__get__(m))
            m.attn._posbias_slopes = slopes
            m.attn.forward = functools.partial(_mpt_forward, m.attn, type(m.attn).forward.__get__(m.attn),
                                               posbias_backend=backend)
            patched += 1
    return patched, []


def _patch_bloom(model: nn.Module, backend: str) -> tuple[int, list]:
    patched = 0
    for m in model.modules():
        if type(m).__name__ == "BloomAttention":
            m.forward = functools.partial(_bloom_forward, m, type(m).forward.__get__(m), posbias_backend=backend)
            patched += 1
    return patched, []


def restore(model: nn.Module) -> nn.Module:
    """Undo :func:`accelerate` (no-op on a model that was not accelerated)."""
    undo = getattr(model, _MARK, None)
    if undo is None:
        return model
    for m in model.modules():
        for name in ("compute_bias", "forward"):
            f = m.__dict__.get(name)
            if isinstance(f, functools.partial) and f.func in (_t5_compute_bias, _bloom_forward, _mpt_forward,
                                                                _mpt_block_forward):
                del m.__dict__[name]
        for name in ("_posbias_slopes", "_posbias_weights_wanted"):
            m.__dict__.pop(name, None)
    for cfg, impl in undo:
        cfg._attn_implementation = impl
    object.__delattr__(model, _MARK)
    return model
