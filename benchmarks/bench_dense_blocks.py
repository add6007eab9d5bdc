"""The dense blockwise path (what CUDA runs for schemes without a validated fast path), forced on the
CPU: a Toeplitz scheme's ``bias`` laid out from its offsets (``ToeplitzScheme.bias``, new) against
``bias_at`` on every pair's offset (old), forward+backward with gradients to the scheme, interleaved
pairs.

    python benchmarks/bench_dense_blocks.py t5,offset,kerple-log,alibi 1024,2048 5
"""
import argparse

import torch

import posbias
import posbias.kernels.blockwise as bw
from posbias.schemes.base import ToeplitzScheme
from bench_attention import cell, make_scheme, paired


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("schemes", nargs="?", default="t5,offset,kerple-log,alibi", help="comma-separated scheme names")
    p.add_argument("lengths", nargs="?", default="1024,2048", help="comma-separated sequence lengths")
    p.add_argument("reps", nargs="?", type=int, default=5, help="interleaved pairs")
    args = p.parse_args()
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, denormals flushed, H=8, d=64, causal; "
          f"median of {args.reps} interleaved pairs (smallest–largest)")
    bw.flash_available = lambda q: False  # the dense branch CUDA runs
    new = ToeplitzScheme.bias

    def old(s, q, k):
        return s.bias_at(q[:, None] - k[None, :])

    for name in args.schemes.split(","):
        for n in map(int, args.lengths.split(",")):
            torch.manual_seed(0)
            s = make_scheme(name, 8, 64, torch.device("cpu"))
            q, k, v = (torch.randn(1, 8, n, 64, requires_grad=True) for _ in range(3))

            def step(fn, s=s, q=q, k=k, v=v):
                def f():
                    s.bias = fn.__get__(s)  # this instance's bias, new or old
                    posbias.attention(q, k, v, s, backend="blockwise").sum().backward()
                return f
            stats = paired(step(new), step(old), torch.device("cpu"), args.reps)
            print(f"{name} {n}: new {stats[0] * 1e3:.0f} ms, new/old {cell(stats)}", flush=True)


if __name__ == "__main__":
    main()
