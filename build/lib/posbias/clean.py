"""The results in a folder that the installed posbias would never reuse (``posbias clean``).

Every result is kept under a key that hashes everything that made it (:mod:`posbias.store`), so a
re-run after an upgrade, or under another torch, computes afresh in a folder or file of its own, and
the old result stays beside it, unused and never read again. :func:`find` lists those, each with the
reason and its size on disk; :func:`remove` deletes them. What is judged, and by what:

* a study's model folder (``models/<label>-seed<N>-<key>/``): the model code and torch version its
  ``key.json`` records, against the installed ones; its checkpoints and evaluations go with it;
* a study's evaluation (``eval-<key>.json`` in a model folder that stays): its evaluation code, the
  evaluation format (:data:`posbias.study.EVAL_FORMAT`) and torch;
* a diagnosis's or retrofit's cache (``cache-<key>.json``): the job code and torch version its
  :data:`~posbias.store.MADE_BY` entry records (:func:`~posbias.store.made_by`). A cache without that
  entry was written before caches recorded it: its key names older code, so no run reuses it. The
  models its run made beside it (``models/<name>-<key>/``: passkey copies, fine-tuned models) go with it;
* any of these whose record names the device ``cpu`` alone: keys have named the processor since
  :func:`~posbias.store.device_key` did, so no run reuses it;
* what interrupted writes leave: ``<file>.<pid>.tmp`` files, ``<checkpoint>.tmp`` folders, and a
  ``<checkpoint>.old`` folder beside its complete checkpoint.

Results made with other settings, seeds, thread counts or devices are not stale: a run with those
settings reuses them. Reports (``results.md``, ``report.md``, plots) are never deleted; :func:`find`
names those made from results it lists, so that the user knows which to re-run. Every folder under
the root where a run keeps its lock (``.posbias.lock``), and any such folder above it, is locked for
the whole call (:func:`locked`): a folder below the root where a run works is passed over, and one at
or above it refuses the call (:class:`~posbias.store.FolderBusy`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from . import store
from .checkpoint import CONFIG_FILE
from .study import EVAL_FORMAT

__all__ = ["Stale", "Findings", "Locked", "find", "remove", "locked"]

_KEY = re.compile(r"-([0-9a-f]{10})$")  # a keyed folder's name ends with its key (store.config_key)
_TMP_FILE = re.compile(r"\.\d+\.tmp$")  # store.write_text's temporary file


@dataclass
class Stale:
    path: Path
    what: str  # "trained model", "evaluation", "diagnose cache", "model of a stale cache", "unfinished write", …
    why: str
    size: int  # bytes on disk


@dataclass
class Findings:
    root: Path
    stale: list[Stale] = field(default_factory=list)
    reports: list[tuple[Path, str]] = field(default_factory=list)  # a report made from stale results (its .md), and why
    checked: int = 0  # keyed results judged (model folders, evaluations, caches)

    @property
    def size(self) -> int:
        return sum(s.size for s in self.stale)


def _against(made: dict[str, Any], job: str) -> str | None:
    """Why a result ``made`` as recorded is one the installed posbias would not reuse, or None."""
    now = store.made_by(job)
    if made.get("device") == "cpu":
        return "its key names no processor (made before keys named the CPU): no run reuses it"
    if made.get("code") != now["code"]:
        return f"made by other posbias code ({job} code {made.get('code')}, installed {now['code']})"
    if made.get("torch") != now["torch"]:
        return f"made with torch {made.get('torch')} (installed {now['torch']})"
    return None


def _read(path: Path) -> Any:
    try:
        return store.read_json(path)
    except (ValueError, OSError):
        return None


def model_why(folder: Path) -> str | None:
    """Why the model folder ``folder`` (a study's or retrofit's, with its ``key.json``) is one the
    installed posbias would never reuse, or None."""
    key = _read(folder / "key.json")
    if not isinstance(key, dict):
        return "its key.json cannot be read"
    return _against(key, "model")


def _eval_why(path: Path) -> str | None:
    data = _read(path)
    key = data.get("key") if isinstance(data, dict) else None
    if not isinstance(key, dict):
        return "it cannot be read"
    if key.get("format") != EVAL_FORMAT:
        return f"evaluation format {key.get('format')} (installed {EVAL_FORMAT})"
    return _against({"code": key.get("code"), "torch": (key.get("model_key") or {}).get("torch")}, "evaluation")


def _cache_why(path: Path) -> tuple[str | None, str]:
    """Why a cache is stale (or None), and what it is (``diagnose cache``, …; ``cache`` without a record)."""
    data = _read(path)
    if not isinstance(data, dict):
        return "it cannot be read", "cache"
    made = data.get(store.MADE_BY)
    if not isinstance(made, dict) or made.get("job") not in store.JOB_CODE:
        return "written before caches recorded their code: made by an older posbias", "cache"
    return _against(made, made["job"]), f"{made['job']} cache"


def _leftover(path: Path) -> bool:
    """A write that an interruption left unfinished (only ever judged under the folders' locks)."""
    if path.is_file():
        return bool(_TMP_FILE.search(path.name))
    if path.name.endswith(".tmp"):
        return True
    return path.name.endswith(".old") and (path.with_name(path.name[:-4]) / CONFIG_FILE).exists()


def _judge_folder(d: Path, found: Findings, names: list[str]) -> bool:
    """Judge the keyed results directly in ``d``; True where ``d`` itself is stale (not to be entered)."""
    if "key.json" in names and (d.parent.name == "models"):
        found.checked += 1
        why = model_why(d)
        if why:
            found.stale.append(Stale(d, "trained model", why, store.disk_size(d)))
            return True
        for f in sorted(d.glob("eval-*.json")):
            found.checked += 1
            if why := _eval_why(f):
                found.stale.append(Stale(f, "evaluation", why, store.disk_size(f)))
    stale_keys = {}
    for f in sorted(d.glob("cache-*.json")):
        found.checked += 1
        why, what = _cache_why(f)
        if why:
            found.stale.append(Stale(f, what, why, store.disk_size(f)))
            stale_keys[f.name[len("cache-"):-len(".json")]] = f.name
    for m in sorted((d / "models").iterdir()) if stale_keys and (d / "models").is_dir() else []:
        key = _KEY.search(m.name)
        if key and key.group(1) in stale_keys and not (m / "key.json").exists():
            why = f"made beside {stale_keys[key.group(1)]}"
            found.stale.append(Stale(m, "model of a stale cache", why, store.disk_size(m)))
    return False


def _judge_reports(found: Findings, skip: set[Path]) -> None:
    """The reports made from results listed (or gone): a study's ``results.json`` by the model folders
    its records name; a diagnosis's ``diagnose.json`` and a retrofit's ``results.json`` by their cache;
    a comparison of diagnoses by its models' reports (:func:`_judge_comparisons`)."""
    gone = {s.path.resolve() for s in found.stale}
    comparisons = []
    for f in sorted(found.root.rglob("*.json")):
        if (f.name not in ("results.json", "diagnose.json", "comparison.json")
                or any(p in gone for p in f.resolve().parents) or any(p in skip for p in f.parents)):
            continue
        if f.name == "comparison.json":  # judged by its models' reports, once those are judged
            comparisons.append(f)
            continue
        data = _read(f)
        if not isinstance(data, dict):
            continue
        why = None
        if isinstance(data.get("records"), list):  # a study
            models = {Path(r["model_dir"]).name for r in data["records"] if isinstance(r, dict) and "model_dir" in r}
            bad = sorted(m for m in models if not _fresh_model(f.parent / "models" / m, gone))
            if bad:
                why = (f"{len(bad)} of its {len(models)} models' results are stale or gone ({store.listed(bad)}): "
                       "re-run the study to refresh it")
        elif "rows" in data or f.name == "diagnose.json":  # a retrofit, a diagnosis
            cache = data.get("cache")
            if not isinstance(cache, str):
                why = "written before reports named their cache: by an older posbias; re-run the command to refresh it"
            elif (f.parent / cache).resolve() in gone or not (f.parent / cache).exists():
                why = f"made from {cache}, which is stale or gone: re-run the command to refresh it"
        if why:
            shown = f.with_name("report.md" if f.name == "diagnose.json" else "results.md")
            found.reports.append((shown if shown.exists() else f, why))
    _judge_comparisons(found, comparisons)


def _judge_comparisons(found: Findings, comparisons: list[Path]) -> None:
    """Diagnoses of several models (``comparison.json`` files) by their models' own reports beside
    them (``<model>/diagnose.json``): each named when one of those is named, or gone."""
    named = {p.parent.resolve() for p, _ in found.reports}
    for f in comparisons:
        data = _read(f)
        rows = data.get("rows") if isinstance(data, dict) else None
        if not isinstance(rows, list):
            continue
        models = [r["model"] for r in rows if isinstance(r, dict) and isinstance(r.get("model"), str)]
        bad = [m for m in models if (f.parent / m).resolve() in named or not (f.parent / m / "diagnose.json").exists()]
        if bad:
            shown = f.with_name("comparison.md")
            found.reports.append((shown if shown.exists() else f, f"{len(bad)} of its {len(models)} models' reports "
                                  f"are stale or gone ({store.listed(bad)}): re-run "
                                  "the diagnosis to refresh it"))


def _fresh_model(folder: Path, gone: set[Path]) -> bool:
    """A study model folder that stays, with at least one evaluation that stays."""
    if not folder.is_dir() or folder.resolve() in gone:
        return False
    return any(e.resolve() not in gone for e in folder.glob("eval-*.json"))


def _lock_folders(root: Path) -> list[Path]:
    """Every folder where a run keeps its lock: under ``root``, and ``root`` or any folder above it."""
    below = {p.parent for p in root.rglob(store.LOCK_FILE)}
    above = {p for p in (root, *root.parents) if (p / store.LOCK_FILE).exists()}
    return sorted(below | above)


@dataclass
class Locked:
    """The folders :func:`locked` holds under a root, and those it passed over because a run works there."""

    root: Path
    busy: dict[Path, str] = field(default_factory=dict)  # folder → who holds it


@contextlib.contextmanager
def locked(root: str | Path) -> Iterator[Locked]:
    """Hold, for the ``with`` block, every run lock of ``root`` (:func:`_lock_folders`) exclusively. A
    folder below ``root`` that a run holds is passed over (listed in ``busy``; :func:`find` leaves it
    alone); one at or above ``root`` refuses the whole call (:class:`~posbias.store.FolderBusy`).
    ValueError where ``root`` is not a folder."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{str(root)!r} is not a folder" + ("" if root.exists() else " (it does not exist)"))
    held = Locked(root)
    with contextlib.ExitStack() as stack:
        for folder in _lock_folders(root):
            if any(b in folder.parents for b in held.busy):
                continue
            try:
                stack.enter_context(store.FolderLock(folder))
            except store.FolderBusy:
                if folder == root or folder in root.parents:
                    raise store.FolderBusy(f"{str(folder)!r} is in use by {store.lock_holder(folder)}; nothing was listed or "
                                           "removed: wait for it to finish") from None
                held.busy[folder] = store.lock_holder(folder)
        yield held


def find(root: str | Path, *, skip: Iterable[Path] = ()) -> Findings:
    """What under ``root`` the installed posbias would never reuse (the module's list), and the reports
    made from it, leaving the folders in ``skip`` alone (those :func:`locked` found busy). Call it under
    :func:`locked` when the findings will be removed."""
    found, skip, marked = Findings(Path(root)), {Path(p) for p in skip}, set()
    for dirpath, dirnames, filenames in os.walk(found.root):
        d, names = Path(dirpath), sorted(dirnames + filenames)
        before = len(found.stale)
        if d in skip or _judge_folder(d, found, names):
            dirnames[:] = []
            continue
        marked.update(s.path for s in found.stale[before:])
        for q in (d / name for name in names):
            if q not in marked and q not in skip and _leftover(q):
                found.stale.append(Stale(q, "unfinished write", "left by an interrupted write", store.disk_size(q)))
                marked.add(q)
        dirnames[:] = sorted(n for n in dirnames if d / n not in marked)
    _judge_reports(found, skip)
    return found


def remove(found: Findings) -> int:
    """Delete every stale item of ``found``; the bytes freed."""
    freed = 0
    for s in found.stale:
        if s.path.is_dir():
            shutil.rmtree(s.path)
        elif s.path.exists():
            s.path.unlink()
        freed += s.size
    return freed
