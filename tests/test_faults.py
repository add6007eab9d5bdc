"""Fault injection and strict inputs: nothing silently wrong, bad input gets one clear line, faults
lose nothing (kills, concurrent runs, damaged files, divergence, closed stdout, huge positions)."""

import dataclasses
import errno
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch
from _helpers import STUDY, TINY, RunsOnLoad, block_written_out, one_line_error, perturb_
from safetensors.torch import load_file, save_file

import posbias
from posbias import checkpoint as ckpt
from posbias.attention import BACKENDS, usable
from posbias.cli import main
from posbias.model import ModelConfig, TransformerLM
from posbias.train import TrainConfig, train

ALL = ["nope", "sinusoidal", "offset", "t5", "alibi", "kerple-log", "kerple-power", "fire", "rope"]
POSBIAS = [sys.executable, "-m", "posbias.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def quick_training(**settings) -> TrainConfig:
    """A few steps on 2 sequences of 16 tokens (warm-up 1, validation at the end on 1 batch), with
    ``settings`` over it: the runs the resume and stop tests train."""
    return TrainConfig(**{"batch_size": 2, "train_len": 16, "warmup": 1, "eval_every": 0, "eval_batches": 1, **settings})


# -- exact at any integer position ------------------------------------------------------------
@pytest.mark.parametrize("name", ["alibi", "t5", "offset", "kerple-log", "rope", "nope"])
@pytest.mark.parametrize("start", [2**24, 2**31, 2**40])
def test_shift_invariant_schemes_are_exact_at_huge_positions(name, start):
    """Every backend that can run the input gives, at positions start … start+N−1, the output it
    gives at 0 … N−1 (was: ALiBi off by 0.35 at 2^24, RoPE by ~1)."""
    s = posbias.build(name, n_heads=2, head_dim=16)
    q, k, v = (torch.randn(1, 2, 70, 16) for _ in range(3))
    at0 = posbias.attention_reference(q, k, v, s)
    pos = torch.arange(start, start + 70)
    for backend in BACKENDS:
        if backend == "flex" or usable(backend, s, q, q_pos=pos, k_pos=pos, causal=True) is not None:
            continue
        out = posbias.attention(q, k, v, s, q_pos=pos, k_pos=pos, backend=backend)
        torch.testing.assert_close(out, at0, atol=2e-5, rtol=1e-5, msg=f"{name}/{backend} at {start}")


def test_fire_at_huge_positions_matches_its_float64_definition():
    s = posbias.build("fire", n_heads=2, head_dim=16)
    q_pos, k_pos = torch.tensor([2**40 + 5]), torch.arange(2**40 - 3, 2**40 + 6)
    got = s.bias(q_pos, k_pos)
    with torch.no_grad():
        c, L = s.c.abs().double(), (s.L_multiplier * s.init_L).abs().double()
        d = (q_pos[:, None] - k_pos[None, :]).abs().double()
        x = torch.log1p(c * d) / (torch.log1p(c * torch.maximum(q_pos.double(), L)) + s.eps)
        want = s.mlp.double()(x.unsqueeze(-1)).permute(2, 0, 1).float()
    torch.testing.assert_close(got.detach(), want, atol=1e-6, rtol=1e-5)


def test_rope_angles_keep_shift_invariance():
    s = posbias.build("rope", n_heads=1, head_dim=64)
    x = torch.randn(1, 1, 1, 64)
    for p in (2**20, 2**24, 2**31):
        a = s.rotate(x, torch.tensor([p + 7])) @ s.rotate(x, torch.tensor([p])).transpose(-1, -2)
        b = s.rotate(x, torch.tensor([7])) @ s.rotate(x, torch.tensor([0])).transpose(-1, -2)
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-5, msg=str(p))


# -- strict inputs ----------------------------------------------------------------------------
@pytest.mark.parametrize("name, option, value", [
    ("offset", "clip", "false"), ("offset", "bidirectional", "no"), ("t5", "bidirectional", "no"),
    ("alibi", "symmetric", "false"), ("alibi", "symmetric", 1), ("t5", "num_buckets", True),
    ("rope", "base", "10000"), ("fire", "init_L", float("nan")),
])
def test_options_are_type_checked(name, option, value):
    with pytest.raises(ValueError, match=option):
        posbias.build(name, n_heads=2, head_dim=16, **{option: value})
    if isinstance(value, str) and option in ("clip", "bidirectional", "symmetric"):
        cls = posbias.SCHEMES[name]
        with pytest.raises(ValueError, match="must be True or False"):
            cls(n_heads=2, head_dim=16, **{option: value})


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("lq, lk", [(0, 0), (0, 7), (5, 0)])
def test_empty_sequences(name, lq, lk):
    s = posbias.build(name, n_heads=2, head_dim=16)
    q = torch.randn(1, 2, lq, 16, requires_grad=True)
    k, v = torch.randn(1, 2, lk, 16), torch.randn(1, 2, lk, 16)
    for fn in (posbias.attention, posbias.attention_reference):
        out = fn(q, k, v, s)
        assert out.shape == (1, 2, lq, 16) and not out.any()
        out.sum().backward()


@pytest.mark.parametrize("kwargs, match", [
    (dict(v=torch.randn(1, 2, 8, 8)), "v has head_dim 8"),
    (dict(q=torch.ones(1, 2, 8, 16, dtype=torch.long)), "q must be a floating-point tensor"),
    (dict(scale=float("nan")), "scale must be a finite number, got nan"),
    (dict(scale=float("inf")), "scale must be a finite number, got inf"),
    (dict(scale=-float("inf")), "scale must be a finite number, got -inf"),
    (dict(scale="0.5"), "scale must be a finite number, got '0.5'"),
])
@pytest.mark.parametrize("name", ["t5", "offset", "alibi", "rope"])
def test_bad_attention_inputs(name, kwargs, match):
    s = posbias.build(name, n_heads=2, head_dim=16)
    args = dict(q=torch.randn(1, 2, 8, 16), k=torch.randn(1, 2, 8, 16), v=torch.randn(1, 2, 8, 16))
    args.update({k: v for k, v in kwargs.items() if k in args})
    with pytest.raises(ValueError, match=match):
        posbias.attention(args["q"], args["k"], args["v"], s, scale=kwargs.get("scale"))


# -- damaged or diverged checkpoints ----------------------------------------------------------
@pytest.fixture()
def saved(tmp_path):
    model = TransformerLM(ModelConfig(scheme="t5", **TINY))
    return ckpt.save_checkpoint(tmp_path / "ck", model, extra={"train": {"seq_len": 16}}, trainer_state={"step": 1})


def test_truncated_weights_are_refused(saved):
    f = saved / ckpt.MODEL_FILE
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(ValueError, match="model.safetensors.*cannot be read.*damaged"):
        ckpt.load_model(saved)


