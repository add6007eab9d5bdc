"""The ``posbias`` command: parse arguments, build configs, call the workflows, write their reports, print.

Every subcommand is a function ``cmd_<name>(args)`` bound with ``set_defaults(func=…)``. Scheme
options are flags built from each scheme's typed keyword options (``posbias show t5 --num-buckets 32
--max-distance 128 --bidirectional``), so the command line follows the registry without a list of
its own. Errors print one line and exit with status 2; a config error names the flag the user typed.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

import torch

from . import store
from .stopping import Terminated, sigterm_raises
from ._version import __version__
from .config import ConfigError, check_seed
from .schemes import (SCHEMES, ToeplitzScheme, build, get_scheme_class, option_specs, parse_option, parse_options,
                      parse_spec, with_label)
from .schemes.options import options_text


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``argument --x: problem`` becomes ``--x problem``)."""

    def error(self, message: str) -> NoReturn:
        choice = re.match(r"argument SCHEME: invalid choice: '([^']*)'", message)
        if choice:
            get_scheme_class(choice.group(1))  # raises the registry's own "unknown scheme" message
        command = re.match(r"argument command: invalid choice: '([^']*)' \((choose from .*)\)$", message)
        if command:
            raise CLIError(f"unknown command {command.group(1)!r} ({command.group(2)})")
        if message == "the following arguments are required: command":  # `posbias`, `posbias --bogus`
            raise CLIError(f"give a command ({', '.join(_subcommands(self))}); posbias --help says what each does")
        raise CLIError(re.sub(r"^argument ([^:]+): ", r"\1 ", message))


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Help with each option's default appended, once: not where the text already names its
    default, and not for a default that says nothing (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        says_nothing = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or says_nothing or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".lstrip()


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
    """``cpu``, ``cuda`` or ``cuda:N`` that exists on this machine; ValueError naming ``--device`` otherwise."""
    return store.check_device(device, "--device")


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def _shape_args(p: argparse.ArgumentParser) -> None:
    """--heads, --head-dim and --seed of the schemes ``show`` tabulates and ``plot`` draws: one default
    each, so both commands describe the same schemes unless told otherwise."""
    p.add_argument("--heads", type=int, default=8, help="attention heads")
    p.add_argument("--head-dim", type=int, default=64, help="head dimension")
    p.add_argument("--seed", type=int, default=0, help="seed of the learnable schemes' initial values")


# -- list -------------------------------------------------------------------------------------
def cmd_list(args: argparse.Namespace) -> None:
    width = max(map(len, SCHEMES))
    for name, cls in SCHEMES.items():
        say(f"{name:<{width}}  {cls.family:<8}  {cls.summary}")


# -- show -------------------------------------------------------------------------------------
def add_show_parsers(sub: argparse._SubParsersAction) -> None:
    """``show SCHEME``: one sub-parser per registered scheme, its options typed from the scheme."""
    options = "\n".join(
        f"  {name:<13} " + (", ".join(f"{_flag(k)} ({spec.describe()}, default {spec.default})"
                                       for k, spec in option_specs(cls).items()) or "no options")
        for name, cls in SCHEMES.items())
    s = sub.add_parser("show", help="a scheme's parameters; for t5 the bucket table",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Scheme options follow as flags, e.g. posbias show t5 --num-buckets 32 "
                                   "--max-distance 128, or as a label, posbias show t5@max_distance=128. "
                                   "--offsets 10 20 500 adds the bias of each head at those offsets i − j "
                                   "(T5: and the bucket of each).", epilog="scheme options:\n" + options)
    per_scheme = s.add_subparsers(dest="scheme", metavar="SCHEME", required=True,
                                  help="a registered scheme name (see `posbias list`)")
    for name, cls in SCHEMES.items():
        p = per_scheme.add_parser(name, help=cls.summary, formatter_class=_Help)
        _shape_args(p)
        if cls.family == "additive":
            p.add_argument("--offsets", type=int, nargs="+", metavar="I-J",
                           help="the bias each head adds at these offsets i − j" + (
                               " and the bucket each falls in (which offsets share a parameter)" if name == "t5" else ""))
        if cls.family == "additive" and not cls.toeplitz:
            p.add_argument("--query-pos", type=int, metavar="I",
                           help="the query position the tables are for (this bias reads it: FIRE's progressive "
                                "interpolation; default the largest distance shown, 0 if none is positive)")
        for key, spec in option_specs(cls).items():
            kind = {"nargs": "?", "const": True} if spec.kind is bool else {}
            p.add_argument(_flag(key), dest=f"opt_{key}", metavar=key.upper(), default=None,
                           type=_option_type(name, spec), **kind,
                           help=f"{spec.describe()} (scheme default {spec.default})")
        p.set_defaults(func=cmd_show)


def _option_type(scheme: str, spec) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return parse_option(scheme, spec, text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {spec.describe()} (scheme {scheme!r}), got {text!r}") from None
    return parse


def _scheme_error(name: str, exc: ValueError, also: Sequence[str] = ()) -> CLIError:
    """A scheme's ValueError with its option names (and the argument names ``also``) turned into the flags
    the user types."""
    msg = str(exc)
    for key in (*option_specs(get_scheme_class(name)), *also):
        msg = re.sub(rf"(?<![\w-]){key}(?!\w)", _flag(key), msg)
    return CLIError(msg)


def cmd_show(args: argparse.Namespace) -> None:
    at, offsets = getattr(args, "query_pos", None), getattr(args, "offsets", None)
    specs = option_specs(get_scheme_class(args.scheme))
    flags = {k: getattr(args, f"opt_{k}") for k in specs if getattr(args, f"opt_{k}") is not None}
    torch.manual_seed(args.seed)  # learnable schemes (KERPLE, FIRE) draw their initial values
    try:  # every table made before a line is printed: a bad value stops the command in one line
        _, options = with_label(args.label or args.scheme, flags)
        scheme = build(args.scheme, n_heads=args.heads, head_dim=args.head_dim, **options)
        tables = scheme.describe(query_pos=at) + (scheme.at_offsets(offsets, query_pos=at) if offsets else [])
    except ValueError as exc:
        raise _scheme_error(args.scheme, exc, also=("query_pos", "offsets")) from None
    used = {**{k: s.default for k, s in specs.items()}, **options}
    say(f"{scheme.name}: {scheme.summary}")
    say(f"  {scheme.__class__.__name__}({scheme.extra_repr()})")
    say("  options in use: " + options_text(used, "none")
        + (f"; initialised with --seed {args.seed}" if scheme.learnable else ""))
    say(f"  paper: {scheme.paper}")
    for line in tables:
        say("  " + line)
    if scheme.family == "additive" and not isinstance(scheme, ToeplitzScheme) and at is None:
        say("  (this bias reads the query's own position too: each row is for one query at the largest distance "
            "shown, 0 if none is positive; --query-pos moves it)")


# -- plot -------------------------------------------------------------------------------------
def add_plot_parser(sub: argparse._SubParsersAction) -> None:
    additive = [name for name, cls in SCHEMES.items() if cls.family == "additive"]
    p = sub.add_parser("plot", help="write PNGs: bucket maps, bias heatmaps, curves, T5 vs ALiBi",
                       formatter_class=_Help)
    p.add_argument("--out", default="plots", help="output folder")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--schemes", nargs="+", default=additive,
                      help="schemes to draw, NAME or NAME@KEY=VALUE[,KEY=VALUE] as extrapolate takes them "
                           f"(default: every additive one: {' '.join(additive)})")
    what.add_argument("--checkpoint", nargs="+", metavar="PATH",
                      help="draw the biases these trained models learned instead: posbias checkpoints "
                           "(runs/…/models/<label>/final), model folders, a study's or retrofit's folder (every "
                           "model in it, as diagnose reads them) or local Hugging Face T5/mT5/UMT5/Switch/BLOOM/MPT folders, or the rotation of any with rope parameters (Llama, Qwen, …) "
                           "(read without building the model; nothing is downloaded)")
    _shape_args(p)
    p.add_argument("--length", type=int, default=64,
                   help="tokens in the heatmaps (past 512, 512 evenly spread positions per axis are drawn)")
    p.add_argument("--num-buckets", type=int, default=None,
                   help="of the T5 bucket maps t5_bucket_map.png and t5_bucket_map_bidirectional.png, drawn where a "
                        "t5 label is among --schemes or this or --max-distance is given (default 32); a t5 label "
                        "with other settings gets maps of its own")
    p.add_argument("--max-distance", type=int, default=None, help="of those maps (default 128)")
    p.add_argument("--max-plot-distance", type=int, default=512, help="largest distance of the bias curves")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> None:
    from . import plot

    from .schemes.alibi import ALiBi
    from .schemes.t5 import T5Bias, check_t5

    asked = [f for f, v in (("--num-buckets", args.num_buckets), ("--max-distance", args.max_distance)) if v is not None]
    if args.checkpoint and asked:
        raise CLIError(f"{asked[0]} sets the bucket maps of --schemes; with --checkpoint each T5 model's map is "
                       "drawn at its own settings")
    default = {k: spec.default for k, spec in option_specs(T5Bias).items()}  # T5's own: 32 buckets, distance 128
    nb = default["num_buckets"] if args.num_buckets is None else args.num_buckets
    md = default["max_distance"] if args.max_distance is None else args.max_distance
    if not args.checkpoint:  # the bucket maps' settings (causal and bidirectional), before anything is drawn
        for both in (False, True):
            try:
                check_t5(nb, md, both)
            except ValueError as exc:  # (plot has no --bidirectional: it draws both maps)
                raise CLIError(str(_scheme_error("t5", exc)).replace("--bidirectional needs",
                                                                     "the bidirectional map needs")) from None
    out = store.check_out_dir(args.out)
    if args.checkpoint:
        return _plot_checkpoints(args.checkpoint, out, args)
    torch.manual_seed(args.seed)
    labelled = []
    for label in dict.fromkeys(args.schemes):  # a label given twice is drawn once
        try:
            labelled.append((label, build(label, n_heads=args.heads, head_dim=args.head_dim)))
        except ValueError as exc:
            raise CLIError(f"scheme {label}: {exc}") from None
    drawn, rotary = _drawable(labelled)
    what = {label: s.illustrate_() for label, s in drawn}  # table schemes start at 0: an illustrative table
    # the bucket maps at the flags' settings where they were given or a T5 drawn has them, a map of its own
    # for a T5 with others, the textbook's T5-vs-ALiBi figure where both are drawn: `--schemes rope` writes
    # rope_wavelengths.png alone
    t5s = [s for _, s in drawn if isinstance(s, T5Bias)]
    written = []
    if asked or any((s.num_buckets, s.max_distance) == (nb, md) for s in t5s):
        written += [plot.plot_bucket_map(out / "t5_bucket_map.png", num_buckets=nb, max_distance=md),
                    plot.plot_bucket_map(out / "t5_bucket_map_bidirectional.png", num_buckets=nb, max_distance=md,
                                         bidirectional=True)]
    own = {(s.num_buckets, s.max_distance, s.bidirectional) for s in t5s} - {(nb, md, False), (nb, md, True)}
    written += [_t5_map(out, *config) for config in sorted(own)]
    if t5s and any(isinstance(s, ALiBi) for _, s in drawn):
        written.append(plot.plot_t5_vs_alibi(out / "t5_vs_alibi.png"))
    for label, s in drawn:
        written.append(plot.plot_bias_heatmaps(s, out / f"heatmap_{_slug(label)}.png", length=args.length,
                                               causal=not s.two_sided,
                                               note=f" — {what[label]}" + ("" if label == s.name else f" ({label})")))
    if drawn:
        title = "bias versus distance (" + "; ".join(f"{n} {w}" for n, w in what.items()) + ")"
        written.append(plot.plot_bias_curves([s for _, s in drawn], out / "bias_vs_distance.png",
                                             max_distance=args.max_plot_distance, title=title,
                                             names=[label for label, _ in drawn]))
    written += _wavelengths(rotary, out)
    for p in written:
        say(str(p))


def _drawable(labelled: list[tuple[str, Any]]) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """``(label, scheme)`` pairs split into those with a bias and the rotary ones (their wavelengths are
    drawn instead); the rest said skipped in one line."""
    skipped = [f"{label} ({s.family if label == s.name else s.name}: no attention bias to draw)"
               for label, s in labelled if s.family not in ("additive", "rotary")]
    if skipped:
        say("skipping " + ", ".join(skipped))
    return ([(label, s) for label, s in labelled if s.family == "additive"],
            [(label, s) for label, s in labelled if s.family == "rotary"])


def _wavelengths(rotary: list[tuple[str, Any]], out: Path, trained: dict[str, int | None] | None = None) -> list[Path]:
    """``rope_wavelengths.png`` for the rotary schemes, if any: no bias to draw, but each pair's wavelength
    and what a scaling does to it."""
    from . import plot

    if not rotary:
        return []
    return [plot.plot_rotary_wavelengths([s for _, s in rotary], out / "rope_wavelengths.png",
                                         names=[label for label, _ in rotary],
                                         trained=[trained[label] for label, _ in rotary] if trained else None)]


def _plot_checkpoints(paths: Sequence[str], out: Path, args: argparse.Namespace) -> None:
    """``posbias plot --checkpoint``: each model's learned bias as per-head heatmaps, every model's
    bias against distance in one figure (both directions for a bidirectional T5 encoder), and the
    bucket map of each T5 configuration among them; a line per bias with its range."""
    from . import plot
    from .schemes.base import ToeplitzScheme
    from .schemes.t5 import T5Bias

    drawn, seen, trained = [], {}, {}
    firsts: dict[str, str] = {}
    for p in paths:  # a path given twice (a shell pattern and a name, say) is drawn once
        firsts.setdefault(os.path.abspath(p), p)
    paths = list(firsts.values())
    for label, s, length in (item for path in paths for item in _checkpoint_schemes(path)):
        seen[label] = seen.get(label, 0) + 1  # two folders of one name: "name", "name #2" (no file drawn over)
        drawn.append((label if seen[label] == 1 else f"{label} #{seen[label]}", s))
        trained[drawn[-1][0]] = length
    drawn, rotary = _drawable(drawn)
    if not drawn and not rotary:
        raise CLIError("none of these checkpoints has an attention bias or a rotation to draw")
    for label, s in rotary:
        say(f"{label}: {s.name} ({s.extra_repr()}) — rotary, fixed: its wavelengths in rope_wavelengths.png")
    written = _wavelengths(rotary, out, trained)
    for label, s in drawn:
        both = s.two_sided
        b = s.bias_by_distance(torch.arange(-args.max_plot_distance if both else 0, args.max_plot_distance + 1))
        say(f"{label}: {s.name} ({s.extra_repr()}){'' if s.learnable else ' — fixed, not learned'}; "
            f"bias from {float(b.min()) + 0.0:+.3f} to {float(b.max()) + 0.0:+.3f} over distances "
            f"{'±' if both else '0–'}{args.max_plot_distance}"
            + ("" if isinstance(s, ToeplitzScheme) else f" for a query at position {args.max_plot_distance}"))
        written.append(plot.plot_bias_heatmaps(s, out / f"heatmap_{_slug(label)}.png", length=args.length,
                                               causal=not both, note=f" — {label}"))
    if drawn:
        written.append(plot.plot_bias_curves([s for _, s in drawn], out / "learned_bias_vs_distance.png",
                                             max_distance=args.max_plot_distance, names=[label for label, _ in drawn],
                                             log_distance=True, title="learned positional biases",
                                             trained=[trained[label] for label, _ in drawn]))
    maps = {(s.num_buckets, s.max_distance, s.bidirectional) for _, s in drawn if isinstance(s, T5Bias)}
    written += [_t5_map(out, nb, md, both) for nb, md, both in sorted(maps)]
    for p in written:
        say(str(p))


def _t5_map(out: Path, num_buckets: int, max_distance: int, bidirectional: bool) -> Path:
    """The bucket map of one T5 configuration, named by it: ``t5_bucket_map_<N>_<D>_<causal|bidirectional>.png``."""
    from . import plot

    return plot.plot_bucket_map(out / f"t5_bucket_map_{num_buckets}_{max_distance}_"
                                      f"{'bidirectional' if bidirectional else 'causal'}.png",
                                num_buckets=num_buckets, max_distance=max_distance, bidirectional=bidirectional)


def _checkpoint_schemes(path: str) -> list[tuple[str, Any, int | None]]:
    """The positional schemes in a posbias checkpoint (one) or a Hugging Face folder (one per part),
    labelled by the model's folder name, with the training length a posbias checkpoint records (None
    where none is known: a Hugging Face model's is not in its config)."""
    from . import checkpoint as ckpt

    p = Path(path)
    name = ckpt.model_folder(p).name
    if ckpt.is_posbias(p):
        return [(name, ckpt.load_model(p).scheme, ckpt.train_len(p, missing_ok=True))]
    if not (p / "config.json").is_file():
        try:  # a model folder (its final/), or a study's or retrofit's folder: as diagnose reads them
            targets = _model_targets([path])
        except CLIError:
            raise CLIError(f"{path!r} is neither a posbias checkpoint, a folder of them nor a Hugging Face model "
                           "folder (no config.json)") from None
        return [(label, ckpt.load_model(where).scheme, ckpt.train_len(where, missing_ok=True))
                for label, _, where in targets]
    from .integrations.hf import schemes_from_pretrained

    return [(f"{name} {part}".rstrip(), s, None) for part, s in schemes_from_pretrained(p).items()]


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)


