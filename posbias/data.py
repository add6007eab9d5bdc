"""Byte-level corpora: the embedded default (this interpreter's standard library source), a local
file or folder (hidden and binary files passed over, and named), or a Hugging Face dataset (its own
splits, or validation held out of its training documents). Split by file into train/validation/test,
deterministic, with a fingerprint (files, bytes, hash) recorded in every result."""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

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


def _from_documents(name: str, docs: list[tuple[str, bytes]], *, notes: list[str] = ()) -> Corpus:
    if not docs or sum(len(b) for _, b in docs) == 0:
        raise ValueError(f"corpus {name!r} is empty: no readable text found" + "".join(f"; {n}" for n in notes))
    digest = hashlib.sha256()
    parts: dict[str, list[bytes]] = {s: [] for s in SPLITS}
    if len(docs) >= 20:
        for key, body in docs:
            parts[_split_of(key)].append(body + b"\n")
    else:  # too few documents to split by file: split the concatenation 90/5/5 by bytes
        whole = b"\n".join(b for _, b in docs)
        a, c = int(len(whole) * 0.90), int(len(whole) * 0.95)
        parts = {"train": [whole[:a]], "val": [whole[a:c]], "test": [whole[c:]]}
    for key, body in docs:
        digest.update(key.encode() + b"\0" + body)
    for s in SPLITS:
        size = sum(len(b) for b in parts[s])
        if size < 2:
            raise ValueError(f"corpus {name!r} has too little text for a {s} split ({size} bytes); "
                             "give more text")
    tensors = {s: torch.frombuffer(bytearray(b"".join(parts[s])), dtype=torch.uint8) for s in SPLITS}
    fp = {
        "name": name,
        "files": len(docs),
        "bytes": sum(len(b) for _, b in docs),
        "sha256": digest.hexdigest()[:16],
        **{f"{s}_bytes": int(t.numel()) for s, t in tensors.items()},
    }
    return Corpus(name=name, fingerprint=fp, notes=tuple(notes), **tensors)


def _from_splits(name: str, parts: dict[str, list[bytes]], *, notes: list[str] = ()) -> Corpus:
    """A corpus whose train and val documents come split already (a dataset's own splits); no test text.
    Its ``sha256`` covers each split's bytes and length, so the same documents split otherwise differ."""
    digest = hashlib.sha256()
    tensors = {"test": torch.zeros(0, dtype=torch.uint8)}
    for s in ("train", "val"):
        body = b"\n".join(parts[s])
        if len(body) < 2:
            raise ValueError(f"corpus {name!r} has too little text for a {s} split ({len(body)} bytes); give more text")
        digest.update(f"{s}:{len(body)}:".encode() + body)
        tensors[s] = torch.frombuffer(bytearray(body), dtype=torch.uint8)
    fp = {"name": name, "documents": sum(len(d) for d in parts.values()),
          "bytes": sum(int(t.numel()) for t in tensors.values()), "sha256": digest.hexdigest()[:16],
          **{f"{s}_bytes": int(t.numel()) for s, t in tensors.items()}}
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
        docs.append((rel.as_posix(), path.read_bytes()))
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
        body = p.read_bytes()
        notes = [f"{p.name} looks binary (a NUL byte in its first {BINARY_PROBE:,} bytes): read as given, "
                 "byte by byte"] if looks_binary(body) else []
        return _from_documents(str(p), [(p.name, body)] if body else [], notes=notes)
    files, skipped = _text_files(p)
    docs, binary = [], []
    for f in files:
        body, rel = f.read_bytes(), f.relative_to(p).as_posix()
        if looks_binary(body):
            binary.append(rel)
        elif body:
            docs.append((rel, body))
    skipped["binary"] = binary
    return _from_documents(str(p), docs, notes=[_skipped_note(skipped)] if any(skipped.values()) else [])


def _skipped_note(skipped: dict[str, list[str]]) -> str:
    """One line on the files a folder's corpus passed over, a few named of each kind."""
    kinds = {"hidden": ("hidden file or folder", "hidden files and folders", "a name starting with '.'"),
             "binary": ("binary file", "binary files", f"a NUL byte in the first {BINARY_PROBE:,} bytes")}
    parts = []
    for kind, paths in skipped.items():
        if paths:
            one, many, why = kinds[kind]
            named = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
            parts.append(f"{len(paths)} {one if len(paths) == 1 else many} ({why}): {named}")
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


def _hf_texts(split, spec: str, column: str) -> list[bytes]:
    """The documents of one split of a dataset: the column's strings, encoded, empty ones left out."""
    names = list(getattr(split, "column_names", None) or [])
    if column not in names:
        raise ValueError(f"--hf-dataset {spec!r}: the dataset has no column {column!r}; its columns: "
                         f"{', '.join(names) or 'none'} (choose one as NAME[:CONFIG]#COLUMN)")
    docs = []
    for text in split[column]:
        if text is not None and not isinstance(text, str):
            raise ValueError(f"--hf-dataset {spec!r}: column {column!r} holds {type(text).__name__}, not text "
                             f"(choose a text column as NAME[:CONFIG]#COLUMN)")
        if text:
            docs.append(text.encode())
    return docs


def hf_corpus(spec: str) -> Corpus:
    """``NAME[:CONFIG][#COLUMN]`` of a Hugging Face dataset (needs the datasets extra; ``datasets`` may
    download it, posbias itself downloads nothing): the ``text`` column unless another is named, its
    ``train`` split for training and its validation split (named validation, valid, val or dev) for
    scoring. Without one, :data:`CARVED` % of the training documents, picked by a hash of their index,
    are held out as validation, and :attr:`Corpus.notes` says so. A test split is not used."""
    name, config, column = _hf_spec(spec)
    try:
        import datasets
    except ImportError:
        raise ValueError("Hugging Face datasets need the optional extra: pip install 'posbias[datasets]'") from None
    ds = datasets.load_dataset(name, config)
    if "train" not in ds:
        raise ValueError(f"--hf-dataset {spec!r} has no train split (its splits: {', '.join(ds) or 'none'})")
    train = _hf_texts(ds["train"], spec, column)
    val_name = next((v for v in VAL_NAMES if v in ds), None)
    notes = []
    if val_name is not None:
        val = _hf_texts(ds[val_name], spec, column)
    else:
        held = [_percent(str(i)) < CARVED for i in range(len(train))]
        val = [d for d, h in zip(train, held) if h]
        train = [d for d, h in zip(train, held) if not h]
        notes.append(f"{spec} has no validation split: {len(val):,} of its {len(train) + len(val):,} training "
                     f"documents (those whose index hashes into {CARVED}%) are held out to score on")
    return _from_splits(spec, {"train": train, "val": val}, notes=notes)


def load_corpus(data: str | None = None, hf_dataset: str | None = None) -> Corpus:
    if data and hf_dataset:
        raise ValueError("give either a local corpus (data) or a Hugging Face dataset (hf_dataset), not both")
    if hf_dataset:
        return hf_corpus(hf_dataset)
    if data:
        return local_corpus(data)
    return stdlib_corpus()


def batch_at(tokens: Tensor, step: int, *, batch_size: int, seq_len: int, seed: int) -> tuple[Tensor, Tensor]:
    """The training batch of a given step: depends only on (seed, step), so resuming is exact."""
    if tokens.numel() <= seq_len + 1:
        raise ValueError(f"training split has {tokens.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch_size,), generator=g)
    idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
    chunk = tokens[idx].long()
    return chunk[:, :-1], chunk[:, 1:]
