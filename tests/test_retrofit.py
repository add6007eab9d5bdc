"""Retrofit and diagnose: every method on a tiny checkpoint, the passkey generator, the report,
and bad input."""

import dataclasses
import itertools
import json
import math
import re
import statistics

import pytest
import torch
from torch.nn import functional as F
from _helpers import TINY, TINY_L, main_timed, one_line_error, perturb_, tiny_checkpoint

from posbias import checkpoint as ckpt
from posbias import ntk_lambda, passkey, rope_frequencies, t5_bucket
from posbias import store
from posbias.report import digits_sentence, shuffled_key_score
from posbias.attention import attention
from posbias.cli import main
from posbias.config import ConfigError
from posbias.data import stdlib_corpus
from posbias.evaluate import MIN_SEGMENTS
from posbias.diagnose import (DiagnoseConfig, WithinWindow, _ranges, attention_distance, bias_drift, chunk_ends,
                              context_effect, context_split, delta_interval, effective_reach, final_bucket_share,
                              run_diagnose, window_effect, window_split)
from posbias.report import diagnose as diagnose_report
from posbias.report import retrofit as retrofit_report
from posbias.model import ModelConfig, TransformerLM
from posbias.retrofit import METHODS, RetrofitConfig, applicable, bucket_remap, retrofit_model, run_retrofit
from posbias.schemes import build

L = TINY_L
EVAL = MIN_SEGMENTS * 2 * L  # the fewest evaluation tokens a job at 2 L takes: 8 windows of 96


@pytest.fixture(scope="module")
def corpus():
    return stdlib_corpus()


def test_passkey_sample_layout():
    s = passkey.make_sample(100, 0.0, "48213", filler_start=3)
    text = bytes(s.tolist())
    assert len(text) == 100 and text.endswith(b" ?key=48213")
    assert text.index(b" key=48213; ") == 0  # depth 0: the key opens the window
    deep = bytes(passkey.make_sample(100, 1.0, "48213").tolist())
    assert deep.index(b" key=48213; ") == 100 - len(b" key=48213; ") - len(b" ?key=48213")
    assert sum(ch.isdigit() for ch in deep.decode()) == 10  # only the key's digits (twice)
    with pytest.raises(ValueError, match="length must be >= 23"):
        passkey.make_sample(20, 0.5, "48213")
    with pytest.raises(ValueError, match="depth"):
        passkey.make_sample(64, 1.5, "48213")
    b = passkey.make_batch(6, 64, generator=torch.Generator().manual_seed(1))
    assert b.shape == (6, 64) and len({bytes(r[-5:].tolist()) for r in b}) > 1


def test_passkey_accuracy_of_an_oracle_and_of_a_guesser():
    """Accuracy counts whole keys; the per-byte scores say which answer bytes were right: an oracle that
    gets the first k bytes right and then answers a non-digit scores 1 on those k and 0 after them, and
    solves no sample unless k is all five."""
    class Oracle(torch.nn.Module):  # copies the first `right` digits of its input to the answer positions
        def __init__(self, right=5, wrong=ord("0")):
            super().__init__()
            self.right, self.wrong = right, wrong

        def forward(self, x):
            logits = torch.zeros(*x.shape, 256)
            for b, row in enumerate(x):
                digits = [int(t) for t in row if chr(int(t)).isdigit()][:self.right]
                for n, d in enumerate(digits + [self.wrong] * (5 - len(digits))):
                    logits[b, x.shape[1] - 5 + n, d] = 1.0
            return logits

    assert passkey.accuracy(Oracle(), 64, 0.5, samples=8) == 1.0
    assert passkey.accuracy(Oracle(), 300, 0.0, samples=8) == 1.0
    assert passkey.accuracy(Oracle(right=0), 64, 0.5, samples=8) < 0.5
    assert passkey.overhead(5) == 23
    for k in range(6):
        got = passkey.scores(Oracle(right=k, wrong=ord("x")), 64, 0.25, samples=6, batch_size=4)
        assert got == {"solved": float(k == 5), "digits": [1.0] * k + [0.0] * (5 - k)}
    # answering "0" everywhere: each byte is right exactly on the samples whose key has a 0 there (the
    # cell's seed draws the samples: batches of 16, 16 and 8 draw the same 40 keys as one batch of 40)
    zeros = passkey.scores(Oracle(right=0), 64, 0.5, samples=40)
    keys = passkey.make_batch(40, 64, generator=torch.Generator().manual_seed(1234 + 64 * 7919 + 500), depths=[0.5])
    assert zeros["digits"] == [(keys[:, -5 + i] == ord("0")).sum().item() / 40 for i in range(5)]
    assert zeros["solved"] == passkey.accuracy(Oracle(right=0), 64, 0.5, samples=40) == 0.0
    assert 0 < sum(zeros["digits"]) / 5 < 0.3  # about a guess's 0.1
    grid = passkey.accuracy_grid(Oracle(right=2, wrong=ord("x")), [64, 128], [0.0, 1.0], measure=passkey.scores,
                                 samples=2)
    assert passkey.mean_digits({n: {d: c["digits"] for d, c in row.items()} for n, row in grid.items()}, 128) == \
        [1.0, 1.0, 0.0, 0.0, 0.0]
    assert digits_sentence([("a", [1.0, 1.0, 0.0, 0.0, 0.0]), ("b", [0.1] * 5)], "at 128") == (
        "Answer bytes right at 128 (mean over depths, all bytes · the first, which needs the key found; a guess "
        "among the ten digits scores 0.1, a digit of the key copied from a random place 0.28): a 0.40 · 1.00; "
        "b 0.10 · 0.10.")
    assert digits_sentence([], "at 128") == ""
    # the out-of-order copy's score, counted over every 5-digit key: answer place i, copied place j, all
    # 25 pairs alike
    keys = torch.cartesian_prod(*[torch.arange(10)] * 5)
    right = sum(float((keys[:, i] == keys[:, j]).double().mean()) for i in range(5) for j in range(5)) / 25
    assert shuffled_key_score(5) == pytest.approx(right) == pytest.approx(0.28)
    assert shuffled_key_score(1) == 1.0


def test_passkey_defaults(monkeypatch, capsys):
    """What a caller gets without options: samples whose filler starts at the filler's first byte,
    5-digit keys, ``scores`` over 32 samples in batches of 16, five depths from 0 to 1 (one: the
    middle), no progress bar, and a passkey fine-tune on batches of 32 at learning rate 2e-3 with
    positional parameters at 1× and no probe; ``teach`` without a target trains every step and counts
    0.9 of the probe as learned."""
    from posbias import finetune as ft

    class Recorder(torch.nn.Module):  # answers "0" everywhere, records every batch it reads
        def __init__(self):
            super().__init__()
            self.batches, self.w = [], torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            self.batches.append(x.clone())
            return torch.zeros(*x.shape, 256)

    sample = bytes(passkey.make_sample(100, 1.0, "48213").tolist())
    assert sample.startswith(passkey.FILLER[:50])
    m = Recorder()
    passkey.scores(m, 64, 0.5)
    assert [len(b) for b in m.batches] == [16, 16]
    assert passkey.default_depths() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert passkey.default_depths(2) == [0.0, 1.0] and passkey.default_depths(1) == [0.5]
    assert passkey.default_depths(7) == [0.0, 0.167, 0.333, 0.5, 0.667, 0.833, 1.0]  # 3 decimals: short keys
    for depth in (0.25, 1.0):  # each cell's samples: drawn from seed + length · 7919 + depth in thousandths
        m = Recorder()
        passkey.scores(m, 64, depth, samples=4)
        want = passkey.make_batch(4, 64, generator=torch.Generator().manual_seed(1234 + 64 * 7919 + int(depth * 1000)),
                                  depths=[depth])
        assert torch.equal(m.batches[0], want[:, :-1])
    for ok in (0, 0.0, 0.5, 1, 1.0):
        assert passkey.check_until("until", ok) == ok
    for bad in (1.0001, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match=r"until must be an accuracy in \[0, 1\]"):
            passkey.check_until("until", bad)
    m = Recorder()
    passkey.probe(m, 64)
    tails = {bytes(b[r, -(len(passkey.QUESTION) + 4):].tolist()) for b in m.batches for r in range(len(b))}
    assert all(t.startswith(passkey.QUESTION) for t in tails)  # the input ends " ?key=" and 4 of the 5 digits
    assert sum(len(b) for b in m.batches) == 5 * passkey.PROBE_SAMPLES
    passkey.accuracy_grid(Recorder(), [64], [0.5], samples=2)
    assert capsys.readouterr().err == ""
    assert torch.equal(passkey.make_batch(3, 64), passkey.make_batch(3, 64, generator=torch.Generator().manual_seed(0)))
    batch = passkey.make_batch(3, 40, generator=torch.Generator().manual_seed(2))
    echo = lambda x: 3 * F.one_hot(x, 256).float()  # noqa: E731  (predicts each byte again as the next)
    want = F.cross_entropy(echo(batch[:, -6:-1].long()).flatten(0, 1), batch[:, -5:].long().flatten())
    assert passkey.answer_loss(echo, batch, 5).item() == pytest.approx(want.item(), rel=1e-6)  # byte t predicts t + 1
    monkeypatch.setattr(passkey, "probe", lambda *a, **kw: 0.5)
    assert passkey.train_passkey(Recorder(), length=64, steps=3, until=0.5) == []  # a probe at the target: stop
    monkeypatch.undo()
    seen = {}

    def fake(model, batch_fn, loss_fn, **kw):
        seen.update(kw, batch=batch_fn(0))
        return []

    monkeypatch.setattr(ft, "finetune", fake)
    passkey.train_passkey(Recorder(), length=64, steps=3)
    assert seen["batch"].shape == (32, 64) and seen["lr"] == 2e-3 and seen["pos_lr_mult"] == 1.0
    assert seen["stop"] is None and seen["check_every"] == passkey.PROBE_EVERY == 100 and seen["progress"] is False
    assert seen["identity"] == {"task": "passkey", "length": 64, "batch_size": 32, "digits": 5, "seed": 0}
    assert all(bytes(r[-len(passkey.QUESTION) - 5:-5].tolist()) == passkey.QUESTION for r in seen["batch"])
    passkey.train_passkey(Recorder(), length=64, steps=3, until=0.5)  # a target: the probe keys the progress too
    assert seen["identity"] == {"task": "passkey", "length": 64, "batch_size": 32, "digits": 5, "seed": 0,
                                "until": 0.5, "check_every": 100, "probe_samples": passkey.PROBE_SAMPLES}
    record = passkey.teach(Recorder(), length=64, steps=3)  # no target given: every step, learned at 0.9
    assert record["target"] == passkey.LEARNED == 0.9 and "until" not in seen["identity"]
    monkeypatch.setattr(ft, "finetune", lambda *a, **kw: [1.0] * 200)  # stopped after 200 of 300 steps
    record = passkey.teach(Recorder(), length=64, steps=300, probes={"0": 0.1, "100": 0.9, "200": 1.0, "300": 1.0})
    assert record == {"steps": 200, "probes": [[0, 0.1], [100, 0.9], [200, 1.0]], "target": 0.9, "learned_at": 100,
                      "stopped": True}  # learned at the probe that reaches 0.9 exactly


def test_passkey_learned_sentence_orders_the_copies_by_the_step_they_learned_at():
    """Which copies learned the task by which step (earliest first), which did not within how many
    steps; copies without a record are left out, and no record at all says nothing."""
    def rec(at, steps=300):
        return {"learned_at": at, "target": 0.9, "steps": steps}

    opening = "The passkey copies had learned the task at L (≥ 0.9 of their probe): "
    assert passkey.learned_sentence([("a", rec(100))]) == opening + "a by step 100."
    assert passkey.learned_sentence([("b", rec(200)), ("a", rec(100)), ("c", rec(None, 250)), ("d", None),
                                     ("e", {"steps": 5}), ("f", rec(None))]) == \
        opening + "a by step 100, b by step 200; not within 300 steps: c, f."
    assert passkey.learned_sentence([("c", rec(None))]) == opening + "none; not within 300 steps: c."
    assert passkey.learned_sentence([("d", None)]) == passkey.learned_sentence([]) == ""


@pytest.mark.parametrize("method", ["pi", "ntk", "dynamic-ntk", "yarn"])
def test_rope_scalings_at_factor_one_equal_plain_rope(method):
    plain = build("rope", n_heads=2, head_dim=16)
    scaled = build("rope", n_heads=2, head_dim=16, scaling=method, factor=1.0, train_len=L)
    x, pos = torch.randn(1, 2, 40, 16), torch.arange(40)
    torch.testing.assert_close(scaled.rotate(x, pos, context_len=40), plain.rotate(x, pos, context_len=40))


def test_ntk_retrofit_uses_the_formula(tmp_path):
    base = ckpt.load_model(tiny_checkpoint(tmp_path / "r", "rope"))
    new = retrofit_model(base, "ntk", train_len=L, to=4 * L)
    d = base.cfg.head_dim
    assert new.scheme.factor == 4.0
    torch.testing.assert_close(new.scheme.inv_freq, rope_frequencies(d, 10000.0 * 4.0 ** (d / (d - 2))).float())
    assert ntk_lambda(4.0, d) == pytest.approx(4.0 ** (d / (d - 2)))
    # all non-positional weights are carried over
    for k, v in base.state_dict().items():
        torch.testing.assert_close(new.state_dict()[k], v)


def test_t5_distance_remaps_buckets_as_the_bucket_function_says(tmp_path):
    base = ckpt.load_model(tiny_checkpoint(tmp_path / "t", "t5", max_distance=L))
    new = retrofit_model(base, "t5-distance", train_len=L, to=4 * L)
    assert new.scheme.max_distance == 4 * L
    torch.testing.assert_close(new.scheme.table, base.scheme.table)  # same table …
    d = torch.arange(0, 600)
    want = base.scheme.table[t5_bucket(d, num_buckets=32, max_distance=4 * L)].T
    torch.testing.assert_close(new.scheme.bias_at(d), want)  # … read through the new bucket map
    rows = bucket_remap(32, L, 4 * L, [1, 20, 40, 100, 400])
    assert rows[0] == (1, 1, 1) and rows[3][1] == 31 and rows[3][2] < 31 and rows[4][2] == 31
    # the report's table of moves: distances 1, 8, 16, 32, L/2, L, 2L, to/2 and to, each once, in order
    moves = METHODS["t5-distance"].explain(base, new, L, 4 * L)
    assert L == 48 and moves == bucket_remap(32, L, 4 * L, [1, 8, 16, 24, 32, 48, 96, 192])
    odd_to = retrofit_model(base, "t5-distance", train_len=L, to=3 * L + 1)
    odd = METHODS["t5-distance"].explain(base, odd_to, L, 3 * L + 1)
    assert [d for d, _, _ in odd] == [1, 8, 16, 24, 32, 48, 72, 96, 145]  # (3 L + 1) // 2 = 72: whole distances
    # a checkpoint that records no max_distance has T5's default, and the retrofit scales that one
    default = TransformerLM(ModelConfig(scheme="t5", **TINY))
    assert "max_distance" not in default.cfg.scheme_options
    assert retrofit_model(default, "t5-distance", train_len=L, to=3 * L).scheme.max_distance == 3 * default.scheme.max_distance


def test_swap_to_t5_keeps_the_logit_scale(tmp_path):
    base = ckpt.load_model(tiny_checkpoint(tmp_path / "r", "nope"))
    new = retrofit_model(base, "swap-t5", train_len=L, to=4 * L)
    x = torch.randint(0, 256, (1, 30))
    with torch.no_grad():  # fresh T5 table is zero: the swapped model computes exactly the same function
        torch.testing.assert_close(new(x), base(x), atol=1e-4, rtol=1e-4)
    assert new.num_parameters() - base.num_parameters() == 32 * 2


def test_applicability_and_errors(tmp_path):
    assert applicable("pi", "rope") is None and applicable("t5-distance", "t5") is None
    assert "needs a rope checkpoint" in applicable("yarn", "alibi")
    assert "already uses" in applicable("swap-alibi", "alibi")
    assert "unknown method" in applicable("magic", "rope")
    base = ckpt.load_model(tiny_checkpoint(tmp_path / "r", "rope"))
    with pytest.raises(ValueError, match="must exceed the training length"):
        retrofit_model(base, "pi", train_len=L, to=L)
    assert set(METHODS) == {"pi", "ntk", "dynamic-ntk", "yarn", "t5-distance", "swap-alibi", "swap-t5"}


def test_compare_without_a_passkey_test_keeps_the_rest_of_the_decision_table(tmp_path, corpus, monkeypatch):
    """``--compare --passkey-steps 0`` (as ``diagnose``'s 0: no passkey test) trains no copy and tests no
    untrained one (their columns read 0.00, minutes each); the decision table keeps what each method ends
    with, its extra parameters and attention cost: the timer's median and range (here a stand-in's),
    each row's against the original at --to, and the original's 1 by definition."""
    import posbias.retrofit as retrofit_mod

    timed = []
    monkeypatch.setattr(retrofit_mod, "_relative_cost",
                        lambda model, base, length, device: timed.append((model.cfg.scheme, length)) or (1.25, 0.5, 2.0))
    path = tiny_checkpoint(tmp_path / "r", "rope")
    cfg = RetrofitConfig(to=2 * L, methods=("pi", "swap-t5"), finetune_steps=1, finetune_batch=2, eval_tokens=EVAL,
                         compare=True, passkey_steps=0)
    res = run_retrofit(path, cfg, tmp_path / "out", corpus=corpus, progress=False)
    retrofit_report.write(res, tmp_path / "out")
    assert not any(r["passkey"] for r in res.rows) and not list((tmp_path / "out").glob("models/passkey-*"))
    assert [r["final"] for r in res.rows] == [True, False, True, False, True]
    md = (tmp_path / "out" / "results.md").read_text()
    table = md[md.index("Decision table (no passkey test: --passkey-steps 0"):]
    assert "passkey @" not in table and "| original | before |" in table
    assert "| pi | fine-tuned 1 |" in table and "| pi | no fine-tune |" not in table and "| +64 |" in table
    assert timed == [("rope", 2 * L), ("t5", 2 * L)]
    assert [(r["attention_cost"], r.get("attention_cost_range")) for r in res.rows] == [
        (1.0, [1.0, 1.0]), (None, None), (1.25, [0.5, 2.0]), (None, None), (1.25, [0.5, 2.0])]


def test_run_retrofit_compare_tiny(tmp_path, corpus):
    path = tiny_checkpoint(tmp_path / "r", "rope")
    cfg = RetrofitConfig(to=2 * L, methods=("pi", "yarn", "swap-alibi"), finetune_steps=2, finetune_batch=2,
                         eval_tokens=EVAL, compare=True, passkey_steps=2, passkey_samples=2)
    res = run_retrofit(path, cfg, tmp_path / "out", corpus=corpus, progress=False)
    retrofit_report.write(res, tmp_path / "out")
    assert [r["method"] for r in res.rows] == ["original", "pi", "pi", "yarn", "yarn", "swap-alibi", "swap-alibi"]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "Decision table" in md and "passkey @ 96" in md and "95% Wilson interval" in md
    assert "Which differences are real" in md and md.count("**best**") == 2  # at L (48) and the one length past it, 96
    # the summary opens the report: the best row at 96 and at L, from the same paired comparisons
    best = {n: res.rows[next(j for j, p in enumerate(t) if p.best)] for n, t in res.paired.items()}
    assert set(best) == {L, 2 * L}
    for n, where in ((2 * L, f"{2 * L}"), (L, f"L = {L} (the near range)")):
        r = best[n]
        said = (f"* **At {where} the model as it was, with no retrofit, is best**" if r["method"] == "original"
                else f"* **Best at {where}: {r['method']} ({r['stage']})**")
        assert said in md.split("| method |")[0], n
    n_windows = EVAL // (2 * L)
    assert all(len(r["window_loss"][2 * L]) == n_windows for r in res.rows)
    assert res.eval_tokens == EVAL and f"Only {n_windows} windows scored (fewer than 64)" in md
    for r in res.rows:  # 95% Wilson interval over 5 depths × 2 samples = 10 trials
        if r["passkey"] is not None:
            assert r["passkey_interval"][2 * L] == passkey.accuracy_interval(r["passkey"][2 * L], 10)
            assert set(r["passkey_digits"]) == {L, 2 * L} and len(r["passkey_digits"][2 * L]) == 5
            assert min(r["passkey_digits"][2 * L]) >= r["passkey"][2 * L]
    digits = [(f"{r['method']} ({r['stage']})", r["passkey_digits"][2 * L]) for r in res.rows if r["passkey"]]
    assert digits_sentence(digits, f"at {2 * L}") in md
    assert list(res.paired) == [L, 2 * L] and all(len(t) == len(res.rows) for t in res.paired.values())
    assert all(sum(p.best for p in t) == 1 for t in res.paired.values())
    assert (tmp_path / "out" / "ppl_vs_length.png").exists()
    assert all(0.0 <= r["passkey"][2 * L] <= 1.0 for r in res.rows if r["stage"] != "no fine-tune")
    assert all(r["passkey"] is None for r in res.rows if r["stage"] == "no fine-tune")
    # each passkey copy trained until its probe at L reached 0.9 (a tiny model at 2 steps: never), said so
    fits = [f for r in res.rows if r["passkey"] is not None for f in r["passkey_fits"]]
    assert fits and all(f["steps"] == 2 and f["probes"][0][0] == 0 and f["learned_at"] is None for f in fits)
    assert "passkey: a copy trained at L for 2 steps (batches of seed 0);" in md and "`--passkey-seeds 0 1 2`" in md
    assert "The passkey copies had learned the task at L (≥ 0.9 of their probe): none; " \
           "not within 2 steps: original (before), pi (fine-tuned 2), yarn (fine-tuned 2), swap-alibi (fine-tuned 2)." in md
    # the cost of what each method ends with: the median of timed pairs, inside their lowest and highest
    for r in res.rows:
        if r["final"]:
            lo, hi = r["attention_cost_range"]
            assert 0 < lo <= r["attention_cost"] <= hi and (r["stage"] != "before" or lo == hi == 1.0)
        else:
            assert r["attention_cost"] is None
    assert re.search(r"\| \+0 \| \d\.\d\d× \(\d\.\d\d–\d\.\d\d\) \|", md) and "the median of 6 pairs" in md
    # each method's row names the scheme options it ran with; the model as it was has none to name
    assert "options" not in res.rows[0] and res.rows[0]["scheme"] == "rope"
    assert [r["extra_params"] for r in res.rows] == [0] * 7  # RoPE, PI, YaRN and ALiBi: no learned position
    base = ckpt.load_model(path)
    for r in res.rows[1:]:
        want = retrofit_model(base, r["method"], train_len=L, to=2 * L).cfg.scheme_options
        assert r["options"] == want and r["scheme"] == ("alibi" if r["method"] == "swap-alibi" else "rope")
    # at 2L, each copy once more with the far filler hidden (far_filler_scores: rotary and ALiBi rows alike)
    for r in res.rows:
        if r["passkey"] is not None:
            [h] = r["passkey_hidden"][2 * L]
            assert 0.0 <= h <= 1.0 and f"| {h:.2f} [" in md
    again = run_retrofit(path, cfg, tmp_path / "out", corpus=corpus, progress=False)  # reuses models and caches
    assert [r["ppl"] for r in again.rows] == [r["ppl"] for r in res.rows]