# -- extrapolate ------------------------------------------------------------------------------
PRESET_NOTES = {
    "demo": "8 schemes x 1 seed, about 6 min on an idle 2-core CPU (make demo)",
    "cpu": "the longer CPU protocol, about 1 h per seed on a 2-core CPU",
    "gpu": "larger models, 3 seeds, for a CUDA device (not yet timed at these settings)",
}
STUDY_FIELDS = ("schemes", "train_len", "eval_lens", "steps", "batch_size", "lr", "pos_lr_mult", "d_model",
                "n_layers", "n_heads", "seeds", "eval_tokens", "threads", "device")


def add_extrapolate_parser(sub: argparse._SubParsersAction) -> None:
    from .evaluate import MIN_SEGMENTS, SEGMENTS
    from .study import PRESETS, StudyConfig, default_schemes

    presets = "\n".join(f"  {name:<5} {PRESET_NOTES.get(name, '')}\n        " + ", ".join(
        f"{k}={' '.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in cfg.items())
        for name, cfg in PRESETS.items())
    p = sub.add_parser(
        "extrapolate", help="train short, test long: the length-generalization study",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="presets (flags override them):\n" + presets,
        description="Train one small byte-level LM per scheme (and seed) at --train-len, then score every model on "
                    "the same validation tokens at each --eval-lens. Writes into --out: results.md (tables with 95% "
                    "intervals, and which differences between schemes are real: paired over the same text), "
                    "results.json (one record per scheme, seed and length), ppl_vs_length.png, ratio_vs_length.png, "
                    "loss_vs_position.png, learned_bias_vs_distance.png, and models/<label>-seed<N>-<key>/ (final/ "
                    "weights, last/ checkpoint with optimizer state, eval-<key>.json). Re-running continues an "
                    "interrupted run and reuses what was made with exactly the same settings. The same command "
                    "started more than once (e.g. --threads 1 per core, or --device cuda:N per GPU) shares the "
                    "work: each model is made by one run, and every run ends with the full report.")
    d = StudyConfig()
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named configuration; flags override it")
    p.add_argument("--schemes", nargs="+", metavar="SCHEME",
                   help=f"scheme labels, NAME or NAME@KEY=VALUE[,KEY=VALUE] (default: {' '.join(default_schemes())})")
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
    p.add_argument("--eval-tokens", type=int, help="validation tokens scored at every length, in segments of the longest length "
                   f"spread evenly over the split (default: {SEGMENTS} segments; fewer give too narrow intervals; at least "
                   f"{MIN_SEGMENTS})")
    p.add_argument("--threads", type=int, help=f"torch threads, fixed for reproducible results (default {d.threads})")
    p.add_argument("--device", help="cpu or cuda (default cpu)")
    _corpus_args(p)
    p.add_argument("--out", default="runs/study", help="output folder (default runs/study)")
    # The default goes through set_defaults: given to add_argument, Python 3.10's BooleanOptionalAction
    # appends "(default: True)" to a help text that already names it.
    p.add_argument("--keep-last", action=argparse.BooleanOptionalAction,
                   help="keep each model's last/ checkpoint (optimizer state, about 2/3 of a model folder) after "
                        "final/ exists; --no-keep-last deletes it (default: keep)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_extrapolate, keep_last=True)


def study_config(args: argparse.Namespace):
    from .study import PRESETS, StudyConfig

    values: dict[str, Any] = dict(PRESETS[args.preset]) if args.preset else {}
    for name in STUDY_FIELDS:
        v = getattr(args, name, None)
        if v is not None:
            values[name] = tuple(v) if isinstance(v, list) else v
    pairs: dict[str, list[str]] = {}
    for item in args.scheme_option:
        target, dot, pair = item.partition(".")
        if not dot or "=" not in pair:
            raise CLIError(f"--scheme-option {item!r} must look like SCHEME.KEY=VALUE, e.g. t5.max_distance=64")
        get_scheme_class(target)
        pairs.setdefault(target, []).append(pair)
    try:  # one option given twice is refused (the last would win silently)
        values["scheme_options"] = {target: parse_options(target, given) for target, given in pairs.items()}
    except ValueError as exc:
        raise CLIError(f"--scheme-option: {exc}") from None
    device = values.get("device", "cpu")
    if args.device is None and args.preset and device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--preset {args.preset} asks for --device {device}, but this machine has no CUDA device; "
                       "add --device cpu to run it on the CPU (slowly)")
    check_device(device)
    return StudyConfig(**values)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _stale_note(out: Path) -> None:
    """After a run: a line where its folder also holds results no run will reuse, found as ``posbias clean``
    finds them (:func:`~posbias.clean.locked`, then :func:`~posbias.clean.find`). None while another run
    works in the folder: its writes in flight are no leftovers, and one that finished during the search
    (a file listed, then renamed) failed a study that had finished everything (exit 2, seen once in a
    clean clone's `make test`); that run says the note when it ends."""
    from . import clean

    try:
        with clean.locked(out) as held:
            found = clean.find(out, skip=held.busy)
    except store.FolderBusy:
        return
    if found.stale:
        say(f"{out} also holds {len(found.stale)} older result(s), {_mib(found.size)}, that no run will reuse: "
            f"`posbias clean {out}` lists them with the reasons")


def _corpus_args(p: argparse.ArgumentParser, data_note: str = "") -> None:
    """--data / --hf-dataset, one or neither."""
    source = p.add_mutually_exclusive_group()
    source.add_argument("--data", help="a local text file, or a folder: every file in it but hidden and binary ones "
                        f"(the terminal names them), instead of the embedded default{data_note}")
    source.add_argument("--hf-dataset", help="NAME[:CONFIG][#COLUMN] of a Hugging Face dataset (needs posbias[datasets]; "
                        "column 'text' unless named; without a validation split 5%% of the training documents "
                        "are held out)")


def _load_corpus(args: argparse.Namespace, *, line: bool = False) -> Any:
    """The text of ``--data`` / ``--hf-dataset`` (the embedded corpus without them), with a note for
    each thing its reading passed over or decided; ``line``: first a line on what it is."""
    from .data import load_corpus

    corpus = load_corpus(args.data, args.hf_dataset)
    fp = corpus.fingerprint
    if line:
        n, unit = (fp["files"], "file") if "files" in fp else (fp["documents"], "document")
        count = f"{n:,} {unit}{'' if n == 1 else 's'}"
        say(f"corpus {fp['name']}: {count}, {fp['bytes']:,} bytes, sha256 {fp['sha256']}")
    for note in corpus.notes:
        say(f"note: {note}")
    return corpus


def cmd_extrapolate(args: argparse.Namespace) -> None:
    from .report import study as report
    from .study import run_study

    cfg = study_config(args)
    _threads_note(cfg.threads, cfg.device)
    out = Path(args.out)
    corpus = _load_corpus(args, line=True)
    n_models = len(cfg.schemes) * len(cfg.seeds)
    say(f"{len(cfg.schemes)} scheme(s) x {len(cfg.seeds)} seed(s) = {n_models} model{'' if n_models == 1 else 's'} of {cfg.steps} steps x "
        f"{cfg.batch_size} sequences at length {cfg.train_len}, scored at {', '.join(map(str, cfg.lengths()))} "
        f"on {cfg.threads} threads; models already made with these settings are reused (the demo preset takes "
        "about 40 s per model on a 2-core CPU)")
    t0 = time.perf_counter()
    with store.FolderLock(out, shared=True):  # other studies may work in the folder too (run_study)
        result = run_study(cfg, out, corpus=corpus, progress=not args.quiet, keep_last=args.keep_last, log=say)
        report.write(result, out, log=say)
    say()
    say((out / "results.md").read_text())
    say(f"done in {time.perf_counter() - t0:.0f} s. Written to {out}/:")
    for f in [out / "results.md", out / "results.json", *sorted(out.glob("*.png"))]:
        say(f"  {f.name:<30} {_mib(store.disk_size(f))}")
    models = out / "models"
    if models.is_dir():
        last = sum(store.disk_size(d) for d in models.glob("*/last"))
        say(f"  {'models/':<30} {_mib(store.disk_size(models))}" + (f", of which {_mib(last)} is last/ checkpoints "
                                                            "(optimizer state; --no-keep-last prunes them)" if last else ""))
        say(f"Why each model does (not) generalise, side by side: posbias diagnose {out}")
    _stale_note(out)


# -- retrofit ---------------------------------------------------------------------------------
def _defaults(config: type) -> dict[str, Any]:
    """A config dataclass's field defaults by name: a command's flags take them from there, so
    ``posbias retrofit`` runs what ``RetrofitConfig(...)`` runs, with no second copy of a number."""
    import dataclasses

    return {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}


def add_retrofit_parser(sub: argparse._SubParsersAction) -> None:
    from .evaluate import MIN_SEGMENTS, SEGMENTS
    from .retrofit import METHODS, RetrofitConfig

    d = _defaults(RetrofitConfig)

    p = sub.add_parser("retrofit", help="extend a trained model to a longer context (RoPE scalings, T5 max_distance, "
                       "swap to ALiBi/T5), before/after table; --compare for the decision table",
                       formatter_class=_Help)
    p.add_argument("checkpoint", help="a posbias checkpoint folder (e.g. runs/demo/models/rope-seed0-<key>/final)")
    p.add_argument("--to", type=int, required=True, help="the target context length")
    p.add_argument("--method", "--methods", dest="methods", nargs="+", choices=sorted(METHODS), metavar="METHOD",
                   help=f"one or more of: {', '.join(METHODS)} (default with --compare: every method that fits)")
    p.add_argument("--compare", action="store_true",
                   help="the decision table: every fitting method, passkey accuracy, extra parameters, attention cost")
    p.add_argument("--finetune-steps", type=int, default=d["finetune_steps"],
                   help="language-model fine-tune at --to after each method")
    p.add_argument("--finetune-batch", type=int, default=d["finetune_batch"], help="sequences per fine-tune step")
    p.add_argument("--finetune-lr", type=float, default=d["finetune_lr"], help="peak fine-tune learning rate")
    p.add_argument("--pos-lr-mult", type=float,
                   help="the positional parameters' multiple of every fine-tune's learning rate (default: the "
                        "checkpoint's training value, train.pos_lr_mult)")
    p.add_argument("--eval-lens", type=int, nargs="+", help="lengths to score, including L and --to (default: L, and 2L, 4L … that divide --to, and --to: then every length scores the same text)")
    p.add_argument("--eval-tokens", type=int,
                   help="validation tokens scored at each length, in segments spread evenly over the split (default: "
                        f"{SEGMENTS} segments of the longest length; fewer give too narrow intervals; at least {MIN_SEGMENTS})")
    p.add_argument("--seed", type=int, default=d["seed"],
                   help="seed of the fine-tunes' batches and the passkey copies' training: another seed is another "
                        "draw of every fine-tune (its own cache and models), to tell a method from one fine-tune's luck")
    _add_passkey_fit_arguments(p, d, "with --compare; 0 skips the passkey test")
    _add_checkpoint_job_arguments(p, d, "retrofit", cmd_retrofit)


def _add_checkpoint_job_arguments(p: argparse.ArgumentParser, d: dict[str, Any], kind: str, func: Callable) -> None:
    """The flags every job on a checkpoint shares (device, data, output folder, quiet); ``d``: the job's
    config defaults (:func:`_defaults`)."""
    p.add_argument("--device", default=d["device"], help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=d["threads"], help="torch threads, fixed for reproducible results")
    _corpus_args(p, " (measure on the text the checkpoint was trained on: the report says whether it is)")
    p.add_argument("--out", help=f"default: runs/{kind}-<model folder's name>"
                   + (", or with several models runs/diagnose-<the first PATH's name>" if kind == "diagnose" else ""))
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=func)


