"""The study stack: data determinism, training/resume, evaluation, the extrapolate command, errors."""

import dataclasses
import functools
import json
import math
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _helpers import TINY, block_written_out, figures_drawn, main_timed, perturb_, random_options

from posbias import checkpoint as ckpt
from posbias import store
from posbias.cli import _mib, main
from posbias.data import batch_at, local_corpus, stdlib_corpus
from posbias.evaluate import evaluate_length
from posbias.model import ModelConfig, TransformerLM
from posbias.train import TrainConfig, train



@pytest.fixture(scope="module")
def corpus():
    return stdlib_corpus()


def test_stdlib_split_is_deterministic_and_fingerprinted(corpus):
    again = stdlib_corpus()
    assert corpus.fingerprint == again.fingerprint
    assert torch.equal(corpus.val, again.val)
    fp = corpus.fingerprint
    assert fp["files"] > 100 and fp["train_bytes"] > fp["val_bytes"] > 0 and len(fp["sha256"]) == 16


def test_batches_depend_only_on_seed_and_step(corpus):
    a = batch_at(corpus.train, 7, batch_size=4, seq_len=16, seed=1)
    b = batch_at(corpus.train, 7, batch_size=4, seq_len=16, seed=1)
    c = batch_at(corpus.train, 8, batch_size=4, seq_len=16, seed=1)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    assert torch.equal(a[0][:, 1:], a[1][:, :-1])


def test_local_corpus_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        local_corpus(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        local_corpus(tmp_path / "empty.txt")


@pytest.mark.parametrize("scheme", ["t5", "rope", "sinusoidal", "fire", "alibi", "kerple-log"])
def test_kv_cache_decoding_equals_full_forward(scheme):
    """Prefill, then steps of one token and chunks of several: the cache's buffers grow twice on the
    way (room for 256 more tokens, then half as many again), and the outputs equal the full forward."""
    model = TransformerLM(ModelConfig(scheme=scheme, **TINY)).eval()
    idx = torch.randint(0, 256, (1, 600))
    cuts = [0, 20, *range(21, 31), 40, 276, 277, 290, 533, 534, 600]  # room: 20 + 256, 277 + 256, 534 + 267
    with torch.no_grad():
        full = model(idx)
        caches = [{} for _ in model.blocks]
        steps = [model(idx[:, a:b], start=a, caches=caches) for a, b in zip(cuts, cuts[1:])]
    assert caches[0]["k"].shape[2] == 534 + 267
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)


def test_kv_cache_keeps_room_when_no_gradient_is_wanted_with_autograd_on():
    """A frozen model decoding with autograd on (no ``torch.no_grad``): no step can need a gradient, so
    the cache writes into buffers with room to grow, as under ``no_grad``, instead of concatenating."""
    model = TransformerLM(ModelConfig(scheme="t5", **TINY)).eval().requires_grad_(False)
    idx = torch.randint(0, 256, (1, 30))
    caches = [{} for _ in model.blocks]
    steps = torch.cat([model(idx[:, a:b], start=a, caches=caches) for a, b in [(0, 20), (20, 21), (21, 30)]], 1)
    assert caches[0]["k"].shape[2] == 20 + 256 and caches[0]["len"] == 30
    with torch.no_grad():
        torch.testing.assert_close(steps, model(idx), atol=1e-4, rtol=1e-4)