def test_truncated_trainer_state_is_refused(saved):
    f = saved / ckpt.TRAINER_FILE
    f.write_bytes(f.read_bytes()[:20])
    with pytest.raises(ValueError, match="trainer.pt.*cannot be read"):
        ckpt.load_trainer_state(saved)


def test_a_trainer_state_that_names_code_is_refused_unrun(saved, tmp_path):
    assert ckpt.load_trainer_state(saved) == {"step": 1}
    marker = tmp_path / "ran"
    torch.save({"step": 1, "history": RunsOnLoad(marker)}, saved / ckpt.TRAINER_FILE)
    with pytest.raises(ValueError, match="trainer.pt.*cannot be read.*damaged"):
        ckpt.load_trainer_state(saved)
    assert not marker.exists()


def test_without_posix_file_locks_the_library_works_and_the_commands_say_why_they_cannot(tmp_path, text_file):
    """Windows has no ``fcntl``: ``import posbias``, training and checkpoints (which need no lock) work;
    a command that locks its output folder stops with one line naming the lock file and what to use
    instead, and leaves nothing behind (it was a ModuleNotFoundError traceback at import)."""
    script = f"""
import sys
sys.modules["fcntl"] = None  # as on Windows: import fcntl raises ImportError
sys.path.insert(0, {str(Path(__file__).parent)!r})
from _helpers import STUDY, TINY
from posbias import checkpoint as ckpt
from posbias.cli import main
from posbias.model import ModelConfig, TransformerLM
ckpt.save_checkpoint({str(tmp_path / "ck")!r}, TransformerLM(ModelConfig(scheme="alibi", **TINY)))
assert ckpt.load_model({str(tmp_path / "ck")!r}).cfg.scheme == "alibi"
sys.exit(main(["extrapolate", "--schemes", "t5", *STUDY, "--data", {str(text_file)!r}, "--out", {str(tmp_path / "run")!r}]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"posbias extrapolate: error: '{tmp_path / 'run' / '.posbias.lock'}'")
    assert "POSIX file locks (flock), which this system lacks: run the command on Linux or macOS (on Windows, in WSL)" \
        in lines[0]
    assert not (tmp_path / "run").exists()


def test_nan_weights_are_refused(saved, capsys):
    state = load_file(str(saved / ckpt.MODEL_FILE))
    state["head.weight"][0, 0] = float("nan")
    save_file(state, str(saved / ckpt.MODEL_FILE))
    with pytest.raises(ValueError, match="non-finite weights \\(head.weight\\)"):
        ckpt.load_model(saved)
    one_line_error(capsys, main(["diagnose", str(saved), "--out", str(saved.parent / "d")]), "non-finite")
    # several: all named up to four, in the file's order, else the first three and "and N more"
    floats = [k for k, t in state.items() if t.is_floating_point() and k != "head.weight"]
    for n in (2, 3, 4):
        for k in floats[:n]:
            state[k].view(-1)[0] = float("inf")
        save_file(state, str(saved / ckpt.MODEL_FILE))
        named = [k for k in state if k in {"head.weight", *floats[:n]}]
        with pytest.raises(ValueError) as err:
            ckpt.load_model(saved)
        listed = ", ".join(named) if len(named) <= 4 else ", ".join(named[:3]) + f" and {len(named) - 3} more"
        assert f"holds non-finite weights ({listed}); refusing" in str(err.value)


@pytest.mark.parametrize("stride", [None, 8])
def test_finite_weights_that_overflow_are_no_perplexity(stride):
    """Weights that load (finite) but overflow float32 in the forward give inf logits and NaN losses: the
    evaluation refuses them, windows tiled or sliding, instead of reporting a NaN or inf perplexity."""
    from posbias.evaluate import evaluate_length

    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(scheme="alibi", **TINY)).eval()
    with torch.no_grad():
        model.head.weight.fill_(3e38)
    tokens = torch.randint(0, 256, (2000,), dtype=torch.uint8)
    with pytest.raises(ValueError, match="non-finite losses at length 16"):
        evaluate_length(model, tokens, 16, max_tokens=160, stride=stride)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["model"].update(colour="blue"), "does not describe a posbias model"),
    (lambda m: m["model"].update(d_model=64), "does not match its config.json"),
])
def test_config_that_does_not_fit_is_refused(saved, edit, match):
    meta = json.loads((saved / ckpt.CONFIG_FILE).read_text())
    edit(meta)
    (saved / ckpt.CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=match) as err:
        ckpt.load_model(saved)
    # torch's own account of the mismatch (dozens of lines here) cut to its first lines, 300 characters
    detail = str(err.value).partition("(")[2]
    assert "\n" not in str(err.value) and 0 < len(detail.removesuffix(")")) <= 300


def test_a_config_without_a_model_a_training_length_or_a_valid_multiplier_is_refused(saved):
    meta = json.loads((saved / ckpt.CONFIG_FILE).read_text())
    assert ckpt.train_len(saved) == 16  # recorded as seq_len, the name before 0.1.0
    for recorded, expected in [({"train_len": 32, "seq_len": 16}, 32), ({"train_len": 1}, 1), ({}, None),
                               ({"seq_len": "16"}, "train.seq_len must be an integer >= 1, got '16'"),
                               ({"seq_len": 0}, "train.seq_len must be an integer >= 1, got 0"),
                               ({"train_len": 16.0}, "train.train_len must be an integer >= 1, got 16.0"),
                               ({"train_len": True}, "train.train_len must be an integer >= 1, got True"),
                               ({"train_len": None, "seq_len": 16}, "train.train_len must be an integer >= 1, got None")]:
        (saved / ckpt.CONFIG_FILE).write_text(json.dumps({**meta, "train": recorded}))
        if expected is None:
            with pytest.raises(ValueError, match=r"records no training length \(meta 'train.train_len'\)"):
                ckpt.train_len(saved)
        elif isinstance(expected, str):
            with pytest.raises(ValueError, match=rf"records no valid training length: the checkpoint's "
                                                 rf"{re.escape(expected)} \(its config.json is damaged\)"):
                ckpt.train_len(saved)
        else:
            assert ckpt.train_len(saved) == expected
    assert ckpt.pos_lr_mult(meta) == 1.0  # trained before the multiplier existed
    assert ckpt.pos_lr_mult({"train": {"pos_lr_mult": 30}}) == 30.0
    for bad in (0, -2.0, float("nan"), float("inf"), "30", True, None):
        with pytest.raises(ValueError, match=rf"checkpoint's train.pos_lr_mult must be a finite number > 0, got "
                                             rf"{re.escape(repr(bad))} \(its config.json is damaged\)"):
            ckpt.pos_lr_mult({"train": {"pos_lr_mult": bad}})
    (saved / ckpt.CONFIG_FILE).write_text(json.dumps(meta)[:-9])  # cut short
    with pytest.raises(ValueError, match=r"config.json' is not valid JSON: "):
        ckpt.read_meta(saved)
    (saved / ckpt.CONFIG_FILE).write_text(json.dumps({k: v for k, v in meta.items() if k != "model"}))
    with pytest.raises(ValueError, match="is not a posbias checkpoint"):
        ckpt.read_meta(saved)
    assert not ckpt.is_posbias(saved)  # a config.json, but not of a posbias model (a Hugging Face folder has one)


def test_resume_with_another_model_size_is_refused(tmp_path, text_file):
    from posbias.data import local_corpus

    c = local_corpus(text_file)
    tcfg = quick_training(steps=4, ckpt_every=1)
    train(ModelConfig(scheme="alibi", **TINY), tcfg, c.train, c.val, tmp_path, progress=False, stop_after=2)
    with pytest.raises(ValueError, match="other settings \\(model.d_model: 32 → 64\\)"):
        train(ModelConfig(scheme="alibi", **{**TINY, "d_model": 64}), tcfg, c.train, c.val, tmp_path, progress=False)


def test_config_diff_names_each_changed_setting():
    """What a refused resume names: each setting that differs, nested keys dotted, one that is set on
    one side only as ``<unset>``, and a dict against a plain value as the two values (not a recursion into
    a value that is no dict)."""
    from posbias.train import config_diff

    assert config_diff({"a": {"x": 1, "y": 2}, "b": 3}, {"a": {"x": 1, "y": 5}, "b": 3, "c": 1}) == \
        "a.y: 2 → 5; c: '<unset>' → 1"
    assert config_diff({"a": {"x": 1}}, {"a": 5}) == "a: {'x': 1} → 5"
    assert config_diff({"a": None}, {"a": {"x": 1}}) == "a: None → {'x': 1}"
    assert config_diff({"a": {"b": {"c": 1}}}, {"a": {"b": {"c": 1}}}) == ""


def test_training_shows_its_progress_unless_told_not_to(tmp_path, text_file, capsys):
    """A bar on stderr by default; none with ``progress=False``."""
    from posbias.data import local_corpus

    c = local_corpus(text_file)
    tcfg = quick_training(steps=2, ckpt_every=1)
    train(ModelConfig(scheme="alibi", **TINY), tcfg, c.train, c.val, tmp_path / "shown")
    assert "train alibi" in capsys.readouterr().err
    train(ModelConfig(scheme="alibi", **TINY), tcfg, c.train, c.val, tmp_path / "quiet", progress=False)
    assert capsys.readouterr().err == ""


def test_a_process_stops_with_the_others_when_another_was_interrupted(tmp_path, text_file, monkeypatch):
    """Training together, a process that got no signal itself stops at the step the processes agreed on
    (``_agreed``: another was interrupted): it saves that step, off the checkpoint interval, and raises
    as its interrupted peers do, rather than going on alone to a collective nobody else joins. (One
    process here, told by a stand-in ``_agreed`` after its second step.)"""
    import posbias.train as training
    from posbias.data import local_corpus

    c = local_corpus(text_file)
    asked = []
    monkeypatch.setattr(training, "_agreed",
                        lambda requested, world, device: asked.append(requested) or len(asked) == 2)
    tcfg = quick_training(steps=4, ckpt_every=10)
    with pytest.raises(KeyboardInterrupt, match="stopped with the other processes, one of which was interrupted"):
        train(ModelConfig(scheme="alibi", **TINY), tcfg, c.train, c.val, tmp_path, progress=False)
    assert asked == [False, False] and ckpt.load_trainer_state(tmp_path / "last")["step"] == 2


def test_a_non_finite_loss_names_its_step_and_updates_nothing():
    """The step a NaN loss stops at is counted from 1, as the progress and the checkpoints count; the
    optimizer has not stepped (no weight, no moment changed)."""
    from posbias.train import NonFiniteLoss, _step, make_optimizer

    model = TransformerLM(ModelConfig(scheme="t5", **TINY))
    cfg = TrainConfig(lr=0.002)
    opt = make_optimizer(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(NonFiniteLoss, match=r"^loss nan at step 5 \(lr 0\.002\)$"):
        _step(lambda idx: torch.full((1, 4, 7), float("nan")), model, opt, cfg, x, x, 4)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()) and not opt.state


def test_divergence_stops_at_once_and_names_no_checkpoint_before_the_first(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    code = main(["extrapolate", "--schemes", "t5", *STUDY, "--steps", "20", "--lr", "1e30", "--data", str(text_file),
                 "--out", str(out)])  # 20 steps: a checkpoint every 2 (study.py)
    err = one_line_error(capsys, code, "diverged", "at step 2 (lr 1e+30)")
    # It diverged before the first checkpoint: it must not point at one (it said "the last good
    # checkpoint is kept in …/last", a folder that did not exist).
    assert re.search(r"; no checkpoint had been written \(the first was due after step 2\) — lower the learning "
                     r"rate$", err), err
    assert not list(out.glob("models/*/last"))
    assert not (out / "results.json").exists()
    assert not list(out.glob("models/*/final"))
    assert not list(out.glob("models/*/eval-*.json"))


def test_divergence_after_a_checkpoint_names_the_step_it_keeps(tmp_path, text_file, monkeypatch):
    """A run that diverges at step 5 with checkpoints every 2 steps keeps the one after step 4, and says so;
    resumed from it and diverging at once, it names the step it resumed from."""
    import posbias.train as training
    from posbias.data import local_corpus

    c = local_corpus(text_file)
    real = training._step

    def diverging_at(n):
        def step(net, model, opt, cfg, x, y, i):
            if i + 1 == n:
                raise training.NonFiniteLoss(f"loss nan at step {n} (lr {cfg.lr:g})")
            return real(net, model, opt, cfg, x, y, i)
        return step

    tcfg, mcfg = quick_training(steps=8, ckpt_every=2), ModelConfig(scheme="alibi", **TINY)
    monkeypatch.setattr(training, "_step", diverging_at(5))
    with pytest.raises(training.NonFiniteLoss) as err:
        train(mcfg, tcfg, c.train, c.val, tmp_path, progress=False)
    assert str(err.value) == (f"training alibi diverged: loss nan at step 5 (lr {tcfg.lr:g}); the last good checkpoint, "
                              f"after step 4, is kept in {str(tmp_path / 'last')!r} — lower the learning rate")
    assert ckpt.load_trainer_state(tmp_path / "last")["step"] == 4
    monkeypatch.setattr(training, "_step", diverging_at(5))  # resumed at step 4: diverges at its first step
    with pytest.raises(training.NonFiniteLoss, match=r"after step 4, is kept in"):
        train(mcfg, tcfg, c.train, c.val, tmp_path, progress=False)


def test_non_finite_results_are_never_written(tmp_path):
    from posbias.store import write_json

    with pytest.raises(ValueError, match="non-finite number \\(nan\\) at records\\[0\\].ppl"):
        write_json(tmp_path / "r.json", {"records": [{"ppl": float("nan")}]})
    with pytest.raises(ValueError, match="^refusing to write a non-finite number \\(-inf\\) at top level$"):
        write_json(tmp_path / "r.json", float("-inf"))
    with pytest.raises(ValueError, match="non-finite number \\(inf\\) at \\[1\\]\\[0\\]$"):
        write_json(tmp_path / "r.json", [1.0, (float("inf"),)])
    assert not (tmp_path / "r.json").exists()


def test_truncated_eval_cache_names_the_file(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    argv = ["extrapolate", "--schemes", "alibi", *STUDY, "--data", str(text_file), "--out", str(out)]
    assert main(argv) == 0
    (ev,) = out.glob("models/*/eval-*.json")
    ev.write_text(ev.read_text()[:40])
    capsys.readouterr()
    one_line_error(capsys, main(argv), ev.name, "not valid JSON", "delete it")


# -- CLI: every bad input is one line and exit 2 -------------------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["extrapolate", "--device", "bogus"], "--device 'bogus'"),
    (["extrapolate", "--eval-tokens", "0"], "--eval-tokens must be an integer >= 1"),
    (["extrapolate", "--threads", "0"], "--threads must be an integer in [1, 1024], got 0"),
])
def test_cli_bad_flags(argv, needle, capsys, tmp_path):
    one_line_error(capsys, main(argv + ["--out", str(tmp_path / "o")]), needle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda(capsys, tmp_path, saved):
    one_line_error(capsys, main(["extrapolate", "--device", "cuda", "--out", str(tmp_path / "o")]), "no CUDA device")
    one_line_error(capsys, main(["diagnose", str(saved), "--device", "cuda"]), "no CUDA device")


def test_tiny_data_fails_before_training(tmp_path, capsys):
    f = tmp_path / "tiny.txt"
    f.write_bytes(b"abc")
    one_line_error(capsys, main(["extrapolate", *STUDY, "--data", str(f), "--out", str(tmp_path / "o")]), "too little text")
    f.write_text("x" * 2000)
    one_line_error(capsys, main(["extrapolate", *STUDY, "--eval-lens", "16", "1024", "--eval-tokens", "8192",
                                  "--data", str(f),
                                  "--out", str(tmp_path / "o")]), "--eval-lens 1024 exceeds the validation split's")
    assert not (tmp_path / "o" / "models").exists()
    # the longest length fits the split once, not the 8 times an interval needs
    one_line_error(capsys, main(["extrapolate", *STUDY, "--eval-lens", "16", "32", "64", "--eval-tokens", "512",
                                 "--data", str(f), "--out", str(tmp_path / "o")]),
                   "--eval-lens 64: the validation split's 99 scoreable tokens hold 1 segment of it, fewer than the 8 "
                   "an interval needs", "; more validation text: the shortest length this takes, 16, needs 128 "
                   "scoreable tokens")  # it said "a length of at most 12": no study length (multiples of L = 16) is
    # the lengths fit the split, the tokens to score do not: refused before training, with a count that fits
    # (it used to fail after the first model trained)
    f.write_text("x" * 15000)  # 749 scoreable validation tokens: 11 segments of 64
    one_line_error(capsys, main(["extrapolate", *STUDY, "--eval-lens", "16", "32", "64", "--eval-tokens", "1024",
                                 "--data", str(f), "--out", str(tmp_path / "o")]),
                   "--eval-tokens 1,024 exceed the validation split's 749 scoreable tokens",
                   "give 704 or fewer (11 segments of 64), shorter evaluation lengths or more data")
    default = [a for a in STUDY if a not in ("--eval-tokens", "256")]  # the default: 64 segments of the longest
    one_line_error(capsys, main(["extrapolate", *default, "--eval-lens", "16", "32", "64", "--data", str(f),
                                 "--out", str(tmp_path / "o")]),
                   "--eval-tokens 4,096 (64 segments of 64 unless given) exceed the validation split's 749",
                   "give 704 or fewer (11 segments of 64)")
    # 749 tokens hold 8 segments of 93, but a study's lengths are multiples of L: 80 is the longest that fits
    one_line_error(capsys, main(["extrapolate", *STUDY, "--eval-lens", "16", "128", "--eval-tokens", "1024",
                                 "--data", str(f), "--out", str(tmp_path / "o")]),
                   "--eval-lens 128: the validation split's 749 scoreable tokens hold 5 segments of it",
                   "; a length of at most 80, or more validation text")
    assert not (tmp_path / "o" / "models").exists()


def test_retrofit_bad_batch(capsys, saved):
    one_line_error(capsys, main(["retrofit", str(saved), "--to", "64", "--method", "swap-alibi",
                                  "--finetune-batch", "0"]), "--finetune-batch must be an integer >= 1")


@pytest.mark.parametrize("command", ["plot", "extrapolate", "retrofit", "diagnose"])
@pytest.mark.parametrize("under", [False, True])
def test_out_that_is_a_file(command, under, tmp_path, capsys, saved):
    f = tmp_path / "afile"
    f.write_text("x")
    out = f / "sub" if under else f
    argv = {"plot": ["plot"], "extrapolate": ["extrapolate", *STUDY],
            "retrofit": ["retrofit", str(saved), "--to", "64", "--method", "swap-alibi"],
            "diagnose": ["diagnose", str(saved), "--passkey-steps", "0"]}[command]
    one_line_error(capsys, main(argv + ["--out", str(out)]), "is a file")
    assert f.read_text() == "x"


@pytest.mark.parametrize("kwargs, match", [
    ({"scheme": "x"}, r"unknown scheme 'x'; valid schemes: sinusoidal"),
    ({"scheme": "t5", "scheme_options": 128}, r"scheme_options must be a dict of the scheme's options, got 128"),
    ({"scheme": "t5", "backend": "fast"}, r"backend must be 'auto' or one of reference, sdpa, .*, got 'fast'"),
    ({"scheme": "t5", "n_layers": True}, r"n_layers must be a positive integer, got True"),
])
def test_model_config_refuses_bad_values_when_made(kwargs, match):
    """Found by feeding every ModelConfig field bad values: these were accepted and failed later (when
    the model was built: a TypeError from ``**``; at the first forward: the backend), or, for True, made a
    one-layer model."""
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


def test_model_config_defaults_are_the_documented_small_byte_model():
    """Left out, the fields give the model the module documents: a byte vocabulary (256), d_model 128,
    4 layers of 4 heads (head_dim 32), an MLP 4× as wide, the backend chosen per call; and the
    parameter count is that architecture's. The config is frozen."""
    cfg = ModelConfig(scheme="nope")
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.mlp_ratio, cfg.backend, cfg.head_dim) == \
        (256, 128, 4, 4, 4, "auto", 32)
    d = 128
    block = 2 * 2 * d + 3 * d * d + d * d + (d * 4 * d + 4 * d) + (4 * d * d + d)  # two LayerNorms, qkv, proj, MLP
    assert TransformerLM(cfg).num_parameters() == 256 * d + 4 * block + 2 * d + d * 256
    with pytest.raises(AttributeError, match="cannot assign to field 'd_model'"):  # frozen: a model's config is its key
        cfg.d_model = 64


