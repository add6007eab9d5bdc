"""The ``posbias`` command: parse arguments, build configs, call library functions, print.

Scheme options are given as flags named after the scheme's keyword options
(``posbias show t5 --num-buckets 32 --max-distance 128 --bidirectional``), so the CLI follows the
registry without a list of its own. Errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from .schemes import SCHEMES, build, get_scheme_class, parse_spec, t5_bucket
from .schemes.t5 import check_t5


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


_stdout_gone = False


def say(msg: str = "") -> None:
    """Print a line. When stdout has closed (output piped into ``head``), the long job goes on and
    writes its files; only the printing stops."""
    global _stdout_gone
    if _stdout_gone:
        return
    try:
        print(msg, flush=True)
    except BrokenPipeError:
        _stdout_gone = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # later writes (and the final flush) go nowhere, quietly


def check_device(device: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` that exists on this machine; ValueError otherwise."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device; use cpu or cuda[:N]") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: posbias runs on cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} asked for, but this machine has no CUDA device; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def parse_scheme_options(name: str, tokens: Sequence[str]) -> dict[str, Any]:
    """Turn ``--num-buckets 32 --bidirectional`` into ``{"num_buckets": 32, "bidirectional": True}``,
    typed by the scheme's own option annotations (a bare bool flag means true)."""
    from .schemes import option_specs, parse_option

    specs = option_specs(get_scheme_class(name))
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            raise CLIError(f"unexpected argument {tok!r}")
        key, eq, inline = tok[2:].partition("=")
        opt = key.replace("-", "_")
        if opt not in specs:
            flags = ", ".join("--" + k.replace("_", "-") for k in specs) or "none"
            raise CLIError(f"scheme {name!r} has no option --{key}; valid: {flags}")
        if eq:
            value = inline
        elif specs[opt].kind is bool and (i + 1 == len(tokens) or tokens[i + 1].startswith("--")):
            value = "true"
        else:
            if i + 1 == len(tokens):
                raise CLIError(f"--{key} needs a value")
            i += 1
            value = tokens[i]
        try:
            out[opt] = parse_option(name, specs[opt], value)
        except ValueError:
            raise CLIError(f"--{key} must be {specs[opt].describe()} (scheme {name!r}), got {value!r}") from None
        i += 1
    return out


# -- list -------------------------------------------------------------------------------------
def cmd_list(args: argparse.Namespace) -> None:
    width = max(map(len, SCHEMES))
    for name, cls in SCHEMES.items():
        print(f"{name:<{width}}  {cls.family:<8}  {cls.summary}")


# -- show -------------------------------------------------------------------------------------
def bucket_table(num_buckets: int, max_distance: int, bidirectional: bool = False,
                 span: int | None = None) -> list[tuple[int, int, int | None]]:
    """``(bucket, first offset, last offset or None for unbounded)`` rows, causal direction
    (offsets ≥ 0), as the textbook tabulates it."""
    check_t5(num_buckets, max_distance, bidirectional)
    span = span or 4 * max_distance
    off = torch.arange(0, span + 1)
    b = t5_bucket(off, num_buckets=num_buckets, max_distance=max_distance, bidirectional=bidirectional)
    rows = []
    for bucket in sorted(set(b.tolist())):
        hits = off[b == bucket]
        last = int(hits.max())
        rows.append((bucket, int(hits.min()), None if last == span else last))
    return rows


def cmd_show(args: argparse.Namespace, extra: Sequence[str]) -> None:
    from .schemes import scheme_options

    options = parse_scheme_options(args.scheme, extra)
    torch.manual_seed(args.seed)  # learnable schemes (KERPLE, FIRE) draw their initial values
    try:
        scheme = build(args.scheme, n_heads=args.heads, head_dim=args.head_dim, **options)
    except ValueError as exc:  # name the flags the user types, not the keyword names
        msg = str(exc)
        for key in scheme_options(args.scheme):
            msg = re.sub(rf"(?<![\w-]){key}(?!\w)", "--" + key.replace("_", "-"), msg)
        raise CLIError(msg) from None
    used = {**scheme_options(args.scheme), **options}
    print(f"{scheme.name}: {scheme.summary}")
    print(f"  {scheme.__class__.__name__}({scheme.extra_repr()})")
    print("  options in use: " + (", ".join(f"{k}={v}" for k, v in used.items()) or "none")
          + (f"; initialised with --seed {args.seed}" if scheme.learnable else ""))
    print(f"  paper: {scheme.paper}")
    if args.scheme == "t5":
        n, d, bi = scheme.num_buckets, scheme.max_distance, scheme.bidirectional
        per_dir = n // 2 if bi else n
        print(f"  {n} buckets (n_b + 1 = {n}, so n_b = {n - 1}); one-to-one for offsets < {per_dir // 2}; "
              f"final bucket from offset {scheme.flat_beyond}")
        if bi:
            print(f"  bidirectional: {per_dir} buckets per direction; keys after the query (j > i) add {per_dir}")
        print("  bucket  offsets i-j (keys at or before the query)")
        for bucket, lo, hi in bucket_table(n, d, bi):
            rng = f"{lo}" if hi == lo else (f"{lo}-{hi}" if hi is not None else f">= {lo}")
            count = "" if hi is None else f"  ({hi - lo + 1})"
            print(f"  {bucket:>6}  {rng}{count}")
        return
    pos_dist = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    if scheme.family != "additive":
        print(f"  family {scheme.family!r}: no attention bias to tabulate")
        return
    from .plot import bias_versus_distance

    b = bias_versus_distance(scheme, torch.tensor(pos_dist))
    print("  bias by distance i-j (rows: heads)" + (" — learnable, values at initialisation" if scheme.learnable else ""))
    print("  head " + "".join(f"{d:>9}" for d in pos_dist))
    for h in range(b.shape[0]):
        print(f"  {h:>4} " + "".join(f"{x + 0.0:>9.3f}" for x in b[h].tolist()))


