"""Speed and memory of posbias attention, as ratios to unbiased fused causal SDPA measured in the
same run, pair by pair.

Timing that can see 5% on a shared, noisy machine: every cell is ``--reps`` *pairs*, each pair one
call of the candidate and one of the baseline back to back (their order alternating from pair to
pair), after one untimed warm-up call of each. A cell shows the median of the per-pair ratios and, in
brackets, their smallest and largest value; load that drifts between pairs cancels in each ratio.
The thread count is fixed (``--threads``, default 2) and printed.

For each scheme and length: forward and forward+backward of posbias (auto backend; on CUDA also
the ``banded`` and native ``alibi`` candidates where they apply), and the anchors: dense-bias SDPA (the bias materialised as [H, N, N]), the HuggingFace-style T5 path
(bucketing all N² pairs, embedding lookup, dense bias), and two compiled FlexAttention anchors:
posbias's ``backend="flex"`` (a ``score_mod`` reading a per-offset table; FIRE's MLP per pair) and
the ``score_mod`` a user writes from the attention-gym examples, the formula evaluated per pair
(:func:`hand_written_score_mod`). FlexAttention runs forward only on CPU, where it has no backward;
its one-off compile time is printed, not counted; ``--no-flex`` leaves both out. Peak extra memory is
measured in a child process per case (``--memory``) as the growth of peak RSS (CPU) or of peak
allocated memory (CUDA) over the inputs.

    python benchmarks/bench_attention.py                  # make bench: N = 1k … 16k, CPU, 2 threads
    python benchmarks/bench_attention.py --quick          # one length (8192), the same table
    python benchmarks/bench_attention.py --lengths 1024 4096 --schemes t5 alibi --memory
    python benchmarks/bench_attention.py --kv-heads 2 --schemes t5 --lengths 4096   # grouped-query attention
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import time

import torch
from torch.nn import functional as F

import posbias
from posbias.attention import choose_backend, usable
from posbias.kernels.flex import flex_available, reset_compiled
from posbias.schemes import parse_spec
from posbias.store import cpu_kind

# Longest N of the dense [H, N, N] anchors, by device (FIRE: half, its MLP runs on all N² pairs with 32
# hidden units). CPU: their N² cost is plain by 2048, and above it one cell takes minutes. CUDA: a
# float32 [8, 16k, 16k] bias is 8 GiB, held a few times over in training: plain on a large GPU.
DENSE_LIMIT = {"cpu": 2048, "cuda": 16384}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds(fn, device) -> float:
    """Wall time of one call (the device synchronised)."""
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def interleaved(fn, base, device, reps) -> tuple[list[float], list[float]]:
    """Seconds of ``reps`` (candidate, baseline) pairs, the order alternating from pair to pair: load
    that drifts during the run cancels in each pair's ratio. No warm-up (the caller's)."""
    tc, tb = [], []
    for r in range(reps):
        if r % 2:
            tb.append(seconds(base, device))
            tc.append(seconds(fn, device))
        else:
            tc.append(seconds(fn, device))
            tb.append(seconds(base, device))
    return tc, tb


def paired(fn, base, device, reps, slow_s=None):
    """``reps`` interleaved (candidate, baseline) pairs after one warm-up call of each; one pair where
    the candidate's warm-up took longer than ``slow_s`` seconds (a time box: a path hundreds of times
    slower than the baseline says so in one pair).

    Returns (median candidate seconds, median ratio, smallest ratio, largest ratio)."""
    warm = seconds(fn, device)  # warm-up (and compilation for FlexAttention)
    base()
    sync(device)
    if slow_s is not None and warm > slow_s:
        reps = 1
    times, base_times = interleaved(fn, base, device, reps)
    ratios = [c / b for c, b in zip(times, base_times)]
    return statistics.median(times), statistics.median(ratios), min(ratios), max(ratios)


def cell(stats):
    if stats is None:
        return "—"
    _, med, lo, hi = stats
    return f"{med:.2f} ({lo:.2f}–{hi:.2f})"


def schemes_error(labels) -> str | None:
    """``--schemes: …`` naming the first scheme name or label (``NAME@KEY=VALUE``) that does not parse,
    or None: the check every benchmark's ``--schemes`` gets."""
    for label in labels:
        try:
            parse_spec(label)
        except ValueError as e:
            return f"--schemes: {e}"
    return None


def default_schemes():
    """Every registered scheme that changes attention (additive or rotary) and is in the study."""
    return [name for name, cls in posbias.SCHEMES.items() if cls.family in ("additive", "rotary") and cls.in_study]


