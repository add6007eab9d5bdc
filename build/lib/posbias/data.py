"""Byte-level corpora: the embedded default (this interpreter's standard library source), a local
file or folder (hidden and binary files passed over, and named), or a Hugging Face dataset (its own
splits, or validation held out of its training documents). Split by file into train/validation/test,
deterministic, with a fingerprint (files, bytes, hash) recorded in every result."""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .store import listed

SPLITS = ("train", "val", "test")
_EXCLUDE_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class Corpus:
    name: str
    train: Tensor  # uint8 tokens
    val: Tensor
    test: Tensor
    fingerprint: dict
    notes: tuple[str, ...] = ()  # what the terminal should say about how the text was read (files passed over)

    def split(self, name: str) -> Tensor:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return getattr(self, name)


def _percent(key: str) -> int:
    """A deterministic number in 0…99 from a hash of ``key``."""
    return int(hashlib.sha1(key.encode()).hexdigest(), 16) % 100


def _split_of(key: str) -> str:
    """Deterministic 90/5/5 split by a hash of the file's relative path."""
    h = _percent(key)
    return "train" if h < 90 else ("val" if h < 95 else "test")


def _too_little(name: str, split: str, size: int) -> None:
    if size < 2:
        raise ValueError(f"corpus {name!r} has too little text for a {split} split ({size} byte{'' if size == 1 else 's'}, "
                         "fewer than the 2 a split needs); give more text")


def _from_documents(name: str, docs: list[tuple[str, Callable[[], bytes | bytearray]]], *,
                    notes: Sequence[str] = ()) -> Corpus:
    """The corpus of ``docs``, (key, a function that reads its bytes) in order: 20 or more split by a hash of
    the key (each document and a newline), fewer by bytes (joined by newlines, 90/5/5). Each document is
    read once, hashed and appended, so the peak memory is about the text once (not 3-4 times: measured)."""
    digest, total = hashlib.sha256(), 0
    by_file = len(docs) >= 20
    buffers = {s: bytearray() for s in SPLITS}
    for i, (key, read) in enumerate(docs):
        body = read()
        digest.update(key.encode() + b"\0")
        digest.update(body)
        total += len(body)
        if by_file:
            buffer = buffers[_split_of(key)]
            buffer += body
            buffer += b"\n"
        elif i == 0 and isinstance(body, bytearray):  # too few documents to split by file: split the
            buffers["train"] = body  # concatenation 90/5/5 by bytes; a file read into a buffer starts it, uncopied
        else:
            _append(buffers["train"], body, first=i == 0)
    if total == 0:  # no documents, or only empty ones
        raise ValueError(f"corpus {name!r} is empty: no readable text found" + "".join(f"; {n}" for n in notes))
    if by_file:
        tensors = {s: _tensor(buffers[s]) for s in SPLITS}
    else:
        n = len(buffers["train"])
        a, c = int(n * 0.90), int(n * 0.95)
        whole = _tensor(buffers["train"])
        tensors = {"train": whole[:a], "val": whole[a:c].clone(), "test": whole[c:].clone()}
    for s in SPLITS:
        _too_little(name, s, int(tensors[s].numel()))
    fp = {"name": name, "files": len(docs), "bytes": total, "sha256": digest.hexdigest()[:16],
          **{f"{s}_bytes": int(t.numel()) for s, t in tensors.items()}}
    return Corpus(name=name, fingerprint=fp, notes=tuple(notes), **tensors)


def _append(buffer: bytearray, body: bytes | bytearray, *, first: bool) -> None:
    """``body`` onto ``buffer``, documents joined by newlines (no copy of ``body``)."""
    if not first:
        buffer += b"\n"
    buffer += body


def _tensor(buffer: bytearray) -> Tensor:
    """A uint8 tensor on ``buffer``'s memory (no copy); empty when it is."""
    return torch.frombuffer(buffer, dtype=torch.uint8) if buffer else torch.zeros(0, dtype=torch.uint8)


def _from_splits(name: str, parts: dict[str, bytearray], documents: int, *, notes: Sequence[str] = ()) -> Corpus:
    """A corpus whose train and val text comes split already (a dataset's own splits, documents joined
    by newlines); no test text. Its ``sha256`` covers each split's bytes and length, so the same
    documents split otherwise differ."""
    digest = hashlib.sha256()
    tensors = {"test": torch.zeros(0, dtype=torch.uint8)}
    for s in ("train", "val"):
        _too_little(name, s, len(parts[s]))
        digest.update(f"{s}:{len(parts[s])}:".encode())
        digest.update(parts[s])
        tensors[s] = _tensor(parts[s])
    fp = {"name": name, "documents": documents, "bytes": sum(int(t.numel()) for t in tensors.values()),
          "sha256": digest.hexdigest()[:16], **{f"{s}_bytes": int(t.numel()) for s, t in tensors.items()}}
    return Corpus(name=name, fingerprint=fp, notes=tuple(notes), **tensors)


