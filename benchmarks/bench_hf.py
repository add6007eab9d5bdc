"""Time and peak memory of a Hugging Face T5, Switch Transformers, BLOOM or MPT model before and after
``posbias.integrations.hf.accelerate``, as ratios measured in the same run — ``--reps`` pairs of one
call of each, the order alternating, the median of the per-pair ratios — with a check that the
outputs agree. Randomly initialised models from a config: nothing is downloaded.

Forward (default): a T5 or Switch Transformers encoder (or a BLOOM or MPT decoder) at each length.
``--train``: a whole T5 or Switch encoder-decoder, forward+backward of the loss with ``--target-len`` decoder tokens (the inputs at
each length), both models from the same weights; the output check then compares the losses.
``--dropout P`` trains with T5's ``dropout_rate = P`` (its default is 0.1: hidden states and attention
probabilities), which transformers applies on its own path and posbias in its dropout kernel; the two
draw different masks, so the losses are not compared (``tests/test_hf.py`` compares them under one mask).
``--size base`` is sized like flan-t5-base (d_model 768, 12 heads, 12+12 layers, gated-GELU
feed-forward of 2048). ``--packed``: one T5 encoder sequence of N tokens packing 4 documents of
N/2, N/4, N/8 and N/8 tokens, with the block-diagonal 4D mask that keeps each within itself. A cell
that runs out of memory reads ``OOM`` and the run goes on.

    python benchmarks/bench_hf.py                                   # T5 encoder, N = 512 … 8192, CPU
    python benchmarks/bench_hf.py --packed --lengths 2048 4096 8192      # T5 encoder, 4 packed documents
    python benchmarks/bench_hf.py --model bloom --lengths 1024 4096
    python benchmarks/bench_hf.py --model switch --padded --lengths 1024 2048   # unpatched: eager attention
    python benchmarks/bench_hf.py --model mpt --lengths 1024 4096
    python benchmarks/bench_hf.py --device cuda --dtype bfloat16 --size base --train --lengths 4096 8192 16384
    python benchmarks/bench_hf.py --train --dropout 0.1 --lengths 1024 2048
    python benchmarks/bench_hf.py --device cuda --dtype bfloat16 --size base --train --backend flex
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
from bench_attention import _status_kib, interleaved, reset_peak_rss, seconds, sync

SIZES = {  # d_model, d_kv, d_ff, layers (each stack), heads, feed-forward
    "small": (512, 64, 1024, None, 8, "relu"),  # None: --layers
    "base": (768, 64, 2048, 12, 12, "gated-gelu"),  # flan-t5-base's shape
}


_T0 = time.perf_counter()


def progress(what: str) -> None:
    """A line on stderr with the seconds since the start: where a run cut off by a time limit was
    (the first GPU run's HF stage printed nothing in 50 s, and nothing said why)."""
    print(f"[bench_hf {time.perf_counter() - _T0:6.1f} s] {what}", file=sys.stderr, flush=True)


def warm_up(model, ids, labels, device):
    """(output, peak MiB) of one untimed call, or None where the device ran out of memory. Peak: CUDA's
    max allocated, or on Linux CPUs the growth of the process's peak RSS over the call (None elsewhere)."""
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        base = reset_peak_rss() if device.type == "cpu" else None
        out = step(model, ids, labels)
        sync(device)
        if device.type == "cuda":
            return out.float(), torch.cuda.max_memory_allocated() / 2**20
        return out.float(), None if base is None else (_status_kib("VmHWM") - base) / 1024
    except torch.OutOfMemoryError:
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None


def paired(models, ids, labels, reps, device):
    """Seconds per call of each model that ran (None: out of memory, left out), ``reps`` calls each;
    interleaved pairs (:func:`bench_attention.interleaved`) where both ran."""
    calls = [None if m is None else (lambda m=m: step(m, ids, labels)) for m in models]
    if None not in calls:
        return list(interleaved(*calls, device, reps))
    return [[] if c is None else [seconds(c, device) for _ in range(reps)] for c in calls]


def build(kind, size, layers, train, max_len, dropout=0.0):
    import transformers

    torch.manual_seed(0)
    d_model, d_kv, d_ff, n_layers, heads, ff = SIZES[size]
    n_layers = n_layers or layers
    if kind in ("t5", "switch"):
        kw = dict(vocab_size=512, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=n_layers, num_decoder_layers=n_layers,
                  num_heads=heads, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                  dropout_rate=dropout, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        if kind == "switch":  # switch-base-8's experts: 8 in every other layer (ReLU feed-forward, as it has); no
            # router jitter (random noise on the router's input in training: the two losses would differ by it)
            cfg = transformers.SwitchTransformersConfig(**kw, num_experts=8, encoder_sparse_step=2, decoder_sparse_step=2,
                                                        router_jitter_noise=0.0)
            model = (transformers.SwitchTransformersForConditionalGeneration if train else
                     transformers.SwitchTransformersEncoderModel)(cfg)
        else:
            cfg = transformers.T5Config(**kw, feed_forward_proj=ff)
            model = (transformers.T5ForConditionalGeneration if train else transformers.T5EncoderModel)(cfg)
    elif kind == "mpt":  # transformers' MPT adds its bias only up to max_seq_len: set to the longest length
        cfg = transformers.MptConfig(vocab_size=512, d_model=d_model, n_heads=heads, n_layers=n_layers,
                                     max_seq_len=max_len, attn_config={"attn_pdrop": 0, "alibi": True})
        model = transformers.MptModel(cfg)
    else:
        cfg = transformers.BloomConfig(vocab_size=512, hidden_size=d_model, n_layer=n_layers, n_head=heads,
                                       hidden_dropout=0.0, attention_dropout=0.0)
        model = transformers.BloomModel(cfg)
    with torch.no_grad():  # a trained-looking bias (HF initialises it near zero)
        for name, p in model.named_parameters():
            if "relative_attention_bias" in name:
                p.normal_(0, 1.0)
    return model.train(train)


def step(model, ids, labels):
    """One call: the encoder's (or BLOOM's) last hidden state, or with labels the loss after its
    backward pass (gradients cleared first). ``ids`` is the input ids, or (ids, attention mask) for a
    padded batch, whose padded positions then read 0 (what they hold is each side's own convention)."""
    ids, mask = ids if isinstance(ids, tuple) else (ids, None)
    if labels is None:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
            return out if mask is None or mask.dim() != 2 else out * mask[..., None]
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return loss.detach()


def row(n, ref, fast, times, truth=False, compare=True):
    """A table row: median ms of each model, the median (smallest–largest) of the per-pair ratios
    HF / posbias, peak memory and the outputs' largest difference; ``OOM`` where a model ran out.
    With ``truth`` (bf16/fp16 runs: the float32 output, or None where it ran out; False: no columns) each model's
    largest difference from it follows: which side a low-precision difference comes from."""
    def ms(r, t):
        return "OOM" if r is None else f"{statistics.median(t) * 1e3:.0f}"

    def mib(r):
        return "OOM" if r is None else ("—" if r[1] is None else f"{r[1]:.0f}")

    speed, diff = "—", "—"
    if ref and fast:
        ratios = sorted(a / b for a, b in zip(*times))
        speed = f"{statistics.median(ratios):.2f}× ({ratios[0]:.2f}–{ratios[-1]:.2f})"
        diff = f"{(ref[0] - fast[0]).abs().max().item():.1e}" if compare else "(dropout)"
    cells = [str(n), ms(ref, times[0]), ms(fast, times[1]), speed, mib(ref), mib(fast), diff]
    if truth is not False:
        cells += ["—" if r is None or truth is None else f"{(r[0] - truth[0]).abs().max().item():.1e}" for r in (ref, fast)]
    return "| " + " | ".join(cells) + " |"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["t5", "switch", "bloom", "mpt"], default="t5",
                   help="switch: Switch Transformers, T5's attention with mixture-of-experts feed-forward layers")
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--layers", type=int, default=4, help="layers per stack for --size small")
    p.add_argument("--train", action="store_true", help="T5 encoder-decoder, forward+backward of the loss")
    p.add_argument("--target-len", type=int, default=64, help="decoder tokens with --train")
    p.add_argument("--dropout", type=float, default=0.0, help="T5's dropout_rate with --train (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=3, help="interleaved (HF, posbias) pairs per length")
    p.add_argument("--padded", action="store_true",
                   help="a batch of 4 sequences of N, 0.9 N, 0.7 N and 0.5 N tokens with their attention mask, padded "
                        "on the right (T5) or the left (BLOOM, MPT: as prompts are batched for generation)")
    p.add_argument("--packed", action="store_true",
                   help="T5 encoder: 4 documents of N/2, N/4, N/8, N/8 tokens packed into one sequence (4D mask)")
    p.add_argument("--backend", default="auto",
                   help="posbias backend the accelerated model prefers (accelerate(model, backend=...)), "
                        "e.g. flex on a GPU; default auto")
    args = p.parse_args(argv)
    if args.train and args.model not in ("t5", "switch"):
        p.error("--train is for --model t5 or switch")
    if args.packed and (args.model != "t5" or args.train or args.padded):
        p.error("--packed is for the T5 encoder's forward (--model t5, without --train or --padded)")
    if not 0 <= args.dropout < 1 or (args.dropout and not args.train):
        p.error(f"--dropout must be in [0, 1) and goes with --train, got {args.dropout}")

    import transformers

    from posbias.integrations.hf import accelerate

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    progress(f"building the {args.size} {args.model} model")
    ref = build(args.model, args.size, args.layers, args.train, max(args.lengths), args.dropout).to(device, dtype)
    fast = accelerate(copy.deepcopy(ref), backend=args.backend)
    impl = ref.config._attn_implementation
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    what = f"forward+backward, {args.target_len} target tokens" if args.train else "forward"
    what += f", dropout_rate {args.dropout}" if args.dropout else ""
    print(f"# transformers {transformers.__version__}, torch {torch.__version__}, {device} ({where}); {args.model} "
          f"{args.size} (d_model {ref.config.hidden_size if args.model == 'bloom' else ref.config.d_model}), "
          f"{'4 padded sequences' if args.padded else '4 packed documents' if args.packed else 'batch 1'}, "
          f"{args.dtype}, {what}; HF attention '{impl}'; posbias backend {args.backend}; peak memory: "
          f"{'max allocated' if device.type == 'cuda' else 'growth of peak RSS over the first call'}")
    print(f"# each speed-up: the median of {args.reps} interleaved pairs (HF / posbias time; one pair fewer beyond 4k"
          "), smallest–largest in brackets; ms: the medians")
    # in bf16/fp16 the two sides differ by both their roundings: each is also compared with float32,
    # computed by the accelerated model (HF's own float32 path agrees with it to ~2e-6, above; it
    # would hold an [H, N, N] bias where posbias does not)
    exact = None if dtype == torch.float32 else accelerate(copy.deepcopy(ref).float())
    extra = "" if exact is None else " HF err vs fp32 | posbias err vs fp32 |"
    print("| N | HF ms | posbias ms | speed-up | HF peak MiB | posbias peak MiB | max abs diff |" + extra)
    print("|---|---|---|---|---|---|---|" + "---|" * (2 if exact is not None else 0))
    for n in args.lengths:
        torch.manual_seed(n)
        batch = 4 if args.padded else 1
        ids = torch.randint(2, 512, (batch, n), device=device)
        labels = torch.randint(2, 512, (batch, args.target_len), device=device) if args.train else None
        if args.padded:
            real = torch.tensor([n, int(0.9 * n), int(0.7 * n), n // 2], device=device)[:, None]
            at = torch.arange(n, device=device)[None]
            ids = ids, ((at < real) if args.model in ("t5", "switch") else (at >= n - real)).long()
        if args.packed:
            doc = torch.repeat_interleave(torch.arange(4, device=device),
                                          torch.tensor([n - n // 4 - 2 * (n // 8), n // 4, n // 8, n // 8], device=device))
            ids = ids, (doc[:, None] == doc[None, :])[None, None]
        reps = args.reps if n <= 4096 else max(1, args.reps - 1)
        results = []
        for label, model in (("HF", ref), ("posbias", fast)):
            progress(f"N={n}: {label} warm-up call")
            results.append(warm_up(model, ids, labels, device))
        progress(f"N={n}: {reps} timed pairs")
        times = paired([m if r else None for m, r in zip((ref, fast), results)], ids, labels, reps, device)
        if exact is not None:
            progress(f"N={n}: float32 reference call")
        truth = False if exact is None else warm_up(exact, ids, labels, device)
        print(row(n, *results, times, truth, compare=not args.dropout), flush=True)


if __name__ == "__main__":
    main()
