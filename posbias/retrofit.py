"""Retrofit a trained model to a longer context (SPEC §2.6 scalings; the textbook's long-context case).

A checkpoint trained at length ``L`` must serve ``to`` tokens (``factor = to / L``). Methods:

* RoPE checkpoints: ``pi`` (position interpolation, positions × 1/factor), ``ntk`` (base × λ,
  ``λ = factor^{d/(d−2)}``), ``dynamic-ntk`` (λ grows with the context), ``yarn`` (per-frequency
  interpolation plus attention temperature) — no new parameters;
* T5 checkpoints: ``t5-distance`` (``max_distance × factor``; the learned table is kept, so every
  bucket now covers longer distances: the buckets *move*, see :func:`bucket_remap`);
* any checkpoint: ``swap-alibi`` and ``swap-t5`` replace the scheme by a fresh ALiBi bias or a fresh
  T5 table (canonical 32 buckets, ``max_distance`` 128) and need the fine-tune. T5's logits are unscaled, so
  swapping to it folds ``1/√head_dim`` into the query weights (the model's function is unchanged
  before fine-tuning, apart from the new bias).

Each method can be followed by ``finetune_steps`` of language modelling at the new length.
:func:`run_retrofit` writes the before/after perplexity table and plot; with ``compare=True`` it
adds the decision table of the case study: perplexity at L and 4L–16L, near-range perplexity,
passkey accuracy, extra parameters and relative attention cost.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from . import checkpoint as ckpt
from . import store
from . import passkey
from .data import Corpus, batch_at
from .evaluate import evaluate_length
from .finetune import finetune
from .model import ModelConfig, TransformerLM
from .schemes.t5 import t5_bucket


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    source: str | None  # the scheme a checkpoint must have (None: any)
    target: Callable[[ModelConfig, int, float], tuple[str, dict[str, Any]]]  # (cfg, L, factor) → scheme, options


def _rope(scaling: str) -> Callable[[ModelConfig, int, float], tuple[str, dict[str, Any]]]:
    def target(cfg: ModelConfig, train_len: int, factor: float) -> tuple[str, dict[str, Any]]:
        return "rope", {**cfg.scheme_options, "scaling": scaling, "factor": factor, "train_len": train_len}
    return target


def _t5_distance(cfg: ModelConfig, train_len: int, factor: float) -> tuple[str, dict[str, Any]]:
    md = cfg.scheme_options.get("max_distance", 128)
    return "t5", {**cfg.scheme_options, "max_distance": int(round(md * factor))}


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("pi", "RoPE position interpolation: positions × L/target", "rope", _rope("pi")),
    Method("ntk", "RoPE base scaling (NTK-aware): base × factor^(d/(d−2))", "rope", _rope("ntk")),
    Method("dynamic-ntk", "NTK scaling whose factor grows with the context length", "rope", _rope("dynamic-ntk")),
    Method("yarn", "YaRN: per-frequency interpolation + attention temperature", "rope", _rope("yarn")),
    Method("t5-distance", "T5 with max_distance × factor (the learned buckets move)", "t5", _t5_distance),
    Method("swap-alibi", "replace the scheme by ALiBi (fixed slopes), then fine-tune", None,
           lambda cfg, L, f: ("alibi", {})),
    Method("swap-t5", "replace the scheme by a fresh T5 bias (32 buckets, max_distance 128), then fine-tune",
           None, lambda cfg, L, f: ("t5", {})),
)}


def applicable(method: str, scheme: str) -> str | None:
    """None if ``method`` fits a checkpoint with ``scheme``, else why not."""
    if method not in METHODS:
        return f"unknown method {method!r}; valid: {', '.join(METHODS)}"
    m = METHODS[method]
    if m.source is not None and m.source != scheme:
        return f"method {method!r} needs a {m.source} checkpoint, this one uses {scheme!r}"
    if m.source is None and m.target(ModelConfig(scheme=scheme), 1, 1.0)[0] == scheme:
        return f"method {method!r} swaps to {scheme!r}, which this checkpoint already uses"
    return None


def methods_for(scheme: str) -> list[str]:
    return [m for m in METHODS if applicable(m, scheme) is None]


def retrofit_model(model: TransformerLM, method: str, *, train_len: int, to: int) -> TransformerLM:
    """A new model: ``model``'s weights with the scheme changed by ``method`` for ``to`` tokens."""
    why = applicable(method, model.cfg.scheme)
    if why:
        raise ValueError(why)
    if to <= train_len:
        raise ValueError(f"--to must exceed the training length {train_len}, got {to}")
    scheme, options = METHODS[method].target(model.cfg, train_len, to / train_len)
    cfg = replace(model.cfg, scheme=scheme, scheme_options=options)
    new = TransformerLM(cfg)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("scheme.")}
    keep = {k: v for k, v in model.state_dict().items() if k.startswith("scheme.")} if scheme == model.cfg.scheme else {}
    missing, unexpected = new.load_state_dict({**state, **keep}, strict=False)
    assert not unexpected and all(k.startswith("scheme.") for k in missing), (missing, unexpected)
    if new.scheme.unscaled != model.scheme.unscaled:  # keep scale·q·k unchanged across the swap
        ratio = new.scheme.default_scale() / model.scheme.default_scale()
        with torch.no_grad():
            for block in new.blocks:
                block.attn.qkv.weight[: cfg.d_model].div_(ratio)
    return new.to(next(model.parameters()).device)