def test_the_initialisation_the_model_documents():
    """Embeddings drawn with std 0.02; for T5 (unscaled logits) the query rows of every block's qkv
    start 1/√head_dim smaller than the same draw for a scaled scheme (Raffel et al. fold the attention
    scale into the initialisation), the key and value rows unchanged."""
    torch.manual_seed(0)
    t5 = TransformerLM(ModelConfig(scheme="t5"))
    torch.manual_seed(0)
    nope = TransformerLM(ModelConfig(scheme="nope"))
    assert float(t5.embed.weight.detach().std()) == pytest.approx(0.02, rel=0.03)  # 32,768 draws: std known to 0.4%
    for a, b in zip(t5.blocks, nope.blocks):
        torch.testing.assert_close(a.attn.qkv.weight[:128], b.attn.qkv.weight[:128] / math.sqrt(32), rtol=1e-6, atol=0)
        assert torch.equal(a.attn.qkv.weight[128:], b.attn.qkv.weight[128:])


@pytest.mark.parametrize("scheme", ["sinusoidal", "t5"])
def test_the_model_is_the_pre_norm_stack_its_docstring_writes_out(scheme):
    """The forward written out from the model's own parts: token embedding plus the absolute vectors
    (sinusoidal only), then per block ``x + proj(attention(ln1(x)))`` and ``x + mlp(ln2(x))`` with the
    reference attention, then the head on ``ln_f``; from position 5, two sequences."""
    model = TransformerLM(ModelConfig(scheme=scheme, d_model=32, n_layers=2, n_heads=2))
    perturb_(model.scheme)
    idx, pos = torch.randint(0, 256, (2, 12)), torch.arange(5, 17)
    x = model.embed(idx)
    if scheme == "sinusoidal":
        x = x + model.scheme.embed(pos, 32)
    for block in model.blocks:
        x = block_written_out(block, x, model.scheme, pos, pos)
    torch.testing.assert_close(model(idx, start=5), model.head(model.ln_f(x)), atol=1e-5, rtol=1e-5)


