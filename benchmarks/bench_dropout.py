"""Training with attention dropout: ``posbias.attention(..., dropout_p=p)`` against what a user has without
it, forward+backward, measured in the same run with interleaved pairs (the method of ``bench_attention.py``:
median of ``--reps`` per-pair ratios, smallest–largest in brackets), and the peak memory of one training
step (``--memory``: growth of peak RSS over the inputs during a second step, each case in a child process).

Baselines: SDPA with ``dropout_p`` and the scheme's bias materialised as ``[heads, N, N]`` (what one writes
without posbias, and what ``transformers`` runs for T5 while training; RoPE rotates q and k and needs no
bias), which on CPU always takes SDPA's math path — PyTorch's fused CPU kernels refuse dropout — and the
same posbias call without dropout (what the dropout costs).

    python benchmarks/bench_dropout.py                                   # t5 alibi fire rope, 1k 2k 4k
    python benchmarks/bench_dropout.py --schemes t5 --lengths 8192 --memory
    python benchmarks/bench_dropout.py --device cuda --dtype bfloat16 --lengths 4096 8192 --memory   # a GPU
    python benchmarks/bench_dropout.py --device cuda --dtype bfloat16 --backend triton --schemes t5 alibi fire

``--backend`` is posbias' preference for both of its calls (default ``auto``; ``triton`` drops inside its
programs on CUDA, where the automatic choice runs the dropout kernel's blocks until a GPU run has
validated it; RoPE keeps ``auto``).

On CUDA SDPA's fused memory-efficient kernel takes a dense bias with dropout, so there the dense-bias
baseline is a fused kernel, and ``--memory`` reads ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
from torch.nn import functional as F

import posbias
from bench_attention import cell, fix_machine, machine, machine_args, make_scheme, paired, peak_growth_mib

LABELS = ("posbias with dropout", "dense-bias SDPA with dropout", "posbias without dropout")


def step(label: str, scheme, q, k, v, p: float, backend: str = "auto"):
    """One forward+backward of ``label`` as a function of no arguments."""
    n, device = q.shape[2], q.device
    if scheme.family != "additive":
        backend = "auto"  # (triton is for additive biases)

    def ours(drop=p):
        posbias.attention(q, k, v, scheme, dropout_p=drop, backend=backend).sum().backward()

    def dense():
        pos = torch.arange(n, device=device)
        if scheme.family == "rotary":
            qr, kr = scheme.rotate(q, pos, context_len=n), scheme.rotate(k, pos, context_len=n)
            out = F.scaled_dot_product_attention(qr, kr, v, is_causal=True, dropout_p=p)
        else:
            bias = scheme.bias(pos, pos).masked_fill(pos[None, :] > pos[:, None], float("-inf"))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None].to(q.dtype), dropout_p=p,
                                                 scale=scheme.default_scale())
        out.sum().backward()

    return {LABELS[0]: ours, LABELS[1]: dense, LABELS[2]: lambda: ours(0.0)}[label]


def inputs(args, n: int):
    return [torch.randn(args.batch, args.heads, n, args.head_dim, device=args.device, dtype=getattr(torch, args.dtype),
                        requires_grad=True) for _ in range(3)]


def memory_child(args) -> None:
    """Runs in a child process: peak memory growth of one training step of ``--child NAME LABEL N``, MiB
    (CPU: peak RSS; CUDA: max allocated)."""
    name, label, n = args.child
    torch.manual_seed(0)
    device = torch.device(args.device)
    scheme = make_scheme(name, args.heads, args.head_dim, device)
    fn = step(label, scheme, *inputs(args, int(n)), args.p, args.backend)
    fn()  # a first step loads code and fills caches (tens of MiB of RSS at any length): not the step's memory
    print(json.dumps(peak_growth_mib(fn, device)))


def measure_memory(name: str, label: str, n: int, args) -> float:
    cmd = [sys.executable, __file__, "--child", name, label, str(n), "--p", str(args.p), "--batch", str(args.batch),
           "--heads", str(args.heads), "--head-dim", str(args.head_dim), "--threads", str(args.threads),
           "--device", args.device, "--dtype", args.dtype, "--backend", args.backend]
    r = subprocess.run(cmd, capture_output=True, text=True)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemes", nargs="+", default=["t5", "alibi", "fire", "rope"],
                   help="registered scheme names (additive or rotary)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--p", type=float, default=0.1, help="dropout probability (T5's default rate: 0.1)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=5, help="interleaved pairs per cell")
    p.add_argument("--memory", action="store_true", help="peak memory of one training step, in child processes")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--backend", default="auto", choices=["auto", "triton"],
                   help="posbias' backend for its calls (default auto; triton: CUDA, dropout inside its programs)")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    machine_args(p)
    args = p.parse_args()
    if args.child:
        fix_machine(args)
        return memory_child(args)
    valid = [m for m, cls in posbias.SCHEMES.items() if cls.family in ("additive", "rotary")]
    for name in args.schemes:
        if name not in valid:
            p.error(f"--schemes: {name!r} is not an additive or rotary scheme; valid: {', '.join(valid)}")
    if not 0 < args.p < 1:
        p.error(f"--p must be in (0, 1), got {args.p}")
    if min(args.lengths) < 1 or args.batch < 1 or args.reps < 1:
        p.error("--lengths, --batch and --reps must be >= 1")
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        p.error(f"--device must be cpu, or cuda on a machine with CUDA; got {args.device!r}")
    if args.backend == "triton" and args.device != "cuda":
        p.error("--backend triton runs on CUDA only (--device cuda)")
    fix_machine(args)
    device = torch.device(args.device)
    print(f"# posbias {posbias.__version__}, torch {torch.__version__} ({machine(device, args.flush_denormal)}), "
          f"batch {args.batch}, H={args.heads}, head_dim={args.head_dim}, {args.dtype}, causal, dropout_p={args.p}, "
          f"posbias backend {args.backend}; "
          f"forward+backward, posbias with dropout as a ratio to each baseline, median of {args.reps} "
          f"interleaved pairs (smallest–largest)" + ("; peak extra MiB of one step" if args.memory else ""))
    mem_cols = " | MiB: posbias with dropout / dense-bias SDPA / posbias without" if args.memory else ""
    print(f"| scheme | N | posbias ms | / dense-bias SDPA with dropout | / posbias without dropout{mem_cols} |")
    print("|---|---|---|---|---|" + ("---|" if args.memory else ""))
    for name in args.schemes:
        scheme = make_scheme(name, args.heads, args.head_dim, device)
        for n in args.lengths:
            torch.manual_seed(0)
            fns = [step(label, scheme, *inputs(args, n), args.p, args.backend) for label in LABELS]
            a = paired(fns[0], fns[1], device, args.reps)
            b = paired(fns[0], fns[2], device, args.reps)
            mem = ""
            if args.memory:
                mem = " | " + " / ".join(f"{measure_memory(name, label, n, args):.0f}" for label in LABELS)
            print(f"| {name} | {n} | {a[0] * 1e3:.0f} | {cell(a)} | {cell(b)}{mem} |", flush=True)


if __name__ == "__main__":
    main()