def test_diagnose_report_tiny(tmp_path, corpus):
    path = tiny_checkpoint(tmp_path / "t", "t5", max_distance=L)
    rep = run_diagnose(path, DiagnoseConfig(length=2 * L, windows=2, eval_tokens=EVAL, passkey_steps=2,
                                            passkey_samples=2), corpus=corpus)
    diagnose_report.write(rep, tmp_path / "d")
    md = (tmp_path / "d" / "report.md").read_text()
    for section in ("Loss by position", "Attention distance", "The final entry (T5: the final bucket)", "Effective reach", "Passkey"):
        assert section in md
    assert f"Only {EVAL // (2 * L)} windows scored (fewer than 64)" in md
    for png in ("loss_by_position", "attention_distance", "attention_beyond_L", "bias_vs_distance", "passkey"):
        assert (tmp_path / "d" / f"{png}.png").exists()
    assert 0 < rep.final_entry_share[2 * L] < 1
    # Δ split by the local context the cut left: the two parts add up to Δ over all positions
    assert "Where Δ comes from" in md and "For tokens that keep local context, the far context" in md
    parts = sum(share * d for _, share, d, _, _ in rep.context_split)
    # (to float32 rounding of the per-position means: 1.4e-6 relative on an AVX2 host, below 1e-6 on AVX-512)
    assert parts == pytest.approx(statistics.fmean(rep.loss_by_position) - statistics.fmean(rep.loss_by_position_cut_at_L),
                                  rel=1e-5)
    assert "mass at distance ≥ L" in md and "Attention on keys at distance ≥ L" in md
    assert rep.bias_drift == [0.0] * len(rep.bias_drift) and "The bias depends on i − j alone" in md
    # the sliding-window counterfactual: its two rows add up to the kept tokens' Δ
    (_, beyond, lo, hi), (_, within, _, _), (_, layers, lo3, hi3) = rep.window_split
    assert beyond + within == pytest.approx(rep.context_split[-1][2]) and lo <= beyond <= hi and lo3 <= layers <= hi3
    assert "Attention to the keys beyond L" in md and "window of 48 − cut" in md
    assert "Far tokens reaching a query through the layers, with the same keys in the first layer, Δ" in md
    saved = json.loads((tmp_path / "d" / "diagnose.json").read_text())
    assert saved["train_len"] == L and len(saved["loss_by_position_cut_at_L"]) == 2 * L
    # the first L positions see the same context either way
    assert saved["loss_by_range"][0][1] == pytest.approx(saved["loss_by_range"][0][2], abs=1e-4)
    # EVAL tokens in windows of 2L = 96: 8 windows, so every Δ has an interval around it, and the verdict reads it
    assert rep.loss_windows == MIN_SEGMENTS
    for name, full, cut, lo, hi in saved["loss_by_range"][1:]:
        assert lo <= full - cut <= hi
    # each range named by its first and last position, its losses the means over exactly those positions
    assert [row[0] for row in saved["loss_by_range"]] == [f"0–{L - 1}", f"{L}–{2 * L - 1}"]
    for (_, full, cut, _, _), (a, b) in zip(saved["loss_by_range"], [(0, L), (L, 2 * L)]):
        assert (full, cut) == pytest.approx((statistics.fmean(rep.loss_by_position[a:b]),
                                             statistics.fmean(rep.loss_by_position_cut_at_L[a:b])), rel=1e-6)
    lo, hi = rep.loss_delta_interval
    delta = statistics.fmean(rep.loss_by_position) - statistics.fmean(rep.loss_by_position_cut_at_L)
    assert lo <= delta <= hi and "interval of Δ" in md and "95% bootstrap over the 8 windows" in md
    # the passkey cells byte by byte: five scores per cell, never below the whole-key accuracy
    assert set(saved["passkey_digits"]) == set(saved["passkey"]) == {str(L), str(2 * L)}
    for n, row in saved["passkey_digits"].items():
        for d, digits in row.items():
            assert len(digits) == 5 and min(digits) >= saved["passkey"][n][d]
    assert "| length | byte 1 | byte 2 | byte 3 | byte 4 | byte 5 | mean | all 5 (solved) |" in md
    byte1 = statistics.fmean(c[0] for c in saved["passkey_digits"][str(L)].values())
    assert f"| {L} | {byte1:.2f} |" in md
    # where the answer queries attend: per length, [layers][heads][answer byte], the digit to copy ≤ all digits
    [copy] = saved["passkey_copies"]
    assert copy["seed"] == 0 and copy["passkey"] == saved["passkey"] and copy["passkey_digits"] == saved["passkey_digits"]
    assert set(copy["attention"]) == {str(L), str(2 * L)}
    for got in copy["attention"].values():
        key, place = torch.tensor(got["key"]), torch.tensor(got["place"])
        assert key.shape == place.shape == (TINY["n_layers"], TINY["n_heads"], 5)
        assert (place >= 0).all() and (place <= key + 1e-6).all() and (key <= 1 + 1e-6).all()
    assert "Where the copy's queries that predict the answer bytes attend (40 samples per length" in md
    # past L, as it is → far filler hidden, by the key's depth too (one copy: its own cells)
    hidden = copy["hidden"][str(2 * L)]
    assert "The same by the key's depth (the copy)" in md
    assert f"| {2 * L} | " + " | ".join(f"{copy['passkey'][str(2 * L)][d]:.2f} → {hidden[d]:.2f}" for d in hidden) + " |" in md


def test_answer_attention_of_uniform_attention_counts_the_keys_digits():
    """With every query and key weight zero, attention is uniform over the causal keys: the query at
    input position i puts 5 / (i + 1) on the key's five digits and 1 / (i + 1) on the one to copy."""
    from posbias.diagnose import answer_attention

    model = TransformerLM(ModelConfig(scheme="nope", **TINY))
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[: 2 * model.cfg.d_model].zero_()
    n = 100
    got = answer_attention(model, n, samples=2)
    queries = torch.arange(n - 1 - 5, n - 1)  # the inputs' last five positions predict the answer bytes
    for layer in range(TINY["n_layers"]):
        for head in range(TINY["n_heads"]):
            torch.testing.assert_close(torch.tensor(got["key"][layer][head]), 5 / (queries + 1.0))
            torch.testing.assert_close(torch.tensor(got["place"][layer][head]), 1 / (queries + 1.0))


def test_answer_rows_are_kept_without_the_layers_probabilities(monkeypatch):
    """answer_attention keeps each layer's answer rows in storage of their own: a view of the rows
    would hold every layer's [heads, N, N] probabilities until the forward pass ends."""
    import posbias.diagnose as diagnose_mod

    probs = torch.rand(1, 3, 40, 40)
    rows = diagnose_mod.last_rows(probs, 5)
    assert torch.equal(rows, probs[0, :, -5:])
    assert rows.untyped_storage().nbytes() == rows.numel() * rows.element_size()
    kept, real = [], diagnose_mod.last_rows

    def spy(p, k):
        kept.append(real(p, k))
        return kept[-1]

    monkeypatch.setattr(diagnose_mod, "last_rows", spy)
    model = TransformerLM(ModelConfig(scheme="nope", **TINY))
    diagnose_mod.answer_attention(model, 60, samples=1)
    assert len(kept) == 5 * TINY["n_layers"]  # one sample at each of the five depths, every layer
    assert all(r.untyped_storage().nbytes() == r.numel() * r.element_size() for r in kept)


def test_diagnose_rerun_measures_only_what_it_lacks(tmp_path, corpus, monkeypatch):
    """A re-run into the same folder reuses every measurement made with the same checkpoint, corpus,
    device, threads, torch and code; another --length reuses the passkey-tuned copy and the passkey
    cells it has, and the numbers equal a run that kept nothing. Other threads: another key."""
    import posbias.diagnose as diagnose_mod

    path = tiny_checkpoint(tmp_path / "t", "t5", max_distance=L)
    cfg = DiagnoseConfig(length=2 * L, windows=2, eval_tokens=EVAL, passkey_steps=3, passkey_samples=2)
    first = run_diagnose(path, cfg, corpus=corpus, out=tmp_path / "d").to_json()
    key = diagnose_mod.source_key(path, cfg, corpus)
    assert (tmp_path / "d" / f"cache-{key}.json").exists() and ckpt.exists(tmp_path / "d" / "models" / f"passkey-ft3-{key}")
    calls = {}

    def counted(name, real):
        def spy(*args, **kw):
            calls[name] = calls.get(name, 0) + 1
            return real(*args, **kw)
        return spy

    for mod, name in ((diagnose_mod, "context_effect"), (diagnose_mod, "window_effect"),
                      (diagnose_mod, "attention_distance"), (passkey, "train_passkey"), (passkey, "scores")):
        monkeypatch.setattr(mod, name, counted(name, getattr(mod, name)))
    said = []
    again = run_diagnose(path, cfg, corpus=corpus, out=tmp_path / "d", log=said.append).to_json()
    assert calls == {} and again == first
    assert sum("reusing" in line for line in said) == 3  # losses, attention, passkey grid
    longer = DiagnoseConfig(**{**cfg.__dict__, "length": 4 * L, "eval_tokens": MIN_SEGMENTS * 4 * L})
    got = run_diagnose(path, longer, corpus=corpus, out=tmp_path / "d", log=said.append).to_json()
    assert calls == {"context_effect": 1, "window_effect": 1, "attention_distance": 1, "scores": 10}  # 4L's cells, as they are and far filler hidden
    assert got["passkey"][str(L)] == first["passkey"][str(L)]
    grid = [m for line in said if (m := re.match(r"passkey grid: (\d+) of (\d+) cells \((\d+) lengths × 5 depths\)", line))]
    assert [(int(m[1]), int(m[2]), int(m[3]) * 5) for m in grid[-1:]] == [(5, 15, 15)]  # 4L's 5 of L, 2L, 4L's
    monkeypatch.undo()
    assert got == run_diagnose(path, longer, corpus=corpus).to_json()  # nothing kept: the same numbers
    keys = {diagnose_mod.source_key(path, DiagnoseConfig(threads=t), corpus) for t in (1, 2)}
    assert len(keys) == 2 and key in keys
    assert diagnose_mod.source_key(path, cfg, dataclasses.replace(corpus, fingerprint="other text")) != key


def test_diagnose_passkey_seeds_train_one_copy_each_and_report_their_mean(tmp_path, corpus, capsys):
    """--passkey-seeds: each seed's copy is trained into a folder named by it from its own batches
    (other weights); a run with seeds 0 and 1 after one with seed 0 reuses that copy and everything
    but the passkey, and trains seed 1's alone. The cells are the mean of the copies' own, which are
    kept; the report names the seeds and gives each copy's accuracy with the spread; the summary and
    the comparison say each copy. A seed out of range, or twice, is refused in one line."""
    import posbias.diagnose as diagnose_mod
    from posbias.report import comparison
    from posbias.report.diagnose import summary

    path = tiny_checkpoint(tmp_path / "t", "t5", max_distance=L)
    cfg = DiagnoseConfig(length=2 * L, windows=1, eval_tokens=EVAL, passkey_steps=3, passkey_samples=2)
    first = run_diagnose(path, cfg, corpus=corpus, out=tmp_path / "d")
    said = []
    both = run_diagnose(path, dataclasses.replace(cfg, passkey_seeds=(0, 1)), corpus=corpus, out=tmp_path / "d",
                        log=said.append)
    key = diagnose_mod.source_key(path, cfg, corpus)
    a, b = (ckpt.load_model(tmp_path / "d" / "models" / f"passkey-ft3{s}-{key}").state_dict() for s in ("", "-seed1"))
    assert any(not torch.equal(a[n], b[n]) for n in a)
    assert any(line.startswith("loss by position: reusing") for line in said)
    assert sum("grid: reusing" in line for line in said) == 1 and "passkey copy 2/2 (batches of seed 1):" in said
    assert sum(line.startswith("passkey: fine-tuning a copy") for line in said) == 1
    assert (first.passkey_seeds, both.passkey_seeds) == ([0], [0, 1])
    assert [c["seed"] for c in both.passkey_copies] == [0, 1] and both.passkey_copies[0] == first.passkey_copies[0]
    second = both.passkey_copies[1]
    for n, row in both.passkey.items():
        for d, acc in row.items():
            assert acc == pytest.approx((first.passkey[n][d] + second["passkey"][n][d]) / 2)
            assert both.passkey_digits[n][d] == pytest.approx(
                [(x + y) / 2 for x, y in zip(first.passkey_digits[n][d], second["passkey_digits"][n][d])])
    md = diagnose_report.markdown(both)
    each = [passkey.mean_accuracy(c["passkey"], str(L)) for c in both.passkey_copies]
    assert "2 copies fine-tuned for 3 steps" in md and "* seed 1: it trained all 3 steps" in md
    assert f"| {L} | {each[0]:.2f} | {each[1]:.2f} | {sum(each) / 2:.2f} | {max(each) - min(each):.2f} | — |" in md
    assert f"| {L} (seed 1) |" in md and "mean over the 2 copies" in md
    assert "(batches of seed 0)" in diagnose_report.markdown(first) and "`--passkey-seeds 0 1 2`" in diagnose_report.markdown(first)
    far = [passkey.mean_accuracy(c["passkey"], str(2 * L)) for c in both.passkey_copies]
    # past L (2 L here) each copy was measured again with the far filler hidden; not at L
    assert all(list(c["hidden"]) == [str(2 * L)] and list(c["hidden_digits"]) == [str(2 * L)]
               for c in both.passkey_copies)
    hid = both.hidden_accuracy(str(2 * L))
    assert both.hidden_accuracy(str(L)) is None and len(hid) == 2
    assert summary(both)[-1] == (f"passkey solved (mean of 2 copies, seeds 0, 1; mean over depths): {sum(each) / 2:.2f} "
                                 f"({each[0]:.2f} / {each[1]:.2f}) at L, {sum(far) / 2:.2f} ({far[0]:.2f} / "
                                 f"{far[1]:.2f}) at {2 * L}; no copy solved ≥ 0.9 at L; far filler hidden: "
                                 f"{sum(hid) / 2:.2f} ({hid[0]:.2f} / {hid[1]:.2f}) at {2 * L}")
    assert "with that filler hidden" in md and f"| {2 * L} | {far[0]:.2f} → {hid[0]:.2f} | " in md
    assert "| length | seed 0 | seed 1 | mean | spread | copies ≥ 0.9 at L (0 of 2) |" in md
    row = comparison.row("t5", both)
    assert row["passkey_copies"][L] == each and row["passkey_seeds"] == [0, 1]
    trials = 5 * cfg.passkey_samples
    assert row["passkey"][L] == (pytest.approx(sum(each) / 2), min(passkey.accuracy_interval(a, trials)[0] for a in each),
                                 max(passkey.accuracy_interval(a, trials)[1] for a in each))
    assert [len(f["probes"]) for f in row["passkey_fits"]] == [len(c["fit"]["probes"]) for c in both.passkey_copies]
    again = []
    run_diagnose(path, dataclasses.replace(cfg, passkey_seeds=(1, 0)), corpus=corpus, out=tmp_path / "d",
                 log=again.append)
    assert sum("passkey grid: reusing" in line for line in again) == 2
    with pytest.raises(ValueError, match="passkey_seeds must be an integer"):
        DiagnoseConfig(passkey_seeds=(0, -1))
    with pytest.raises(ValueError, match=r"passkey_seeds list a seed twice \(\[1, 1\]\)"):
        DiagnoseConfig(passkey_seeds=(1, 1))
    for bad in ((), 1):
        with pytest.raises(ValueError, match="passkey_seeds must list at least one seed, got"):
            DiagnoseConfig(passkey_seeds=bad)
    capsys.readouterr()
    one_line_error(capsys, main(["diagnose", str(path), "--passkey-seeds", "0", "-1", "--out", str(tmp_path / "e")]),
                   "posbias diagnose: error: --passkey-seeds must be an integer in [0, ")
    one_line_error(capsys, main(["diagnose", str(path), "--passkey-seed", "2", "2", "--out", str(tmp_path / "e")]),
                   "posbias diagnose: error: --passkey-seeds list a seed twice ([2, 2])")


def test_comparison_names_the_verdict_nearest_to_turning():
    """Each verdict sentence of the comparison names, among the models that help or hurt, the interval
    end nearest 0 (an end of either sign); none where every interval spans 0 or there is one model."""
    from posbias.report import comparison

    base = {"context": None, "distant_keys": None, "keys_beyond_L": None, "through_layers": None,
            "attention_beyond_L": None, "bias_drift": None, "rotary_unseen": None, "passkey_fits": None,
            "passkey_digits": None, "passkey": None, "train_len": L, "length": 4 * L}
    rows = [{**base, "model": "a", "context": (0.02, 0.004, 0.03), "distant_keys": (0.0, -0.01, 0.01)},
            {**base, "model": "b", "context": (-0.02, -0.03, -0.0012), "distant_keys": (0.001, -0.001, 0.002)},
            {**base, "model": "c", "context": (0.0, -0.01, 0.01)}]
    said = comparison.sentences(rows)
    assert said[0] == ("The context past L: hurt in a; help in b; make no difference this evaluation can see in c "
                       "(the verdict nearest to turning: b, whose interval ends at -0.0012).")
    assert said[1].startswith("For tokens that keep local context, the distant keys: make no difference")
    assert "nearest to turning" not in said[1]
    assert "nearest to turning" not in comparison.sentences(rows[:1])[0]
    tiny = [{**rows[0], "context": (2e-4, 1e-4, 3e-4)}, rows[1]]  # scientific notation below 0.0005
    assert comparison.sentences(tiny)[0].endswith("a, whose interval ends at +1.0e-04).")


def test_comparison_says_each_copy_and_judges_the_best_over_copies():
    """Models with several passkey copies: the comparison gives each copy at L → at the window, names a
    copy that solved nothing at L in a model that learned the task, and judges the best by the mean with
    intervals over the copies; the table's cell says how many copies."""
    from posbias.report import comparison

    base = {"context": None, "distant_keys": None, "keys_beyond_L": None, "through_layers": None, "attention_beyond_L": None,
            "bias_drift": None, "rotary_unseen": None, "passkey_fits": None, "passkey_digits": None,
            "train_len": L, "length": 8 * L}
    t5 = {**base, "model": "t5", "passkey_seeds": [0, 1, 2], "passkey": {L: (0.49, 0.0, 0.97), 8 * L: (0.52, 0.0, 0.99)},
          "passkey_copies": {L: [0.93, 0.48, 0.0], 8 * L: [0.97, 0.56, 0.03]}}
    alibi = {**base, "model": "alibi", "passkey_seeds": [0, 1, 2], "passkey": {L: (1.0, 0.97, 1.0), 8 * L: (0.9, 0.85, 0.95)},
             "passkey_copies": {L: [1.0, 1.0, 1.0], 8 * L: [0.9, 0.9, 0.9]}}
    said = comparison.sentences([t5, alibi])
    assert said == ["Each copy, solved at L → at the window's length: t5 0.93 → 0.97, 0.48 → 0.56, 0.00 → 0.03; "
                    "alibi 1.00 → 0.90, 1.00 → 0.90, 1.00 → 0.90. Copies that solved no sample at L (past L they say "
                    "nothing about retrieval, yet count in their model's mean): t5 seed 2.",
                    "Of the copies that solved at least 0.9 at L, solved at the window's length (their mean; what a "
                    "scheme keeps past L once a copy has learned the task, whatever share of copies learns it): t5 0.97 "
                    "(1 of 3); alibi 0.90 (3 of 3).",
                    "Passkey retrieval at the window's length, among the models that solve samples at L (mean over "
                    "copies): best 0.90; models whose interval reaches it: t5, alibi (the interval of a model with "
                    "several copies runs from its lowest copy's bound to its highest's)."]
    assert comparison._passkey(t5, 8 * L) == "0.52 [0.00, 0.99] (3 copies)"
    # the copies that learned the task at L, at the window: their mean, the interval over them, how many
    trials = 120
    lo, hi = passkey.accuracy_interval(0.97, trials)
    assert comparison._kept({**t5, "passkey_trials": trials}) == f"0.97 [{lo:.2f}, {hi:.2f}] (1 of 3)"
    none = {**t5, "model": "fire", "passkey_trials": trials, "passkey_copies": {L: [0.5, 0.0, 0.0], 8 * L: [0.4, 0, 0]}}
    assert comparison._kept(none) == "— (0 of 3)"
    assert comparison._kept_sentence([none]) == "No copy of fire solved 0.9 at L."
    assert not comparison._several([{**t5, "passkey_seeds": [0]}]) and comparison._several([t5])