# -- a full disk --------------------------------------------------------------------------------
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_leaves_every_result_as_it_was(tmp_path, monkeypatch):
    """A write that fails (a full disk) keeps what the target held, leaves no temporary behind and names
    the target: results through ``store.write_text``, checkpoints (an ``OSError`` naming the file, where
    safetensors' writer raised an error type of its own without it, and torch.save a RuntimeError) and
    pictures (``plot.save_figure``, which wrote in place: a truncated PNG)."""
    from posbias import plot, store

    target = store.write_text(tmp_path / "results.md", "old")
    real = os.fsync
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", _enospc)
        with pytest.raises(OSError, match="No space left on device") as err:
            store.write_text(target, "new")
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(target)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["results.md"]

    model = TransformerLM(ModelConfig(scheme="t5", **TINY))
    where = ckpt.save_checkpoint(tmp_path / "ck" / "last", model, trainer_state={"step": 1})
    before = {f.name: f.read_bytes() for f in where.iterdir()}
    for failing in (ckpt.MODEL_FILE, ckpt.CONFIG_FILE, ckpt.TRAINER_FILE):
        calls = iter(range(10))
        order = [ckpt.MODEL_FILE, ckpt.CONFIG_FILE, ckpt.TRAINER_FILE]
        with monkeypatch.context() as m:  # fsync fails on the file ``failing``: the files go in this order
            m.setattr(os, "fsync", lambda fd: _enospc() if order[next(calls)] == failing else real(fd))
            with pytest.raises(OSError) as err:
                ckpt.save_checkpoint(where, model, trainer_state={"step": 2})
        assert err.value.errno == errno.ENOSPC and err.value.filename == str(where / failing)
        assert {f.name: f.read_bytes() for f in where.iterdir()} == before  # the previous checkpoint, whole
        assert sorted(os.listdir(tmp_path / "ck")) == ["last"]  # no last.tmp
    assert ckpt.load_trainer_state(where)["step"] == 1

    plt = plot.pyplot()
    fig = plt.figure()
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", _enospc)
        with pytest.raises(OSError, match="No space left on device"):
            plot.save_figure(fig, tmp_path / "pics" / "a.png")
    assert os.listdir(tmp_path / "pics") == [] and not plt.get_fignums()  # no file, and the figure closed


