"""A short fine-tuning loop for an in-memory model (retrofits, passkey training).

AdamW on the trainer's schedule (:func:`posbias.train.lr_at`: linear warm-up over the first 10% of
steps, cosine decay to 10%), gradient clipping at 1, a progress bar with the loss. It stops at the
first non-finite loss, before that step changes anything (:class:`~posbias.train.NonFiniteLoss`).
Given a ``resume`` folder it keeps its progress there (model, optimizer, step, losses, and the state
of the ``generator`` the batches draw from, if any; atomically, at most every ``save_every_s``
seconds) and a re-run continues from it: with batches that are a function of the step, as
:func:`posbias.data.batch_at` gives, or drawn from ``generator``, the result is bit-identical to an
uninterrupted run. The progress is keyed by the steps, the learning rate, the caller's ``identity``
(what else makes its batches and loss) and a hash of the starting weights: a progress checkpoint made
by another fine-tune is refused, never continued. The full trainer (validation, DDP) is
:func:`posbias.train.train`.
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import store
from .schemes.base import check_int
from .stopping import between_steps
from .train import NonFiniteLoss, lr_at


def finetune(model: nn.Module, batch_fn: Callable[[int], Tensor], loss_fn: Callable[[nn.Module, Tensor], Tensor],
             *, steps: int, lr: float = 5e-4, progress: bool = False, desc: str = "fine-tune",
             resume: str | Path | None = None, save_every_s: float = 60.0, generator: torch.Generator | None = None,
             identity: dict | None = None, replace_other: bool = False, pos_lr_mult: float = 1.0,
             log: Callable[[str], None] | None = None, stop: Callable[[int], bool] | None = None,
             check_every: int = 100) -> list[float]:
    """Run ``steps`` optimizer steps on ``loss_fn(model, batch_fn(step))``; returns the losses.

    ``resume`` (``model`` then a :class:`~posbias.model.TransformerLM`): the folder of the progress
    checkpoint, read at the start when it holds one made with the same steps, learning rate, ``identity``
    and starting weights (another fine-tune's: ValueError, or with ``replace_other`` a fresh start that
    replaces it, for folders the caller owns) and written when ``save_every_s`` seconds have passed
    since the start or the last save. ``generator``: the one ``batch_fn`` draws from, if it draws; its
    state travels with the progress. The caller saves the result; the folder is then of no further use.
    ``pos_lr_mult``: the positional parameters' multiple of ``lr``; give a checkpoint's own
    (:func:`posbias.checkpoint.pos_lr_mult`), or a learned bias barely moves in a short fine-tune.
    ``stop(step)``: asked before every ``check_every``-th step (step 0 included) whether the model is
    done; True ends the fine-tune there, with fewer losses than ``steps`` (the learning-rate schedule
    stays the one of ``steps``). It must depend on the weights alone (not on ``generator``), so that a
    resumed fine-tune stops where an uninterrupted one would; put what it tests in ``identity``."""
    check_int("fine-tuning steps", steps, minimum=0)
    check_int("check_every", check_every, minimum=1)
    if steps == 0:
        return []
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(model, params, lr, pos_lr_mult)
    warm = max(1, steps // 10)
    settings = {"steps": steps, "lr": lr, "pos_lr_mult": float(pos_lr_mult), "identity": identity or {},
                "start_weights": weights_fingerprint(model) if resume is not None else None}
    start, losses = _resume(resume, model, opt, settings, generator, replace_other,
                            lambda what: log and log(f"{desc}: {what}"))
    if start and log:
        log(f"{desc}: resuming from step {start} of {steps} ({str(resume)!r})")
    model.train()
    saved_at = time.monotonic()
    bar = tqdm(range(start, steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True, initial=start,
               total=steps)
    with between_steps() as held:  # Ctrl-C / SIGTERM: held to the end of its step
        for step in bar:
            if stop is not None and step % check_every == 0 and _done(stop, step, model):
                break
            loss = loss_fn(model, batch_fn(step))
            value = loss.item()
            if not math.isfinite(value):
                bar.close()
                _diverged(f"loss {value} at step {step + 1} of {steps}", desc, lr, start, resume)
            _update(opt, params, loss, lr_at(step, lr=lr, steps=steps, warmup=warm, min_ratio=0.1))
            losses.append(value)
            bar.set_postfix(loss=f"{value:.3f}")
            due = step + 1 < steps and time.monotonic() - saved_at >= save_every_s
            if resume is not None and (due or held.requested):  # (at the last step too: a resumed run returns)
                _save_progress(resume, model, opt, step + 1, losses, settings, generator)
                start, saved_at = step + 1, time.monotonic()  # start: the step the progress checkpoint holds
            if held.requested:  # an interruption came during this step: saved above, raised now
                bar.close()
                held.stop()
    bar.close()
    _check_finite(model, desc, lr, resume)
    model.eval()
    return losses


def _check_finite(model: nn.Module, desc: str, lr: float, resume: str | Path | None) -> None:
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        _diverged(f"its last step left non-finite weights ({store.listed(bad)})", desc, lr, 0, resume)


def _done(stop: Callable[[int], bool], step: int, model: nn.Module) -> bool:
    """``stop(step)``, with ``model`` back in training mode for the steps that follow."""
    done = stop(step)
    model.train()
    return done


def _update(opt: torch.optim.Optimizer, params: list[nn.Parameter], loss: Tensor, rate: float) -> None:
    """One optimizer step at learning rate ``rate`` (times each group's ``lr_mult``)."""
    for g in opt.param_groups:
        g["lr"] = rate * g["lr_mult"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def _diverged(what: str, desc: str, lr: float, kept_step: int, resume: str | Path | None) -> None:
    kept = f"; progress up to step {kept_step} is kept in {str(resume)!r}" if kept_step else ""
    raise NonFiniteLoss(f"{desc} diverged: {what} (peak learning rate {lr:g}); nothing of it is saved{kept} — "
                        "lower the learning rate")


def _save_progress(folder: str | Path, model: nn.Module, opt: torch.optim.Optimizer, step: int, losses: list[float],
                   settings: dict, generator: torch.Generator | None) -> None:
    rng = {"generator": generator.get_state()} if generator is not None else {}
    ckpt.save_checkpoint(folder, model, trainer_state={"step": step, "optimizer": opt.state_dict(), "losses": losses,
                                                       **settings, **rng})


def _optimizer(model: nn.Module, params: list[nn.Parameter], lr: float, pos_lr_mult: float) -> torch.optim.AdamW:
    """AdamW without weight decay; the model's positional parameters in a group of their own at
    ``pos_lr_mult`` (each group's ``lr_mult`` scales the schedule)."""
    pos = {id(p) for p in getattr(model, "positional_parameters", list)()} if pos_lr_mult != 1.0 else set()
    groups = [{"params": [p for p in params if id(p) not in pos], "lr_mult": 1.0},
              {"params": [p for p in params if id(p) in pos], "lr_mult": float(pos_lr_mult)}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.95), weight_decay=0.0)


class OtherProgress(ValueError):
    """The progress folder holds another fine-tune's progress."""


def weights_fingerprint(model: nn.Module) -> str:
    """A short hash of every parameter and buffer (names, shapes, dtypes, values) of ``model``."""
    digest = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _resume(folder: str | Path | None, model: nn.Module, opt: torch.optim.Optimizer, settings: dict,
            generator: torch.Generator | None, replace_other: bool,
            say: Callable[[str], None]) -> tuple[int, list[float]]:
    """The step to start from and the losses so far: (0, []) without a progress checkpoint, or with
    ``replace_other`` and another fine-tune's there (said; it is overwritten by the first save)."""
    try:
        return _read_progress(folder, model, opt, settings, generator)
    except OtherProgress:
        if not replace_other:
            raise
        say(f"{str(folder)!r} holds another fine-tune's progress; starting afresh (it is replaced)")
        return 0, []


def _read_progress(folder: str | Path | None, model: nn.Module, opt: torch.optim.Optimizer, settings: dict,
                   generator: torch.Generator | None) -> tuple[int, list[float]]:
    """:func:`_resume` where the folder holds this fine-tune's progress or none (another's: OtherProgress)."""
    if folder is None or not ckpt.exists(folder):
        return 0, []
    state = ckpt.load_trainer_state(folder)
    if not state:
        raise ValueError(f"{str(folder)!r} is a checkpoint without fine-tune progress; give another folder")
    made = {k: state.get(k) for k in settings}
    if made != settings:
        other = {k: v for k, v in made.items() if v != settings[k]}
        raise OtherProgress(f"{str(folder)!r} holds a fine-tune made with other settings ({other} instead of "
                            f"{ {k: settings[k] for k in other} }); delete it to start again")
    if generator is not None:
        if "generator" not in state:
            raise OtherProgress(f"{str(folder)!r} holds no batch generator state; delete it to start again")
        generator.set_state(state["generator"])
    model.load_state_dict(ckpt.load_model(folder).state_dict())
    opt.load_state_dict(state["optimizer"])
    return state["step"], list(state["losses"])