def test_retrofit_seed_draws_other_finetunes_beside_the_first(tmp_path, corpus, capsys):
    """--seed: another draw of every fine-tune, in a cache and model folders of its own (the first
    stays); a seed out of range is refused in one line."""
    path = tiny_checkpoint(tmp_path / "t", "rope")
    cfg = RetrofitConfig(to=2 * L, methods=("pi",), finetune_steps=2, eval_tokens=EVAL)
    first = run_retrofit(path, cfg, tmp_path / "r", corpus=corpus)
    other = run_retrofit(path, dataclasses.replace(cfg, seed=1), tmp_path / "r", corpus=corpus)
    assert first.cache != other.cache and (tmp_path / "r" / first.cache).exists()
    a, b = (ckpt.load_model(tmp_path / "r" / "models" / f"pi-ft2-{r.cache[6:-5]}").state_dict() for r in (first, other))
    assert any(not torch.equal(a[n], b[n]) for n in a)
    assert other.to_json()["config"]["seed"] == 1
    with pytest.raises(ValueError, match="seed must be an integer"):
        RetrofitConfig(to=2 * L, methods=("pi",), seed=-1)
    capsys.readouterr()
    assert main(["retrofit", str(path), "--to", str(2 * L), "--method", "pi", "--seed", "-1",
                 "--out", str(tmp_path / "e")]) == 2
    assert "--seed must be an integer in [0, " in capsys.readouterr().err


def test_retrofit_passkey_seeds_give_each_row_the_mean_of_its_copies(tmp_path, corpus, capsys):
    """--passkey-seeds with --compare: one passkey copy per seed and row, from batches of its own; the
    copy of --seed keeps its cache entry (a run with seeds 0 and 1 after one with seed 0 reuses the
    language-model work and that copy, and trains seed 1's); the row holds the mean, each copy and an
    interval from the lowest copy's Wilson bound to the highest's; the report says each copy. Without
    --compare, or with a seed twice, one line and status 2."""
    path = tiny_checkpoint(tmp_path / "t", "rope")
    cfg = RetrofitConfig(to=2 * L, methods=("pi",), finetune_steps=1, eval_tokens=EVAL, compare=True,
                         passkey_steps=2, passkey_samples=2)
    alone = []
    first = run_retrofit(path, cfg, tmp_path / "r", corpus=corpus, log=alone.append)
    assert sum(line.startswith("[original] passkey: it trained") for line in alone) == 1  # one copy: no seed named
    assert not any("copy of seed" in line for line in alone)
    said = []
    both = run_retrofit(path, dataclasses.replace(cfg, passkey_seeds=(0, 1)), tmp_path / "r", corpus=corpus,
                        log=said.append)
    assert both.cache == first.cache  # one cache: the copies' entries name their seed
    assert sum(line.startswith("[pi/no fine-tune] reusing") or "reusing fine-tuned model" in line for line in said) == 1
    assert sum("passkey (copy of seed 1)" in line for line in said) == 2  # the original row and pi's tuned row
    # the copy of --seed under the name it always had (reused, not trained again), seed 1's named by its seed
    cached = json.loads((tmp_path / "r" / both.cache).read_text())
    copies = sorted(k for k in cached if re.fullmatch(r"passkey:[^:]+:.*\d", k))
    assert copies == [f"passkey:{row}:2:0:2{own}" for row in ("original", "pi/fine-tuned 1") for own in ("", ":seed1")]
    for r0, r in zip(first.rows, both.rows):
        if r["passkey"] is None:
            continue
        assert r["passkey_seeds"] == [0, 1] and r["passkey_fits"][0] == r0["passkey_fits"][0]
        for n in (L, 2 * L):
            a, b = r["passkey_copies"][n]
            assert a == r0["passkey"][n] and r["passkey"][n] == pytest.approx((a + b) / 2)
            bounds = [passkey.accuracy_interval(x, 10) for x in (a, b)]
            assert r["passkey_interval"][n] == (min(lo for lo, _ in bounds), max(hi for _, hi in bounds))
    retrofit_report.write(both, tmp_path / "r")
    md = (tmp_path / "r" / "results.md").read_text()
    assert "passkey: 2 copies, of seeds 0, 1, each trained at L for 2 steps;" in md and " (2 copies) |" in md
    assert "Each copy, solved at L → at 96: original (before) " in md and "original (before) seed 1" in md
    assert "| passkey @ 96, copies ≥ 0.9 at L | passkey @ 96, far filler hidden | extra params |" in md
    assert "*copies ≥ 0.9 at L*" in md and "*far filler hidden*" in md
    assert all(len(r["passkey_hidden"][2 * L]) == 2 for r in both.rows if r["passkey"])
    kept = [r for r in both.rows if r["passkey"]]
    for r in kept:  # the tiny model learns nothing at L: every row's kept cell says so
        assert max(r["passkey_copies"][L]) < passkey.LEARNED and " | — (0 of 2) | " in md
    single = (tmp_path / "r1")
    retrofit_report.write(first, single)
    assert "copies ≥" not in (single / "results.md").read_text()
    capsys.readouterr()
    base = ["retrofit", str(path), "--to", str(2 * L), "--method", "pi", "--out", str(tmp_path / "e")]
    one_line_error(capsys, main(base + ["--passkey-seeds", "1"]), "--passkey-seeds chooses the passkey copies",
                   "add --compare")
    one_line_error(capsys, main(base + ["--compare", "--passkey-seeds", "1", "1"]),
                   "--passkey-seeds list a seed twice ([1, 1])")
    # a fine-tune batch no machine holds: refused before the original is measured (it ended in a traceback)
    one_line_error(capsys, main(base + ["--finetune-steps", "2", "--finetune-batch", str(2**64)]),
                   "training one model needs at least", f"activations for {2**64} sequences of {2 * L} tokens")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("length,depth", [(64, 0.0), (64, 0.5), (200, 1.0), (513, 0.25)])
def test_statement_span_is_where_the_sample_puts_the_key(length, depth):
    sample = bytes(passkey.make_sample(length, depth, "12345").tolist())
    at = passkey.statement_span(length, depth)
    assert sample[at.start:at.stop] == passkey.KEY_OPEN + b"12345" + passkey.KEY_CLOSE


def test_hide_far_filler_hides_far_keys_but_the_key_statement():
    from posbias.diagnose import HideFarFiller

    alibi = build("alibi", n_heads=2, head_dim=8)
    pos = torch.arange(40)
    want = alibi.bias(pos, pos)
    hide = HideFarFiller(alibi, 10, range(5, 8))
    got = hide.bias(pos, pos)
    d = pos[:, None] - pos[None, :]
    visible = (d < 10) | ((pos >= 5) & (pos < 8))[None, :]
    assert torch.equal(got[:, visible], want[:, visible])
    assert torch.isinf(got[:, ~visible]).all() and (got[:, ~visible] < 0).all()
    assert got[0, 39, 6] == want[0, 39, 6] and torch.isinf(got[0, 39, 8])
    assert hide.default_scale() == alibi.default_scale()
    with pytest.raises(ValueError, match="window must be an integer >= 1, got 0"):
        HideFarFiller(alibi, 0, range(1))
    rope = build("rope", n_heads=2, head_dim=8)  # no bias: the mask alone, and the inner rotation
    hide = HideFarFiller(rope, 10, range(5, 8))
    x = torch.randn(1, 2, 40, 8)
    assert hide.family == "rotary" and torch.equal(hide.rotate(x, pos, context_len=40), rope.rotate(x, pos, context_len=40))
    got = hide.bias(pos, pos)
    assert (got[:, visible] == 0).all() and torch.isinf(got[:, ~visible]).all()
    sinusoidal = build("sinusoidal", n_heads=2, head_dim=8)
    assert torch.equal(HideFarFiller(sinusoidal, 10, range(5, 8)).embed(pos, 16), sinusoidal.embed(pos, 16))


def test_far_filler_scores_hide_nothing_at_L_and_restore_the_model():
    """Within L no key is past L: the scores equal passkey.scores; past it they differ for a bias that
    reaches far keys, on the same samples; the model keeps its scheme; no bias, no counterfactual."""
    from posbias.diagnose import HideFarFiller, far_filler_scores

    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(scheme="alibi", **TINY)).eval()
    scheme = model.scheme
    assert far_filler_scores(model, L, 0.0, L, samples=3) == passkey.scores(model, L, 0.0, samples=3)
    with torch.no_grad():
        plain = model(passkey.make_batch(1, 4 * L, depths=[0.0])[:, :-1].long())
        model.scheme = HideFarFiller(scheme, L, passkey.statement_span(4 * L, 0.0))
        hidden = model(passkey.make_batch(1, 4 * L, depths=[0.0])[:, :-1].long())
        model.scheme = scheme
    assert not torch.allclose(plain, hidden)
    far_filler_scores(model, 4 * L, 0.0, L, samples=2)
    assert model.scheme is scheme
    for name in ("rope", "nope", "sinusoidal"):  # no bias: the mask alone, on the blockwise backend
        torch.manual_seed(0)
        other = TransformerLM(ModelConfig(scheme=name, **TINY)).eval()
        assert far_filler_scores(other, L, 0.0, L, samples=3) == passkey.scores(other, L, 0.0, samples=3), name
        far_filler_scores(other, 2 * L, 0.0, L, samples=1)
        assert other.scheme.name == name and [b.attn.backend for b in other.blocks] == ["auto", "auto"]


@pytest.mark.parametrize("name", ["rope", "nope", "sinusoidal", "alibi"])
def test_hiding_far_keys_cuts_every_path_from_them_for_any_scheme(name):
    """With keys at distance ≥ w hidden in both layers of a 2-layer model, the last query is reached by
    no token more than 2 (w − 1) back: changing those tokens leaves its logits exactly as they were.
    Without the counterfactual they change. A scheme without a bias (RoPE, NoPE, sinusoidal) keeps its
    rotation or embedding: within reach, the hidden model equals the model as it is."""
    from posbias.diagnose import WithinWindow, hiding

    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(scheme=name, **TINY)).eval()
    w, n = 8, 40
    x = torch.randint(0, 256, (1, n))
    y = x.clone()
    y[0, : n - 1 - 2 * (w - 1)] = torch.randint(0, 256, (n - 1 - 2 * (w - 1),))
    with torch.no_grad():
        plain = [model(t)[0, -1] for t in (x, y)]
        with hiding(model, WithinWindow(model.scheme, w)):
            cut = [model(t)[0, -1] for t in (x, y)]
        with hiding(model, WithinWindow(model.scheme, n)):
            whole = model(x)[0, -1]
    assert not torch.allclose(plain[0], plain[1])
    torch.testing.assert_close(cut[0], cut[1], atol=1e-6, rtol=0)
    assert not torch.allclose(cut[0], plain[0])
    torch.testing.assert_close(whole, plain[0], atol=1e-5, rtol=1e-5)
    assert model.scheme.name == name and all(b.attn.backend == "auto" for b in model.blocks)


def test_hidden_sentences_say_what_hiding_the_far_filler_gives_back():
    """A copy that learned at L and lost past L: most of the loss given back → the filler; little →
    not the filler; copies that did not learn, or did not lose, are not judged."""
    from posbias.diagnose import DiagnoseResult
    from posbias.report.diagnose import hidden_sentences

    def copy(seed, at_l, far, hidden):
        grid = lambda a: {str(d): a for d in (0.0, 0.5, 1.0)}  # noqa: E731
        return {"seed": seed, "passkey": {str(L): grid(at_l), str(8 * L): grid(far)},
                "hidden": {str(8 * L): grid(hidden)}}

    r = DiagnoseResult("c", "fire", {}, L, 8 * L, build("fire", n_heads=2, head_dim=8), 1, [], [], [], {})
    r.passkey = {str(L): {}, str(8 * L): {}}
    r.passkey_copies = [copy(0, 0.96, 0.05, 0.88), copy(1, 1.0, 0.4, 0.5), copy(2, 0.5, 0.0, 0.5), copy(3, 1.0, 0.95, 1.0)]
    assert hidden_sentences(r) == [
        f"Seed 0 solved 0.96 at L and 0.05 at {8 * L}; with the far filler hidden 0.88: it lost 0.91 past L, most of "
        "it to the filler past L, not to the key's distance (hiding gives back 0.83).",
        f"Seed 1 solved 1.00 at L and 0.40 at {8 * L}; with the far filler hidden 0.50: it lost 0.60 past L, most of "
        "it not to the filler past L: to the key's distance itself, or what far positions do to it (hiding gives "
        "back 0.10)."]
    r.scheme_name, r.scheme = "sinusoidal", build("sinusoidal", n_heads=2, head_dim=8)  # absolute positions: what is
    # not the filler is the positions themselves
    assert hidden_sentences(r)[1].endswith("not to the filler past L: to the positions past L themselves, which "
                                           "training never embedded (hiding gives back 0.10).")


def test_retrofit_far_filler_sentences_name_each_copy():
    """The retrofit report judges each copy that learned at L and lost past L, as diagnose does; a row
    from before the measurement (no ``passkey_hidden``) shows — and is not judged."""
    from posbias.report.retrofit import _hidden_cell, _hidden_sentences

    row = {"method": "dynamic-ntk", "stage": "fine-tuned 100", "passkey_seeds": [0, 1, 2],
           "passkey_copies": {L: [0.88, 1.0, 1.0], 16 * L: [0.03, 0.66, 0.86]},
           "passkey_hidden": {16 * L: [0.08, 0.93, 0.96]}}
    assert _hidden_sentences([row], L, 16 * L) == [
        f"dynamic-ntk (fine-tuned 100) seed 1 solved 1.00 at L and 0.66 at {16 * L}; with the far filler hidden "
        "0.93: it lost 0.34 past L, most of it to the filler past L, not to the key's distance (hiding gives back 0.27).",
        f"dynamic-ntk (fine-tuned 100) seed 2 solved 1.00 at L and 0.86 at {16 * L}; with the far filler hidden "
        "0.96: it lost 0.14 past L, most of it to the filler past L, not to the key's distance (hiding gives back 0.10)."]
    assert _hidden_cell(row, 16 * L, 160).startswith("0.66 [")
    old = {k: v for k, v in row.items() if k != "passkey_hidden"}
    assert _hidden_cell(old, 16 * L, 160) == "—" and _hidden_sentences([old], L, 16 * L) == []
    # a copy that hiding gives little back: its scheme is relative (a retrofit is RoPE, T5 or ALiBi), so
    # what is left is the key's distance, not positions training never embedded
    yarn = {"method": "yarn", "stage": "as is", "passkey_seeds": [0], "passkey_copies": {L: [1.0], 16 * L: [0.2]},
            "passkey_hidden": {16 * L: [0.3]}}
    assert _hidden_sentences([yarn], L, 16 * L) == [
        f"yarn (as is) solved 1.00 at L and 0.20 at {16 * L}; with the far filler hidden 0.30: it lost 0.80 past L, "
        "most of it not to the filler past L: to the key's distance itself, or what far positions do to it (hiding "
        "gives back 0.10)."]


def test_comparison_plot_lines_of_the_copies_that_learned():
    """The comparison plot's last panel: the copies that solved ≥ 0.9 at L, their mean as they are and
    with the far filler hidden (at L nothing is hidden); no panel line without such copies or cells."""
    from posbias.diagnose import DiagnoseResult
    from posbias.report.comparison import _learned_lines

    grid = lambda a: {"0.0": a, "1.0": a}  # noqa: E731
    r = DiagnoseResult("c", "fire", {}, L, 4 * L, None, 1, [], [], [], {})
    r.passkey = {str(n): {} for n in (L, 2 * L, 4 * L)}
    r.passkey_copies = [
        {"seed": 0, "passkey": {str(L): grid(0.96), str(2 * L): grid(0.5), str(4 * L): grid(0.05)},
         "hidden": {str(2 * L): grid(0.9), str(4 * L): grid(0.88)}},
        {"seed": 1, "passkey": {str(L): grid(0.5), str(2 * L): grid(0.0), str(4 * L): grid(0.0)},
         "hidden": {str(2 * L): grid(0.5), str(4 * L): grid(0.5)}}]
    (xs, got, hid), k = _learned_lines(r)
    assert (xs, k) == ([1.0, 2.0, 4.0], 1)
    assert got == pytest.approx([0.96, 0.5, 0.05]) and hid == pytest.approx([0.96, 0.9, 0.88])
    r.passkey_copies[0]["passkey"][str(L)] = grid(0.8)
    assert _learned_lines(r) is None  # no copy learned the task at L
    r.passkey_copies[0]["passkey"][str(L)] = grid(0.96)
    del r.passkey_copies[1]["hidden"]
    assert _learned_lines(r) is None  # not measured for every copy (a diagnosis before it)


def test_within_window_hides_exactly_the_keys_beyond_the_window():
    """The counterfactual scheme: the inner bias within the window, −∞ beyond it, the inner scale
    (T5: 1); attention with it equals the reference with those keys masked by hand."""
    t5 = build("t5", n_heads=2, head_dim=8, max_distance=20)
    with torch.no_grad():
        t5.table.normal_()
    w = WithinWindow(t5, 5)
    pos = torch.arange(12)
    b = w.bias(pos, pos)
    far = (pos[:, None] - pos[None, :]) >= 5
    assert torch.isinf(b[:, far]).all() and torch.equal(b[:, ~far], t5.bias(pos, pos)[:, ~far])
    assert w.default_scale() == 1.0
    q, k, v = (torch.randn(1, 2, 12, 8) for _ in range(3))
    hidden = far | (pos[None, :] > pos[:, None])
    want = torch.softmax((q @ k.transpose(-1, -2) + t5.bias(pos, pos)).masked_fill(hidden, float("-inf")), -1) @ v
    torch.testing.assert_close(attention(q, k, v, w), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="window must be"):
        WithinWindow(t5, 0)


def test_window_effect_restores_the_model_for_any_scheme(corpus):
    model = TransformerLM(ModelConfig(scheme="alibi", **TINY))
    scheme = model.scheme
    win = window_effect(model, corpus.val, 2 * L, L, 2)
    assert win.shape == (2, 2 * L) and model.scheme is scheme
    rope = TransformerLM(ModelConfig(scheme="rope", **TINY))
    assert not torch.allclose(window_effect(rope, corpus.val, 2 * L, L, 1),
                              window_effect(rope, corpus.val, 2 * L, 2 * L, 1))
    assert rope.scheme.name == "rope" and rope.blocks[0].attn.backend == "auto"
    # a checkpoint that names a structured backend (which a counterfactual is not) is cut the same way
    named = TransformerLM(ModelConfig(scheme="alibi", backend="alibi", **TINY))
    named.load_state_dict(model.state_dict())
    torch.testing.assert_close(window_effect(named, corpus.val, 2 * L, L, 2), win, atol=0, rtol=0)
    assert named.blocks[0].attn.backend == "alibi"
    # a window as long as the text hides nothing: the same losses as the full context
    full = window_effect(model, corpus.val, 2 * L, 2 * L, 2)
    from posbias.evaluate import token_losses
    plain = token_losses(model, corpus.val, 2 * L, n_tokens=4 * L).view(2, 2 * L)
    torch.testing.assert_close(full, plain, atol=1e-5, rtol=1e-5)  # another kernel


def test_window_split_adds_up():
    L_, n = 16, 64
    long, win, short = (torch.rand(4, n, dtype=torch.float64) for _ in range(3))
    short[:, :L_] = long[:, :L_]
    (l1, d1, lo1, hi1), (l2, d2, _, _), (l3, d3, lo3, hi3) = window_split(long, win, short, L_)
    kept = (torch.arange(n) >= L_) & (torch.arange(n) % L_ >= 2)
    assert d1 + d2 == pytest.approx(float((long - short)[:, kept].mean())) and lo1 <= d1 <= hi1
    ends = [31, 47, 63]  # the last position of each chunk after the first
    assert d3 == pytest.approx(float((win - short)[:, ends].mean())) and lo3 <= d3 <= hi3
    assert chunk_ends(n, L_).nonzero().flatten().tolist() == ends
    assert "keys at distance ≥ 16" in l1 and "window of 16 − cut" in l2 and "through the layers" in l3