def make_scheme(name, heads, head_dim, device, spread=0.1, **options):
    """The scheme with its learned values moved from their initialisation by ``spread`` standard deviations."""
    s = posbias.build(name, n_heads=heads, head_dim=head_dim, **options).to(device)
    with torch.no_grad():
        for p in s.parameters():
            p.add_(torch.randn_like(p) * spread)
    return s


def hf_t5_bias(scheme, n, device):
    """What HF T5 does: bucket all N² (memory − query) pairs, look up, permute to [H, N, N]."""
    ctx = torch.arange(n, device=device)[:, None]
    mem = torch.arange(n, device=device)[None, :]
    buckets = posbias.t5_bucket(ctx - mem, num_buckets=scheme.num_buckets, max_distance=scheme.max_distance)
    return F.embedding(buckets, scheme.table).permute(2, 0, 1)


FLEX = False  # compiled FlexAttention anchors (on unless --no-flex)


def hand_written_score_mod(name, scheme):
    """The ``score_mod`` a user writes from the attention-gym examples: the scheme's formula evaluated
    for every (query, key) pair inside the kernel, reading its parameters directly (gradients reach
    them where FlexAttention has a backward). None for schemes without one here (FIRE: not a
    function of the offset alone)."""
    from posbias import t5_bucket

    if name == "t5":
        table, nb, md, bi = scheme.table, scheme.num_buckets, scheme.max_distance, scheme.bidirectional
        return lambda score, b, h, qi, ki: score + table[
            t5_bucket(qi - ki, num_buckets=nb, max_distance=md, bidirectional=bi), h]
    if name == "offset" and scheme.clip and not scheme.bidirectional:
        table, md = scheme.table, scheme.max_distance
        return lambda score, b, h, qi, ki: score + table[(qi - ki).clamp(0, md), h]
    if name == "alibi" and not scheme.symmetric:
        slopes = scheme.slopes
        return lambda score, b, h, qi, ki: score - slopes[h] * (qi - ki)
    if name == "kerple-log":
        r1, r2 = scheme.params()
        return lambda score, b, h, qi, ki: score - r1[h] * torch.log1p(r2[h] * (qi - ki).abs())
    return None


def steps(call):
    """(forward without autograd, forward+backward of the output's sum) of ``call()``, an attention call."""
    def fwd():
        with torch.no_grad():
            call()

    def train():
        call().sum().backward()
    return fwd, train


def sdpa_steps(q, k, v, dropout_p: float = 0.0):
    """:func:`steps` of unbiased fused causal SDPA, the baseline of every ratio (grouped heads as given;
    with ``dropout_p``, SDPA's own dropout)."""
    return steps(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1],
                                                        dropout_p=dropout_p))


def posbias_steps(q, k, v, scheme, backend, **kw):
    """:func:`steps` of ``posbias.attention`` with ``backend`` (grouped heads as given; ``kw`` to it)."""
    return steps(lambda: posbias.attention(q, k, v, scheme, backend=backend, enable_gqa=k.shape[1] != q.shape[1],
                                           **kw))


