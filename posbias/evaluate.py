"""Perplexity at many lengths (SPEC §3.3): non-overlapping or sliding windows, loss by position.

Every length is scored on the same first ``max_tokens`` tokens of the split, so the numbers are
comparable across lengths. Bits per byte = loss / ln 2 (the vocabulary is bytes).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor
from torch.nn import functional as F
from tqdm.auto import tqdm

from .model import TransformerLM


def _check_lengths(lengths: Iterable[int]) -> list[int]:
    out = []
    for n in lengths:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"evaluation lengths must be integers >= 1, got {n!r}")
        out.append(n)
    if not out:
        raise ValueError("give at least one evaluation length")
    return out


@torch.no_grad()
def evaluate_length(model: TransformerLM, tokens: Tensor, length: int, *, max_tokens: int = 16384,
                    stride: int | None = None, batch_size: int = 8,
                    device: str | torch.device = "cpu") -> dict[str, Any]:
    """Loss/perplexity with windows of ``length`` tokens.

    ``stride=None``: non-overlapping windows, every position in a window is scored, and the loss by
    position inside the window is returned. ``stride=s``: sliding windows advancing by ``s``; each
    window scores only its last ``s`` tokens (the first scores all), so every scored token sees at
    least ``length − s`` tokens of context.
    """
    (length,) = _check_lengths([length])
    if stride is not None and not 1 <= stride <= length:
        raise ValueError(f"stride must be in [1, {length}], got {stride}")
    n_avail = tokens.numel() - 1
    budget = min(max_tokens, n_avail)
    if budget < length:
        raise ValueError(f"split has {n_avail} scoreable tokens, fewer than the evaluation length {length}")
    model.eval()
    step = stride or length
    starts = list(range(0, budget - length + 1, step))
    total, count = 0.0, 0
    by_pos = torch.zeros(length, dtype=torch.float64)
    by_pos_n = torch.zeros(length, dtype=torch.float64)
    for b in range(0, len(starts), batch_size):
        s = torch.tensor(starts[b:b + batch_size])
        idx = s[:, None] + torch.arange(length + 1)[None, :]
        chunk = tokens[idx].long().to(device)
        logits = model(chunk[:, :-1])
        nll = F.cross_entropy(logits.float().transpose(1, 2), chunk[:, 1:], reduction="none").double().cpu()
        if stride is None:
            total += float(nll.sum())
            count += nll.numel()
            by_pos += nll.sum(0)
            by_pos_n += nll.shape[0]
        else:
            for row, st in zip(nll, s.tolist()):
                keep = row if st == 0 else row[length - stride:]
                total += float(keep.sum())
                count += keep.numel()
    loss = total / count
    out = {"eval_len": length, "loss": loss, "ppl": math.exp(loss), "bpb": loss / math.log(2),
           "tokens": count, "stride": stride}
    if stride is None:
        out["loss_by_position"] = (by_pos / by_pos_n).tolist()
    return out


def evaluate_lengths(model: TransformerLM, tokens: Tensor, lengths: Iterable[int], *, progress: bool = False,
                     **kwargs: Any) -> list[dict[str, Any]]:
    lengths = _check_lengths(lengths)
    return [evaluate_length(model, tokens, n, **kwargs)
            for n in tqdm(lengths, desc="evaluate", disable=not progress, leave=False)]
