"""Train short, test long: models that differ only in their positional scheme, trained at one length
with identical data, seed, size and steps, scored at many longer lengths on the same tokens.

Shape: :class:`StudyConfig` (frozen) → :func:`run_study` (trains and evaluates, no printing;
progress through ``log``) → :class:`StudyResult` → :mod:`posbias.report.study` (``results.json``,
``results.md`` and the PNGs).

Trust rules:

* **Results are keyed by everything that made them.** A model lives in
  ``models/<label>-seed<seed>-<key>/`` where ``key`` hashes the model config (scheme options
  included), the training config, the corpus fingerprint, the thread count, the device, the
  torch version and the code that makes a model (:func:`posbias.store.code_fingerprint` of
  :data:`posbias.store.MODEL_CODE`: a kernel whose rounding changed gives other models); its
  evaluation in ``eval-<key>.json`` keyed by those, every evaluation setting and the evaluation's
  code. A changed setting trains and evaluates afresh in a folder of its own; nothing is reused
  under another setting or other code.
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

import json
import math
import os
import platform
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from . import checkpoint as ckpt
from . import store
from ._version import __version__
from .config import ConfigError, Log, check_count, check_rate, check_seed, check_threads, fixed_threads, quiet
from .data import Corpus
from .evaluate import (N_BOOT, Paired, bootstrap_means, check_fits, check_segments, check_study_lengths,
                       eval_budget, interval, length_study, ratios_to_best, spread_starts)
from .model import ModelConfig, TransformerLM
from .schemes import (SCHEMES, Scheme, build, check_options, get_scheme_class, parse_spec, scheme_options,
                      spec_label)
from .schemes.base import flat_share
from .schemes.options import options_text
from .train import TrainConfig, check_training_fits, train



def default_schemes() -> tuple[str, ...]:
    """Every registered scheme the study runs by default (a scheme opts out with ``in_study = False``)."""
    return tuple(name for name, cls in SCHEMES.items() if cls.in_study)

EVAL_FORMAT = 4  # bump when the evaluation's definition changes: old caches are then not reused
# (3: per-segment losses recorded, for the paired between-scheme table; 4: far_delta recorded)


@dataclass(frozen=True)
class StudyConfig:
    schemes: tuple[str, ...] = field(default_factory=default_schemes)  # scheme labels: NAME or NAME@KEY=VALUE[,KEY=VALUE]
    scheme_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per scheme name, over study defaults
    train_len: int = 128  # training length L (tokens)
    eval_lens: tuple[int, ...] = (128, 256, 512, 1024, 2048)  # must include L; each divides the longest
    steps: int = 600  # optimizer steps per model
    batch_size: int = 32  # sequences per step
    lr: float = 2e-3  # peak learning rate of the weights
    pos_lr_mult: float = 100.0  # positional parameters' lr multiplier (see posbias.train.make_optimizer)
    d_model: int = 128  # residual width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # attention heads
    seeds: tuple[int, ...] = (0,)  # one model per scheme and seed
    # validation tokens scored at every length, in segments of the longest length spread over the split
    # (None: evaluate.SEGMENTS segments, resolved when the config is made; dataclasses.replace with other
    # eval_lens keeps the resolved count unless it is given eval_tokens=None too)
    eval_tokens: int | None = None
    eval_batch: int = 8  # windows per evaluation forward
    threads: int = 2  # torch intra-op threads, fixed for reproducibility (part of every result's key)
    device: str = "cpu"  # cpu or cuda[:N]

    def __post_init__(self) -> None:
        labels = [spec_label(*parse_spec(s)) for s in self.schemes]
        if not labels:
            raise ConfigError("schemes", "must name at least one scheme")
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"scheme {dup[0]!r} is listed twice; give the copies different options")
        if not isinstance(self.scheme_options, dict) or not all(isinstance(o, dict) for o in self.scheme_options.values()):
            raise ConfigError("scheme_options", "must map scheme names to dicts of options ({'t5': {'max_distance': "
                                                f"128}}), got {self.scheme_options!r}")
        for name, opts in self.scheme_options.items():
            check_options(name, opts)
        for n in self.eval_lens:
            check_count("eval_lens", n)
        for name in ("train_len", "steps", "batch_size", "d_model", "n_layers", "n_heads", "eval_batch"):
            check_count(name, getattr(self, name))
        check_threads("threads", self.threads)
        lens = check_study_lengths(self.eval_lens, self.train_len)
        object.__setattr__(self, "eval_tokens", eval_budget(self.eval_tokens, lens[-1]))
        check_count("eval_tokens", self.eval_tokens)
        if not self.seeds:
            raise ConfigError("seeds", "must list at least one seed")
        for seed in self.seeds:
            check_seed("seeds", seed)
        if len(set(self.seeds)) < len(self.seeds):
            twice = sorted({s for s in self.seeds if self.seeds.count(s) > 1})
            raise ConfigError("seeds", f"list {twice[0]} twice; a repeated seed is the same model, and counting it "
                              "twice would narrow the spread over seeds")
        for name in ("lr", "pos_lr_mult"):
            check_rate(name, getattr(self, name))
        check_segments(self.eval_tokens, lens[-1])
        if self.d_model % self.n_heads:
            raise ConfigError("d_model", f"{self.d_model} must be divisible by the number of heads {self.n_heads}")
        found = arms(self)
        _check_distinct(found, self.train_len)
        for arm in found:  # every option's value checked now, not when its model's turn to train comes
            try:
                with torch.random.fork_rng(devices=[]):
                    build(arm.scheme, n_heads=self.n_heads, head_dim=self.d_model // self.n_heads, **arm.options)
            except ValueError as e:
                raise ValueError(f"scheme {arm.label}: {e}") from None
            except OverflowError:  # a size past what torch can index
                raise ConfigError("d_model", f"{self.d_model} is too large for a model") from None

    def lengths(self) -> list[int]:
        return sorted(set(self.eval_lens))


PRESETS: dict[str, dict[str, Any]] = {
    # 8 schemes, train at 64 tokens, evaluate up to 16x on 64 segments (measured times: cli.PRESET_NOTES)
    "demo": dict(train_len=64, eval_lens=(64, 128, 256, 512, 1024), steps=250, batch_size=32, d_model=128,
                 n_layers=3, n_heads=4),
    # the longer CPU protocol
    "cpu": dict(train_len=128, eval_lens=(128, 256, 512, 1024, 2048), steps=1200, batch_size=32, d_model=128,
                n_layers=4, n_heads=4),
    # for a GPU: larger model, longer training, 3 seeds
    "gpu": dict(train_len=128, eval_lens=(128, 256, 512, 1024, 2048, 4096), steps=4000, batch_size=64,
                d_model=256, n_layers=6, n_heads=8, seeds=(0, 1, 2), device="cuda"),
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


def _check_distinct(found: list[Arm], train_len: int) -> None:
    """ValueError when two labels resolve to one model (``t5`` and ``t5@max_distance=17`` at L = 64, where
    17 is T5's study default): it would be trained twice and reported as two schemes, "not distinguishable"
    from itself."""
    seen: dict[str, Arm] = {}
    for arm in found:
        full = {**scheme_options(arm.scheme), **arm.options}  # an option given at its default is the same model as one left out
        same = seen.setdefault(json.dumps([arm.scheme, full], sort_keys=True, default=str), arm)
        if same is not arm:
            shown = options_text(dict(sorted(full.items())), "no options")
            raise ValueError(f"schemes {same.label!r} and {arm.label!r} are one model ({arm.scheme} with {shown}: "
                             f"defaults and the study's at L = {train_len} included); list it once")


def model_config(cfg: StudyConfig, arm: Arm) -> ModelConfig:
    return ModelConfig(scheme=arm.scheme, scheme_options=arm.options, d_model=cfg.d_model, n_layers=cfg.n_layers,
                       n_heads=cfg.n_heads)


def train_config(cfg: StudyConfig, seed: int) -> TrainConfig:
    return TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, train_len=cfg.train_len, lr=cfg.lr,
                       pos_lr_mult=cfg.pos_lr_mult, warmup=max(1, cfg.steps // 12),
                       eval_every=max(1, cfg.steps // 3), ckpt_every=max(1, cfg.steps // 10), seed=seed)


def model_key(cfg: StudyConfig, arm: Arm, seed: int, corpus: Corpus) -> dict[str, Any]:
    """Everything that makes a trained model."""
    return {"model": model_config(cfg, arm).to_dict(), "train": asdict(train_config(cfg, seed)),
            "corpus": corpus.fingerprint, "threads": cfg.threads, "device": store.device_key(cfg.device),
            "torch": torch.__version__,
            "code": store.code_fingerprint(*store.JOB_CODE["model"])}


def model_dir(out: Path, arm: Arm, seed: int, mkey: dict[str, Any]) -> Path:
    """Where a study in ``out`` keeps the model of ``arm`` and ``seed`` made under ``mkey`` (:func:`model_key`)."""
    return Path(out) / "models" / f"{store.folder_name(arm.label)}-seed{seed}-{store.config_key(mkey)}"


def eval_key(cfg: StudyConfig, mkey: dict[str, Any]) -> dict[str, Any]:
    """Everything that makes an evaluation of that model."""
    return {"model_key": mkey, "lengths": cfg.lengths(), "train_len": cfg.train_len, "eval_tokens": cfg.eval_tokens,
            "eval_batch": cfg.eval_batch, "n_boot": N_BOOT, "format": EVAL_FORMAT,
            "code": store.code_fingerprint(*store.JOB_CODE["evaluation"])}


def learned_summary(model: TransformerLM, train_len: int) -> dict[str, Any]:
    """What the positional parameters learned: each parameter's range, and for additive schemes the
    bias a query at position L−1 gives keys at distances 0 … L−1 (all heads)."""
    s = model.scheme
    out: dict[str, Any] = {"params": {n: [float(p.detach().min()), float(p.detach().max())]
                                      for n, p in s.named_parameters()}}
    if s.family == "additive":
        with torch.no_grad():
            dev = next(model.parameters()).device  # a GPU study's model is on the GPU (found on a GPU run)
            q = torch.tensor([train_len - 1], device=dev)
            b = s.bias(q, torch.arange(train_len, device=dev))[:, 0, :].float()  # [H, L], distance L−1 … 0
        out["bias_range"] = [float(b.min()), float(b.max())]
        out["bias_contrast"] = float((b[:, -1] - b[:, 0]).abs().max())  # |bias(0) − bias(L−1)|, largest head
    flat = getattr(s, "flat_beyond", None)
    if s.learnable and flat is not None:
        out["final_share"] = flat_share(flat, train_len)
    threshold = getattr(s, "threshold", None)
    if callable(threshold):  # FIRE: past its learned threshold a query meets biases training never gave
        out["threshold"] = float(threshold().detach())
    return out


def records_at(records: list[dict[str, Any]], label: str, n: int) -> list[dict[str, Any]]:
    """The records of one label at evaluation length ``n`` (one per seed)."""
    return [r for r in records if r["label"] == label and r["eval_len"] == n]


def _segment_losses(records: list[dict[str, Any]], label: str, n: int) -> dict[int, Tensor]:
    """``{seed: per-segment mean losses}`` of one label at length ``n``."""
    return {r["seed"]: torch.tensor(r["segment_loss"], dtype=torch.float64) for r in records_at(records, label, n)}


def _paired(arms: list[Arm], losses_of: Callable[[str], dict[int, Tensor]]) -> dict[str, Paired]:
    """Every label against the best, paired over segments (per-segment losses averaged over seeds) and
    seed by seed; ``{}`` with fewer than two labels to compare."""
    labels, cols, by_seed = [], [], []
    for a in arms:
        per_seed = losses_of(a.label)
        if per_seed:
            labels.append(a.label)
            cols.append(torch.stack(list(per_seed.values())).mean(0))
            by_seed.append({seed: float(x.mean()) for seed, x in per_seed.items()})
    if len(labels) < 2:
        return {}
    ratios = ratios_to_best(torch.stack(cols, 1))  # [segments, schemes]
    best = next(j for j, p in enumerate(ratios) if p.best)
    out = {}
    for j, label in enumerate(labels):
        seeds = sorted(set(by_seed[j]) & set(by_seed[best]))
        per_seed = tuple(math.exp(by_seed[j][s] - by_seed[best][s]) for s in seeds) if len(seeds) > 1 else ()
        out[label] = ratios[j]._replace(per_seed=per_seed)
    return out


def compare_schemes(cfg: StudyConfig, records: list[dict[str, Any]],
                    arms: list[Arm]) -> tuple[dict[int, dict[str, Paired]], dict[str, Paired]]:
    """Which differences between schemes are real: ``(by length, by length generalisation)``.

    At each evaluation length, each scheme's perplexity as a ratio to the best scheme's, with a 95%
    percentile-bootstrap interval in which every replicate resamples the *same* text segments for all
    schemes (:func:`posbias.evaluate.ratios_to_best`). Paired this way, the interval holds only how
    the models differ on the same text, not how hard the text is, so it is much narrower than the
    schemes' own intervals, whose overlap says little. Several seeds: each scheme's per-segment loss
    is the mean over its seeds, so the interval is text resampling only, and ``per_seed`` gives the
    ratio seed by seed (the same seed means the same data order and initialisation: the spread of
    training). Second: each scheme's ``ppl@longest / ppl@L`` relative to the smallest such ratio;
    every length scores the same segments, so per segment the log-ratio is ``loss@longest − loss@L``
    and one resample of segments serves both lengths and every scheme (``{}`` when longest = L).
    Both ``{}`` with fewer than two schemes to compare."""
    lens = cfg.lengths()
    longest, base = lens[-1], cfg.train_len
    by_length = {n: _paired(arms, lambda label, n=n: _segment_losses(records, label, n)) for n in lens}
    if not all(by_length.values()):
        return {}, {}

    def log_ratio(label: str) -> dict[int, Tensor]:
        far, near = _segment_losses(records, label, longest), _segment_losses(records, label, base)
        return {seed: far[seed] - near[seed] for seed in far if seed in near}

    return by_length, (_paired(arms, log_ratio) if longest != base else {})


def unigram_segment_losses(corpus: Corpus, longest: int, segments: int) -> Tensor:
    """The reference without context: each byte predicted by its frequency in the training split (add-one
    smoothed over the 256 bytes), scored on the tokens the study scores (``segments`` segments of
    ``longest`` spread over the validation split, :func:`~posbias.evaluate.spread_starts`): the mean
    loss of each segment, float64 ``[segments]``. Its perplexity is the same at every length."""
    counts = torch.bincount(corpus.train.flatten(), minlength=256).double() + 1  # uint8 counted as it is: no copy
    logp = (counts / counts.sum()).log()
    starts = torch.tensor(spread_starts(corpus.val.numel() - 1, longest, segments))
    targets = corpus.val[starts[:, None] + 1 + torch.arange(longest)[None, :]].long()
    return -logp[targets].mean(1)


def _exp_mean(per_segment: Tensor) -> tuple[float, float, float]:
    """``exp`` of the mean of per-segment values with its 95% bootstrap interval; every call resamples the
    same segments (the bootstrap's fixed seed), so intervals of differences are paired."""
    reps = bootstrap_means(per_segment[:, None], torch.ones(len(per_segment), 1), n_boot=N_BOOT)[:, 0]
    return (math.exp(float(per_segment.mean())), *interval(reps.exp()))


def vs_unigram(segment_loss: list[float], unigram: Tensor) -> dict[str, float]:
    """One model's perplexity as a ratio to the byte-frequency reference's (:func:`unigram_segment_losses`),
    paired over the same segments: ``{"ratio", "lo", "hi"}``."""
    ratio, lo, hi = _exp_mean(torch.tensor(segment_loss, dtype=torch.float64) - unigram)
    return {"ratio": ratio, "lo": lo, "hi": hi}


def learned_little(entry: dict[str, Any]) -> bool:
    """Whether a model's ratio to the reference at L (:func:`vs_unigram`) does not lie below 1 beyond the
    noise (its interval reaches 1): it predicts no better than byte frequencies."""
    return entry["hi"] >= 1


def against_unigram(cfg: StudyConfig, records: list[dict[str, Any]], unigram: Tensor) -> dict[str, Any]:
    """For scale: the byte-frequency reference's perplexity with its 95% interval over the segments, and
    each model's perplexity at L and at the longest length as a ratio to it (:func:`vs_unigram`)
    (``{"ppl", "ppl_lo", "ppl_hi", "at": [{"label", "seed", "eval_len", "ratio", "lo", "hi"}, …]}``).
    A model whose interval at L does not lie below 1 predicts no better than byte frequencies: what its
    perplexity does past L says nothing about its positional scheme; one whose interval at the longest
    length lies above 1 does worse there than no context at all. Records without per-segment losses are
    left out."""
    ppl, lo, hi = _exp_mean(unigram)
    return {"ppl": ppl, "ppl_lo": lo, "ppl_hi": hi,
            "at": [{"label": r["label"], "seed": r["seed"], "eval_len": r["eval_len"], **vs_unigram(r["segment_loss"], unigram)}
                   for r in records if r["eval_len"] in (cfg.train_len, max(cfg.lengths()))
                   and len(r.get("segment_loss") or ()) == len(unigram)]}


@dataclass
class StudyResult:
    """What :func:`run_study` made: one record per label, seed and evaluation length (perplexity with
    its interval, ratio to L, Δ beyond L, what the positional parameters learned, where the model
    lives), and for the first seed the loss by position at the longest length and the trained
    additive schemes (for the pictures)."""

    config: StudyConfig
    records: list[dict[str, Any]]
    positions: dict[str, list[float]]  # label → mean loss per position in windows of the longest length
    schemes: dict[str, Scheme]  # label → the first seed's trained scheme (additive schemes only)
    corpus: dict[str, Any]  # the corpus fingerprint
    arms: list[Arm]
    # which differences are real (compare_schemes): length → label → Paired, and ppl@longest/ppl@L
    paired: dict[int, dict[str, Paired]] = field(default_factory=dict)
    paired_ratio: dict[str, Paired] = field(default_factory=dict)
    unigram: dict[str, Any] = field(default_factory=dict)  # for scale: against_unigram

    def to_json(self) -> dict[str, Any]:
        return {"records": self.records, "study": asdict(self.config), "corpus": self.corpus,
                "paired": {n: {k: p._asdict() for k, p in t.items()} for n, t in self.paired.items()},
                "paired_ratio": {k: p._asdict() for k, p in self.paired_ratio.items()}, "unigram": self.unigram,
                "threads": self.config.threads,
                "versions": {"posbias": __version__, "torch": torch.__version__, "python": platform.python_version()},
                "machine": platform.platform()}


def run_study(cfg: StudyConfig, out: str | Path, *, corpus: Corpus, progress: bool = False, keep_last: bool = True,
              log: Log = quiet) -> StudyResult:
    """Train (or reuse, under the same key) and evaluate every scheme and seed, keeping models and
    evaluations in ``out/models``. Several runs may work in one folder at once (processes on other
    cores or GPUs): each model is made by one of them at a time, a run passes over the models another
    is making and comes back to them at the end (reusing them, or taking over one whose run died), so
    every run ends with all of its models. ``progress`` shows progress bars;
    ``keep_last=False`` deletes each model's ``last/`` checkpoint (mostly optimizer state) once its
    ``final/`` exists, which changes no result. :func:`posbias.report.study.write` renders the result.
    Not under torchrun (``WORLD_SIZE`` > 1): a ValueError, since its processes would take the folder's
    models one each while each model's training waited for the others (a hang, found 2026-12-04)."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world != "1":
        raise ValueError(f"a study runs each model in one process, but WORLD_SIZE is {world} (torchrun): its "
                         "processes would wait on each other for good; start the same command once per core or GPU "
                         "instead (--threads 1, or --device cuda:N), and the runs share the folder's models")
    out = store.check_out_dir(out)
    store.check_device(cfg.device)
    longest = max(cfg.lengths())
    # found otherwise when the first model is scored; the lengths are multiples of L
    check_fits(corpus.val, longest, cfg.eval_tokens, "eval_lens", unit=cfg.train_len, least=cfg.train_len)
    found = arms(cfg)
    check_training_fits(model_config(cfg, found[0]), cfg.batch_size, cfg.train_len, cfg.device)
    if corpus.train.numel() <= cfg.train_len + 1:
        raise ConfigError("train_len", f"{cfg.train_len} needs more than {cfg.train_len + 1} training tokens, but the "
                          f"training split has {corpus.train.numel()}; use a shorter training length or more data")
    result = StudyResult(cfg, [], {}, {}, corpus.fingerprint, found)
    unigram = unigram_segment_losses(corpus, longest, cfg.eval_tokens // longest)
    with store.FolderLock(out, shared=True), fixed_threads(cfg.threads):
        _run(result, out, corpus, progress, keep_last, log, unigram)
    result.paired, result.paired_ratio = compare_schemes(cfg, result.records, result.arms)
    result.unigram = against_unigram(cfg, result.records, unigram)
    return result


def _run(result: StudyResult, out: Path, corpus: Corpus, progress: bool, keep_last: bool, log: Log,
         unigram: Tensor) -> None:
    """Make every model (trained and scored, each under its own lock), then gather the records in order;
    ``unigram``: the byte-frequency reference's segment losses, for the note on a model that learned little."""
    cfg = result.config
    jobs = []
    for arm in result.arms:
        for seed in cfg.seeds:
            mkey = model_key(cfg, arm, seed, corpus)
            mdir = model_dir(out, arm, seed, mkey)
            jobs.append((f"[{len(jobs) + 1}/{len(cfg.seeds) * len(result.arms)} {arm.label} seed {seed}]",
                         arm, seed, mkey, mdir))
    trained_s: list[float] = []  # wall time of each model trained in this run, for the ETA
    scores: dict[Path, dict[int, dict[str, Any]]] = {}  # each model's scores, made or read under its lock
    busy = []  # models another run was making when this one came to them
    for i, (tag, arm, seed, mkey, mdir) in enumerate(jobs):
        with store.item_lock(mdir / ".lock", wait=False) as held:
            if not held:
                log(f"{tag} another run is making this model; going on, and back to it at the end")
                busy.append(jobs[i])
                continue
            made = len(trained_s)
            scores[mdir] = _make_one(cfg, arm, seed, mkey, mdir, corpus, progress, keep_last, log, tag, trained_s)
            _learned_little_note(cfg, scores[mdir], unigram, log, tag)
            left = len(jobs) - i - 1
            if len(trained_s) > made and left:
                eta = statistics.mean(trained_s) * left
                log(f"{tag} trained in {trained_s[-1]:.0f} s; at most about {_duration(eta)} left for {left} model(s)")
    for tag, arm, seed, mkey, mdir in busy:
        log(f"{tag} waiting for the run making this model …")
        with store.item_lock(mdir / ".lock", wait=True):  # its files are complete once the lock is free
            scores[mdir] = _make_one(cfg, arm, seed, mkey, mdir, corpus, progress, keep_last, log, tag, trained_s)
        _learned_little_note(cfg, scores[mdir], unigram, log, tag)
    for tag, arm, seed, mkey, mdir in jobs:
        _add_records(result, arm, seed, mdir, scores[mdir])


def _duration(seconds: float) -> str:
    """``seconds`` as a person reads a wait: ``40 s``, ``3 min``, ``1.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _learned_little_note(cfg: StudyConfig, scores: dict[int, dict[str, Any]], unigram: Tensor, log: Log, tag: str) -> None:
    """As soon as a model is scored, a line if it is no better at L than byte frequencies (the summary's
    test, :func:`vs_unigram`): a study whose first model learned nothing can be stopped and given
    more ``--steps`` now, not after every model (an hour per seed in the ``cpu`` preset)."""
    segment_loss = scores[cfg.train_len].get("segment_loss")
    if not segment_loss:  # an evaluation of an older format
        return
    e = vs_unigram(segment_loss, unigram)
    if learned_little(e):
        log(f"{tag} note: at L = {cfg.train_len} this model is no better than predicting bytes by their frequency "
            f"(ppl {e['ratio']:.3f}× theirs [{e['lo']:.3f}, {e['hi']:.3f}]): it learned little, so what it does past L "
            "says nothing about its scheme; train longer (--steps)")


def _make_one(cfg: StudyConfig, arm: Arm, seed: int, mkey: dict[str, Any], mdir: Path, corpus: Corpus,
              progress: bool, keep_last: bool, log: Log, tag: str,
              trained_s: list[float]) -> dict[int, dict[str, Any]]:
    """Train (or reuse) and score one model, the caller holding its lock (a model trained now adds its
    wall time to ``trained_s``); returns its scores at every length."""
    if ckpt.exists(mdir / "final"):
        log(f"{tag} reusing the model trained with these exact settings in {mdir / 'final'}")
    else:
        trained_s.append(_train_one(cfg, arm, seed, mkey, mdir, corpus, progress, log, tag))
    if not keep_last and (mdir / "last").exists():
        shutil.rmtree(mdir / "last")
    scores = _scores(cfg, seed, mkey, mdir, corpus)
    log(f"{tag} ppl " + ", ".join(f"@ {n} {scores[n]['ppl']:.3f} [{scores[n]['ppl_lo']:.3f}, {scores[n]['ppl_hi']:.3f}]"
                                  for n in cfg.lengths()))
    return scores


def _train_one(cfg: StudyConfig, arm: Arm, seed: int, mkey: dict[str, Any], mdir: Path, corpus: Corpus,
               progress: bool, log: Log, tag: str) -> float:
    """Train one model into ``mdir`` (resuming its ``last/`` checkpoint); returns the wall time."""
    log(f"{tag} training {cfg.steps} steps at length {cfg.train_len} ({options_text(arm.options, 'no options')})")
    store.write_json(mdir / "key.json", mkey)
    t0 = time.perf_counter()
    train(model_config(cfg, arm), train_config(cfg, seed), corpus.train, corpus.val, mdir, device=cfg.device,
          progress=progress, extra_meta={"corpus": corpus.fingerprint, "key": mkey}, log=log)
    return time.perf_counter() - t0


def _scores(cfg: StudyConfig, seed: int, mkey: dict[str, Any], mdir: Path,
            corpus: Corpus) -> dict[int, dict[str, Any]]:
    """The model's scores at every length: its keyed evaluation file, made now if missing."""
    ekey = eval_key(cfg, mkey)
    efile = mdir / f"eval-{store.config_key(ekey)}.json"
    if efile.exists():
        return {int(k): v for k, v in store.read_json(efile)["scores"].items()}
    model = ckpt.load_model(mdir / "final").to(cfg.device)
    t0 = time.perf_counter()
    scores = length_study(model, corpus.val, cfg.lengths(), train_len=cfg.train_len, n_tokens=cfg.eval_tokens,
                          batch_size=cfg.eval_batch, device=cfg.device, n_boot=N_BOOT, seed=seed)
    store.write_json(efile, {"key": ekey, "wall_s": time.perf_counter() - t0,
                             "scores": {str(k): v for k, v in scores.items()}})
    return scores


def _add_records(result: StudyResult, arm: Arm, seed: int, mdir: Path, scores: dict[int, dict[str, Any]]) -> None:
    """Append one model's records (its ``scores``, and what its positional parameters learned)."""
    cfg = result.config
    meta = ckpt.read_meta(mdir / "final")
    model = ckpt.load_model(mdir / "final").to(cfg.device)
    learned = learned_summary(model, cfg.train_len)
    first = seed == cfg.seeds[0]
    if first and model.scheme.family == "additive":
        result.schemes[arm.label] = model.scheme.cpu()
    hist = meta.get("history", {})
    for n in cfg.lengths():
        r = scores[n]
        if r.get("loss_by_position") and first:
            result.positions[arm.label] = r["loss_by_position"]
        result.records.append({
            "label": arm.label, "scheme": arm.scheme, "seed": seed, "train_len": cfg.train_len,
            **{k: v for k, v in r.items() if k != "loss_by_position"},
            "train_wall_s": hist.get("wall_s"), "final_val_loss": (hist.get("val_loss") or [[None, None]])[-1][1],
            "params": model.num_parameters(), "learned": learned, "model": model.cfg.to_dict(),
            "train": meta.get("train"), "threads": cfg.threads, "model_dir": str(mdir),
        })