def error_text(e: Exception) -> str:
    """A failed case's cell: the exception's type and the first line of its message (160 characters)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160] if text else ''}"


def cases(name, n, scheme, q, k, v):
    """(label, forward fn, train fn or None)."""
    pos = torch.arange(n, device=q.device)
    causal_mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    gqa = k.shape[1] != q.shape[1]  # --kv-heads: every path takes the grouped keys and values as they are
    out = {"posbias": posbias_steps(q, k, v, scheme, "auto")}
    for candidate in ("triton", "banded", "alibi"):  # issue 12's CUDA candidates besides FlexAttention (auto on the CPU)
        if q.device.type == "cuda" and usable(candidate, scheme, q, q_pos=pos, k_pos=pos, causal=True) is None:
            out[f"posbias ({candidate})"] = posbias_steps(q, k, v, scheme, candidate)
    if scheme.family == "additive" and n <= DENSE_LIMIT[q.device.type] // (1 if scheme.toeplitz else 2):
        def dense(grad):  # the bias in the inputs' dtype, as a user hands it to SDPA (and CUDA kernels need)
            b = scheme.bias(pos, pos).masked_fill(~causal_mask, float("-inf")).to(q.dtype)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=b, scale=scheme.default_scale(), enable_gqa=gqa)
            if grad:
                o.sum().backward()
        out["dense-bias SDPA"] = (lambda: torch.no_grad()(dense)(False), lambda: dense(True))
        if name == "t5":
            def hf(grad):
                b = hf_t5_bias(scheme, n, q.device).masked_fill(~causal_mask, float("-inf")).to(q.dtype)
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=b, scale=1.0, enable_gqa=gqa)
                if grad:
                    o.sum().backward()
            out["HF-style T5"] = (lambda: torch.no_grad()(hf)(False), lambda: hf(True))
    if FLEX and callable(getattr(scheme, "score_mod", None)):  # Toeplitz schemes and FIRE
        flex_fwd, flex_train = posbias_steps(q, k, v, scheme, "flex")  # no backward on CPU
        out["compiled FlexAttention"] = (flex_fwd, flex_train if q.device.type == "cuda" else None)
    mod = hand_written_score_mod(name, scheme) if FLEX else None
    if mod is not None:
        from torch.nn.attention.flex_attention import flex_attention
        from posbias.integrations.flex import causal_block_mask

        fn = torch.compile(flex_attention, dynamic=False)

        def user_flex(grad):
            mask = causal_block_mask(n, n, device=q.device)
            if not grad:
                with torch.no_grad():
                    return fn(q.detach(), k.detach(), v.detach(), score_mod=mod, block_mask=mask,
                              scale=scheme.default_scale(), enable_gqa=gqa)
            fn(q, k, v, score_mod=mod, block_mask=mask, scale=scheme.default_scale(), enable_gqa=gqa).sum().backward()
        out["hand-written FlexAttention score_mod"] = (lambda: user_flex(False),
                                                        (lambda: user_flex(True)) if q.device.type == "cuda" else None)
    return out


def memory_child(args):
    """Runs in a child process: peak memory growth of one case (forward), in MiB, measured on a second
    call: the first also grows the heap by what any first call leaves (code, caches, the allocator's
    pools; 3–10 MiB on the CPU, measured), which is not the case's own."""
    name, label, n, heads, kv_heads, hd, dev = args.child
    n, heads, kv_heads, hd = int(n), int(heads), int(kv_heads), int(hd)
    device = torch.device(dev)
    torch.manual_seed(0)
    scheme = make_scheme(name, heads, hd, device)
    q, k, v = (torch.randn(1, h, n, hd, device=device) for h in (heads, kv_heads, kv_heads))
    fn = (dict(cases(name, n, scheme, q, k, v)).get(label, (None,)) if label != "SDPA (no bias)" else sdpa_steps(q, k, v))[0]
    fn()
    print(json.dumps(peak_growth_mib(fn, device)))


def peak_growth_mib(fn, device) -> float:
    """Peak memory growth of one call of ``fn``, MiB: CUDA's max allocated over what was allocated
    before, or on Linux the growth of the peak RSS (writing 5 to clear_refs resets VmHWM to VmRSS)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = reset_peak_rss()
        if base is None:
            return float("nan")
        fn()
        peak = (_status_kib("VmHWM") - base) * 1024
    return max(0.0, peak / 2**20)


def reset_peak_rss() -> int | None:
    """Linux: the peak RSS reset to the current RSS (KiB, returned); None where /proc cannot do it. Freed
    heap is handed back first (glibc's ``malloc_trim``): a call measured after another in one process
    would otherwise reuse what the first left behind and read as using nothing."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:  # writing 5 resets VmHWM to VmRSS
            f.write("5")
        return _status_kib("VmRSS")
    except (OSError, RuntimeError):
        return None


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_memory(name, label, n, args):
    r = subprocess.run([sys.executable, __file__, "--child", name, label, str(n), str(args.heads),
                        str(args.kv_heads), str(args.head_dim), args.device]
                       + ([] if FLEX else ["--no-flex"]),
                       capture_output=True, text=True)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return float("nan")


def machine_args(p: argparse.ArgumentParser) -> None:
    """The flags :func:`fix_machine` reads, for every benchmark's parser."""
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU), fixed for the run")
    p.add_argument("--flush-denormal", action="store_true",
                   help="flush denormal floats to zero for the whole run (CPU; set before any thread starts)")


def fix_machine(args) -> None:
    """What every benchmark fixes before it starts timing: denormals flushed (``--flush-denormal``;
    exits where the CPU cannot) and the thread count (``--threads``)."""
    if args.flush_denormal and not torch.set_flush_denormal(True):
        sys.exit("--flush-denormal: this CPU cannot flush denormals")
    torch.set_num_threads(args.threads)


