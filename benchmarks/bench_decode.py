"""Decoding speed: new queries against a long key/value cache, each positional scheme as a ratio to
the same step without a bias, measured in the same run (interleaved pairs, the method of
``bench_attention.py``: median of ``--reps`` per-pair ratios, smallest–largest in brackets).

Two tables:

* **attention**: ``posbias.attention`` (backend ``auto``) for ``--queries`` new queries at the end of
  ``--keys`` cached keys, against the same call with ``nope`` (no bias: the fused kernel alone, with
  the causal mask aligned to the end of the keys);
* **model**: one generated token of a ``TransformerLM`` with its KV cache after a prefill of
  ``--context`` tokens, against the same model with ``nope`` (every step appends to both caches).

    python benchmarks/bench_decode.py                                  # every scheme, 1k–64k keys
    python benchmarks/bench_decode.py --schemes t5 alibi --keys 16384 --queries 1 16 --no-model
    python benchmarks/bench_decode.py --backend triton --no-model        # a forced backend where it runs (CUDA)
"""

from __future__ import annotations

import argparse
import sys

import torch

import posbias
from bench_attention import (cell, default_schemes, fix_machine, machine, machine_args, make_scheme, paired,
                             schemes_error, sync)
from posbias.attention import BACKENDS, choose_backend, usable
from posbias.model import ModelConfig, TransformerLM
from posbias.positions import run
from posbias.schemes import parse_spec


def attention_rows(args, device, dtype):
    print("| scheme | keys | queries | backend | × no bias | ms |")
    print("|---|---|---|---|---|---|")
    nope = posbias.build("nope", n_heads=args.heads, head_dim=args.head_dim)
    for name in args.schemes:
        scheme = make_scheme(name, args.heads, args.head_dim, device).to(dtype)
        for n in args.keys:
            k, v = (torch.randn(1, args.heads, n, args.head_dim, device=device, dtype=dtype) for _ in range(2))
            for lq in args.queries:
                q = torch.randn(1, args.heads, lq, args.head_dim, device=device, dtype=dtype)
                # runs (posbias.positions), as the model and its KV cache pass them: no call reads them
                q_pos, k_pos = run(n - lq, lq, device), run(0, n, device)
                forced = args.backend != "auto" and usable(args.backend, scheme, q, q_pos=q_pos, k_pos=k_pos,
                                                           causal=True) is None
                backend = args.backend if forced else choose_backend(scheme, q, q_pos=q_pos, k_pos=k_pos, causal=True)
                # (the label; the call itself gives way as attention() does, so FIRE's queries below its
                # threshold keep their own path where auto runs)

                def step():  # a decoding step's first layer: a mask kept for these positions is dropped (FIRE's
                    # depends on the query position, so no later step could reuse it; the model table's
                    # other layers do, and T5's window is kept across steps, as in a real loop)
                    scheme.__dict__.pop("_kept_mask", None)
                    return posbias.attention(q, k, v, scheme, q_pos=q_pos, k_pos=k_pos, backend=args.backend,
                                             strict=False)

                stats = paired(step,
                               lambda: posbias.attention(q, k, v, nope, q_pos=q_pos, k_pos=k_pos), device, args.reps)
                print(f"| {name} | {n} | {lq} | {backend} | {cell(stats)} | {stats[0] * 1e3:.2f} |", flush=True)


class Generator:
    """A model and its caches after a prefill; each call generates one token (argmax)."""

    def __init__(self, name, context, args, device, dtype):
        torch.manual_seed(0)
        scheme, options = parse_spec(name)
        cfg = ModelConfig(scheme=scheme, scheme_options=options, d_model=args.d_model, n_layers=args.layers,
                          n_heads=args.heads)
        self.model = TransformerLM(cfg).to(device=device, dtype=dtype).eval()
        self.caches = [{} for _ in self.model.blocks]
        idx = torch.randint(0, 256, (1, context), device=device)
        self.token = self.model(idx, caches=self.caches)[:, -1:].argmax(-1)
        self.pos = context

    def __call__(self):
        self.token = self.model(self.token, start=self.pos, caches=self.caches)[:, -1:].argmax(-1)
        self.pos += 1


def model_rows(args, device, dtype):
    print("\n| scheme | context | × no bias | ms per token |")
    print("|---|---|---|---|")
    for context in args.context:
        for name in args.schemes:
            stats = paired(Generator(name, context, args, device, dtype), Generator("nope", context, args, device, dtype),
                           device, args.reps)
            print(f"| {name} | {context} | {cell(stats)} | {stats[0] * 1e3:.1f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemes", nargs="+", default=default_schemes(),
                   help="registered scheme names or labels (NAME@KEY=VALUE[,KEY=VALUE], e.g. fire@init_L=131072)")
    p.add_argument("--keys", type=int, nargs="+", default=[1024, 4096, 16384, 65536], help="cached keys (attention)")
    p.add_argument("--queries", type=int, nargs="+", default=[1], help="new queries per call (attention)")
    p.add_argument("--context", type=int, nargs="+", default=[2048, 8192], help="prefill tokens (model)")
    p.add_argument("--no-model", action="store_true", help="leave out the model table")
    p.add_argument("--backend", default="auto", choices=["auto", *BACKENDS],
                   help="attention table: this backend wherever it runs exactly, auto's choice elsewhere")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64, help="attention table; the model's is d_model / heads")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=15, help="interleaved (scheme, no bias) pairs per cell")
    machine_args(p)
    args = p.parse_args()
    if schemes_error(args.schemes):
        sys.exit(schemes_error(args.schemes))
    bad = [n for n in args.keys if n < max(args.queries)] + [n for n in args.queries + args.context if n < 1]
    if bad:
        sys.exit(f"--keys, --queries, --context: need 1 <= queries <= keys and context >= 1, got {bad[0]}")
    fix_machine(args)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(f"# posbias {posbias.__version__}, torch {torch.__version__}, {device} ({machine(device, args.flush_denormal)}), "
          f"{args.dtype}, batch 1; "
          f"attention H={args.heads}, head_dim={args.head_dim}; model d_model={args.d_model}, {args.layers} layers, "
          f"{args.heads} heads; median of {args.reps} interleaved pairs (smallest–largest)")
    with torch.no_grad():  # as generate() runs (inference_mode would make the schemes' tensors versionless)
        attention_rows(args, device, dtype)
        if not args.no_model:
            model_rows(args, device, dtype)
        sync(device)


if __name__ == "__main__":
    main()
