"""Speed and memory of posbias attention, as ratios to unbiased fused causal SDPA measured in the
same run (absolute times drift on a shared machine; ratios hold).

For each scheme and length: forward and forward+backward time of posbias (auto backend), and the
anchors: dense-bias SDPA (the bias materialised as [H, N, N]), the HuggingFace-style T5 path
(bucketing all N² pairs, embedding lookup, dense bias), and with ``--flex`` compiled FlexAttention with
the scheme's per-offset ``score_mod`` (Toeplitz schemes; forward only on CPU, where FlexAttention has
no backward; its one-off compile time is printed, not counted). Peak extra memory is measured in a
child process per case (--memory) as the growth of peak RSS (CPU) or of peak allocated memory (CUDA)
over the inputs.

    python benchmarks/bench_attention.py                         # N = 1k … 16k, CPU
    python benchmarks/bench_attention.py --lengths 1024 4096 --schemes t5 alibi --memory
    python benchmarks/bench_attention.py --lengths 4096 8192 --schemes t5 alibi kerple-log --flex --no-backward
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time

import torch
from torch.nn import functional as F

import posbias
from posbias.attention import choose_backend

DENSE_LIMIT = 8192  # dense [H, N, N] anchors above this would need > 2 GB per bias (FIRE: 4096, its MLP
# runs on all N² pairs with 32 hidden units and the 8192 training anchor exhausts 24 GB)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, reps):
    fn()  # warm-up (and compilation for FlexAttention)
    sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def default_schemes():
    """Every registered scheme that changes attention (additive or rotary) and is in the study."""
    return [name for name, cls in posbias.SCHEMES.items() if cls.family in ("additive", "rotary") and cls.in_study]


def make_scheme(name, heads, head_dim, device):
    s = posbias.build(name, n_heads=heads, head_dim=head_dim).to(device)
    with torch.no_grad():
        for p in s.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return s


def hf_t5_bias(scheme, n, device):
    """What HF T5 does: bucket all N² (memory − query) pairs, look up, permute to [H, N, N]."""
    ctx = torch.arange(n, device=device)[:, None]
    mem = torch.arange(n, device=device)[None, :]
    buckets = posbias.t5_bucket(ctx - mem, num_buckets=scheme.num_buckets, max_distance=scheme.max_distance)
    return F.embedding(buckets, scheme.table).permute(2, 0, 1)


FLEX = False  # set by --flex


def cases(name, n, scheme, q, k, v):
    """(label, forward fn, train fn or None)."""
    pos = torch.arange(n, device=q.device)
    causal_mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    out = {}

    def fwd_posbias():
        with torch.no_grad():
            posbias.attention(q, k, v, scheme)

    def train_posbias():
        posbias.attention(q, k, v, scheme).sum().backward()

    out["posbias"] = (fwd_posbias, train_posbias)
    if scheme.family == "additive" and n <= DENSE_LIMIT // (1 if scheme.toeplitz else 2):  # FIRE: MLP on N² pairs
        def dense(grad):
            b = scheme.bias(pos, pos).masked_fill(~causal_mask, float("-inf"))
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=b, scale=scheme.default_scale())
            if grad:
                o.sum().backward()
        out["dense-bias SDPA"] = (lambda: torch.no_grad()(dense)(False), lambda: dense(True))
        if name == "t5":
            def hf(grad):
                b = hf_t5_bias(scheme, n, q.device).masked_fill(~causal_mask, float("-inf"))
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=b, scale=1.0)
                if grad:
                    o.sum().backward()
            out["HF-style T5"] = (lambda: torch.no_grad()(hf)(False), lambda: hf(True))
    if FLEX and isinstance(scheme, posbias.ToeplitzScheme):
        def flex_fwd():
            with torch.no_grad():
                posbias.attention(q, k, v, scheme, backend="flex")

        def flex_train():
            posbias.attention(q, k, v, scheme, backend="flex").sum().backward()
        out["compiled FlexAttention"] = (flex_fwd, flex_train if q.device.type == "cuda" else None)
    return out


def memory_child(args):
    """Runs in a child process: peak memory growth of one case (forward), in MiB."""
    name, label, n, heads, hd, dev = args.child
    n, heads, hd = int(n), int(heads), int(hd)
    device = torch.device(dev)
    torch.manual_seed(0)
    scheme = make_scheme(name, heads, hd, device)
    q, k, v = (torch.randn(1, heads, n, hd, device=device) for _ in range(3))
    fn = dict(cases(name, n, scheme, q, k, v)).get(label, (None,))[0] if label != "SDPA (no bias)" else \
        (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:  # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kib("VmRSS")
        fn()
        peak = (_status_kib("VmHWM") - base) * 1024
    print(json.dumps(max(0.0, peak / 2**20)))


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_memory(name, label, n, heads, hd, device):
    r = subprocess.run([sys.executable, __file__, "--child", name, label, str(n), str(heads), str(hd), device]
                       + (["--flex"] if FLEX else []),
                       capture_output=True, text=True)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemes", nargs="+", default=default_schemes(),
                   help="registered scheme names (default: every additive or rotary scheme of the study)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--memory", action="store_true", help="measure peak extra memory in child processes")
    p.add_argument("--flex", action="store_true", help="add compiled FlexAttention (compiles per scheme and N)")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args()
    global FLEX
    FLEX = args.flex
    if args.child:
        return memory_child(args)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(f"# posbias {posbias.__version__}, torch {torch.__version__}, device {device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else f', {torch.get_num_threads()} threads'},"
          f" H={args.heads}, head_dim={args.head_dim}, {args.dtype}, batch 1, causal")
    print("| scheme | N | path (backend) | fwd ms | fwd × | fwd+bwd × | peak extra MiB |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for n in args.lengths:
        reps = args.reps if n <= 4096 else max(1, args.reps - 1)
        q, k, v = (torch.randn(1, args.heads, n, args.head_dim, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        base_f = timeit(lambda: torch.no_grad()(F.scaled_dot_product_attention)(q, k, v, is_causal=True), device, reps)
        base_t = None if args.no_backward else timeit(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward(), device, reps)
        mem = measure_memory("rope", "SDPA (no bias)", n, args.heads, args.head_dim, args.device) if args.memory else None
        print(f"| (none) | {n} | fused causal SDPA, no bias | {base_f * 1e3:.0f} | 1.00 | 1.00 | "
              f"{'' if mem is None else f'{mem:.0f}'} |", flush=True)
        for name in args.schemes:
            scheme = make_scheme(name, args.heads, args.head_dim, device)
            pos = torch.arange(n, device=device)
            with torch.no_grad():
                backend = choose_backend(scheme, q, q_pos=pos, k_pos=pos, causal=True)
            train_backend = choose_backend(scheme, q, q_pos=pos, k_pos=pos, causal=True)
            if train_backend != backend:
                backend = f"{backend}; training: {train_backend}"
            for label, (fwd, trn) in cases(name, n, scheme, q, k, v).items():
                if label == "compiled FlexAttention":
                    t0 = time.perf_counter()
                    fwd()
                    print(f"<!-- {name} N={n}: FlexAttention compile + first call {time.perf_counter() - t0:.1f} s -->")
                tf = timeit(fwd, device, reps)
                tt = None if (args.no_backward or trn is None) else timeit(trn, device, reps)
                mem = measure_memory(name, label, n, args.heads, args.head_dim, args.device) if args.memory else None
                shown = f"posbias ({backend})" if label == "posbias" else label
                row = {"scheme": name, "N": n, "path": shown, "fwd_ms": tf * 1e3, "fwd_ratio": tf / base_f,
                       "train_ratio": None if tt is None else tt / base_t, "peak_extra_mib": mem}
                rows.append(row)
                print(f"| {name} | {n} | {shown} | {tf * 1e3:.0f} | {tf / base_f:.2f} | "
                      f"{'—' if tt is None else f'{tt / base_t:.2f}'} | {'' if mem is None else f'{mem:.0f}'} |",
                      flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
