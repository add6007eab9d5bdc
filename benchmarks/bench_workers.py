"""Study throughput: one ``posbias extrapolate`` run on every core against several runs sharing the
folder, one per core (docs/study.md, "Several runs can share one folder").

Each pair runs the same study twice into fresh folders: once as one process with ``--threads
CORES``, once as ``--workers`` processes started together with ``--threads CORES / workers`` each.
Their order alternates from pair to pair; the wall time of each way is printed, with the ratio
(workers / single) per pair and its median and smallest–largest. The two ways train models with other
thread counts (other keys, other rounding), so only time is compared, never the numbers.

    python benchmarks/bench_workers.py                                   # the demo preset, 150 steps, 3 pairs
    python benchmarks/bench_workers.py --pairs 1 --steps 250             # the whole demo preset once
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from posbias.store import cpu_kind


def run_study(out: Path, study: list[str], workers: int, threads: int) -> float:
    """Wall seconds for ``workers`` processes of the study (``threads`` each) into ``out``, all finished."""
    cmd = [sys.executable, "-m", "posbias.cli", "extrapolate", *study, "--threads", str(threads), "--quiet",
           "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(workers)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            sys.exit(f"a study run failed ({p.returncode}): {err.strip().splitlines()[-1] if err.strip() else ''}")
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="threads of the single run (default: all)")
    p.add_argument("--workers", type=int, default=2, help="processes sharing the folder (dividing --cores)")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--preset", default="demo")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per model (the preset's own: 250)")
    p.add_argument("--schemes", nargs="+", default=["t5", "alibi", "kerple-log", "fire", "rope", "nope"])
    args = p.parse_args()
    if args.workers < 2 or args.cores % args.workers:
        sys.exit(f"--workers must be >= 2 and divide --cores {args.cores}, got {args.workers}")
    study = ["--preset", args.preset, "--steps", str(args.steps), "--schemes", *args.schemes]
    per = args.cores // args.workers
    print(f"{cpu_kind()}; one run at {args.cores} threads against {args.workers} runs at {per} thread(s) each; "
          f"posbias extrapolate {' '.join(study)}")
    print("| pair | order | single (s) | workers (s) | workers / single |")
    print("|---|---|---|---|---|")
    ratios = []
    root = Path(tempfile.mkdtemp(prefix="bench_workers-"))
    try:
        for i in range(args.pairs):
            times = {}
            order = ("single", "workers") if i % 2 == 0 else ("workers", "single")
            for way in order:
                out = root / f"{way}-{i}"
                times[way] = (run_study(out, study, 1, args.cores) if way == "single"
                              else run_study(out, study, args.workers, per))
                shutil.rmtree(out)
            ratios.append(times["workers"] / times["single"])
            print(f"| {i + 1} | {' then '.join(order)} | {times['single']:.0f} | {times['workers']:.0f} | "
                  f"{ratios[-1]:.3f} |", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nworkers / single: median {statistics.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f}, "
          f"{len(ratios)} pairs)")


if __name__ == "__main__":
    main()
