"""Passkey retrieval: a key hidden at a controlled depth in filler text, asked for at the end.

A sequence of exactly ``length`` bytes::

    <filler …> key=48213; <filler …> ?key=48213
                ^ at depth d                ^ the answer: the last ``digits`` bytes

``depth`` 0 puts the key statement at the start of the window (farthest from the question), 1
right before the question. The filler is digit-free English text, so the only digits before the
question are the key's. A model is trained on such sequences at a short length (loss on the answer
bytes only) and tested at longer lengths and every depth: perplexity can look fine for a scheme
that cannot reach far information, and this task exposes it (Mohtashami & Jaggi 2023 use the same
construction).

Accuracy counts a sample as solved when every answer byte is the argmax given the true prefix,
which is exactly when greedy decoding would produce the key. The per-byte scores (:func:`scores`)
tell a model that finds the key but copies it badly (first byte right, few samples solved) from
one that does not find it (every byte near a guess, 0.1).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.nn import functional as F

from .config import ConfigError, check_seed
from .schemes.base import check_int

FILLER = (b"the grass is green. the sky is blue. the sun is yellow. here we go. there and back again. "
          b"a river runs to the sea. birds sing in the morning. the wind is cold tonight. ")
KEY_OPEN, KEY_CLOSE, QUESTION = b" key=", b"; ", b" ?key="
PROBE_SEED = 4321  # the fine-tune probe's samples (accuracy grids use 1234)
PROBE_SAMPLES = 8  # the fine-tune probe's samples per depth (40 in all)
PROBE_EVERY = 100  # steps between the probes
LEARNED = 0.9  # the probe accuracy at which a fine-tune counts as having learned the task
GUESS = 0.1  # an answer byte's score for a guess among the ten digits


def overhead(digits: int) -> int:
    """Bytes taken by the key statement and the question: the shortest possible sample."""
    return len(KEY_OPEN) + digits + len(KEY_CLOSE) + len(QUESTION) + digits


def make_sample(length: int, depth: float, key: str, *, filler_start: int = 0) -> Tensor:
    """One sample as uint8 tokens ``[length]``; the answer is the last ``len(key)`` tokens."""
    digits = len(key)
    check_int("length", length, minimum=overhead(digits), hint=f" (the key statement and question need "
                                                               f"{overhead(digits)} bytes)")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if not key.isdigit():
        raise ValueError(f"key must be digits, got {key!r}")
    statement = KEY_OPEN + key.encode() + KEY_CLOSE
    room = length - overhead(digits)
    reps = FILLER * (2 + (room + filler_start) // len(FILLER))
    filler = reps[filler_start % len(FILLER): filler_start % len(FILLER) + room]
    at = statement_span(length, depth, digits).start
    data = filler[:at] + statement + filler[at:] + QUESTION + key.encode()
    assert len(data) == length
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def statement_span(length: int, depth: float, digits: int = 5) -> range:
    """The positions of the key statement (``KEY_OPEN``, the digits, ``KEY_CLOSE``) in every sample of
    ``length`` bytes at ``depth``: only the key and the filler differ between such samples."""
    at = round(depth * (length - overhead(digits)))
    return range(at, at + len(KEY_OPEN) + digits + len(KEY_CLOSE))


def make_batch(n: int, length: int, *, digits: int = 5, generator: torch.Generator | None = None,
               depths: Iterable[float] | None = None) -> Tensor:
    """``[n, length]`` random samples (uniform depth unless ``depths`` is given; random keys)."""
    g = generator or torch.Generator().manual_seed(0)
    depth_list = list(depths) if depths is not None else torch.rand(n, generator=g).tolist()
    rows = []
    for i in range(n):
        key = "".join(str(int(d)) for d in torch.randint(0, 10, (digits,), generator=g))
        start = int(torch.randint(0, len(FILLER), (1,), generator=g))
        rows.append(make_sample(length, depth_list[i % len(depth_list)], key, filler_start=start))
    return torch.stack(rows)


def answer_loss(model, batch: Tensor, digits: int) -> Tensor:
    """Cross-entropy on the answer bytes only."""
    x = batch[:, :-1].long()
    logits = model(x)[:, -digits:]
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, -digits:].long().flatten())


@torch.no_grad()
def scores(model, length: int, depth: float, *, samples: int = 32, digits: int = 5, batch_size: int = 16,
           seed: int = 1234, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Two scores of the answer on the same samples: ``solved``, the share of samples whose every answer
    byte is the model's argmax given the true bytes before it (= greedy decoding produces the key), and
    ``digits``, the share right at each answer byte in turn. The first byte needs the key found; each
    later one can also copy on from the true byte before it, so a model that finds the key but copies
    it badly scores high on the first byte and low on ``solved``. A guess among the ten digits scores
    0.1 (:data:`GUESS`) per byte."""
    model.eval()
    g = torch.Generator().manual_seed(seed + length * 7919 + int(depth * 1000))
    solved, right = 0, torch.zeros(digits, dtype=torch.long)
    for s in range(0, samples, batch_size):
        batch = make_batch(min(batch_size, samples - s), length, digits=digits, generator=g, depths=[depth]).to(device)
        hit = model(batch[:, :-1].long())[:, -digits:].argmax(-1) == batch[:, -digits:].long()
        solved += int(hit.all(-1).sum())
        right += hit.sum(0).cpu()
    return {"solved": solved / samples, "digits": [int(c) / samples for c in right]}