def stdlib_corpus() -> Corpus:
    """The running interpreter's standard library ``.py`` files (sorted; tests and site-packages
    excluded): real text present on every machine, no download."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _EXCLUDE_DIRS.intersection(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        docs.append((rel.as_posix(), path.read_bytes))
    return _from_documents(f"stdlib-{sysconfig.get_python_version()}", docs)


BINARY_PROBE = 8000  # bytes read for a NUL, as git decides that a file is not text


def looks_binary(body: bytes) -> bool:
    """Whether a file's bytes look like a binary file's rather than text's: a NUL byte among the first
    :data:`BINARY_PROBE` (git's rule; compressed files, images, .git objects, UTF-16 text)."""
    return b"\0" in body[:BINARY_PROBE]


def _text_files(root: Path) -> tuple[list[Path], dict[str, list[str]]]:
    """The files under ``root`` a corpus reads, sorted, and those it passes over by reason: hidden
    files and folders (a name starting with ``.``: ``.git``, ``.venv``, ``.DS_Store``) are not entered."""
    files, hidden = [], []
    for here, dirs, names in os.walk(root):
        rel = Path(here).relative_to(root)
        hidden += [(rel / d).as_posix() + "/" for d in dirs if d.startswith(".")]
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        hidden += [(rel / n).as_posix() for n in names if n.startswith(".")]
        files += [Path(here) / n for n in names if not n.startswith(".") and (Path(here) / n).is_file()]
    return sorted(files), {"hidden": sorted(hidden)}


def local_corpus(path: str | Path) -> Corpus:
    """A local text file (read as given) or folder: every file under it, sorted by path, but hidden ones
    (and everything in hidden folders) and those that :func:`looks_binary`; :attr:`Corpus.notes` names
    what was passed over. At least 20 files split by file (a hash of the path), fewer by bytes."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data path {str(p)!r} does not exist")
    if p.is_file():
        head = _head(p)
        notes = [f"{p.name} looks binary (a NUL byte in its first {BINARY_PROBE:,} bytes): read as given, "
                 "byte by byte"] if looks_binary(head) else []
        return _from_documents(str(p), [(p.name, _reader(p, p.name, binary=bool(notes)))] if head else [], notes=notes)
    files, skipped = _text_files(p)
    docs, binary = [], []
    for f in files:  # a first look decides which files are read: the text is then read once, file by file
        head, rel = _head(f), f.relative_to(p).as_posix()
        if looks_binary(head):
            binary.append(rel)
        elif head:
            docs.append((rel, _reader(f, rel)))
    skipped["binary"] = binary
    return _from_documents(str(p), docs, notes=[_skipped_note(skipped)] if any(skipped.values()) else [])


def _head(path: Path) -> bytes:
    """The first :data:`BINARY_PROBE` bytes of a file."""
    with open(path, "rb") as f:
        return f.read(BINARY_PROBE)


def _reader(path: Path, rel: str, *, binary: bool = False) -> Callable[[], bytearray]:
    """A function that reads ``path``, refusing a file that changed into an empty or (unless ``binary``)
    a binary one since its first look (a corpus read while something writes into it)."""
    def read() -> bytearray:
        with open(path, "rb") as f:  # into a buffer of the file's size: the bytes are not copied again
            body = bytearray(os.fstat(f.fileno()).st_size)
            del body[f.readinto(body):]
            body += f.read()  # anything written since the size was read
        if not body or (looks_binary(body) and not binary):
            raise ValueError(f"{rel!r} changed while the corpus was read (now {'empty' if not body else 'binary'}); "
                             "read it again when nothing writes into the folder")
        return body
    return read


def _skipped_note(skipped: dict[str, list[str]]) -> str:
    """One line on the files a folder's corpus passed over, a few named of each kind."""
    kinds = {"hidden": ("hidden file or folder", "hidden files and folders", "a name starting with '.'"),
             "binary": ("binary file", "binary files", f"a NUL byte in the first {BINARY_PROBE:,} bytes")}
    parts = []
    for kind, paths in skipped.items():
        if paths:
            one, many, why = kinds[kind]
            parts.append(f"{len(paths)} {one if len(paths) == 1 else many} ({why}): {listed(paths)}")
    return "passed over " + "; ".join(parts)


DEFAULT_COLUMN = "text"
VAL_NAMES = ("validation", "valid", "val", "dev")  # a dataset's validation split, by the names in use
CARVED = 5  # percent of a dataset's training documents held out when it has no validation split


def _hf_spec(spec: str) -> tuple[str, str | None, str]:
    """``NAME[:CONFIG][#COLUMN]`` → (name, config or None, column)."""
    rest, has_column, column = spec.partition("#")
    name, has_config, config = rest.partition(":")
    if not name or (has_config and not config) or (has_column and not column):
        raise ValueError(f"--hf-dataset {spec!r}: give NAME, NAME:CONFIG or NAME[:CONFIG]#COLUMN")
    return name, config or None, column or DEFAULT_COLUMN


def _hf_texts(split, spec: str, column: str) -> Iterable[tuple[int, bytes]]:
    """(row, encoded text) of one split of a dataset's column, rows without text left out."""
    names = list(getattr(split, "column_names", None) or [])
    if column not in names:
        raise ValueError(f"--hf-dataset {spec!r}: the dataset has no column {column!r}; its columns: "
                         f"{', '.join(names) or 'none'} (choose one as NAME[:CONFIG]#COLUMN)")
    for row, text in enumerate(split[column]):
        if text is not None and not isinstance(text, str):
            raise ValueError(f"--hf-dataset {spec!r}: column {column!r} holds {type(text).__name__}, not text "
                             f"(choose a text column as NAME[:CONFIG]#COLUMN)")
        if text:
            yield row, text.encode()


def hf_corpus(spec: str) -> Corpus:
    """``NAME[:CONFIG][#COLUMN]`` of a Hugging Face dataset (needs the datasets extra; ``datasets`` may
    download it, posbias itself downloads nothing): the ``text`` column unless another is named, its
    ``train`` split for training and its validation split (named validation, valid, val or dev) for
    scoring, documents joined by newlines. Without one, the training rows whose index hashes into
    :data:`CARVED` % are held out as validation, and :attr:`Corpus.notes` says so. The test split is
    not read."""
    name, config, column = _hf_spec(spec)
    try:
        import datasets
    except ImportError:
        raise ValueError("Hugging Face datasets need the optional extra: pip install 'posbias[datasets]'") from None
    ds = datasets.load_dataset(name, config)
    if "train" not in ds:
        raise ValueError(f"--hf-dataset {spec!r} has no train split (its splits: {', '.join(ds) or 'none'})")
    val_name = next((v for v in VAL_NAMES if v in ds), None)
    parts, counts = {"train": bytearray(), "val": bytearray()}, {"train": 0, "val": 0}
    sources = [("train", ds["train"])] + ([("val", ds[val_name])] if val_name else [])
    for ours, split in sources:
        for row, body in _hf_texts(split, spec, column):
            to = "val" if val_name is None and _percent(str(row)) < CARVED else ours
            _append(parts[to], body, first=counts[to] == 0)
            counts[to] += 1
    notes = [] if val_name else [f"{spec} has no validation split: {counts['val']:,} of its {sum(counts.values()):,} "
                                 f"training documents (the rows whose index hashes into {CARVED}%) are held out to score on"]
    return _from_splits(spec, parts, sum(counts.values()), notes=notes)


def load_corpus(data: str | None = None, hf_dataset: str | None = None) -> Corpus:
    if data and hf_dataset:
        raise ValueError("give either a local corpus (data) or a Hugging Face dataset (hf_dataset), not both")
    if hf_dataset:
        return hf_corpus(hf_dataset)
    if data:
        return local_corpus(data)
    return stdlib_corpus()


def batch_at(tokens: Tensor, step: int, *, batch_size: int, seq_len: int, seed: int) -> tuple[Tensor, Tensor]:
    """The training batch of a given step, ``(x, y)`` of shape ``(batch_size, seq_len)``: windows of
    ``seq_len + 1`` consecutive tokens, ``y`` the next token of each of ``x``'s. It depends only on
    ``(seed, step)``, so resuming is exact. The windows start uniformly at 0 … n − seq_len − 2 of the
    n tokens, so the split's last token is never a target; drawing that last start too would change
    every batch, and so every trained model, for one window in n."""
    if tokens.numel() < seq_len + 2:
        raise ValueError(f"training split has {tokens.numel():,} tokens; training on sequences of {seq_len:,} "
                         f"needs at least {seq_len + 2:,}")
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch_size,), generator=g)
    idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
    chunk = tokens[idx].long()
    return chunk[:, :-1], chunk[:, 1:]
