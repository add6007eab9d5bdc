"""The attention benchmark records what its ratios depend on: the CPU model and the denormal mode."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_attention.py"


def _run(tmp_path, *extra):
    out = tmp_path / "rows.json"
    lines, _ = _script("bench_attention.py", "--device", "cpu", "--lengths", "64", "--schemes", "alibi", "--no-flex",
                       "--reps", "1", "--no-backward", "--json", str(out), *extra)
    return lines[0], json.loads(out.read_text())


def _script(name, *args, ok=True, alone=False):
    """Runs ``benchmarks/<name>`` with ``args`` in this process (:func:`_in_this_process`), or with
    ``alone`` in a process of its own (a run that patches the library for itself: ``bench_dense_blocks.py``
    forces blockwise's dense branch, ``--table-config`` sets the triton backend's tiles; in this process
    they reached the tests after it): (its stdout lines, the completed process); ``ok``: it must succeed
    (otherwise: a run refused at its arguments)."""
    if alone:
        r = subprocess.run([sys.executable, str(SCRIPT.parent / name), *args], capture_output=True, text=True,
                           timeout=300)
    else:
        r = _in_this_process(name, *args)
    if ok:
        assert r.returncode == 0, r.stderr
    return r.stdout.splitlines(), r


def _in_this_process(name, *args):
    """``python benchmarks/<name> args`` run in this process, as the interpreter would run it (its folder
    first on the path, ``sys.exit``'s message to stderr with status 1): the completed process it gives.
    A second interpreter would spend ~3 s starting and importing torch for each run (test_bench.py took
    53 s with its successful runs in processes of their own, 24 s in this one; 2026-12-07). An exception
    the script lets escape (a traceback, in a process of its own) fails the test that ran it. Torch's
    thread count and denormal mode, which a script may set, are put back; a benchmark's own child
    processes (``--memory``) are still processes of their own."""
    import contextlib
    import io
    import runpy

    import torch

    script, out, err = SCRIPT.parent / name, io.StringIO(), io.StringIO()
    argv, path, threads = sys.argv, list(sys.path), torch.get_num_threads()
    sys.argv, sys.path[:0] = [str(script), *args], [str(script.parent)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(script), run_name="__main__")
            except SystemExit as stop:
                code = stop.code
                if isinstance(code, str):
                    print(code, file=sys.stderr)
                    code = 1
                code = code or 0
    finally:
        sys.argv, sys.path[:] = argv, path
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)
    return subprocess.CompletedProcess([sys.executable, str(script), *args], code, out.getvalue(), err.getvalue())


def _bench_attention(name="bench_attention"):
    """``benchmarks/bench_attention.py`` (or another script there) as a module, imported as the scripts
    beside it import it."""
    import importlib

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(SCRIPT.parent))


def test_a_probe_variant_that_fails_is_its_row():
    """The GPU probes' cells (triton's tiles, FlexAttention's kernel_options): a forward that fails is
    the row's error, a backward that fails is its own cell's, and a variant that runs has its ratios."""
    bc = _bench_attention("bench_cuda_candidates")
    cpu = bc.torch.device("cpu")

    def boom():
        raise RuntimeError("out of resource: shared memory, Required: 245760\nmore")

    ok = lambda: None  # noqa: E731
    first, sf, st = bc.probe_row(boom, ok, ok, ok, cpu, 1)
    assert first != first and sf == "failed: RuntimeError: out of resource: shared memory, Required: 245760" and st == ""
    first, sf, st = bc.probe_row(ok, boom, ok, ok, cpu, 1)
    assert first >= 0 and "(" in sf and st.startswith("failed: RuntimeError: out of resource")


def test_the_header_and_rows_name_the_cpu_and_the_denormal_mode(tmp_path):
    header, rows = _run(tmp_path, "--flush-denormal")
    assert "denormals flushed" in header and "2 threads" in header
    assert rows and all(r["flush_denormal"] is True and r["device_name"] for r in rows)
    assert rows[0]["device_name"] in header
    header, rows = _run(tmp_path)
    assert "denormals kept" in header and all(r["flush_denormal"] is False for r in rows)


def test_bench_backends_compares_two_paths_and_says_where_one_cannot_run():
    lines, _ = _script("bench_backends.py", "--lengths", "64", "--reps", "1", "--schemes", "t5", "alibi",
                       "--flush-denormal")
    assert "denormals flushed" in lines[0] and "2 threads" in lines[0] and "causal" in lines[0]
    assert lines[1] == "| scheme | N | windowed × SDPA | banded × SDPA | banded / windowed |"
    t5 = next(x for x in lines if x.startswith("| t5 | 64 |"))
    assert len(t5.split("|")) == 7 and "cannot" not in t5
    assert "cannot run: windowed: needs a Toeplitz bias constant beyond a window" in next(
        x for x in lines if x.startswith("| alibi |"))
    _, r = _script("bench_backends.py", "--backends", "fast", "banded", ok=False)
    assert r.returncode != 0 and "--backends: unknown 'fast'; valid: auto, reference" in r.stderr
    # a label with options, and auto: FIRE below its threshold takes toeplitz, against blockwise forced
    lines, _ = _script("bench_backends.py", "--lengths", "64", "--reps", "1", "--schemes", "fire@init_L=128",
                       "--backends", "blockwise", "auto", "--forward")
    row = next(x for x in lines if x.startswith("| fire@init_L=128 | 64 |"))
    assert len(row.split("|")) == 7 and "cannot" not in row
    _, r = _script("bench_backends.py", "--schemes", "fires", ok=False)
    assert r.returncode != 0 and "--schemes: unknown scheme 'fires'" in r.stderr and "Traceback" not in r.stderr


def test_bench_decode_times_attention_and_the_model_against_no_bias():
    """The decoding benchmark: one row per scheme, cache length and query count with the backend
    ``auto`` took, then the model's tokens; bad sizes are one line and a non-zero exit."""
    lines, _ = _script("bench_decode.py", "--schemes", "t5", "rope", "--keys", "96", "--queries", "1", "3",
                       "--context", "40", "--d-model", "32", "--layers", "1", "--heads", "2", "--head-dim", "16",
                       "--reps", "1", "--flush-denormal")
    assert "denormals flushed" in lines[0] and "2 threads" in lines[0]
    assert lines[1] == "| scheme | keys | queries | backend | × no bias | ms |"
    assert any(x.startswith("| t5 | 96 | 3 | toeplitz |") for x in lines)
    assert any(x.startswith("| rope | 96 | 1 | sdpa |") for x in lines)
    assert any(x.startswith("| rope | 40 |") for x in lines) and "| scheme | context | × no bias | ms per token |" in lines
    _, r = _script("bench_decode.py", "--keys", "4", "--queries", "8", "--no-model", ok=False)
    assert r.returncode != 0 and "need 1 <= queries <= keys" in r.stderr and "Traceback" not in r.stderr
    lines, _ = _script("bench_decode.py", "--schemes", "fire@init_L=1000", "--keys", "96", "--context", "40",
                       "--d-model", "32", "--layers", "1", "--heads", "2", "--head-dim", "16", "--reps", "1")
    assert any(x.startswith("| fire@init_L=1000 | 96 | 1 | toeplitz |") for x in lines)  # below L: Toeplitz
    assert any(x.startswith("| fire@init_L=1000 | 40 |") for x in lines)
    _, r = _script("bench_decode.py", "--schemes", "fire@L=3", ok=False)
    assert r.returncode != 0 and r.stderr.startswith("--schemes:") and "Traceback" not in r.stderr
    # a forced backend where it runs exactly (blockwise), auto's choice where it does not (triton: CUDA only)
    for backend, taken in (("blockwise", "blockwise"), ("triton", "toeplitz")):
        lines, _ = _script("bench_decode.py", "--schemes", "t5", "--keys", "96", "--no-model", "--heads", "2",
                           "--head-dim", "16", "--reps", "1", "--backend", backend)
        assert any(x.startswith(f"| t5 | 96 | 1 | {taken} |") for x in lines), lines


def test_grouped_query_attention_runs_every_path_with_memory(tmp_path):
    """``--kv-heads``: every case (and the SDPA baseline) takes the grouped keys and values, the header says
    so, and the memory child gets the same shapes; a count that does not divide the heads is refused."""
    header, rows = _run(tmp_path, "--kv-heads", "2", "--memory", "--schemes", "t5", "alibi")
    assert "2 key/value heads (GQA)" in header
    assert {r["path"] for r in rows} >= {"posbias (toeplitz)", "dense-bias SDPA", "HF-style T5"}
    assert all(r["peak_extra_mib"] == r["peak_extra_mib"] for r in rows)  # measured: no NaN from a failed child
    _, r = _script("bench_attention.py", "--kv-heads", "3", ok=False)
    assert r.returncode == 2 and "--kv-heads 3 must divide --heads 8" in r.stderr


def test_bench_padding_compares_key_mask_with_both_baselines():
    lines, _ = _script("bench_padding.py", "--lengths", "64", "40", "--reps", "1", "--schemes", "t5", "--flush-denormal")
    assert "denormals flushed" in lines[0] and "2 threads" in lines[0] and "64, 40 tokens padded to 64" in lines[0]
    assert [x.split("|")[2].strip() for x in lines[3:]] == ["forward", "forward+backward"]
    _, r = _script("bench_padding.py", "--schemes", "rope", ok=False)
    assert r.returncode == 2 and "'rope' is not an additive scheme" in r.stderr
    lines, _ = _script("bench_padding.py", "--packed", "--lengths", "40", "24", "--reps", "1", "--schemes", "fire",
                       "--forward")
    assert "one row packing 2 documents of 40, 24 tokens (64)" in lines[0] and "document mask" in lines[1]
    assert [x.split("|")[2].strip() for x in lines[3:]] == ["forward"]


def test_bench_dropout_compares_with_both_baselines_and_measures_memory():
    lines, _ = _script("bench_dropout.py", "--lengths", "64", "--reps", "1", "--schemes", "t5", "rope", "--memory")
    rows = [line for line in lines if line.startswith("| t5") or line.startswith("| rope")]
    assert len(rows) == 2 and "dropout_p=0.1" in lines[0]
    for row in rows:  # ms, two ratios, three memory figures (numbers, never nan)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 6 and all("(" in c for c in cells[3:5])
        assert all(float(x) >= 0 for x in cells[5].split(" / "))
    _, r = _script("bench_dropout.py", "--schemes", "sinusoidal", ok=False)
    assert r.returncode == 2 and "not an additive or rotary scheme" in r.stderr
    _, r = _script("bench_dropout.py", "--p", "1", ok=False)
    assert r.returncode == 2 and "--p must be in (0, 1)" in r.stderr
    _, r = _script("bench_dropout.py", "--device", "tpu", ok=False)
    assert r.returncode == 2 and "--device must be cpu, or cuda" in r.stderr


def test_bench_cuda_candidates_times_each_path_where_it_runs_and_refuses_bad_names():
    """Issue 12's candidates script, on the CPU at a toy size: each path where it runs exactly (banded
    for T5, alibi for ALiBi), blockwise beside them, none for KERPLE but blockwise; bad names are one
    line and a non-zero exit."""
    lines, _ = _script("bench_cuda_candidates.py", "--device", "cpu", "--dtype", "float32", "--lengths", "64",
                       "--reps", "1", "--schemes", "t5", "alibi", "kerple-log")
    rows = [x.split("|")[1:4] for x in lines if x.startswith("| ") and "| 64 |" in x]
    assert [[c.strip() for c in r] for r in rows] == [
        ["t5", "64", "banded"], ["t5", "64", "blockwise"], ["alibi", "64", "alibi"], ["alibi", "64", "blockwise"],
        ["kerple-log", "64", "blockwise"]]
    assert not any("failed" in x for x in lines)
    _, r = _script("bench_cuda_candidates.py", "--device", "cpu", "--flex-options", "[64]", ok=False)
    assert r.returncode != 0 and "--flex-options must be a JSON object" in r.stderr and "Traceback" not in r.stderr
    _, r = _script("bench_cuda_candidates.py", "--schemes", "t6", ok=False)
    assert r.returncode != 0 and "--schemes: unknown scheme 't6'" in r.stderr and "Traceback" not in r.stderr
    _, r = _script("bench_cuda_candidates.py", "--device", "cpu", "--table-config", '{"fwd": {}}', ok=False)
    assert r.returncode != 0 and "--table-config must be a JSON object with parts forward and backward" in r.stderr
    lines, _ = _script("bench_cuda_candidates.py", "--device", "cpu", "--dtype", "float32", "--lengths", "64",
                       "--reps", "1", "--schemes", "t5", "--backends", "triton", "blockwise",
                       "--table-config", '{"backward": {"B": 32}}', alone=True)  # (it sets the triton tiles)
    assert "'backward': {'B': 32, 'num_warps': 8, 'num_stages': 2}" in lines[0]  # merged into the defaults
    assert [x.split("|")[3].strip() for x in lines if x.startswith("| t5")] == ["blockwise"]  # triton: CUDA only


def test_bench_attention_reports_a_failing_case_as_a_row_and_goes_on(monkeypatch, capsys):
    """A case that raises (a compiler error, out of memory) is a row naming the error, and the next case
    still runs: on the first GPU run one FlexAttention compile failure would have ended the table."""
    import argparse

    ba = _bench_attention()

    def boom():
        raise RuntimeError("No valid triton configs\nsecond line")

    ok = lambda: None  # noqa: E731
    monkeypatch.setattr(ba, "cases", lambda *a: {"broken path": (boom, None), "fine path": (ok, None)})
    args = argparse.Namespace(heads=2, kv_heads=2, head_dim=8, memory=False, schemes=["alibi"], reps=1,
                              no_backward=True, flush_denormal=False, slow_s=None)
    rows = ba.run_length(16, args, ba.torch.device("cpu"), ba.torch.float32)
    out = capsys.readouterr().out
    assert "| alibi | 16 | broken path | failed | RuntimeError: No valid triton configs | | |" in out
    assert "second line" not in out and "| alibi | 16 | fine path |" in out
    assert rows[0] == {"scheme": "alibi", "N": 16, "path": "broken path", "error": "RuntimeError: No valid triton configs"}
    assert rows[1]["path"] == "fine path" and "error" not in rows[1]


def test_a_slow_case_is_timed_with_one_pair():
    """``--slow-s``: a candidate whose warm-up call takes longer is timed with one pair (a device session's
    time box), a fast one with every pair asked for."""
    import time

    ba = _bench_attention()
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.03)

    cpu = ba.torch.device("cpu")
    ba.paired(slow, lambda: None, cpu, 5, slow_s=0.01)
    assert len(calls) == 2  # the warm-up and one pair
    calls.clear()
    ba.paired(slow, lambda: None, cpu, 5, slow_s=10)
    assert len(calls) == 6


