"""Where the text comes from: local files and folders (hidden and binary files passed over and named)
and Hugging Face datasets (their own splits, or validation held out of the training documents)."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from posbias.cli import main
from posbias.data import BINARY_PROBE, CARVED, batch_at, hf_corpus, local_corpus, looks_binary

WORDS = "the of and a to in is you that it he was for on are as with his they at be this have from".split()


def _text(n: int, seed: int = 0) -> str:
    return " ".join(WORDS[(i * 7 + seed) % len(WORDS)] for i in range(n))


def test_a_folder_passes_over_hidden_and_binary_files_and_names_them(tmp_path):
    (tmp_path / "a.txt").write_text(_text(3000))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text(_text(2000, 1))
    (tmp_path / ".git" / "objects").mkdir(parents=True)
    (tmp_path / ".git" / "objects" / "ab").write_bytes(bytes(range(256)) * 4)  # would be read as text otherwise
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / ".DS_Store").write_bytes(b"Bud1" + b"\0" * 50)
    (tmp_path / "sub" / "a.txt.gz").write_bytes(b"\x1f\x8b\x08\x00" + bytes(100))
    (tmp_path / "sub" / "late_nul.txt").write_bytes(b"x" * BINARY_PROBE + b"\0")  # past the probe: text
    c = local_corpus(tmp_path)
    assert c.fingerprint["files"] == 3
    assert c.fingerprint["bytes"] == sum(len(p.read_bytes()) for p in
                                         (tmp_path / "a.txt", tmp_path / "sub" / "b.md", tmp_path / "sub" / "late_nul.txt"))
    assert c.notes == ("passed over 2 hidden files and folders (a name starting with '.'): .DS_Store, .git/; "
                       f"1 binary file (a NUL byte in the first {BINARY_PROBE:,} bytes): sub/a.txt.gz",)
    # what was passed over changes nothing: the same corpus as a folder holding only the text
    clean = tmp_path.parent / "clean"
    (clean / "sub").mkdir(parents=True)
    for rel in ("a.txt", "sub/b.md", "sub/late_nul.txt"):
        (clean / rel).write_bytes((tmp_path / rel).read_bytes())
    again = local_corpus(clean)
    assert again.fingerprint["sha256"] == c.fingerprint["sha256"] and again.notes == ()
    assert all(bool((getattr(again, s) == getattr(c, s)).all()) for s in ("train", "val", "test"))


def test_many_passed_over_files_are_counted_and_a_few_named(tmp_path):
    """Three passed-over files of a kind are named, all; past three, the first three and a count."""
    (tmp_path / "a.txt").write_text(_text(3000))
    for n, named in ((3, "img0.png, img1.png, img2.png"), (5, "img0.png, img1.png, img2.png and 2 more")):
        for i in range(n):
            (tmp_path / f"img{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
        assert local_corpus(tmp_path).notes == (f"passed over {n} binary files (a NUL byte in the first "
                                                f"{BINARY_PROBE:,} bytes): {named}",)


def test_a_file_named_by_the_user_is_read_as_given_with_a_note_when_binary(tmp_path):
    gz = tmp_path / "corpus.txt.gz"
    gz.write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 8)
    c = local_corpus(gz)
    assert c.fingerprint["bytes"] == len(gz.read_bytes())
    assert c.notes == (f"corpus.txt.gz looks binary (a NUL byte in its first {BINARY_PROBE:,} bytes): read as given, "
                       "byte by byte",)
    assert looks_binary(b"\0") and not looks_binary("héllo".encode()) and not looks_binary(b"")


def test_a_folder_of_nothing_but_passed_over_files_says_why_it_is_empty(tmp_path, capsys):
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("[core]\n")
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0\0\x10JFIF")
    with pytest.raises(ValueError, match=r"is empty: no readable text found; passed over 1 hidden file or folder "
                                         r"\(a name starting with '\.'\): \.git/; 1 binary file .*: photo\.jpg"):
        local_corpus(tmp_path)
    assert main(["extrapolate", "--data", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "passed over" in err[0]


def test_a_symlink_loop_in_a_folder_is_not_followed(tmp_path):
    (tmp_path / "a.txt").write_text(_text(3000))
    (tmp_path / "loop").symlink_to(tmp_path, target_is_directory=True)
    assert local_corpus(tmp_path).fingerprint["files"] == 1


class _Split:
    """What hf_corpus reads of a ``datasets.Dataset``: ``column_names`` and a column's values."""

    def __init__(self, rows: list[dict]):
        self.rows = rows
        self.column_names = list(rows[0]) if rows else []

    def __getitem__(self, column: str):
        return [r[column] for r in self.rows]