def test_a_window_short_of_two_L_has_no_chunk_end_row_and_says_why(tmp_path, corpus):
    """Between L and 2 L no chunk past the first ends, so window − cut at chunk ends is a mean over no
    position (it was NaN, refused only when written, after the work). The row is left out, the report
    says why, and the comparison has no cell for it; the passkey grid (L, 2 L, …) has L alone, and the
    summary says so instead of naming L twice."""
    from posbias.report import comparison

    assert window_split(*(torch.rand(2, 40, dtype=torch.float64) for _ in range(3)), 32)[-1][0].startswith("keys within")
    path = tiny_checkpoint(tmp_path / "t", "t5", max_distance=L)
    rep = run_diagnose(path, DiagnoseConfig(length=3 * L // 2, eval_tokens=EVAL, passkey_steps=2, passkey_samples=2),
                       corpus=corpus)
    assert len(rep.window_split) == 2 and all(math.isfinite(v) for row in rep.window_split for v in row[1:])
    diagnose_report.write(rep, tmp_path / "d")
    md = (tmp_path / "d" / "report.md").read_text()
    assert "nan" not in md.lower() and f"it needs a window of at least 2 L = {2 * L}" in md
    said = diagnose_report.summary(rep)
    assert not any("through the layers" in line for line in said)
    assert list(rep.passkey) == [str(L)] and f"at L; none past it (the grid runs at L, 2 L, … up to the {3 * L // 2}" in said[-1]
    assert comparison.row("t", rep)["through_layers"] is None


@pytest.mark.parametrize("scheme,layers,same", [("nope", 1, True), ("alibi", 1, True), ("rope", 1, True),
                                                ("t5", 1, True), ("nope", 2, False), ("sinusoidal", 1, False)])
def test_far_tokens_reach_chunk_ends_only_through_layers(scheme, layers, same):
    """At the last position of each cut chunk a sliding window of L and the cut show the first layer the
    same keys: with one layer and relative positions the loss there is the same, so window_split's third
    row is 0; through two layers (or with absolute positions, which the cut restarts) it is not."""
    tokens = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(scheme=scheme, d_model=32, n_layers=layers, n_heads=2)).eval()
    with torch.no_grad():
        long, short = context_effect(model, tokens, 4 * L, L, windows=3)
        win = window_effect(model, tokens, 4 * L, L, 3)
    _, d, lo, hi = window_split(long, win, short, L)[2]
    assert (abs(d) < 1e-5) == same, (scheme, layers, d)
    assert lo <= d <= hi


def test_bias_drift_reads_the_full_bias_at_the_last_query_of_training_and_of_the_window():
    """``bias_drift``, from the scheme's full bias matrix: rows L − 1 and length − 1, the keys at
    distances 0 … L − 1 from each, each row relative to its distance-0 entry."""
    torch.manual_seed(0)
    fire = perturb_(build("fire", n_heads=2, head_dim=8, init_L=8.0))  # a threshold below L: learned (FIRE's L is)
    n, big = 40, 16
    with torch.no_grad():
        full = fire.bias(torch.arange(n), torch.arange(n))  # [H, n, n]
        rows = [full[:, q, q - torch.arange(big)] for q in (big - 1, n - 1)]
    moved = (rows[1] - rows[1][:, :1]) - (rows[0] - rows[0][:, :1])
    got = bias_drift(fire, train_len=big, length=n)
    assert got == pytest.approx(moved.abs().amax(-1).tolist(), abs=1e-6) and min(got) > 1e-3
    assert bias_drift(perturb_(build("t5", n_heads=2, head_dim=8)), train_len=big, length=n) == [0.0, 0.0]


def test_the_context_effects_position_ranges_and_interval():
    """Its rows: [0, L), then ranges doubling past L; a Δ's interval needs two windows, no more."""
    assert delta_interval(torch.zeros(1, 5)) == (None, None)
    lo, hi = delta_interval(torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
    assert 0.5 <= lo <= hi <= 2.5
    assert _ranges(100, 10) == [(0, 10), (10, 20), (20, 40), (40, 80), (80, 100)]
    assert _ranges(10, 10) == [(0, 10)] and _ranges(7, 10) == [(0, 7)]


def test_a_one_layer_model_has_no_far_tokens_through_the_layers(tmp_path, corpus):
    """A one-layer T5 model: the report, the terminal lines and the comparison say the through-the-layers
    row is rounding, instead of reading a verdict from the interval of a difference of 1e-8."""
    from posbias.report import comparison

    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(scheme="t5", scheme_options={"max_distance": L}, **{**TINY, "n_layers": 1}))
    ckpt.save_checkpoint(tmp_path / "one", model, extra={"train": {"seq_len": L}})
    rep = run_diagnose(tmp_path / "one", DiagnoseConfig(length=2 * L, eval_tokens=EVAL, passkey_steps=0), corpus=corpus)
    assert len(rep.window_split) == 3 and abs(rep.window_split[2][1]) < 1e-5
    assert rep.passkey is None and rep.passkey_copies == []  # --passkey-steps 0: no passkey test at all
    said = [line for line in diagnose_report.summary(rep) if "through the layers" in line]
    assert len(said) == 1 and "of a one-layer model" in said[0] and not said[0].endswith(("hurts", "helps"))
    diagnose_report.write(rep, tmp_path / "d")
    assert "Δ is float rounding" in (tmp_path / "d" / "report.md").read_text()
    row = comparison.row("one", rep)
    assert row["through_layers"] is None and row["one_layer_of_offsets"]
    assert "| none (1 layer) |" in comparison.markdown([row], [rep])


def test_diagnose_cli_prints_its_verdicts(tmp_path, capsys, text_file):
    """The terminal gets the report's verdicts, not only the path to it."""
    path = tiny_checkpoint(tmp_path / "t", "t5", max_distance=L)
    argv = ["diagnose", str(path), "--length", str(2 * L), "--passkey-steps", "0", "--eval-tokens", str(EVAL),
            "--data", str(text_file), "--out", str(tmp_path / "d"), "--quiet"]
    assert main(argv) == 0
    said = "".join(capsys.readouterr())
    assert f"context past L = {L} (Δ " in said and "distant keys, for tokens that keep local context" in said
    assert "attention at distances ≥ L over the last" in said and "report " in said
    assert "keys beyond L, against a sliding window of L" in said
    assert "the bias moves" not in said  # T5: a bias of i − j alone
    assert "does not record the text it was trained on" in (tmp_path / "d" / "report.md").read_text()


def test_checkpoint_jobs_say_whether_they_measure_on_the_training_text(tmp_path, capsys, text_file, corpus):
    """A checkpoint that records its corpus: measured on another text, diagnose and retrofit say so on
    the terminal and in the report; on the same text, the report says that, and the terminal nothing."""
    from posbias.data import local_corpus

    model = ckpt.load_model(tiny_checkpoint(tmp_path / "t", "alibi"))
    path = ckpt.save_checkpoint(tmp_path / "c", model, extra={"train": {"seq_len": L}, "corpus": corpus.fingerprint})
    other = local_corpus(str(text_file)).fingerprint
    common = ["--passkey-steps", "0", "--eval-tokens", str(EVAL), "--quiet"]
    for argv, report in ((["diagnose", str(path), "--length", str(2 * L), *common], "report.md"),
                         (["retrofit", str(path), "--to", str(2 * L), "--method", "swap-t5", *common], "results.md")):
        for data, same in ((["--data", str(text_file)], False), ([], True)):
            out = tmp_path / f"{argv[0]}-{same}"
            said = main_timed(capsys, [*argv, *data, "--out", str(out)])
            md = (out / report).read_text()
            if same:
                assert "not** the text" not in md and "the text the checkpoint was trained on." in md
                assert "not the text the checkpoint was trained on" not in said
            else:
                line = (f"Measured on the validation split of {other['name']} (sha256 {other['sha256']}): not the "
                        f"text the checkpoint was trained on, {corpus.fingerprint['name']}")
                assert line in said and line.replace(": not", ": **not**") in md


def test_discover_finds_every_model_a_path_names(tmp_path):
    """A checkpoint, a model folder (its final/), a study's or retrofit's output folder or its models/:
    every finished model by its folder's name; unfinished models and passkey copies aside."""
    model = TransformerLM(ModelConfig(scheme="alibi", **TINY))
    models = tmp_path / "study" / "models"
    for sub in ("t5-seed0-0123456789/final", "alibi-seed1-abcdef0123/last", "passkey-ft3-0123456789",
                "swap-t5-ft5-0123456789"):
        ckpt.save_checkpoint(models / sub, model, extra={"train": {"seq_len": L}})
    want = [("swap-t5-ft5-0123456789", models / "swap-t5-ft5-0123456789"),
            ("t5-seed0-0123456789", models / "t5-seed0-0123456789" / "final")]
    assert ckpt.discover(tmp_path / "study") == want and ckpt.discover(models) == want
    assert ckpt.discover(models / "t5-seed0-0123456789") == want[1:]
    assert ckpt.discover(models / "t5-seed0-0123456789" / "final") == want[1:]
    assert ckpt.discover(models / "alibi-seed1-abcdef0123" / "last") == [
        ("alibi-seed1-abcdef0123", models / "alibi-seed1-abcdef0123" / "last")]
    assert ckpt.discover(models / "alibi-seed1-abcdef0123") == [] and ckpt.discover(tmp_path / "none") == []
    # what an interrupted save leaves beside them, and a Hugging Face model folder, are no models
    for sub in ("swap-alibi-ft5-0123456789.tmp", "swap-alibi-ft5-0123456789.old"):
        ckpt.save_checkpoint(models / sub, model, extra={"train": {"seq_len": L}})
    (models / "flan-t5").mkdir()
    (models / "flan-t5" / ckpt.CONFIG_FILE).write_text('{"model_type": "t5"}')
    assert ckpt.discover(tmp_path / "study") == want