def bucket_remap(num_buckets: int, old_max: int, new_max: int, distances: list[int]) -> list[tuple[int, int, int]]:
    """(distance, bucket before, bucket after) for a change of T5 ``max_distance``."""
    d = torch.tensor(distances)
    a = t5_bucket(d, num_buckets=num_buckets, max_distance=old_max)
    b = t5_bucket(d, num_buckets=num_buckets, max_distance=new_max)
    return list(zip(distances, a.tolist(), b.tolist()))


def default_eval_lens(train_len: int, to: int) -> list[int]:
    lens, n = [], train_len
    while n < to:
        lens.append(n)
        n *= 2
    return lens + [to]


def _time_forward(model: TransformerLM, length: int, device: str, reps: int = 3) -> float:
    x = torch.randint(0, model.cfg.vocab_size, (1, length), device=device)
    with torch.no_grad():
        model(x)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def _relative_cost(model: TransformerLM, base: TransformerLM, length: int, device: str) -> float:
    """Forward time at ``length`` relative to ``base``, the two timed back to back (a shared machine's
    load drifts; adjacent measurements share it)."""
    return _time_forward(model, length, device) / _time_forward(base, length, device)


@dataclass(frozen=True)
class RetrofitConfig:
    to: int
    methods: tuple[str, ...]
    finetune_steps: int = 0
    finetune_batch: int = 4
    finetune_lr: float = 3e-4
    eval_lens: tuple[int, ...] | None = None
    eval_tokens: int = 8192
    compare: bool = False
    passkey_steps: int = 600
    passkey_samples: int = 32
    device: str = "cpu"
    seed: int = 0


def run_retrofit(path: str | Path, cfg: RetrofitConfig, out: str | Path, *, corpus: Corpus, progress: bool = True,
                 log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    meta = ckpt.read_meta(path)
    base = ckpt.load_model(path).to(cfg.device).eval()
    train_len = int(meta.get("train", {}).get("seq_len") or 0)
    if train_len < 1:
        raise ValueError(f"{str(path)!r} records no training length (meta 'train.seq_len')")
    if cfg.to <= train_len:
        raise ValueError(f"--to must exceed the training length {train_len}, got {cfg.to}")
    for m in cfg.methods:
        why = applicable(m, base.cfg.scheme)
        if why:
            raise ValueError(f"{why} (methods for {base.cfg.scheme}: {', '.join(methods_for(base.cfg.scheme)) or 'none'})")
    lens = list(cfg.eval_lens or default_eval_lens(train_len, cfg.to))
    out = store.check_out_dir(out)
    with store.FolderLock(out):
        return _run_retrofit(path, cfg, out, meta, base, train_len, lens, corpus, progress, log)


def source_key(path: str | Path, meta: dict[str, Any], cfg: RetrofitConfig, corpus: Corpus) -> str:
    """Everything the cached numbers depend on besides the method and the length: the checkpoint's
    weights (hashed) and meta, the corpus, and every setting of fine-tuning, evaluation and passkey."""
    digest = hashlib.sha256((ckpt.require(path) / ckpt.MODEL_FILE).read_bytes()).hexdigest()
    settings = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__ if k not in ("methods", "compare", "eval_lens")}
    return store.config_key({"weights": digest, "meta": meta, "corpus": corpus.fingerprint,
                             "settings": settings, "torch": torch.__version__})


