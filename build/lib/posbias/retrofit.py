"""Retrofit a trained model to a longer context: RoPE scalings, T5 ``max_distance``, scheme swaps.

A checkpoint trained at length ``L`` must serve ``to`` tokens (``factor = to / L``). Methods:

* RoPE checkpoints: ``pi`` (position interpolation, positions × 1/factor), ``ntk`` (base × λ,
  ``λ = factor^{d/(d−2)}``), ``dynamic-ntk`` (λ grows with the context), ``yarn`` (per-frequency
  interpolation plus attention temperature) — no new parameters;
* T5 checkpoints: ``t5-distance`` (``max_distance × factor``; the learned table is kept, so every
  bucket now covers longer distances: the buckets *move*, see :func:`bucket_remap`);
* any checkpoint: ``swap-alibi`` and ``swap-t5`` replace the scheme by a fresh ALiBi bias or a fresh
  T5 table (canonical 32 buckets, ``max_distance`` 128) and need the fine-tune. T5's logits are unscaled, so
  swapping to it folds ``1/√head_dim`` into the query weights (:meth:`TransformerLM.with_scheme`).

Each method can be followed by ``finetune_steps`` of language modelling at the new length.

Shape: :class:`RetrofitConfig` → :func:`run_retrofit` (evaluations, fine-tunes and passkey runs are
cached under a key of everything that made them) → :class:`RetrofitResult` →
:mod:`posbias.report.retrofit` (before/after table, with ``compare`` the decision table: perplexity
at L and beyond, passkey accuracy, extra parameters, relative attention cost).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from . import checkpoint as ckpt
from . import store
from . import passkey
from .config import ConfigError, Log, check_count, check_rate, check_seed, check_threads, fixed_threads, quiet
from .data import Corpus, batch_at
from .diagnose import far_filler_scores
from .evaluate import Paired, check_fits, eval_budget, evaluate_length, ratios_to_best
from .finetune import finetune
from .model import ModelConfig, TransformerLM
from .schemes.t5 import t5_bucket
from .train import check_training_fits

Target = Callable[[ModelConfig, int, float], tuple[str, dict[str, Any]]]  # (cfg, L, factor) → scheme, options


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    source: str | None  # the scheme a checkpoint must have (None: any)
    target: Target
    #: optional table of what the method changes, (before, after, L, to) → rows for the report
    explain: Callable[[TransformerLM, TransformerLM, int, int], list[tuple[int, int, int]]] | None = None


def _rope(scaling: str) -> Target:
    def target(cfg: ModelConfig, train_len: int, factor: float) -> tuple[str, dict[str, Any]]:
        return "rope", {**cfg.scheme_options, "scaling": scaling, "factor": factor, "train_len": train_len}
    return target


def _t5_distance(cfg: ModelConfig, train_len: int, factor: float) -> tuple[str, dict[str, Any]]:
    md = cfg.scheme_options.get("max_distance", 128)
    return "t5", {**cfg.scheme_options, "max_distance": int(round(md * factor))}


def _t5_moves(before: TransformerLM, after: TransformerLM, train_len: int, to: int) -> list[tuple[int, int, int]]:
    """Where distances land before and after a ``max_distance`` change (the learned table is kept)."""
    dists = sorted({1, 8, 16, 32, train_len // 2, train_len, 2 * train_len, to // 2, to})
    s0, s1 = before.scheme, after.scheme
    return bucket_remap(s0.num_buckets, s0.max_distance, s1.max_distance, dists)


PASSKEY_DEPTHS = 5  # passkey depths per length in the decision table (0, ¼, ½, ¾, 1 of the context)

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("pi", "RoPE position interpolation: positions × L/target", "rope", _rope("pi")),
    Method("ntk", "RoPE base scaling (NTK-aware): base × factor^(d/(d−2))", "rope", _rope("ntk")),
    Method("dynamic-ntk", "NTK scaling whose factor grows with the context length", "rope", _rope("dynamic-ntk")),
    Method("yarn", "YaRN: per-frequency interpolation + attention temperature", "rope", _rope("yarn")),
    Method("t5-distance", "T5 with max_distance × factor (the learned buckets move)", "t5", _t5_distance,
           _t5_moves),
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
        raise ConfigError("to", f"must exceed the training length {train_len}, got {to}")
    return model.with_scheme(*METHODS[method].target(model.cfg, train_len, to / train_len))


def bucket_remap(num_buckets: int, old_max: int, new_max: int, distances: list[int]) -> list[tuple[int, int, int]]:
    """(distance, bucket before, bucket after) for a change of T5 ``max_distance``."""
    d = torch.tensor(distances)
    a = t5_bucket(d, num_buckets=num_buckets, max_distance=old_max)
    b = t5_bucket(d, num_buckets=num_buckets, max_distance=new_max)
    return list(zip(distances, a.tolist(), b.tolist()))


def default_eval_lens(train_len: int, to: int) -> list[int]:
    """L, then the doublings 2L, 4L … below ``to`` that divide it, then ``to``: every length then scores
    the same segments of ``to`` tokens (a doubling that does not divide ``to``, 128 for ``to`` = 192, would
    make each length score segments of its own). A ``to`` that is not a multiple of L gives ``[L, to]``,
    two lengths on segments of their own, which the report says."""
    lens, n = [train_len], 2 * train_len
    while n < to:
        if to % n == 0:
            lens.append(n)
        n *= 2
    return lens + [to]


COST_PAIRS = 6  # timed pairs behind an attention cost: the median of their ratios, and its spread


def _forward_seconds(model: TransformerLM, x: Tensor) -> float:
    t = time.perf_counter()
    model(x)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - t


def _relative_cost(model: TransformerLM, base: TransformerLM, length: int, device: str,
                   pairs: int = COST_PAIRS) -> tuple[float, float, float]:
    """Forward time at ``length`` relative to ``base``: the median of ``pairs`` per-pair ratios, each pair
    the two timed back to back (a shared machine's load drifts; adjacent measurements share it), in
    alternating order (whichever runs second can find caches warm), with the lowest and highest ratio
    (two models of the same cost, PI against plain RoPE say, read 0.78–1.56× from one median of three
    each on a 1 ms forward)."""
    x = torch.randint(0, model.cfg.vocab_size, (1, length), device=device)
    ratios = []
    with torch.no_grad():
        model(x), base(x)  # warm-up: allocations, tables, kept masks
        for k in range(pairs):
            ahead = k % 2 == 0  # the model first, then the base; the next pair the other way round
            timed = [_forward_seconds(m, x) for m in ((model, base) if ahead else (base, model))]
            a, b = timed if ahead else timed[::-1]
            ratios.append(a / b)
    return statistics.median(ratios), min(ratios), max(ratios)


@dataclass(frozen=True)
class RetrofitConfig:
    to: int  # the target context length (> the checkpoint's training length)
    methods: tuple[str, ...]  # names in METHODS that fit the checkpoint's scheme
    finetune_steps: int = 0  # language-model fine-tune at `to` after each method (0: none)
    finetune_batch: int = 4  # sequences per fine-tune step
    finetune_lr: float = 3e-4  # peak fine-tune learning rate
    # the positional parameters' multiple of a fine-tune's learning rate (None: the checkpoint's training value)
    pos_lr_mult: float | None = None
    eval_lens: tuple[int, ...] | None = None  # default: L, 2L, 4L … that divide `to`, and `to` (default_eval_lens)
    eval_tokens: int | None = None  # validation tokens scored at each length (None: evaluate.SEGMENTS × the longest)
    compare: bool = False  # the decision table: passkey accuracy and attention cost too
    passkey_steps: int = 2400  # passkey fine-tune steps of a copy (with compare; 0: no passkey test)
    passkey_until: float = 0.0  # > 0: a copy stops once it solves this share of a probe at L (0: every step)
    passkey_samples: int = 32  # passkey samples per (length, depth) cell
    device: str = "cpu"  # cpu or cuda[:N]
    seed: int = 0  # seed of the fine-tune batches and the passkey training
    # with compare: the passkey copies' batch seeds, one copy each, the cells their mean (None: one copy, of `seed`)
    passkey_seeds: tuple[int, ...] | None = None
    threads: int = 2  # torch intra-op threads, fixed for reproducible results (part of the cache key)

    def __post_init__(self) -> None:
        if not self.methods:
            raise ConfigError("methods", "must name at least one method")
        for m in self.methods:
            if m not in METHODS:
                raise ConfigError("methods", f"has unknown method {m!r}; valid: {', '.join(METHODS)}")
        twice = sorted({m for m in self.methods if self.methods.count(m) > 1})
        if twice:  # one method is one result: a second row of it would be the same numbers
            raise ConfigError("methods", f"names {twice[0]} twice; give each method once")
        for name in ("to", "finetune_batch", "passkey_samples"):
            check_count(name, getattr(self, name))
        check_threads("threads", self.threads)
        if self.eval_tokens is not None:
            check_count("eval_tokens", self.eval_tokens)
        for name in ("finetune_steps", "passkey_steps"):
            check_count(name, getattr(self, name), minimum=0)
        check_rate("finetune_lr", self.finetune_lr)
        check_seed("seed", self.seed)
        if self.passkey_seeds is not None:
            passkey.check_seeds("passkey_seeds", self.passkey_seeds)
        passkey.check_until("passkey_until", self.passkey_until)
        if self.pos_lr_mult is not None:
            check_rate("pos_lr_mult", self.pos_lr_mult)
        for n in self.eval_lens or ():
            check_count("eval_lens", n)

    @property
    def copy_seeds(self) -> tuple[int, ...]:
        """The seeds of the passkey copies: ``passkey_seeds``, or ``seed`` alone."""
        return tuple(self.passkey_seeds) if self.passkey_seeds is not None else (self.seed,)


@dataclass
class RetrofitResult:
    """One row per (method, stage): perplexity by length, extra parameters, and with ``compare``
    passkey accuracy and attention cost; plus each method's explanation table (T5: bucket moves)."""

    checkpoint: str
    train_len: int
    to: int
    eval_lens: list[int]
    config: RetrofitConfig
    corpus: dict[str, Any]
    trained_corpus: dict[str, Any] | None = None  # the text the checkpoint records it was trained on
    pos_lr_mult: float = 1.0  # the positional parameters' multiple of the fine-tunes' learning rates
    cache: str | None = None  # the name of its cache file (``cache-<key>.json``), by which ``posbias clean`` judges it
    rows: list[dict[str, Any]] = field(default_factory=list)
    bucket_remap: dict[str, list[tuple[int, int, int]]] = field(default_factory=dict)
    # L and every length past it → one Paired per row: its perplexity against the best row's (compare_rows)
    paired: dict[int, list[Paired]] = field(default_factory=dict)

    @property
    def eval_tokens(self) -> int:
        """Validation tokens scored at the longest length, as its windows were (a default the split cuts to
        what fits included: results.json named 64 segments where a short split held 21); without rows,
        the config's count or its default."""
        longest = max(self.eval_lens)
        if self.rows:
            return len(self.rows[0]["window_loss"][longest]) * longest
        return eval_budget(self.config.eval_tokens, longest)

    def to_json(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "train_len": self.train_len, "to": self.to,
                "eval_lens": self.eval_lens, "rows": self.rows, "bucket_remap": self.bucket_remap,
                "paired": {n: [p._asdict() for p in ps] for n, ps in self.paired.items()},
                "config": {k: getattr(self.config, k) for k in self.config.__dataclass_fields__},
                "corpus": self.corpus, "trained_corpus": self.trained_corpus, "pos_lr_mult": self.pos_lr_mult,
                "eval_tokens": self.eval_tokens,
                "cache": self.cache}


def run_retrofit(path: str | Path, cfg: RetrofitConfig, out: str | Path, *, corpus: Corpus, progress: bool = False,
                 log: Log = quiet) -> RetrofitResult:
    """Apply every method of ``cfg`` to the checkpoint at ``path`` and measure before and after.
    Evaluations, fine-tuned models and passkey results are kept in ``out`` under a key of the
    checkpoint's weights and every setting (:func:`source_key`); one run per folder at a time.
    :func:`posbias.report.retrofit.write` renders the result."""
    store.check_device(cfg.device)
    meta = ckpt.read_meta(path)
    base = ckpt.load_model(path).to(cfg.device).eval()
    train_len = ckpt.train_len(path, meta)
    if cfg.to <= train_len:
        raise ConfigError("to", f"must exceed the training length {train_len}, got {cfg.to}")
    for m in cfg.methods:
        why = applicable(m, base.cfg.scheme)
        if why:
            raise ValueError(f"{why} (methods for {base.cfg.scheme}: {', '.join(methods_for(base.cfg.scheme)) or 'none'})")
    lens = sorted(set(cfg.eval_lens or default_eval_lens(train_len, cfg.to)))  # each length once, in order
    missing = [n for n in dict.fromkeys((train_len, cfg.to)) if n not in lens]
    if missing:  # the table's last column is ppl@to / ppl@L: without either it was a KeyError or a NaN
        raise ConfigError("eval_lens", f"{' '.join(map(str, lens))} must include the training length {train_len} and "
                                       f"--to {cfg.to}; {' and '.join(map(str, missing))} missing")
    check_fits(corpus.val, max(lens), cfg.eval_tokens, "to" if max(lens) == cfg.to else "eval_lens", least=train_len + 1)
    if cfg.finetune_steps:
        check_training_fits(base.cfg, cfg.finetune_batch, cfg.to, cfg.device)
    out = store.check_out_dir(out)
    result = RetrofitResult(str(path), train_len, cfg.to, lens, cfg, corpus.fingerprint, meta.get("corpus"))
    with store.FolderLock(out), fixed_threads(cfg.threads):
        result.pos_lr_mult = cfg.pos_lr_mult or ckpt.pos_lr_mult(meta)
        run = _Run(cfg, out, source_key(path, cfg, corpus), corpus, train_len, lens, progress, log,
                   result.pos_lr_mult)
        result.cache = run.cache.file.name
        result.rows.append(run.measure(base, base, "original", "before", 0))
        for k, m in enumerate(cfg.methods, 1):
            plan = "no fine-tune" + (f", then a {cfg.finetune_steps}-step fine-tune at {cfg.to}" if cfg.finetune_steps else "")
            log(f"method {k}/{len(cfg.methods)}: {m} ({plan}{', passkey' if cfg.compare and cfg.passkey_steps else ''})")
            model = retrofit_model(base, m, train_len=train_len, to=cfg.to)
            if METHODS[m].explain is not None:
                result.bucket_remap[m] = METHODS[m].explain(base, model, train_len, cfg.to)
            extra = model.num_parameters() - base.num_parameters()
            if not cfg.finetune_steps:
                result.rows.append(run.measure(model, base, m, "no fine-tune", extra))
                continue
            result.rows.append(run.measure(model, base, m, "no fine-tune", extra, final=False))
            tuned = run.finetuned(model, m, path, meta)
            result.rows.append(run.measure(tuned, base, m, f"fine-tuned {cfg.finetune_steps}", extra))
    result.paired = compare_rows(result.rows, [n for n in lens if n >= train_len])  # L: the near range
    return result


def compare_rows(rows: list[dict[str, Any]], lengths: list[int]) -> dict[int, list[Paired]]:
    """At each length, every row's perplexity relative to the best row's, with a 95% bootstrap
    interval that resamples the same evaluation windows for every row (every row scores the same
    windows): :func:`posbias.evaluate.ratios_to_best`."""
    if len(rows) < 2:
        return {}
    return {n: ratios_to_best(torch.tensor([r["window_loss"][n] for r in rows], dtype=torch.float64).T)
            for n in lengths}


def source_key(path: str | Path, cfg: RetrofitConfig, corpus: Corpus) -> str:
    """Everything the cached numbers depend on besides the method and the length
    (:func:`posbias.checkpoint.job_key`): the checkpoint, the corpus, every setting of fine-tuning
    and passkey (but the passkey seeds, which each copy's entry names), and the code that computes
    them. The evaluation size is not here: each perplexity entry names the count it scored, resolved
    (``eval:<row>:<tokens>:span<n>``), so ``--eval-tokens`` equal to the default reuses the default's
    entries, and another count scores again without training the fine-tunes again."""
    settings = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__
                if k not in ("methods", "compare", "eval_lens", "eval_tokens", "device", "passkey_seeds")}
    return ckpt.job_key(path, corpus=corpus.fingerprint, settings=settings, job="retrofit", device=cfg.device)