def test_a_checkpoint_swap_is_durable_before_the_previous_one_is_removed(tmp_path, monkeypatch):
    """A file's fsync does not write the folder entry naming it: the new folder is synced before it is
    swapped in, and the parent after the swap, before the previous checkpoint is removed (else a power
    loss could leave neither)."""
    from posbias import store

    model = TransformerLM(ModelConfig(scheme="alibi", **TINY))
    where = ckpt.save_checkpoint(tmp_path / "ck" / "last", model)
    events = []
    rename, rmtree = Path.rename, shutil.rmtree
    monkeypatch.setattr(store, "fsync_dir", lambda p: events.append(("fsync", Path(p).name)))
    monkeypatch.setattr(Path, "rename", lambda self, to: (events.append(("rename", self.name, Path(to).name)),
                                                          rename(self, to))[1])
    monkeypatch.setattr(shutil, "rmtree", lambda p, **kw: (events.append(("rmtree", Path(p).name)),
                                                           rmtree(p, **kw))[1])
    ckpt.save_checkpoint(where, model)
    assert events == [("rmtree", "last.tmp"), ("fsync", "last.tmp"), ("rmtree", "last.old"),
                      ("rename", "last", "last.old"), ("rename", "last.tmp", "last"), ("fsync", "ck"),
                      ("rmtree", "last.old")]
    assert sorted(os.listdir(tmp_path / "ck")) == ["last"] and ckpt.load_model(where) is not None


def test_a_full_disk_is_one_line_that_says_what_to_do(capsys, monkeypatch):
    """The CLI turns an ``OSError`` into one line naming the file (status 1, no traceback), and where the
    space ran out says that finished work is kept and a re-run resumes; a progress bar the error cut short
    is cleared first, so the message starts a line."""
    from tqdm.auto import tqdm

    import posbias.cli as cli

    def fill(args):
        bar = tqdm(total=10, leave=False)
        bar.update(3)
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/last/model.safetensors")

    assert _extrapolate_running(fill, monkeypatch) == 1
    err = capsys.readouterr().err
    last = err.split("\r")[-1].strip()  # what the terminal shows on the last line
    assert last == ("posbias extrapolate: error: '/runs/x/last/model.safetensors': No space left on device; what "
                    "was finished is kept: free some space and re-run to resume"), err
    assert "Traceback" not in err and err.endswith("resume\n") and "\n" not in err.rstrip("\n").split("\r")[-1]
    assert not getattr(tqdm, "_instances", ())
    assert cli._os_problem(PermissionError(errno.EACCES, "Permission denied", "/ro/x")) == "'/ro/x': Permission denied"


