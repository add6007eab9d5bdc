"""Byte-level corpora: the embedded default (this interpreter's standard library source), a local
file or folder, or a Hugging Face dataset. Split by file into train/validation/test, deterministic,
with a fingerprint (files, bytes, hash) recorded in every result."""

from __future__ import annotations

import hashlib
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

    def split(self, name: str) -> Tensor:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return getattr(self, name)


def _split_of(key: str) -> str:
    """Deterministic 90/5/5 split by a hash of the file's relative path."""
    h = int(hashlib.sha1(key.encode()).hexdigest(), 16) % 100
    return "train" if h < 90 else ("val" if h < 95 else "test")


def _from_documents(name: str, docs: list[tuple[str, bytes]]) -> Corpus:
    if not docs or sum(len(b) for _, b in docs) == 0:
        raise ValueError(f"corpus {name!r} is empty: no readable text found")
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
    return Corpus(name=name, fingerprint=fp, **tensors)


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


def local_corpus(path: str | Path) -> Corpus:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data path {str(p)!r} does not exist")
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    docs = [(f.relative_to(p).as_posix() if p.is_dir() else f.name, f.read_bytes()) for f in files]
    return _from_documents(str(p), [(k, b) for k, b in docs if b])


def hf_corpus(spec: str) -> Corpus:  # pragma: no cover - needs the network
    """``name[:config]`` of a Hugging Face dataset with a ``text`` column (needs the datasets extra)."""
    try:
        import datasets
    except ImportError:
        raise ValueError("Hugging Face datasets need the optional extra: pip install 'posbias[datasets]'") from None
    name, _, config = spec.partition(":")
    ds = datasets.load_dataset(name, config or None)
    docs = []
    for split, ours in (("train", "train"), ("validation", "val"), ("test", "test")):
        if split in ds:
            text = "\n".join(ds[split]["text"]).encode()
            docs.append((ours, text))
    by = dict(docs)
    if set(by) != set(SPLITS):
        raise ValueError(f"dataset {spec!r} lacks a train/validation/test split")
    digest = hashlib.sha256(b"".join(by[s] for s in SPLITS)).hexdigest()[:16]
    tensors = {s: torch.frombuffer(bytearray(by[s]), dtype=torch.uint8) for s in SPLITS}
    fp = {"name": spec, "files": 3, "bytes": sum(len(b) for b in by.values()), "sha256": digest,
          **{f"{s}_bytes": int(t.numel()) for s, t in tensors.items()}}
    return Corpus(name=spec, fingerprint=fp, **tensors)


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