def usable_cores() -> int | None:
    """The CPU cores this process may run on (its affinity; the machine's count where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def _threads_note(threads: int, device: str) -> None:
    """A line when a CPU job is given more torch threads than it has cores: they share the cores (a demo
    model's training step took 1.3× as long at 8 threads as at 2 on 2 cores, 2026-12-04), and since the
    thread count is part of every result's key, its results are not a run's at the core count."""
    cores = usable_cores()
    if device == "cpu" and cores and threads > cores:
        say(f"note: --threads {threads} is more than the {cores} cores this process may use; the threads share them "
            f"(slower, not faster), and results are keyed by the thread count (--threads {cores} would make other ones)")


def _check_machine(device: str, threads: int) -> None:
    """The device exists here (:func:`check_device`); a note if the threads outnumber the cores."""
    check_device(device)
    _threads_note(threads, device)


def _prepare_checkpoint_job(args: argparse.Namespace, kind: str) -> Path:
    """Check the device and the checkpoint; the output folder (``runs/<kind>-<name>`` by default)."""
    from . import checkpoint as ckpt

    _check_machine(args.device, args.threads)
    ckpt.require(args.checkpoint)
    return Path(args.out or f"runs/{kind}-{Path(args.checkpoint).resolve().parent.name}")


def _corpus_note(corpus: Any, checkpoint: str | Path) -> None:
    """A line when ``corpus`` is not the text the checkpoint records it was trained on."""
    from . import checkpoint as ckpt
    from .report import corpus_line, same_text

    trained = ckpt.read_meta(checkpoint).get("corpus")
    if trained is not None and not same_text(corpus.fingerprint, trained):
        say(corpus_line(corpus.fingerprint, trained, markdown=False))


def cmd_retrofit(args: argparse.Namespace) -> None:
    from . import checkpoint as ckpt
    from .report import retrofit as report
    from .retrofit import RetrofitConfig, methods_for, run_retrofit

    out = _prepare_checkpoint_job(args, "retrofit")
    scheme = ckpt.read_meta(args.checkpoint)["model"]["scheme"]
    methods = args.methods or (methods_for(scheme) if args.compare else None)
    if not methods:
        raise CLIError(f"give --method (for a {scheme} checkpoint: {', '.join(methods_for(scheme)) or 'none'}) "
                       "or --compare")
    if args.passkey_seeds is not None and not args.compare:
        raise CLIError("--passkey-seeds chooses the passkey copies of --compare's decision table: add --compare")
    cfg = RetrofitConfig(to=args.to, methods=tuple(methods), finetune_steps=args.finetune_steps,
                         finetune_batch=args.finetune_batch, finetune_lr=args.finetune_lr, pos_lr_mult=args.pos_lr_mult,
                         eval_lens=tuple(args.eval_lens) if args.eval_lens else None, eval_tokens=args.eval_tokens,
                         compare=args.compare, passkey_steps=args.passkey_steps,
                         passkey_until=args.passkey_until, seed=args.seed,
                         passkey_seeds=None if args.passkey_seeds is None else tuple(args.passkey_seeds),
                         device=args.device, threads=args.threads)
    corpus = _load_corpus(args)
    _corpus_note(corpus, args.checkpoint)
    t0 = time.perf_counter()
    with store.FolderLock(out):
        result = run_retrofit(args.checkpoint, cfg, out, corpus=corpus, progress=not args.quiet, log=say)
        report.write(result, out, log=say)
    say()
    say((out / "results.md").read_text())
    say(f"done in {time.perf_counter() - t0:.0f} s; table {out / 'results.md'}, plot {out / 'ppl_vs_length.png'}")
    _stale_note(out)


# -- diagnose ---------------------------------------------------------------------------------
def add_diagnose_parser(sub: argparse._SubParsersAction) -> None:
    from .diagnose import DiagnoseConfig
    from .evaluate import MIN_SEGMENTS, SEGMENTS

    d = _defaults(DiagnoseConfig)

    p = sub.add_parser("diagnose", help="report why a checkpoint does (not) generalise: loss by position (local "
                       "context vs distant keys), attention distance and attention beyond L, buckets, reach and "
                       "drift of the bias, passkey; several models side by side", formatter_class=_Help,
                       description="Diagnose one model (report.md, diagnose.json, PNGs in --out), or several: each "
                       "into --out/<model>/, and comparison.md, comparison.json and comparison.png beside them. "
                       "Measurements are kept in the output folder, keyed by everything that made them: a re-run "
                       "measures only what it lacks.")
    p.add_argument("checkpoints", nargs="+", metavar="PATH",
                   help="a posbias checkpoint, a model folder (its final/), or a study's or retrofit's output folder "
                        "(every model in it)")
    p.add_argument("--length", type=int, help="window examined, longer than the training length L (default 8 L; "
                                              "at least 2 L to measure far tokens at chunk ends)")
    p.add_argument("--windows", type=int, default=d["windows"], help="validation windows for the attention statistics")
    p.add_argument("--eval-tokens", type=int,
                   help=f"validation tokens for the loss by position (at least {MIN_SEGMENTS} windows; they are "
                        f"spread evenly over the split; default: {SEGMENTS} windows of --length)")
    _add_passkey_fit_arguments(p, d, "0 skips the passkey test")
    p.add_argument("--passkey-samples", type=int, default=d["passkey_samples"],
                   help="passkey samples per (length, depth) cell")
    _add_checkpoint_job_arguments(p, d, "diagnose", cmd_diagnose)


def _add_passkey_fit_arguments(p: argparse.ArgumentParser, d: dict[str, Any], steps_note: str) -> None:
    """--passkey-steps, --passkey-until and --passkey-seeds (:func:`posbias.passkey.teach`); ``d``: the job's
    config defaults (a passkey seed of None: one copy, of --seed)."""
    seeds = d["passkey_seeds"]
    p.add_argument("--passkey-steps", type=int, default=d["passkey_steps"],
                   help=f"steps of each passkey fine-tune ({steps_note}); a probe at the training length every 100 "
                        "steps records when each copy learned the task")
    p.add_argument("--passkey-until", type=float, default=d["passkey_until"],
                   help="end a passkey fine-tune once the copy solves this share of the probe (faster, but its "
                        "accuracy past L then compares only with copies stopped the same way); 0 trains every step")
    p.add_argument("--passkey-seeds", "--passkey-seed", type=int, nargs="+", metavar="K", default=seeds,
                   help="seeds of the passkey fine-tunes' batches, one copy each (its folder, probe and cells named by "
                        "it; the test samples stay the same): several tell a copy's luck from the model's; the cells "
                        "are their mean, each copy and the spread reported (each copy ~3.5 min on a demo model, 2 CPU "
                        f"cores; default: one copy, of {'--seed' if seeds is None else 'seed ' + ' '.join(map(str, seeds))})")


def _model_targets(paths: list[str]) -> list[tuple[str, str, Path]]:
    """``(label, folder name, checkpoint)`` for every model the paths name
    (:func:`posbias.checkpoint.discover`), each once; labels are the folder names without a study's or
    retrofit's key, made unique. In a folder of several models, one that this posbias would never reuse
    (``posbias clean``'s verdict: older code or torch) is passed over where a current model of the same
    name sits beside it: a study re-run after an upgrade keeps both, and its report is about the new
    one. CLIError for a path that names none."""
    from . import checkpoint as ckpt

    found: dict[Path, tuple[str, str]] = {}
    for path in paths:
        got = ckpt.discover(path)
        if not got:
            raise CLIError(f"{path!r} holds no posbias checkpoint: give a checkpoint, a model folder with final/, "
                           "or a study's or retrofit's output folder" + ckpt.subfolder_hint(path))
        kept = _current_models(got) if len(got) > 1 else got
        if len(kept) < len(got):
            say(f"{path}: passing over {len(got) - len(kept)} model folder(s) of an older posbias or torch, beside "
                f"current ones of the same names (`posbias clean {path}` lists them)")
        for name, where in kept:
            if where.resolve() in found:
                continue
            label = _unkeyed(name)
            unique, k = label, 2
            while unique in {taken for taken, _ in found.values()}:
                unique, k = f"{label}-{k}", k + 1
            found[where.resolve()] = unique, name
    return [(label, name, where) for where, (label, name) in found.items()]


def _current_models(got: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """``got`` (:func:`posbias.checkpoint.discover`'s list) without the stale models that have a
    current one of the same name (the folder name less its key) beside them."""
    from . import checkpoint as ckpt
    from .clean import model_why

    folders = {where: ckpt.model_folder(where) for _, where in got}
    stale = {where for where, d in folders.items() if (d / "key.json").exists() and model_why(d)}
    current = {_unkeyed(name) for name, where in got if where not in stale}
    return [(name, where) for name, where in got if where not in stale or _unkeyed(name) not in current]


def _unkeyed(name: str) -> str:
    """A model folder's name without a study's or retrofit's key (``t5-seed0-<10 hex digits>`` → ``t5-seed0``)."""
    return re.sub(r"-[0-9a-f]{10}$", "", name)


def cmd_diagnose(args: argparse.Namespace) -> None:
    from .diagnose import DiagnoseConfig, examined_length, run_diagnose
    from .report import comparison
    from .report import diagnose as report

    _check_machine(args.device, args.threads)
    targets = _model_targets(args.checkpoints)
    single = len(targets) == 1
    named = targets[0][1] if single else Path(args.checkpoints[0]).resolve().name
    out = Path(args.out or f"runs/diagnose-{named}")  # one model: its folder's full name, key included
    cfg = DiagnoseConfig(length=args.length, windows=args.windows, eval_tokens=args.eval_tokens,
                         passkey_steps=args.passkey_steps, passkey_until=args.passkey_until,
                         passkey_samples=args.passkey_samples, passkey_seeds=tuple(args.passkey_seeds),
                         device=args.device, threads=args.threads)
    corpus = _load_corpus(args)
    for name, _, path in targets:  # before any work: a bad --length for the last model would waste the others'
        examined_length(path, cfg, corpus, name)
    t0 = time.perf_counter()
    done = []
    with store.FolderLock(out):
        for k, (name, _, path) in enumerate(targets, 1):
            where = out if single else out / name
            if not single:
                say(f"[{k}/{len(targets)}] {name} ({path})")
            _corpus_note(corpus, path)
            result = run_diagnose(path, cfg, corpus=corpus, progress=not args.quiet, log=say, out=where)
            report.write(result, where, log=say)
            for line in report.summary(result):
                say(line if single else f"  {line}")
            done.append((name, result))
        if not single:
            comparison.write(done, out, log=say)
    if single:
        say(f"done in {time.perf_counter() - t0:.0f} s; report {out / 'report.md'}")
    else:
        for line in comparison.sentences([comparison.row(name, r) for name, r in done]):
            say(f"* {line}")
        say(f"done in {time.perf_counter() - t0:.0f} s; comparison {out / 'comparison.md'}, "
            f"one report per model in {out}/<model>/report.md")
    _stale_note(out)


# -- clean ------------------------------------------------------------------------------------
def add_clean_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "clean", formatter_class=_Help,
        help="list (with --delete, remove) the results in folders that this posbias would never reuse",
        description="Every result is kept under a key of everything that made it, so a run after an upgrade, or "
                    "under another torch, computes afresh beside the old result, which is never read again. "
                    "This lists those results in each FOLDER (a study's, a retrofit's or a diagnosis's output, or "
                    "a folder above them): model folders and evaluations of studies, caches of retrofit and "
                    "diagnose with the models made beside them, and what interrupted writes left; each with the "
                    "reason and its size, and the reports made from them (never deleted: re-run those). Results "
                    "of other settings, seeds, thread counts or devices are kept: a run with those reuses them. "
                    "A folder where a run is working is passed over; one at or above a FOLDER named refuses.")
    p.add_argument("folders", nargs="+", metavar="FOLDER")
    p.add_argument("--delete", action="store_true", help="remove what is listed (otherwise nothing is changed)")
    p.set_defaults(func=cmd_clean)


def cmd_clean(args: argparse.Namespace) -> None:
    from . import clean

    total = 0
    for folder in args.folders:
        with clean.locked(folder) as held:
            root = held.root
            for busy, holder in held.busy.items():
                say(f"{busy}: passed over, in use by {holder}")
            found = clean.find(root, skip=held.busy)
            if not found.stale:
                say(f"{root}: nothing stale ({found.checked} keyed result(s) checked)")
            else:
                say(f"{root}: {len(found.stale)} stale item(s) of {found.checked} keyed result(s) checked, "
                    f"{_mib(found.size)}")
                for item in found.stale:
                    say(f"  {item.path.relative_to(root)}  [{item.what}, {_mib(item.size)}] {item.why}")
            for why in dict.fromkeys(why for _, why in found.reports):  # one line per reason, in order
                reports = [str(r.relative_to(root)) for r, w in found.reports if w == why]
                say(f"  report{'s' if len(reports) > 1 else ''} {store.listed(reports, 5)}: {why}")
            total += clean.remove(found) if args.delete else found.size
    if args.delete:
        say(f"removed {_mib(total)}")
    elif total:
        say(f"nothing removed; add --delete to remove these ({_mib(total)})")


# -- parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="posbias", description="Relative positional biases for attention.")
    p.add_argument("--version", action="version", version=f"posbias {__version__} (torch {torch.__version__})")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the registered schemes, one line each",
                   description="The registered schemes, one line each: name, family and summary; "
                               "`posbias show NAME` for one in full.").set_defaults(func=cmd_list)
    add_show_parsers(sub)
    add_plot_parser(sub)
    add_extrapolate_parser(sub)
    add_retrofit_parser(sub)
    add_diagnose_parser(sub)
    add_clean_parser(sub)
    return p


def _check_common(args: argparse.Namespace) -> None:
    for flag in ("heads", "head_dim", "length", "max_plot_distance"):
        v = getattr(args, flag, None)
        if v is not None and v < 1:
            raise CLIError(f"{_flag(flag)} must be >= 1, got {v}")
    if getattr(args, "seed", None) is not None:
        check_seed("seed", args.seed)
    for name in getattr(args, "schemes", None) or []:
        parse_spec(name)
    out = getattr(args, "out", None)
    if out is not None:
        store.check_out_dir(out)


def _flag_of(parser: argparse.ArgumentParser, argv: Sequence[str], field: str) -> str:
    """The flag of config field ``field`` in the subcommand's parser (the field itself if none)."""
    command, words = parser, list(argv)
    while words:  # down the subcommands the user typed (``show`` has one per scheme)
        subs = _subcommands(command)
        if words[0] not in subs:
            break
        command = subs[words.pop(0)]
    for action in (command._actions if command is not parser else []):
        if action.dest == field and action.option_strings:
            return max(action.option_strings, key=len) if field != "methods" else "--method"
    return field


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """A parser's sub-parsers by name ({} where it has none)."""
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    return {} if sub is None else sub.choices


def _error(command: str, message: str, code: int) -> int:
    """Print ``posbias COMMAND: error: MESSAGE`` (``posbias: error: …`` before a command) on a line of its
    own; return the exit status ``code``."""
    _close_bars()
    print(f"{_prog(command)}: error: {message}", file=sys.stderr)
    return code


def _prog(command: str) -> str:
    """``posbias COMMAND``, or ``posbias`` before a command is known."""
    return f"posbias {command}" if command else "posbias"


def _close_bars() -> None:
    """Close the progress bars an error left open (a bar is closed where its loop ends, which an error
    skips): each clears its line, so the message that follows starts a line instead of trailing the bar."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


#: how torch says an allocation failed: on the CPU (``DefaultCPUAllocator: can't allocate memory: you
#: tried to allocate N bytes``) and on CUDA (``torch.OutOfMemoryError``: ``CUDA out of memory``)
_NO_MEMORY = re.compile(r"can't allocate memory: you tried to allocate (\d+) bytes|out of memory", re.IGNORECASE)


def _memory_problem(exc: BaseException) -> str | None:
    """A failed allocation in one line (what was asked, and what to do); None for any other error."""
    found = _NO_MEMORY.search(str(exc)) if isinstance(exc, RuntimeError) else None
    if not isinstance(exc, MemoryError) and found is None:
        return None
    asked = f" (an allocation of {store.memory_text(int(found.group(1)))})" if found and found.group(1) else ""
    return (f"out of memory{asked}; what was finished is kept: a shorter length, a smaller batch or "
            f"fewer evaluation tokens, then re-run to resume")


def _os_problem(exc: OSError) -> str:
    """An ``OSError`` in one line: the file, what the system said and, where space ran out, what to do
    (every result is written atomically, so what was finished is kept and a re-run resumes from it)."""
    where = f"{str(exc.filename)!r}: " if exc.filename else ""
    said = f"{where}{exc.strerror or exc}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{said}; what was finished is kept: free some space and re-run to resume"
    return said


def main(argv: Sequence[str] | None = None) -> int:
    with sigterm_raises():
        return _main(list(sys.argv[1:] if argv is None else argv))


def _main(argv: list[str]) -> int:
    parser = build_parser()
    command = argv[0] if argv and argv[0] in _subcommands(parser) else ""  # (not `posbias --bogus: error`)
    try:
        label = argv[1] if command == "show" and len(argv) > 1 else ""  # a label, t5@max_distance=64: its name
        args, extra = parser.parse_known_args([command, label.partition("@")[0], *argv[2:]] if "@" in label else argv)
        if command == "show":
            args.label = label  # cmd_show takes its options with the flags'
        if extra:
            if command == "show" and "--offsets" in extra:
                cls = get_scheme_class(args.scheme)
                raise CLIError(f"--offsets needs a scheme with an attention bias; {args.scheme!r} is {cls.family!r} "
                               f"(`posbias show {args.scheme}` tabulates what it has)")
            if command == "show" and "--query-pos" in extra:
                raise CLIError(f"--query-pos is for a bias that reads the query's position (fire); {args.scheme!r} "
                               "depends on i − j alone" if get_scheme_class(args.scheme).toeplitz else
                               f"--query-pos is for a bias that reads the query's position; {args.scheme!r} has none")
            if command == "show":
                valid = ", ".join(_flag(k) for k in option_specs(get_scheme_class(args.scheme))) or "none"
                raise CLIError(f"scheme {args.scheme!r} has no option {extra[0]}; valid: {valid}")
            raise CLIError(f"unrecognized arguments: {' '.join(extra)}")
        _check_common(args)
        args.func(args)
    except ConfigError as exc:
        return _error(command, f"{_flag_of(parser, argv, exc.field)} {exc.problem}", 2)
    except (CLIError, ValueError, FileNotFoundError) as exc:
        return _error(command, _os_problem(exc) if isinstance(exc, OSError) else str(exc), 2)
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly, no traceback
        sys.stdout = open(os.devnull, "w")
        return 0
    except OSError as exc:  # a full disk, a folder that cannot be written: one line naming the file
        return _error(command, _os_problem(exc), 1)
    except (MemoryError, RuntimeError) as exc:
        problem = _memory_problem(exc)
        if problem is None:  # any other RuntimeError is a bug to see whole
            raise
        return _error(command, problem, 1)
    except KeyboardInterrupt:
        _close_bars()
        print(f"\n{_prog(command)}: interrupted (finished work is saved; re-run to resume)", file=sys.stderr)
        return 130
    except Terminated:
        _close_bars()
        print(f"{_prog(command)}: terminated (SIGTERM; finished work is saved; re-run to resume)", file=sys.stderr)
        return 128 + signal.SIGTERM
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
