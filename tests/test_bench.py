"""The attention benchmark records what its ratios depend on: the CPU model and the denormal mode."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_attention.py"


def _run(tmp_path, *extra):
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--lengths", "64", "--schemes", "alibi",
                        "--no-flex", "--reps", "1", "--no-backward", "--json", str(out), *extra],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()[0], json.loads(out.read_text())


def test_the_header_and_rows_name_the_cpu_and_the_denormal_mode(tmp_path):
    header, rows = _run(tmp_path, "--flush-denormal")
    assert "denormals flushed" in header and "2 threads" in header
    assert rows and all(r["flush_denormal"] is True and r["device_name"] for r in rows)
    assert rows[0]["device_name"] in header
    header, rows = _run(tmp_path)
    assert "denormals kept" in header and all(r["flush_denormal"] is False for r in rows)
