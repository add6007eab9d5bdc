"""Issue 12's CUDA candidates, short enough for one device call: each fast path ``auto`` could take on
CUDA (``triton`` for every Toeplitz scheme and FIRE, ``banded`` for T5/offset, ``alibi`` for causal
ALiBi, ``flex``) against unbiased fused causal SDPA and against ``blockwise`` (the fallback), forward and
forward+backward, with the peak memory of one training call; then the ``triton`` backend's tile
configurations (:data:`posbias.kernels.table_flash.LADDERS`) at one length, and why
FlexAttention fails to compile at a length, if it does, across ``kernel_options``.

    python benchmarks/bench_cuda_candidates.py                       # bf16, 8k 16k 32k, every scheme
    python benchmarks/bench_cuda_candidates.py --schemes t5 --lengths 8192 --no-probe
    python benchmarks/bench_cuda_candidates.py --backends triton --table-config '{"forward": {"BM": 64}}'
    python benchmarks/bench_cuda_candidates.py --dropout 0.1 --lengths 8192 --no-probe   # training with dropout

With ``--dropout P`` every call drops attention probabilities with rate P: the baseline is SDPA's own
dropout (no bias), ``triton`` drops inside its programs, and ``blockwise`` stands for the dropout
kernel's blocks (:mod:`posbias.kernels.dropout`, what ``auto`` runs on CUDA until ``triton`` is
validated); the other paths have no dropout and are left out.

Ratios: the median of ``--reps`` interleaved (candidate, SDPA) pairs, smallest–largest in brackets
(``bench_attention.paired``). A case that fails (a compiler error, out of memory) is a row that says
why. Memory: ``torch.cuda.max_memory_allocated`` over one forward+backward, less what was allocated
before it (the inputs), in MiB.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import posbias
from bench_attention import (cell, error_text, make_scheme, paired, peak_growth_mib, posbias_steps, schemes_error,
                             sdpa_steps, steps)
from posbias.attention import usable


def peak_mib(fn, device) -> float | None:
    """One call's peak memory over what was allocated before it, MiB, on CUDA (None elsewhere: the
    CPU's peak RSS would need a process per case, as ``bench_attention.py --memory`` does)."""
    return peak_growth_mib(fn, device) if device.type == "cuda" else None


def failed(e: Exception) -> str:
    return f"failed: {error_text(e)}"


