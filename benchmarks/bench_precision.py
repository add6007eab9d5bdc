"""How close each fast path's half-precision training comes to exact attention, beside the reference in
the same precision: the measure behind the tests' rule "within the reference's own rounding"
(``posbias.testing``, which ``tests/_helpers.within_reference_rounding`` applies), over many seeds and
query counts instead of one case.

    python benchmarks/bench_precision.py                        # the CPU paths: t5 and offset on banded, alibi on alibi
    python benchmarks/bench_precision.py --device cuda          # the CUDA kernels (issue 12's GPU session)
    python benchmarks/bench_precision.py --device stand-in      # the CUDA branches rehearsed on the CPU
    python benchmarks/bench_precision.py --cases t5:auto fire:auto --dtype float16 --queries 1 300

``--device stand-in`` runs the CUDA branches on CPU tensors that read as CUDA, with the CUDA attention
ops replaced by ``tests/_stand_in_cuda.py``'s (float64 arithmetic, the ops' documented semantics,
their outputs rounded to the inputs' dtype as the kernels' are): a real kernel can only add error to
what it shows. It needs pytest (``pip install -e '.[test]'``).

Each case (scheme and backend, queries at the end of the keys, seed) draws q, k, v of std 2 in the
dtype, and a learned table moved from its initialisation by 0.7 (as the tests' schemes are). The path,
the reference in the same dtype and the reference in float32 on the same rounded inputs (the truth)
each give an output and q/k/v
gradients under one random output gradient; a tensor's error is its largest distance to the truth's.
Per row: in how many cases the tests' rule holds for all four tensors (error ≤ 2 × the reference's +
one unit of the dtype × the largest |truth|), and the path's error over the reference's, the worst of
the four tensors per case, as a median and the largest, with the tensor that gave the largest.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

import torch

import posbias
from bench_attention import fix_machine, machine, machine_args, make_scheme
from posbias.attention import BACKENDS, usable
from posbias.schemes import SCHEMES
from posbias.testing import rounding_errors, rule_holds

TENSORS = ("out", "dq", "dk", "dv")


def stand_in():
    """A context in which CPU tensors read as CUDA and the CUDA ops are the test suite's stand-ins."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    try:
        import pytest
        from _stand_in_cuda import pretend_cuda
    except ImportError as e:
        sys.exit(f"--device stand-in needs the test suite's dependencies (pip install -e '.[test]'): {e}")

    @contextlib.contextmanager
    def run():
        patch = pytest.MonkeyPatch()
        try:
            with pretend_cuda(patch):
                yield
        finally:
            patch.undo()
    return run


def one_case(scheme, backend: str, dtype, device: str, heads: int, head_dim: int, lq: int, lk: int):
    """(the rule holds, path error / reference error for each tensor): :mod:`posbias.testing`'s rule."""
    errors = rounding_errors(scheme, dtype, device=device, heads=heads, head_dim=head_dim, lq=lq, lk=lk,
                             backend=backend)
    return rule_holds(errors), [fast / max(ref, 1e-30) for fast, ref, _ in errors]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["t5:banded", "offset:banded", "alibi:alibi"],
                   help="SCHEME:BACKEND pairs (a backend posbias has, or auto)")
    p.add_argument("--queries", type=int, nargs="+", default=[1, 8, 37, 300], help="queries at the end of the keys")
    p.add_argument("--keys", type=int, default=600)
    p.add_argument("--seeds", type=int, default=8, help="cases per row, seeds 0 … N − 1")
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--device", default="cpu", help="cpu, cuda or stand-in (the CUDA branches on the CPU)")
    machine_args(p)
    args = p.parse_args(argv)
    cases = []
    for case in args.cases:
        name, _, backend = case.partition(":")
        if name not in SCHEMES or backend not in ("auto", *BACKENDS):
            sys.exit(f"--cases: {case!r} is not SCHEME:BACKEND; schemes: {', '.join(SCHEMES)}; "
                     f"backends: auto, {', '.join(BACKENDS)}")
        cases.append((name, backend))
    bad = [n for n in (*args.queries, args.keys, args.seeds, args.heads, args.head_dim, args.threads) if n < 1]
    if bad or max(args.queries) > args.keys:
        sys.exit(f"--queries, --keys, --seeds, --heads, --head-dim and --threads must be >= 1, and --queries "
                 f"at most --keys ({args.keys}); got {args.queries}, {args.keys}, {args.seeds}, {args.heads}, "
                 f"{args.head_dim}, {args.threads}")
    if args.device not in ("cpu", "cuda", "stand-in"):
        sys.exit(f"--device must be cpu, cuda or stand-in, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here (--device stand-in rehearses the CUDA branches on the CPU)")
    fix_machine(args)
    context = stand_in() if args.device == "stand-in" else contextlib.nullcontext
    device = "cpu" if args.device == "cpu" else "cuda"
    dtype = getattr(torch, args.dtype)
    where = machine(torch.device("cpu" if args.device == "stand-in" else device), args.flush_denormal)
    where = f"stand-in CUDA ops on the CPU ({where})" if args.device == "stand-in" else f"{args.device} ({where})"
    print(f"# posbias {posbias.__version__}, torch {torch.__version__}, {where}, "
          f"{args.dtype} training, H={args.heads}, head_dim={args.head_dim}, {args.keys} keys, seeds 0–{args.seeds - 1}")
    print("| scheme | backend | queries | rule holds | error / reference's: median | largest (tensor) |")
    print("|---|---|---|---|---|---|")
    for name, backend in cases:
        for lq in args.queries:
            if backend != "auto":  # a path that cannot take this case exactly says why, as attention() would refuse it
                with context():
                    q, pos = torch.empty(1, args.heads, lq, args.head_dim, device=device, dtype=dtype), torch.arange(args.keys)
                    why = usable(backend, make_scheme(name, args.heads, args.head_dim, device, spread=0.7), q,
                                 q_pos=pos[args.keys - lq:].to(device), k_pos=pos.to(device), causal=True)
                if why is not None:
                    print(f"| {name} | {backend} | {lq} | cannot run: {why} | | |", flush=True)
                    continue
            holds, worst = 0, []
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                with context():
                    scheme = make_scheme(name, args.heads, args.head_dim, device, spread=0.7)
                    ok, ratios = one_case(scheme, backend, dtype, device, args.heads, args.head_dim, lq, args.keys)
                holds += ok
                worst.append((max(ratios), TENSORS[ratios.index(max(ratios))]))
            top = max(worst)
            print(f"| {name} | {backend} | {lq} | {holds} of {args.seeds} | {statistics.median(r for r, _ in worst):.2f} | "
                  f"{top[0]:.2f} ({top[1]}) |", flush=True)


if __name__ == "__main__":
    main()
