"""A padded batch: ``posbias.attention(..., key_mask=mask)`` against what a user has without it, measured in
the same run with interleaved pairs (the method of ``bench_attention.py``: median of ``--reps`` per-pair
ratios, smallest–largest in brackets).

The batch holds sequences of ``--lengths`` tokens right-padded to the longest, causal. The two baselines
get the padding as the boolean ``[batch, 1, N, N]`` mask (causal and padding together) SDPA takes:
unbiased SDPA with that mask (the cost of padding with no bias at all), and SDPA with the scheme's bias
materialised as ``[heads, N, N]`` and the padding added to it (what one writes without posbias).

    python benchmarks/bench_padding.py                                  # t5 and alibi, 2048 1900 1500 1024
    python benchmarks/bench_padding.py --schemes fire --lengths 1024 700 --forward
    python benchmarks/bench_padding.py --packed --lengths 700 600 500 248      # one row of 2048 tokens

``--packed`` puts the sequences one after another in a single row instead (``document_ids``): each attends
within itself from position 0; the baselines then get the block-diagonal causal mask, and the dense bias
at each token's position inside its document.
"""

from __future__ import annotations

import argparse

import torch
from torch.nn import functional as F

import posbias
from bench_attention import cell, fix_machine, machine, machine_args, make_scheme, paired


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemes", nargs="+", default=["t5", "alibi"], help="registered scheme names (additive)")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 1900, 1500, 1024],
                   help="each sequence's real tokens; the batch is padded to the longest")
    p.add_argument("--forward", action="store_true", help="time the forward pass only (default: both rows)")
    p.add_argument("--packed", action="store_true", help="one row holding the sequences back to back (document_ids)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=7, help="interleaved pairs per cell")
    machine_args(p)
    args = p.parse_args()
    if min(args.lengths) < 1:
        p.error(f"--lengths must be >= 1, got {min(args.lengths)}")
    additive = [m for m, cls in posbias.SCHEMES.items() if cls.family == "additive"]
    for name in args.schemes:
        if name not in posbias.SCHEMES or posbias.SCHEMES[name].family != "additive":
            p.error(f"--schemes: {name!r} is not an additive scheme; valid: {', '.join(additive)}")
    fix_machine(args)
    device = torch.device("cpu")
    if args.packed:
        n, rows = sum(args.lengths), 1
        ids = torch.repeat_interleave(torch.arange(len(args.lengths)), torch.tensor(args.lengths))[None]
        pos = torch.cat([torch.arange(m) for m in args.lengths])  # each token's position in its document
        allowed = (ids[0][:, None] == ids[0][None, :]).tril()[None, None]  # [1, 1, N, N]
        call = {"document_ids": ids}
        what = f"one row packing {len(args.lengths)} documents of {', '.join(map(str, args.lengths))} tokens ({n})"
    else:
        n, rows = max(args.lengths), len(args.lengths)
        mask = torch.arange(n)[None, :] < torch.tensor(args.lengths)[:, None]  # [batch, N], True: a real key
        pos = torch.arange(n)
        allowed = torch.ones(n, n, dtype=torch.bool).tril() & mask[:, None, None, :]
        call = {"key_mask": mask}
        what = (f"a batch of {len(args.lengths)} sequences of {', '.join(map(str, args.lengths))} tokens padded to "
                f"{n}")
    print(f"# posbias {posbias.__version__}, torch {torch.__version__} ({machine(device, args.flush_denormal)}), "
          f"H={args.heads}, head_dim={args.head_dim}, float32, causal; {what}; posbias's time as a ratio to each "
          f"baseline, median of {args.reps} interleaved pairs (smallest–largest)")
    kind = "document" if args.packed else "padding"
    print(f"| scheme | pass | posbias ms | / SDPA with the {kind} mask, no bias | / dense-bias SDPA with the {kind} mask |")
    print("|---|---|---|---|---|")
    for name in args.schemes:
        scheme = make_scheme(name, args.heads, args.head_dim, device)
        for train in ([False] if args.forward else [False, True]):
            q, k, v = (torch.randn(rows, args.heads, n, args.head_dim, requires_grad=train)
                       for _ in range(3))

            def run(fn, train=train):
                with torch.set_grad_enabled(train):
                    out = fn()
                    if train:
                        out.sum().backward()

            def ours(q=q, k=k, v=v, scheme=scheme):
                return posbias.attention(q, k, v, scheme, **call)

            def no_bias(q=q, k=k, v=v):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)

            def dense(q=q, k=k, v=v, scheme=scheme):
                bias = scheme.bias(pos, pos)[None].masked_fill(~allowed, float("-inf"))
                return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scheme.default_scale())

            a = paired(lambda: run(ours), lambda: run(no_bias), device, args.reps)
            b = paired(lambda: run(ours), lambda: run(dense), device, args.reps)
            print(f"| {name} | {'forward+backward' if train else 'forward'} | {a[0] * 1e3:.0f} | {cell(a)} | "
                  f"{cell(b)} |", flush=True)


if __name__ == "__main__":
    main()