def _fake_datasets(monkeypatch, splits: dict[str, list[dict]]) -> list:
    """A ``datasets`` module whose load_dataset returns ``splits``; the calls it got."""
    calls = []

    def load_dataset(name, config=None):
        calls.append((name, config))
        return {k: _Split(v) for k, v in splits.items()}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def _rows(n: int, prefix: str, **extra) -> list[dict]:
    return [{"text": f"{prefix} {i} " + _text(30, i), "id": i, **extra} for i in range(n)]


def test_a_dataset_with_its_own_validation_split(monkeypatch):
    calls = _fake_datasets(monkeypatch, {"train": _rows(40, "tr"), "validation": _rows(5, "va"), "test": _rows(5, "te")})
    c = hf_corpus("user/set:cfg")
    assert calls == [("user/set", "cfg")] and c.notes == ()
    assert bytes(c.val.tolist()) == "\n".join(r["text"] for r in _rows(5, "va")).encode()
    assert bytes(c.train.tolist()).startswith(b"tr 0 ") and c.test.numel() == 0  # the test split is not used
    assert c.fingerprint["documents"] == 45 and c.fingerprint["val_bytes"] == c.val.numel()
    # the same documents split otherwise are another corpus
    _fake_datasets(monkeypatch, {"train": _rows(40, "tr")[:-1], "validation": _rows(40, "tr")[-1:] + _rows(5, "va")})
    assert hf_corpus("user/set:cfg").fingerprint["sha256"] != c.fingerprint["sha256"]


@pytest.mark.parametrize("name", ["valid", "val", "dev"])
def test_other_names_of_the_validation_split(monkeypatch, name):
    _fake_datasets(monkeypatch, {"train": _rows(10, "tr"), name: _rows(3, "va")})
    assert bytes(hf_corpus("x").val.tolist()).startswith(b"va 0 ")


def test_without_a_validation_split_a_share_of_training_documents_is_held_out(monkeypatch):
    rows = _rows(2000, "doc")
    _fake_datasets(monkeypatch, {"train": rows})
    c = hf_corpus("stories")
    held = bytes(c.val.tolist()).decode().split("\n")
    kept = bytes(c.train.tolist()).decode().split("\n")
    assert sorted(held + kept) == sorted(r["text"] for r in rows)  # every document once, none in both
    assert abs(len(held) / len(rows) - CARVED / 100) < 0.015
    assert c.notes == (f"stories has no validation split: {len(held):,} of its 2,000 training documents (the rows whose "
                       f"index hashes into {CARVED}%) are held out to score on",)
    assert hf_corpus("stories").fingerprint == c.fingerprint  # deterministic


def test_a_named_column_empty_rows_and_bad_datasets(monkeypatch):
    rows = [{"story": f"s{i} " + _text(20, i), "label": i} for i in range(20)] + [{"story": "", "label": 0},
                                                                                 {"story": None, "label": 1}]
    _fake_datasets(monkeypatch, {"train": rows, "validation": rows[:3]})
    with pytest.raises(ValueError, match=r"has no column 'text'; its columns: story, label \(choose one as "
                                         r"NAME\[:CONFIG\]#COLUMN\)"):
        hf_corpus("tiny")
    c = hf_corpus("tiny#story")
    assert bytes(c.train.tolist()).decode().split("\n") == [r["story"] for r in rows[:20]]
    assert c.fingerprint["name"] == "tiny#story"
    with pytest.raises(ValueError, match="column 'label' holds int, not text"):
        hf_corpus("tiny#label")
    _fake_datasets(monkeypatch, {"test": rows})
    with pytest.raises(ValueError, match=r"'tiny#story' has no train split \(its splits: test\)"):
        hf_corpus("tiny#story")
    for spec in ("", ":cfg", "name:", "name#", "name:#c"):
        with pytest.raises(ValueError, match="give NAME, NAME:CONFIG or NAME"):
            hf_corpus(spec)


