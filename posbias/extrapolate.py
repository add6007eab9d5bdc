"""Train short, test long: models that differ only in their positional scheme, trained at one length
with identical data, seed, size and steps, scored at many longer lengths on the same tokens.

Shape: :class:`StudyConfig` (frozen) → :func:`run_study` (no printing; progress through ``log``) →
:func:`results_table` / :func:`write_plots` (Markdown and PNGs from the records).

Trust rules:

* **Results are keyed by everything that made them.** A model lives in
  ``models/<label>-seed<seed>-<key>/`` where ``key`` hashes the model config (scheme options
  included), the training config, the corpus fingerprint, the thread count, the device and the
  torch version; its evaluation in ``eval-<key>.json`` keyed by those and every evaluation setting.
  A changed setting trains and evaluates afresh in a folder of its own; nothing is reused under
  another setting.
* **Every number carries its uncertainty**: a 95% bootstrap interval over text segments (paired
  across lengths, :func:`posbias.evaluate.length_study`); seeds give mean ± std.
* **Fixed threads**: ``torch.set_num_threads(threads)`` for the whole run; results are bit-identical
  for the same key on one machine.
* **A fair optimizer for positional parameters**: they get their own AdamW group at
  ``pos_lr_mult × lr`` without weight decay (:func:`posbias.train.make_optimizer` says why).

Scheme options: each scheme's own :meth:`~posbias.schemes.Scheme.study_defaults` (T5 and the offset
table: the far bucket sees canonical T5's share of training pairs; FIRE: the reference ``init_L``),
then the user's ``scheme_options`` per scheme name, then options in the label itself
(``t5@max_distance=64``), so one scheme can appear twice with different options.
"""

from __future__ import annotations

import math
import platform
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import __version__
from . import checkpoint as ckpt
from . import store
from .data import Corpus
from .evaluate import check_study_lengths, length_study
from .model import ModelConfig, TransformerLM
from .schemes import Scheme, check_options, get_scheme_class, parse_spec, spec_label
from .schemes.base import flat_share
from .train import TrainConfig, train

DEFAULT_SCHEMES = ("sinusoidal", "rope", "nope", "offset", "t5", "alibi", "kerple-log", "fire")
EVAL_FORMAT = 2  # bump when the evaluation's definition changes: old caches are then not reused
N_BOOT = 2000  # bootstrap replicates per interval


