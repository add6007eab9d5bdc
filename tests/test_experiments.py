"""The experiment scripts under docs/experiments (the README quotes what they measured)."""

import importlib.util
from pathlib import Path

import pytest
import torch
from _helpers import TINY_L, tiny_checkpoint

from posbias.schemes import build

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
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
