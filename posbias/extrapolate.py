"""Train short, test long (SPEC §3.3): models that differ only in their positional scheme, trained at
one length with identical data, seed, size and steps, evaluated at many longer lengths.

Writes ``results.json`` (one record per scheme, seed and evaluation length), ``results.md`` (the
table) and PNG plots into the output folder. Finished models and evaluations are reused, and an
interrupted training resumes from its last checkpoint.

Study-specific scheme settings (so that every learned parameter is trained at the training length):
``offset`` uses ``max_distance = train_len``; ``t5`` uses ``max_distance = train_len`` (its final
bucket then starts inside the trained range); ``fire`` uses ``init_L = train_len`` so that its
progressive interpolation is active past the training length.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from . import __version__
from . import checkpoint as ckpt
from .data import Corpus, load_corpus
from .evaluate import evaluate_length
from .model import ModelConfig
from .schemes import get_scheme_class
from .train import TrainConfig, train

DEFAULT_SCHEMES = ("sinusoidal", "rope", "nope", "offset", "t5", "alibi", "kerple-log", "fire")


@dataclass(frozen=True)
class StudyConfig:
    schemes: tuple[str, ...] = DEFAULT_SCHEMES
    train_len: int = 128
    eval_lens: tuple[int, ...] = (128, 256, 512, 1024, 2048)
    steps: int = 600
    batch_size: int = 32
    lr: float = 2e-3
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    seeds: tuple[int, ...] = (0,)
    eval_tokens: int = 16384  # tokens scored at every length (same tokens for every length)
    eval_batch: int = 8
    stride: int | None = None  # sliding-window evaluation when set
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for s in self.schemes:
            get_scheme_class(s)
        if self.train_len < 1:
            raise ValueError(f"--train-len must be >= 1, got {self.train_len}")
        for n in self.eval_lens:
            if n < 1:
                raise ValueError(f"evaluation lengths must be >= 1, got {n}")
        if self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")


PRESETS: dict[str, dict[str, Any]] = {
    # ~10 minutes on a 2-core CPU: 8 schemes, train at 64 tokens, evaluate up to 16x
    "demo": dict(train_len=64, eval_lens=(64, 128, 256, 512, 1024), steps=250, batch_size=32, d_model=128,
                 n_layers=3, n_heads=4, eval_tokens=8192),
    # the default protocol, ~1 hour on a 2-core CPU
    "cpu": dict(train_len=128, eval_lens=(128, 256, 512, 1024, 2048), steps=1200, batch_size=32, d_model=128,
                n_layers=4, n_heads=4, eval_tokens=16384),
    # for a GPU: larger model, longer training, 3 seeds
    "gpu": dict(train_len=128, eval_lens=(128, 256, 512, 1024, 2048, 4096), steps=4000, batch_size=64,
                d_model=256, n_layers=6, n_heads=8, eval_tokens=65536, seeds=(0, 1, 2), device="cuda"),
}


def study_scheme_options(scheme: str, train_len: int) -> dict[str, Any]:
    if scheme in ("offset", "t5"):
        return {"max_distance": max(train_len, 17 if scheme == "t5" else 1)}
    if scheme == "fire":
        return {"init_L": float(train_len)}
    return {}


def _model_config(cfg: StudyConfig, scheme: str) -> ModelConfig:
    return ModelConfig(scheme=scheme, scheme_options=study_scheme_options(scheme, cfg.train_len),
                       d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads)


def _train_config(cfg: StudyConfig, seed: int) -> TrainConfig:
    return TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, seq_len=cfg.train_len, lr=cfg.lr,
                       warmup=max(1, cfg.steps // 12), eval_every=max(1, cfg.steps // 3),
                       ckpt_every=max(1, cfg.steps // 10), seed=seed)


def run_study(cfg: StudyConfig, out: str | Path, *, corpus: Corpus, progress: bool = True,
              log: Callable[[str], None] = lambda s: None) -> list[dict[str, Any]]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    positions: dict[str, list[float]] = {}
    for scheme in cfg.schemes:
        for seed in cfg.seeds:
            mdir = out / "models" / f"{scheme}-seed{seed}"
            mcfg, tcfg = _model_config(cfg, scheme), _train_config(cfg, seed)
            if ckpt.exists(mdir / "final"):
                log(f"[{scheme} seed {seed}] reusing trained model in {mdir / 'final'}")
            else:
                log(f"[{scheme} seed {seed}] training {cfg.steps} steps at length {cfg.train_len}")
                train(mcfg, tcfg, corpus.train, corpus.val, mdir, device=cfg.device, progress=progress,
                      extra_meta={"corpus": corpus.fingerprint})
            meta = ckpt.read_meta(mdir / "final")
            model = ckpt.load_model(mdir / "final").to(cfg.device)
            cache_file = mdir / "eval.json"
            cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
            for n in cfg.eval_lens:
                key = f"{n}:{cfg.eval_tokens}:{cfg.stride}"
                if key not in cache:
                    t0 = time.perf_counter()
                    cache[key] = evaluate_length(model, corpus.val, n, max_tokens=cfg.eval_tokens, stride=cfg.stride,
                                                 batch_size=cfg.eval_batch, device=cfg.device)
                    cache[key]["wall_s"] = time.perf_counter() - t0
                    cache_file.write_text(json.dumps(cache))
                r = cache[key]
                log(f"[{scheme} seed {seed}] length {n}: ppl {r['ppl']:.3f}")
                if "loss_by_position" in r and n == max(cfg.eval_lens) and seed == cfg.seeds[0]:
                    positions[scheme] = r["loss_by_position"]
                records.append({
                    "scheme": scheme, "seed": seed, "train_len": cfg.train_len, "eval_len": n,
                    "loss": r["loss"], "ppl": r["ppl"], "bpb": r["bpb"], "tokens": r["tokens"],
                    "stride": cfg.stride, "train_wall_s": meta.get("history", {}).get("wall_s"),
                    "final_val_loss": (meta.get("history", {}).get("val_loss") or [[None, None]])[-1][1],
                    "params": model.num_parameters(), "model": mcfg.to_dict(), "train": asdict(tcfg),
                })
    summary = {
        "records": records, "study": asdict(cfg), "corpus": corpus.fingerprint,
        "versions": {"posbias": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "machine": platform.platform(),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text(results_table(records, cfg))
    try:
        write_plots(records, positions, cfg, out)
    except ValueError as exc:  # matplotlib missing: the table and JSON are still written
        log(f"plots skipped: {exc}")
    return records


def _agg(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def results_table(records: list[dict[str, Any]], cfg: StudyConfig) -> str:
    lens = list(cfg.eval_lens)
    base = cfg.train_len if cfg.train_len in lens else lens[0]
    longest = max(lens)
    head = "| scheme | " + " | ".join(f"ppl @ {n}" for n in lens) + f" | ppl@{longest} / ppl@{base} |\n"
    head += "|---" * (len(lens) + 2) + "|\n"
    rows = []
    for s in cfg.schemes:
        cells = []
        for n in lens:
            cells.append(_agg([r["ppl"] for r in records if r["scheme"] == s and r["eval_len"] == n]))
        ratios = []
        for seed in cfg.seeds:
            a = [r["ppl"] for r in records if r["scheme"] == s and r["seed"] == seed and r["eval_len"] == longest]
            b = [r["ppl"] for r in records if r["scheme"] == s and r["seed"] == seed and r["eval_len"] == base]
            if a and b:
                ratios.append(a[0] / b[0])
        rows.append(f"| {s} | " + " | ".join(cells) + f" | {_agg(ratios)} |")
    seeds = ", ".join(map(str, cfg.seeds))
    note = (f"\nTrained at {cfg.train_len} tokens for {cfg.steps} steps (batch {cfg.batch_size}); "
            f"d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads; seeds {seeds}"
            f"{' (mean ± std)' if len(cfg.seeds) > 1 else ''}; {cfg.eval_tokens} validation tokens per length, "
            f"{'non-overlapping windows' if cfg.stride is None else f'sliding windows, stride {cfg.stride}'}.\n")
    return head + "\n".join(rows) + "\n" + note


def write_plots(records: list[dict[str, Any]], positions: dict[str, list[float]], cfg: StudyConfig,
                out: Path) -> list[Path]:
    from .plot import _pyplot, _save

    plt = _pyplot()
    paths = []
    fig, ax = plt.subplots(figsize=(8, 5))
    for s in cfg.schemes:
        xs, ys = [], []
        for n in cfg.eval_lens:
            v = [r["ppl"] for r in records if r["scheme"] == s and r["eval_len"] == n]
            if v:
                xs.append(n)
                ys.append(statistics.mean(v))
        ax.plot(xs, ys, marker="o", label=s)
    ax.axvline(cfg.train_len, color="grey", ls="--", lw=1, label=f"training length {cfg.train_len}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("perplexity (bytes)")
    ax.set_title("Train short, test long: perplexity versus evaluation length")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    paths.append(_save(fig, out / "ppl_vs_length.png"))

    if positions:
        fig, ax = plt.subplots(figsize=(8, 5))
        for s, losses in positions.items():
            y = torch.tensor(losses)
            k = max(1, len(losses) // 64)
            smooth = torch.nn.functional.avg_pool1d(y[None, None], k, k)[0, 0] if k > 1 else y
            ax.plot((torch.arange(len(smooth)) * k + k / 2).numpy(), smooth.numpy(), label=s, lw=1.2)
        ax.axvline(cfg.train_len, color="grey", ls="--", lw=1, label="training length")
        ax.set_xlabel("position inside the window")
        ax.set_ylabel("loss (nats / byte)")
        ax.set_title(f"Loss by position in {max(cfg.eval_lens)}-token windows")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        paths.append(_save(fig, out / "loss_vs_position.png"))

    from .plot import plot_bias_curves

    trained = []
    for s in cfg.schemes:
        p = out / "models" / f"{s}-seed{cfg.seeds[0]}" / "final"
        if get_scheme_class(s).family == "additive" and ckpt.exists(p):
            trained.append(ckpt.load_model(p).scheme)
    if trained:
        paths.append(plot_bias_curves(trained, out / "learned_bias_vs_distance.png",
                                      max_distance=max(cfg.eval_lens),
                                      title=f"learned biases after training at {cfg.train_len} tokens"))
    return paths


# -- CLI glue ---------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named configuration; flags override it")
    p.add_argument("--schemes", nargs="+", help=f"default: {' '.join(DEFAULT_SCHEMES)}")
    p.add_argument("--train-len", type=int)
    p.add_argument("--eval-lens", type=int, nargs="+")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--d-model", type=int)
    p.add_argument("--layers", dest="n_layers", type=int)
    p.add_argument("--heads", dest="n_heads", type=int)
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--eval-tokens", type=int)
    p.add_argument("--stride", type=int, help="sliding-window evaluation with this stride")
    p.add_argument("--device", help="cpu or cuda")
    p.add_argument("--data", help="a local text file or folder instead of the embedded default")
    p.add_argument("--hf-dataset", help="NAME[:CONFIG] of a Hugging Face dataset (needs posbias[datasets])")
    p.add_argument("--out", default="runs/study")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    values: dict[str, Any] = dict(PRESETS.get(args.preset, {})) if args.preset else {}
    for name in ("schemes", "train_len", "eval_lens", "steps", "batch_size", "lr", "d_model", "n_layers", "n_heads",
                 "seeds", "eval_tokens", "stride", "device"):
        v = getattr(args, name, None)
        if v is not None:
            values[name] = tuple(v) if isinstance(v, list) else v
    if values.get("device", "cpu").startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {values['device']} asked for, but no CUDA device is available")
    return StudyConfig(**values)


def run_from_args(args: argparse.Namespace) -> None:
    cfg = config_from_args(args)
    corpus = load_corpus(args.data, args.hf_dataset)
    fp = corpus.fingerprint
    print(f"corpus {fp['name']}: {fp['files']} files, {fp['bytes']:,} bytes, sha256 {fp['sha256']}")
    t0 = time.perf_counter()
    run_study(cfg, args.out, corpus=corpus, progress=not args.quiet, log=print)
    out = Path(args.out)
    print()
    print((out / "results.md").read_text())
    print(f"done in {time.perf_counter() - t0:.0f} s; table {out / 'results.md'}, records {out / 'results.json'}")
    for png in sorted(out.glob("*.png")):
        print(f"plot {png}")