def test_diagnose_compares_the_models_of_a_folder(tmp_path, capsys, text_file):
    """Several models: each diagnosed into its own folder as alone, and a comparison table, JSON and
    plot beside them whose cells are the diagnoses' own numbers; a model named twice is diagnosed once."""
    from posbias.report import comparison

    study = tmp_path / "study" / "models"
    for name, scheme, opts in (("t5-seed0-0123456789", "t5", {"max_distance": L}), ("fire-seed0-abcdef0123", "fire", {"init_L": L // 2})):
        model = ckpt.load_model(tiny_checkpoint(tmp_path / name, scheme, **opts))
        ckpt.save_checkpoint(study / name / "final", model, extra={"train": {"seq_len": L}})
    out = tmp_path / "d"
    argv = ["diagnose", str(tmp_path / "study"), str(study / "fire-seed0-abcdef0123"), "--length", str(2 * L),
            "--passkey-steps", "2", "--passkey-samples", "2", "--eval-tokens", str(EVAL), "--data", str(text_file),
            "--out", str(out), "--quiet"]
    said = main_timed(capsys, argv)
    assert "[1/2] fire-seed0 (" in said and "[2/2] t5-seed0 (" in said and "[3/" not in said
    assert "* The context past L:" in said and "comparison.md" in said
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["fire-seed0", "t5-seed0"]
    for r in rows:
        alone = json.loads((out / r["model"] / "diagnose.json").read_text())
        assert r["scheme"] == alone["scheme"] and r["bias_drift"] == max(alone["bias_drift"])
        assert r["context"][1:] == alone["loss_delta_interval"]
        assert r["keys_beyond_L"] == alone["window_split"][0][1:] and r["through_layers"] == alone["window_split"][2][1:]
        assert r["passkey"][str(L)][0] == pytest.approx(statistics.fmean(alone["passkey"][str(L)].values()))
    assert rows[0]["bias_drift"] > 0 and rows[1]["bias_drift"] == 0  # FIRE's bias moves past L, T5's cannot
    md = (out / "comparison.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len({line.count(" | ") for line in table if not line.startswith("|---")}) == 1  # every row fills the header
    assert f"| {rows[1]['ppl_below_L']:.3f} | {rows[1]['ppl_last_half']:.3f} |" in md
    assert md.count("\n| fire-seed0 |") == 1 and "| t5-seed0 |" in md and (out / "comparison.png").exists()
    assert "The bias moves with the query position past L in fire-seed0" in md
    assert "not** (or not recorded as) the text these were trained on: fire-seed0, t5-seed0" in md
    untaught = [r["model"] for r in rows if r["passkey"][str(L)][0] == 0]
    assert ("did not teach the task at L to " + ", ".join(untaught) in md) == bool(untaught)
    assert comparison.verdict((0.1, 0.05, 0.2)) == "hurts" and comparison.verdict((-0.1, -0.2, -0.01)) == "helps"
    assert comparison.verdict((0.0, -0.1, 0.1)) == "≈ 0" and comparison.verdict((0.1, None, None)) == "no interval"
    for r in rows:  # the bytes' scores: the diagnosis's, mean over depths
        alone = json.loads((out / r["model"] / "diagnose.json").read_text())
        cells = alone["passkey_digits"][str(L)].values()
        assert r["passkey_digits"][str(L)] == pytest.approx([statistics.fmean(c[i] for c in cells) for i in range(5)])
    made = {**rows[0], "context": (0.1, 0.05, 0.2), "distant_keys": None, "keys_beyond_L": None, "through_layers": None,
            "attention_beyond_L": None, "bias_drift": None, "rotary_unseen": None, "passkey_fits": None,
            "passkey_seeds": [0], "passkey_digits": {L: [0.5, 0.2, 0.1, 0.1, 0.1], 8 * L: [0.1] * 5}}
    said = comparison.sentences([{**made, "model": "a", "passkey": {L: (0.0, 0.0, 0.1), 8 * L: (0.0, 0.0, 0.1)},
                                  "passkey_copies": {L: [0.0], 8 * L: [0.0]}},
                                 {**made, "model": "b", "passkey": {L: (0.9, 0.8, 0.95), 8 * L: (0.5, 0.4, 0.6)},
                                  "passkey_copies": {L: [0.9], 8 * L: [0.5]}},
                                 {**made, "model": "c", "passkey": {L: (0.9, 0.8, 0.95), 8 * L: (0.3, 0.2, 0.5)},
                                  "passkey_copies": {L: [0.9], 8 * L: [0.3]}}])
    assert said == ["The context past L: hurt in a, b, c (the verdict nearest to turning: a, whose interval ends at +0.0500).",
                    "The passkey fine-tune did not teach the task at L to a (no sample solved there): their passkey "
                    "columns say nothing about retrieval past L; raise --passkey-steps. Answer bytes right at L (mean "
                    "over depths, all bytes · the first, which needs the key found; a guess among the ten digits "
                    "scores 0.1, a digit of the key copied from a random place 0.28): a 0.20 · 0.50.",
                    "Passkey retrieval at the window's length, among the models that solve samples at L (mean over "
                    "copies): best 0.50; models whose interval reaches it: b, c (one copy each: the intervals are over "
                    "samples, not over copies, which can differ far more; `--passkey-seeds 0 1 2` trains three). "
                    "Answer bytes right at the window's length (mean "
                    "over depths, all bytes · the first, which needs the key found; a guess among the ten digits "
                    "scores 0.1, a digit of the key copied from a random place 0.28): b 0.10 · 0.10; c 0.10 · 0.10."]


def test_rotary_angles_mark_the_pairs_that_meet_angles_training_never_gave():
    """Plain RoPE: exactly the pairs whose wavelength exceeds L meet new angles past it; PI by the
    window's factor: none; NTK: the lowest pair is slowed by exactly the factor (none new), middle pairs
    are not; a scheme without rotation: None."""
    from posbias.diagnose import rotary_angles

    n, d = 8 * L, 16
    rope = build("rope", n_heads=2, head_dim=d)
    plain = rotary_angles(rope, train_len=L, length=n)
    assert plain["unseen"] == [w > L for w in plain["wavelength"]] and 0 < sum(plain["unseen"]) < d // 2
    theta = rope_frequencies(d)
    assert plain["train_angle"] == pytest.approx((theta * (L - 1)).tolist())
    assert plain["end_angle"] == pytest.approx((theta * (n - 1)).tolist())
    pi = rotary_angles(build("rope", n_heads=2, head_dim=d, scaling="pi", factor=8.0), train_len=L, length=n)
    assert not any(pi["unseen"]) and pi["end_angle"] == pytest.approx((theta * (n - 1) / 8).tolist())
    ntk = rotary_angles(build("rope", n_heads=2, head_dim=d, scaling="ntk", factor=8.0), train_len=L, length=n)
    assert ntk["end_angle"][-1] == pytest.approx(float(theta[-1]) * (n - 1) / 8) and not ntk["unseen"][-1]
    assert any(ntk["unseen"]) and ntk["wavelength"] == plain["wavelength"]  # trained with the base frequencies
    assert rotary_angles(build("alibi", n_heads=2, head_dim=d), train_len=L, length=n) is None
    # "past θ·L" is strict: a window of L + 1 ends at distance L, angle θ·L, which is not past it (the
    # convention of the wavelength test, λ > L, as YaRN's r = L/λ); one token more is
    edge = [rotary_angles(rope, train_len=L, length=L + k)["unseen"] for k in (1, 2)]
    assert not any(edge[0]) and edge[1] == plain["unseen"]
    # a training length with a wavelength just under it (198.7 of 250, pair 3): a turn is 2π, not 3π
    wide = rotary_angles(rope, train_len=250, length=2000)
    assert wide["wavelength"] == pytest.approx((2 * math.pi / theta).tolist())
    assert wide["unseen"] == [w > 250 for w in wide["wavelength"]] and 180 < wide["wavelength"][3] < 250


def test_a_retrofits_scored_tokens_are_those_of_its_longest_length():
    """``RetrofitResult.eval_tokens``, which the report and results.json state: what the longest length
    scored (a short split holds more windows of the shorter lengths), or the budget before any row."""
    from posbias.evaluate import SEGMENTS
    from posbias.retrofit import RetrofitResult

    res = RetrofitResult(checkpoint="c", train_len=L, to=2 * L, eval_lens=[L, 2 * L],
                         config=RetrofitConfig(to=2 * L, methods=("pi",)), corpus={})
    assert res.eval_tokens == SEGMENTS * 2 * L
    res.rows.append({"window_loss": {L: [1.0] * 5, 2 * L: [1.0] * 2}})  # the split held 5 windows of L, 2 of 2L
    assert res.eval_tokens == 2 * 2 * L


def test_retrofit_and_diagnose_score_sixty_four_units_unless_told(tmp_path, corpus):
    """Unless --eval-tokens says otherwise, retrofit scores evaluate.SEGMENTS segments of its longest
    length and diagnose as many windows (fewer gave intervals measurably too narrow: docs/study.md, "Do the
    intervals now mean 95%?"), and neither report warns of too few."""
    from posbias.evaluate import SEGMENTS

    path = tiny_checkpoint(tmp_path / "r", "rope")
    res = run_retrofit(path, RetrofitConfig(to=2 * L, methods=("pi",)), tmp_path / "out", corpus=corpus)
    retrofit_report.write(res, tmp_path / "out")
    assert res.eval_tokens == SEGMENTS * 2 * L and res.config.eval_tokens is None
    assert all(len(r["window_loss"][2 * L]) == SEGMENTS for r in res.rows)
    assert "windows scored (fewer than" not in (tmp_path / "out" / "results.md").read_text()
    rep = run_diagnose(path, DiagnoseConfig(length=2 * L, windows=1, passkey_steps=0), corpus=corpus)
    diagnose_report.write(rep, tmp_path / "d")
    assert rep.loss_windows == SEGMENTS and "windows scored (fewer than" not in (tmp_path / "d" / "report.md").read_text()
    # without the passkey test, diagnose.json records none: no copy, no steps, samples or seeds
    saved = rep.to_json()
    assert {k: saved[k] for k in ("passkey", "passkey_digits", "passkey_copies", "passkey_max_steps", "passkey_until",
                                  "passkey_samples", "passkey_seeds", "passkey_skipped", "passkey_lr_mult")} == dict(
        passkey=None, passkey_digits=None, passkey_copies=[], passkey_max_steps=0, passkey_until=0.0, passkey_samples=0,
        passkey_seeds=[], passkey_skipped="", passkey_lr_mult=1.0)
    for bad in (0, -8):
        with pytest.raises(ValueError, match="eval_tokens"):
            RetrofitConfig(to=2 * L, methods=("pi",), eval_tokens=bad)
        with pytest.raises(ValueError, match="eval_tokens"):
            DiagnoseConfig(eval_tokens=bad)


def test_retrofit_and_diagnose_defaults():
    """What ``posbias retrofit`` and ``posbias diagnose`` run for a user who sets nothing (the command
    line takes every default from these configs: test_cli's defaults test). The measurements in
    docs/retrofit-and-diagnose.md were made at them: a 2,400-step passkey copy of batches of seed 0,
    24 samples per cell in a diagnosis and 32 in a retrofit's decision table, 4 attention windows,
    fine-tunes of 4 sequences at 3e-4, and 2 threads. A moved default changed them with no test failing."""
    assert dataclasses.asdict(RetrofitConfig(to=4 * L, methods=("pi",))) == dict(
        to=4 * L, methods=("pi",), finetune_steps=0, finetune_batch=4, finetune_lr=3e-4, pos_lr_mult=None,
        eval_lens=None, eval_tokens=None, compare=False, passkey_steps=2400, passkey_until=0.0, passkey_samples=32,
        device="cpu", seed=0, passkey_seeds=None, threads=2)
    assert dataclasses.asdict(DiagnoseConfig()) == dict(
        length=None, windows=4, eval_tokens=None, passkey_steps=2400, passkey_until=0.0, passkey_samples=24,
        passkey_seeds=(0,), device="cpu", threads=2)
    for cfg, name in ((RetrofitConfig(to=4 * L, methods=("pi",)), "to"), (DiagnoseConfig(), "windows")):
        with pytest.raises(dataclasses.FrozenInstanceError):  # checked once, when made: never changed after
            setattr(cfg, name, 1)
    # a window of 2 is the shortest there is (one query past a training length of 1); 1 is refused when made
    assert DiagnoseConfig(length=2).length == 2
    with pytest.raises(ValueError, match="length must be an integer >= 2, got 1"):
        DiagnoseConfig(length=1)


def test_attention_windows_start_at_exact_integer_positions():
    """diagnose's attention windows (spread_starts with overlap): evenly from 0 to the last window that
    fits, the same starts a float linspace gave on the demo's split, overlapping on a short split, and
    exact past 2^24 tokens, where float32 rounds."""
    from posbias.evaluate import spread_starts

    for n, length, count in ((544035, 512, 4), (544035, 1024, 4), (3001, 128, 3), (200, 64, 1), (300, 128, 4)):
        assert spread_starts(n - 1, length, count, overlap=True) == \
            torch.linspace(0, n - length - 1, count).long().tolist()
    n = 2**25 + 7
    starts = spread_starts(n - 1, 1024, 4, overlap=True)
    assert starts == [0, (n - 1025) // 3, 2 * (n - 1025) // 3, n - 1025]
    assert all(type(s) is int for s in starts) and starts[-1] + 1024 + 1 == n
    assert torch.linspace(0, n - 1025, 4).long().tolist() != starts  # what float32 gave
    with pytest.raises(ValueError, match="fewer than 1 segment of 64"):
        spread_starts(63, 64, 2, overlap=True)
    with pytest.raises(ValueError, match="fewer than 4 segments of 128"):
        spread_starts(299, 128, 4)  # without overlap they must fit side by side
    for span, count in ((0, 3), (10, 0)):
        with pytest.raises(ValueError, match=f"got span {span}, count {count}"):
            spread_starts(100, span, count)


def test_diagnose_report_names_the_rotary_pairs_past_training(tmp_path, corpus):
    path = tiny_checkpoint(tmp_path / "t", "rope")
    rep = run_diagnose(path, DiagnoseConfig(length=4 * L, windows=1, eval_tokens=MIN_SEGMENTS * 4 * L, passkey_steps=0), corpus=corpus)
    diagnose_report.write(rep, tmp_path / "d")
    md = (tmp_path / "d" / "report.md").read_text()
    unseen = [k for k, u in enumerate(rep.rotary["unseen"]) if u]
    assert "## Rotary angles past L" in md and f"{len(unseen)} of {TINY['d_model'] // TINY['n_heads'] // 2} pairs" in md
    assert md.count("**yes**") == len(unseen) and rep.effective_reach is None


def test_diagnose_and_retrofit_refuse_fewer_windows_than_an_interval_needs(tmp_path, corpus, capsys):
    """One window is a point, not an interval (before: "cannot be judged from 1 window"), and up to 4
    an interval held the text's value in at most 84% of draws: fewer than MIN_SEGMENTS are refused
    before any work, naming the setting and what to give."""
    path = tiny_checkpoint(tmp_path / "t", "alibi")
    for tokens in (2 * L, (MIN_SEGMENTS - 1) * 2 * L + 2 * L - 1):
        count = tokens // (2 * L)
        with pytest.raises(ConfigError, match=rf"eval_tokens {tokens:,} scores {count} segments? of 96, fewer than the "
                                              rf"8 an interval needs .*; give 768 or more"):
            run_diagnose(path, DiagnoseConfig(length=2 * L, eval_tokens=tokens, passkey_steps=0), corpus=corpus)
        with pytest.raises(ConfigError, match=rf"eval_tokens {tokens:,} scores {count} segments? of 96"):
            run_retrofit(path, RetrofitConfig(to=2 * L, methods=("swap-t5",), eval_tokens=tokens), tmp_path / "r",
                         corpus=corpus)
    assert not (tmp_path / "r").exists()  # refused before any work
    one_line_error(capsys, main(["diagnose", str(path), "--length", str(2 * L), "--eval-tokens", "96",
                                 "--out", str(tmp_path / "d")]),
                   "posbias diagnose: error: --eval-tokens 96 scores 1 segment of 96, fewer than the 8 an interval needs")
    assert not (tmp_path / "d").exists()
    rep = run_diagnose(path, DiagnoseConfig(length=2 * L, eval_tokens=EVAL, passkey_steps=0), corpus=corpus)
    assert rep.loss_windows == MIN_SEGMENTS and rep.loss_delta_interval[0] < rep.loss_delta_interval[1]


def test_attention_distance_matches_a_hand_computation():
    model = TransformerLM(ModelConfig(scheme="alibi", **TINY)).eval()
    idx = torch.randint(0, 256, (1, 12))
    ad = attention_distance(model, idx)
    assert ad["mean"].shape == (2, 2, 12)
    assert ad["mean"][:, :, 0].abs().max() == 0  # the first query can only look at itself
    assert (ad["q90"] >= ad["q50"]).all() and (ad["q90"] <= torch.arange(12)).all()
    # the mass on keys at distance ≥ 5, against the probabilities themselves
    probs = []
    with torch.no_grad():
        model(idx, on_attention=lambda layer, p: probs.append(p[0]))
    far = attention_distance(model, idx, beyond=5)["beyond"]
    dist = torch.arange(12)[:, None] - torch.arange(12)[None, :]
    for layer, p in enumerate(probs):
        torch.testing.assert_close(far[layer], (p * (dist >= 5)).sum(-1))
    assert far[:, :, :5].abs().max() == 0 and (far <= 1 + 1e-6).all()
    # each quantile: the smallest distance whose keys, nearest first, hold that share of the query's attention
    for (layer, p), h, i, q in itertools.product(enumerate(probs), range(2), range(12), (50, 90)):
        mass = p[h, i, i - torch.arange(i + 1)].cumsum(0)  # distances 0 … i
        assert ad[f"q{q}"][layer, h, i] == int(torch.nonzero(mass >= q / 100)[0]), (layer, h, i, q)
    with pytest.raises(ValueError, match="beyond"):
        attention_distance(model, idx, beyond=0)
    two = torch.cat([idx, torch.randint(0, 256, (1, 12))])  # rows one at a time: the mean of each alone
    both, alone = attention_distance(model, two, beyond=5), [attention_distance(model, r[None], beyond=5) for r in two]
    for key, value in both.items():
        torch.testing.assert_close(value, (alone[0][key] + alone[1][key]) / 2)


@pytest.mark.parametrize("scheme", ["t5", "rope", "fire", "sinusoidal"])
def test_attention_rows_are_the_last_rows_of_the_full_probabilities(scheme):
    """``attention_rows=r`` hands the hook only the last r queries' probabilities (what answer_attention
    reads), the same rows as the full matrix's; the logits are the plain forward's; more rows than
    the sequence has give them all; 0 rows is refused."""
    model = TransformerLM(ModelConfig(scheme=scheme, **TINY)).eval()
    idx = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(0))
    full, rows = [], []
    with torch.no_grad():
        plain = model(idx)
        model(idx, on_attention=lambda layer, p: full.append(p))
        logits = model(idx, on_attention=lambda layer, p: rows.append(p), attention_rows=5)
        assert torch.equal(logits, plain) and len(rows) == TINY["n_layers"]
        for f, r in zip(full, rows):
            assert r.shape == (2, TINY["n_heads"], 5, 30)
            torch.testing.assert_close(r, f[:, :, -5:], rtol=0, atol=1e-6)
        every = []
        model(idx, on_attention=lambda layer, p: every.append(p), attention_rows=99)
        assert all(torch.equal(a, b) for a, b in zip(every, full))
    with pytest.raises(ValueError, match="attention_rows must be an integer >= 1, got 0"):
        model(idx, on_attention=lambda layer, p: None, attention_rows=0)


def test_context_split_separates_restored_local_context_from_far_context():
    """Cut into chunks of L = 16, positions 16–17, 32–33, 48–49 lose their local context (the first
    L/8 = 2 of each chunk): a gain placed there and a cost everywhere else past L are told apart."""
    L, n = 16, 64
    pos = torch.arange(n)
    starts = (pos >= L) & (pos % L < 2)
    rest = (pos >= L) & ~starts
    short = torch.rand(5, n, dtype=torch.float64) + 1
    noise = torch.randn(5, n, dtype=torch.float64) * 1e-3 * (pos >= L)  # before L both see the same context
    long = short - 0.3 * starts + 0.02 * rest + noise
    (l1, share1, d1, lo1, hi1), (l2, share2, d2, lo2, hi2) = context_split(long, short, L)
    assert "first 2 of each cut chunk" in l1 and share1 == pytest.approx(6 / 64) and d1 == pytest.approx(-0.3, abs=2e-3)
    assert "≥ 2 tokens" in l2 and share2 == pytest.approx(42 / 64) and d2 == pytest.approx(0.02, abs=2e-3)
    assert lo1 <= d1 <= hi1 < 0 < lo2 <= d2 <= hi2
    assert share1 * d1 + share2 * d2 == pytest.approx(float((long - short).mean()))
    assert context_split(long[:1], short[:1], L)[0][3:] == (None, None)  # one window: no interval
    assert context_split(long[:, :L], short[:, :L], L) == []  # nothing past L


def test_final_bucket_share_and_reach():
    t5 = build("t5", n_heads=2, head_dim=8, max_distance=64)
    w = t5.flat_beyond
    n = 4 * w
    pairs = sum(n - o for o in range(w, n))
    assert final_bucket_share(t5, n) == pytest.approx(pairs / (n * (n + 1) / 2))
    assert final_bucket_share(t5, w) == 0.0
    alibi = build("alibi", n_heads=2, head_dim=8)  # slopes 1/16 and 1/256
    reach = effective_reach(alibi, query_pos=5000, max_distance=5000)
    assert reach == [int(torch.ceil(torch.tensor(4.60517 * 16))), int(torch.ceil(torch.tensor(4.60517 * 256)))]


def test_bias_drift_is_zero_for_a_toeplitz_bias_and_measures_fire_past_its_threshold():
    """The bias over the trained distances, query at L − 1 against query at the window's end: a
    function of i − j alone does not move; FIRE, whose distances are divided by max(i, threshold),
    moves once the query passes its threshold — by exactly what its own bias says."""
    assert bias_drift(build("t5", n_heads=2, head_dim=8), train_len=32, length=512) == [0.0, 0.0]
    assert bias_drift(build("rope", n_heads=2, head_dim=8), train_len=32, length=512) is None
    fire = build("fire", n_heads=2, head_dim=8, init_L=32.0)
    with torch.no_grad():
        for p in fire.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    drift = bias_drift(fire, train_len=32, length=512)
    d = torch.arange(32)
    a, b = fire.bias_by_distance(d, query_pos=31), fire.bias_by_distance(d, query_pos=511)
    want = ((b - b[:, :1]) - (a - a[:, :1])).abs().amax(-1)
    assert drift == pytest.approx(want.tolist()) and min(drift) > 0.01
    assert bias_drift(fire, train_len=32, length=32) == [0.0, 0.0]  # the same query: nothing moves


def test_cli_errors(tmp_path, capsys):
    assert main(["diagnose", str(tmp_path)]) == 2
    assert "holds no posbias checkpoint" in capsys.readouterr().err
    path = tiny_checkpoint(tmp_path / "a", "alibi")
    out = tmp_path / "out"
    assert main(["retrofit", str(path), "--to", "200", "--method", "yarn", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "needs a rope checkpoint" in err and "swap-t5" in err and "Traceback" not in err
    assert not out.exists()  # refused before writing anything: no empty folder (with a lock file) left behind
    assert main(["retrofit", str(path), "--to", "200", "--out", str(out)]) == 2
    assert "give --method" in capsys.readouterr().err


def test_diagnose_refuses_a_window_that_does_not_pass_L(tmp_path, capsys, corpus):
    """Every measurement of a diagnosis is of what happens past L; at or below L the "cut" context is the
    full one and Δ is rounding between two batch shapes (once reported as "helps"). Refused in one line
    before any model is examined, naming the model whose L it is, and by the library too."""
    short = tiny_checkpoint(tmp_path / "short", "t5", max_distance=L)
    ckpt.save_checkpoint(tmp_path / "long", ckpt.load_model(short), extra={"train": {"seq_len": 4 * L}})
    out = tmp_path / "out"
    for length in (L // 2, L):
        one_line_error(capsys, main(["diagnose", str(short), "--length", str(length), "--out", str(out)]),
                       f"--length must exceed the training length L = {L} of", f"got {length}")
    # several models: the second's L = 4 L is not passed by 2 L, so nothing runs for the first either
    err = one_line_error(capsys, main(["diagnose", str(short), str(tmp_path / "long"), "--length", str(2 * L),
                                       "--out", str(out), "--quiet"]), f"L = {4 * L} of long")
    assert "short" not in err and not out.exists()
    with pytest.raises(ValueError, match=f"length must exceed the training length L = {L} of .*got {L}"):
        run_diagnose(short, DiagnoseConfig(length=L, passkey_steps=0), corpus=corpus)


def test_diagnose_refuses_a_window_the_split_or_the_memory_cannot_hold(tmp_path, capsys, corpus, monkeypatch):
    """A window longer than the validation split, or whose attention statistics (3.5 × one layer's
    [heads, N, N] float32 at their peak) exceed the device's memory, is refused before any work, in one
    line: otherwise the first fails after the loss measurements and the second is killed with no message."""
    import posbias.diagnose as diagnose_mod

    path = tiny_checkpoint(tmp_path / "t", "t5", max_distance=L)
    n_val = corpus.val.numel() - 1
    one_line_error(capsys, main(["diagnose", str(path), "--length", str(n_val + 1), "--out", str(tmp_path / "o")]),
                   f"--length {n_val + 1} exceeds the validation split's {n_val:,} scoreable tokens")
    monkeypatch.setattr(diagnose_mod, "device_memory", lambda device: 2**30)
    need = 3.5 * TINY["n_heads"] * 8192**2 * 4 / 2**30
    one_line_error(capsys, main(["diagnose", str(path), "--length", "8192", "--out", str(tmp_path / "o")]),
                   f"--length 8192 needs about {need:.1f} GiB for the attention statistics of t (3.5 × "
                   f"{TINY['n_heads']} heads × 8192² float32 at their peak), more than the 1.0 GiB this cpu has")
    assert not (tmp_path / "o").exists()
    assert diagnose_mod.examined_length(path, DiagnoseConfig(length=4096), corpus) == 4096  # 0.4 GiB fits
    assert diagnose_mod.examined_length(path, DiagnoseConfig(), corpus) == 8 * L  # by default, 8 × L
    # more attention windows than the split holds distinct ones (2⁶⁴ listed starts for minutes before)
    distinct = n_val + 1 - 4096
    for windows in (distinct + 1, 2**64):
        one_line_error(capsys, main(["diagnose", str(path), "--length", "4096", "--windows", str(windows), "--out",
                                     str(tmp_path / "o")]),
                       f"--windows {windows} exceeds the {distinct:,} distinct windows of 4096 tokens that the "
                       "validation split holds")
    assert diagnose_mod.examined_length(path, DiagnoseConfig(length=4096, windows=distinct), corpus) == 4096
    exact = diagnose_mod.attention_peak(TINY["n_heads"], 4096)  # a peak of exactly the memory there is fits
    monkeypatch.setattr(diagnose_mod, "device_memory", lambda device: exact)
    assert diagnose_mod.examined_length(path, DiagnoseConfig(length=4096), corpus) == 4096
    monkeypatch.setattr(diagnose_mod, "device_memory", lambda device: exact - 1)
    # under 1 GiB in MiB, not "needs about 0 GiB … more than the 0 GiB"
    need = exact / 2**20
    with pytest.raises(ConfigError, match=rf"4096 needs about {need:.1f} MiB for the attention statistics .* more than "
                                          rf"the {need:.1f} MiB this cpu has"):
        diagnose_mod.examined_length(path, DiagnoseConfig(length=4096), corpus)
    monkeypatch.undo()
    assert diagnose_mod.device_memory("cpu") > 2**30  # this machine's RAM, read from the OS


def test_retrofit_gives_each_method_and_length_once(tmp_path, capsys, corpus):
    """A method named twice is refused (it gave two identical rows); lengths given twice or out of order
    give one column each, in order (they gave a repeated column, in the order typed)."""
    path = tiny_checkpoint(tmp_path / "r", "rope")
    one_line_error(capsys, main(["retrofit", str(path), "--to", str(2 * L), "--method", "pi", "ntk", "pi",
                                 "--out", str(tmp_path / "o")]), "--method names pi twice; give each method once")
    res = run_retrofit(path, RetrofitConfig(to=2 * L, methods=("ntk",), eval_lens=(2 * L, L, 2 * L)), tmp_path / "r2",
                       corpus=corpus)
    assert res.eval_lens == [L, 2 * L] and all(list(r["ppl"]) == [L, 2 * L] for r in res.rows)


def test_retrofit_refuses_lengths_the_split_or_the_budget_cannot_hold(tmp_path, capsys, corpus):
    """--to past the validation split or with room for fewer than 8 segments of it, or --eval-tokens
    scoring fewer, is refused before the first evaluation (it used to surface when that length came up;
    --eval-tokens blamed the split; a short split silently cut the segments, down to 1)."""
    path = tiny_checkpoint(tmp_path / "r", "rope")
    n_val = corpus.val.numel() - 1
    out = tmp_path / "o"
    one_line_error(capsys, main(["retrofit", str(path), "--to", str(n_val + 1), "--method", "pi", "--out", str(out)]),
                   f"--to {n_val + 1} exceeds the validation split's {n_val:,} scoreable tokens")
    one_line_error(capsys, main(["retrofit", str(path), "--to", str(4 * L), "--method", "pi", "--eval-tokens", "10",
                                 "--out", str(out)]), f"--eval-tokens 10 scores 0 segments of {4 * L}, fewer than the 8 "
                   f"an interval needs", f"give {8 * 4 * L:,} or more")
    # more tokens than the split holds: they were scored as what fit, while results.json named the count asked for
    one_line_error(capsys, main(["retrofit", str(path), "--to", str(4 * L), "--method", "pi", "--eval-tokens",
                                 str(n_val + 1), "--out", str(out)]),
                   f"--eval-tokens {n_val + 1:,} exceed the validation split's {n_val:,} scoreable tokens; give "
                   f"{n_val // (4 * L) * 4 * L:,} or fewer ({n_val // (4 * L)} segments of {4 * L})")
    one_line_error(capsys, main(["diagnose", str(path), "--length", str(4 * L), "--eval-tokens", str(n_val + 1),
                                 "--out", str(out)]), f"--eval-tokens {n_val + 1:,} exceed the validation split's")
    # a length the split holds fewer than 8 segments of: its default of 64 was cut to what fit, down to 1
    one_line_error(capsys, main(["retrofit", str(path), "--to", str(n_val // 3), "--method", "pi", "--out", str(out)]),
                   f"--to {n_val // 3}: the validation split's {n_val:,} scoreable tokens hold 3 segments of it, fewer "
                   f"than the 8 an interval needs", f"a length of at most {n_val // 8:,}, or more validation text")
    # a split too short for 8 segments of any length past L: they said "at most" a length below L, which
    # neither command takes
    short = tmp_path / "short.txt"
    short.write_text("x" * 6000)  # 299 scoreable validation tokens: 8 segments of 37, of no length past L = 48
    for argv, field in ((["retrofit", str(path), "--to", str(L + 2), "--method", "pi"], "--to"),
                        (["diagnose", str(path), "--length", str(L + 2)], "--length")):
        one_line_error(capsys, main([*argv, "--data", str(short), "--out", str(out)]),
                       f"{field} {L + 2}: the validation split's 299 scoreable tokens hold 5 segments of it",
                       f"; more validation text: the shortest length this takes, {L + 1}, needs {8 * (L + 1)} "
                       "scoreable tokens")
    # the table reads ppl@to / ppl@L: --eval-lens without either was a KeyError traceback (or a NaN) after the work
    one_line_error(capsys, main(["retrofit", str(path), "--to", str(4 * L), "--eval-lens", str(L // 2), "--method", "pi",
                                 "--out", str(out)]),
                   f"--eval-lens {L // 2} must include the training length {L} and --to {4 * L}; {L} and {4 * L} missing")
    one_line_error(capsys, main(["retrofit", str(path), "--to", str(4 * L), "--eval-lens", str(L), str(2 * L),
                                 "--method", "pi", "--out", str(out)]), f"; {4 * L} missing")
    assert not out.exists()


def test_final_bucket_verdict_is_measured_not_assumed():
    """The diagnose report says 'dilution' only when the far keys outweigh the nearest key on the bias."""
    from posbias.diagnose import final_bucket_weight
    from posbias.schemes import T5Bias

    t5 = T5Bias(n_heads=2, head_dim=8, num_buckets=32, max_distance=17)
    with torch.no_grad():
        t5.table.zero_()
        t5.table[-1] = torch.tensor([-0.3, -20.0])  # head 0: capped far value; head 1: a strong penalty
        t5.table[1] = 5.0  # distance 1, not the nearest key: the gap is read from distance 0
    gap, weight = final_bucket_weight(t5, 1024)
    n_far = 1024 - t5.flat_beyond
    assert weight[0] == pytest.approx(n_far * math.exp(-0.3)) and gap[0] == pytest.approx(0.3)
    assert weight[1] < 1e-5
    verdict = _final_entry_verdict(t5, gap, weight)
    assert "In head(s) 0 the" in verdict and "dilution" in verdict
    with torch.no_grad():
        t5.table[-1] = -20.0
    assert "acts as a penalty" in _final_entry_verdict(t5, *final_bucket_weight(t5, 1024))
    # a window that ends before the final bucket has no far keys: they weigh nothing
    assert final_bucket_weight(t5, t5.flat_beyond)[1] == [0.0, 0.0]


def _final_entry_verdict(t5, gap, weight):
    """The verdict sentence of the diagnosis report's final-entry section for a T5 bias."""
    from posbias.diagnose import DiagnoseResult

    r = DiagnoseResult("ck", "t5", {}, 64, 1024, t5, 1, [0.0], [0.0], [], {}, final_entry_share={1024: 0.9},
                       final_entry_gap=gap, far_weight=weight)
    section = diagnose_report._final_entry_section(r)
    return next(line for line in section if line.startswith("In "))


def test_several_copies_average_element_by_element_and_their_interval_spans_them():
    """passkey.mean_of: nested dicts and per-byte lists averaged element by element; copies_interval:
    one copy's Wilson interval alone, several from the lowest copy's bound to the highest's."""
    grids = [{"64": {"0.0": [1.0, 0.5], "1.0": [0.0, 0.0]}}, {"64": {"0.0": [0.0, 0.5], "1.0": [1.0, 0.5]}}]
    assert passkey.mean_of(grids) == {"64": {"0.0": [0.5, 0.5], "1.0": [0.5, 0.25]}}
    assert passkey.mean_of([{"64": 0.25}, {"64": 0.75}, {"64": 0.5}]) == {"64": 0.5}
    assert passkey.copies_interval([0.5], 40) == passkey.accuracy_interval(0.5, 40)
    lo, hi = passkey.copies_interval([0.9, 0.1, 0.5], 40)
    assert (lo, hi) == (passkey.accuracy_interval(0.1, 40)[0], passkey.accuracy_interval(0.9, 40)[1])


def test_passkey_accuracy_interval_is_wilson():
    from posbias.passkey import accuracy_interval

    lo, hi = accuracy_interval(0.5, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert accuracy_interval(0.0, 160) == (0.0, pytest.approx(0.02344, abs=1e-4))  # never below 0
    assert accuracy_interval(1.0, 10)[1] == 1.0 and accuracy_interval(1.0, 10)[0] == pytest.approx(0.7225, abs=1e-4)
    assert accuracy_interval(1.0, 1) == (pytest.approx(0.2065, abs=1e-4), 1.0)  # one trial is a measurement too
    assert accuracy_interval(1 - 1e-12, 8)[1] == 1.0  # the formula's float rounding gives 1 + 2^-52: capped
    for bad in [(0.5, 0), (1.5, 10), (-0.1, 10)]:
        with pytest.raises(ValueError, match="need trials >= 1 and an accuracy in \\[0, 1\\]"):
            accuracy_interval(*bad)


def test_checkpoint_jobs_run_at_a_fixed_thread_count(tmp_path, corpus, monkeypatch):
    """diagnose and retrofit run at ``threads`` (restored after), record it, and a retrofit's cache is
    keyed by it: numbers made at another thread count round differently and are never reused."""
    import posbias.diagnose as diagnose_mod
    from posbias.config import ConfigError
    from posbias.retrofit import source_key

    path = tiny_checkpoint(tmp_path / "r", "alibi")
    seen, real = [], diagnose_mod._diagnose

    def spy(*args):
        seen.append(torch.get_num_threads())
        return real(*args)

    monkeypatch.setattr(diagnose_mod, "_diagnose", spy)
    before = torch.get_num_threads()
    rep = run_diagnose(path, DiagnoseConfig(length=2 * L, windows=1, eval_tokens=EVAL, passkey_steps=0, threads=1),
                       corpus=corpus)
    assert seen == [1] and rep.threads == 1 and torch.get_num_threads() == before
    keys = {source_key(path, RetrofitConfig(to=2 * L, methods=("swap-t5",), threads=t), corpus) for t in (1, 2)}
    assert len(keys) == 2
    real = store.code_fingerprint  # other code (a kernel whose rounding changed): another key too
    monkeypatch.setattr(store, "code_fingerprint", lambda *parts: "changed-" + real(*parts))
    assert source_key(path, RetrofitConfig(to=2 * L, methods=("swap-t5",), threads=1), corpus) not in keys
    with pytest.raises(ConfigError, match=r"threads must be an integer in \[1, 1024\], got 0"):
        RetrofitConfig(to=2 * L, methods=("swap-t5",), threads=0)
    with pytest.raises(ConfigError, match=r"threads must be an integer in \[1, 1024\], got 1025"):
        DiagnoseConfig(threads=1025)


def _tiny_finetune(model, corpus, *, steps=8, lr=3e-3, seed=1, **kw):
    from posbias.data import batch_at
    from posbias.finetune import finetune

    return finetune(model, lambda step: batch_at(corpus.train, step, batch_size=2, seq_len=2 * L, seed=seed),
                    lambda m, b: m.loss(b[0].long(), b[1].long()), steps=steps, lr=lr, **kw)


def test_finetune_schedule_and_defaults(tmp_path, corpus, monkeypatch, capsys):
    """The defaults a caller gets: learning rate 5e-4 on the trainer's schedule (linear warm-up over
    the first 10% of steps, at least one, then cosine decay to 10%), gradients clipped to norm 1, one
    parameter group (positional parameters at 1×), no progress bar, a progress checkpoint at most every
    60 s, ``stop`` asked every 100 steps; 0 steps is a valid fine-tune that does nothing."""
    from posbias import finetune as ft
    from posbias.data import batch_at
    from posbias.train import lr_at

    rates, groups, saved, real_update, real_opt = [], [], [], ft._update, ft._optimizer
    def update(opt, params, loss, rate):
        real_update(opt, params, loss, rate)
        rates.append(rate)
        assert [g["lr"] for g in opt.param_groups] == [rate]  # the schedule's rate itself, to every weight

    def optimizer(*args):  # the optimizer the fine-tune steps, its groups recorded
        opt = real_opt(*args)
        groups.append(opt.param_groups)
        return opt

    monkeypatch.setattr(ft, "_update", update)
    monkeypatch.setattr(ft, "_optimizer", optimizer)
    batches = lambda step: batch_at(corpus.train, step, batch_size=1, seq_len=L // 2, seed=1)  # noqa: E731
    loss = lambda m, b: m.embed.weight[b[0].long()].square().mean()  # noqa: E731  (the schedule is what counts)
    src = tiny_checkpoint(tmp_path / "src", "t5", max_distance=20)
    for steps, warm in ((10, 1), (25, 2), (30, 3)):
        rates.clear()
        ft.finetune(ckpt.load_model(src), batches, loss, steps=steps)
        assert rates[:warm] == pytest.approx([5e-4 * (s + 1) / warm for s in range(warm)], rel=1e-12)
        schedule = [lr_at(s, lr=5e-4, steps=steps, warmup=warm, min_ratio=0.1) for s in range(steps)]
        assert rates == pytest.approx(schedule, rel=1e-12)
        last = (steps - 1 - warm) / (steps - warm)  # the cosine's progress at the last step
        assert rates[-1] == pytest.approx(5e-4 * (0.1 + 0.45 * (1 + math.cos(math.pi * last))))
    assert all(len(g) == 1 for g in groups)  # positional parameters in the one group, at the same rate
    assert all(g[0]["weight_decay"] == 0.0 and g[0]["betas"] == (0.9, 0.95) for g in groups)  # AdamW, no decay
    model = ckpt.load_model(src)
    before = [p.detach().clone() for p in model.parameters()]
    assert ft.finetune(model, batches, loss, steps=0) == [] and len(rates) == 30  # nothing to do: no step, no change
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    steep = lambda m, b: 1000 * loss(m, b)  # noqa: E731
    ft.finetune(model, batches, steep, steps=1)  # the gradients it leaves are the last step's, clipped to norm 1
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert float(norm) == pytest.approx(1.0, rel=1e-4)
    assert capsys.readouterr().err == ""  # no bar unless asked
    # 30 s pass between any two readings of the clock (at the start, after each step, at each save)
    clock = itertools.count(0, 30)
    monkeypatch.setattr(ft, "time", type("Clock", (), {"monotonic": staticmethod(lambda: next(clock))}))
    monkeypatch.setattr(ft, "_save_progress", lambda folder, model, opt, step, *a: saved.append(step))
    ft.finetune(ckpt.load_model(src), batches, loss, steps=5)
    assert saved == []  # no folder, no progress
    for steps in (5, 6):  # a save due at the step before the last; a save due at the last step
        clock, saved[:] = itertools.count(0, 30), []
        ft.finetune(ckpt.load_model(src), batches, loss, steps=steps, resume=tmp_path / "progress")
        assert saved == [2, 4]  # 60 s after the start, then 60 s after that save; never after the last step
        # (the caller saves the result)
    asked = []
    ft.finetune(ckpt.load_model(src), batches, loss, steps=101, stop=lambda step: asked.append(step) or step >= 100)
    assert asked == [0, 100]


def test_a_finite_loss_that_leaves_non_finite_weights_stops_the_finetune(tmp_path, corpus):
    """A loss whose value is finite but whose gradient is not (√x at 0) leaves NaN weights after its
    step; the fine-tune raises, naming the first weights, and claims no progress kept."""
    from posbias.finetune import finetune
    from posbias.train import NonFiniteLoss

    model = ckpt.load_model(tiny_checkpoint(tmp_path / "src", "t5", max_distance=20))
    def root(m, b):  # value 0, gradient inf · 0 = NaN, in the first five weights (the message names three)
        return sum(p.flatten()[:1].mul(0).sqrt().sum() for p in list(m.parameters())[:5])

    names = ", ".join(n for n, _ in list(model.named_parameters())[:3]) + " and 2 more"
    with pytest.raises(NonFiniteLoss) as err:
        finetune(model, lambda step: torch.zeros(1), root, steps=1, lr=1e-3)
    assert str(err.value) == (f"fine-tune diverged: its last step left non-finite weights ({names}) (peak learning "
                              "rate 0.001); nothing of it is saved — lower the learning rate")
    # a loss that turns NaN at step 4, progress saved after every step: the message names the step kept
    model, progress = ckpt.load_model(tmp_path / "src"), tmp_path / "progress"
    square = lambda m, b: m.embed.weight[0].square().sum() * (float("nan") if b else 1.0)  # noqa: E731
    with pytest.raises(NonFiniteLoss) as err:
        finetune(model, lambda step: step == 3, square, steps=6, lr=1e-3, resume=progress, save_every_s=0)
    assert str(err.value) == (f"fine-tune diverged: loss nan at step 4 of 6 (peak learning rate 0.001); nothing of it "
                              f"is saved; progress up to step 3 is kept in {str(progress)!r} — lower the learning rate")
    assert ckpt.load_trainer_state(progress)["step"] == 3


def test_interrupted_finetune_resumes_bit_identically(tmp_path, corpus):
    """A fine-tune stopped mid-way (here by its batch function; a kill between saves works the same,
    from the last save) continues from its progress checkpoint to the weights and losses of an
    uninterrupted run; a progress checkpoint of other settings is refused."""
    solo = ckpt.load_model(tiny_checkpoint(tmp_path / "src", "t5", max_distance=20))
    resumed = ckpt.load_model(tmp_path / "src")
    want = _tiny_finetune(solo, corpus)
    progress = tmp_path / "progress"

    class Stop(Exception):
        pass

    def stop_at_5(step):
        if step == 5:
            raise Stop
        return real_batch(step)

    from posbias.data import batch_at
    from posbias.finetune import finetune

    def real_batch(step):
        return batch_at(corpus.train, step, batch_size=2, seq_len=2 * L, seed=1)

    loss = lambda m, b: m.loss(b[0].long(), b[1].long())  # noqa: E731
    with pytest.raises(Stop):
        finetune(resumed, stop_at_5, loss, steps=8, lr=3e-3, resume=progress, save_every_s=0)
    assert ckpt.load_trainer_state(progress)["step"] == 5
    fresh = ckpt.load_model(tmp_path / "src")  # a new process: the weights as they were before the fine-tune
    said = []
    got = finetune(fresh, real_batch, loss, steps=8, lr=3e-3, resume=progress, save_every_s=0, log=said.append)
    assert said == [f"fine-tune: resuming from step 5 of 8 ({str(progress)!r})"]
    assert got == want
    for (name, a), b in zip(solo.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="made with other settings"):
        finetune(ckpt.load_model(tmp_path / "src"), real_batch, loss, steps=9, lr=3e-3, resume=progress)


@pytest.mark.parametrize("at", [5, 7])  # mid-way, and in the last step (then the resumed call only returns)
def test_ctrl_c_during_a_finetune_saves_the_step_and_resumes_bit_identically(tmp_path, corpus, at, python_sigint):
    """Ctrl-C in the middle of a fine-tune step (here sent by its batch function, as the step begins) is
    held to the step's end: the progress checkpoint then holds that step, however long ago the last
    timed save was, and the KeyboardInterrupt goes on. Resumed, the fine-tune ends at the weights and
    losses of an uninterrupted run."""
    import os
    import signal

    from posbias.data import batch_at
    from posbias.finetune import finetune

    solo = ckpt.load_model(tiny_checkpoint(tmp_path / "src", "t5", max_distance=20))
    want = _tiny_finetune(solo, corpus)
    progress = tmp_path / "progress"

    def real_batch(step):
        return batch_at(corpus.train, step, batch_size=2, seq_len=2 * L, seed=1)

    def interrupted(step):
        if step == at:
            os.kill(os.getpid(), signal.SIGINT)
        return real_batch(step)

    loss = lambda m, b: m.loss(b[0].long(), b[1].long())  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        finetune(ckpt.load_model(tmp_path / "src"), interrupted, loss, steps=8, lr=3e-3, resume=progress,
                 save_every_s=10**6)
    assert ckpt.load_trainer_state(progress)["step"] == at + 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    fresh = ckpt.load_model(tmp_path / "src")
    assert finetune(fresh, real_batch, loss, steps=8, lr=3e-3, resume=progress, save_every_s=10**6) == want
    for (name, a), b in zip(solo.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def test_finetunes_train_positional_parameters_at_the_checkpoints_multiplier(tmp_path, corpus, monkeypatch):
    """A fine-tune moves the positional parameters at pos_lr_mult × its learning rate (the rest as at 1×):
    a fresh T5 table after a swap travels ~100× as far at 100× (measured on the demo's RoPE model: at
    1× a swap-t5 table reached 0.02 nats in 100 steps, ppl@1024 10.95; at 100×, 1.66 nats and 9.38).
    Retrofit and diagnose fine-tune with the multiplier the checkpoint records (or retrofit's
    override); a progress made at another multiplier is not continued."""
    from posbias.data import batch_at
    from posbias.finetune import finetune

    src = tiny_checkpoint(tmp_path / "src", "rope")
    batches = lambda step: batch_at(corpus.train, step, batch_size=2, seq_len=L, seed=1)  # noqa: E731
    loss = lambda m, b: m.loss(b[0].long(), b[1].long())  # noqa: E731
    moved = {}
    for mult in (1.0, 100.0):
        m = retrofit_model(ckpt.load_model(src), "swap-t5", train_len=L, to=2 * L)
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        finetune(m, batches, loss, steps=4, lr=1e-3, pos_lr_mult=mult)
        moved[mult] = {n: float((p.detach() - before[n]).abs().max()) for n, p in m.named_parameters()}
    table = "scheme.table"
    assert moved[100.0][table] > 30 * moved[1.0][table]
    assert moved[100.0]["embed.weight"] < 3 * moved[1.0]["embed.weight"]  # the weights: the same budget
    progress = tmp_path / "progress"
    finetune(ckpt.load_model(src), batches, loss, steps=3, lr=1e-3, resume=progress, save_every_s=0)
    with pytest.raises(ValueError, match="pos_lr_mult"):
        finetune(ckpt.load_model(src), batches, loss, steps=3, lr=1e-3, resume=progress, pos_lr_mult=100.0)

    import posbias.retrofit as retrofit_mod
    from posbias import finetune as ft

    seen, real = [], ft.finetune
    monkeypatch.setattr(ft, "finetune", lambda *a, **kw: seen.append(kw["pos_lr_mult"]) or real(*a, **kw))
    monkeypatch.setattr(retrofit_mod, "finetune", ft.finetune)
    model = ckpt.load_model(src)
    path = ckpt.save_checkpoint(tmp_path / "c", model, extra={"train": {"seq_len": L, "pos_lr_mult": 50.0}})
    cfg = RetrofitConfig(to=2 * L, methods=("swap-t5",), finetune_steps=2, eval_tokens=EVAL, compare=True,
                         passkey_steps=2, passkey_samples=1)
    res = run_retrofit(path, cfg, tmp_path / "r", corpus=corpus)
    assert seen == [50.0, 50.0, 50.0] and res.pos_lr_mult == 50.0  # the original's passkey, the swap, its passkey
    table = 32 * TINY["n_heads"]  # the fresh T5 table: 32 buckets per head, the rows' extra parameters
    assert [(r["stage"], r["extra_params"]) for r in res.rows] == [("before", 0), ("no fine-tune", table),
                                                                    ("fine-tuned 2", table)]
    md = retrofit_report.markdown(res)
    assert "positional parameters at 50× their learning rate (as the checkpoint was trained)" in md
    untaught = [r for r in res.rows if r.get("passkey") and r["passkey"][L] == 0]
    assert ("No passkey sample was solved at L" in md) == bool(untaught)
    assert all(f"{r['method']} ({r['stage']})" in md for r in untaught)
    (name, tuned), = ckpt.discover(tmp_path / "r")  # the swap's fine-tuned model; its diagnosis says what it saw
    assert name.startswith("swap-t5-ft2-")
    rep = run_diagnose(tuned, DiagnoseConfig(length=2 * L, windows=1, eval_tokens=EVAL, passkey_steps=0), corpus=corpus)
    assert rep.retrofit["to"] == 2 * L and "This checkpoint is a retrofit (swap-t5) fine-tuned for 2 steps at " \
        f"{2 * L} tokens" in diagnose_report.markdown(rep)
    seen.clear()
    run_retrofit(path, dataclasses.replace(cfg, pos_lr_mult=2.0), tmp_path / "r2", corpus=corpus)
    assert seen == [2.0, 2.0, 2.0]
    seen.clear()
    rep = run_diagnose(path, DiagnoseConfig(length=2 * L, windows=1, eval_tokens=EVAL, passkey_steps=2,
                                            passkey_samples=1), corpus=corpus)
    assert seen == [50.0] and rep.passkey_lr_mult == 50.0
    diagnose_report.write(rep, tmp_path / "d")
    md = (tmp_path / "d" / "report.md").read_text()
    assert "positional parameters at 50× the learning rate, as in training" in md
    assert ("No sample was solved at L" in md) == (not any(rep.passkey[str(L)].values()))


def test_interrupted_passkey_finetune_resumes_bit_identically(tmp_path):
    """Passkey batches come from one generator: its state travels with the progress, so a resumed
    fine-tune draws the batches an uninterrupted one would (the same losses and weights). The progress
    is keyed by the task's settings and the starting weights: another fine-tune's is refused, or with
    replace_other started afresh."""
    from posbias import passkey
    from posbias.finetune import OtherProgress

    src = tiny_checkpoint(tmp_path / "src", "alibi")
    kw = dict(length=L, steps=6, batch_size=2, lr=3e-3, seed=3)
    solo = ckpt.load_model(src)
    want = passkey.train_passkey(solo, **kw)
    progress, real = tmp_path / "progress", passkey.make_batch

    class Stop(Exception):
        pass

    calls = []

    def stop_at_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise Stop
        return real(*args, **kwargs)

    from posbias import finetune as ft

    orig = ft.finetune
    with pytest.MonkeyPatch.context() as mp, pytest.raises(Stop):
        mp.setattr(passkey, "make_batch", stop_at_4)
        mp.setattr(ft, "finetune", lambda *a, **k: orig(*a, **{**k, "save_every_s": 0}))
        passkey.train_passkey(ckpt.load_model(src), resume=progress, **kw)
    assert ckpt.load_trainer_state(progress)["step"] == 4
    # another task's settings, or other starting weights: refused, or replaced where the caller owns the folder
    with pytest.raises(OtherProgress, match="other settings.*'length'"):
        passkey.train_passkey(ckpt.load_model(src), resume=progress, **{**kw, "length": L + 8})
    other = tiny_checkpoint(tmp_path / "other", "alibi")
    perturbed = ckpt.load_model(other)
    with torch.no_grad():
        next(perturbed.parameters()).add_(1e-3)
    with pytest.raises(OtherProgress, match="start_weights"):
        passkey.train_passkey(perturbed, resume=progress, **kw)
    import shutil

    from posbias.finetune import finetune
    replaced = shutil.copytree(progress, tmp_path / "replaced")
    g, said = torch.Generator().manual_seed(3), []
    finetune(ckpt.load_model(src), lambda step: passkey.make_batch(2, L, generator=g),
             lambda m, b: passkey.answer_loss(m, b, 5), steps=6, lr=3e-3, resume=replaced, generator=g,
             identity={"other": True}, replace_other=True, log=said.append)
    assert said == [f"fine-tune: {str(replaced)!r} holds another fine-tune's progress; starting afresh (it is replaced)"]
    # the interrupted fine-tune itself continues, and its progress goes once it is done
    fresh, said = ckpt.load_model(src), []
    got = passkey.train_passkey(fresh, resume=progress, log=said.append, **kw)
    assert said == [f"passkey@{L}: resuming from step 4 of 6 ({str(progress)!r})"]
    assert got[4:] == want[4:] and got == want and not progress.exists()
    for (name, a), b in zip(solo.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def test_diagnose_and_retrofit_remove_their_passkey_progress(tmp_path, corpus, monkeypatch):
    import posbias.diagnose as diagnose_mod
    from posbias import finetune as ft

    seen = []
    real = ft.finetune

    def every_step(*args, **kw):
        seen.append(kw["resume"])
        return real(*args, **{**kw, "save_every_s": 0})

    monkeypatch.setattr(ft, "finetune", every_step)
    path = tiny_checkpoint(tmp_path / "t", "t5", max_distance=L)
    from posbias import passkey

    other = ckpt.load_model(tiny_checkpoint(tmp_path / "other", "alibi"))

    def others_progress(folder):  # left by an interrupted fine-tune of other settings (an older posbias, say)
        g = torch.Generator().manual_seed(0)
        ft.finetune(other, lambda step: passkey.make_batch(2, L, generator=g), lambda m, b: passkey.answer_loss(m, b, 5),
                    steps=3, resume=folder, generator=g)  # a finished finetune() leaves its progress to its caller
        assert ckpt.exists(folder)

    dcfg = DiagnoseConfig(length=2 * L, windows=1, eval_tokens=EVAL, passkey_steps=3, passkey_samples=1)
    kept = tmp_path / "d" / "models" / f"passkey-ft3-{diagnose_mod.source_key(path, dcfg, corpus)}"
    stale = kept / "last"
    others_progress(stale)
    seen.clear()
    said = []
    run_diagnose(path, dcfg, corpus=corpus, out=tmp_path / "d", log=said.append)
    assert seen == [stale] and not stale.exists() and ckpt.exists(kept)  # progress gone, the tuned copy kept
    assert any("holds another fine-tune's progress; starting afresh" in line for line in said)
    seen.clear()
    cfg = RetrofitConfig(to=2 * L, methods=("t5-distance",), compare=True, passkey_steps=3, passkey_samples=1,
                         eval_tokens=EVAL)
    res = run_retrofit(path, cfg, tmp_path / "r", corpus=corpus, progress=False)
    assert seen and all(p.parent == tmp_path / "r" / "models" and p.name.startswith("passkey-") for p in seen)
    assert not any(p.exists() for p in seen)
    # another fine-tune's progress where a retrofit's passkey copy keeps its own: replaced, as diagnose's is
    where = seen[0]
    others_progress(where)
    (tmp_path / "r" / res.cache).unlink()  # measured afresh
    seen.clear()
    said = []
    run_retrofit(path, cfg, tmp_path / "r", corpus=corpus, progress=False, log=said.append)
    assert where in seen and not where.exists()
    assert any(f"{str(where)!r} holds another fine-tune's progress; starting afresh" in line for line in said)
    assert "method 1/1: t5-distance (no fine-tune, passkey)" in said


def test_retrofit_finetune_keeps_progress_until_its_model_is_saved(tmp_path, corpus, monkeypatch):
    import posbias.retrofit as retrofit_mod

    real, saves = retrofit_mod.finetune, []

    def every_step(*args, **kw):  # progress saved after every step, and looked at
        saves.append(kw["resume"])
        return real(*args, **{**kw, "save_every_s": 0})

    monkeypatch.setattr(retrofit_mod, "finetune", every_step)
    path = tiny_checkpoint(tmp_path / "r", "rope")
    cfg = RetrofitConfig(to=2 * L, methods=("pi",), finetune_steps=3, finetune_batch=2, eval_tokens=EVAL)
    run_retrofit(path, cfg, tmp_path / "out", corpus=corpus, progress=False)
    (mdir,) = (tmp_path / "out" / "models").iterdir()
    assert saves == [mdir / "last"] and ckpt.exists(mdir) and not (mdir / "last").exists()


def test_diverging_finetune_stops_at_once_and_saves_nothing(tmp_path, corpus, capsys):
    model = ckpt.load_model(tiny_checkpoint(tmp_path / "src", "rope"))
    from posbias.train import NonFiniteLoss

    with pytest.raises(NonFiniteLoss, match=r"fine-tune diverged: loss nan at step \d+ of 30 .*peak learning rate 1e\+06"):
        _tiny_finetune(model, corpus, steps=30, lr=1e6)
    assert main(["retrofit", str(tmp_path / "src"), "--to", str(2 * L), "--method", "pi", "--finetune-steps", "30",
                 "--finetune-lr", "1e6", "--eval-tokens", str(EVAL), "--quiet", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fine-tune pi diverged" in err and "lower the learning rate" in err
    assert not list((tmp_path / "out").glob("models/*/config.json"))  # no diverged model kept for a re-run to reuse


def test_finetune_stops_where_asked_and_a_resumed_run_stops_there_too(tmp_path, corpus):
    """``stop(step)`` is asked before every ``check_every``-th step, step 0 included; True ends the
    fine-tune with that many losses. A run interrupted between checks and resumed asks the same
    questions and ends on the same step with the same weights."""
    src = tiny_checkpoint(tmp_path / "src", "t5", max_distance=20)
    asked = []

    def stop_at_6(step):
        asked.append(step)
        return step >= 6

    solo = ckpt.load_model(src)
    losses = _tiny_finetune(solo, corpus, steps=20, stop=stop_at_6, check_every=3)
    assert asked == [0, 3, 6] and len(losses) == 6 and not solo.training
    full = _tiny_finetune(ckpt.load_model(src), corpus, steps=20)
    assert full[:6] == losses  # the same schedule (of 20 steps) up to the stop
    progress, asked[:] = tmp_path / "progress", []

    class Stop(Exception):
        pass

    def interrupted(step):
        if step == 5:
            raise Stop
        return stop_at_6(step)

    with pytest.raises(Stop):
        _tiny_finetune(ckpt.load_model(src), corpus, steps=20, stop=interrupted, check_every=1, resume=progress,
                       save_every_s=0)
    asked[:] = []
    resumed = ckpt.load_model(src)
    got = _tiny_finetune(resumed, corpus, steps=20, stop=stop_at_6, check_every=1, resume=progress, save_every_s=0)
    assert asked == [5, 6] and len(got) == 6
    ref = ckpt.load_model(src)
    assert _tiny_finetune(ref, corpus, steps=20, stop=stop_at_6, check_every=1) == got
    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="check_every must be >= 1, got 0"):
        _tiny_finetune(ckpt.load_model(src), corpus, stop=stop_at_6, check_every=0)


def test_passkey_finetune_until_stops_once_the_probe_is_solved(tmp_path, monkeypatch):
    """``until``: the probe (its own samples: another seed than the accuracy grids') is asked every
    ``check_every`` steps; the fine-tune ends at the first probe that reaches ``until``, and
    ``on_probe`` sees each. A model that already solves the task trains 0 steps."""
    src = tiny_checkpoint(tmp_path / "src", "alibi")
    answers = iter([0.0, 0.5, 0.95, 1.0])
    seen, probed = [], []
    monkeypatch.setattr(passkey, "probe", lambda model, length, **kw: (seen.append((length, kw["samples"])),
                                                                         next(answers))[1])
    losses = passkey.train_passkey(ckpt.load_model(src), length=L, steps=12, batch_size=2, check_every=2,
                                   until=0.9, probe_samples=3, on_probe=lambda s, a: probed.append((s, a)))
    assert len(losses) == 4 and probed == [(0, 0.0), (2, 0.5), (4, 0.95)] and seen == [(L, 3)] * 3
    monkeypatch.setattr(passkey, "probe", lambda model, length, **kw: 1.0)
    assert passkey.train_passkey(ckpt.load_model(src), length=L, steps=12, batch_size=2, until=0.5) == []
    probed[:] = []  # probed without until: every check, never stopping
    losses = passkey.train_passkey(ckpt.load_model(src), length=L, steps=5, batch_size=2, check_every=2,
                                   on_probe=lambda s, a: probed.append((s, a)))
    assert len(losses) == 5 and probed == [(0, 1.0), (2, 1.0), (4, 1.0)]
    with pytest.raises(ValueError, match="until must be an accuracy in \\[0, 1\\].*got 1.5"):
        passkey.train_passkey(ckpt.load_model(src), length=L, steps=2, until=1.5)
    from posbias.config import ConfigError

    with pytest.raises(ConfigError, match=r"passkey_until must be an accuracy in \[0, 1\] \(0: train every step\), got 1.5"):
        DiagnoseConfig(passkey_until=1.5)
    with pytest.raises(ConfigError, match=r"passkey_until must be an accuracy in \[0, 1\].*got -0.1"):
        RetrofitConfig(to=2 * L, methods=("pi",), passkey_until=-0.1)
    for bad in (True, "0.9", None):  # True read as 1.0; the others a TypeError from the comparison
        with pytest.raises(ConfigError, match=r"passkey_until must be an accuracy in \[0, 1\].*got " + repr(bad)):
            DiagnoseConfig(passkey_until=bad)
    monkeypatch.undo()
    # the real probe: five depths on samples of its own, the grid's accuracy on others
    model = ckpt.load_model(src)
    got = passkey.probe(model, L, samples=2)
    want = sum(passkey.accuracy(model, L, d, samples=2, seed=passkey.PROBE_SEED) for d in passkey.default_depths(5))
    assert got == want / 5 and passkey.PROBE_SEED != 1234
    # probing changes nothing the fine-tune computes: the same losses and weights as without a probe
    plain, probed_model = ckpt.load_model(src), ckpt.load_model(src)
    kw = dict(length=L, steps=4, batch_size=2, lr=3e-3)
    assert passkey.train_passkey(plain, **kw) == passkey.train_passkey(probed_model, check_every=1,
                                                                       on_probe=lambda s, a: None, **kw)
    for (name, a), b in zip(plain.state_dict().items(), probed_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_diagnose_records_how_the_passkey_copy_was_taught(tmp_path, corpus, monkeypatch):
    """The diagnosis keeps the copy's steps and probes (a re-run reads them from its cache), says in
    the report by which step the probe reached the target (every step trained by default; with
    ``passkey_until``, stopped there), and the comparison lists those steps."""
    from posbias.report import comparison

    answers = {"t5": iter([0.0, 0.2, 0.95]), "alibi": iter([0.0] * 10), "rope": iter([0.0, 0.92, 0.5])}
    paths = {s: tiny_checkpoint(tmp_path / s, s) for s in answers}
    monkeypatch.setattr(passkey, "probe", lambda model, length, **kw: next(answers[model.cfg.scheme]))
    monkeypatch.setattr(passkey, "PROBE_EVERY", 2)  # the report states it
    cfg = DiagnoseConfig(length=2 * L, windows=1, eval_tokens=EVAL, passkey_steps=6, passkey_samples=1)
    import posbias.passkey as pk
    real = pk.train_passkey
    monkeypatch.setattr(pk, "train_passkey", lambda *a, **k: real(*a, **{**k, "check_every": 2}))
    got = {s: run_diagnose(p, dataclasses.replace(cfg, passkey_until=0.9 if s == "t5" else 0.0), corpus=corpus,
                           out=tmp_path / "d" / s) for s, p in paths.items()}
    fit = {s: r.passkey_copies[0]["fit"] for s, r in got.items()}
    assert (fit["t5"]["steps"], got["t5"].passkey_max_steps, got["t5"].passkey_until) == (4, 6, 0.9)
    assert fit["t5"] == {"steps": 4, "probes": [[0, 0.0], [2, 0.2], [4, 0.95]], "target": 0.9,
                                     "learned_at": 4, "stopped": True}
    assert fit["alibi"] == {"steps": 6, "probes": [[0, 0.0], [2, 0.0], [4, 0.0]], "target": 0.9,
                                        "learned_at": None, "stopped": False}
    assert fit["rope"]["learned_at"] == 2 and fit["rope"]["steps"] == 6  # learned, trained on
    again = run_diagnose(paths["t5"], dataclasses.replace(cfg, passkey_until=0.9), corpus=corpus,
                         out=tmp_path / "d" / "t5")  # no probe answer left: all from the cache
    assert again.to_json() == got["t5"].to_json()
    for s, r in got.items():
        diagnose_report.write(r, tmp_path / "d" / s)
    md = {s: (tmp_path / "d" / s / "report.md").read_text() for s in got}
    assert "A copy fine-tuned for 6 steps (fewer once it solved 0.9 of the probe) on passkey samples" in md["t5"]
    assert "it learned the task (≥ 0.9 of the probe at L) after 4 steps and stopped there" in md["t5"]
    assert "every 2 steps) shows how it learned" in md["t5"] and "Probe accuracy by step: 0 0.00, 2 0.20, 4 0.95" in md["t5"]
    assert "it trained all 6 steps and its probe at L never reached 0.9 (the last, at step 4: 0.00)" in md["alibi"]
    assert "it trained all 6 steps and had learned the task (≥ 0.9 of the probe at L) by step 2" in md["rope"]
    said = comparison.sentences([comparison.row(s, r) for s, r in got.items()])
    assert ("The passkey copies had learned the task at L (≥ 0.9 of their probe): rope by step 2, t5 by step 4; "
            "not within 6 steps: alibi.") in said


def test_an_interrupted_passkey_copy_keeps_every_probe(tmp_path, corpus, monkeypatch):
    """The probes of a diagnosis's passkey fine-tune are kept as they are made: after an interruption
    and a resumed run, the record (steps, probes) and every number equal an uninterrupted diagnosis."""
    import posbias.passkey as pk
    from posbias import finetune as ft

    path = tiny_checkpoint(tmp_path / "t", "t5", max_distance=L)
    cfg = DiagnoseConfig(length=2 * L, windows=1, eval_tokens=EVAL, passkey_steps=6, passkey_samples=1)
    real_train, real_ft = pk.train_passkey, ft.finetune
    monkeypatch.setattr(pk, "train_passkey", lambda *a, **k: real_train(*a, **{**k, "check_every": 2}))
    monkeypatch.setattr(ft, "finetune", lambda *a, **k: real_ft(*a, **{**k, "save_every_s": 0}))
    want = run_diagnose(path, cfg, corpus=corpus, out=tmp_path / "solo").to_json()
    fit = want["passkey_copies"][0]["fit"]
    assert fit["steps"] == 6 and [s for s, _ in fit["probes"]] == [0, 2, 4]

    class Stop(Exception):
        pass

    real_batch = pk.make_batch
    calls = []

    def stop_at_3(*a, **k):
        calls.append("depths" not in k)  # a training batch (the probes and grids draw at given depths)
        if sum(calls) == 4:
            raise Stop
        return real_batch(*a, **k)

    with pytest.MonkeyPatch.context() as mp, pytest.raises(Stop):
        mp.setattr(pk, "make_batch", stop_at_3)
        run_diagnose(path, cfg, corpus=corpus, out=tmp_path / "d")
    said = []
    got = run_diagnose(path, cfg, corpus=corpus, out=tmp_path / "d", log=said.append).to_json()
    assert any("resuming from step 3 of 6" in line for line in said)
    assert {**got, "checkpoint": None} == {**want, "checkpoint": None}


def test_a_tiny_delta_is_printed_at_its_own_scale():
    """A verdict on an interval that excludes 0 never sits beside a Δ printed as +0.0000."""
    from posbias.report.diagnose import delta_cell

    assert delta_cell(4.1e-5, 1.2e-5, 7.9e-5) == "+4.1e-05 [+1.2e-05, +7.9e-05]"
    assert delta_cell(0.0123, -0.001, 0.02) == "+0.0123 [-0.0010, +0.0200]"
    assert delta_cell(-3e-5, None, None) == "-3.0e-05" and delta_cell(0.5, None, None) == "+0.5000"


def test_the_chunk_end_row_names_what_besides_far_tokens_it_holds():
    """At a chunk's last position the cut restarts positions at 0: a scheme that reads the position
    (absolute, or a bias that moves with the query) differs there by more than far tokens."""
    from types import SimpleNamespace

    from posbias.report.diagnose import _position_moves, _through_layers

    row = [("a", 0.1, 0.0, 0.2), ("b", 0.0, -0.1, 0.1), ("c", 0.05, 0.01, 0.09)]
    said = {}
    for name, family, drift in (("t5", "additive", [0.0, 0.0]), ("fire", "additive", [0.0, 2.5]),
                                ("sinusoidal", "absolute", None), ("rope", "rotary", None)):
        r = SimpleNamespace(scheme=SimpleNamespace(family=family), bias_drift=drift, window_split=row, loss_windows=8,
                            attention_distance={"mean": [[[1.0]]] * 2})
        said[name] = (_position_moves(r), _through_layers(r))
    assert said["t5"][0] == said["rope"][0] == "" and "with the same keys in the first layer" in said["t5"][1]
    assert said["fire"][0] == "the bias's move with the query position" and "this row holds both" in said["fire"][1]
    assert said["sinusoidal"][0] == "the positions past L themselves"
    assert all("Δ +0.0500 [+0.0100, +0.0900]: hurts" in s for _, s in said.values())
    # one layer: a bias of i − j alone has nothing between the layers to carry far tokens, and the row is
    # rounding (test_far_tokens_reach_chunk_ends_only_through_layers), never a verdict; a moving bias or
    # absolute positions still differ there
    for name, family, drift in (("t5", "additive", [0.0, 0.0]), ("rope", "rotary", None),
                                ("fire", "additive", [0.0, 2.5]), ("sinusoidal", "absolute", None)):
        r = SimpleNamespace(scheme=SimpleNamespace(family=family), bias_drift=drift, window_split=row, loss_windows=8,
                            attention_distance={"mean": [[[1.0]]]})
        one = "none can reach a query through the layers of a one-layer model" in _through_layers(r)
        assert one == (name in ("t5", "rope")) and ("hurts" in _through_layers(r)) != one


def test_retrofit_names_the_tokens_it_scored_where_the_split_cuts_its_default(tmp_path, text_file):
    """A validation split holding fewer than 64 segments of --to (but at least 8) cuts the default to
    what fits, and the report says so; results.json's eval_tokens is what was scored (it named the 64
    segments asked for)."""
    from posbias.data import local_corpus

    small = local_corpus(text_file)
    held = (small.val.numel() - 1) // (2 * L)
    assert MIN_SEGMENTS <= held < 64
    path = tiny_checkpoint(tmp_path / "t", "t5", max_distance=L)
    res = run_retrofit(path, RetrofitConfig(to=2 * L, methods=("t5-distance",)), tmp_path / "r", corpus=small)
    assert res.eval_tokens == held * 2 * L and all(len(r["window_loss"][2 * L]) == held for r in res.rows)
    retrofit_report.write(res, tmp_path / "r")
    assert json.loads((tmp_path / "r" / "results.json").read_text())["eval_tokens"] == held * 2 * L
    assert f"Only {held} windows scored (fewer than 64)" in (tmp_path / "r" / "results.md").read_text()
    # a split of exactly ten windows and the one token each window's last prediction needs: ten windows
    exact = dataclasses.replace(small, val=small.val[:10 * 2 * L + 1])
    res = run_retrofit(path, RetrofitConfig(to=2 * L, methods=("t5-distance",)), tmp_path / "x", corpus=exact)
    assert res.eval_tokens == 10 * 2 * L


def test_default_lengths_divide_the_target_so_every_length_scores_the_same_text():
    from posbias.retrofit import default_eval_lens

    assert default_eval_lens(64, 1024) == [64, 128, 256, 512, 1024]
    assert default_eval_lens(64, 192) == [64, 192]  # 128 would score segments of its own
    assert default_eval_lens(64, 384) == [64, 128, 384]
    assert default_eval_lens(64, 100) == [64, 100]  # not a multiple of L: the report says so
    assert default_eval_lens(48, 96) == [48, 96]


def test_retrofit_reuses_a_perplexity_only_on_the_same_segments(tmp_path, corpus):
    """Lengths that all divide the longest score the same segments of it; a set where one does not
    scores each length on its own windows. eval_lens is not in the cache key, so a re-run with other
    lengths must not reuse a perplexity measured on other segments."""
    from posbias.evaluate import evaluate_length

    path = tiny_checkpoint(tmp_path / "t", "rope")
    cfg = RetrofitConfig(to=2 * L, methods=("pi",), eval_lens=(L, 2 * L), eval_tokens=16 * L)
    first = run_retrofit(path, cfg, tmp_path / "r", corpus=corpus)
    other = run_retrofit(path, dataclasses.replace(cfg, eval_lens=(L, 3 * L // 2, 2 * L)), tmp_path / "r",
                         corpus=corpus)
    assert first.cache == other.cache  # one cache: the lengths are not in its key
    model = ckpt.load_model(path).eval()
    on_own = {n: evaluate_length(model, corpus.val, n, max_tokens=16 * L)["ppl"] for n in (L, 3 * L // 2, 2 * L)}
    tiled = evaluate_length(model, corpus.val, L, max_tokens=16 * L, span=2 * L)["ppl"]
    assert first.rows[0]["ppl"][L] == pytest.approx(tiled, rel=1e-9)
    assert other.rows[0]["ppl"] == pytest.approx(on_own, rel=1e-9) and on_own[L] != pytest.approx(tiled, rel=1e-6)
    # the report says which: a ratio across lengths on segments of their own compares other text too
    assert "do not all divide" not in retrofit_report.markdown(first)
    assert (f"**The lengths do not all divide {2 * L}, so each scores segments of its own** (windows: 16 at {L}, "
            f"10 at {3 * L // 2}, 8 at {2 * L}): a row's ppl@{2 * L} / ppl@{L} compares other text") in \
        retrofit_report.markdown(other)


def test_retrofit_evaluation_size_is_keyed_by_its_resolved_count(tmp_path, corpus, monkeypatch):
    """--eval-tokens is not in the retrofit cache's key; each perplexity entry names the count it
    scored, resolved. So an explicit count equal to the default (SEGMENTS segments of the longest
    length) reuses the default run's numbers, and another count scores again on one cache without
    training the fine-tune again, and its numbers equal a run that kept nothing."""
    import posbias.retrofit as retrofit_mod
    from posbias.evaluate import SEGMENTS

    path = tiny_checkpoint(tmp_path / "t", "rope")
    cfg = RetrofitConfig(to=2 * L, methods=("pi",), finetune_steps=2)
    first = run_retrofit(path, cfg, tmp_path / "r", corpus=corpus)
    calls = {"eval": 0, "finetune": 0}

    def counted(name, real):
        def spy(*args, **kw):
            calls[name] += 1
            return real(*args, **kw)
        return spy

    monkeypatch.setattr(retrofit_mod, "evaluate_length", counted("eval", retrofit_mod.evaluate_length))
    monkeypatch.setattr(retrofit_mod, "finetune", counted("finetune", retrofit_mod.finetune))
    same = run_retrofit(path, dataclasses.replace(cfg, eval_tokens=SEGMENTS * 2 * L), tmp_path / "r", corpus=corpus)
    assert calls == {"eval": 0, "finetune": 0} and same.cache == first.cache and same.rows == first.rows
    fewer = run_retrofit(path, dataclasses.replace(cfg, eval_tokens=16 * L), tmp_path / "r", corpus=corpus)
    assert fewer.cache == first.cache and calls["finetune"] == 0 and calls["eval"] == 2 * 3  # 3 rows × (L, 2L)
    assert fewer.eval_tokens == 16 * L and all(len(r["window_loss"][2 * L]) == 8 for r in fewer.rows)
    monkeypatch.undo()
    fresh = run_retrofit(path, dataclasses.replace(cfg, eval_tokens=16 * L), tmp_path / "fresh", corpus=corpus)
    assert fresh.rows == fewer.rows
    # a length past --to makes the segments longer: L's and 2L's windows are others, so are their entries
    narrow = dataclasses.replace(cfg, eval_tokens=32 * L)  # lengths L and 2L
    wider = dataclasses.replace(narrow, eval_lens=(L, 2 * L, 4 * L))
    run_retrofit(path, narrow, tmp_path / "r", corpus=corpus)
    calls.update(eval=0, finetune=0)
    monkeypatch.setattr(retrofit_mod, "evaluate_length", counted("eval", retrofit_mod.evaluate_length))
    spanned = run_retrofit(path, wider, tmp_path / "r", corpus=corpus)
    assert spanned.cache == first.cache and calls["eval"] == 3 * 3  # 3 rows × (L, 2L, 4L): none reused
    monkeypatch.undo()
    assert spanned.rows == run_retrofit(path, wider, tmp_path / "fresh-wider", corpus=corpus).rows


def test_retrofit_summary_says_whether_any_method_beats_the_model_as_it_was():
    """The summary's sentence at a length, from the paired comparison alone: the original best (no method
    improves on it); a method best with the original not distinguishable from it (no retrofit gains
    anything beyond the noise); a method best with every other row worse."""
    from posbias.evaluate import Paired

    rows = [{"method": "original", "stage": "before"}, {"method": "ntk", "stage": "fine-tuned 100"},
            {"method": "pi", "stage": "no fine-tune"}]
    best, tied, worse = Paired(1, 1, 1, best=True), Paired(1.01, 0.99, 1.03), Paired(1.5, 1.4, 1.6)
    say = lambda *t: retrofit_report._best(list(t), rows, "1024")  # noqa: E731
    assert say(best, tied, worse) == ("* **At 1024 the model as it was, with no retrofit, is best**; not distinguishable "
                                      "from it: ntk (fine-tuned 100): no method here improves on it.")
    assert say(tied, best, worse) == ("* **Best at 1024: ntk (fine-tuned 100)**; not distinguishable from it: original "
                                      "(before). The model as it was is among them: no retrofit here gains anything "
                                      "beyond the noise.")
    assert say(worse, best, worse) == "* **Best at 1024: ntk (fine-tuned 100)**; every other row is worse beyond the noise."


def test_retrofit_and_diagnose_refuse_a_device_this_machine_lacks_before_any_work(tmp_path, corpus):
    """As ``run_study``: called from Python (the CLI checks first), a device that is not cpu/cuda[:N], or
    CUDA on a machine without it, is a ValueError naming the setting before any folder is made (was torch's
    RuntimeError or AssertionError once the checkpoint moved to it)."""
    path = tiny_checkpoint(tmp_path / "t", "t5", max_distance=L)
    bad = ["tpu", "nonsense!"] + ([] if torch.cuda.is_available() else ["cuda", "cuda:1"])
    for device in bad:
        expect = r"^device .*(is not a device|posbias runs on cpu or cuda|no CUDA device)"
        with pytest.raises(ValueError, match=expect):
            run_retrofit(path, RetrofitConfig(to=2 * L, methods=("t5-distance",), device=device), tmp_path / "r",
                         corpus=corpus)
        with pytest.raises(ValueError, match=expect):
            run_diagnose(path, DiagnoseConfig(length=2 * L, device=device), corpus=corpus, out=tmp_path / "d")
        assert not (tmp_path / "r").exists() and not (tmp_path / "d").exists()


def test_diagnose_notes_when_the_attention_statistics_exceed_the_free_memory(tmp_path, corpus, monkeypatch):
    """The length is refused against all the memory a device has (``examined_length``); against what is free
    now, with other processes holding the rest, a diagnosis says so in one line before it measures the
    attention statistics (and not when a cached measurement spares it)."""
    import posbias.diagnose as diagnose

    free = diagnose.free_memory("cpu")
    assert free is None or 0 < free <= diagnose.device_memory("cpu")
    assert diagnose.attention_peak(4, 1000) == 3.5 * 4 * 1000 ** 2 * 4
    monkeypatch.setattr(diagnose, "free_memory", lambda device: 10 * 2**20)
    note = diagnose.memory_note(4, 2048, "cpu")
    assert note == ("note: the attention statistics at 2048 tokens need about 224.0 MiB at their peak and this cpu "
                    "has 10.0 MiB free now; the run may swap or be killed (free memory, or a shorter --length)")
    assert diagnose.memory_note(4, 64, "cpu") is None  # 0.2 MiB fits
    monkeypatch.setattr(diagnose, "free_memory", lambda device: 3 * 2**29)  # 1.5 GiB free
    assert "need about 3.5 GiB at their peak and this cpu has 1.5 GiB free now" in diagnose.memory_note(4, 8192, "cpu")
    monkeypatch.setattr(diagnose, "free_memory", lambda device: diagnose.attention_peak(4, 8192))
    assert diagnose.memory_note(4, 8192, "cpu") is None  # exactly what is free fits
    path = tiny_checkpoint(tmp_path / "t", "t5", max_distance=L)
    monkeypatch.setattr(diagnose, "free_memory", lambda device: 1)
    cfg, said = DiagnoseConfig(length=2 * L, windows=2, eval_tokens=EVAL, passkey_steps=0), []
    run_diagnose(path, cfg, corpus=corpus, out=tmp_path / "d", log=said.append)
    assert sum(s.startswith(f"note: the attention statistics at {2 * L} tokens") for s in said) == 1
    said.clear()
    run_diagnose(path, cfg, corpus=corpus, out=tmp_path / "d", log=said.append)  # cached: nothing to measure
    assert not any(s.startswith("note: the attention statistics") for s in said)


def test_relative_cost_times_each_pair_back_to_back_in_alternating_order(monkeypatch):
    """`_relative_cost` on a fake clock. Each model's forward advances the clock by its cost, and
    whichever of a pair runs second is 1 unit cheaper (warm caches); the first call of each (the
    warm-up) costs 100 and must not be timed. The model costs 4, the base 2: model first reads
    4 / 1 = 4, base first reads 3 / 2 = 1.5. So the median of six alternating pairs is 2.75,
    and the spread runs from 1.5 to 4."""
    from types import SimpleNamespace

    from posbias import retrofit as retrofit_mod

    now = [0.0]
    monkeypatch.setattr(retrofit_mod.time, "perf_counter", lambda: now[0])
    seen = []

    class Timed:
        def __init__(self, name, cost):
            self.name, self.cost, self.calls = name, cost, 0
            self.cfg = SimpleNamespace(vocab_size=7)

        def __call__(self, x):
            assert not torch.is_grad_enabled()
            seen.append((self.name, tuple(x.shape), int(x.min()) >= 0 and int(x.max()) < 7))
            self.calls += 1
            second = len(seen) % 2 == 0
            now[0] += 100.0 if self.calls == 1 else self.cost - (1.0 if second else 0.0)

    model, base = Timed("model", 4.0), Timed("base", 2.0)
    median, lo, hi = retrofit_mod._relative_cost(model, base, 33, "cpu")
    assert (median, lo, hi) == (2.75, 1.5, 4.0)
    assert [name for name, _, _ in seen] == ["model", "base"] + ["model", "base", "base", "model"] * 3
    assert all(shape == (1, 33) and ok for _, shape, ok in seen)
    # the pairs asked for, and the order starts over with the model first
    seen.clear()
    model.calls = base.calls = 0
    assert retrofit_mod._relative_cost(model, base, 5, "cpu", pairs=3) == (4.0, 1.5, 4.0)
    assert len(seen) == 2 + 2 * 3


def test_a_retrofit_to_its_training_length_is_refused_before_any_work(tmp_path, corpus):
    """--to equal to L is refused by name before a model is scored or the output folder is made (past
    that check, the first method refused it only after the original model's evaluation)."""
    path = tiny_checkpoint(tmp_path / "r", "rope")
    with pytest.raises(ConfigError, match=f"must exceed the training length {L}, got {L}"):
        run_retrofit(path, RetrofitConfig(to=L, methods=("pi",)), tmp_path / "out", corpus=corpus)
    assert not (tmp_path / "out").exists()


def test_context_effect_scores_a_split_of_exactly_one_window():
    """A split that holds one window and no more is scored as one window (fewer than one is refused,
    naming the count)."""
    model = TransformerLM(ModelConfig(scheme="alibi", **TINY)).eval()
    tokens = torch.randint(0, 256, (2 * L + 1,), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    long, short = context_effect(model, tokens, 2 * L, L, windows=4)
    assert long.shape == short.shape == (1, 2 * L)
    torch.testing.assert_close(long[0, :L], short[0, :L], atol=1e-5, rtol=0)  # the first L see the same keys
    with pytest.raises(ValueError, match=f"the split has {2 * L - 1} tokens, fewer than one window of {2 * L}"):
        context_effect(model, tokens[:-1], 2 * L, L, windows=4)


def test_effective_reach_counts_a_drop_of_exactly_ln_100():
    """The reach is the first distance whose bias has dropped by at least ln 100 from distance 0: a
    drop of exactly ln 100 counts; a head that never drops that far has none."""
    from posbias.diagnose import REACH_DROP

    class Curve:
        n_heads = 2

        def bias_by_distance(self, d, *, query_pos):
            assert query_pos == 9 and d.tolist() == list(range(6))
            return -torch.tensor([[0.0, 1.0, 2.0, 3.0, REACH_DROP, 5.0], [0.0] * 6], dtype=torch.float64)

    assert effective_reach(Curve(), query_pos=9, max_distance=5) == [4, None]
    assert REACH_DROP == math.log(100)  # the drop the report names: a key weighed 100 times less on the bias alone
    # a scheme without a bias (rotary) has no reach in any head
    assert effective_reach(build("rope", n_heads=3, head_dim=8), query_pos=9, max_distance=5) == [None] * 3


def test_far_filler_scores_keep_the_five_digit_key_statement_visible(monkeypatch):
    """What stays visible past the window is the passkey statement of the samples scored: five digits
    unless the caller asks for others (a longer span kept a filler byte, a shorter one a digit hidden)."""
    from posbias import diagnose as diagnose_mod

    model = TransformerLM(ModelConfig(scheme="alibi", **TINY)).eval()
    kept = []
    monkeypatch.setattr(diagnose_mod.passkey, "scores", lambda m, n, d, **kw: kept.append((m.scheme.keep, kw)))
    diagnose_mod.far_filler_scores(model, 4 * L, 0.5, L, samples=2)
    diagnose_mod.far_filler_scores(model, 4 * L, 0.5, L, samples=2, digits=3)
    assert kept == [(passkey.statement_span(4 * L, 0.5, 5), {"samples": 2}),
                    (passkey.statement_span(4 * L, 0.5, 3), {"samples": 2, "digits": 3})]
    assert len(kept[0][0]) == len(kept[1][0]) + 2


def test_retrofit_and_diagnose_are_silent_as_a_library_unless_asked(tmp_path, corpus, capsys):
    """Called from Python, ``run_retrofit`` and ``run_diagnose`` draw no progress bar and print nothing
    unless given ``progress=True`` or a ``log`` (the command line passes both)."""
    path = tiny_checkpoint(tmp_path / "r", "rope")
    cfg = RetrofitConfig(to=2 * L, methods=("pi",), finetune_steps=1, finetune_batch=1, eval_tokens=EVAL)
    run_retrofit(path, cfg, tmp_path / "out", corpus=corpus)
    run_diagnose(path, DiagnoseConfig(length=2 * L, windows=1, eval_tokens=EVAL, passkey_steps=1, passkey_samples=1),
                 corpus=corpus, out=tmp_path / "d")
    assert capsys.readouterr() == ("", "")
    run_retrofit(path, dataclasses.replace(cfg, finetune_steps=2), tmp_path / "out2", corpus=corpus, progress=True)
    assert "fine-tune pi" in capsys.readouterr().err  # the bar, when asked for


def test_a_retrofit_finetune_replaces_another_finetunes_progress_in_its_folder(tmp_path, corpus):
    """The fine-tune's progress folder belongs to the retrofit (its name holds the job's key): progress
    another fine-tune left there (here one of other starting weights, stopped after a step) is
    replaced, said in the log, and the result is that of a run that never met it."""
    from posbias.retrofit import source_key

    path = tiny_checkpoint(tmp_path / "r", "rope")
    cfg = RetrofitConfig(to=2 * L, methods=("pi",), finetune_steps=3, eval_tokens=EVAL)
    folder = tmp_path / "out" / "models" / f"pi-ft3-{source_key(path, cfg, corpus)}" / "last"
    torch.manual_seed(1)
    other = TransformerLM(ModelConfig(scheme="rope", **TINY))
    _tiny_finetune(other, corpus, steps=3, resume=folder, save_every_s=0, stop=lambda step: step >= 1, check_every=1)
    assert ckpt.exists(folder)
    said = []
    got = run_retrofit(path, cfg, tmp_path / "out", corpus=corpus, log=said.append)
    assert any(line.endswith("holds another fine-tune's progress; starting afresh (it is replaced)") for line in said)
    clean = run_retrofit(path, cfg, tmp_path / "clean", corpus=corpus)
    assert [r["ppl"] for r in got.rows] == [r["ppl"] for r in clean.rows]


def test_diagnose_attention_statistics_are_of_the_windows_spread_over_the_split(tmp_path, corpus):
    """The attention statistics of a diagnosis are those of ``--windows`` windows of the examined length
    spread from the split's start to its end (``spread_starts`` with overlap), as computed directly."""
    from posbias.evaluate import spread_starts

    path = tiny_checkpoint(tmp_path / "t", "alibi")
    model = ckpt.load_model(path)

    def at(val, starts):  # the statistics of the windows of 2 L at these starts, computed directly
        return attention_distance(model, torch.stack([val[s:s + 2 * L] for s in starts]).long(), beyond=L)

    rep = run_diagnose(path, DiagnoseConfig(length=2 * L, windows=3, eval_tokens=EVAL, passkey_steps=0), corpus=corpus)
    starts = spread_starts(corpus.val.numel() - 1, 2 * L, 3, overlap=True)
    assert starts[-1] + 2 * L == corpus.val.numel() - 1  # the last window's next token is the split's last
    want = at(corpus.val, starts)
    assert set(rep.attention_distance) == set(want) == {"mean", "q50", "q90", "beyond"}
    for k, v in want.items():
        torch.testing.assert_close(torch.tensor(rep.attention_distance[k]), v, rtol=1e-6, atol=1e-6)
    # a split too short for 10 windows side by side: they overlap, still spread from its start to its end
    short = dataclasses.replace(corpus, val=corpus.val[:EVAL + 32])
    rep = run_diagnose(path, DiagnoseConfig(length=2 * L, windows=10, eval_tokens=EVAL, passkey_steps=0), corpus=short)
    starts = spread_starts(EVAL + 31, 2 * L, 10, overlap=True)
    assert 10 * 2 * L > EVAL + 31 and starts[-1] == EVAL + 31 - 2 * L
    torch.testing.assert_close(torch.tensor(rep.attention_distance["mean"]), at(short.val, starts)["mean"],
                               rtol=1e-6, atol=1e-6)


def test_a_retrofit_finetune_is_language_modelling_on_batches_of_the_next_seed(tmp_path, corpus):
    """The fine-tune after a method: next-token loss on training batches of ``--to`` tokens drawn with
    seed ``--seed`` + 1, at the checkpoint's positional multiplier. The saved model is the one a hand-run
    fine-tune of the retrofitted model gives, and the log says the plan (no passkey without --compare)."""
    from posbias.config import fixed_threads
    from posbias.retrofit import source_key

    path = tiny_checkpoint(tmp_path / "r", "rope")
    cfg = RetrofitConfig(to=2 * L, methods=("pi",), finetune_steps=2, finetune_batch=2, eval_tokens=EVAL, seed=3)
    said = []
    run_retrofit(path, cfg, tmp_path / "out", corpus=corpus, log=said.append)
    assert "method 1/1: pi (no fine-tune, then a 2-step fine-tune at 96)" in said
    saved = ckpt.load_model(tmp_path / "out" / "models" / f"pi-ft2-{source_key(path, cfg, corpus)}")
    hand = retrofit_model(ckpt.load_model(path), "pi", train_len=L, to=2 * L)
    with fixed_threads(cfg.threads):  # next-token loss on 2 sequences of 2 L a step, as the helper trains
        _tiny_finetune(hand, corpus, steps=2, lr=3e-4, seed=cfg.seed + 1)
    for (name, got), want in zip(saved.state_dict().items(), hand.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=name)


def test_the_bias_measurements_ask_for_the_query_positions_they_name():
    """``effective_reach`` for a query at the window's end (length − 1) and at L − 1, both up to 16 ×
    the window, and ``bias_drift`` between L − 1 and length − 1: read from a bias that moves with the
    query position (``−d · i / 10``), so each answer names the position it was read at."""
    from posbias.diagnose import DiagnoseResult, _measure_bias, final_bucket_weight

    asked = []

    class Moving:
        family, n_heads = "additive", 1

        def bias_by_distance(self, d, *, query_pos):
            asked.append((query_pos, d.numel()))
            return -(d.double() * query_pos / 10)[None]

    r = DiagnoseResult("ck", "moving", {}, 8, 32, Moving(), 1, [0.0], [0.0], [], {})
    _measure_bias(r)
    assert asked == [(31, 16 * 32 + 1), (7, 16 * 32 + 1), (7, 8), (31, 8)]
    assert r.effective_reach == [2] and r.reach_at_L == [7]  # the first d with d · i / 10 ≥ ln 100
    assert r.bias_drift == [pytest.approx(7 * 2.4)] and r.rotary is None and r.final_entry_share == {}
    # a learned bias flat past an offset (T5's final bucket): its share at L, 2 L, 4 L, 8 L, 16 L and the window
    t5 = perturb_(build("t5", n_heads=2, head_dim=8, num_buckets=8, max_distance=16))
    r = DiagnoseResult("ck", "t5", {}, 8, 200, t5, 1, [0.0], [0.0], [], {})
    _measure_bias(r)
    assert r.final_entry_share == {n: final_bucket_share(t5, n) for n in (8, 16, 32, 64, 128, 200)}
    assert (r.final_entry_gap, r.far_weight) == final_bucket_weight(t5, 200)


def test_diagnose_skips_the_passkey_test_only_below_one_sample_of_five_digits(tmp_path, corpus):
    """A passkey sample of a 5-digit key is ``passkey.overhead(5)`` bytes: a checkpoint trained at
    that length gets the test, one trained a byte shorter does not, and the report says why."""
    shortest = passkey.overhead(5)
    model = TransformerLM(ModelConfig(scheme="alibi", **TINY))
    got, said = {}, []
    for n in (shortest - 1, shortest):
        path = ckpt.save_checkpoint(tmp_path / f"L{n}", model, extra={"train": {"seq_len": n}})
        got[n] = run_diagnose(path, DiagnoseConfig(length=2 * n, windows=1, eval_tokens=MIN_SEGMENTS * 2 * n,
                                                   passkey_steps=1, passkey_samples=1), corpus=corpus, log=said.append)
    skipped = got[shortest - 1]
    assert skipped.passkey is None and skipped.passkey_copies == []
    assert skipped.passkey_skipped == f"the training length {shortest - 1} is shorter than a passkey sample ({shortest} bytes)"
    assert f"Skipped: {skipped.passkey_skipped}." in diagnose_report.markdown(skipped)
    ran = got[shortest]
    assert not any(line.startswith("passkey copy") for line in said)  # one copy: no "copy 1/1" line
    assert ran.passkey_skipped == "" and set(ran.passkey) == {str(shortest), str(2 * shortest)}
    assert len(ran.passkey_copies) == 1 and ran.passkey_max_steps == 1


def test_context_split_counts_the_first_eighth_of_each_cut_chunk_after_the_first():
    """Past L, the first L/8 positions of every L-chunk lose their local context to the cut (at L = 48:
    6 positions in each of the 3 chunks after the first of a 4 L window), the others keep it."""
    from posbias.evaluate import local_head

    assert local_head(L) == 6
    long_w, short_w = torch.zeros(2, 4 * L), torch.zeros(2, 4 * L)
    robbed = torch.tensor([p >= L and p % L < 6 for p in range(4 * L)])
    long_w[:, robbed] = -1.0  # the cut costs those positions 1 nat, and no other
    (first, share1, d1, _, _), (rest, share2, d2, _, _) = context_split(long_w, short_w, L)
    assert first.startswith("first 6 of each cut chunk") and rest.startswith("the rest past L")
    assert (share1, d1, share2, d2) == (18 / (4 * L), -1.0, (3 * L - 18) / (4 * L), 0.0)