def accuracy(model, length: int, depth: float, **kwargs) -> float:
    """Share of samples whose every answer byte is the model's argmax (= greedy decoding solves it):
    :func:`scores`' ``solved``."""
    return scores(model, length, depth, **kwargs)["solved"]


def accuracy_grid(model, lengths: Iterable[int], depths: Iterable[float], *, progress: bool = False,
                  known: dict[tuple[int, float], Any] | None = None, on_cell: Callable[[int, float, Any], None] | None = None,
                  measure: Callable[..., Any] = accuracy, **kwargs) -> dict[int, dict[float, Any]]:
    """``measure`` (:func:`accuracy`, or :func:`scores` for both scores) for every (length, depth)
    cell; ``progress`` shows a bar over the cells measured. ``known``: cells measured before (taken as
    they are); ``on_cell(length, depth, value)`` is called as each new cell is measured (to keep it)."""
    from tqdm.auto import tqdm

    lengths, depths, known = list(lengths), list(depths), known or {}
    grid: dict[int, dict[float, float]] = {n: {} for n in lengths}
    todo = [(n, d) for n in lengths for d in depths if (n, d) not in known]
    with tqdm(total=len(todo), desc="passkey grid", disable=not progress, leave=False) as bar:
        for n in lengths:
            for d in depths:
                if (n, d) in known:
                    grid[n][d] = known[n, d]
                    continue
                bar.set_postfix(length=n, depth=d)
                grid[n][d] = measure(model, n, d, **kwargs)
                if on_cell is not None:
                    on_cell(n, d, grid[n][d])
                bar.update(1)
    return grid


def train_passkey(model, *, length: int, steps: int, batch_size: int = 32, lr: float = 2e-3, digits: int = 5,
                  seed: int = 0, device: str | torch.device = "cpu", progress: bool = False,
                  resume: str | Path | None = None, replace_other: bool = False, pos_lr_mult: float = 1.0,
                  log: Callable[[str], None] | None = None, until: float = 0.0, check_every: int = PROBE_EVERY,
                  probe_samples: int = PROBE_SAMPLES, on_probe: Callable[[int, float], None] | None = None) -> list[float]:
    """Fine-tune ``model`` in place on passkey samples of ``length`` bytes; returns the losses.

    Given ``on_probe(step, accuracy)`` or ``until``, the model's accuracy at ``length`` is probed
    (:func:`probe`: ``probe_samples`` samples at each of five depths, other samples than any test's)
    before every ``check_every``-th step; a probe changes nothing the fine-tune computes. ``until`` > 0
    stops the fine-tune at the first probe that reaches it (a model that already solves the task
    trains 0 steps; ``steps`` is then the most it trains). ``resume``: a folder for the fine-tune's
    progress (:func:`posbias.finetune.finetune`; the batches' generator travels with it), so that an
    interrupted run continues bit-identically instead of starting again; removed once the fine-tune is
    done. It is keyed by every setting here and the starting weights; another fine-tune's progress
    there is refused, or with ``replace_other`` (a folder the caller owns) replaced."""
    from .finetune import finetune

    check_until("until", until)
    g = torch.Generator().manual_seed(seed)
    identity = {"task": "passkey", "length": length, "batch_size": batch_size, "digits": digits, "seed": seed}
    if until > 0:
        identity.update(until=until, check_every=check_every, probe_samples=probe_samples)

    def learned(step: int) -> bool:
        got = probe(model, length, samples=probe_samples, digits=digits, device=device)
        if on_probe is not None:
            on_probe(step, got)
        return until > 0 and got >= until

    losses = finetune(model, lambda step: make_batch(batch_size, length, digits=digits, generator=g).to(device),
                      lambda m, b: answer_loss(m, b, digits), steps=steps, lr=lr, progress=progress,
                      desc=f"passkey@{length}", resume=resume, generator=g, identity=identity,
                      replace_other=replace_other, pos_lr_mult=pos_lr_mult, log=log,
                      stop=learned if until > 0 or on_probe is not None else None, check_every=check_every)
    if resume is not None:  # the fine-tuned model is the caller's, in memory: the progress is of no further use
        shutil.rmtree(resume, ignore_errors=True)
    return losses