class _Run:
    """The measurements of one retrofit run, cached in ``out/cache-<key>.json`` as they are made."""

    def __init__(self, cfg: RetrofitConfig, out: Path, key: str, corpus: Corpus, train_len: int, lens: list[int],
                 progress: bool, log: Log, pos_lr_mult: float) -> None:
        self.cfg, self.out, self.key, self.corpus, self.pos_lr_mult = cfg, out, key, corpus, pos_lr_mult
        self.train_len, self.lens, self.progress, self.log = train_len, lens, progress, log
        # segments of the longest length spread over the split, tiled by every length that divides it:
        # then every length scores the same tokens (evaluate.evaluate_length)
        longest = max(lens)
        self.span = longest if all(longest % n == 0 for n in lens) else None
        self.eval_tokens = eval_budget(cfg.eval_tokens, longest)
        self.cache = store.JobCache(out / f"cache-{key}.json", "retrofit", cfg.device)

    def measure(self, model: TransformerLM, base: TransformerLM, method: str, stage: str, extra: int, *,
                final: bool = True) -> dict[str, Any]:
        """One table row; passkey (minutes each) only for what a method ends with."""
        label = "original" if stage == "before" else f"{method}/{stage}"
        compare = self.cfg.compare
        scores = self.perplexity(model, label)
        row = {"method": method, "stage": stage, "scheme": model.cfg.scheme,
               "ppl": {n: sc["ppl"] for n, sc in scores.items()},
               "window_loss": {n: sc["window_loss"] for n, sc in scores.items()},  # for the paired table
               "extra_params": extra, "passkey": None, "attention_cost": None}
        if stage != "before":
            row["options"] = model.cfg.scheme_options
        if compare:
            row["final"] = final  # what a method ends with: a row of the decision table, the only ones measured
        if compare and final:
            if self.cfg.passkey_steps:  # (0 steps: no passkey test, as in diagnose)
                row.update(self.passkey(model, label))
            cost = (1.0, 1.0, 1.0) if stage == "before" else _relative_cost(model, base, self.cfg.to, self.cfg.device)
            row["attention_cost"], row["attention_cost_range"] = cost[0], list(cost[1:])
        return row

    def perplexity(self, model: TransformerLM, label: str) -> dict[int, dict[str, Any]]:
        """``{length: {"ppl", "window_loss"}}``: every model is scored on the same windows, so rows
        compare pairwise (the report's paired table)."""
        # a length's ppl depends on the segments its windows tile, so the entry names their span too
        # (eval_lens is not in the key: another set of lengths may give another span)
        got = self.cache.data.setdefault(f"eval:{label}:{self.eval_tokens}:span{self.span or 'each'}", {})
        for n in self.lens:
            if str(n) not in got:
                # the default cut to what the split holds (a count given past it was refused: check_fits)
                fits = min(self.eval_tokens, self.corpus.val.numel() - 1)
                r = evaluate_length(model, self.corpus.val, n, max_tokens=fits, span=self.span, device=self.cfg.device)
                got[str(n)] = {"ppl": r["ppl"], "window_loss": r["window_loss"]}
                self.cache.save()
            self.log(f"[{label}] ppl @ {n}: {got[str(n)]['ppl']:.3f}")
        return {int(k): v for k, v in got.items() if int(k) in self.lens}

    def passkey(self, model: TransformerLM, label: str) -> dict[str, Any]:
        """A row's passkey fields, each by length (L and ``to``), over one copy per passkey seed
        (:meth:`passkey_copy`): ``passkey`` (accuracy, mean over the depths and copies),
        ``passkey_interval`` (95% Wilson over the depths × samples trials; with several copies from the
        lowest copy's bound to the highest's, :func:`posbias.passkey.copies_interval`),
        ``passkey_copies`` (each copy's accuracy) with ``passkey_seeds``, ``passkey_digits`` (the score
        of each answer byte, mean over the copies), ``passkey_fits`` (each copy's fine-tune record) and
        ``passkey_hidden`` (at ``to``, each copy's accuracy with the far filler hidden:
        :func:`posbias.diagnose.far_filler_scores`)."""
        seeds = self.cfg.copy_seeds
        copies = [self.passkey_copy(model, label, seed) for seed in seeds]
        trials = PASSKEY_DEPTHS * self.cfg.passkey_samples
        each = {int(n): [c["accuracy"][n] for c in copies] for n in copies[0]["accuracy"]}
        mean, digits = (passkey.mean_of([c[part] for c in copies]) for part in ("accuracy", "digits"))
        hidden = {int(n): [c["hidden"][n] for c in copies] for n in copies[0]["hidden"]}
        return {"passkey": {int(n): a for n, a in mean.items()},
                "passkey_interval": {n: passkey.copies_interval(got, trials) for n, got in each.items()},
                "passkey_copies": each, "passkey_seeds": list(seeds),
                "passkey_digits": {int(n): d for n, d in digits.items()}, "passkey_fits": [c["fit"] for c in copies],
                "passkey_hidden": hidden}

    def passkey_copy(self, model: TransformerLM, label: str, seed: int) -> dict[str, Any]:
        """One copy of ``model`` fine-tuned on the task at L from batches of ``seed``
        (:func:`posbias.passkey.teach`) and tested at L and ``to``: ``{"accuracy", "digits"}`` by length
        and ``fit``, the fine-tune's record; from the cache where a run made it (the copy of ``seed`` =
        the config's ``seed`` under the name it always had, the others' names end in their seed)."""
        cfg = self.cfg
        own = "" if seed == cfg.seed else f":seed{seed}"
        key = f"passkey:{label}:{cfg.passkey_steps}:{cfg.passkey_until:g}:{cfg.passkey_samples}{own}"
        if key not in self.cache.data:
            copy = model.with_scheme(model.cfg.scheme, model.cfg.scheme_options)
            work = self.out / "models" / f"passkey-{store.folder_name(label + own)}-{self.key}"
            seen = f"{key}:probes"  # each probe as it is made (an interrupted fine-tune's record stays whole)

            fit = passkey.teach(copy, length=self.train_len, steps=cfg.passkey_steps, until=cfg.passkey_until,
                                probes=self.cache.data.get(seen), keep=lambda probed: self.cache.put(seen, probed),
                                seed=seed, device=cfg.device,
                                progress=self.progress, resume=work, replace_other=True, pos_lr_mult=self.pos_lr_mult,
                                log=self.log)  # its progress folder goes once it is done
            grid = passkey.accuracy_grid(copy, [self.train_len, cfg.to], passkey.default_depths(PASSKEY_DEPTHS),
                                         measure=passkey.scores, samples=cfg.passkey_samples, device=cfg.device)
            solved, digits = passkey.split_scores(grid)
            # at `to`, the same samples with every key at distance ≥ L hidden but the key statement
            hidden = {cfg.to: {d: far_filler_scores(copy, cfg.to, d, self.train_len, samples=cfg.passkey_samples,
                                                    device=cfg.device) for d in grid[cfg.to]}}
            self.cache.put(key, {"accuracy": {str(n): passkey.mean_accuracy(solved, n) for n in grid},
                                 "digits": {str(n): passkey.mean_digits(digits, n) for n in grid}, "fit": fit,
                                 "hidden": {str(cfg.to): passkey.mean_accuracy(passkey.split_scores(hidden)[0], cfg.to)}})
        got = self.cache.data[key]
        self.log(f"[{label}] passkey{f' (copy of seed {seed})' if len(cfg.copy_seeds) > 1 else ''}: "
                 f"{passkey.fit_sentence(got['fit'])}; accuracy "
                 + ", ".join(f"@{n} {a:.2f}" for n, a in got["accuracy"].items())
                 + f"; far filler hidden @{cfg.to} {got['hidden'][str(cfg.to)]:.2f}")
        return got

    def finetuned(self, model: TransformerLM, method: str, path: str | Path, meta: dict[str, Any]) -> TransformerLM:
        """``model`` after the language-model fine-tune at ``to`` (reused from ``out/models`` when made)."""
        cfg = self.cfg
        mdir = self.out / "models" / f"{method}-ft{cfg.finetune_steps}-{self.key}"
        if ckpt.exists(mdir):
            self.log(f"[{method}] reusing fine-tuned model in {mdir}")
            return ckpt.load_model(mdir).to(cfg.device)
        tuned = model.with_scheme(model.cfg.scheme, model.cfg.scheme_options)
        finetune(tuned, lambda step: batch_at(self.corpus.train, step, batch_size=cfg.finetune_batch, seq_len=cfg.to,
                                              seed=cfg.seed + 1),
                 lambda mod, b: mod.loss(b[0].long().to(cfg.device), b[1].long().to(cfg.device)),
                 steps=cfg.finetune_steps, lr=cfg.finetune_lr, progress=self.progress, desc=f"fine-tune {method}",
                 resume=mdir / "last", replace_other=True, pos_lr_mult=self.pos_lr_mult,
                 log=self.log)  # the finished model replaces the folder, progress and all
        ckpt.save_checkpoint(mdir, tuned, extra={"train": {**meta.get("train", {})}, "retrofit": {
            "method": method, "to": cfg.to, "finetune_steps": cfg.finetune_steps, "source": str(path)}})
        return tuned