# -- plot -------------------------------------------------------------------------------------
def _describe_for_plot(scheme) -> str:
    """What a drawn bias is: fixed, an illustrative table, or learnable values at initialisation."""
    if not scheme.learnable:
        return "fixed"
    return "illustrative table" if hasattr(scheme, "table") else "at initialisation"


def cmd_plot(args: argparse.Namespace) -> None:
    from . import plot, store

    out = store.check_out_dir(args.out)
    torch.manual_seed(args.seed)
    heads, hd = args.heads, args.head_dim
    schemes = [build(n, n_heads=heads, head_dim=hd) for n in args.schemes]
    drawn = [s for s in schemes if s.family == "additive"]
    skipped = [s for s in schemes if s.family != "additive"]
    if skipped:
        say("skipping " + ", ".join(f"{s.name} ({s.family}: no attention bias to draw)" for s in skipped))
    for s in drawn:  # learned tables start at 0: draw an illustrative table (u = −log(1 + index) · head factor)
        if hasattr(s, "table"):
            with torch.no_grad():
                idx = torch.arange(s.table.shape[0], dtype=torch.float32)[:, None]
                s.table.copy_(-torch.log1p(idx) * torch.linspace(0.5, 2.0, heads)[None, :])
    written = [
        plot.plot_bucket_map(out / "t5_bucket_map.png", num_buckets=args.num_buckets, max_distance=args.max_distance),
        plot.plot_bucket_map(out / "t5_bucket_map_bidirectional.png", num_buckets=args.num_buckets,
                             max_distance=args.max_distance, bidirectional=True),
        plot.plot_t5_vs_alibi(out / "t5_vs_alibi.png"),
    ]
    for s in drawn:
        written.append(plot.plot_bias_heatmaps(s, out / f"heatmap_{s.name}.png", length=args.length,
                                               note=f" — {_describe_for_plot(s)}"))
    if drawn:
        what = "; ".join(f"{s.name} {_describe_for_plot(s)}" for s in drawn)
        written.append(plot.plot_bias_curves(drawn, out / "bias_vs_distance.png", max_distance=args.max_plot_distance,
                                             title=f"bias versus distance ({what})"))
    for p in written:
        say(str(p))


# -- extrapolate ------------------------------------------------------------------------------
PRESET_NOTES = {
    "demo": "8 schemes x 1 seed, about 6 min on an idle 2-core CPU (make demo)",
    "cpu": "the longer CPU protocol, about 1 h per seed on a 2-core CPU",
    "gpu": "larger models, 3 seeds, for a CUDA device (about 25 min on an H100)",
}