def test_out_of_memory_is_one_line_and_other_runtime_errors_stay_whole(capsys, monkeypatch):
    """A failed allocation (torch's CPU message, CUDA's OutOfMemoryError, Python's MemoryError) is one line
    saying what was asked and what to do, status 1; any other RuntimeError is a bug and keeps its traceback."""
    try:
        torch.empty(2**50, dtype=torch.uint8)  # 1 PiB: refused at once, nothing allocated
    except RuntimeError as exc:
        cpu = exc
    cases = [(cpu, "out of memory (an allocation of 1.05e+06 GiB); what was finished is kept"),
             (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "out of memory; what"),
             (MemoryError(), "out of memory; what")]
    for exc, said in cases:
        assert _extrapolate_running(lambda args, exc=exc: _raise(exc), monkeypatch) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"posbias extrapolate: error: {said}") and err.count("\n") == 1, err
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError, match="a bug"):
        _extrapolate_running(lambda args: _raise(RuntimeError("a bug")), monkeypatch)
    assert signal.getsignal(signal.SIGTERM) is handler  # main's SIGTERM handler is its own, for its duration


def _raise(exc):
    raise exc


def _extrapolate_running(command, monkeypatch) -> int:
    """``posbias extrapolate``'s exit status with its work replaced by ``command(args)``."""
    import posbias.cli as cli

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(cli, "_check_common", lambda args: None)
    monkeypatch.setattr(parser, "parse_known_args", lambda argv: (types.SimpleNamespace(func=command), []))
    return cli.main(["extrapolate"])


def test_a_study_that_runs_out_of_room_says_so_and_resumes(tmp_path, text_file):
    """End to end, in a process whose files may not grow past 16 KB (``RLIMIT_FSIZE``: ``EFBIG`` where a
    disk would say ``ENOSPC``): the first checkpoint fails, the study stops with one line naming it and
    leaves no ``last.tmp``; the same command without the limit then finishes."""
    resource = pytest.importorskip("resource")

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, resource.RLIM_INFINITY))

    argv = _study(tmp_path / "run", text_file, "--schemes", "t5")
    run = subprocess.run(argv, env=ENV, capture_output=True, text=True, preexec_fn=limited)
    err = run.stderr.strip()
    assert run.returncode == 1 and "Traceback" not in err and "\n" not in err, err
    assert err.startswith("posbias extrapolate: error: '") and "model.safetensors': File too large" in err, err
    assert not list((tmp_path / "run").rglob("*.tmp")), list((tmp_path / "run").rglob("*"))
    done = subprocess.run(argv, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "results.md").exists()


# -- processes: kills, concurrency, closed stdout -----------------------------------------------
KILL_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from posbias.data import local_corpus
from posbias.model import ModelConfig
from posbias.train import TrainConfig, train
c = local_corpus(sys.argv[2])
import torch._dynamo  # imported by the optimizer's constructor (~2 s); done here so the kill lands in training
print("training", flush=True)  # the parent times its kill from here, past imports and data loading
train(ModelConfig(scheme="t5", d_model=32, n_layers=2, n_heads=2),
      TrainConfig(steps=300, batch_size=4, train_len=32, warmup=2, eval_every=0, ckpt_every=1, eval_batches=1),
      c.train, c.val, sys.argv[1], progress=False)
