"""Atomic checkpoints: a folder with ``model.safetensors``, ``config.json`` and ``trainer.pt``.

A checkpoint is written to ``<dir>.tmp`` and swapped in by renames, so an interruption at any
moment leaves either the previous checkpoint or the new one, never a half-written one; a write that
fails (a full disk) removes ``<dir>.tmp`` and raises ``OSError`` naming the file. Each file is
fsynced, then the new folder, then (after the swap) the parent folder, before the previous checkpoint
is removed: after a power loss too, one whole checkpoint is on disk.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from . import store
from .config import ConfigError, check_count, check_rate
from .model import ModelConfig, TransformerLM

MODEL_FILE, CONFIG_FILE, TRAINER_FILE = "model.safetensors", "config.json", "trainer.pt"


def save_checkpoint(path: str | Path, model: TransformerLM, *, extra: dict[str, Any] | None = None,
                    trainer_state: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": "posbias-checkpoint-1", "model": model.cfg.to_dict(), **(extra or {})}
    # every file serialised here and written by Python, so that a full disk is an OSError naming the
    # file (safetensors' writer raises an error type of its own, torch.save a RuntimeError)
    files = {MODEL_FILE: safetensors_bytes(state), CONFIG_FILE: json.dumps(meta, indent=2).encode()}
    if trainer_state is not None:
        buffer = io.BytesIO()
        torch.save(trainer_state, buffer)
        files[TRAINER_FILE] = buffer.getbuffer()
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as fh:
                try:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())  # durable before the rename makes it visible
                except OSError as exc:  # a failed write(2) names no file
                    raise store.named(exc, path / name) from exc
        store.fsync_dir(tmp)  # the files' names in the new folder, before it is swapped in
    except BaseException:  # a full disk, an interrupt: the previous checkpoint stays, no half-written folder
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    store.fsync_dir(path.parent)  # the swap is on disk before the previous checkpoint is removed
    shutil.rmtree(old, ignore_errors=True)
    return path


def _resolve(path: Path) -> Path:
    if (path / CONFIG_FILE).exists():
        return path
    old = path.with_name(path.name + ".old")  # interrupted between the two renames
    if (old / CONFIG_FILE).exists():
        return old
    raise ValueError(f"{str(path)!r} is not a posbias checkpoint (no {CONFIG_FILE} with a model config)")


def read_meta(path: str | Path) -> dict[str, Any]:
    p = _resolve(Path(path))
    try:
        meta = json.loads((p / CONFIG_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(p / CONFIG_FILE)!r} is not valid JSON: {exc}") from None
    if meta.get("format") != "posbias-checkpoint-1" or "model" not in meta:
        raise ValueError(f"{str(p)!r} is not a posbias checkpoint")
    return meta


def load_model(path: str | Path, *, map_location: str | torch.device = "cpu") -> TransformerLM:
    """The model in checkpoint ``path``. Refuses (ValueError naming the file) a config that does not
    describe a model, weights that are truncated, do not fit the config, or are not finite."""
    p = _resolve(Path(path))
    meta = read_meta(p)
    try:
        model = TransformerLM(ModelConfig.from_dict(meta["model"]))
    except TypeError as exc:  # an unknown or missing key in config.json
        raise ValueError(f"{str(p / CONFIG_FILE)!r} does not describe a posbias model: {exc}") from None
    try:
        state = load_file(str(p / MODEL_FILE), device=str(map_location))
    except Exception as exc:  # safetensors raises its own error type for a truncated or foreign file
        raise ValueError(f"{str(p / MODEL_FILE)!r} cannot be read ({type(exc).__name__}: {exc}); "
                         "the checkpoint is damaged") from None
    bad = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{str(p / MODEL_FILE)!r} holds non-finite weights ({store.listed(bad)}); "
                         "refusing to load a diverged model")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ValueError(f"{str(p / MODEL_FILE)!r} does not match its config.json "
                         f"({' '.join(x.strip() for x in first[:3])[:300]})") from None
    return model


def load_trainer_state(path: str | Path) -> dict[str, Any] | None:
    """What a progress checkpoint keeps besides the weights (the step, the optimizer's state, the
    history), or None where it keeps none. Read with ``weights_only=True``: tensors, numbers, strings
    and containers of them, never code, so that resuming from a checkpoint someone sent cannot run
    what its pickle names. ValueError naming the file where it cannot be read."""
    p = _resolve(Path(path))
    f = p / TRAINER_FILE
    if not f.exists():
        return None
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{str(f)!r} cannot be read ({type(exc).__name__}); the checkpoint is damaged: "
                         "delete its folder to restart from an earlier one") from None


def exists(path: str | Path) -> bool:
    """Whether ``path`` (or the ``.old`` copy an interrupted swap leaves) has a ``config.json``, unread:
    for folders posbias itself writes (a model's ``last``/``final``); :func:`is_posbias` reads the file,
    for folders a user names."""
    try:
        _resolve(Path(path))
        return True
    except ValueError:
        return False


def is_posbias(path: str | Path) -> bool:
    """Whether ``path`` holds a posbias checkpoint: a config.json that says so, not any config.json
    (a Hugging Face model folder has one too)."""
    try:
        read_meta(path)
        return True
    except ValueError:
        return False


def require(path: str | Path) -> Path:
    """``path`` if it holds a posbias checkpoint, else ValueError naming it."""
    if not exists(path):
        raise ValueError(f"{str(path)!r} is not a posbias checkpoint (no config.json with a model config)"
                         + subfolder_hint(path))
    return Path(path)


def model_folder(path: str | Path) -> Path:
    """The model folder of a checkpoint: the parent of a ``final/`` or ``last/`` checkpoint, else the
    path itself (resolved)."""
    path = Path(path).resolve()
    return path.parent if path.name in ("final", "last") else path


def discover(path: str | Path) -> list[tuple[str, Path]]:
    """``(name, checkpoint)`` for every checkpoint ``path`` names: itself; a model folder's ``final/``;
    or, in a study's or retrofit's output folder (or its ``models/``), every model's ``final/`` or the
    model itself, by name (passkey copies aside). The name is the model folder's. [] when none."""
    path = Path(path)
    if exists(path):
        return [(model_folder(path).name, path)]
    if exists(path / "final"):
        return [(path.resolve().name, path / "final")]
    models = path / "models" if (path / "models").is_dir() else path
    if not models.is_dir():
        return []
    found = []
    for d in sorted(p for p in models.iterdir()
                    if p.is_dir() and p.name not in ("final", "last") and not p.name.startswith("passkey-")):
        if is_posbias(d / "final"):
            found.append((d.name, d / "final"))
        elif is_posbias(d) and not d.name.endswith((".tmp", ".old")):  # not a Hugging Face folder beside them
            found.append((d.name, d))
    return found


def subfolder_hint(path: str | Path) -> str:
    """``"; did you mean 'run/final'?"`` where a model folder was given instead of its checkpoint, and
    ``"; it holds 3 models: 'run/models/a/final', …"`` where a study's or retrofit's folder was (a job
    that takes one checkpoint)."""
    if hint := next((f"; did you mean {str(Path(path) / sub)!r}?" for sub in ("final", "last")
                     if exists(Path(path) / sub)), ""):
        return hint
    found = discover(path)  # (a path that is no folder holds none)
    models = f"{len(found)} models" if len(found) > 1 else "a model"
    return f"; it holds {models}: {store.listed(repr(str(p)) for _, p in found)}" if found else ""


def job_key(path: str | Path, *, corpus: str, settings: dict[str, Any], job: str, device: str) -> str:
    """The key of a job's results on the checkpoint at ``path`` (``retrofit``, ``diagnose``): the
    checkpoint's weights (hashed) and meta, the corpus fingerprint, the job's other ``settings``, and
    what its cache records as having made it, :func:`~posbias.store.made_by` of ``job`` on ``device``
    (the job's code, torch's version, the device by CPU or GPU model, not its index): the readable
    record and the key come from the same values."""
    from . import store

    p = _resolve(Path(path))
    return store.config_key({"weights": hashlib.sha256((p / MODEL_FILE).read_bytes()).hexdigest(),
                             "meta": read_meta(p), "corpus": corpus, "settings": settings,
                             "made_by": store.made_by(job, device)})


def pos_lr_mult(meta: dict[str, Any]) -> float:
    """The positional parameters' learning-rate multiplier a checkpoint was trained with
    (``train.pos_lr_mult``; 1 where it records none). Fine-tunes of the checkpoint use it too: a learned
    bias moves about its learning rate per Adam step, so at 1× a fresh or trained table barely moves
    in a short fine-tune (:func:`posbias.train.make_optimizer`). ValueError where the recorded value is
    not a positive number: a fine-tune at a silently wrong rate would report a wrong verdict."""
    return _recorded(check_rate, "pos_lr_mult", (meta.get("train") or {}).get("pos_lr_mult", 1.0))


def _recorded(check: Callable[[str, Any], Any], field: str, value: Any, where: str = "") -> Any:
    """``check("train.<field>", value)`` (a :mod:`posbias.config` rule) on a value a checkpoint records;
    its ConfigError as a ValueError saying the checkpoint's config.json is damaged."""
    try:
        return check(f"train.{field}", value)
    except ConfigError as exc:
        raise ValueError(f"{where}the checkpoint's {exc} (its config.json is damaged)") from None


def train_len(path: str | Path, meta: dict[str, Any] | None = None, *, missing_ok: bool = False) -> int | None:
    """The training length a checkpoint records (``train.train_len``; ``train.seq_len`` in checkpoints
    written before 0.1.0 renamed it). ValueError when it records one that is no positive integer (a
    boolean included), and when it records none unless ``missing_ok`` (then None)."""
    meta = read_meta(path) if meta is None else meta
    train = meta.get("train") or {}
    field = next((f for f in ("train_len", "seq_len") if f in train), None)
    if field is None:
        if missing_ok:
            return None
        raise ValueError(f"{str(path)!r} records no training length (meta 'train.train_len')")
    return _recorded(check_count, field, train[field], f"{str(path)!r} records no valid training length: ")