def add_extrapolate_arguments(p: argparse.ArgumentParser) -> None:
    from .extrapolate import DEFAULT_SCHEMES, PRESETS, StudyConfig

    d = StudyConfig()
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named configuration; flags override it")
    p.add_argument("--schemes", nargs="+", metavar="SCHEME",
                   help=f"scheme labels, NAME or NAME@KEY=VALUE[,KEY=VALUE] (default: {' '.join(DEFAULT_SCHEMES)})")
    p.add_argument("--scheme-option", action="append", default=[], metavar="SCHEME.KEY=VALUE",
                   help="a scheme option for every label of that scheme, e.g. t5.max_distance=64 (repeatable)")
    p.add_argument("--train-len", type=int, help=f"training length L (default {d.train_len})")
    p.add_argument("--eval-lens", type=int, nargs="+", help="evaluation lengths: include L, each dividing the longest")
    p.add_argument("--steps", type=int, help=f"optimizer steps per model (default {d.steps})")
    p.add_argument("--batch-size", type=int, help=f"sequences per step (default {d.batch_size})")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {d.lr:g})")
    p.add_argument("--pos-lr-mult", type=float,
                   help=f"learning-rate multiplier of the positional parameters (default {d.pos_lr_mult:g})")
    p.add_argument("--d-model", type=int, help=f"default {d.d_model}")
    p.add_argument("--layers", dest="n_layers", type=int, help=f"default {d.n_layers}")
    p.add_argument("--heads", dest="n_heads", type=int, help=f"default {d.n_heads}")
    p.add_argument("--seeds", type=int, nargs="+", help="default 0")
    p.add_argument("--eval-tokens", type=int, help=f"validation tokens scored at every length (default {d.eval_tokens})")
    p.add_argument("--threads", type=int, help=f"torch threads, fixed for reproducible results (default {d.threads})")
    p.add_argument("--device", help="cpu or cuda (default cpu)")
    p.add_argument("--data", help="a local text file or folder instead of the embedded default")
    p.add_argument("--hf-dataset", help="NAME[:CONFIG] of a Hugging Face dataset (needs posbias[datasets])")
    p.add_argument("--out", default="runs/study", help="output folder (default runs/study)")
    p.add_argument("--keep-last", action=argparse.BooleanOptionalAction, default=True,
                   help="keep each model's last/ checkpoint (optimizer state, about 2/3 of a model folder) after "
                        "final/ exists; --no-keep-last deletes it (default: keep)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def study_config(args: argparse.Namespace):
    from .extrapolate import PRESETS, StudyConfig
    from .schemes import parse_options

    values: dict[str, Any] = dict(PRESETS[args.preset]) if args.preset else {}
    for name in ("schemes", "train_len", "eval_lens", "steps", "batch_size", "lr", "pos_lr_mult", "d_model",
                 "n_layers", "n_heads", "seeds", "eval_tokens", "threads", "device"):
        v = getattr(args, name, None)
        if v is not None:
            values[name] = tuple(v) if isinstance(v, list) else v
    options: dict[str, dict[str, Any]] = {}
    for item in args.scheme_option:
        target, dot, pair = item.partition(".")
        if not dot or "=" not in pair:
            raise CLIError(f"--scheme-option {item!r} must look like SCHEME.KEY=VALUE, e.g. t5.max_distance=64")
        get_scheme_class(target)
        options.setdefault(target, {}).update(parse_options(target, [pair]))
    values["scheme_options"] = options
    device = values.get("device", "cpu")
    if args.device is None and args.preset and device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--preset {args.preset} asks for --device {device}, but this machine has no CUDA device; "
                       "add --device cpu to run it on the CPU (slowly)")
    check_device(device)
    return StudyConfig(**values)


def cmd_extrapolate(args: argparse.Namespace) -> None:
    import time

    from .data import load_corpus
    from .extrapolate import run_study

    cfg = study_config(args)
    out = Path(args.out)
    corpus = load_corpus(args.data, args.hf_dataset)
    fp = corpus.fingerprint
    say(f"corpus {fp['name']}: {fp['files']} files, {fp['bytes']:,} bytes, sha256 {fp['sha256']}")
    n_models = len(cfg.schemes) * len(cfg.seeds)
    say(f"{len(cfg.schemes)} scheme(s) x {len(cfg.seeds)} seed(s) = {n_models} models of {cfg.steps} steps x "
        f"{cfg.batch_size} sequences at length {cfg.train_len}, scored at {', '.join(map(str, cfg.lengths()))} "
        f"on {cfg.threads} threads; models already made with these settings are reused (the demo preset takes "
        "about 40 s per model on a 2-core CPU)")
    t0 = time.perf_counter()
    run_study(cfg, out, corpus=corpus, progress=not args.quiet, keep_last=args.keep_last, log=say)
    say()
    say((out / "results.md").read_text())
    say(f"done in {time.perf_counter() - t0:.0f} s. Written to {out}/:")
    for f in [out / "results.md", out / "results.json", *sorted(out.glob("*.png"))]:
        say(f"  {f.name:<30} {_mib(_size(f))}")
    models = out / "models"
    if models.is_dir():
        last = sum(_size(d) for d in models.glob("*/last"))
        say(f"  {'models/':<30} {_mib(_size(models))}" + (f", of which {_mib(last)} is last/ checkpoints "
                                                            "(optimizer state; --no-keep-last prunes them)" if last else ""))


