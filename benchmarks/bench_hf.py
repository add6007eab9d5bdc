"""Forward time of a small Hugging Face T5 encoder (and optionally a BLOOM decoder) before and
after ``posbias.integrations.hf.accelerate``, as ratios measured in the same run, with a check
that the outputs agree. Randomly initialised models from a config: nothing is downloaded.

    python benchmarks/bench_hf.py                                   # T5 encoder, N = 512 … 8192
    python benchmarks/bench_hf.py --model bloom --lengths 1024 4096
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def timeit(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def build(kind, layers):
    import transformers

    torch.manual_seed(0)
    if kind == "t5":
        cfg = transformers.T5Config(vocab_size=512, d_model=512, d_kv=64, d_ff=1024, num_layers=layers, num_heads=8,
                                    relative_attention_num_buckets=32, relative_attention_max_distance=128,
                                    dropout_rate=0.0)
        model = transformers.T5EncoderModel(cfg)
    else:
        cfg = transformers.BloomConfig(vocab_size=512, hidden_size=512, n_layer=layers, n_head=8,
                                       hidden_dropout=0.0, attention_dropout=0.0)
        model = transformers.BloomModel(cfg)
    with torch.no_grad():  # a trained-looking bias (HF initialises it near zero)
        for name, p in model.named_parameters():
            if "relative_attention_bias" in name:
                p.normal_(0, 1.0)
    return model.eval()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["t5", "bloom"], default="t5")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()

    import transformers

    from posbias.integrations.hf import accelerate

    ref = build(args.model, args.layers)
    fast = accelerate(copy.deepcopy(ref))
    impl = ref.config._attn_implementation
    print(f"# transformers {transformers.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.model} d_model 512, 8 heads, {args.layers} layers, batch 1, fp32; HF attention '{impl}'")
    print("| N | HF ms | posbias ms | speed-up | max abs diff |")
    print("|---|---|---|---|---|")
    for n in args.lengths:
        ids = torch.randint(0, 512, (1, n))
        with torch.no_grad():
            a = ref(input_ids=ids).last_hidden_state
            b = fast(input_ids=ids).last_hidden_state
            diff = (a - b).abs().max().item()
            reps = args.reps if n <= 4096 else max(1, args.reps - 1)
            t_ref = timeit(lambda: ref(input_ids=ids), reps)
            t_fast = timeit(lambda: fast(input_ids=ids), reps)
        print(f"| {n} | {t_ref * 1e3:.0f} | {t_fast * 1e3:.0f} | {t_ref / t_fast:.2f}× | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
