"""A short fine-tuning loop for an in-memory model (retrofits, passkey training).

AdamW on the trainer's schedule (:func:`posbias.train.lr_at`: linear warm-up over the first 10% of
steps, cosine decay to 10%), gradient
clipping at 1, a progress bar with the loss. The full trainer with checkpoints and resume is
:func:`posbias.train.train`; fine-tunes here are minutes long and their results are checkpointed
by the commands that run them.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .train import lr_at


def finetune(model: nn.Module, batch_fn: Callable[[int], Tensor], loss_fn: Callable[[nn.Module, Tensor], Tensor],
             *, steps: int, lr: float = 5e-4, progress: bool = False, desc: str = "fine-tune") -> list[float]:
    """Run ``steps`` optimizer steps on ``loss_fn(model, batch_fn(step))``; returns the losses."""
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"fine-tuning steps must be an integer >= 0, got {steps!r}")
    if steps == 0:
        return []
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warm = max(1, steps // 10)
    losses = []
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr=lr, steps=steps, warmup=warm, min_ratio=0.1)
        loss = loss_fn(model, batch_fn(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses
