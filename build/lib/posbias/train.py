"""Training: AdamW, linear warm-up then cosine decay, gradient clipping, periodic validation,
atomic checkpoints and exact resumption (the batch of step s depends only on the seed and s).

Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel (gloo on CPU,
nccl on GPU) and each rank takes its share of every global batch, so the optimisation equals the
single-process run up to floating-point reduction order.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import store
from .config import check_count, check_number, check_rate, check_seed
from .data import batch_at
from .model import ModelConfig, TransformerLM
from .stopping import between_steps


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 600  # optimizer steps
    batch_size: int = 32  # sequences per step (global, over all ranks)
    train_len: int = 128  # training length L (tokens per sequence)
    lr: float = 2e-3  # peak learning rate
    pos_lr_mult: float = 1.0  # positional parameters' learning rate = pos_lr_mult · lr (same schedule)
    warmup: int = 50  # linear warm-up steps
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 200  # steps between validation losses (0: only at the end)
    eval_batches: int = 4
    ckpt_every: int = 100  # steps between checkpoints
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "train_len", "eval_batches", "ckpt_every"):
            check_count(name, getattr(self, name))
        for name in ("warmup", "eval_every"):  # 0: no warm-up; validation at the end only
            check_count(name, getattr(self, name), minimum=0)
        for name in ("lr", "pos_lr_mult", "grad_clip"):
            check_rate(name, getattr(self, name))
        check_number("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check_number("weight_decay", self.weight_decay, 0.0)
        check_seed("seed", self.seed)

    def lr_at(self, step: int) -> float:
        return lr_at(step, lr=self.lr, steps=self.steps, warmup=self.warmup, min_ratio=self.min_lr_ratio)


def lr_at(step: int, *, lr: float, steps: int, warmup: int, min_ratio: float) -> float:
    """The learning rate of step ``step`` (0-based): linear warm-up over ``warmup`` steps, then cosine
    decay to ``min_ratio · lr`` at ``steps``. The one schedule of training and fine-tuning."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    """The settings that differ between two nested config dicts, as ``a.b: old → new`` (empty if none)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            sub = config_diff(a, b, f"{prefix}{key}.")
            if sub:
                out.append(sub)
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} → {b!r}")
    return "; ".join(out)


class NonFiniteLoss(ValueError):
    """Training produced a NaN/inf loss; nothing past the last good checkpoint (if any was written) is written."""


def make_optimizer(model: TransformerLM, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with three groups: matrices with weight decay; vectors (norms, biases) without; and the
    positional parameters the model names (:meth:`TransformerLM.positional_parameters`) without
    weight decay and at ``pos_lr_mult`` × the learning rate.

    Why a multiplier: Adam moves a parameter by about its learning rate per step whatever the
    gradient's size, so a parameter can travel at most about Σ lr_t over training (≈ 0.28 for the
    demo's 250 steps at 2e-3). Weights live at scale 0.02–1 and need no more; a bias is measured in
    logit units, where a useful near-versus-far contrast is several nats (released T5 tables reach
    about ±8, ALiBi's slope 1/4 gives −16 at distance 64). Starting from 0 the tables cannot get
    there at the weights' rate; the multiplier gives them the step budget their units need."""
    pos_ids = {id(p) for p in model.positional_parameters()}
    decay, other, pos = [], [], []
    for p in model.parameters():
        (pos if id(p) in pos_ids else decay if p.dim() >= 2 else other).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "lr_mult": 1.0},
              {"params": other, "weight_decay": 0.0, "lr_mult": 1.0},
              {"params": pos, "weight_decay": 0.0, "lr_mult": cfg.pos_lr_mult}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95))


def _dist_info() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


@torch.no_grad()
def validation_loss(model: TransformerLM, tokens: Tensor, cfg: TrainConfig, device: torch.device) -> float:
    model.eval()
    losses = [model.loss(*(t.to(device) for t in batch_at(tokens, 10**9 + n, batch_size=cfg.batch_size,
                                                          seq_len=cfg.train_len, seed=cfg.seed)))
              for n in range(cfg.eval_batches)]
    model.train()
    return float(torch.stack(losses).mean())


def _resume(last: Path, model: TransformerLM, opt: torch.optim.Optimizer, cfg: TrainConfig,
            model_cfg: ModelConfig) -> tuple[int, dict[str, Any]]:
    """Load the model, optimizer and history of ``last`` (when it exists, made with the same settings);
    returns the step to start from and the history so far."""
    history: dict[str, Any] = {"train_loss": [], "val_loss": [], "tokens": 0, "wall_s": 0.0}
    if not ckpt.exists(last):
        return 0, history
    state = ckpt.load_trainer_state(last)
    if state is None:
        raise ValueError(f"{str(last)!r} has no trainer state to resume from")
    changed = config_diff({"train": state["train_config"], "model": state["model_config"]},
                          {"train": asdict(cfg), "model": model_cfg.to_dict()})
    if changed:
        raise ValueError(f"checkpoint {str(last)!r} was made with other settings ({changed}); "
                         "use a new output folder or delete it")
    model.load_state_dict(ckpt.load_model(last).state_dict())
    opt.load_state_dict(state["optimizer"])
    return state["step"], state["history"]


def _step(net: torch.nn.Module, model: TransformerLM, opt: torch.optim.Optimizer, cfg: TrainConfig, x: Tensor,
          y: Tensor, step: int) -> Tensor:
    """One optimizer step on the batch ``(x, y)``; NonFiniteLoss (before any update) when the loss is not finite."""
    for g in opt.param_groups:
        g["lr"] = cfg.lr_at(step) * g["lr_mult"]
    logits = net(x)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    if not torch.isfinite(loss):
        raise NonFiniteLoss(f"loss {loss.item()} at step {step + 1} (lr {cfg.lr:g})")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    return loss


def training_floor(model_cfg: ModelConfig, batch: int, length: int) -> tuple[int, int]:
    """Bytes that training ``model_cfg`` on ``batch`` sequences of ``length`` tokens holds at least, as
    ``(state, activations)``, in float32: the state is the weights, their gradients and Adam's two
    moments (16 bytes a parameter; the parameters counted are the blocks' four ``d²`` attention
    projections and two MLP matrices and the embedding, no bias, norm or scheme parameter); the
    activations, those autograd must keep for the backward pass: each block's inputs to its first and
    second MLP matrix, ``(1 + mlp_ratio)·d`` floats a token, and the logits, ``vocab`` floats a token.
    A floor, not an estimate (a real step holds several times more): what exceeds a device's memory
    can never train there."""
    d, r, v = model_cfg.d_model, model_cfg.mlp_ratio, model_cfg.vocab_size
    params = model_cfg.n_layers * (4 + 2 * r) * d * d + v * d
    tokens = batch * length
    return 16 * params, 4 * tokens * (model_cfg.n_layers * (1 + r) * d + v)


def check_training_fits(model_cfg: ModelConfig, batch: int, length: int, device: str | torch.device) -> None:
    """ValueError before any work where :func:`training_floor` (``batch`` sequences of ``length`` tokens) exceeds all the memory ``device`` has
    (nothing is checked where that cannot be read), with the sizes that make it. A batch or a model far
    too large otherwise overflowed a tensor's size (a traceback), was killed by the system with no
    message, or spent minutes building layers first."""
    have = store.device_memory(str(device))
    state, acts = training_floor(model_cfg, batch, length)
    if have is None or state + acts <= have:
        return
    size = store.memory_text
    raise ValueError(f"training one model needs at least {size(state + acts)} ({size(acts)} of activations for "
                     f"{batch} sequences of {length} tokens through {model_cfg.n_layers} "
                     f"layer{'s' if model_cfg.n_layers > 1 else ''} of width {model_cfg.d_model}, and {size(state)} of weights, gradients and Adam's moments), more "
                     f"than the {size(have)} this {torch.device(device).type} has; a smaller batch, training length, "
                     "width or depth")


def train(model_cfg: ModelConfig, cfg: TrainConfig, train_tokens: Tensor, val_tokens: Tensor, out: str | Path,
          *, device: str | torch.device = "cpu", progress: bool = True, extra_meta: dict | None = None,
          stop_after: int | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train (or resume) a model in ``out``; returns the history. ``out/final`` holds the result and
    ``out/last`` the latest checkpoint. ``stop_after`` stops early (for tests of interruption)."""
    out, device = Path(out), torch.device(device)
    rank, world = _dist_info()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes {world}")
    check_training_fits(model_cfg, cfg.batch_size // world, cfg.train_len, device)  # (each process its share)
    torch.manual_seed(cfg.seed)
    model = TransformerLM(model_cfg).to(device)
    opt = make_optimizer(model, cfg)
    last = out / "last"
    start, history = _resume(last, model, opt, cfg, model_cfg)
    if log and rank == 0 and 0 < start < cfg.steps:
        log(f"{model_cfg.scheme}: resuming from step {start} of {cfg.steps} ({str(last)!r})")
    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    meta = {"train": asdict(cfg), **(extra_meta or {})}
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress or rank != 0, leave=False,
               desc=f"train {model_cfg.scheme}", dynamic_ncols=True)
    t0 = time.perf_counter()
    wall0 = history["wall_s"]
    model.train()
    step = saved = start  # saved: the step `last` holds (0: none)
    with between_steps() as held:  # Ctrl-C / SIGTERM: held to the end of its step, in every process
        for step in range(start, cfg.steps):
            if stop_after is not None and step >= stop_after:
                break
            x, y = batch_at(train_tokens, step, batch_size=cfg.batch_size, seq_len=cfg.train_len, seed=cfg.seed)
            try:
                loss = _step(net, model, opt, cfg, x[rank::world].to(device), y[rank::world].to(device), step)
            except NonFiniteLoss as exc:
                bar.close()
                raise _diverged(exc, model_cfg.scheme, cfg, last, saved) from None
            history["train_loss"].append(value := loss.item())
            history["tokens"] += cfg.batch_size * cfg.train_len
            history["wall_s"] = wall0 + time.perf_counter() - t0
            done = step + 1
            if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
                history["val_loss"].append((done, validation_loss(model, val_tokens, cfg, device)))
                if log and rank == 0:
                    log(f"{model_cfg.scheme} step {done}: val loss {history['val_loss'][-1][1]:.4f}")
            bar.set_postfix(loss=f"{value:.3f}", tok_s=f"{history['tokens'] / max(history['wall_s'], 1e-9):.0f}")
            bar.update(1)
            if (stop := _agreed(held.requested, world, device)) or done % cfg.ckpt_every == 0 or done == cfg.steps:
                _save(last, model, meta, world, rank, trainer_state=_progress(done, opt, history, cfg, model_cfg))
                saved = done
            if stop:  # an interruption came during this step (to any process): saved above, raised now
                bar.close()
                if log and rank == 0:
                    log(f"{model_cfg.scheme}: stopped after step {done} of {cfg.steps}, saved in {str(last)!r}")
                held.stop(agreed=True)
            step = done
    bar.close()
    if step >= cfg.steps and not ckpt.exists(out / "final"):
        _save(out / "final", model, {"train": asdict(cfg), "history": history, **(extra_meta or {})}, world, rank)
    return history


def _diverged(exc: NonFiniteLoss, scheme: str, cfg: TrainConfig, last: Path, saved: int) -> NonFiniteLoss:
    """The error of a run that diverged: what went wrong, and the checkpoint it keeps, after step ``saved``
    (0: none was written yet, where the message had named a ``last/`` folder that did not exist)."""
    kept = (f"the last good checkpoint, after step {saved}, is kept in {str(last)!r}" if saved else
            f"no checkpoint had been written (the first was due after step {min(cfg.ckpt_every, cfg.steps)})")
    return NonFiniteLoss(f"training {scheme} diverged: {exc}; {kept} — lower the learning rate")


def _progress(step: int, opt: torch.optim.Optimizer, history: dict[str, Any], cfg: TrainConfig,
              model_cfg: ModelConfig) -> dict[str, Any]:
    """What a progress checkpoint keeps besides the weights (:func:`_resume` reads it)."""
    return {"step": step, "optimizer": opt.state_dict(), "history": history, "train_config": asdict(cfg),
            "model_config": model_cfg.to_dict()}


def _agreed(requested: bool, world: int, device: torch.device) -> bool:
    """Whether to stop after this step: this process was interrupted, or (several processes training
    together) any of them was: they stop at one step, since each must save it and meet the others in
    every collective. One all-reduce of a flag per step, so every process calls it after every step, before
    anything else decides (torchrun forwards Ctrl-C or SIGTERM to every process, and kills them 30 s later;
    measured 0.48 ms on 2 gloo processes of this 2-core CPU)."""
    if world == 1:
        return requested
    flag = torch.tensor([int(requested)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def _save(where: Path, model: TransformerLM, meta: dict[str, Any], world: int, rank: int,
          trainer_state: dict[str, Any] | None = None) -> None:
    """Rank 0 writes the checkpoint (atomically); every rank waits for it."""
    if rank == 0:
        ckpt.save_checkpoint(where, model, extra=meta, trainer_state=trainer_state)
    if world > 1:
        torch.distributed.barrier()