def candidates(args, device, dtype) -> None:
    print("| scheme | N | backend | fwd ms | fwd × SDPA | fwd+bwd ms | fwd+bwd × SDPA | peak MiB (SDPA) |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for n in args.lengths:
        q, k, v = (torch.randn(1, args.heads, n, args.head_dim, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        pos = torch.arange(n, device=device)
        base_f, base_t = sdpa_steps(q, k, v, args.dropout)
        base_mem = peak_mib(base_t, device)
        # with dropout: the backends that have it (a forced blockwise gives way to the dropout kernel)
        drop = {"dropout_p": args.dropout, "strict": False} if args.dropout else {}
        for name in args.schemes:
            scheme = make_scheme(name, args.heads, args.head_dim, device)
            backends = [b for b in ("triton", "banded", "alibi", "flex") if b in args.backends and (
                not args.dropout or b == "triton") and usable(b, scheme, q, q_pos=pos, k_pos=pos, causal=True) is None]
            if "blockwise" in args.backends and n <= args.blockwise_max:
                backends.append("blockwise")
            for backend in backends:
                fwd, train = posbias_steps(q, k, v, scheme, backend, **drop)
                try:
                    t0 = time.perf_counter()
                    fwd()
                    first = time.perf_counter() - t0
                    sf = paired(fwd, base_f, device, args.reps)
                    st = paired(train, base_t, device, args.reps)
                    mem = peak_mib(train, device)
                except Exception as e:  # noqa: BLE001 -- a failing path is a row, not the end of the table
                    print(f"| {name} | {n} | {backend} | {failed(e)} | | | | |", flush=True)
                    q.grad = k.grad = v.grad = None
                    torch.cuda.empty_cache() if device.type == "cuda" else None
                    continue
                note = f" (first call {first:.1f} s)" if first > 1 else ""
                print(f"| {name} | {n} | {backend}{note} | {sf[0] * 1e3:.2f} | {cell(sf)} | {st[0] * 1e3:.2f} | "
                      f"{cell(st)} | {'' if mem is None else f'{mem:.0f} ({base_mem:.0f})'} |", flush=True)
                q.grad = k.grad = v.grad = None


def probe_row(fwd, train, base_f, base_t, device, reps: int) -> tuple[float, str, str]:
    """A probe's cells: seconds of the first forward call (compiles included), then forward and
    forward+backward against SDPA's; a call that fails is its cell's error (NaN seconds when the first
    does), and the row goes on."""
    try:
        t0 = time.perf_counter()
        fwd()
        torch.cuda.synchronize() if device.type == "cuda" else None
        first = time.perf_counter() - t0
        sf = cell(paired(fwd, base_f, device, reps))
    except Exception as e:  # noqa: BLE001 -- a variant that fails is a row, not the end of the table
        return float("nan"), failed(e), ""
    try:
        return first, sf, cell(paired(train, base_t, device, reps))
    except Exception as e:  # noqa: BLE001
        return first, sf, failed(e)


def flex_probe(args, device, dtype) -> None:
    """Compiled FlexAttention at ``--probe-length`` with no score_mod and with the offset table's, across
    kernel_options: which compile, and how fast they run (forward; forward+backward where it compiles)."""
    from torch.nn.attention.flex_attention import flex_attention

    from posbias.integrations.flex import causal_block_mask

    n = args.probe_length
    q, k, v = (torch.randn(1, args.heads, n, args.head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    mask = causal_block_mask(n, n, device=device)
    scheme = make_scheme("offset", args.heads, args.head_dim, device)
    base_f, base_t = sdpa_steps(q, k, v)
    print(f"\n| FlexAttention at N={n} | kernel_options | compile + first fwd s | fwd × SDPA | fwd+bwd × SDPA |")
    print("|---|---|---|---|---|", flush=True)
    variants = [("no score_mod", None, None), ("offset table", "mod", None),
                ("offset table", "mod", {"num_stages": 2}), ("offset table", "mod", {"BLOCK_M": 64, "BLOCK_N": 64}),
                ("offset table", "mod", {"BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 2}),
                ("offset table", "mod", {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 64,
                                         "BLOCK_M2": 64, "BLOCK_N2": 32})]  # the backward's blocks too
    for label, with_mod, options in variants:
        torch._dynamo.reset()
        fn = torch.compile(flex_attention, dynamic=False)
        def call(fn=fn, with_mod=with_mod, options=options):
            # the score_mod built per call, as posbias does: what it captures carries this call's graph
            mod = scheme.score_mod(n, n) if with_mod else None
            return fn(q, k, v, score_mod=mod, block_mask=mask, kernel_options=options)

        first, sf, st = probe_row(*steps(call), base_f, base_t, device, args.reps)
        q.grad = k.grad = v.grad = None
        print(f"| {label} | {options} | {first:.1f} | {sf} | {st} |", flush=True)


# The triton backend's tile configurations the probe tries, each alone (each part merged into the first of
# the ladder at --head-dim and --dtype, a table's or FIRE's: table_flash.ladder). Comments: local-memory
# loads and stores inside each program's loops (registers spilled per tile) on sm_90 in bf16 at head_dim 64
# (forward; dK/dV, dQ), compiled ahead of time (Triton 3.9, ``table_programs.compile_for``'s ``loop_spills``):
# whether spills cost what they should is the second row's question.
TABLE_VARIANTS = [
    {},  # 128 × 64, 8 warps / 64, 8 warps: 0; 0, 0
    # 55; 177, 0 (the first before 8 warps)
    {"forward": {"BM": 128, "BN": 64, "num_warps": 4}, "backward": {"B": 64, "num_warps": 4}},
    {"forward": {"BM": 128, "BN": 32}, "backward": {"B": 32, "num_warps": 4}},  # 0; 0, 0
    {"forward": {"BM": 64, "BN": 64, "num_warps": 4}, "backward": {"B": 64, "num_stages": 1}},  # 7; 0, 0
    {"forward": {"BM": 128, "BN": 128, "num_stages": 2}},  # 0; 0, 0
]
FIRE_VARIANTS = [
    {},  # 128 × 64, 8 warps / 32, 4 warps: 0; 0, 0
    {"forward": {"BM": 128, "BN": 32}},  # 0
    {"backward": {"B": 64, "num_warps": 8}},  # 0; 40, 0
]


def table_config(base: dict, change: dict) -> dict:
    """``base`` (a configuration of ``table_flash.LADDERS``) with each part updated from ``change``."""
    return {part: {**base[part], **change.get(part, {})} for part in base}


def table_probe(args, device, dtype) -> None:
    """The ``triton`` backend at ``--probe-length`` under each of :data:`TABLE_VARIANTS` (T5, whose table
    trains, and ALiBi, whose does not) and FIRE (past its threshold, L = 512) under each of
    :data:`FIRE_VARIANTS`: which compile, and how fast they run."""
    import posbias.kernels.table_flash as table_flash

    n = args.probe_length
    q, k, v = (torch.randn(1, args.heads, n, args.head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    base_f, base_t = sdpa_steps(q, k, v)
    print(f"\n| triton at N={n} | scheme | config | first fwd s | fwd × SDPA | fwd+bwd × SDPA |")
    print("|---|---|---|---|---|---|", flush=True)
    for fire, names, variants in ((False, ("t5", "alibi"), TABLE_VARIANTS), (True, ("fire",), FIRE_VARIANTS)):
        base = table_flash.ladder(fire, args.head_dim, dtype=dtype)[0]
        for change in variants:
            # alone: one that does not fit is a row
            table_flash.use_cuda_configs([table_config(base, change)], fire=fire)
            for name in names:
                scheme = make_scheme(name, args.heads, args.head_dim, device)
                first, sf, st = probe_row(*posbias_steps(q, k, v, scheme, "triton"), base_f, base_t, device, args.reps)
                q.grad = k.grad = v.grad = None
                print(f"| | {name} | {json.dumps(change) if change else 'default'} | {first:.1f} | {sf} | {st} |",
                      flush=True)
    table_flash.restore_cuda_configs()  # (the probe runs last: --table-config is not needed after it)


def profile(spec: str, args, device, dtype) -> None:
    """Where one training call's time goes: ``BACKEND:SCHEME:N`` profiled with torch.profiler over
    ``--reps`` forward+backward calls after a warm-up, the top operators by their own device time
    (CUDA) or CPU time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    try:
        backend, name, n = spec.split(":")
        n = int(n)
    except ValueError:
        raise SystemExit(f"--profile wants BACKEND:SCHEME:N (e.g. banded:t5:32768), got {spec!r}") from None
    scheme = make_scheme(name, args.heads, args.head_dim, device)
    q, k, v = (torch.randn(1, args.heads, n, args.head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))

    _, train = posbias_steps(q, k, v, scheme, backend)
    train()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(args.reps):
            train()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n## {backend} {name} N={n}: {args.reps} forward+backward calls, top operators by {key}")
    print(prof.key_averages().table(sort_by=key, row_limit=args.profile_rows), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemes", nargs="+", default=["t5", "offset", "alibi", "kerple-log", "fire"])
    p.add_argument("--backends", nargs="+", default=["triton", "banded", "alibi", "blockwise"],
                   choices=["triton", "banded", "alibi", "flex", "blockwise"],
                   help="the paths to time, each where it runs exactly")
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--blockwise-max", type=int, default=8192, help="longest N at which blockwise is timed")
    p.add_argument("--blockwise-elems", type=int, metavar="E",
                   help="blockwise's dense blocks of at most E logits (posbias.kernels.blockwise.MAX_BLOCK_ELEMS, "
                        "default 2^22: 64 query rows per block at 8k keys and 8 heads; larger blocks, fewer launches)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-probe", action="store_true",
                   help="leave out the triton tile probe and the FlexAttention kernel_options probe")
    p.add_argument("--table-config", type=json.loads, metavar="JSON",
                   help='tiles of the triton backend on CUDA for a table, merged into the first of its ladder at '
                        '--head-dim and --dtype (posbias.kernels.table_flash.LADDERS) (and run alone), '
                        'e.g. \'{"forward": {"BM": 64, "BN": 64}, "backward": {"B": 32}}\'')
    p.add_argument("--flex-options", type=json.loads, metavar="JSON",
                   help='kernel_options for posbias\'s flex backend on CUDA (posbias.kernels.flex.CUDA_KERNEL_OPTIONS), '
                        'e.g. \'{"BLOCK_M": 64, "BLOCK_N": 64}\'; time it with --backends flex')
    p.add_argument("--dropout", type=float, default=0.0, metavar="P",
                   help="attention dropout rate of every call (default 0): triton and blockwise (the dropout "
                        "kernel) against SDPA with its own dropout")
    p.add_argument("--probe-length", type=int, default=8192)
    p.add_argument("--profile", nargs="+", metavar="BACKEND:SCHEME:N",
                   help="only profile these training calls (torch.profiler), e.g. banded:t5:32768 alibi:alibi:32768")
    p.add_argument("--profile-rows", type=int, default=15)
    args = p.parse_args()
    if schemes_error(args.schemes):
        p.error(schemes_error(args.schemes))
    if not 0 <= args.dropout < 1:
        p.error(f"--dropout must be in [0, 1), got {args.dropout}")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.blockwise_elems is not None:
        if args.blockwise_elems < 1:
            p.error(f"--blockwise-elems must be at least 1, got {args.blockwise_elems}")
        import posbias.kernels.blockwise as blockwise

        blockwise.MAX_BLOCK_ELEMS = args.blockwise_elems
        print(f"# blockwise's dense blocks of at most {args.blockwise_elems} logits")
    if args.flex_options is not None:
        if not isinstance(args.flex_options, dict):
            p.error(f"--flex-options must be a JSON object, got {args.flex_options!r}")
        import posbias.kernels.flex as flex

        flex.CUDA_KERNEL_OPTIONS = args.flex_options
        print(f"# posbias flex on CUDA with kernel_options {args.flex_options}")
    if args.table_config is not None:
        import posbias.kernels.table_flash as table_flash

        base = table_flash.ladder(False, args.head_dim, dtype=dtype)[0]
        if not isinstance(args.table_config, dict) or not set(args.table_config) <= set(base) or not all(
                isinstance(c, dict) for c in args.table_config.values()):
            p.error(f"--table-config must be a JSON object with parts {' and '.join(base)}, each an object, "
                    f"got {args.table_config!r}")
        table_flash.use_cuda_configs([table_config(base, args.table_config)])
        print(f"# triton on CUDA with tiles {table_flash.ladder(False, args.head_dim, dtype=dtype)[0]} (a table's)")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# posbias {posbias.__version__}, torch {torch.__version__}, {device} ({name}), H={args.heads}, "
          f"head_dim={args.head_dim}, {args.dtype}, batch 1, causal"
          f"{f', attention dropout {args.dropout}' if args.dropout else ''}; median of {args.reps} interleaved pairs")
    if args.profile:
        for spec in args.profile:
            profile(spec, args, device, dtype)
        return
    candidates(args, device, dtype)
    if not args.no_probe and device.type == "cuda":
        table_probe(args, device, dtype)
        flex_probe(args, device, dtype)


if __name__ == "__main__":
    main()