def test_bench_dense_blocks_compares_the_two_layouts():
    lines, _ = _script("bench_dense_blocks.py", "t5,alibi", "64", "1", alone=True)
    assert "2 threads" in lines[0] and len(lines) == 3
    assert lines[1].startswith("t5 64: new ") and "new/old" in lines[1] and lines[2].startswith("alibi 64: new ")


def test_bench_cuda_candidates_profiles_a_training_call():
    lines, _ = _script("bench_cuda_candidates.py", "--device", "cpu", "--dtype", "float32", "--reps", "1",
                       "--profile", "banded:t5:128", "--profile-rows", "5")
    text = "\n".join(lines)
    assert "## banded t5 N=128: 1 forward+backward calls" in text and "Self CPU time total" in text
    _, r = _script("bench_cuda_candidates.py", "--device", "cpu", "--profile", "banded-t5", ok=False)
    assert r.returncode != 0 and "--profile wants BACKEND:SCHEME:N" in r.stderr and "Traceback" not in r.stderr



def test_bench_precision_holds_each_path_to_the_tests_rule_on_the_cpu_and_on_the_stand_in_cuda_ops():
    """``bench_precision.py``: per scheme, path and query count, how many seeds keep the rule of
    ``within_reference_rounding`` and the path's error over the reference's. On the CPU banded's far
    parts run in float32 (the reference's error exactly); on the stand-in CUDA ops a single query's far
    part runs in float32 in training too, so every seed keeps the rule there as well."""
    for device, where in (("cpu", "cpu ("), ("stand-in", "stand-in CUDA ops on the CPU (")):
        r = _in_this_process("bench_precision.py", "--cases", "t5:banded", "--queries", "1", "16", "--keys", "200",
                             "--seeds", "2", "--device", device)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert where in lines[0] and "bfloat16 training" in lines[0] and "2 threads" in lines[0], lines[0]
        rows = [x.split("|")[1:-1] for x in lines if x.startswith("| t5 | banded |")]
        assert [row[2].strip() for row in rows] == ["1", "16"] and all(row[3].strip() == "2 of 2" for row in rows)
        if device == "cpu":
            assert all(row[4].strip() == "1.00" for row in rows)
    for args, says in ((["--cases", "t5:fast"], "--cases: 't5:fast' is not SCHEME:BACKEND"),
                       (["--queries", "300", "--keys", "200"], "--queries at most --keys (200)"),
                       (["--device", "tpu"], "--device must be cpu, cuda or stand-in, got 'tpu'")):
        r = _in_this_process("bench_precision.py", *args)
        assert r.returncode == 1 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