# -- parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .extrapolate import PRESETS
    from .schemes import option_specs

    p = argparse.ArgumentParser(prog="posbias", description="Relative positional biases for attention.")
    p.add_argument("--version", action="version", version=f"posbias {__version__} (torch {torch.__version__})")
    sub = p.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    sub.add_parser("list", help="the registered schemes, one line each")

    options = "\n".join(
        f"  {name:<13} " + (", ".join(f"--{k.replace('_', '-')} ({spec.describe()}, default {spec.default})"
                                       for k, spec in option_specs(cls).items()) or "no options")
        for name, cls in SCHEMES.items())
    s = sub.add_parser("show", help="a scheme's parameters; for t5 the bucket table",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Scheme options follow as flags, e.g. posbias show t5 --num-buckets 32 "
                                   "--max-distance 128.", epilog="scheme options:\n" + options)
    s.add_argument("scheme", help="a registered scheme name (see `posbias list`)")
    s.add_argument("--heads", type=int, default=8, help="attention heads (default 8)")
    s.add_argument("--head-dim", type=int, default=64, help="head dimension (default 64)")
    s.add_argument("--seed", type=int, default=0, help="seed of a learnable scheme's initial values (default 0)")

    pl = sub.add_parser("plot", help="write PNGs: bucket maps, bias heatmaps, curves, T5 vs ALiBi", formatter_class=fmt)
    pl.add_argument("--out", default="plots", help="output folder")
    pl.add_argument("--schemes", nargs="+", default=["offset", "t5", "alibi", "kerple-log", "kerple-power", "fire"])
    pl.add_argument("--heads", type=int, default=8)
    pl.add_argument("--head-dim", type=int, default=64)
    pl.add_argument("--length", type=int, default=64, help="tokens in the heatmaps")
    pl.add_argument("--num-buckets", type=int, default=32)
    pl.add_argument("--max-distance", type=int, default=128)
    pl.add_argument("--max-plot-distance", type=int, default=512)
    pl.add_argument("--seed", type=int, default=0, help="seed of the learnable schemes' initialisation")

    presets = "\n".join(f"  {name:<5} {PRESET_NOTES[name]}\n        " + ", ".join(
        f"{k}={' '.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in cfg.items()) for name, cfg in PRESETS.items())
    add_extrapolate_arguments(sub.add_parser(
        "extrapolate", help="train short, test long: the length-generalization study",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train one small byte-level LM per scheme (and seed) at --train-len, then score every model on "
                    "the same validation tokens at each --eval-lens. Writes into --out: results.md (tables with 95%% "
                    "intervals), results.json (one record per scheme, seed and length), ppl_vs_length.png, "
                    "loss_vs_position.png, learned_bias_vs_distance.png, and models/<label>-seed<N>-<key>/ (final/ "
                    "weights, last/ checkpoint with optimizer state, eval-<key>.json). Re-running continues an "
                    "interrupted run and reuses what was made with exactly the same settings.",
        epilog="presets (flags override them):\n" + presets))

    from .retrofit import add_arguments as add_retrofit

    add_retrofit(sub.add_parser("retrofit", help="extend a trained model to a longer context (RoPE scalings, "
                                "T5 max_distance, swap to ALiBi/T5), before/after table; --compare for the decision table"))

    from .diagnose import add_arguments as add_diagnose

    add_diagnose(sub.add_parser("diagnose", help="report why a checkpoint does (not) generalise: loss by position, "
                                "attention distance, buckets/reach, passkey"))
    return p


def _check_common(args: argparse.Namespace) -> None:
    for flag in ("heads", "head_dim", "length", "max_plot_distance"):
        v = getattr(args, flag, None)
        if v is not None and v < 1:
            raise CLIError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    for name in getattr(args, "schemes", None) or []:
        parse_spec(name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if extra and args.command != "show":
            raise CLIError(f"unrecognized arguments: {' '.join(extra)}")
        _check_common(args)
        if args.command == "list":
            cmd_list(args)
        elif args.command == "show":
            get_scheme_class(args.scheme)
            cmd_show(args, extra)
        elif args.command == "plot":
            cmd_plot(args)
        elif args.command == "extrapolate":
            cmd_extrapolate(args)
        elif args.command == "retrofit":
            from .retrofit import run_from_args as run_retrofit

            check_device(args.device)
            run_retrofit(args, say=say)
        elif args.command == "diagnose":
            from .diagnose import run_from_args as run_diagnose

            check_device(args.device)
            run_diagnose(args, say=say)
    except (CLIError, ValueError, FileNotFoundError) as exc:
        print(f"posbias {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly, no traceback
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print(f"\nposbias {args.command}: interrupted (finished work is saved; re-run to resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