"""


@pytest.mark.slow
def test_sigkill_at_random_points_resumes_bit_identically(tmp_path, text_file):
    script = tmp_path / "train.py"
    script.write_text(KILL_SCRIPT)
    subprocess.run([sys.executable, str(script), str(tmp_path / "solo"), str(text_file)], check=True, env=ENV)
    rng = random.Random(1234)
    kills = 0
    for _ in range(4):
        # Killed at a random point after training started (by the child's word, not by a guess at how
        # long imports take, which made the test depend on the machine's speed): mid-step or mid-save.
        p = subprocess.Popen([sys.executable, str(script), str(tmp_path / "killed"), str(text_file)], env=ENV,
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "training"
        time.sleep(rng.uniform(0.2, 0.8))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
        p.stdout.close()
    assert kills >= 3
    saved = ckpt.load_trainer_state(tmp_path / "killed" / "last")
    assert saved is not None and 0 < saved["step"] < 300  # the last run below resumes mid-way
    subprocess.run([sys.executable, str(script), str(tmp_path / "killed"), str(text_file)], check=True, env=ENV)
    a = load_file(str(tmp_path / "solo" / "final" / ckpt.MODEL_FILE))
    b = load_file(str(tmp_path / "killed" / "final" / ckpt.MODEL_FILE))
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


def _study(out, text_file, *extra):
    return [*POSBIAS, "extrapolate", "--schemes", "t5", "alibi", *STUDY, "--steps", "30", "--data", str(text_file),
            "--out", str(out), *extra]


@pytest.mark.slow
def test_two_runs_in_one_folder_share_the_models_and_a_retrofit_there_refuses(tmp_path, text_file):
    """Two processes run the same study into one folder while a third holds t5's lock: both pass over
    t5, share the other models (each trained once, by one of them) and wait for t5; a retrofit into
    the folder meanwhile refuses with one line. Once t5 is free one of them makes it and the other
    reuses it; both write the full report, equal to a run alone."""
    from posbias import store
    from posbias.cli import build_parser, study_config
    from posbias.data import local_corpus
    from posbias.study import arms, model_dir, model_key

    out = tmp_path / "run"
    argv = _study(out, text_file, "--schemes", "t5", "alibi", "nope", "offset")
    cfg = study_config(build_parser().parse_args(argv[3:]))
    t5 = arms(cfg)[0]
    lock = model_dir(out, t5, 0, model_key(cfg, t5, 0, local_corpus(text_file))) / ".lock"
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    with store.item_lock(lock, wait=False) as held, open(logs[0], "w") as a, open(logs[1], "w") as b:
        assert held
        runs = [subprocess.Popen(argv, env=ENV, stdout=f, stderr=subprocess.STDOUT) for f in (a, b)]
        deadline = time.time() + 300
        while not all("waiting for the run making this model" in f.read_text() for f in logs):
            assert time.time() < deadline and all(r.poll() is None for r in runs), [f.read_text() for f in logs]
            time.sleep(0.1)
        model = TransformerLM(ModelConfig(scheme="rope", **TINY))
        ckpt.save_checkpoint(tmp_path / "src", model, extra={"train": {"seq_len": 16}})
        retro = subprocess.run([*POSBIAS, "retrofit", str(tmp_path / "src"), "--to", "32", "--method", "pi", "--out",
                                str(out), "--data", str(text_file), "--quiet"], env=ENV, capture_output=True, text=True)
    assert [r.wait(300) for r in runs] == [0, 0], [f.read_text() for f in logs]
    assert retro.returncode == 2 and "in use by posbias pid" in retro.stderr and "(a study" in retro.stderr
    assert "\n" not in retro.stderr.strip() and "Traceback" not in retro.stderr
    said = [f.read_text() for f in logs]
    assert all("[1/4 t5 seed 0] another run is making this model" in x for x in said)
    assert sum(x.count("training 30 steps") for x in said) == 4, said  # each model once, by one run or the other
    assert sum(x.count("reusing the model trained") for x in said) == 4, said
    records = json.loads((out / "results.json").read_text())["records"]
    solo = tmp_path / "solo"
    subprocess.run(_study(solo, text_file, "--schemes", "t5", "alibi", "nope", "offset"), env=ENV, check=True,
                   capture_output=True)
    alone = json.loads((solo / "results.json").read_text())["records"]
    assert [(r["label"], r["loss"]) for r in records] == [(r["label"], r["loss"]) for r in alone] and len(alone) == 8


@pytest.mark.slow
def test_an_interruption_is_held_to_the_end_of_the_step(python_sigint):
    """``stopping.between_steps`` holds the first SIGINT (Python's KeyboardInterrupt) and a SIGTERM that
    raises (``raise_terminated``, the CLI's) until the loop asks; a second signal raises at once; a SIGTERM
    with the system's action, or any signal outside the main thread, is not touched; the handlers come
    back after."""
    from posbias import stopping

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with stopping.between_steps() as held:
        os.kill(os.getpid(), signal.SIGINT)
        assert held.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # asked twice: at once
        with pytest.raises(KeyboardInterrupt):
            held.stop()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the system's action: not held
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    previous = signal.signal(signal.SIGTERM, stopping.raise_terminated)
    try:
        with stopping.between_steps() as held:
            os.kill(os.getpid(), signal.SIGTERM)
            with pytest.raises(stopping.Terminated):
                held.stop()
        with stopping.between_steps() as held:
            assert not held.requested
            held.stop()  # nothing held: nothing raised
            with pytest.raises(KeyboardInterrupt, match="stopped with the other processes"):
                held.stop(agreed=True)  # another process was interrupted: this one stops with it
        seen = []

        def elsewhere():  # outside the main thread nothing is held (Python runs handlers in the main one)
            with stopping.between_steps() as other:
                seen.append((other.handlers, other.requested))

        worker = threading.Thread(target=elsewhere)
        worker.start()
        worker.join()
        assert seen == [({}, False)]
        assert signal.getsignal(signal.SIGTERM) is stopping.raise_terminated
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_ctrl_c_during_training_saves_that_step_and_resumes_bit_identically(tmp_path, text_file, monkeypatch,
                                                                              python_sigint):
    """Ctrl-C mid-step (sent here as step 37's batch is drawn, far from the checkpoints every 100 steps)
    ends the step, saves it and raises; the run resumes from step 38 to the weights of one never stopped."""
    import posbias.train as training
    from posbias.data import local_corpus

    c = local_corpus(text_file)
    mcfg, tcfg = ModelConfig(scheme="t5", **TINY), TrainConfig(steps=60, batch_size=4, train_len=16, eval_every=0,
                                                               ckpt_every=100, eval_batches=1)
    train(mcfg, tcfg, c.train, c.val, tmp_path / "solo", progress=False)
    real = training.batch_at

    def interrupting(tokens, step, **kw):
        if step == 37:
            os.kill(os.getpid(), signal.SIGINT)
        return real(tokens, step, **kw)

    monkeypatch.setattr(training, "batch_at", interrupting)
    said = []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(mcfg, tcfg, c.train, c.val, tmp_path / "stopped", progress=False, log=said.append)
    assert said == [f"t5: stopped after step 38 of 60, saved in {str(tmp_path / 'stopped' / 'last')!r}"]
    assert ckpt.load_trainer_state(tmp_path / "stopped" / "last")["step"] == 38
    assert not (tmp_path / "stopped" / "final").exists()
    monkeypatch.setattr(training, "batch_at", real)
    said.clear()
    train(mcfg, tcfg, c.train, c.val, tmp_path / "stopped", progress=False, log=said.append)
    assert said[0].startswith("t5: resuming from step 38 of 60")
    a = load_file(str(tmp_path / "solo" / "final" / ckpt.MODEL_FILE))
    b = load_file(str(tmp_path / "stopped" / "final" / ckpt.MODEL_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_sigterm_stops_with_one_line_and_the_rerun_resumes(tmp_path, text_file):
    """A scheduler preempting the job (SIGTERM) stops it the way Ctrl-C does: one line, status 143, no
    traceback, no temporary left (it used to die at once, silently); the same command then resumes from
    the last checkpoint and finishes."""
    argv = _study(tmp_path / "run", text_file, "--schemes", "t5", "--steps", "600")
    p = subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while "training 600 steps" not in p.stdout.readline():
        assert p.poll() is None, p.stderr.read()
    deadline = time.time() + 120
    while not list((tmp_path / "run").glob("models/*/last/config.json")):  # the first checkpoint (step 100)
        assert time.time() < deadline and p.poll() is None, p.stderr.read() if p.poll() is not None else "slow"
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == ("posbias extrapolate: terminated (SIGTERM; finished work is saved; re-run "
                                            "to resume)") and "Traceback" not in err, err
    assert not list((tmp_path / "run").rglob("*.tmp"))
    again = subprocess.run(argv, env=ENV, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "resuming from step" in again.stdout + again.stderr and (tmp_path / "run" / "results.md").exists()


def test_closed_stdout_does_not_stop_the_job(tmp_path, text_file):
    """`posbias extrapolate … | head -1`: the job still writes every result file."""
    out = tmp_path / "run"
    p = subprocess.Popen(_study(out, text_file), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.readline()
    p.stdout.close()  # what `head -1` does after its line
    err = p.stderr.read().decode()
    p.stderr.close()
    assert p.wait() == 0, err
    assert "Traceback" not in err
    for name in ("results.json", "results.md", "ppl_vs_length.png"):
        assert (out / name).exists(), name


# -- the dynamic-NTK claim ------------------------------------------------------------------------
@pytest.mark.parametrize("layers, equal", [(1, True), (2, False)])
def test_dynamic_ntk_decoding_claim(layers, equal):
    """What the RoPE docstring says: cached decoding equals a full forward for one layer, not for
    more (the cache holds keys made at shorter contexts, with other frequencies)."""
    cfg = ModelConfig(scheme="rope", scheme_options={"scaling": "dynamic-ntk", "factor": 4.0, "train_len": 8},
                      d_model=32, n_layers=layers, n_heads=2)
    model = TransformerLM(cfg).eval()
    idx = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        full = model(idx)[:, -1]
        caches = [{} for _ in model.blocks]
        model(idx[:, :20], caches=caches)
        for t in range(20, 40):
            last = model(idx[:, t:t + 1], start=t, caches=caches)[:, -1]
    diff = float((full - last).abs().max())
    assert (diff < 1e-4) if equal else (diff > 1e-4), diff


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_preset_on_a_cpu_machine_says_how_to_override(capsys, tmp_path):
    one_line_error(capsys, main(["extrapolate", "--preset", "gpu", "--out", str(tmp_path / "o")]),
                    "--preset gpu asks for --device cuda", "add --device cpu")


def test_model_folder_suggests_final(capsys, tmp_path):
    model = TransformerLM(ModelConfig(scheme="alibi", **TINY))
    ckpt.save_checkpoint(tmp_path / "m" / "final", model, extra={"train": {"seq_len": 16}})
    one_line_error(capsys, main(["retrofit", str(tmp_path / "m"), "--to", "64", "--method", "swap-alibi"]),
                    "did you mean", "final")


def test_a_study_folder_given_for_one_checkpoint_names_its_models(capsys, tmp_path):
    """``retrofit`` takes one checkpoint: given a study's folder (or its ``models/``), its error names the
    models' checkpoints, all up to four, else three and how many more; a folder with none names none."""
    model = TransformerLM(ModelConfig(scheme="alibi", **TINY))
    names = [f"alibi-seed{k}-0123456789" for k in range(5)]
    for n in names:
        ckpt.save_checkpoint(tmp_path / "study" / "models" / n / "final", model, extra={"train": {"seq_len": 16}})
    finals = [repr(str(tmp_path / "study" / "models" / n / "final")) for n in names]
    for given in (tmp_path / "study", tmp_path / "study" / "models"):
        err = one_line_error(capsys, main(["retrofit", str(given), "--to", "64", "--method", "swap-alibi"]))
        assert err.endswith(f"is not a posbias checkpoint (no config.json with a model config); it holds 5 models: "
                            f"{', '.join(finals[:3])} and 2 more"), err
    shutil.rmtree(tmp_path / "study" / "models" / names[0])
    err = one_line_error(capsys, main(["retrofit", str(tmp_path / "study"), "--to", "64", "--method", "swap-alibi"]))
    assert err.endswith(f"it holds 4 models: {', '.join(finals[1:])}"), err
    for n in names[2:4]:
        shutil.rmtree(tmp_path / "study" / "models" / n)
    err = one_line_error(capsys, main(["retrofit", str(tmp_path / "study"), "--to", "64", "--method", "swap-alibi"]))
    assert err.endswith(f"it holds 2 models: {finals[1]}, {finals[4]}"), err
    shutil.rmtree(tmp_path / "study" / "models" / names[4])
    err = one_line_error(capsys, main(["retrofit", str(tmp_path / "study"), "--to", "64", "--method", "swap-alibi"]))
    assert err.endswith(f"it holds a model: {finals[1]}"), err
    err = one_line_error(capsys, main(["retrofit", str(tmp_path), "--to", "64", "--method", "swap-alibi"]))
    assert err.endswith("(no config.json with a model config)"), err


def test_a_resume_after_one_step_says_so_and_validation_reads_its_own_batches(tmp_path, text_file, monkeypatch,
                                                                                  python_sigint):
    """Stopped after its first step, a run resumes from step 1 and says so (a fresh start says nothing);
    its validation loss is the mean of the final model's losses on validation batches ``10⁹ + n`` for
    ``n < eval_batches``, drawn from the validation split with the run's seed, apart from every training
    batch's index, and said through ``log``. The last step is saved where the checkpoint interval does
    not divide the steps; a run interrupted with no ``log`` stops as asked (nothing to say it through)."""
    import posbias.train as training
    from posbias.data import batch_at, local_corpus

    c = local_corpus(text_file)
    mcfg = ModelConfig(scheme="alibi", **TINY)
    tcfg = quick_training(steps=2, ckpt_every=1, eval_batches=2, seed=3)
    said = []
    train(mcfg, tcfg, c.train, c.val, tmp_path, progress=False, log=said.append, stop_after=1)
    assert said == []
    hist = train(mcfg, tcfg, c.train, c.val, tmp_path, progress=False, log=said.append)
    assert said[0] == f"alibi: resuming from step 1 of 2 ({str(tmp_path / 'last')!r})"
    model = ckpt.load_model(tmp_path / "final")
    with torch.no_grad():
        want = torch.stack([model.loss(*batch_at(c.val, 10**9 + n, batch_size=2, seq_len=16, seed=3))
                            for n in range(2)]).mean()
    assert [s for s, _ in hist["val_loss"]] == [2] and hist["val_loss"][0][1] == pytest.approx(float(want), rel=1e-6)
    assert said[1:] == [f"alibi step 2: val loss {hist['val_loss'][0][1]:.4f}"]
    odd = dataclasses.replace(tcfg, steps=3, ckpt_every=2)
    train(mcfg, odd, c.train, c.val, tmp_path / "odd", progress=False)
    assert ckpt.load_trainer_state(tmp_path / "odd" / "last")["step"] == 3  # off the interval, the end is saved

    def interrupting(tokens, step, **kw):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return batch_at(tokens, step, **kw)

    monkeypatch.setattr(training, "batch_at", interrupting)
    with pytest.raises(KeyboardInterrupt):
        train(mcfg, odd, c.train, c.val, tmp_path / "stopped", progress=False)
    assert ckpt.load_trainer_state(tmp_path / "stopped" / "last")["step"] == 2


def test_resume_says_where_it_resumes(tmp_path, text_file):
    """A resumed training says where it resumes and goes on with the history so far (losses, tokens,
    validation every ``eval_every`` steps, the training time, not the time resuming took); each group
    stepped at the schedule × its multiplier; a finished one says nothing."""
    from posbias.data import local_corpus

    c = local_corpus(text_file)
    mcfg = ModelConfig(scheme="t5", **TINY)
    tcfg = quick_training(steps=6, eval_every=2, ckpt_every=2, lr=1e-3, pos_lr_mult=4.0)
    t0 = time.perf_counter()
    first = train(mcfg, tcfg, c.train, c.val, tmp_path, progress=False, stop_after=4)
    took = time.perf_counter() - t0
    saved = ckpt.load_trainer_state(tmp_path / "last")["optimizer"]["param_groups"]
    assert [g["lr"] for g in saved] == pytest.approx([tcfg.lr_at(3), tcfg.lr_at(3), 4 * tcfg.lr_at(3)])  # step 4's
    assert len(first["train_loss"]) == 4 and first["tokens"] == 4 * 2 * 16 and [s for s, _ in first["val_loss"]] == [2, 4]
    assert 0 < first["wall_s"] <= took
    wall, losses = first["wall_s"], list(first["train_loss"])
    said = []
    done = train(mcfg, tcfg, c.train, c.val, tmp_path, progress=False, log=said.append)
    assert any("resuming from step 4 of 6" in s for s in said), said
    assert done["train_loss"][:4] == losses and len(done["train_loss"]) == 6 and done["tokens"] == 6 * 2 * 16
    assert [s for s, _ in done["val_loss"]] == [2, 4, 6] and done["wall_s"] > wall
    assert ckpt.read_meta(tmp_path / "final")["history"] == json.loads(json.dumps(done))
    said.clear()
    train(mcfg, tcfg, c.train, c.val, tmp_path, progress=False, log=said.append)  # finished: nothing to resume
    assert said == []