def check_until(name: str, value: float) -> float:
    """A stopping accuracy (``until``, ``passkey_until``): a number in [0, 1] (not a bool), 0 for none."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(name, f"must be an accuracy in [0, 1] (0: train every step), got {value!r}")
    return value


def teach(model, *, length: int, steps: int, until: float = 0.0, probes: dict[str, float] | None = None,
          keep: Callable[[dict[str, float]], None] | None = None, **kwargs) -> dict:
    """:func:`train_passkey` with its probe at ``length`` recorded: every step, or with ``until`` > 0
    until a probe reaches it. Each probe goes into ``probes`` (step as a string → accuracy; give the
    ones an interrupted run kept, so that a fine-tune resumed from its progress, which repeats only the
    probes after its last save, with the same values, leaves a whole record) and to ``keep`` as it is
    made. Returns the record: ``{"steps": trained, "probes": [[step, accuracy], …], "target": the
    accuracy that counts as learned (until, else LEARNED), "learned_at": the first probe's step that
    reached it (None: none did), "stopped": it ended before ``steps``}``."""
    probed = dict(probes or {})

    def seen(step: int, accuracy: float) -> None:
        probed[str(step)] = accuracy
        if keep is not None:
            keep(probed)

    losses = train_passkey(model, length=length, steps=steps, until=until, on_probe=seen, **kwargs)
    got = sorted([int(k), a] for k, a in probed.items() if int(k) <= len(losses))
    target = until or LEARNED
    return {"steps": len(losses), "probes": got, "target": target,
            "learned_at": next((step for step, a in got if a >= target), None), "stopped": len(losses) < steps}


def fit_sentence(record: dict) -> str:
    """How a passkey fine-tune of :func:`teach` went, in words."""
    steps, target, probes = record["steps"], record["target"], record["probes"]
    if record["stopped"]:
        return f"it learned the task (≥ {target:g} of the probe at L) after {steps} steps and stopped there"
    if record["learned_at"] is not None:
        return f"it trained all {steps} steps and had learned the task (≥ {target:g} of the probe at L) by step " \
               f"{record['learned_at']}"
    last = f" (the last, at step {probes[-1][0]}: {probes[-1][1]:.2f})" if probes else ""
    return f"it trained all {steps} steps and its probe at L never reached {target:g}{last}"


def learned_sentence(named: list[tuple[str, dict | None]]) -> str:
    """Which passkey copies learned the task at L (by :func:`teach`'s records) by which step, and which
    did not; "" without a record."""
    probed = [(name, r) for name, r in named if r and "learned_at" in r]
    if not probed:
        return ""
    learned = sorted((item for item in probed if item[1]["learned_at"] is not None),
                     key=lambda item: item[1]["learned_at"])
    missed = [(name, r) for name, r in probed if r["learned_at"] is None]
    target = probed[0][1]["target"]
    return (f"The passkey copies had learned the task at L (≥ {target:g} of their probe): "
            + (", ".join(f"{name} by step {r['learned_at']}" for name, r in learned) or "none")
            + (f"; not within {max(r['steps'] for _, r in missed)} steps: " + ", ".join(name for name, _ in missed)
               if missed else "") + ".")


def probe(model, length: int, *, samples: int = PROBE_SAMPLES, digits: int = 5,
          device: str | torch.device = "cpu") -> float:
    """Accuracy at ``length`` over ``samples`` samples at each of the five :func:`default_depths`, drawn
    with a seed of its own (:data:`PROBE_SEED`): the fine-tunes' progress test, on samples no accuracy
    grid measures."""
    grid = accuracy_grid(model, [length], default_depths(5), samples=samples, digits=digits, seed=PROBE_SEED,
                         device=device)
    return mean_accuracy(grid, length)


def default_depths(n: int = 5) -> list[float]:
    return [round(i / (n - 1), 3) for i in range(n)] if n > 1 else [0.5]


def check_seeds(name: str, seeds: Any) -> tuple[int, ...]:
    """The batch seeds of several passkey copies: at least one, each a seed (:func:`posbias.config.check_seed`),
    none twice (the same copy counted twice would narrow the spread over copies); else :class:`ConfigError`."""
    if isinstance(seeds, int) or not seeds:
        raise ConfigError(name, f"must list at least one seed, got {seeds!r}")
    for seed in seeds:
        check_seed(name, seed)
    if len(set(seeds)) < len(seeds):
        raise ConfigError(name, f"list a seed twice ({list(seeds)}); a repeated seed is the same copy, and counting "
                          "it twice would narrow the spread over copies")
    return tuple(seeds)


def mean_of(copies: list[Any]) -> Any:
    """The mean of several copies' results of one shape, element by element: numbers, lists (per
    answer byte) and dicts (by length, by depth) nested in any way — a passkey grid of each copy as one."""
    first = copies[0]
    if isinstance(first, dict):
        return {k: mean_of([c[k] for c in copies]) for k in first}
    if isinstance(first, list):
        return [mean_of(list(col)) for col in zip(*copies)]
    return sum(copies) / len(copies)


def copies_interval(accuracies: list[float], trials: int) -> tuple[float, float]:
    """The interval of a mean accuracy over several copies, each measured on ``trials`` samples: from the
    lowest copy's 95% Wilson bound (:func:`accuracy_interval`) to the highest's. One copy: its own
    interval, over samples only; several: it spans how far the copies differ too."""
    bounds = [accuracy_interval(a, trials) for a in accuracies]
    return min(lo for lo, _ in bounds), max(hi for _, hi in bounds)


def accuracy_interval(accuracy: float, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy measured on ``trials`` independent samples: honest
    near 0 and 1, where the normal approximation gives impossible bounds."""
    if trials < 1 or not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"need trials >= 1 and an accuracy in [0, 1], got {trials} and {accuracy}")
    centre = (accuracy + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(accuracy * (1 - accuracy) / trials + z * z / (4 * trials * trials))
    # exact ends where the accuracy is 0 or 1 (there the bound is analytically 0 or 1; floats miss it)
    return (0.0 if accuracy == 0 else max(0.0, centre - half)), (1.0 if accuracy == 1 else min(1.0, centre + half))


def mean_accuracy(grid: dict[int, dict[float, float]], length: int) -> float:
    row = grid.get(length, {})
    return sum(row.values()) / len(row) if row else math.nan


def split_scores(grid: dict[int, dict[float, dict[str, Any]]]) -> tuple[dict, dict]:
    """A grid of :func:`scores` (``accuracy_grid(…, measure=scores)``) as two grids with its keys:
    accuracy (``solved``) and the per-byte scores (``digits``)."""
    return tuple({n: {d: cell[part] for d, cell in row.items()} for n, row in grid.items()}
                 for part in ("solved", "digits"))


def mean_digits(grid: dict[int, dict[float, list[float]]], length: int) -> list[float]:
    """The per-byte scores of :func:`scores` at ``length``, each averaged over the depths."""
    row = list(grid.get(length, {}).values())
    return [sum(col) / len(row) for col in zip(*row)]

