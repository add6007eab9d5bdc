"""The study stack: data determinism, training/resume, evaluation, the extrapolate command, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posbias import checkpoint as ckpt
from posbias.cli import main
from posbias.data import batch_at, local_corpus, stdlib_corpus
from posbias.evaluate import evaluate_length
from posbias.model import ModelConfig, TransformerLM
from posbias.train import TrainConfig, train

TINY = dict(d_model=32, n_layers=2, n_heads=2)


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


@pytest.mark.parametrize("scheme", ["t5", "rope", "sinusoidal", "fire"])
def test_kv_cache_decoding_equals_full_forward(scheme):
    model = TransformerLM(ModelConfig(scheme=scheme, **TINY)).eval()
    idx = torch.randint(0, 256, (1, 30))
    with torch.no_grad():
        full = model(idx)
        caches = [{} for _ in model.blocks]
        steps = [model(idx[:, :20], caches=caches)]
        for t in range(20, 30):
            steps.append(model(idx[:, t:t + 1], start=t, caches=caches))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)


def test_interrupted_training_resumes_to_the_same_result(corpus, tmp_path):
    mcfg = ModelConfig(scheme="alibi", **TINY)
    tcfg = TrainConfig(steps=6, batch_size=4, seq_len=32, warmup=2, eval_every=3, ckpt_every=2, eval_batches=1)
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
    with pytest.raises(ValueError, match="stride must be in"):
        evaluate_length(model, corpus.val, 32, stride=0)
    with pytest.raises(ValueError, match="evaluation lengths must be integers >= 1, got 0"):
        evaluate_length(model, corpus.val, 0)


@pytest.mark.parametrize("argv, msg", [
    (["extrapolate", "--schemes", "bogus"], "unknown scheme 'bogus'"),
    (["extrapolate", "--eval-lens", "0"], "evaluation lengths must be >= 1, got 0"),
    (["extrapolate", "--data", "/nonexistent/file.txt", "--steps", "1"], "does not exist"),
    (["extrapolate", "--steps", "0"], "--steps must be >= 1, got 0"),
])
def test_extrapolate_bad_input(argv, msg, capsys, tmp_path):
    assert main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and "\n" not in err


def test_extrapolate_end_to_end_and_reuse(tmp_path, capsys):
    text = tmp_path / "data.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(800)))
    argv = ["extrapolate", "--schemes", "alibi", "rope", "--train-len", "16", "--eval-lens", "16", "64",
            "--steps", "3", "--batch-size", "4", "--d-model", "32", "--layers", "1", "--heads", "2",
            "--eval-tokens", "256", "--data", str(text), "--out", str(tmp_path / "run"), "--quiet"]
    assert main(argv) == 0
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    recs = res["records"]
    assert {(r["scheme"], r["eval_len"]) for r in recs} == {("alibi", 16), ("alibi", 64), ("rope", 16), ("rope", 64)}
    for key in ("scheme", "train_len", "eval_len", "loss", "ppl"):
        assert all(key in r for r in recs)
    assert res["corpus"]["files"] == 1 and "torch" in res["versions"]
    assert "| alibi |" in (tmp_path / "run" / "results.md").read_text()
    assert (tmp_path / "run" / "ppl_vs_length.png").exists()
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out.count("reusing trained model") == 2


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
        " TrainConfig(steps=4, batch_size=4, seq_len=32, warmup=1, eval_every=0, ckpt_every=4, eval_batches=1),"
        " c.train, c.val, sys.argv[1], progress=False)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "single")], check=True, env=env)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                    str(script), str(tmp_path / "ddp")], check=True, env=env, capture_output=True)
    a = ckpt.load_model(tmp_path / "single" / "final").state_dict()
    b = ckpt.load_model(tmp_path / "ddp" / "final").state_dict()
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-5, rtol=1e-4, msg=n)