def _run_retrofit(path, cfg: RetrofitConfig, out: Path, meta, base, train_len: int, lens: list[int], corpus: Corpus,
                  progress: bool, log: Callable[[str], None]) -> dict[str, Any]:
    key = source_key(path, meta, cfg, corpus)
    cache_file = out / f"cache-{key}.json"
    cache: dict[str, Any] = store.read_json(cache_file) if cache_file.exists() else {}

    def save_cache() -> None:
        store.write_json(cache_file, cache, indent=None)

    def evaluate(model: TransformerLM, label: str) -> dict[str, float]:
        got = cache.setdefault(f"ppl:{label}:{cfg.eval_tokens}", {})
        for n in lens:
            if str(n) not in got:
                got[str(n)] = evaluate_length(model, corpus.val, n, max_tokens=cfg.eval_tokens,
                                              device=cfg.device)["ppl"]
                save_cache()
            log(f"[{label}] ppl @ {n}: {got[str(n)]:.3f}")
        return {int(k): v for k, v in got.items() if int(k) in lens}

    def passkey_of(model: TransformerLM, label: str) -> dict[str, float]:
        key = f"passkey:{label}:{cfg.passkey_steps}:{cfg.passkey_samples}"
        if key not in cache:
            copy = TransformerLM(model.cfg).to(cfg.device)
            copy.load_state_dict(model.state_dict())
            passkey.train_passkey(copy, length=train_len, steps=cfg.passkey_steps, seed=cfg.seed, device=cfg.device,
                                  progress=progress)
            grid = passkey.accuracy_grid(copy, [train_len, cfg.to], passkey.default_depths(5),
                                         samples=cfg.passkey_samples, device=cfg.device)
            cache[key] = {str(n): passkey.mean_accuracy(grid, n) for n in grid}
            save_cache()
        log(f"[{label}] passkey accuracy: " + ", ".join(f"@{n} {a:.2f}" for n, a in cache[key].items()))
        return {int(k): v for k, v in cache[key].items()}

    rows: list[dict[str, Any]] = []
    before = evaluate(base, "original")
    rows.append({"method": "original", "stage": "before", "scheme": base.cfg.scheme, "ppl": before,
                 "extra_params": 0, "passkey": passkey_of(base, "original") if cfg.compare else None,
                 "attention_cost": 1.0 if cfg.compare else None})
    remaps = {}
    for k, m in enumerate(cfg.methods, 1):
        plan = "no fine-tune" + (f", then a {cfg.finetune_steps}-step fine-tune at {cfg.to}" if cfg.finetune_steps else "")
        log(f"method {k}/{len(cfg.methods)}: {m} ({plan}{', passkey' if cfg.compare else ''})")
        model = retrofit_model(base, m, train_len=train_len, to=cfg.to)
        extra = model.num_parameters() - base.num_parameters()
        if m == "t5-distance":
            s0, s1 = base.scheme, model.scheme
            dists = sorted({1, 8, 16, 32, train_len // 2, train_len, 2 * train_len, cfg.to // 2, cfg.to})
            remaps[m] = bucket_remap(s0.num_buckets, s0.max_distance, s1.max_distance, dists)
        stages = [("no fine-tune", model)]
        if cfg.finetune_steps:
            mdir = out / "models" / f"{m}-ft{cfg.finetune_steps}-{key}"
            if ckpt.exists(mdir):
                tuned = ckpt.load_model(mdir).to(cfg.device)
                log(f"[{m}] reusing fine-tuned model in {mdir}")
            else:
                tuned = TransformerLM(model.cfg).to(cfg.device)
                tuned.load_state_dict(model.state_dict())
                bs = cfg.finetune_batch
                finetune(tuned, lambda step: batch_at(corpus.train, step, batch_size=bs, seq_len=cfg.to,
                                                      seed=cfg.seed + 1),
                         lambda mod, b: mod.loss(b[0].long().to(cfg.device), b[1].long().to(cfg.device)),
                         steps=cfg.finetune_steps, lr=cfg.finetune_lr, progress=progress, desc=f"fine-tune {m}")
                ckpt.save_checkpoint(mdir, tuned, extra={"train": {**meta.get("train", {})}, "retrofit": {
                    "method": m, "to": cfg.to, "finetune_steps": cfg.finetune_steps, "source": str(path)}})
            stages.append((f"fine-tuned {cfg.finetune_steps}", tuned))
        for n_stage, (stage, mod) in enumerate(stages):
            label = f"{m}/{stage}"
            final = n_stage == len(stages) - 1  # passkey (minutes each) only for what the method ends with
            rows.append({"method": m, "stage": stage, "scheme": mod.cfg.scheme, "options": mod.cfg.scheme_options,
                         "ppl": evaluate(mod, label), "extra_params": extra,
                         "passkey": passkey_of(mod, label) if cfg.compare and final else None,
                         "attention_cost": _relative_cost(mod, base, cfg.to, cfg.device) if cfg.compare else None})
    result = {"checkpoint": str(path), "train_len": train_len, "to": cfg.to, "eval_lens": lens, "rows": rows,
              "bucket_remap": remaps, "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
              "corpus": corpus.fingerprint}
    store.write_json(out / "results.json", result)
    store.write_text(out / "results.md", retrofit_table(result))
    try:
        plot_retrofit(result, out / "ppl_vs_length.png")
    except ValueError as exc:  # matplotlib missing
        log(f"plot skipped: {exc}")
    return result


def retrofit_table(result: dict[str, Any]) -> str:
    lens, L, to = result["eval_lens"], result["train_len"], result["to"]
    lines = [f"Retrofit of `{result['checkpoint']}` (trained at L = {L}) to {to} tokens.", "",
             "| method | stage | " + " | ".join(f"ppl @ {n}" for n in lens) + f" | ppl@{to} / ppl@{L} (before) |",
             "|---" * (len(lens) + 3) + "|"]
    ref = result["rows"][0]["ppl"][L] if L in result["rows"][0]["ppl"] else math.nan
    for r in result["rows"]:
        cells = " | ".join(f"{r['ppl'][n]:.3f}" for n in lens)
        lines.append(f"| {r['method']} | {r['stage']} | {cells} | {r['ppl'][to] / ref:.2f} |")
    if any(r.get("passkey") for r in result["rows"]):
        near = f"near-range ppl @ {L}"
        lines += ["", "Decision table (passkey: trained at L, mean accuracy over 5 depths; attention cost: a "
                  f"forward pass at {to} tokens relative to the original model, same run):", "",
                  f"| method | stage | {near} | " + " | ".join(f"ppl @ {n}" for n in lens if n > L) +
                  f" | passkey @ {L} | passkey @ {to} | extra params | attention cost |",
                  "|---" * (7 + sum(1 for n in lens if n > L)) + "|"]
        for r in result["rows"]:
            if not r.get("passkey"):
                continue
            far = " | ".join(f"{r['ppl'][n]:.3f}" for n in lens if n > L)
            pk = r["passkey"]
            lines.append(f"| {r['method']} | {r['stage']} | {r['ppl'][L]:.3f} | {far} | {pk[L]:.2f} | {pk[to]:.2f} | "
                         f"{r['extra_params']:+d} | {r['attention_cost']:.2f}× |")
    for m, rows in result.get("bucket_remap", {}).items():
        lines += ["", f"`{m}`: the learned table is kept, so distances land in other buckets:", "",
                  "| distance | bucket before | bucket after |", "|---|---|---|"]
        lines += [f"| {d} | {a} | {b} |" for d, a, b in rows]
    return "\n".join(lines) + "\n"


STAGE_STYLES = {"before": ":", "no fine-tune": "--"}  # fine-tuned stages: solid


def plot_retrofit(result: dict[str, Any], path: Path) -> Path:
    """One colour per method, one line style per stage (dotted: before, dashed: no fine-tune, solid:
    fine-tuned), legend outside the axes so it never covers the data."""
    from .plot import _pyplot, _save, plain_log_ticks

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    colour = {m: cmap(k) for k, m in enumerate(methods)}
    for r in result["rows"]:
        xs = sorted(r["ppl"], key=int)
        ax.plot([int(x) for x in xs], [r["ppl"][n] for n in xs], STAGE_STYLES.get(r["stage"], "-"), marker="o",
                ms=4, color=colour[r["method"]], label=f"{r['method']} ({r['stage']})")
    ax.axvline(result["train_len"], color="grey", ls=":", lw=1, label="training length")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    plain_log_ticks(ax)
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("perplexity (bytes)")
    ax.set_title(f"Retrofit to {result['to']} tokens (dotted: before, dashed: no fine-tune, solid: fine-tuned)",
                 fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


# -- CLI glue ---------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("checkpoint", help="a posbias checkpoint folder (e.g. runs/demo/models/rope-seed0/final)")
    p.add_argument("--to", type=int, required=True, help="the target context length")
    p.add_argument("--method", "--methods", dest="methods", nargs="+", choices=sorted(METHODS), metavar="METHOD",
                   help=f"one or more of: {', '.join(METHODS)} (default with --compare: every method that fits)")
    p.add_argument("--compare", action="store_true",
                   help="the decision table: every fitting method, passkey accuracy, extra parameters, attention cost")
    p.add_argument("--finetune-steps", type=int, default=0, help="language-model fine-tune at --to after each method")
    p.add_argument("--finetune-batch", type=int, default=4)
    p.add_argument("--finetune-lr", type=float, default=3e-4)
    p.add_argument("--eval-lens", type=int, nargs="+", help="default: L, 2L, 4L … up to --to")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--passkey-steps", type=int, default=600, help="passkey fine-tune steps (with --compare)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", help="a local text file or folder instead of the embedded default")
    p.add_argument("--out", help="default: runs/retrofit-<checkpoint name>")
    p.add_argument("--quiet", action="store_true")


def run_from_args(args, say: Callable[[str], None] = print) -> None:
    from .data import load_corpus

    ckpt.require(args.checkpoint)
    scheme = ckpt.read_meta(args.checkpoint)["model"]["scheme"]
    methods = args.methods or (methods_for(scheme) if args.compare else None)
    if not methods:
        raise ValueError(f"give --method (for a {scheme} checkpoint: {', '.join(methods_for(scheme)) or 'none'}) "
                         "or --compare")
    if args.finetune_steps < 0 or args.passkey_steps < 0:
        raise ValueError("--finetune-steps and --passkey-steps must be >= 0")
    for flag in ("finetune_batch", "eval_tokens", "to"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not (math.isfinite(args.finetune_lr) and args.finetune_lr > 0):
        raise ValueError(f"--finetune-lr must be a finite number > 0, got {args.finetune_lr}")
    for n in args.eval_lens or []:
        if n < 1:
            raise ValueError(f"evaluation lengths must be >= 1, got {n}")
    cfg = RetrofitConfig(to=args.to, methods=tuple(methods), finetune_steps=args.finetune_steps,
                         finetune_batch=args.finetune_batch, finetune_lr=args.finetune_lr,
                         eval_lens=tuple(args.eval_lens) if args.eval_lens else None, eval_tokens=args.eval_tokens,
                         compare=args.compare, passkey_steps=args.passkey_steps, device=args.device)
    out = Path(args.out or f"runs/retrofit-{Path(args.checkpoint).resolve().parent.name}")
    corpus = load_corpus(args.data)
    t0 = time.perf_counter()
    run_retrofit(args.checkpoint, cfg, out, corpus=corpus, progress=not args.quiet, log=say)
    say()
    say((out / "results.md").read_text())
    say(f"done in {time.perf_counter() - t0:.0f} s; table {out / 'results.md'}, plot {out / 'ppl_vs_length.png'}")
