"""Two posbias backends head to head: each as a ratio to unbiased fused SDPA, and the second as a ratio
to the first, all measured in the same run with interleaved pairs (the method of
``bench_attention.py``: median of ``--reps`` per-pair ratios, smallest–largest in brackets).

What decides ``auto``'s choice between two exact paths for the same scheme, e.g. ``windowed`` and
``banded`` for a T5 table in training, causal or bidirectional:

    python benchmarks/bench_backends.py                       # t5 and offset, windowed vs banded, training
    python benchmarks/bench_backends.py --bidirectional --schemes t5 --lengths 1536 2048 4096 8192
    python benchmarks/bench_backends.py --backends toeplitz windowed --lengths 1024 1536 2048 --forward
    python benchmarks/bench_backends.py --schemes fire@init_L=16384 --backends blockwise auto   # FIRE below its threshold

A scheme is a name or a label with options (``fire@init_L=16384``, as ``posbias extrapolate`` takes them);
``auto`` stands for the automatic choice.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.nn import functional as F

import posbias
from bench_attention import cell, fix_machine, machine, machine_args, make_scheme, paired, schemes_error
from posbias.schemes import SCHEMES, option_specs, parse_spec
from posbias.attention import BACKENDS, usable


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemes", nargs="+", default=["t5", "offset"],
                   help="registered scheme names or labels (NAME@KEY=VALUE[,KEY=VALUE])")
    p.add_argument("--backends", nargs=2, default=["windowed", "banded"], metavar=("A", "B"),
                   help="the two posbias backends, forced, or auto (default: windowed banded)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1536, 2048, 3072, 4096, 8192])
    p.add_argument("--bidirectional", action="store_true", help="no causal mask (schemes built bidirectional)")
    p.add_argument("--forward", action="store_true", help="time the forward pass only (default: forward+backward, "
                   "gradients to the scheme's parameters too)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=7, help="interleaved pairs per cell")
    machine_args(p)
    args = p.parse_args()
    for name in args.backends:
        if name != "auto" and name not in BACKENDS:
            sys.exit(f"--backends: unknown {name!r}; valid: auto, {', '.join(BACKENDS)}")
    if schemes_error(args.schemes):
        sys.exit(schemes_error(args.schemes))
    fix_machine(args)
    device = torch.device(args.device)
    causal = not args.bidirectional
    a, b = args.backends
    print(f"# posbias {posbias.__version__}, torch {torch.__version__}, {device} ({machine(device, args.flush_denormal)}), "
          f"H={args.heads}, "
          f"head_dim={args.head_dim}, float32, batch 1, {'causal' if causal else 'bidirectional'}, "
          f"{'forward' if args.forward else 'forward+backward'}; median of {args.reps} interleaved pairs "
          "(smallest–largest)")
    print(f"| scheme | N | {a} × SDPA | {b} × SDPA | {b} / {a} |")
    print("|---|---|---|---|---|")
    for name in args.schemes:
        base = parse_spec(name)[0]
        options = {"bidirectional": True} if args.bidirectional and "bidirectional" in option_specs(SCHEMES[base]) else {}
        for n in args.lengths:
            torch.manual_seed(0)
            scheme = make_scheme(name, args.heads, args.head_dim, device, **options)
            q, k, v = (torch.randn(1, args.heads, n, args.head_dim, device=device, requires_grad=True)
                       for _ in range(3))
            pos = torch.arange(n, device=device)
            reasons = {x: usable(x, scheme, q, q_pos=pos, k_pos=pos, causal=causal) for x in (a, b) if x != "auto"}
            why = [f"{x}: {r}" for x, r in reasons.items() if r is not None]
            if why:
                print(f"| {name} | {n} | cannot run: {'; '.join(why)} | | |", flush=True)
                continue
            fa, fb, base = (_step(fn, args.forward) for fn in (
                lambda: posbias.attention(q, k, v, scheme, causal=causal, backend=a),
                lambda: posbias.attention(q, k, v, scheme, causal=causal, backend=b),
                lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)))
            print(f"| {name} | {n} | {cell(paired(fa, base, device, args.reps))} | "
                  f"{cell(paired(fb, base, device, args.reps))} | {cell(paired(fb, fa, device, args.reps))} |",
                  flush=True)


def _step(fn, forward_only: bool):
    if forward_only:
        return lambda: torch.no_grad()(fn)()
    return lambda: fn().sum().backward()


if __name__ == "__main__":
    main()