def machine(device: torch.device, flush_denormal: bool) -> str:
    """The header's words for what the ratios depend on: the GPU's name, or the CPU model, the
    denormal mode and the thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_kind()}, denormals {'flushed' if flush_denormal else 'kept'}, {torch.get_num_threads()} threads"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemes", nargs="+", default=default_schemes(),
                   help="registered scheme names (default: every additive or rotary scheme of the study)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--quick", action="store_true", help="one length (8192) instead of --lengths")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--kv-heads", type=int, help="grouped-query attention: key/value heads dividing --heads "
                   "(every path, the SDPA baseline included, takes them with enable_gqa=True; default: --heads)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=5, help="interleaved (candidate, baseline) pairs per cell")
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--slow-s", type=float, help="time a case whose warm-up call takes longer than this many seconds "
                   "with one pair (a time box for device sessions; default: every case --reps pairs)")
    p.add_argument("--no-flex", action="store_true", help="leave out the compiled FlexAttention anchors")
    p.add_argument("--memory", action="store_true", help="measure peak extra memory in child processes")
    machine_args(p)
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.kv_heads = args.kv_heads or args.heads
    if schemes_error(args.schemes):
        p.error(schemes_error(args.schemes))
    if args.heads % args.kv_heads:
        p.error(f"--kv-heads {args.kv_heads} must divide --heads {args.heads}")
    global FLEX
    FLEX = not args.no_flex and flex_available()
    fix_machine(args)
    if args.child:
        return memory_child(args)
    lengths = [8192] if args.quick else args.lengths
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(f"# posbias {posbias.__version__}, torch {torch.__version__}, device {device} "
          f"({machine(device, args.flush_denormal)}), H={args.heads}, "
          f"{'' if args.kv_heads == args.heads else f'{args.kv_heads} key/value heads (GQA), '}"
          f"head_dim={args.head_dim}, {args.dtype}, batch 1, causal; each ratio: median of {args.reps} interleaved "
          "pairs against unbiased fused causal SDPA (smallest–largest)")
    print("| scheme | N | path (backend) | fwd ms | fwd × | fwd+bwd × | peak extra MiB |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for n in lengths:
        rows += run_length(n, args, device, dtype)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def run_length(n, args, device, dtype):
    q, k, v = (torch.randn(1, h, n, args.head_dim, device=device, dtype=dtype, requires_grad=True)
               for h in (args.heads, args.kv_heads, args.kv_heads))
    base_f, base_t = sdpa_steps(q, k, v)
    mem = measure_memory("rope", "SDPA (no bias)", n, args) if args.memory else None
    seconds(base_f, device)  # warm-up: a first CUDA call read 601 ms at 8k on an H200 (a warm one ~0.4 ms)
    print(f"| (none) | {n} | fused causal SDPA, no bias | {seconds(base_f, device) * 1e3:.3g} | 1.00 | 1.00 | "
          f"{'' if mem is None else f'{mem:.0f}'} |", flush=True)
    rows = []
    for name in args.schemes:
        scheme = make_scheme(name, args.heads, args.head_dim, device)
        pos = torch.arange(n, device=device)
        with torch.no_grad():
            backend = choose_backend(scheme, q, q_pos=pos, k_pos=pos, causal=True)
        train_backend = choose_backend(scheme, q, q_pos=pos, k_pos=pos, causal=True)
        if train_backend != backend:
            backend = f"{backend}; training: {train_backend}"
        for label, (fwd, trn) in cases(name, n, scheme, q, k, v).items():
            shown = f"posbias ({backend})" if label == "posbias" else label
            try:
                if "FlexAttention" in label:
                    reset_compiled()  # else past dynamo's recompile limit the anchor times eager FlexAttention
                    t0 = time.perf_counter()
                    fwd()
                    print(f"<!-- {name} N={n}: FlexAttention compile + first call {time.perf_counter() - t0:.1f} s -->")
                sf = paired(fwd, base_f, device, args.reps, args.slow_s)
                st = None if (args.no_backward or trn is None) else paired(trn, base_t, device, args.reps, args.slow_s)
            except Exception as e:  # noqa: BLE001 -- one failing path (a compiler error, out of memory) is a row, not the end of the table
                reason = error_text(e)
                print(f"| {name} | {n} | {shown} | failed | {reason} | | |", flush=True)
                rows.append({"scheme": name, "N": n, "path": shown, "error": reason})
                q.grad = k.grad = v.grad = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            mem = measure_memory(name, label, n, args) if args.memory else None
            rows.append({"scheme": name, "N": n, "path": shown, "fwd_ms": sf[0] * 1e3, "fwd_ratio": sf[1:],
                         "train_ratio": None if st is None else st[1:], "peak_extra_mib": mem,
                         "threads": torch.get_num_threads(), "flush_denormal": args.flush_denormal,
                         "device_name": torch.cuda.get_device_name() if device.type == "cuda" else cpu_kind()})
            print(f"| {name} | {n} | {shown} | {sf[0] * 1e3:.3g} | {cell(sf)} | {cell(st)} | "
                  f"{'' if mem is None else f'{mem:.0f}'} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