@dataclass(frozen=True)
class StudyConfig:
    schemes: tuple[str, ...] = DEFAULT_SCHEMES  # scheme labels: NAME or NAME@KEY=VALUE[,KEY=VALUE]
    scheme_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per scheme name, over study defaults
    train_len: int = 128  # training length L (tokens)
    eval_lens: tuple[int, ...] = (128, 256, 512, 1024, 2048)  # must include L; each divides the longest
    steps: int = 600  # optimizer steps per model
    batch_size: int = 32  # sequences per step
    lr: float = 2e-3  # peak learning rate of the weights
    pos_lr_mult: float = 100.0  # positional parameters' lr multiplier (see posbias.train.make_optimizer)
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    seeds: tuple[int, ...] = (0,)
    eval_tokens: int = 16384  # validation tokens scored at every length (rounded down to whole longest windows)
    eval_batch: int = 8  # windows per evaluation forward
    threads: int = 2  # torch intra-op threads, fixed for reproducibility (part of every result's key)
    device: str = "cpu"

    def __post_init__(self) -> None:
        labels = [spec_label(*parse_spec(s)) for s in self.schemes]
        if not labels:
            raise ValueError("give at least one scheme")
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"scheme {dup[0]!r} is listed twice; give the copies different options")
        for name, opts in self.scheme_options.items():
            check_options(name, opts)
        _positive("--train-len", self.train_len)
        for n in self.eval_lens:
            _positive("evaluation lengths", n)
        for name in ("steps", "batch_size", "d_model", "n_layers", "n_heads", "eval_tokens", "eval_batch", "threads"):
            _positive(FLAGS.get(name, "--" + name.replace("_", "-")), getattr(self, name))
        if not self.seeds:
            raise ValueError("give at least one seed")
        for name in ("lr", "pos_lr_mult"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0, got {v!r}")
        lens = check_study_lengths(self.eval_lens, self.train_len)
        if self.eval_tokens < lens[-1]:
            raise ValueError(f"--eval-tokens {self.eval_tokens} is fewer than the longest evaluation length {lens[-1]}")
        if self.d_model % self.n_heads:
            raise ValueError(f"--d-model {self.d_model} must be divisible by --heads {self.n_heads}")

    def lengths(self) -> list[int]:
        return sorted(set(self.eval_lens))


#: command-line flags whose names differ from the config field
FLAGS = {"n_layers": "--layers", "n_heads": "--heads"}


def _positive(flag: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{flag} must be an integer >= 1, got {v!r}")


PRESETS: dict[str, dict[str, Any]] = {
    # ~10 minutes on a 2-core CPU: 8 schemes, train at 64 tokens, evaluate up to 16x on 16 segments
    "demo": dict(train_len=64, eval_lens=(64, 128, 256, 512, 1024), steps=250, batch_size=32, d_model=128,
                 n_layers=3, n_heads=4, eval_tokens=16384),
    # the longer CPU protocol, ~1 hour on a 2-core CPU
    "cpu": dict(train_len=128, eval_lens=(128, 256, 512, 1024, 2048), steps=1200, batch_size=32, d_model=128,
                n_layers=4, n_heads=4, eval_tokens=65536),
    # for a GPU: larger model, longer training, 3 seeds
    "gpu": dict(train_len=128, eval_lens=(128, 256, 512, 1024, 2048, 4096), steps=4000, batch_size=64,
                d_model=256, n_layers=6, n_heads=8, eval_tokens=131072, seeds=(0, 1, 2), device="cuda"),
}


@dataclass(frozen=True)
class Arm:
    """One scheme of the study with its resolved options."""

    label: str
    scheme: str
    options: dict[str, Any]


def arms(cfg: StudyConfig) -> list[Arm]:
    """Each label's scheme and options: scheme study defaults < ``scheme_options`` < the label's own."""
    out = []
    for spec in cfg.schemes:
        name, own = parse_spec(spec)
        user = {**cfg.scheme_options.get(name, {}), **own}
        options = {**get_scheme_class(name).study_defaults(cfg.train_len, user), **user}
        out.append(Arm(spec_label(name, own), name, check_options(name, options)))
    return out


def model_config(cfg: StudyConfig, arm: Arm) -> ModelConfig:
    return ModelConfig(scheme=arm.scheme, scheme_options=arm.options, d_model=cfg.d_model, n_layers=cfg.n_layers,
                       n_heads=cfg.n_heads)


def train_config(cfg: StudyConfig, seed: int) -> TrainConfig:
    return TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, seq_len=cfg.train_len, lr=cfg.lr,
                       pos_lr_mult=cfg.pos_lr_mult, warmup=max(1, cfg.steps // 12),
                       eval_every=max(1, cfg.steps // 3), ckpt_every=max(1, cfg.steps // 10), seed=seed)


def model_key(cfg: StudyConfig, arm: Arm, seed: int, corpus: Corpus) -> dict[str, Any]:
    """Everything that makes a trained model."""
    return {"model": model_config(cfg, arm).to_dict(), "train": asdict(train_config(cfg, seed)),
            "corpus": corpus.fingerprint, "threads": cfg.threads, "device": cfg.device, "torch": torch.__version__}


def eval_key(cfg: StudyConfig, mkey: dict[str, Any]) -> dict[str, Any]:
    """Everything that makes an evaluation of that model."""
    return {"model_key": mkey, "lengths": cfg.lengths(), "train_len": cfg.train_len, "eval_tokens": cfg.eval_tokens,
            "eval_batch": cfg.eval_batch, "n_boot": N_BOOT, "format": EVAL_FORMAT}


def _folder_name(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in label)


def learned_summary(model: TransformerLM, train_len: int) -> dict[str, Any]:
    """What the positional parameters learned: each parameter's range, and for additive schemes the
    bias a query at position L−1 gives keys at distances 0 … L−1 (all heads)."""
    s = model.scheme
    out: dict[str, Any] = {"params": {n: [float(p.detach().min()), float(p.detach().max())]
                                      for n, p in s.named_parameters()}}
    if s.family == "additive":
        with torch.no_grad():
            q = torch.tensor([train_len - 1])
            b = s.bias(q, torch.arange(train_len))[:, 0, :].float()  # [H, L], distance L−1 … 0
        out["bias_range"] = [float(b.min()), float(b.max())]
        out["bias_contrast"] = float((b[:, -1] - b[:, 0]).abs().max())  # |bias(0) − bias(L−1)|, largest head
    flat = getattr(s, "flat_beyond", None)
    if s.learnable and flat is not None:
        out["final_share"] = flat_share(flat, train_len)
    return out


def run_study(cfg: StudyConfig, out: str | Path, *, corpus: Corpus, progress: bool = True, keep_last: bool = True,
              log: Callable[[str], None] = lambda s: None) -> list[dict[str, Any]]:
    """Train (or reuse, under the same key) and evaluate every scheme and seed; write ``results.json``,
    ``results.md`` and the PNGs into ``out``; return the records. One run per folder at a time.
    ``keep_last=False`` deletes each model's ``last/`` checkpoint (mostly optimizer state) once its
    ``final/`` exists; it changes no result."""
    out = store.check_out_dir(out)
    budget = min(cfg.eval_tokens, corpus.val.numel() - 1) // max(cfg.lengths()) * max(cfg.lengths())
    if budget < max(cfg.lengths()):
        raise ValueError(f"the validation split has {corpus.val.numel() - 1} scoreable tokens, fewer than the "
                         f"longest evaluation length {max(cfg.lengths())}; use shorter --eval-lens or more --data")
    if corpus.train.numel() <= cfg.train_len + 1:
        raise ValueError(f"the training split has {corpus.train.numel()} tokens, fewer than --train-len + 1 = "
                         f"{cfg.train_len + 1}; use a shorter --train-len or more --data")
    with store.FolderLock(out):
        old_threads = torch.get_num_threads()
        torch.set_num_threads(cfg.threads)
        try:
            records, positions, learned = _run(cfg, out, corpus, progress, keep_last, log)
        finally:
            torch.set_num_threads(old_threads)
        summary = {
            "records": records, "study": asdict(cfg), "corpus": corpus.fingerprint, "threads": cfg.threads,
            "versions": {"posbias": __version__, "torch": torch.__version__, "python": platform.python_version()},
            "machine": platform.platform(),
        }
        store.write_json(out / "results.json", summary)
        store.write_text(out / "results.md", results_table(records, cfg))
        try:
            write_plots(records, positions, learned, cfg, out)
        except ValueError as exc:  # matplotlib missing: the table and JSON are still written
            log(f"plots skipped: {exc}")
    return records


def _run(cfg: StudyConfig, out: Path, corpus: Corpus, progress: bool, keep_last: bool, log: Callable[[str], None]
         ) -> tuple[list[dict[str, Any]], dict[str, list[float]], dict[str, Scheme]]:
    """The records; the first seed's loss by position at the longest length and its additive schemes
    (for the plots), per label."""
    records: list[dict[str, Any]] = []
    positions: dict[str, list[float]] = {}
    schemes: dict[str, Scheme] = {}
    study_arms = arms(cfg)
    total = len(study_arms) * len(cfg.seeds)
    done = 0
    trained_s: list[float] = []  # wall time of each model trained in this run, for the ETA
    for arm in study_arms:
        for seed in cfg.seeds:
            done += 1
            tag = f"[{done}/{total} {arm.label} seed {seed}]"
            mkey = model_key(cfg, arm, seed, corpus)
            mdir = out / "models" / f"{_folder_name(arm.label)}-seed{seed}-{store.config_key(mkey)}"
            if ckpt.exists(mdir / "final"):
                log(f"{tag} reusing the model trained with these exact settings in {mdir / 'final'}")
            else:
                log(f"{tag} training {cfg.steps} steps at length {cfg.train_len} ({arm.options or 'no options'})")
                store.write_json(mdir / "key.json", mkey)
                t0 = time.perf_counter()
                train(model_config(cfg, arm), train_config(cfg, seed), corpus.train, corpus.val, mdir,
                      device=cfg.device, progress=progress, extra_meta={"corpus": corpus.fingerprint, "key": mkey},
                      log=log)
                trained_s.append(time.perf_counter() - t0)
                left = total - done
                if left:
                    eta = statistics.mean(trained_s) * left / 60
                    log(f"{tag} trained in {trained_s[-1]:.0f} s; at most about {eta:.0f} min left for {left} model(s)")
            if not keep_last and (mdir / "last").exists():
                shutil.rmtree(mdir / "last")
            meta = ckpt.read_meta(mdir / "final")
            model = ckpt.load_model(mdir / "final").to(cfg.device)
            ekey = eval_key(cfg, mkey)
            efile = mdir / f"eval-{store.config_key(ekey)}.json"
            if efile.exists():
                scores = {int(k): v for k, v in store.read_json(efile)["scores"].items()}
            else:
                t0 = time.perf_counter()
                scores = length_study(model, corpus.val, cfg.lengths(), train_len=cfg.train_len,
                                      n_tokens=cfg.eval_tokens, batch_size=cfg.eval_batch, device=cfg.device,
                                      n_boot=N_BOOT, seed=seed)
                store.write_json(efile, {"key": ekey, "wall_s": time.perf_counter() - t0,
                                         "scores": {str(k): v for k, v in scores.items()}})
            learned = learned_summary(model, cfg.train_len)
            if seed == cfg.seeds[0] and model.scheme.family == "additive":
                schemes[arm.label] = model.scheme.cpu()
            hist = meta.get("history", {})
            for n in cfg.lengths():
                r = scores[n]
                log(f"{tag} length {n}: ppl {r['ppl']:.3f} [{r['ppl_lo']:.3f}, {r['ppl_hi']:.3f}]")
                if r.get("loss_by_position") and seed == cfg.seeds[0]:
                    positions[arm.label] = r["loss_by_position"]
                records.append({
                    "label": arm.label, "scheme": arm.scheme, "seed": seed, "train_len": cfg.train_len,
                    **{k: v for k, v in r.items() if k != "loss_by_position"},
                    "train_wall_s": hist.get("wall_s"),
                    "final_val_loss": (hist.get("val_loss") or [[None, None]])[-1][1],
                    "params": model.num_parameters(), "learned": learned, "model": model.cfg.to_dict(),
                    "train": meta.get("train"), "threads": cfg.threads, "model_dir": str(mdir),
                })
    return records, positions, schemes


# -- rendering --------------------------------------------------------------------------------
def _pick(records: list[dict[str, Any]], label: str, n: int) -> list[dict[str, Any]]:
    return [r for r in records if r["label"] == label and r["eval_len"] == n]


def _cell(rs: list[dict[str, Any]], key: str, fmt: str = ".2f") -> str:
    """One seed: value [lo, hi]; several: mean ± std over seeds."""
    if not rs:
        return "–"
    if len(rs) == 1:
        r = rs[0]
        return f"{r[key]:{fmt}} [{r[key + '_lo']:{fmt}}, {r[key + '_hi']:{fmt}}]"
    v = [r[key] for r in rs]
    return f"{statistics.mean(v):{fmt}} ± {statistics.stdev(v):{fmt.lstrip('+')}}"


def results_table(records: list[dict[str, Any]], cfg: StudyConfig) -> str:
    study_arms = arms(cfg)
    labels = [a.label for a in study_arms]
    lens, base = cfg.lengths(), cfg.train_len
    longest = lens[-1]
    many = len(cfg.seeds) > 1
    what = "mean ± std over seeds" if many else "95% bootstrap interval"
    lines = [f"### Perplexity by evaluation length ({what})", "",
             "| scheme | " + " | ".join(f"ppl @ {n}" for n in lens) + f" | ppl@{longest} / ppl@{base} |",
             "|---" * (len(lens) + 2) + "|"]
    for label in labels:
        cells = [_cell(_pick(records, label, n), "ppl") for n in lens]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_cell(_pick(records, label, longest), 'ratio', '.3f')} |")
    far = [n for n in lens if n > base]
    if far:
        lines += ["", f"### Beyond the training length: the last {base} tokens of each window, with n − {base} … n − 1 "
                  f"tokens of context, against the same tokens scored in windows of {base} (Δ nats/byte; < 0: the "
                  "longer context helps, > 0: the model breaks past L)", "",
                  "| scheme | " + " | ".join(f"Δ @ {n}" for n in far) + " |", "|---" * (len(far) + 1) + "|"]
        for label in labels:
            lines.append(f"| {label} | " + " | ".join(_cell(_pick(records, label, n), "tail_delta", "+.3f")
                                                   for n in far) + " |")
    lines += ["", f"### What the positional parameters learned (seed {cfg.seeds[0]})", "",
              f"| scheme | options | bias range at L (query L−1, keys 0…L−1) | largest near−far contrast | "
              f"far entry's share of training pairs | parameter ranges |", "|---|---|---|---|---|---|"]
    for a in study_arms:
        rs = [r for r in records if r["label"] == a.label and r["seed"] == cfg.seeds[0]]
        if not rs:
            continue
        lr = rs[0]["learned"]
        rng = f"[{lr['bias_range'][0]:.2f}, {lr['bias_range'][1]:.2f}]" if "bias_range" in lr else "–"
        con = f"{lr['bias_contrast']:.2f}" if "bias_contrast" in lr else "–"
        share = f"{lr['final_share']:.0%}" if "final_share" in lr else "–"
        params = ", ".join(f"{k} [{v[0]:.2f}, {v[1]:.2f}]" for k, v in lr["params"].items()) or "none"
        opts = ", ".join(f"{k}={v}" for k, v in a.options.items()) or "–"
        lines.append(f"| {a.label} | {opts} | {rng} | {con} | {share} | {params} |")
    if many:
        lines += ["", f"Per seed, ppl@{longest} / ppl@{base}: " + "; ".join(
            f"{label} " + " / ".join(f"{r['ratio']:.3f}" for r in _pick(records, label, longest))
            for label in labels)]
    r0 = records[0] if records else {"tokens": 0, "segments": 0}
    seeds = ", ".join(map(str, cfg.seeds))
    lines += ["", f"Trained at {cfg.train_len} tokens for {cfg.steps} steps (batch {cfg.batch_size}, lr {cfg.lr:g}, "
              f"positional parameters at {cfg.pos_lr_mult:g}× lr without weight decay); d_model {cfg.d_model}, "
              f"{cfg.n_layers} layers, {cfg.n_heads} heads; seeds {seeds}; {cfg.threads} threads. Every length scores "
              f"the same {r0['tokens']:,} validation tokens ({r0['segments']} segments of {longest}) in "
              f"non-overlapping windows. Intervals: 95% percentile bootstrap over the segments ({N_BOOT} "
              "replicates, paired across lengths). Two schemes whose intervals overlap are not distinguishable "
              "at this evaluation size; between seeds, the std is the spread of training itself.", ""]
    return "\n".join(lines)


def write_plots(records: list[dict[str, Any]], positions: dict[str, list[float]], schemes: dict[str, Scheme],
                cfg: StudyConfig, out: Path) -> list[Path]:
    """``ppl_vs_length.png``, ``loss_vs_position.png`` (from ``positions``) and
    ``learned_bias_vs_distance.png`` (from ``schemes``: the first seed's additive schemes by label)."""
    from .plot import _pyplot, _save, plain_log_ticks, plot_bias_curves

    plt = _pyplot()
    paths = []
    labels = [a.label for a in arms(cfg)]
    colors = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(8.5, 5))
    for k, label in enumerate(labels):
        xs, ys, lo, hi = [], [], [], []
        for n in cfg.lengths():
            rs = _pick(records, label, n)
            if not rs:
                continue
            v = [r["ppl"] for r in rs]
            m = statistics.mean(v)
            xs.append(n)
            ys.append(m)
            if len(v) > 1:
                sd = statistics.stdev(v)
                lo.append(m - sd)
                hi.append(m + sd)
            else:
                lo.append(rs[0]["ppl_lo"])
                hi.append(rs[0]["ppl_hi"])
        ax.plot(xs, ys, marker="o", label=label, color=colors(k), lw=1.5)
        ax.fill_between(xs, lo, hi, color=colors(k), alpha=0.15, lw=0)
    ax.axvline(cfg.train_len, color="grey", ls="--", lw=1, label=f"training length {cfg.train_len}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    plain_log_ticks(ax)
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("perplexity (bytes)")
    band = "± std over seeds" if len(cfg.seeds) > 1 else "95% bootstrap interval"
    ax.set_title(f"Train short, test long (band: {band})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    paths.append(_save(fig, out / "ppl_vs_length.png"))

    if positions:
        fig, ax = plt.subplots(figsize=(8.5, 5))
        for k, label in enumerate(labels):
            if label not in positions:
                continue
            y = torch.tensor(positions[label])
            # mean over ~16 log-spaced bins of (position + 1): single positions are too noisy to read
            edges = torch.unique(torch.logspace(0, math.log10(len(y) + 1), 17).round().long().clamp(1, len(y) + 1))
            xs = [math.sqrt(int(a) * int(b)) for a, b in zip(edges[:-1], edges[1:])]
            ys = [float(y[int(a) - 1:int(b) - 1].mean()) for a, b in zip(edges[:-1], edges[1:])]
            ax.plot(xs, ys, label=label, lw=1.4, color=colors(k), marker=".")
        ax.axvline(cfg.train_len, color="grey", ls="--", lw=1, label="training length")
        ax.set_xscale("log")
        ax.set_xlabel("position inside the window + 1 (log scale; mean over log-spaced bins)")
        ax.set_ylabel("loss (nats / byte)")
        ax.set_title(f"Loss by position in {max(cfg.lengths())}-token windows (seed {cfg.seeds[0]})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        paths.append(_save(fig, out / "loss_vs_position.png"))

    if schemes:
        paths.append(plot_bias_curves(list(schemes.values()), out / "learned_bias_vs_distance.png",
                                      max_distance=max(cfg.lengths()), names=list(schemes), log_distance=True,
                                      title=f"positional biases after training at {cfg.train_len} tokens "
                                            "(ALiBi is fixed, not learned)"))
    return paths
