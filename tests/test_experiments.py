"""The experiment scripts under docs/experiments (docs/study.md and docs/retrofit-and-diagnose.md quote what they measured)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from _helpers import TINY_L, tiny_checkpoint

from posbias.schemes import build

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    """An experiment script as a module (its folder on sys.path, as when it is run, for ``_models``)."""
    if str(ROOT / "docs" / "experiments") not in sys.path:
        sys.path.insert(0, str(ROOT / "docs" / "experiments"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "docs" / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_clamp_far_keeps_near_distances_and_gives_far_ones_the_last_near_bias():
    from posbias.diagnose import ClampFar

    fire = build("fire", n_heads=2, head_dim=8, init_L=16)
    pos = torch.arange(40)
    want, got = fire.bias(pos, pos), ClampFar(fire, 10).bias(pos, pos)
    d = pos[:, None] - pos[None, :]
    near = d < 10
    assert torch.equal(got[:, near], want[:, near])
    for i, j in ((10, 0), (39, 0), (39, 29), (25, 3)):  # distance ≥ 10: the bias of distance 9, same query
        assert torch.equal(got[:, i, j], want[:, i, i - 9])
    assert ClampFar(fire, 10).default_scale() == fire.default_scale()
    with pytest.raises(ValueError, match="limit must be an integer >= 1, got 0"):
        ClampFar(fire, 0)
    with pytest.raises(ValueError, match="key positions 0"):
        ClampFar(fire, 10).bias(pos, pos + 1)


def test_far_clamp_script_runs_the_grid_with_and_without_the_clamp(tmp_path, capsys):
    far_clamp = _load("far_clamp")
    path = tiny_checkpoint(tmp_path / "f", "fire", init_L=TINY_L // 2)
    said = far_clamp.main([str(path), "--samples", "1", "--threads", "1"])
    assert [line.split(" (")[0] for line in said] == ["as trained", f"distances >= {TINY_L} clamped"]
    for line in said:
        assert all(f"@{TINY_L * k} " in line for k in (1, 2, 4, 8))
    # at L no pair is clamped: the two grids agree there
    assert said[0].split("): ")[1].split(",")[0] == said[1].split("): ")[1].split(",")[0]
    assert capsys.readouterr().out.splitlines() == said


def test_scheme_in_layers_swaps_only_the_listed_layers_and_restores_them(tmp_path):
    from posbias import checkpoint as ckpt
    from posbias.diagnose import WithinWindow

    far_filler = _load("far_filler")
    for name in ("alibi", "rope"):  # a scheme without a bias: the mask alone, on the masked backend
        model = ckpt.load_model(tiny_checkpoint(tmp_path / name, name)).eval()
        x = torch.randint(0, 256, (1, 3 * TINY_L))
        with torch.no_grad():
            before = model(x)
            with far_filler.scheme_in_layers(model, WithinWindow(model.scheme, 2), [1]):
                assert [b.attn.backend for b in model.blocks] == ["auto", "blockwise"]
                changed = model(x)
            after = model(x)
        assert torch.equal(before, after) and not torch.allclose(before, changed), name
        assert all("forward" not in vars(block) and block.attn.backend == "auto" for block in model.blocks)


def test_far_filler_script_hides_nothing_at_L(tmp_path, capsys):
    far_filler = _load("far_filler")
    path = tiny_checkpoint(tmp_path / "k", "kerple-log")
    said = far_filler.main([str(path), "--samples", "1", "--threads", "1"])
    assert said[0].startswith("as trained") and said[1].startswith("far filler hidden in every layer")
    for line in said[:-1]:  # at L no key is past L: every condition agrees there
        assert line.split("): ")[1].split(",")[0] == said[0].split("): ")[1].split(",")[0]
        assert all(f"@{TINY_L * k} " in line for k in (1, 2, 4, 8))
    assert said[-1].startswith("attention on the far filler by layer") and f"@{TINY_L} 0.00/" in said[-1]
    assert capsys.readouterr().out.splitlines() == said


def test_rotary_far_filler_script_teaches_copies_and_hides_nothing_at_L(tmp_path):
    rotary_far_filler = _load("rotary_far_filler")
    path = tiny_checkpoint(tmp_path / "r", "rope", scaling="dynamic-ntk", factor=4.0, train_len=TINY_L)
    argv = [str(path), "--to", str(4 * TINY_L), "--steps", "2", "--seeds", "0", "--samples", "2", "--threads", "1",
            "--save", str(tmp_path / "copies")]
    said = rotary_far_filler.main(argv)
    assert [line.split(":")[0] for line in said] == ["seed 0, as trained", "seed 0, far filler hidden"]
    at_l = [line.split(": ")[1].split(",")[0] for line in said]
    assert at_l[0] == at_l[1] and all(f"@{TINY_L * k} " in said[0] for k in (1, 2, 4))
    assert (tmp_path / "copies" / "passkey-seed0").exists()
    assert rotary_far_filler.main(argv)[0].split(" (")[:-1] == said[0].split(" (")[:-1]  # the kept copy, same cells
    # a swapped-in bias (a retrofit row too): the same counterfactual, nothing hidden at L
    alibi = rotary_far_filler.main([str(tiny_checkpoint(tmp_path / "a", "alibi")), "--to", str(2 * TINY_L),
                                    "--steps", "2", "--seeds", "0", "--samples", "2", "--threads", "1"])
    assert [line.split(": ")[1].split(",")[0] for line in alibi] == [alibi[0].split(": ")[1].split(",")[0]] * 2


def test_window_hops_chunk_ends_are_the_diagnosis_row():
    """The script's chunk-final window − cut is ``diagnose.window_split``'s third row (whose meaning
    ``test_far_tokens_reach_chunk_ends_only_through_layers`` checks), next to its two wider sets."""
    from posbias.diagnose import context_effect, window_effect, window_split
    from posbias.model import ModelConfig, TransformerLM

    window_hops = _load("window_hops")
    tokens = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    L = 16
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(scheme="nope", d_model=32, n_layers=2, n_heads=2)).eval()
    with torch.no_grad():
        got = window_hops.window_minus_cut(model, tokens, 4 * L, L, 3)
        long, short = context_effect(model, tokens, 4 * L, L, windows=3)
        row = window_split(long, window_effect(model, tokens, 4 * L, L, 3), short, L)[2]
    assert got["chunk-final"] == pytest.approx(row[1:]) and abs(row[1]) > 1e-5
    assert set(got) == {"chunk-final", "last quarter of each chunk", "every position past L"}

def test_eval_frame_scores_stretches_from_the_splits_start_to_its_end(tmp_path):
    """Each stretch is the study on a contiguous slice (stretch 0: the split's first tokens, what the
    evaluation scored before it spread its segments), the last row the study on the whole split."""
    from posbias.evaluate import length_study
    from posbias.model import ModelConfig, TransformerLM

    eval_frame = _load("eval_frame")
    val = torch.randint(0, 256, (3001,), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    val[2000:] = 48  # digits at the end
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(scheme="alibi", d_model=32, n_layers=1, n_heads=2)).eval()
    with torch.no_grad():
        starts = eval_frame.spread_starts(val.numel() - 1, 256, 3)  # what main passes: from the start to the end
        rows = eval_frame.ratios(model, val, 16, 64, 256, starts)
        first = length_study(model, val[:257], [16, 64], train_len=16, n_tokens=256)[64]
    assert [r[0].split(" (")[0] for r in rows] == ["stretch 0 @ 0", "stretch 1 @ 1372", "stretch 2 @ 2744",
                                                  "segments spread over the split"]
    assert rows[0][1:] == (first["ratio"], first["ratio_lo"], first["ratio_hi"])
    # the point and the replicates sum the same float64 numbers in other orders: where every segment
    # scores alike (the digits' stretch) the interval collapses and may miss the point by an ulp, as it
    # did on a Xeon (1.0000000447034847 against [1.0000000447034845, 1.0000000447034845])
    assert "digits 1.00" in rows[2][0] and all(lo - 1e-12 <= r <= hi + 1e-12 for _, r, lo, hi in rows)
    with torch.no_grad():
        far = eval_frame.ratios(model, val, 16, 64, 256, starts, "far_delta")
    assert far[0][1:] == (first["far_delta"], first["far_delta_lo"], first["far_delta_hi"])
    pytest.importorskip("matplotlib")
    eval_frame.plot({"alibi": rows, "nope": [(label, r + 1, lo + 1, hi + 1) for label, r, lo, hi in rows]},
                    starts, str(tmp_path / "frame.png"))
    assert (tmp_path / "frame.png").stat().st_size > 0


def test_interval_coverage_counts_each_design_over_its_samples():
    """Segments whose log-ratios trend along the split: a contiguous block's interval misses the split's
    mean, segments spread over the split cover it; each design counts every sample it has."""
    coverage = _load("interval_coverage")
    d = torch.linspace(-0.2, 0.2, 64, dtype=torch.float64) + 0.01 * torch.randn(64, generator=torch.Generator().manual_seed(0),
                                                                                dtype=torch.float64)
    got = coverage.coverage(d, 8, draws=20, n_boot=200)
    assert {k: t for k, (_, t) in got.items()} == {"contiguous": 8, "spread": 8, "random": 20, "contiguous expanded": 8,
                                                    "spread expanded": 8, "random expanded": 20}
    assert got["contiguous"][0] <= 2 and got["spread"][0] >= 7
    assert all(got[f"{k} expanded"][0] >= got[k][0] for k in ("contiguous", "spread", "random"))  # wider, never less
    assert coverage.t_quantile(0.975, 15) == pytest.approx(2.1314, abs=2e-4)  # Student's t table
    assert coverage.expanded_level(16) == pytest.approx(0.9723, abs=2e-4)
    # tails: one segment far out carries the variance (skew and kurtosis of 19 zeros and one 1)
    spike = torch.zeros(20, dtype=torch.float64)
    spike[5] = 1.0
    said = coverage.tails(spike)
    assert "skew +4.13, excess kurtosis +15.1" in said and "segments 95% of the variance (at 0.25 of the split)" in said
    from posbias.model import ModelConfig, TransformerLM

    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(scheme="alibi", d_model=32, n_layers=1, n_heads=2)).eval()
    tokens = torch.randint(0, 256, (3001,), generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    with torch.no_grad():
        seg = coverage.segment_log_ratios(model, tokens, 16, 64, 8)
    from posbias.evaluate import length_study
    with torch.no_grad():
        want = length_study(model, tokens, [16, 64], train_len=16, n_tokens=512)[64]["ratio"]
    assert float(seg.mean().exp()) == pytest.approx(want, rel=1e-9)


def test_the_retrofit_control_is_the_checkpoint_fine_tuned_alone(tmp_path, monkeypatch):
    """``retrofit_control.py``: the row "alone" keeps the checkpoint's scheme; before its fine-tune it scores
    what the original scores, to the last digit, and after the fine-tune every method gets it scores
    otherwise; the table prints each row's ratio to the best."""
    from posbias import retrofit
    from posbias.data import local_corpus

    monkeypatch.setattr(retrofit, "METHODS", dict(retrofit.METHODS))  # the control's registration stays here
    script = _load("retrofit_control")
    f = tmp_path / "text.txt"
    f.write_text("".join(f"line {i}: the quick brown fox {i % 13} jumps\n" for i in range(3000)))
    path = tiny_checkpoint(tmp_path / "rope", "rope")
    res = script.run(str(path), 2 * TINY_L, 2, ["pi"], str(tmp_path / "out"), corpus=local_corpus(f), log=lambda s: None)
    rows = {(r["method"], r["stage"]): r for r in res.rows}
    assert list(rows) == [("original", "before"), ("alone", "no fine-tune"), ("alone", "fine-tuned 2"),
                          ("pi", "no fine-tune"), ("pi", "fine-tuned 2")]
    assert rows["alone", "no fine-tune"]["ppl"] == rows["original", "before"]["ppl"]
    assert rows["alone", "fine-tuned 2"]["ppl"] != rows["original", "before"]["ppl"]
    assert rows["alone", "fine-tuned 2"]["options"] == {} and rows["pi", "fine-tuned 2"]["options"]["scaling"] == "pi"
    lines = script.table(res)
    assert len(lines) == 5 and all(f"@{2 * TINY_L} " in line for line in lines) and "(1.000 [1.000, 1.000])" in "".join(lines)