def test_without_the_datasets_package_the_error_says_how_to_install_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(ValueError, match=r"pip install 'posbias\[datasets\]'"):
        hf_corpus("wikitext:wikitext-2-raw-v1")
    assert main(["extrapolate", "--hf-dataset", "wikitext", "--out", str(tmp_path)]) == 2
    assert "posbias[datasets]" in capsys.readouterr().err


def _jsonl_dataset(root: Path, splits: dict[str, int]) -> Path:
    root.mkdir()
    for split, n in splits.items():
        with open(root / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"story": f"{split} {i}: " + _text(60, i), "n": i}) + "\n")
    return root


def test_a_real_datasets_folder_through_the_command_line(tmp_path):
    """The ``datasets`` package itself (skipped without it) on a local JSON-lines dataset, offline: a
    train-only dataset, a named column, the held-out note and a study that runs on it."""
    pytest.importorskip("datasets")
    data = _jsonl_dataset(tmp_path / "stories", {"train": 400})
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "posbias.cli", "extrapolate", "--hf-dataset", f"{data}#story",
                          "--schemes", "alibi", "--train-len", "16", "--eval-lens", "16", "32", "--steps", "2",
                          "--batch-size", "2", "--d-model", "16", "--layers", "1", "--heads", "2",
                          "--eval-tokens", "256", "--out", str(out), "--quiet"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith(f"corpus {data}#story: 400 documents, ")
    assert lines[1].startswith(f"note: {data}#story has no validation split: ") and "of its 400 training documents" in lines[1]
    corpus = json.loads((out / "results.json").read_text())["corpus"]
    assert corpus["name"] == f"{data}#story" and corpus["documents"] == 400 and corpus["test_bytes"] == 0
    missing = subprocess.run([sys.executable, "-m", "posbias.cli", "extrapolate", "--hf-dataset", str(data),
                              "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "has no column 'text'; its columns: story, n" in missing.stderr


def _corpus_as_defined(docs: list[tuple[str, bytes]]) -> dict:
    """The split and fingerprint by their definition, all in memory: 20 documents or more each go, with
    a newline, to the split a hash of their key names; fewer are joined by newlines and cut 90/5/5."""
    import hashlib

    from posbias.data import _split_of

    if len(docs) >= 20:
        parts = {s: b"".join(b + b"\n" for k, b in docs if _split_of(k) == s) for s in ("train", "val", "test")}
    else:
        whole = b"\n".join(b for _, b in docs)
        a, c = int(len(whole) * 0.90), int(len(whole) * 0.95)
        parts = {"train": whole[:a], "val": whole[a:c], "test": whole[c:]}
    digest = hashlib.sha256(b"".join(k.encode() + b"\0" + b for k, b in docs)).hexdigest()[:16]
    return {"parts": parts, "sha256": digest, "bytes": sum(len(b) for _, b in docs)}


@pytest.mark.parametrize("n_files", [1, 7, 19, 20, 64])
def test_a_folder_read_file_by_file_equals_the_definition(tmp_path, n_files):
    import random

    rng = random.Random(n_files)
    docs = []
    for i in range(n_files):
        rel = f"d{rng.randrange(3)}/f{i:02d}-{rng.randrange(1000)}.txt"
        body = _text(rng.randrange(1, 400), i).encode()
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_bytes(body)
        docs.append((rel, body))
    docs.sort(key=lambda d: Path(d[0]))
    want = _corpus_as_defined(docs)
    c = local_corpus(tmp_path)
    assert {s: bytes(getattr(c, s).tolist()) for s in ("train", "val", "test")} == want["parts"]
    assert c.fingerprint["sha256"] == want["sha256"] and c.fingerprint["bytes"] == want["bytes"]
    assert c.fingerprint["files"] == n_files


def test_the_embedded_corpus_is_the_one_every_model_was_trained_on():
    """Reading file by file changed no byte of the embedded corpus: its fingerprint for Python 3.11.7's
    standard library as every study recorded it before the change (e.g. runs of 2026-12-03)."""
    from posbias.data import stdlib_corpus

    if sys.version_info[:3] != (3, 11, 7):
        pytest.skip("the recorded fingerprint is of Python 3.11.7's standard library")
    assert stdlib_corpus().fingerprint == {"name": "stdlib-3.11", "files": 734, "bytes": 12118641,
                                           "sha256": "e085de22c6d26ad1", "train_bytes": 11194053,
                                           "val_bytes": 544035, "test_bytes": 381287}


def test_a_file_that_turns_binary_while_the_folder_is_read_is_refused(tmp_path, monkeypatch):
    from posbias import data

    (tmp_path / "a.txt").write_text(_text(3000))
    (tmp_path / "b.txt").write_text(_text(300))
    real = data._head

    def first_look(path):  # b.txt is text at the first look and binary when read
        head = real(path)
        if path.name == "b.txt":
            path.write_bytes(b"\0" * 10)
        return head

    monkeypatch.setattr(data, "_head", first_look)
    with pytest.raises(ValueError, match=r"'b.txt' changed while the corpus was read \(now binary\)"):
        local_corpus(tmp_path)


def test_a_steps_batch_is_windows_of_the_text_that_depend_on_the_seed_and_step_only():
    tokens = torch.arange(200, dtype=torch.uint8)  # a token is its own position: a window shows where it starts
    x, y = batch_at(tokens, 7, batch_size=16, seq_len=12, seed=3)
    assert x.shape == y.shape == (16, 12) and x.dtype == y.dtype == torch.long
    for row_x, row_y in zip(x, y):
        start = int(row_x[0])
        assert row_x.tolist() == list(range(start, start + 12)) and row_y.tolist() == list(range(start + 1, start + 13))
    again = batch_at(tokens, 7, batch_size=16, seq_len=12, seed=3)
    assert torch.equal(again[0], x) and torch.equal(again[1], y)  # resuming at step 7 reads the same batch
    assert not torch.equal(batch_at(tokens, 8, batch_size=16, seq_len=12, seed=3)[0], x)
    assert not torch.equal(batch_at(tokens, 7, batch_size=16, seq_len=12, seed=4)[0], x)
    # every start 0 … n - L - 2 is drawn, and none past it
    short = torch.arange(12 + 6, dtype=torch.uint8)
    starts = {int(s) for step in range(40) for s in batch_at(short, step, batch_size=8, seq_len=12, seed=0)[0][:, 0]}
    assert starts == set(range(5))


def test_a_split_too_short_for_a_training_window_is_refused_with_the_length_it_needs():
    x, y = batch_at(torch.arange(14, dtype=torch.uint8), 0, batch_size=3, seq_len=12, seed=0)  # n = L + 2: one start
    assert x[:, 0].tolist() == [0, 0, 0] and y[:, -1].tolist() == [12, 12, 12]
    with pytest.raises(ValueError, match="training split has 13 tokens; training on sequences of 12 needs at least 14"):
        batch_at(torch.arange(13, dtype=torch.uint8), 0, batch_size=3, seq_len=12, seed=0)


def test_each_split_needs_two_bytes_and_a_split_is_named_by_its_name(tmp_path):
    f = tmp_path / "few.txt"
    f.write_bytes(b"x" * 40)  # split 90/5/5 by bytes: 36, 2 and 2
    c = local_corpus(f)
    assert (c.train.numel(), c.val.numel(), c.test.numel()) == (36, 2, 2)
    assert c.split("val") is c.val and c.split("test") is c.test
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'val', 'test'\), got 'dev'"):
        c.split("dev")
    f.write_bytes(b"x" * 20)  # 18, 1 and 1
    with pytest.raises(ValueError, match=r"too little text for a val split \(1 byte, fewer than the 2 a split needs\)"):
        local_corpus(f)