def test_kv_cache_positions_that_jump_are_not_read_as_one_run():
    """A chunk at position 50 after 10 cached tokens at 0 … 9: the cache's keys sit at 0 … 9 and 50 … 59,
    no run, and the step attends to them there (its T5 bias written out with those positions)."""
    model = TransformerLM(ModelConfig(scheme="t5", d_model=32, n_layers=1, n_heads=2)).eval()
    perturb_(model.scheme)
    idx = torch.randint(0, 256, (1, 20))
    caches = [{}]
    with torch.no_grad():
        model(idx[:, :10], caches=caches)
        got = model(idx[:, 10:], start=50, caches=caches)
        k_pos = torch.cat([torch.arange(10), torch.arange(50, 60)])
        h = block_written_out(model.blocks[0], model.embed(idx), model.scheme, torch.arange(50, 60), k_pos, rows=10)
        want = model.head(model.ln_f(h))
    assert caches[0]["start"] is None
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", [pytest.param(s, id=f"case_{s}") for s in range(24)])
def test_kv_cache_decoding_in_random_chunks(seed):
    """Random causal schemes and options, 1–2 layers and sequences, 5–700 tokens from position 0 or
    100, cut into 1–10 random chunks decoded through the cache: equal to the full forward."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    name = rng.choice(["t5", "offset", "alibi", "kerple-log", "kerple-power", "fire", "rope", "nope", "sinusoidal"])
    options = {**random_options(rng, name), **({"bidirectional": False} if name in ("t5", "offset") else {})}
    model = TransformerLM(ModelConfig(scheme=name, scheme_options=options, d_model=32, n_layers=rng.choice([1, 2]),
                                      n_heads=2)).eval()
    perturb_(model.scheme)
    n, start = rng.choice([5, 50, 300, 700]), rng.choice([0, 0, 100])
    idx = torch.randint(0, 256, (rng.choice([1, 2]), n))
    cuts = sorted({0, n, *(rng.randrange(1, n) for _ in range(rng.choice([1, 3, 10])))})
    with torch.no_grad():
        full = model(idx, start=start)
        caches = [{} for _ in model.blocks]
        steps = torch.cat([model(idx[:, a:b], start=start + a, caches=caches) for a, b in zip(cuts, cuts[1:])], 1)
    torch.testing.assert_close(steps, full, atol=1e-4 * max(1.0, float(full.abs().max())), rtol=0,
                               msg=lambda m: f"{name} {options} cuts {cuts} start {start}: {m}")


@pytest.mark.parametrize("scheme", ["t5", "rope", "nope"])
def test_kv_cache_decoding_with_gradients_matches_the_full_forward(scheme):
    """Cached steps with autograd on (no in-place writes into tensors an earlier step saved): the
    gradient of the steps' outputs equals that of the full forward; then steps without gradients
    grow the same cache."""
    model = TransformerLM(ModelConfig(scheme=scheme, **TINY))
    idx = torch.randint(0, 256, (1, 40))
    g = torch.randn(1, 30, 256)
    full = model(idx[:, :30])
    want = torch.autograd.grad((full * g).sum(), list(model.parameters()))
    caches = [{} for _ in model.blocks]
    steps = torch.cat([model(idx[:, a:b], start=a, caches=caches) for a, b in [(0, 20), (20, 21), (21, 30)]], 1)
    got = torch.autograd.grad((steps * g).sum(), list(model.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4 * float(b.abs().max()) + 1e-6, rtol=1e-3)
    with torch.no_grad():
        more = model(idx[:, 30:40], start=30, caches=caches)
        torch.testing.assert_close(more, model(idx)[:, 30:], atol=1e-4, rtol=1e-4)


def test_interrupted_training_resumes_to_the_same_result(corpus, tmp_path):
    mcfg = ModelConfig(scheme="alibi", **TINY)
    tcfg = TrainConfig(steps=6, batch_size=4, train_len=32, warmup=2, eval_every=3, ckpt_every=2, eval_batches=1)
    train(mcfg, tcfg, corpus.train, corpus.val, tmp_path / "a", progress=False)
    train(mcfg, tcfg, corpus.train, corpus.val, tmp_path / "b", progress=False, stop_after=4)  # "killed"
    assert ckpt.exists(tmp_path / "b" / "last") and not ckpt.exists(tmp_path / "b" / "final")
    hist = train(mcfg, tcfg, corpus.train, corpus.val, tmp_path / "b", progress=False)
    a, b = ckpt.load_model(tmp_path / "a" / "final"), ckpt.load_model(tmp_path / "b" / "final")
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, msg=n)
    assert len(hist["train_loss"]) == 6
    r = evaluate_length(a, corpus.val, 64, max_tokens=256)
    assert r["ppl"] > 1 and len(r["loss_by_position"]) == 64


def test_checkpoint_written_atomically_survives_a_crash_between_renames(tmp_path):
    model = TransformerLM(ModelConfig(scheme="t5", **TINY))
    ckpt.save_checkpoint(tmp_path / "c", model)
    (tmp_path / "c").rename(tmp_path / "c.old")  # the state after the first rename of a replacement
    assert ckpt.exists(tmp_path / "c")
    ckpt.load_model(tmp_path / "c")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="is not a posbias checkpoint"):
        ckpt.load_model(tmp_path)


def test_sliding_window_evaluation(corpus):
    model = TransformerLM(ModelConfig(scheme="alibi", **TINY))
    full = evaluate_length(model, corpus.val, 32, max_tokens=200)
    slide = evaluate_length(model, corpus.val, 32, max_tokens=200, stride=8)
    assert slide["tokens"] >= full["tokens"] - 32 and slide["stride"] == 8
    assert evaluate_length(model, corpus.val, 32, max_tokens=40, stride=1)["tokens"] == 40  # 9 windows: 32 + 8 · 1
    for r in (full, slide):  # bits per byte: nats per byte-token over ln 2
        assert r["ppl"] == math.exp(r["loss"]) and r["bpb"] == pytest.approx(r["loss"] / math.log(2), rel=1e-15)
    with pytest.raises(ValueError, match="stride must be in"):
        evaluate_length(model, corpus.val, 32, stride=0)
    with pytest.raises(ValueError, match="evaluation lengths must be integers >= 1, got 0"):
        evaluate_length(model, corpus.val, 0)
    # max_tokens left out: evaluate.SEGMENTS windows (or segments of span, or sliding windows' tokens)
    assert len(evaluate_length(model, corpus.val, 16)["window_loss"]) == 64
    assert len(evaluate_length(model, corpus.val, 16, span=32)["window_loss"]) == 128
    assert evaluate_length(model, corpus.val, 16, stride=16)["tokens"] == 64 * 16
    # a count past the split is refused (it was scored as what fitted); the default is cut to what fits
    short = corpus.val[:16 * 20 + 1]
    with pytest.raises(ValueError, match=r"max_tokens=321 exceeds the split's 320 scoreable tokens; give at most 320"):
        evaluate_length(model, short, 16, max_tokens=321)
    assert evaluate_length(model, short, 16, max_tokens=320)["tokens"] == 320
    assert evaluate_length(model, short, 16)["tokens"] == 320  # 20 of the default's 64 windows


@pytest.mark.parametrize("argv, msg", [
    (["extrapolate", "--schemes", "bogus"], "unknown scheme 'bogus'"),
    (["extrapolate", "--eval-lens", "0"], "--eval-lens must be an integer >= 1, got 0"),
    (["extrapolate", "--data", "/nonexistent/file.txt", "--steps", "1"], "does not exist"),
    (["extrapolate", "--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["extrapolate", "--eval-tokens", "0"], "--eval-tokens must be an integer >= 1, got 0"),
    (["extrapolate", "--train-len", "64", "--eval-lens", "128", "256"], "must include the training length 64"),
    (["extrapolate", "--train-len", "64", "--eval-lens", "64", "96", "256"], "evaluation length 96 must divide"),
    (["extrapolate", "--scheme-option", "t5.max_distance=far"], "max_distance must be an integer (scheme 't5'), got 'far'"),
    (["extrapolate", "--scheme-option", "t5.bogus=3"], "scheme 't5' has no option bogus"),
    (["extrapolate", "--scheme-option", "max_distance=3"], "must look like SCHEME.KEY=VALUE"),
    (["extrapolate", "--scheme-option", "t5.bidirectional=maybe"], "bidirectional must be true/false"),
    (["extrapolate", "--schemes", "t5@max_distance=17", "t5@max_distance=17"], "listed twice"),
    # two labels of one model (an option at its default, or at the study's default for L): trained twice and
    # reported as two schemes "not distinguishable" from each other
    (["extrapolate", "--preset", "demo", "--schemes", "t5", "t5@max_distance=17"],
     "schemes 't5' and 't5@max_distance=17' are one model (t5 with bidirectional=False, max_distance=17, "
     "num_buckets=32: defaults and the study's at L = 64 included); list it once"),
    (["extrapolate", "--schemes", "alibi", "nope", "alibi@symmetric=false"], "schemes 'alibi' and 'alibi@symmetric=False'"),
    (["extrapolate", "--schemes", "t5@num_buckets=32", "t5", "--scheme-option", "t5.max_distance=40"],
     "schemes 't5@num_buckets=32' and 't5' are one model"),
    (["extrapolate", "--schemes", "t5@max_distance"], "must look like KEY=VALUE"),
    (["extrapolate", "--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["extrapolate", "--pos-lr-mult", "0"], "--pos-lr-mult must be a finite number > 0"),
    (["extrapolate", "--device", "bogus"], "--device 'bogus' is not a device"),
    (["extrapolate", "--layers", "0"], "--layers must be an integer >= 1, got 0"),
    (["extrapolate", "--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["extrapolate", "--seeds", "0", "1", "0"], "--seeds list 0 twice"),
    (["extrapolate", "--seeds", "3", "0", "3"], "--seeds list 3 twice"),  # the repeated seed, not the smallest
    (["extrapolate", "--seeds", "-1"], "--seeds must be an integer in [0, 4294967295], got -1"),
    (["extrapolate", "--seeds", str(2**40)], f"--seeds must be an integer in [0, 4294967295], got {2**40}"),
    # an option's *value* is checked before the first model trains, not when its own turn comes
    (["extrapolate", "--schemes", "nope", "t5@max_distance=3"], "scheme t5@max_distance=3: max_distance must be >= 17"),
    (["extrapolate", "--schemes", "nope", "t5", "--scheme-option", "t5.num_buckets=40", "--scheme-option",
      "t5.max_distance=20"], "scheme t5: max_distance must be >= 21"),
    (["extrapolate", "--schemes", "nope", "fire@init_L=-2"], "init_L must be a positive finite number"),
])
def test_extrapolate_bad_input(argv, msg, capsys, tmp_path):
    assert main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and "\n" not in err
    assert not (tmp_path / "models").exists()  # nothing trained before the error


STUDY = ["--train-len", "16", "--eval-lens", "16", "32", "64", "--steps", "3", "--batch-size", "4", "--d-model", "32",
         "--layers", "1", "--heads", "2", "--eval-tokens", "512", "--quiet"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    text = tmp_path_factory.mktemp("data") / "data.txt"
    text.write_text("".join(f"line {i}: the quick brown fox {i * 7 % 13} jumps over the lazy dog\n" for i in range(800)))
    return text


def _records(out):
    return json.loads((out / "results.json").read_text())["records"]


def test_a_study_at_L_alone_points_diagnose_at_its_default_window(tmp_path, text_file):
    """Evaluated at L only, a study compares the schemes at their training length; its footer's diagnose
    command leaves --length to its default (8 L) instead of naming L, which diagnose refuses."""
    argv = ["extrapolate", "--schemes", "alibi", *STUDY, "--data", str(text_file), "--out", str(tmp_path / "run")]
    at = argv.index("--eval-lens")
    argv[at + 1:at + 4] = ["16"]
    assert main(argv) == 0
    md = (tmp_path / "run" / "results.md").read_text()
    assert "`posbias diagnose models/<scheme>-seed<k>-<key>/final` (from this folder)" in md
    assert "`posbias diagnose <this folder>` does it for every model here" in md and "--length" not in md
    assert "### Summary" not in md and "From L = " not in md  # nothing past L to sum up


def test_extrapolate_end_to_end_and_reuse(tmp_path, capsys, text_file):
    argv = ["extrapolate", "--schemes", "alibi", "rope", *STUDY, "--data", str(text_file), "--out", str(tmp_path / "run")]
    announced = main_timed(capsys, argv)
    assert "2 scheme(s) x 1 seed(s) = 2 models of 3 steps" in announced and "about 40 s per model" in announced
    assert "at most about" in announced  # the ETA after the first trained model
    assert f"side by side: posbias diagnose {tmp_path / 'run'}" in announced  # the next step, with its folder
    # 3 steps teach nothing: said as soon as each model is scored, not only in the summary at the end
    assert announced.count("note: at L = 16 this model is no better than predicting bytes by their frequency") == 2
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    recs = res["records"]
    assert {(r["scheme"], r["eval_len"]) for r in recs} == {(s, n) for s in ("alibi", "rope") for n in (16, 32, 64)}
    for r in recs:
        assert r["ppl_lo"] <= r["ppl"] <= r["ppl_hi"] and r["ratio_lo"] <= r["ratio"] <= r["ratio_hi"]
        assert r["tail_delta_lo"] <= r["tail_delta"] <= r["tail_delta_hi"]
        assert r["far_delta_lo"] <= r["far_delta"] <= r["far_delta_hi"]
        assert r["tokens"] == 512 and r["segments"] == 8 and r["threads"] == 2
    base = [r for r in recs if r["eval_len"] == 16]
    assert all(r["ratio"] == 1.0 and r["tail_delta"] == 0.0 == r["far_delta"] for r in base)  # L against itself
    assert res["corpus"]["files"] == 1 and "torch" in res["versions"]
    fp = res["corpus"]
    assert f"corpus {fp['name']}: 1 file, {fp['bytes']:,} bytes, sha256 {fp['sha256']}\n" in announced
    run = tmp_path / "run"
    listed = announced[announced.index(f" s. Written to {run}/:\n"):].splitlines()[1:]
    files = [line.split()[0] for line in listed if line.endswith(" MiB")]
    assert files == ["results.md", "results.json", *sorted(p.name for p in run.glob("*.png"))]
    models = next(line for line in listed if line.startswith("  models/"))
    last = sum(store.disk_size(d) for d in (run / "models").glob("*/last"))
    assert models == (f"  {'models/':<30} {_mib(store.disk_size(run / 'models'))}, of which {_mib(last)} is last/ "
                      "checkpoints (optimizer state; --no-keep-last prunes them)")
    assert f"  {'results.json':<30} {_mib(store.disk_size(run / 'results.json'))}" in listed
    md = (tmp_path / "run" / "results.md").read_text()
    assert "| alibi |" in md and "95% bootstrap interval" in md
    assert "the same 512 validation tokens (8 segments of 64, spread evenly" in md  # segments of the longest length
    assert "d_model 32, 1 layer, 2 heads; seed 0; 2 threads." in md
    for label in ("alibi", "rope"):  # one seed: each cell is the value with its interval
        rs = {r["eval_len"]: r for r in recs if r["label"] == label}
        assert (f"| {label} | " + " | ".join(f"{rs[n]['ppl']:.2f} [{rs[n]['ppl_lo']:.2f}, {rs[n]['ppl_hi']:.2f}]"
                                             for n in (16, 32, 64))
                + f" | {rs[64]['ratio']:.3f} [{rs[64]['ratio_lo']:.3f}, {rs[64]['ratio_hi']:.3f}] |") in md
    assert "Per seed" not in md and "averaged over seeds" not in md  # one seed has no spread over seeds to give
    assert "Which differences are real" in md and md.count("**best**") == 4  # per length, and for ppl@64 / ppl@16
    assert "What the distant keys do: the same Δ without the first 2 of those 16 tokens" in md
    assert "the other 14 keep at least 2 tokens of it either way" in md
    # the footer's diagnose command points at checkpoints that are there
    assert "`posbias diagnose models/<scheme>-seed<k>-<key>/final --length 64`" in md
    assert "`posbias diagnose <this folder> --length 64` does it for every model here" in md
    assert len(list((tmp_path / "run" / "models").glob("alibi-seed0-*/final"))) == 1
    assert all(len(r["segment_loss"]) == 8 for r in recs)
    assert set(res["paired"]) == {"16", "32", "64"} and set(res["paired_ratio"]) == {"alibi", "rope"}
    for r in recs:  # the segments' mean loss is the record's loss (equal-sized segments)
        assert sum(r["segment_loss"]) / 8 == pytest.approx(r["loss"], rel=1e-12)
    # 3 steps: neither model is below the byte-frequency reference beyond the noise, and the summary says so first
    assert {(e["label"], e["eval_len"]) for e in res["unigram"]["at"]} == {(s, n) for s in ("alibi", "rope") for n in (16, 64)}
    assert res["unigram"]["ppl"] > 1
    assert md.startswith("### Summary\n\n* **Learned little: ") and "* **For scale:** predicting each byte" in md
    for png in ("ppl_vs_length", "ratio_vs_length", "loss_vs_position", "learned_bias_vs_distance"):
        assert (tmp_path / "run" / f"{png}.png").exists(), png
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("reusing the model trained with these exact settings") == 2
    assert "of which" in out and "last/ checkpoints" in out and "results.json" in out  # the written-files summary
    assert _records(tmp_path / "run") == recs
    assert main(argv + ["--no-keep-last"]) == 0  # prunes optimizer state, changes nothing else
    assert not list((tmp_path / "run").glob("models/*/last")) and list((tmp_path / "run").glob("models/*/final"))
    assert _records(tmp_path / "run") == recs


def test_changed_setting_is_never_reused(tmp_path, capsys, text_file):
    """A re-run into the same folder with another setting trains afresh in a folder of its own, and
    the table shows the numbers of the new setting (the stale-result bug)."""
    out = tmp_path / "run"
    argv = ["extrapolate", "--schemes", "t5", *STUDY, "--data", str(text_file), "--out", str(out)]
    assert main(argv) == 0
    first = _records(out)
    for change in (["--steps", "4"], ["--d-model", "64"], ["--lr", "1e-3"], ["--pos-lr-mult", "3"],
                   ["--scheme-option", "t5.max_distance=40"], ["--threads", "1"]):
        capsys.readouterr()
        assert main(argv + change) == 0, change
        assert "reusing" not in capsys.readouterr().out, change
        again = _records(out)
        assert again[0]["model_dir"] != first[0]["model_dir"], change
    assert _records(out)[0]["threads"] == 1
    assert len(list((out / "models").iterdir())) == 7
    other = tmp_path / "other.txt"
    other.write_text(text_file.read_text().replace("fox", "cat"))
    capsys.readouterr()
    assert main(["extrapolate", "--schemes", "t5", *STUDY, "--data", str(other), "--out", str(out)]) == 0
    assert "reusing" not in capsys.readouterr().out


def test_results_of_other_code_are_never_reused(tmp_path, capsys, text_file, monkeypatch):
    """The model and evaluation keys carry the fingerprint of the code that made them: after a change
    to what posbias computes (a kernel's rounding, say) a re-run trains and evaluates afresh."""
    from posbias import store

    out = tmp_path / "run"
    argv = ["extrapolate", "--schemes", "t5", *STUDY, "--data", str(text_file), "--out", str(out)]
    assert main(argv) == 0
    first = _records(out)[0]["model_dir"]
    capsys.readouterr()
    assert main(argv) == 0  # the same code: reused
    assert "reusing" in capsys.readouterr().out and _records(out)[0]["model_dir"] == first
    real = store.code_fingerprint
    monkeypatch.setattr(store, "code_fingerprint", lambda *parts: "changed-" + real(*parts))
    assert main(argv) == 0
    assert "reusing" not in capsys.readouterr().out
    assert _records(out)[0]["model_dir"] != first


def test_code_fingerprint_ignores_comments_and_docstrings_only(tmp_path, monkeypatch):
    from posbias import store

    (tmp_path / "pkg").mkdir()
    module = tmp_path / "pkg" / "m.py"
    monkeypatch.setattr(store, "_PACKAGE", tmp_path)

    def fingerprint(text):
        module.write_text(text)
        store.code_fingerprint.cache_clear()
        return store.code_fingerprint("pkg")

    base = fingerprint('"""Doc."""\ndef f(x):\n    """Doc."""\n    return x * 2  # twice\n')
    assert fingerprint('"""Other doc."""\n\n\ndef f(x):\n    # a comment\n    return x * 2\n') == base
    assert fingerprint('"""Doc."""\ndef f(x):\n    """Doc."""\n    return x * 3\n') != base
    assert fingerprint('def f(x):\n    return x * 2\ndef g():\n    pass\n') != base
    with pytest.raises(RuntimeError, match="'gone.py' is not in .*MODEL_CODE"):  # a renamed module: not silently skipped
        store.code_fingerprint("pkg", "gone.py")
    store.code_fingerprint.cache_clear()
    monkeypatch.undo()
    assert store.code_fingerprint(*store.MODEL_CODE) != store.code_fingerprint(*store.MODEL_CODE, "evaluate.py")


def test_scheme_options_labels_and_study_defaults(tmp_path, text_file):
    out = tmp_path / "run"
    argv = ["extrapolate", "--schemes", "t5", "t5@max_distance=64", "fire", "offset", *STUDY,
            "--scheme-option", "t5.num_buckets=8", "--data", str(text_file), "--out", str(out)]
    assert main(argv) == 0
    recs = {r["label"]: r for r in _records(out) if r["eval_len"] == 16}
    assert set(recs) == {"t5", "t5@max_distance=64", "fire", "offset"}
    # t5: the user's num_buckets; max_distance from the canonical-share rule for 8 buckets at L = 16
    assert recs["t5"]["model"]["scheme_options"]["num_buckets"] == 8
    assert recs["t5@max_distance=64"]["model"]["scheme_options"] == {"num_buckets": 8, "max_distance": 64}
    assert recs["fire"]["model"]["scheme_options"] == {}  # FIRE: the reference default init_L = 512
    assert "max_distance" in recs["offset"]["model"]["scheme_options"]
    learned = recs["t5"]["learned"]
    assert learned["bias_range"][0] <= learned["bias_range"][1] and "table" in learned["params"]
    assert 0 < learned["final_share"] < 1
    assert "t5@max_distance=64" in (out / "results.md").read_text()
    # FIRE's learned threshold, in tokens: |L_multiplier| · 512
    fire = recs["fire"]["learned"]
    assert fire["threshold"] == pytest.approx(abs(fire["params"]["L_multiplier"][0]) * 512, rel=1e-6)
    assert f"threshold L = {fire['threshold']:.0f} tokens; c [" in (out / "results.md").read_text()
    assert "threshold" not in learned


def test_every_setting_of_a_study_is_in_the_key_of_what_it_makes():
    """Changing any one setting of a study changes the key of each model it affects, or of each
    evaluation: no result made with other settings is reused. A new StudyConfig field fails here until
    it is placed (its key, or why it needs none)."""
    from dataclasses import fields, replace

    from posbias import store
    from posbias.data import local_corpus
    from posbias.study import StudyConfig, arms, eval_key, model_key

    corpus = local_corpus(__file__)
    base = StudyConfig(schemes=("t5",), train_len=16, eval_lens=(16, 32), steps=4, batch_size=4, d_model=32,
                       n_layers=1, n_heads=2, eval_tokens=512, threads=1)

    def keys(cfg, seed=0):
        arm = arms(cfg)[0]
        mkey = model_key(cfg, arm, seed, corpus)
        return store.config_key(mkey), store.config_key(eval_key(cfg, mkey))

    model, evaluation = keys(base)
    trains = {"train_len": dict(train_len=8, eval_lens=(8, 16, 32)), "steps": dict(steps=5),
              "batch_size": dict(batch_size=5), "lr": dict(lr=1e-3), "pos_lr_mult": dict(pos_lr_mult=10.0), "d_model": dict(d_model=48),
              "n_layers": dict(n_layers=2), "n_heads": dict(n_heads=4), "threads": dict(threads=2),
              "scheme_options": dict(scheme_options={"t5": {"num_buckets": 8}}),
              "schemes": dict(schemes=("t5@max_distance=64",))}
    evaluates = {"eval_lens": dict(eval_lens=(16, 64)), "eval_tokens": dict(eval_tokens=768),
                 "eval_batch": dict(eval_batch=4)}
    # each seed is its own model (model_key's seed); the device: test_devices' key tests
    elsewhere = {"seeds", "device"}
    assert set(trains) | set(evaluates) | elsewhere == {f.name for f in fields(StudyConfig)}
    for name, change in trains.items():
        m, e = keys(replace(base, **change))
        assert m != model and e != evaluation, name
    for name, change in evaluates.items():  # the same model, evaluated otherwise
        m, e = keys(replace(base, **change))
        assert m == model and e != evaluation, name
    assert keys(base, seed=1)[0] != model


def test_a_study_of_several_seeds_reports_each_seed(tmp_path, text_file):
    """`--seeds 0 1` (the README's three-seed demo, smaller): one model per scheme and seed, and the
    report gives each seed's ratio and bands of the spread over seeds."""
    out = tmp_path / "run"
    assert main(["extrapolate", "--schemes", "t5", "alibi", "--seeds", "0", "1", *STUDY, "--data", str(text_file),
                 "--out", str(out)]) == 0
    records = _records(out)
    longest = max(r["eval_len"] for r in records)
    recs = [r for r in records if r["eval_len"] == longest]
    assert sorted((r["label"], r["seed"]) for r in recs) == [("alibi", 0), ("alibi", 1), ("t5", 0), ("t5", 1)]
    ratio = {(r["label"], r["seed"]): r["ratio"] for r in recs}
    md = (out / "results.md").read_text()
    assert (f"Per seed, ppl@{longest} / ppl@16: " + "; ".join(
        f"{label} {ratio[label, 0]:.3f} / {ratio[label, 1]:.3f}" for label in ("t5", "alibi"))) in md
    assert ratio["t5", 0] != ratio["t5", 1] and "± std over seeds" in md
    assert "d_model 32, 1 layer, 2 heads; seeds 0, 1; 2 threads." in md
    options = {r["label"]: r["model"]["scheme_options"] for r in records}
    assert options["alibi"] == {} and options["t5"]  # t5 has the study's default for L
    learned = next(r["learned"] for r in records if r["label"] == "alibi" and r["seed"] == 0)
    lo, hi = learned["bias_range"]
    assert lo < hi and f"| alibi | – | [{lo:.2f}, {hi:.2f}] | {learned['bias_contrast']:.2f} | – | none |" in md
    assert f"| t5 | {', '.join(f'{k}={v}' for k, v in options['t5'].items())} | [" in md
    lo, hi = next(r["learned"]["params"]["table"] for r in records if r["label"] == "t5" and r["seed"] == 0)
    assert lo < hi and f" | table [{lo:.2f}, {hi:.2f}] |" in md  # each learned parameter's range
    for label in ("t5", "alibi"):  # several seeds: each cell is the mean ± std over the seeds
        ppl = {n: [r["ppl"] for r in records if r["label"] == label and r["eval_len"] == n] for n in (16, 32, 64)}
        ratios = [ratio[label, 0], ratio[label, 1]]
        assert (f"| {label} | " + " | ".join(f"{statistics.mean(ppl[n]):.2f} ± {statistics.stdev(ppl[n]):.2f}"
                                             for n in (16, 32, 64))
                + f" | {statistics.mean(ratios):.3f} ± {statistics.stdev(ratios):.3f} |") in md
    # the tables' columns: the ratio at the longest length; Δ at the lengths past L only
    assert f"| scheme | @ 16 | @ 32 | @ 64 | ppl@{longest} / ppl@16 |" in md
    assert f"last column: each scheme's ppl@{longest} / ppl@16 relative to the smallest such ratio" in md
    assert md.count("| scheme | Δ @ 32 | Δ @ 64 |") == 2 and "Δ @ 16" not in md


def test_study_defaults_follow_canonical_t5_proportions():
    from posbias.schemes import OffsetBias, T5Bias
    from posbias.schemes.base import flat_share
    from posbias.schemes.t5 import CANONICAL_FINAL_SHARE, t5_last_bucket_start

    assert T5Bias.study_defaults(512, {}) == {"max_distance": 128}  # canonical T5 reproduces itself
    assert CANONICAL_FINAL_SHARE == pytest.approx(0.6076, abs=1e-4)
    assert T5Bias.study_defaults(64, {}) == {"max_distance": 17}  # the closest reachable with 32 buckets
    assert flat_share(t5_last_bucket_start(32, 17), 64) == pytest.approx(1128 / 2080)
    assert OffsetBias.study_defaults(64, {}) == {"max_distance": 14}
    assert T5Bias.study_defaults(64, {"max_distance": 50}) == {}  # the user's choice wins


def test_the_final_bucket_and_the_canonical_distance_are_found_as_the_plain_searches_find_them():
    """``t5_last_bucket_start`` (a guess from the logarithmic formula, checked around it) and
    ``canonical_share_distance`` (bisection) give what a search over every distance gives, the code they
    replaced: 16k tokens took 7 s there, 10M tokens never finished, and the study calls them before any
    check of its memory."""
    from posbias.schemes.base import flat_share
    from posbias.schemes.t5 import (CANONICAL_FINAL_SHARE, canonical_share_distance, check_t5, t5_bucket,
                                    t5_last_bucket_start)

    def every_distance(num_buckets, max_distance, bidirectional):
        n = num_buckets // 2 if bidirectional else num_buckets
        b = t5_bucket(torch.arange(max_distance + 1), num_buckets=n, max_distance=max_distance)
        return int(torch.nonzero(b == n - 1)[0])

    def every_length(train_len, start, lowest):  # the loop of before: every D from lowest to train_len
        best, best_err = lowest, float("inf")
        for d in range(lowest, max(lowest, train_len) + 1):
            err = abs(flat_share(start[d], train_len) - CANONICAL_FINAL_SHARE)
            if err <= best_err:
                best, best_err = d, err
        return best

    rng = random.Random(0)
    for num_buckets, bi in [(2, False), (3, False), (4, False), (4, True), (8, False), (9, True), (32, False),
                            (32, True), (64, False), (128, True), (320, False)]:
        n = num_buckets // 2 if bi else num_buckets
        lowest = n // 2 + 1
        distances = [*range(lowest, 700), *rng.sample(range(700, 40_000), 25), 1_000_003]
        for md in distances:
            check_t5(num_buckets, md, bi)
            assert t5_last_bucket_start(num_buckets, md, bi) == every_distance(num_buckets, md, bi), (num_buckets, bi, md)
        start = {d: t5_last_bucket_start(num_buckets, d, bi) for d in range(lowest, 3001)}
        for train_len in [*range(1, 300), *rng.sample(range(300, 3001), 30)]:
            got = canonical_share_distance(train_len, start.get, lowest)
            assert got == every_length(train_len, start, lowest), (num_buckets, bi, train_len)
    ident = {d: d for d in range(1, 3001)}  # the clipped per-offset table's entry starts at D itself
    for train_len in [*range(1, 300), 512, 1000, 2999, 3000]:
        assert canonical_share_distance(train_len, ident.get, 1) == every_length(train_len, ident, 1)


def test_the_final_bucket_is_found_from_at_most_17_distances(monkeypatch):
    """``t5_last_bucket_start`` is O(1): the logarithmic formula's guess lands within 8 distances of the
    boundary for every table tried, so it evaluates the bucket function on at most 17 distances, 10M
    tokens included (a guess that missed would fall back to every distance up to max_distance)."""
    import posbias.schemes.t5 as t5

    evaluated = []
    real = t5.t5_bucket
    monkeypatch.setattr(t5, "t5_bucket", lambda d, **kw: evaluated.append(d.numel()) or real(d, **kw))
    rng = random.Random(1)
    for num_buckets, bi in [(2, False), (3, False), (4, True), (9, True), (32, False), (33, False), (128, True)]:
        n = num_buckets // 2 if bi else num_buckets
        for md in [*range(n // 2 + 1, 200), *rng.sample(range(200, 40_000), 10), 10**7]:
            evaluated.clear()
            t5.t5_last_bucket_start(num_buckets, md, bi)
            assert 0 < sum(evaluated) <= 17, (num_buckets, bi, md, evaluated)


def test_a_study_too_large_for_the_machine_is_refused_in_one_line_before_any_work(tmp_path, text_file, capsys):
    """A model or a batch whose training cannot fit the device's memory (its floor,
    ``train.training_floor``) is refused with the sizes that make it so: before, 2⁶⁴ sequences a
    batch ended in a traceback (a tensor size overflowed) and 10⁸ layers spent minutes building blocks.
    A thread count beyond :data:`~posbias.config.MAX_THREADS` aborted torch's OpenMP without a message."""
    for args, msg in [(["--layers", "100000000"], "training one model needs at least 22,125.2 GiB (3,814.7 GiB of activations for 4 sequences of 16 tokens through 100000000 layers"),
                      (["--batch-size", str(2**64)], f"training one model needs at least 4.57e+14 GiB (4.57e+14 GiB of activations for {2**64} sequences of 16 "
                                                 "tokens through 1 layer of width 32"),
                      (["--d-model", str(2**40), "--heads", "1", "--schemes", "t5"], "1 layer of width 1099511627776, and 2.16e+17 GiB of weights"),
                      (["--threads", "100000"], "--threads must be an integer in [1, 1024], got 100000")]:
        assert main(["extrapolate", *STUDY, "--data", str(text_file), "--out", str(tmp_path), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err and "Traceback" not in err, err
    assert not list(tmp_path.glob("models/*"))


def test_the_training_floor_is_below_what_training_holds(monkeypatch, tmp_path):
    """``training_floor`` never exceeds what a step holds: its state against the parameters counted
    (16 bytes each), its activations against the tensors autograd saves for the backward pass
    (measured with saved-tensor hooks, parameters left out). ``check_training_fits`` refuses past the
    device's memory, with the sizes that make it, and checks nothing where the memory cannot be read."""
    from posbias import store
    from posbias.train import check_training_fits, training_floor

    for cfg in (ModelConfig("t5", d_model=64, n_layers=2, n_heads=2), ModelConfig("nope", d_model=48, n_layers=3,
                                                                                   n_heads=3, mlp_ratio=2)):
        model = TransformerLM(cfg)
        params = {p.data_ptr() for p in model.parameters()}
        saved = {}

        def pack(t):
            if t.data_ptr() not in params:
                saved[t.data_ptr()] = max(saved.get(t.data_ptr(), 0), t.untyped_storage().nbytes())
            return t

        idx = torch.randint(0, 256, (3, 40))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
        loss.backward()
        state, acts = training_floor(cfg, 3, 40)
        assert state <= 16 * sum(p.numel() for p in model.parameters())
        assert 0 < acts <= sum(saved.values()), (acts, sum(saved.values()))
    cfg = ModelConfig("t5")
    need = sum(training_floor(cfg, 8, 64))
    monkeypatch.setattr(store, "device_memory", lambda device: need)
    check_training_fits(cfg, 8, 64, "cpu")  # exactly fits
    monkeypatch.setattr(store, "device_memory", lambda device: need - 1)
    with pytest.raises(ValueError, match=r"^training one model needs at least 18.0 MiB \(5.5 MiB of activations for "
                                         r"8 sequences of 64 tokens through 4 layers of width 128, and 12.5 MiB of "
                                         r"weights, gradients and Adam's moments\), more than the 18.0 MiB this cpu "
                                         r"has; a smaller batch, training length, width or depth$"):
        check_training_fits(cfg, 8, 64, "cpu")
    for have, said in ((2**30, "1.0 GiB"), (2**30 - 2**19, "1,023.5 MiB"), (2**50, "1.05e+06 GiB"),
                       (2**50 - 2**29, "1,048,575.5 GiB")):  # sizes from a GiB in GiB, from 2^50 bytes in 3 digits
        monkeypatch.setattr(store, "device_memory", lambda device: have)
        with pytest.raises(ValueError, match=re.escape(f"more than the {said} this cpu has")):
            check_training_fits(dataclasses.replace(cfg, n_layers=10**9), 8, 64, "cpu")
    monkeypatch.setattr(store, "device_memory", lambda device: 1)
    for layers, said in ((1, "1 layer of"), (2, "2 layers of")):
        with pytest.raises(ValueError, match=f"through {said} width 128"):
            check_training_fits(dataclasses.replace(cfg, n_layers=layers), 8, 64, "cpu")
    monkeypatch.setattr(store, "device_memory", lambda device: None)
    check_training_fits(dataclasses.replace(cfg, n_layers=10**9), 8, 64, "cpu")
    # several processes training together: each checks its own share of the batch, before any work
    import posbias.train as training

    monkeypatch.setattr(training, "_dist_info", lambda: (0, 4))
    monkeypatch.setattr(store, "device_memory", lambda device: 1)
    tcfg = TrainConfig(steps=2, batch_size=8, train_len=64)
    with pytest.raises(ValueError, match=r"of activations for 2 sequences of 64 tokens through 4 layers"):
        train(cfg, tcfg, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_study_is_bit_identical_at_a_fixed_thread_count(tmp_path, text_file):
    for name in ("a", "b"):
        assert main(["extrapolate", "--schemes", "t5", "kerple-log", *STUDY, "--data", str(text_file),
                     "--out", str(tmp_path / name)]) == 0
    a, b = _records(tmp_path / "a"), _records(tmp_path / "b")
    assert [(r["loss"], r["ppl_lo"], r["learned"]) for r in a] == [(r["loss"], r["ppl_lo"], r["learned"]) for r in b]


def test_runs_sharing_a_folder_pass_over_a_model_another_is_making(tmp_path, text_file):
    """Another run holds alibi's lock and the folder's shared lock (here a thread and a second open
    file, as a run in another process would): this run shares the folder, trains the other models
    first, comes back, waits for the lock, and — the holder having made nothing, like a run that died —
    makes alibi itself. The records are those of a run alone."""
    import threading

    from posbias import store
    from posbias.data import local_corpus
    from posbias.study import StudyConfig, arms, model_dir, model_key, run_study

    cfg = StudyConfig(schemes=("alibi", "t5", "nope"), train_len=16, eval_lens=(16, 32), steps=3, batch_size=4,
                      d_model=32, n_layers=1, n_heads=2, eval_tokens=256, threads=1)
    corpus = local_corpus(text_file)
    alibi = arms(cfg)[0]
    lock = model_dir(tmp_path / "run", alibi, 0, model_key(cfg, alibi, 0, corpus)) / ".lock"
    held, release = threading.Event(), threading.Event()
    freed, started = [], []

    def other_run():
        with store.item_lock(lock, wait=True):
            held.set()
            release.wait(60)
            time.sleep(0.3)  # still making the model a while after the study said it waits
            freed.append(time.monotonic())

    (tmp_path / "run").mkdir()
    # the other run's shared hold on the folder, on a file of its own: a FolderLock in this process would
    # only be re-entered by the study's, which then would take no lock of its own to test
    folder = open(tmp_path / "run" / store.LOCK_FILE, "a+")
    store._flock(folder, store.LOCK_SH | store.LOCK_NB)
    holder = threading.Thread(target=other_run)
    holder.start()
    assert held.wait(10)
    said = []

    def log(line):
        said.append(line)
        if "waiting for the run making this model" in line:
            release.set()
        if line.startswith("[1/3 alibi seed 0] training"):
            started.append(time.monotonic())

    try:
        shared = run_study(cfg, tmp_path / "run", corpus=corpus, log=log)
    finally:
        release.set()
        holder.join()
        folder.close()

    def at(start):
        return next(i for i, line in enumerate(said) if line.startswith(start))

    passed, waits = at("[1/3 alibi seed 0] another run is making this model"), at("[1/3 alibi seed 0] waiting")
    assert passed < at("[2/3 t5 seed 0] training") < at("[3/3 nope seed 0] training") < waits
    assert waits < at("[1/3 alibi seed 0] training") < at("[1/3 alibi seed 0] ppl @ 16")
    assert freed[0] < started[0]  # it waited for the other run's lock, not only said so
    alone = run_study(cfg, tmp_path / "alone", corpus=corpus)
    assert [(r["label"], r["loss"]) for r in shared.records] == [(r["label"], r["loss"]) for r in alone.records]
    models = sorted((tmp_path / "alone" / "models").iterdir())  # the library keeps last/ (to resume) unless told
    assert len(models) == 3 and all((d / "last").is_dir() and (d / "final").is_dir() for d in models)


def test_what_the_positional_parameters_learned_is_summarised_exactly():
    """The report's "learned" columns (``learned_summary``): each parameter's range; for an additive
    scheme the bias a query at L − 1 gives keys at distances 0 … L − 1 and its contrast |bias(0) −
    bias(L − 1)| on the largest head (ALiBi: its largest slope × (L − 1)); a learned T5 table's share of
    pairs in its final bucket; FIRE's learned threshold."""
    from posbias.schemes.base import flat_share
    from posbias.study import learned_summary

    L = 16
    alibi = TransformerLM(ModelConfig(scheme="alibi", **TINY))  # 2 heads: slopes 1/16, 1/256
    got = learned_summary(alibi, L)
    assert got == {"params": {}, "bias_range": [-(L - 1) / 16, 0.0], "bias_contrast": (L - 1) / 16}
    t5 = TransformerLM(ModelConfig(scheme="t5", scheme_options={"num_buckets": 8, "max_distance": 8}, **TINY))
    with torch.no_grad():  # bucket r, head h: r · 2 + h
        t5.scheme.table.copy_(torch.arange(16, dtype=torch.float32).view(8, 2))
    got = learned_summary(t5, L)
    assert got["params"] == {"table": [0.0, 15.0]} and got["final_share"] == flat_share(t5.scheme.flat_beyond, L) > 0
    # distance 0: bucket 0 (0, 1); distance L − 1 = 15 > max_distance: the final bucket 7 (14, 15)
    assert got["bias_range"] == [0.0, 15.0] and got["bias_contrast"] == 14.0
    fire = TransformerLM(ModelConfig(scheme="fire", **TINY))
    got = learned_summary(fire, L)
    assert got["threshold"] == float(fire.scheme.threshold().detach()) and set(got["params"]) == {
        n for n, _ in fire.scheme.named_parameters()}


def test_a_study_model_is_trained_on_the_schedule_its_steps_give():
    """A study's training: warm-up over steps/12, validation every steps/3, a checkpoint every steps/10
    (whole steps, at least 1), the study's own rates and length, the model's seed."""
    from posbias.study import StudyConfig, train_config

    t = train_config(StudyConfig(steps=250, pos_lr_mult=4.0), 3)
    assert (t.steps, t.warmup, t.eval_every, t.ckpt_every, t.seed, t.pos_lr_mult) == (250, 20, 83, 25, 3, 4.0)
    assert (t.train_len, t.batch_size, t.lr) == (StudyConfig().train_len, StudyConfig().batch_size, StudyConfig().lr)
    t = train_config(StudyConfig(steps=2), 0)
    assert (t.warmup, t.eval_every, t.ckpt_every) == (1, 1, 1)


@pytest.mark.parametrize("field, value, message", [
    ("steps", 0, "steps must be an integer >= 1, got 0"),
    ("ckpt_every", 0, "ckpt_every must be an integer >= 1, got 0"),  # was a ZeroDivisionError after a step
    ("eval_batches", 0, "eval_batches must be an integer >= 1, got 0"),
    ("eval_every", 2.5, "eval_every must be an integer >= 0, got 2.5"),
    ("eval_every", -1, "eval_every must be an integer >= 0, got -1"),
    ("warmup", -5, "warmup must be an integer >= 0, got -5"),
    ("warmup", True, "warmup must be an integer >= 0, got True"),
    ("grad_clip", 0, "grad_clip must be a finite number > 0, got 0"),
    ("lr", float("nan"), "lr must be a finite number > 0, got nan"),
    ("min_lr_ratio", 1.5, r"min_lr_ratio must be a finite number in \[0.0, 1.0\], got 1.5"),
    ("weight_decay", -0.1, "weight_decay must be a finite number >= 0.0, got -0.1"),
    ("weight_decay", float("inf"), "weight_decay must be a finite number >= 0.0, got inf"),
    ("seed", -1, r"seed must be an integer in \[0, 4294967295\], got -1"),
])
def test_a_training_config_refuses_what_would_fail_or_mislead_later(field, value, message):
    """Every field of ``TrainConfig`` is checked when it is made, naming the value and the valid range:
    a zero ``ckpt_every`` failed only after the first step, a zero ``eval_batches`` or clip, a
    fractional interval or a cosine floor above the peak trained without a word."""
    with pytest.raises(ValueError, match=f"^{message}$"):
        TrainConfig(**{field: value})


def test_positional_parameters_get_their_own_learning_rate():
    from posbias.train import make_optimizer

    model = TransformerLM(ModelConfig(scheme="t5", **TINY))
    opt = make_optimizer(model, TrainConfig(pos_lr_mult=30.0))
    pos = [g for g in opt.param_groups if g["lr_mult"] == 30.0]
    assert len(pos) == 1 and pos[0]["weight_decay"] == 0.0
    assert {id(p) for p in pos[0]["params"]} == {id(model.scheme.table)}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    # ALiBi has no positional parameters: no empty group
    assert all(g["params"] for g in make_optimizer(TransformerLM(ModelConfig(scheme="alibi", **TINY)),
                                                    TrainConfig()).param_groups)
    # matrices decay, vectors (norms, biases) and positional parameters do not; one pair of betas
    groups = make_optimizer(model, TrainConfig(weight_decay=0.25, pos_lr_mult=30.0)).param_groups
    assert [(g["weight_decay"], g["lr_mult"], g["betas"]) for g in groups] == [
        (0.25, 1.0, (0.9, 0.95)), (0.0, 1.0, (0.9, 0.95)), (0.0, 30.0, (0.9, 0.95))]
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and all(p.dim() == 1 for p in groups[1]["params"])


def test_the_learning_rate_schedule():
    """Linear warm-up to the peak over ``warmup`` steps (step s: lr·(s + 1)/warmup), then a cosine
    from the peak to ``min_lr_ratio``·lr at ``steps`` and flat past it (what each group steps at, × its
    multiplier: ``test_faults.py::test_resume_says_where_it_resumes``)."""
    from posbias.train import lr_at

    at = functools.partial(lr_at, lr=1.0, steps=10, warmup=4, min_ratio=0.1)
    assert [at(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert at(4) == 1.0 and at(10) == at(50) == pytest.approx(0.1)
    assert at(7) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 6)))  # halfway: 0.55
    assert lr_at(0, lr=2.0, steps=5, warmup=0, min_ratio=0.5) == 2.0  # no warm-up: the peak at once
    # the edges a training config takes: no warm-up, validation at the end only, a floor of 0, no decay
    flat = TrainConfig(steps=5, lr=2.0, warmup=0, eval_every=0, min_lr_ratio=0.0, weight_decay=0.0)
    assert flat.lr_at(0) == 2.0 and flat.lr_at(5) == 0.0
    assert lr_at(5, lr=2.0, steps=5, warmup=5, min_ratio=0.5) == 2.0  # warm-up as long as training
    # one step of cosine: the peak at its start, the floor at its end
    assert [lr_at(s, lr=2.0, steps=5, warmup=4, min_ratio=0.5) for s in (3, 4, 5)] == [2.0, 2.0, 1.0]


def test_training_defaults_and_what_the_demo_trains_with():
    """``TrainConfig``'s defaults (what ``train`` gives a user who sets nothing), and the demo's
    training settings: the study sets steps, batch, length, rates, the warm-up (1/12 of the steps),
    the validation and checkpoint intervals (1/3 and 1/10) and the seed, and inherits the cosine
    floor (10%), weight decay (0.1), clipping (norm 1) and 4 validation batches from these defaults.
    A moved default changed every study model with no test failing."""
    from posbias.study import PRESETS, StudyConfig, train_config

    assert dataclasses.asdict(TrainConfig()) == dict(
        steps=600, batch_size=32, train_len=128, lr=2e-3, pos_lr_mult=1.0, warmup=50, min_lr_ratio=0.1,
        weight_decay=0.1, grad_clip=1.0, eval_every=200, eval_batches=4, ckpt_every=100, seed=0)
    with pytest.raises(dataclasses.FrozenInstanceError):  # checked once, when made: never changed after
        TrainConfig().steps = 0
    demo = train_config(StudyConfig(**PRESETS["demo"]), seed=3)
    assert dataclasses.asdict(demo) == dict(
        steps=250, batch_size=32, train_len=64, lr=2e-3, pos_lr_mult=100.0, warmup=20, min_lr_ratio=0.1,
        weight_decay=0.1, grad_clip=1.0, eval_every=83, eval_batches=4, ckpt_every=25, seed=3)


def test_evaluation_segments_spread_over_the_whole_split():
    """Scored segments run from the split's start to its end (an interval over them speaks for the
    split, not its first stretch), at exact integer positions, and every length tiles the same ones."""
    from torch.nn import functional as F

    from posbias.evaluate import spread_starts, token_losses

    assert spread_starts(1000, 100, 4) == [0, 300, 600, 900] and spread_starts(1000, 100, 1) == [0]
    assert spread_starts(400, 100, 4) == [0, 100, 200, 300]  # as many as fit: contiguous
    big = 2 ** 40 + 1  # past float32's (and float64's 2^53 is far) exact integers: positions stay integer
    assert spread_starts(big, 2 ** 20, 3) == [0, (big - 2 ** 20) // 2, big - 2 ** 20]
    with pytest.raises(ValueError, match="399 scoreable tokens, fewer than 4 segments of 100"):
        spread_starts(399, 100, 4)
    model = TransformerLM(ModelConfig(scheme="alibi", **TINY)).eval()
    tokens = torch.randint(0, 256, (5001,), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    n16 = token_losses(model, tokens, 16, n_tokens=256, span=64)  # 4 segments of 64, the last ending at 5000
    n64 = token_losses(model, tokens, 64, n_tokens=256)
    for k, start in enumerate([0, 1645, 3290, 4936]):
        x = tokens[start: start + 65].long()
        with torch.no_grad():
            want = F.cross_entropy(model(x[None, :-1])[0].float(), x[1:], reduction="none").double()
        torch.testing.assert_close(n64[64 * k: 64 * k + 64], want, atol=1e-5, rtol=1e-5)
        with torch.no_grad():  # windows of 16 tile the same segment
            first = F.cross_entropy(model(x[None, :16])[0].float(), x[1:17], reduction="none").double()
        torch.testing.assert_close(n16[64 * k: 64 * k + 16], first, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="segment span 40 must be a positive multiple of the length 16"):
        token_losses(model, tokens, 16, n_tokens=80, span=40)


def test_the_default_schemes_are_the_documented_eight():
    """`posbias extrapolate`'s default (its --help and the README): KERPLE's log variant, not its power one."""
    from posbias.study import StudyConfig

    assert StudyConfig().schemes == ("sinusoidal", "rope", "nope", "offset", "t5", "alibi", "kerple-log", "fire")


def test_a_ratio_whose_interval_or_a_seed_reaches_1_ties_the_best():
    """"≈ best" in the tables and the summaries' ties: the paired interval reaches 1 (inclusive), or a
    seed's own ratio does."""
    from posbias.evaluate import Paired
    from posbias.report import ties_best

    assert ties_best(Paired(1.01, 1.0, 1.02)) and not ties_best(Paired(1.01, 1.0000001, 1.02))
    assert ties_best(Paired(1.0, 1.0, 1.0, best=True))
    assert ties_best(Paired(1.05, 1.01, 1.09, per_seed=(1.08, 1.0)))
    assert not ties_best(Paired(1.05, 1.01, 1.09, per_seed=(1.08, 1.001)))


def test_the_warning_of_few_segments():
    from posbias.evaluate import SEGMENTS
    from posbias.report import few_segments

    assert few_segments(SEGMENTS) == "" and few_segments(SEGMENTS - 1).startswith(f"Only {SEGMENTS - 1} segments scored")
    assert few_segments(1, "window").startswith(f"Only 1 window scored (fewer than {SEGMENTS})")


def test_the_local_head_is_an_eighth_of_L_and_at_least_one_token():
    """The tokens at a window's start that the far-context measures leave out (study's far_delta,
    diagnose's split): L/8, at least 1, so that short training lengths keep it."""
    from posbias.evaluate import local_head

    assert [local_head(n) for n in (1, 8, 15, 16, 64, 100)] == [1, 1, 1, 2, 8, 12]


def test_length_study_intervals_and_tail_view(corpus):
    from posbias.evaluate import length_study

    model = TransformerLM(ModelConfig(scheme="alibi", **TINY))
    res = length_study(model, corpus.val, [16, 32, 64], train_len=16, n_tokens=640)
    assert set(res) == {16, 32, 64}
    for n, r in res.items():
        assert r["tokens"] == 640 and r["segments"] == 10 and r["windows"] == 640 // n
        assert r["ppl_lo"] <= r["ppl"] <= r["ppl_hi"] and r["tail_ppl_lo"] <= r["tail_ppl"] <= r["tail_ppl_hi"]
        assert r["ppl"] == math.exp(r["loss"]) and r["bpb"] == pytest.approx(r["loss"] / math.log(2), rel=1e-15)
    # far_delta: the tail without its first L/8 = 2 tokens, against the same tokens in windows of 16
    from posbias.evaluate import token_losses
    pos = torch.arange(640)
    n16, n64 = (token_losses(model, corpus.val, n, n_tokens=640, span=64) for n in (16, 64))
    kept = (pos % 64) >= 64 - 16 + 2
    assert res[64]["far_delta"] == pytest.approx(float((n64[kept] - n16[kept]).double().mean()), abs=1e-9)
    assert res[64]["far_delta_lo"] <= res[64]["far_delta"] <= res[64]["far_delta_hi"]
    assert res[16]["far_delta"] == 0.0 and res[16]["far_delta_lo"] == res[16]["far_delta_hi"] == 0.0
    # the all-token loss equals the plain non-overlapping evaluation of the same tokens
    plain = evaluate_length(model, corpus.val, 32, max_tokens=640, span=64)
    assert res[32]["loss"] == pytest.approx(plain["loss"], rel=1e-9)
    assert len(plain["window_loss"]) == 20 and sum(plain["window_loss"]) / 20 == pytest.approx(plain["loss"], rel=1e-12)
    with pytest.raises(ValueError, match="must include the training length"):
        length_study(model, corpus.val, [32, 64], train_len=16, n_tokens=640)


def _fake_study(segment_losses, seeds=(0,), far=None):
    """A study result holding only what the paired comparison reads: {label: [per-seed segment
    losses]} at length 16 (the training length), and with ``far`` the same at length 64; its
    comparison made by ``compare_schemes``, as ``run_study`` makes it."""
    from types import SimpleNamespace

    from posbias.study import Arm, compare_schemes

    recs = [{"label": label, "eval_len": n, "seed": seed, "segment_loss": list(map(float, seg))}
            for n, table in ((16, segment_losses), (64, far or {}))
            for label, per_seed in table.items() for seed, seg in zip(seeds, per_seed)]
    cfg = SimpleNamespace(seeds=list(seeds), lengths=lambda: [16, 64] if far else [16], train_len=16)
    arms = [Arm(label, label, {}) for label in segment_losses]
    paired, paired_ratio = compare_schemes(cfg, recs, arms)
    return SimpleNamespace(config=cfg, records=recs, arms=arms, paired=paired, paired_ratio=paired_ratio, unigram={})


def test_extrapolation_is_compared_paired_across_lengths_and_schemes():
    """ppl@64 / ppl@16 relative to the smallest such ratio: a holds its loss past L, b loses 0.01 nats
    more on every segment, c is better everywhere but degrades by 0.05: c is best at each length and
    worst at length generalisation, and the column says so."""
    from posbias.report.study import _paired_section

    g = torch.Generator().manual_seed(1)
    d = torch.rand(12, generator=g, dtype=torch.float64) + 1
    study = _fake_study({"a": [d], "b": [d + 0.005], "c": [d - 0.1]},
                        far={"a": [d - 0.02], "b": [d - 0.005], "c": [d - 0.05]})
    ext = study.paired_ratio
    assert ext["a"][:3] == (1.0, 1.0, 1.0) and ext["a"].best
    assert ext["b"].ratio == pytest.approx(math.exp(0.01), rel=1e-9) and 1.0 < ext["b"].lo
    assert ext["c"].ratio == pytest.approx(math.exp(0.07), rel=1e-9)
    assert study.paired[64]["c"][:3] == (1.0, 1.0, 1.0)
    assert "ppl@64 / ppl@16" in "\n".join(_paired_section(study))


def test_summary_says_what_the_tables_show():
    """The summary's sentences follow the intervals: a ratio whose interval lies below 1 falls, above 1
    grows, across 1 does not change beyond the noise (with several seeds: in every seed); the best at
    each length and in length generalisation, with the schemes not distinguishable from it."""
    from posbias.report.study import summary

    g = torch.Generator().manual_seed(1)
    d = torch.rand(12, generator=g, dtype=torch.float64) + 1
    study = _fake_study({"a": [d], "b": [d + 0.005], "c": [d - 0.1]},
                        far={"a": [d - 0.02], "b": [d - 0.005], "c": [d - 0.05]})
    bounds = {"a": (0.98, 0.97, 0.99), "b": (0.995, 0.98, 1.01), "c": (1.05, 1.04, 1.06)}
    for r in study.records:
        if r["eval_len"] == 64:
            r["ratio"], r["ratio_lo"], r["ratio_hi"] = bounds[r["label"]]
    lines = summary(study)
    assert lines[2] == ("* **From L = 16 to 64 tokens (4 L), perplexity** grows for c (1.05×); falls for a (0.98×); "
                        "does not change beyond the noise for b (0.995×) (grows, falls: the 95% interval of "
                        "ppl@64 / ppl@16 lies above, below 1; mean ratio in brackets).")
    # each verdict's interval end nearest 1, nearest first (b, no change, has none)
    assert lines[3] == ("* **How near 1 those intervals come** (the end nearest 1; the nearer, the more easily "
                        "another sample of the text turns the answer): a 0.990, c 1.040.")
    assert lines[4] == "* **Best at L = 16:** c; every other scheme is worse beyond the noise."
    assert lines[5] == "* **Best at 64:** c; every other scheme is worse beyond the noise."
    assert lines[6].startswith("* **Best in length generalisation (the smallest ppl@longest / ppl@L):** a; ")
    assert lines[7].startswith("* **One seed (0):** every interval here is over the text scored")
    # an interval that ends at exactly 1 reaches it: no change beyond the noise, either way
    for r in study.records:
        if r["eval_len"] == 64 and r["label"] in ("b", "c"):
            r["ratio"], r["ratio_lo"], r["ratio_hi"] = {"b": (1.02, 1.0, 1.04), "c": (0.98, 0.96, 1.0)}[r["label"]]
    assert "; does not change beyond the noise for b (1.02×), c (0.98×) (grows" in summary(study)[2]
    # two seeds: a ratio counts as growing only if it grows in each
    two = _fake_study({"a": [d, d], "b": [d + 0.005, d + 0.004]}, seeds=(0, 1), far={"a": [d, d], "b": [d, d]})
    for r in two.records:
        if r["eval_len"] == 64:
            r["ratio"], r["ratio_lo"], r["ratio_hi"] = (1.1, 1.05, 1.15) if r["seed"] == 0 else (1.01, 0.99, 1.03)
    assert "does not change beyond the noise for a (1.06×), b (1.06×)" in summary(two)[2]
    assert "in every seed" in summary(two)[2] and not any("One seed" in line for line in summary(two))
    assert not any("How near 1" in line for line in summary(two))  # no verdict, no ends
    # both seeds fall: the end nearest 1 is the seed whose interval reaches closest, and it is named
    for r in two.records:
        if r["eval_len"] == 64 and r["label"] == "a":
            r["ratio"], r["ratio_lo"], r["ratio_hi"] = (0.95, 0.94, 0.96) if r["seed"] == 0 else (0.98, 0.96, 0.997)
    assert ("* **How near 1 those intervals come** (the end nearest 1, in the seed where it is nearest; the nearer, "
            "the more easily another sample of the text turns the answer): a 0.997 (seed 1).") in summary(two)


def test_the_byte_frequency_reference_scores_the_studys_tokens():
    """A model that predicts every byte by its training-split frequency (add-one smoothed) scores, at
    every length, exactly the per-segment losses of the reference: same tokens, same segments; its
    ratio to the reference is 1 with the interval [1, 1]. A bigram-aware model's is below 1."""
    from types import SimpleNamespace

    from torch import nn

    from posbias.data import Corpus
    from posbias.evaluate import length_study
    from posbias.study import against_unigram, unigram_segment_losses

    g = torch.Generator().manual_seed(0)
    text = torch.cat([torch.randint(97, 123, (3000,), generator=g), torch.full((500,), 32)]).to(torch.uint8)
    corpus = Corpus("t", train=text[torch.randperm(3500, generator=g)], val=text[:2000], test=text[:10], fingerprint={})
    counts = torch.bincount(corpus.train.long(), minlength=256).double() + 1
    logp = (counts / counts.sum()).log().float()

    class Frequencies(nn.Module):
        def forward(self, idx):
            return logp.expand(*idx.shape, 256)

    scores = length_study(Frequencies(), corpus.val, [16, 64], train_len=16, n_tokens=64 * 12)
    ref = unigram_segment_losses(corpus, 64, 12)
    for n in (16, 64):
        torch.testing.assert_close(torch.tensor(scores[n]["segment_loss"], dtype=torch.float64), ref, atol=1e-6, rtol=0)
    records = [{"label": "freq", "seed": 0, "eval_len": n, **scores[n]} for n in (16, 64)]
    cfg = SimpleNamespace(train_len=16, lengths=lambda: [16, 64])
    u = against_unigram(cfg, records, ref)
    assert u["ppl"] == pytest.approx(math.exp(float(ref.mean())))
    assert u["ppl_lo"] < u["ppl"] < u["ppl_hi"]
    (only, _) = u["at"]
    assert only["eval_len"] == 16 and u["at"][1]["eval_len"] == 64
    assert only["label"] == "freq" and only["ratio"] == pytest.approx(1, abs=1e-6)
    assert only["lo"] == pytest.approx(1, abs=1e-6) and only["hi"] == pytest.approx(1, abs=1e-6)
    better = [{**records[0], "label": "better", "segment_loss": (ref - 0.3).tolist()}]
    (b,) = against_unigram(cfg, better, ref)["at"]
    assert b["ratio"] == pytest.approx(math.exp(-0.3)) and b["hi"] < 1
    old = [{**records[0], "segment_loss": None}]  # an older posbias's record: left out, not a wrong number
    assert against_unigram(cfg, old, ref)["at"] == []


def test_summary_flags_models_no_better_than_byte_frequencies_first():
    """A model whose ppl at L is not below the byte-frequency reference's beyond the noise is named in the
    summary's first line, with its ratio and interval (its length verdict is about a model that uses no
    context); the reference's perplexity and the models' range against it are given for scale. A study
    whose models all beat it gets no warning. Ratios near 1 keep the digits that tell them from 1."""
    from posbias.report.study import summary, times
    from posbias.study import against_unigram

    g = torch.Generator().manual_seed(1)
    u = torch.rand(12, generator=g, dtype=torch.float64) + 2
    noise = (torch.rand(12, generator=g, dtype=torch.float64) - 0.5) * 0.2
    study = _fake_study({"a": [u - 1], "b": [u + noise], "c": [u + 0.01 * noise]}, far={"a": [u + 0.5], "b": [u], "c": [u]})
    study.unigram = against_unigram(study.config, study.records, u)
    for r in study.records:
        if r["eval_len"] == 64:
            r["ratio"], r["ratio_lo"], r["ratio_hi"] = 1.003, 1.001, 1.005
    lines = summary(study)
    assert lines[2].startswith("* **Learned little: b 1.0") and ", c 1.0" in lines[2]
    assert f"are not below the perplexity of byte frequencies ({math.exp(float(u.mean())):.2f}) beyond the noise at L = 16" in lines[2]
    assert "a " not in lines[2].split(":")[1].split("are not")[0]
    assert "they predict each byte by how often it occurs" in lines[2]  # b and c: the plural
    assert lines[3].startswith("* **From L = 16 to 64 tokens") and "grows for a (1.003×), b (1.003×), c (1.003×)" in lines[3]
    scale = next(line for line in lines if line.startswith("* **For scale:**"))
    a = next(e for e in study.unigram["at"] if e["label"] == "a" and e["eval_len"] == 16)
    assert f"from a {a['ratio']:.3f}× [{a['lo']:.3f}, {a['hi']:.3f}] to " in scale and a["ratio"] == pytest.approx(math.exp(-1))
    top = max((e for e in study.unigram["at"] if e["eval_len"] == 16), key=lambda e: e["ratio"])  # to the highest
    assert f" to {top['label']} {top['ratio']:.3f}× [{top['lo']:.3f}, {top['hi']:.3f}] of that; " in scale
    # at the longest length a is 0.5 nats above the reference on every segment: worse than no context
    assert scale.endswith(f"; at 64, a {math.exp(0.5):.3f}× [{math.exp(0.5):.3f}, {math.exp(0.5):.3f}] reads above it, "
                          "beyond the noise: worse there than no context at all.")

    def scored(fake):  # against the reference, and no change from L to the longest length
        fake.unigram = against_unigram(fake.config, fake.records, u)
        for r in fake.records:
            r["ratio"], r["ratio_lo"], r["ratio_hi"] = 1.0, 0.99, 1.01
        return fake

    trained = scored(_fake_study({"a": [u - 1], "b": [u - 0.5]}, far={"a": [u - 1], "b": [u - 0.5]}))
    assert not any("Learned little" in line for line in summary(trained))
    assert next(line for line in summary(trained) if line.startswith("* **For scale:**")).endswith("of that.")
    one = scored(_fake_study({"a": [u - 1]}, far={"a": [u - 1]}))  # one model: its ratio, not a range
    (e,) = [e for e in one.unigram["at"] if e["eval_len"] == 16]
    assert next(line for line in summary(one) if line.startswith("* **For scale:**")).endswith(
        f"at L = 16 the models read a {e['ratio']:.3f}× [{e['lo']:.3f}, {e['hi']:.3f}] of that.")
    # two seeds, one of them no better than byte frequencies: that seed is named, in the singular
    two = scored(_fake_study({"a": [u - 1, u - 1], "b": [u + noise, u - 1]}, seeds=(0, 1), far={"a": [u, u], "b": [u, u]}))
    (e,) = [e for e in two.unigram["at"] if e["eval_len"] == 16 and e["label"] == "b" and e["seed"] == 0]
    little = summary(two)[2]
    assert little.startswith(f"* **Learned little: b (seed 0) {e['ratio']:.3f}× [{e['lo']:.3f}, {e['hi']:.3f}] ")
    assert "(seed 1)" not in little and "it predicts each byte by how often it occurs" in little
    assert [times(x) for x in (3.879, 0.983, 1.003, 0.9996, 1.0, 1.00004)] == ["3.88", "0.983", "1.003", "0.9996", "1", "1.00004"]


def test_ratio_plot_shows_the_schemes_near_one_on_their_own_scale(tmp_path, monkeypatch):
    """ratio_vs_length.png: ppl@n / ppl@L with its band (one seed: the paired interval); a second,
    linear panel for the schemes whose band stays under ZOOM when some scheme goes past it; a log axis
    only over a range wider than 2×."""
    pytest.importorskip("matplotlib")
    import posbias.plot
    from posbias.plot import pyplot
    from posbias.report.study import ZOOM, _ratio_plot

    d = torch.rand(12, dtype=torch.float64) + 1
    study = _fake_study({"a": [d], "b": [d], "c": [d]}, far={"a": [d], "b": [d], "c": [d]})
    ends = {"a": (0.97, 0.96, 0.98), "b": (1.01, 0.99, 1.03), "c": (3.5, 3.1, 3.9)}
    for r in study.records:
        r["ratio"], r["ratio_lo"], r["ratio_hi"] = ends[r["label"]] if r["eval_len"] == 64 else (1.0, 1.0, 1.0)
    figs = []
    monkeypatch.setattr(posbias.plot, "save_figure", lambda fig, path: figs.append(fig) or path)
    plt = pyplot()
    colors = plt.get_cmap("tab10")
    _ratio_plot(study, tmp_path / "r.png", plt, colors)
    wide, zoom = figs[-1].axes
    assert wide.get_yscale() == "log" and zoom.get_yscale() == "linear"
    assert [line.get_label() for line in wide.get_lines() if not line.get_label().startswith("_")] == ["a", "b", "c"]
    assert [line.get_label() for line in zoom.get_lines() if not line.get_label().startswith("_")] == ["a", "b"]
    assert list(zoom.get_lines()[0].get_ydata()) == [1.0, 0.97] and 3.9 > ZOOM
    near = _fake_study({"a": [d], "b": [d]}, far={"a": [d], "b": [d]})
    for r in near.records:
        r["ratio"], r["ratio_lo"], r["ratio_hi"] = ends[r["label"]] if r["eval_len"] == 64 else (1.0, 1.0, 1.0)
    _ratio_plot(near, tmp_path / "n.png", plt, colors)
    (only,) = figs[-1].axes  # every scheme near 1: one panel, linear
    assert only.get_yscale() == "linear"
    for fig in figs:
        plt.close(fig)


def test_the_study_scores_sixty_four_segments_unless_told_and_warns_below():
    """eval_tokens left out (the default and every preset) is evaluate.SEGMENTS segments of the longest
    length; an explicit count is kept; fewer segments than that get a warning in the summary (intervals
    over few segments measured too narrow: docs/study.md, "Do the intervals now mean 95%?")."""
    from posbias.evaluate import SEGMENTS
    from posbias.report.study import summary
    from posbias.study import PRESETS, StudyConfig

    assert SEGMENTS == 64 and StudyConfig().eval_tokens == 64 * 2048
    for name, preset in PRESETS.items():
        cfg = StudyConfig(**preset)
        assert cfg.eval_tokens == SEGMENTS * max(cfg.lengths()), name
    assert StudyConfig(**{**PRESETS["demo"], "eval_lens": (64, 128)}).eval_tokens == SEGMENTS * 128
    assert StudyConfig(eval_tokens=8 * 2048).eval_tokens == 8 * 2048
    for bad in (0, 1024):
        with pytest.raises(ValueError, match="eval_tokens"):
            StudyConfig(eval_tokens=bad)
    # fewer than 8 segments: an interval over them held the text's value in at most 84% of draws (1: never)
    for bad, count in ((2048, "1 segment"), (7 * 2048 + 2047, "7 segments")):
        with pytest.raises(ValueError, match=rf"eval_tokens {bad:,} scores {count} of 2048, fewer than the 8 an "
                                             r"interval needs .*; give 16,384 or more"):
            StudyConfig(eval_tokens=bad)
    d = torch.rand(12, dtype=torch.float64) + 1
    study = _fake_study({"a": [d], "b": [d + 0.1]}, far={"a": [d], "b": [d + 0.1]})
    for segments, warned in ((12, True), (SEGMENTS, False)):
        for r in study.records:
            r.update(segments=segments, ratio=1.0, ratio_lo=0.99, ratio_hi=1.01)
        lines = summary(study)
        assert any(line.startswith(f"* **Only {segments} segments scored (fewer than 64)") for line in lines) is warned


def test_paired_table_sees_a_difference_the_overlapping_intervals_hide():
    """Text segments of very different difficulty, and scheme b 0.02 nats worse than a on every one:
    the paired ratio is exp(0.02) with an interval of that width only, while the schemes' own
    bootstrap intervals overlap widely. A scheme equal to the best within noise is marked (≈ best)."""
    from posbias.evaluate import bootstrap_means, interval
    from posbias.report.study import _paired_section

    g = torch.Generator().manual_seed(0)
    difficulty = torch.rand(16, generator=g, dtype=torch.float64) * 2 + 1  # 1 … 3 nats per token
    noise = (torch.rand(16, generator=g, dtype=torch.float64) - 0.5) * 0.02
    study = _fake_study({"a": [difficulty], "b": [difficulty + 0.02], "c": [difficulty + noise]})
    table = study.paired[16]
    best = min(table, key=lambda k: table[k][0])
    assert table[best][:3] == (1.0, 1.0, 1.0) and table[best].best and best in ("a", "c")
    assert sum(p.best for p in table.values()) == 1
    ratio, lo, hi, *_ = table["b"]
    assert ratio == pytest.approx(math.exp(0.02 - (0 if best == "a" else float(noise.mean()))), rel=1e-9)
    assert 1.0 < lo <= ratio <= hi and hi - lo < 0.02
    own = [interval(bootstrap_means(x[:, None], torch.ones(16, 1), n_boot=2000)[:, 0].exp())
           for x in (difficulty, difficulty + 0.02)]
    assert own[1][0] < own[0][1]  # unpaired: the intervals overlap
    other = "c" if best == "a" else "a"
    assert table[other][1] <= 1.0 and "(≈ best)" in "\n".join(_paired_section(study))
    # several seeds: per-segment losses averaged over seeds before pairing
    two = _fake_study({"a": [difficulty, difficulty + 0.04], "b": [difficulty + 0.05, difficulty + 0.05]}, seeds=(0, 1))
    b = two.paired[16]["b"]
    assert b.ratio == pytest.approx(math.exp(0.03), rel=1e-9)
    assert b.per_seed == pytest.approx((math.exp(0.05), math.exp(0.01)), rel=1e-9)  # seed by seed against a
    section = "\n".join(_paired_section(two))
    assert "averaged over seeds" in section and "seeds 1.010–1.051" in section
    # one seed: no seed-by-seed ratios to give
    assert all(p.per_seed == () for p in table.values())
    # one scheme: nothing to compare, no table
    one = _fake_study({"a": [difficulty]})
    assert one.paired == {} and one.paired_ratio == {} and _paired_section(one) == []


# The end of a torchrun test script: it says it finished, then tears the group down and leaves without the
# interpreter's finalisation. Gloo's teardown can abort a process that has finished everything: once in
# a clean clone's `make test` (2026-12-05), rank 1 of a resumed run printed its last step, then "terminate
# called without an active exception" (SIGABRT), and torchrun failed the run; PyTorch describes Gloo's
# worker threads outliving the interpreter at exit (pytorch/pytorch#179291).
FINISHED = "posbias-test: the script finished"
END_GROUP = ("import os, torch.distributed as dist\n"
             f"print({FINISHED!r}, flush=True)\n"
             "if dist.is_initialized():\n    dist.destroy_process_group()\n"
             "import sys\nsys.stdout.flush()\nsys.stderr.flush()\nos._exit(0)\n")
TEARDOWN_ABORT = "terminate called without an active exception"


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(corpus, tmp_path):
    """torchrun with 2 CPU processes (gloo) gives the single-process result within tolerance."""
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, torch\n"
        "from posbias.data import stdlib_corpus\nfrom posbias.model import ModelConfig\n"
        "from posbias.train import TrainConfig, train\n"
        "c = stdlib_corpus()\n"
        "train(ModelConfig(scheme='t5', d_model=32, n_layers=2, n_heads=2),"
        " TrainConfig(steps=4, batch_size=4, train_len=32, warmup=1, eval_every=0, ckpt_every=4, eval_batches=1),"
        " c.train, c.val, sys.argv[1], progress=False)\n" + END_GROUP)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "single")], check=True, env=env)
    got = _torchrun(script, str(tmp_path / "ddp"), env=env, capture_output=True)
    assert got.returncode == 0, got.stderr[-3000:]
    a = ckpt.load_model(tmp_path / "single" / "final").state_dict()
    b = ckpt.load_model(tmp_path / "ddp" / "final").state_dict()
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-5, rtol=1e-4, msg=n)


def test_a_study_under_torchrun_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    """Under torchrun each process ran the study as a run sharing the folder: one took the model, whose
    training waited for the other process in DDP's set-up while that one waited for the model: a hang
    with no message (seen 2026-12-04). Refused before any work, saying what to do instead."""
    from posbias.study import StudyConfig, run_study

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="WORLD_SIZE is 2 \\(torchrun\\).*start the same command once per core or GPU"):
        run_study(StudyConfig(schemes=("alibi",), train_len=16, eval_lens=(16, 32), steps=1), tmp_path / "o",
                  corpus=stdlib_corpus())
    assert main(["extrapolate", "--schemes", "alibi", *STUDY, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "WORLD_SIZE is 2" in err and not (tmp_path / "o").exists()


# what the launcher says when the port it was given was taken before it listened: nothing ran yet
RENDEZVOUS_FAILED = ("EADDRINUSE", "failed to listen on any local network address")


def _torchrun(script: Path, *args: str, env: dict, start=subprocess.run, **kw):
    """``script`` under torchrun with 2 CPU processes (gloo) on a free port; ``start``'s result. Where the
    launcher could not listen on that port (another process took it first, on a busy machine) nothing
    has run, and it runs once more on another. Any other failure is returned as it is: a run that failed
    after training could not be run again unseen (a resumed run had trained to the end, failed, and its
    retry found nothing left to do and printed nothing: 2026-12-04)."""
    for attempt in range(2):
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
        got = start([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                     str(script), *args], env=env, text=True, **kw)
        if start is subprocess.run and got.returncode and _only_the_teardown_failed(got):
            got.returncode = 0  # (every check after this reads what the runs saved)
        if start is not subprocess.run or got.returncode == 0 or attempt:
            return got
        if not any(sign in (got.stderr or "") + (got.stdout or "") for sign in RENDEZVOUS_FAILED):
            return got


def _only_the_teardown_failed(got: subprocess.CompletedProcess) -> bool:
    """Whether both processes of a failed torchrun finished the script (:data:`FINISHED`) and one then
    aborted in Gloo's teardown (:data:`TEARDOWN_ABORT`), and nothing else went wrong."""
    out = (got.stdout or "") + (got.stderr or "")
    return out.count(FINISHED) == 2 and TEARDOWN_ABORT in out and "Traceback (most recent call last)" not in (
        out.split(TEARDOWN_ABORT)[0])


def test_only_a_teardown_abort_after_both_processes_finished_is_forgiven():
    def run(out: str, err: str) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess([], 1, out, err)

    both = f"step 400\n{FINISHED}\n{FINISHED}\n"
    launcher = "Traceback (most recent call last):\n  ChildFailedError"
    assert _only_the_teardown_failed(run(both, f"{TEARDOWN_ABORT}\n{launcher}"))
    assert not _only_the_teardown_failed(run(f"step 400\n{FINISHED}\n", f"{TEARDOWN_ABORT}\n{launcher}"))
    assert not _only_the_teardown_failed(run(both, launcher))  # another failure
    assert not _only_the_teardown_failed(run(both, f"Traceback (most recent call last):\nValueError\n{TEARDOWN_ABORT}"))


@pytest.mark.slow
def test_ddp_processes_interrupted_together_save_one_step_and_resume_bit_identically(tmp_path, python_sigint):
    """Ctrl-C (or a scheduler's SIGTERM) reaches torchrun, which passes it to every process: they hold it
    to the end of the step, agree on that step (any one interrupted stops all), save it and stop, and
    the re-run resumes from it to the weights of an uninterrupted run, bit for bit. Before, processes
    training together did not hold it: up to ckpt_every (here 50) steps were lost."""
    import signal
    import time

    script = tmp_path / "run.py"
    script.write_text(
        "import sys\nfrom posbias.data import stdlib_corpus\nfrom posbias.model import ModelConfig\n"
        "from posbias.train import TrainConfig, train\n"
        "c = stdlib_corpus()\n"
        "train(ModelConfig(scheme='t5', d_model=64, n_layers=2, n_heads=2),"
        " TrainConfig(steps=400, batch_size=8, train_len=64, warmup=1, eval_every=0, ckpt_every=50, eval_batches=1),"
        " c.train, c.val, sys.argv[1], progress=False, log=lambda m: print(m, flush=True))\n" + END_GROUP)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = _torchrun(script, str(tmp_path / "cut"), env=env, start=subprocess.Popen, stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not ckpt.exists(tmp_path / "cut" / "last") and time.time() < deadline and run.poll() is None:
        time.sleep(0.05)
    run.send_signal(signal.SIGINT)  # what Ctrl-C sends the launcher (its processes run in sessions of their own)
    out, _ = run.communicate(timeout=120)
    said = [line for line in out.splitlines() if "stopped after step" in line]
    assert run.returncode != 0 and len(said) == 1, out[-3000:]
    step = int(said[0].split("stopped after step ")[1].split()[0])
    assert ckpt.load_trainer_state(tmp_path / "cut" / "last")["step"] == step and 50 <= step < 400
    assert not ckpt.exists(tmp_path / "cut" / "final")
    resumed = _torchrun(script, str(tmp_path / "cut"), env=env, capture_output=True)
    assert resumed.returncode == 0 and f"resuming from step {step} of 400" in resumed.stdout, (
        resumed.stdout[-2000:] + resumed.stderr[-3000:])
    whole = _torchrun(script, str(tmp_path / "whole"), env=env, capture_output=True)
    assert whole.returncode == 0, whole.stderr[-3000:]
    a = ckpt.load_model(tmp_path / "cut" / "final").state_dict()
    b = ckpt.load_model(tmp_path / "whole" / "final").state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.slow
def test_readme_workflow_snippet_runs(tmp_path, monkeypatch):
    """The README's library example (config → run → report) runs as written, with fewer steps."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    snippet = re.search(r"The workflows are plain library calls too:\n\n```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(snippet.replace("steps=50", "steps=3"), {"print": lambda *a, **k: None})
    assert (tmp_path / "runs" / "mine" / "results.md").exists()


def test_run_study_refuses_a_device_this_machine_lacks_before_any_work(tmp_path):
    """The library as the CLI: a device that is not cpu/cuda[:N], or CUDA on a machine without it, is a
    ValueError naming the setting before any folder is made (was torch's RuntimeError or AssertionError
    once the first model moved to it)."""
    from posbias.data import Corpus
    from posbias.study import StudyConfig, run_study

    text = torch.randint(0, 256, (4000,), dtype=torch.uint8)
    corpus = Corpus("t", train=text, val=text, test=text[:10], fingerprint={})
    bad = ["tpu", "nonsense!"] + ([] if torch.cuda.is_available() else ["cuda", "cuda:1"])
    for device in bad:
        with pytest.raises(ValueError, match=r"^device .*(is not a device|posbias runs on cpu or cuda|no CUDA device)"):
            run_study(StudyConfig(device=device, steps=1, train_len=16, eval_lens=(16, 32)), tmp_path / "o", corpus=corpus)
        assert not (tmp_path / "o").exists()


def test_a_training_split_one_token_short_of_a_sequence_is_refused_before_any_model(tmp_path):
    """The training split needs L + 2 tokens (``batch_at`` draws a window's start from 0 … n − L − 2):
    L + 1 is refused naming both counts, before any folder or model is made; L + 2 trains."""
    from posbias.data import Corpus
    from posbias.study import StudyConfig, run_study

    val = torch.randint(0, 256, (4000,), dtype=torch.uint8)
    cfg = StudyConfig(schemes=("t5",), train_len=16, eval_lens=(16, 32), steps=1, batch_size=2, d_model=32, n_layers=1,
                      n_heads=2)
    corpus = Corpus("t", train=val[:17], val=val, test=val[:10], fingerprint={})
    with pytest.raises(ValueError, match=r"^train_len 16 needs more than 17 training tokens, but the training split "
                                         r"has 17; use a shorter training length or more data$"):
        run_study(cfg, tmp_path / "o", corpus=corpus)
    assert not (tmp_path / "o").exists()
    enough = Corpus("t", train=val[:18], val=val, test=val[:10], fingerprint={})  # L + 2: one window, and it trains
    assert len(run_study(cfg, tmp_path / "o2", corpus=enough).records) == 2


def test_the_time_left_reads_in_units_a_person_reads():
    """The study's estimate of the time left ("at most about 0 min left" for a 16 s model, once)."""
    from posbias.study import _duration

    assert [_duration(t) for t in (16, 89.4, 90, 100, 89 * 60, 90 * 60, 4 * 3600)] == [
        "16 s", "89 s", "2 min", "2 min", "89 min", "1.5 h", "4.0 h"]


def test_the_pictures_of_a_study_of_several_seeds_show_its_first_seed(tmp_path, text_file):
    """The loss-by-position curve and the trained bias drawn for a scheme are its first seed's (those
    of the other seeds are in their models' files)."""
    from posbias.data import local_corpus
    from posbias.study import StudyConfig, run_study

    cfg = StudyConfig(schemes=("t5",), seeds=(0, 1), train_len=16, eval_lens=(16, 32), steps=2, batch_size=4,
                      d_model=32, n_layers=1, n_heads=2, eval_tokens=256, threads=1)
    res = run_study(cfg, tmp_path / "s", corpus=local_corpus(text_file))
    model = {seed: next((tmp_path / "s" / "models").glob(f"t5-seed{seed}-*")) for seed in (0, 1)}
    curve = {seed: json.loads(next(model[seed].glob("eval-*.json")).read_text())["scores"]["32"]["loss_by_position"]
             for seed in (0, 1)}
    assert res.positions["t5"] == curve[0] != curve[1]
    first = ckpt.load_model(model[0] / "final").scheme.table
    assert torch.equal(res.schemes["t5"].table, first) and not torch.equal(
        first, ckpt.load_model(model[1] / "final").scheme.table)


def test_the_time_left_is_the_mean_training_time_times_the_models_left(tmp_path, text_file, monkeypatch):
    """After each model trained, the study says its time and at most how long the rest take: the mean
    time of the models trained so far × the models left; nothing after the last, nor for a reused one."""
    from posbias import study
    from posbias.data import local_corpus

    real, took = study._train_one, iter([60.0, 120.0, 30.0])
    monkeypatch.setattr(study, "_train_one", lambda *a, **k: (real(*a, **k), next(took))[1])
    cfg = study.StudyConfig(schemes=("alibi", "nope", "t5"), train_len=16, eval_lens=(16,), steps=2, batch_size=4,
                            d_model=32, n_layers=1, n_heads=2, eval_tokens=256, threads=1)
    said, corpus = [], local_corpus(text_file)
    study.run_study(cfg, tmp_path / "s", corpus=corpus, log=said.append)
    assert [line for line in said if "left for" in line] == [
        "[1/3 alibi seed 0] trained in 60 s; at most about 2 min left for 2 model(s)",  # 60 s × 2
        "[2/3 nope seed 0] trained in 120 s; at most about 2 min left for 1 model(s)"]  # (60 + 120) / 2 s × 1
    # each model's first line names its options as the reports write them (a Python dict was printed)
    assert [line for line in said if " training 2 steps" in line] == [
        "[1/3 alibi seed 0] training 2 steps at length 16 (no options)",
        "[2/3 nope seed 0] training 2 steps at length 16 (no options)",
        f"[3/3 t5 seed 0] training 2 steps at length 16 (max_distance="
        f"{study.get_scheme_class('t5').study_defaults(16, {})['max_distance']})"]
    said.clear()
    study.run_study(cfg, tmp_path / "s", corpus=corpus, log=said.append)  # all reused
    assert not [line for line in said if "left for" in line]


def test_a_report_of_other_settings_is_replaced_with_a_note(tmp_path, text_file):
    """Two studies with other settings in one folder share its models (keyed) but not its report: the
    second one's ``results.md`` replaces the first's, and says so, naming what differs; a re-run of the same
    study says nothing. The same for a retrofit with another target."""
    from posbias.data import local_corpus
    from posbias.report import study as study_report
    from posbias.report import retrofit as retrofit_report
    from posbias.retrofit import RetrofitConfig, run_retrofit
    from posbias.study import StudyConfig, run_study

    corpus = local_corpus(text_file)
    cfg = StudyConfig(schemes=("alibi",), train_len=16, eval_lens=(16, 32), steps=2, batch_size=4, d_model=32,
                      n_layers=1, n_heads=2, eval_tokens=256, threads=1)
    said = []
    for c in (cfg, cfg, dataclasses.replace(cfg, steps=3, schemes=("alibi", "nope"))):
        study_report.write(run_study(c, tmp_path / "s", corpus=corpus), tmp_path / "s", log=said.append)
    assert said == [f"note: {tmp_path / 's'} held the report of another study with other study.schemes, study.steps; "
                    "this run's report replaces it (that run's models and caches stay: re-running its command "
                    "rewrites its report)"]
    model = next((tmp_path / "s" / "models").glob("alibi-*")) / "final"
    said.clear()
    for to in (32, 32, 64):
        rc = RetrofitConfig(to=to, methods=("swap-t5",), eval_tokens=512, threads=1)
        retrofit_report.write(run_retrofit(model, rc, tmp_path / "r", corpus=corpus), tmp_path / "r", log=said.append)
    assert len(said) == 1 and said[0].startswith(f"note: {tmp_path / 'r'} held the report of another retrofit with "
                                                 "other config.to; this run's report replaces it"), said


@pytest.mark.parametrize("kwargs, match", [
    ({"scheme_options": 3}, r"scheme_options must map scheme names to dicts of options"),
    ({"scheme_options": {"t5": 128}}, r"scheme_options must map scheme names to dicts of options"),
    ({"d_model": 10**30, "n_heads": 1}, r"d_model 10{30} is too large for a model".replace("10{30}", str(10**30))),
])
def test_study_config_refuses_what_is_not_a_setting_with_a_value_error(kwargs, match):
    """Found by feeding every StudyConfig field bad values: these two went out as AttributeError and
    OverflowError from deep inside instead of an error naming the setting."""
    from posbias.study import StudyConfig

    with pytest.raises(ValueError, match=match):
        StudyConfig(**kwargs)


def test_a_model_whose_interval_reaches_one_exactly_learned_little():
    """``learned_little``: a ratio to byte frequencies whose interval *reaches* 1 does not lie below it
    beyond the noise, even where it ends at exactly 1."""
    from posbias.study import learned_little

    assert learned_little({"ratio": 0.99, "lo": 0.98, "hi": 1.0})
    assert not learned_little({"ratio": 0.99, "lo": 0.98, "hi": math.nextafter(1.0, 0.0)})


def test_a_checked_study_config_cannot_be_changed_after_its_checks():
    """StudyConfig and its arms are checked when made; a frozen dataclass keeps a later assignment (a
    steps of 0, a label that is no longer its scheme's) from skipping those checks."""
    from posbias.study import StudyConfig, arms

    cfg = StudyConfig(schemes=("t5",), train_len=16, eval_lens=(16,), steps=2, batch_size=4, d_model=32, n_layers=1,
                      n_heads=2, eval_tokens=256, threads=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 0
    (arm,) = arms(cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        arm.label = "alibi"


def test_a_record_holds_its_models_training_history_and_the_times_measured(tmp_path, text_file, monkeypatch):
    """Each record's ``final_val_loss`` and ``train_wall_s`` are the model's own training history's last
    validation loss and wall time; the time a model took to train (the ETA's input) and the time its
    evaluation took (``wall_s`` of its evaluation file) are durations within the run's own."""
    from posbias import study

    real, took = study._train_one, []
    monkeypatch.setattr(study, "_train_one", lambda *a, **k: took.append(real(*a, **k)) or took[-1])
    cfg = study.StudyConfig(schemes=("alibi", "t5"), train_len=16, eval_lens=(16, 32), steps=3, batch_size=4,
                            d_model=32, n_layers=1, n_heads=2, eval_tokens=256, threads=1)
    t0 = time.perf_counter()
    res = study.run_study(cfg, tmp_path / "s", corpus=local_corpus(text_file))
    elapsed = time.perf_counter() - t0
    assert len(took) == 2 and all(0 < t < elapsed for t in took)
    for r in res.records:
        hist = ckpt.read_meta(Path(r["model_dir"]) / "final")["history"]
        assert r["final_val_loss"] == hist["val_loss"][-1][1] and math.isfinite(r["final_val_loss"])
        assert r["train_wall_s"] == hist["wall_s"] and 0 < r["train_wall_s"] < elapsed
        (efile,) = Path(r["model_dir"]).glob("eval-*.json")
        assert 0 < json.loads(efile.read_text())["wall_s"] < elapsed


def test_the_study_figures_draw_each_band_and_panel_they_name(tmp_path, monkeypatch, saved_figures):
    """What the study's figures are asked to draw, where a file of the right name is not enough: with
    several seeds each band is the mean ± std over the seeds (not one seed's interval) and the titles
    say so; with one seed the band is that seed's interval, titled as such; the ratio figure's second
    panel (its own title) holds the schemes near 1; the loss-by-position figure draws the schemes
    whose curve was kept, and only those; the byte-frequency reference is drawn at its perplexity, or at
    its loss where the axis is a loss; the learned biases are drawn to the longest length."""
    from types import SimpleNamespace

    from posbias.report.study import ZOOM, plots
    from posbias.schemes import build
    from posbias.study import Arm

    drawn = figures_drawn(monkeypatch)  # the learned biases' figure: what it is asked to draw
    curve = [math.log(p + 1) for p in range(64)]  # the loss at position p: log(p + 1); the first and last marked
    curve[0] += 100
    curve[-1] += 100
    scheme = build("alibi", n_heads=2, head_dim=8)

    def study(seeds):
        recs = []
        for label, grows in (("far", 3.0), ("near", 1.01)):
            for k, seed in enumerate(seeds):
                for n in (16, 64):
                    ppl, ratio = 5.0 + k + (grows - 1) * (n > 16), (1.0 if n == 16 else grows + 0.02 * k)
                    recs.append({"label": label, "seed": seed, "eval_len": n, "ppl": ppl, "ppl_lo": ppl - 0.1 - k,
                                 "ppl_hi": ppl + 0.3, "ratio": ratio, "ratio_lo": ratio - 0.001, "ratio_hi": ratio + 0.002})
        cfg = SimpleNamespace(seeds=list(seeds), lengths=lambda: [16, 64], train_len=16)
        return SimpleNamespace(config=cfg, records=recs, arms=[Arm("far", "t5", {}), Arm("near", "alibi", {})],
                               positions={"near": curve}, schemes={"near": scheme}, unigram={"ppl": 40.0})

    def band(rs):  # the band the figure must draw at one length
        if len(rs) == 1:
            return rs[0]["ppl_lo"], rs[0]["ppl_hi"]
        m, sd = statistics.mean(r["ppl"] for r in rs), statistics.stdev(r["ppl"] for r in rs)
        return m - sd, m + sd

    for seeds in ((0, 1), (3,)):
        saved_figures.clear()
        result = study(seeds)
        plots(result, tmp_path)
        assert sorted(saved_figures) == ["loss_vs_position.png", "ppl_vs_length.png", "ratio_vs_length.png"]
        several = len(seeds) > 1
        ppl_ax = saved_figures["ppl_vs_length.png"].axes[0]
        assert ppl_ax.get_title().endswith(f"(band: {'± std over seeds' if several else '95% bootstrap interval'})")
        for label, drawn_band in zip(("far", "near"), ppl_ax.collections):  # fill_between, one per scheme in order
            want = [band([r for r in result.records if r["label"] == label and r["eval_len"] == n]) for n in (16, 64)]
            ys = drawn_band.get_paths()[0].vertices[:, 1]
            assert min(ys) == pytest.approx(min(lo for lo, _ in want)) and max(ys) == pytest.approx(max(hi for _, hi in want))
        ratio_fig = saved_figures["ratio_vs_length.png"]
        wanted = "± std over seeds" if several else "95% interval, paired over the same segments"
        assert f"(band: {wanted}; below 1" in ratio_fig._suptitle.get_text()
        zoom = ratio_fig.axes[1]
        assert [line.get_label() for line in zoom.get_lines() if not line.get_label().startswith("_")] == ["near"]
        assert zoom.get_title() == f"the schemes that stay under {ZOOM:g}×, on their own scale"
        biases = drawn["learned_bias_vs_distance.png"]  # to the longest length, on a log axis with L among them
        assert biases["max_distance"] == 64 and biases["trained"] == 16 and biases["names"] == ["near"]
        assert biases["log_distance"] is True
        position_ax = saved_figures["loss_vs_position.png"].axes[0]
        assert position_ax.get_title() == f"Loss by position in 64-token windows (seed {seeds[0]})"
        labels = [line.get_label() for line in position_ax.get_lines()]
        assert labels[0] == "near" and "far" not in labels  # the kept curve, and only it
        # binned over log-spaced bins of position + 1 from 1 to 64: each point at its bin's geometric middle,
        # with its bin's mean (≈ log x here); the first bin starts at position 1, the last ends at 64
        xs, ys = (list(map(float, v)) for v in position_ax.get_lines()[0].get_data())
        assert xs == sorted(xs) and xs[-1] < 64
        assert ys[0] == pytest.approx(100.0) and xs[0] == pytest.approx(math.sqrt(2))  # position 1 alone
        assert all(abs(y - math.log(x)) < 0.4 for x, y in zip(xs[1:-1], ys[1:-1]))
        assert ys[-1] - math.log(xs[-1]) > 1  # the last position's +100 is in the last bin's mean
        for ax, y, text in ((ppl_ax, 40.0, "40.0"), (position_ax, math.log(40.0), f"{math.log(40.0):.2f}")):
            (line,) = [x for x in ax.get_lines() if x.get_label().startswith("bytes by frequency")]  # for scale
            assert tuple(line.get_ydata()) == (y, y) and line.get_label() == f"bytes by frequency, no context ({text})"
