import subprocess
import sys

import pytest

from posbias.cli import bucket_table, main


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("t5", "alibi", "kerple-log", "fire", "rope", "offset", "nope", "sinusoidal"):
        assert name in out


def test_show_t5_table(capsys):
    assert main(["show", "t5", "--num-buckets", "32", "--max-distance", "128"]) == 0
    out = capsys.readouterr().out
    assert "32 buckets (n_b + 1 = 32, so n_b = 31)" in out
    assert "      26  59-66  (8)" in out  # offset 64 -> bucket 26 (SPEC §2.2)
    assert "      31  >= 113" in out


def test_bucket_table_worked_example():
    assert bucket_table(4, 5) == [(0, 0, 0), (1, 1, 1), (2, 2, 3), (3, 4, None)]


@pytest.mark.parametrize("argv, msg", [
    (["show", "t5", "--num-buckets", "1"], "num_buckets must be >= 2, got 1"),
    (["show", "t5", "--max-distance", "8"], "max_distance must be >= 17, got 8"),
    (["show", "t5", "--bogus", "1"], "has no option --bogus"),
    (["show", "t5", "--num-buckets", "many"], "--num-buckets must be an integer (scheme 't5'), got 'many'"),
    (["show", "nosuch"], "unknown scheme 'nosuch'"),
    (["show", "alibi", "--heads", "0"], "--heads must be >= 1, got 0"),
    (["show", "rope", "--head-dim", "15"], "even head_dim"),
    (["plot", "--schemes", "t6"], "unknown scheme 't6'"),
])
def test_cli_errors_are_one_line(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and "\n" not in err and "Traceback" not in err


def test_plot_writes_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    assert main(["plot", "--out", str(tmp_path), "--heads", "4", "--max-plot-distance", "64"]) == 0
    names = {p.name for p in tmp_path.glob("*.png")}
    assert {"t5_bucket_map.png", "t5_vs_alibi.png", "bias_vs_distance.png", "heatmap_alibi.png"} <= names
    for p in tmp_path.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_console_script_exit_code():
    r = subprocess.run([sys.executable, "-m", "posbias.cli", "show", "t5", "--num-buckets", "0"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_import_is_light():
    code = ("import sys, posbias; bad = [m for m in ('matplotlib', 'transformers') if m in sys.modules];"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_output_piped_into_head_stops_quietly():
    r = subprocess.run(f"{sys.executable} -m posbias.cli show alibi --heads 4 | head -1", shell=True,
                       capture_output=True, text=True)
    assert "Traceback" not in r.stderr and r.stdout.startswith("alibi")


def test_help_shows_defaults_presets_and_scheme_options(capsys):
    for argv, needles in [
        (["extrapolate", "--help"], ["default runs/study", "presets (flags override them)", "about 6 min",
                                     "results.md", "--scheme-option", "default 100"]),
        (["show", "--help"], ["scheme options:", "--max-distance (an integer, default 128)", "--clip (true/false"]),
        (["plot", "--help"], ["(default: plots)"]),
        (["--version"], ["posbias 0.1.0"]),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
        out = capsys.readouterr().out
        for n in needles:
            assert n in out, (argv, n)

