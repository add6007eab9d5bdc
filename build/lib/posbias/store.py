"""The results store: atomic files, readable errors, keys, and one run per output folder.

* :func:`write_text` / :func:`write_json` (and every picture, through :func:`replacing`) write
  ``<name>.<pid>.tmp``, fsync it and rename it over the target, so a reader (or a crash) sees the old
  file or the new one, never half of one; a write that fails (a full disk) removes its temporary file.
* :func:`read_json` names the file when it is not valid JSON (a truncated cache is an error that
  says which file to delete, not a bare ``JSONDecodeError``).
* :func:`config_key` hashes everything that made a result (a canonical JSON dump): a result is
  reused only under the same key.
* :func:`code_fingerprint` hashes the code that computes a result (its syntax tree, without
  docstrings): results keys carry it, so a re-run under code whose numbers differ — a kernel whose
  rounding changed, say — trains and evaluates afresh instead of reusing the old code's results.
* :class:`FolderLock` takes an exclusive ``flock`` on ``<folder>/.posbias.lock`` for the whole run;
  a second run into the same folder refuses at once with a one-line error naming the holder. The
  kernel drops the lock when the process dies, so a killed run never leaves a stale lock. Studies
  take it shared: several ``posbias extrapolate`` runs may work in one folder together, each model
  made by one of them at a time under :func:`item_lock` (a retrofit or diagnosis there still
  refuses, and is refused).
* :func:`device_key` names a device in keys by what it is (``cpu (AMD EPYC family 25 model 17,
  AVX512)``, ``cuda (NVIDIA H100 …)``), not by its index, so runs on ``cuda:0`` and ``cuda:1`` share
  their results and runs on two kinds of processor, which round differently, do not.
"""

from __future__ import annotations

import ast
import contextlib
import errno
import functools
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

__all__ = ["folder_name", "replacing", "named", "fsync_dir", "write_text", "write_json", "read_json", "config_key", "code_fingerprint", "FolderLock", "check_out_dir",
           "FolderBusy", "LOCK_FILE", "lock_holder", "item_lock", "check_device", "device_key", "JOB_CODE", "made_by", "JobCache", "disk_size",
           "memory_text", "listed"]

try:
    import fcntl
except ImportError:  # Windows: no flock; the jobs that lock a folder say so in one line (_flock)
    fcntl = None  # type: ignore[assignment]

_PACKAGE = Path(__file__).resolve().parent
#: the code that makes a trained model: its architecture, every scheme and kernel, the data batches and
#: the training loop (what :func:`posbias.study.model_key` carries)
MODEL_CODE = ("model.py", "train.py", "data.py", "attention.py", "diagonals.py", "positions.py", "config.py", "schemes",
              "kernels")
#: the code behind each kind of result, in one place: what its key carries, and what ``posbias clean``
#: compares a result's recorded fingerprint with (:mod:`posbias.clean`)
JOB_CODE: dict[str, tuple[str, ...]] = {
    "model": MODEL_CODE,
    "evaluation": (*MODEL_CODE, "evaluate.py"),
    "diagnose": (*MODEL_CODE, "evaluate.py", "diagnose.py", "finetune.py", "passkey.py"),
    "retrofit": (*MODEL_CODE, "evaluate.py", "diagnose.py", "finetune.py", "passkey.py", "retrofit.py"),
}
#: the entry of a job's cache file that records what made it (:func:`made_by`)
MADE_BY = "_made_by"


def check_out_dir(path: str | Path) -> Path:
    """``path`` as an output folder: refuses a path that is a file or lies under a file."""
    p = Path(path)
    for q in (p, *p.parents):
        if q.exists() and not q.is_dir():
            raise ValueError(f"output folder {str(p)!r} cannot be created: {str(q)!r} is a file")
    return p


def folder_name(label: str) -> str:
    """``label`` (a scheme label such as ``fire@init_L=128``, a retrofit row such as ``pi/tuned``) as one
    path component: anything but letters, digits and ``-_.=`` becomes ``_``."""
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in label)


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary name beside ``path`` (``<name>.<pid>.tmp``, folders created) for the caller to write;
    once written, its bytes are made durable and it is renamed over ``path``. If the writing fails (a full
    disk: ``OSError``), the temporary file is removed and the error goes on: neither a truncated file
    nor a stray temporary is left, and ``path`` keeps what it held."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # a failed write(2) names no file: name the one that was not written
        tmp.unlink(missing_ok=True)
        raise named(exc, path) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_dir(path: str | Path) -> None:
    """Make ``path``'s entries (files created, renamed or removed in the folder) durable: a file's own
    fsync does not write the folder entry that names it. Where a folder cannot be opened or synced
    (Windows; a file system without it: ``EINVAL``), nothing is done: the rename stays atomic, only its
    durability across a power loss is the system's."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise named(exc, path) from exc
    finally:
        os.close(fd)


def named(exc: OSError, path: str | Path) -> OSError:
    """``exc`` as an error about ``path`` (its subclass kept: ``OSError(errno, …)`` picks it)."""
    return OSError(exc.errno, exc.strerror or str(exc), str(path))


def write_text(path: str | Path, text: str) -> Path:
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _finite(obj: Any, where: str = "") -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"refusing to write a non-finite number ({obj}) at {where or 'top level'}")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _finite(v, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _finite(v, f"{where}[{i}]")


def write_json(path: str | Path, obj: Any, *, indent: int | None = 1) -> Path:
    """Atomic JSON; NaN/inf anywhere is refused (a NaN perplexity is worse than no file)."""
    _finite(obj)
    return write_text(path, json.dumps(obj, indent=indent, allow_nan=False))


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON ({exc}); delete it to recompute") from None


def config_key(obj: Any, length: int = 10) -> str:
    """A short hash of a JSON-able object, independent of dict order."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@functools.lru_cache(maxsize=None)
def code_fingerprint(*parts: str) -> str:
    """A short hash of the code in ``parts`` (files or folders of the package, e.g. :data:`MODEL_CODE`):
    each module's syntax tree without its docstrings, so that comments and documentation can change
    and a result stays valid, while any change to what the code computes gives another key. Where the
    sources are missing (an install without them), the package version stands in."""
    digest = hashlib.sha256()
    for part in parts:
        path = _PACKAGE / part
        if not path.exists():
            if not any(_PACKAGE.rglob("*.py")):  # an install without sources
                from ._version import __version__
                return f"version-{__version__}"
            raise RuntimeError(f"code_fingerprint: {part!r} is not in {str(_PACKAGE)!r}; a renamed module must be "
                               "renamed in posbias.store.MODEL_CODE too")
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            tree = ast.parse(f.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                body = getattr(node, "body", None)
                if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                        and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                        and isinstance(body[0].value.value, str)):
                    node.body = body[1:] or [ast.Pass()]
            digest.update(f.relative_to(_PACKAGE).as_posix().encode() + b"\0" + ast.dump(tree).encode() + b"\0")
    return digest.hexdigest()[:12]


def disk_size(path: str | Path) -> int:
    """Bytes on disk of a file, or of every file under a folder (links not followed)."""
    path = Path(path)
    if not path.is_dir():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def made_by(job: str, device: str | None = None) -> dict[str, str]:
    """What a result of ``job`` (a key of :data:`JOB_CODE`) records about what made it: the job, the
    fingerprint of its code, torch's version and (given) the device as keys name it (:func:`device_key`).
    Its key hashes the same among its settings; this readable copy is how ``posbias clean`` tells a
    result the installed posbias would never reuse."""
    import torch

    made = {"job": job, "code": code_fingerprint(*JOB_CODE[job]), "torch": torch.__version__}
    return made if device is None else {**made, "device": device_key(device)}


class JobCache:
    """A job's measurements in one JSON file (``diagnose``'s and ``retrofit``'s ``cache-<key>.json``):
    ``data`` maps a measurement's name to its value; :meth:`put` writes the whole file atomically as
    soon as a measurement is made, so an interrupted run keeps what it measured. The file records
    :func:`made_by` under :data:`MADE_BY`. Without a file, it lives in memory only."""

    def __init__(self, file: Path | None, job: str, device: str) -> None:
        self.file = file
        self.data: dict[str, Any] = read_json(file) if file is not None and file.exists() else {}
        self.data[MADE_BY] = made_by(job, device)

    def put(self, name: str, value: Any) -> None:
        self.data[name] = value
        self.save()

    def save(self) -> None:
        if self.file is not None:
            write_json(self.file, self.data, indent=None)


@functools.lru_cache(maxsize=None)
def cpu_name(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The processor's model name, and on x86 its family and model numbers (``AMD EPYC family 25
    model 17``, from ``/proc/cpuinfo``; elsewhere what :mod:`platform` knows). A virtual machine may
    show a generic name ("AMD EPYC") for processors of several generations, whose math libraries can
    take different code paths; the family and model numbers tell the generations apart."""
    import platform

    fields: dict[str, str] = {}
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, sep, value = line.partition(":")
                if not sep:
                    if fields:
                        break  # the first processor's block is enough
                    continue
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown"
    if fields.get("cpu family") and fields.get("model"):
        name += f" family {fields['cpu family']} model {fields['model']}"
    return name


def cpu_kind() -> str:
    """This CPU as keys and benchmark headers name it: :func:`cpu_name` and the instruction set torch
    dispatches to (``AMD EPYC family 25 model 1, AVX2``)."""
    import torch

    return f"{cpu_name()}, {torch.backends.cpu.get_cpu_capability()}"


def check_device(device: str, name: str = "device") -> str:
    """``device`` if it is ``cpu``, ``cuda`` or ``cuda:N`` and exists on this machine; ValueError naming
    ``name`` (the setting: ``--device`` in the CLI) otherwise, before any work."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name} {device!r} is not a device; use cpu or cuda[:N]") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} {device!r}: posbias runs on cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} {device} asked for, but this machine has no CUDA device; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name} {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def free_memory(device: str) -> int | None:
    """Bytes of memory ``device`` has free now: ``MemAvailable`` for ``cpu`` (Linux), the free memory
    CUDA reports for ``cuda[:N]``; None where it cannot be read."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_text(n: float) -> str:
    """Bytes as a message gives them: ``512.0 MiB`` below 1 GiB (a GiB figure rounded 0.4 to 0 and a
    refusal read "needs about 0 GiB … more than the 0 GiB"), ``3.5 GiB`` above, three figures past 2^50."""
    return f"{n / 2**30:.3g} GiB" if n >= 2**50 else f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def listed(names: Iterable[Any], shown: int = 3) -> str:
    """Names as a message lists them: all of them up to ``shown + 1``, else the first ``shown`` and
    "and N more" (never "and 1 more": the one more is named). One form for every message that names
    a few of many: bad weights, stale models, skipped files, reports."""
    names = [str(n) for n in names]
    if len(names) <= shown + 1:
        return ", ".join(names)
    return f"{', '.join(names[:shown])} and {len(names) - shown} more"


def device_memory(device: str) -> int | None:
    """Bytes of memory ``device`` has in all: the machine's RAM for ``cpu``, the GPU's for ``cuda[:N]``;
    None where it cannot be read."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def device_key(device: str) -> str:
    """``device`` as results keys name it: what it is, without an index. Results round differently on
    another processor (the math libraries pick their code by CPU and instruction set; docs/study.md, "Keyed
    results", measures it), so a CPU is named by its model (:func:`cpu_name`) and the instruction set
    torch dispatches to (``cpu (AMD EPYC family 25 model 17, AVX512)``), and a GPU by its model
    (``cuda (NVIDIA H100 …)``): runs on ``cuda:0`` and ``cuda:1`` share their results, runs on two
    kinds of processor do not. Two CPUs that share a name, family, model and instruction set are taken
    to be the same."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    if dev.type == "cpu":
        return f"cpu ({cpu_kind()})"
    return dev.type


# flock's operations (fcntl's values; the same on Linux and macOS, and unused where fcntl is missing)
LOCK_SH, LOCK_EX, LOCK_NB, LOCK_UN = (fcntl.LOCK_SH, fcntl.LOCK_EX, fcntl.LOCK_NB, fcntl.LOCK_UN) if fcntl else (1, 2, 4, 8)


def _flock(fh: Any, op: int) -> None:
    """``flock(2)`` on the open file ``fh``; where the system has none (Windows), an OSError naming the
    file and what posbias needs, which the command line says in one line (``import posbias`` and the
    library's checkpoints need no lock and work there)."""
    if fcntl is None:
        raise OSError(errno.ENOTSUP, "posbias shares and resumes its output folders under POSIX file locks "
                                     "(flock), which this system lacks: run the command on Linux or macOS "
                                     "(on Windows, in WSL)", str(fh.name))
    fcntl.flock(fh.fileno(), op)


@contextlib.contextmanager
def item_lock(path: str | Path, *, wait: bool) -> Iterator[bool]:
    """An exclusive ``flock`` on the file ``path`` (created, never removed: removing a lock file races
    with its next taker) for the ``with`` block; yields whether it is held. ``wait=False`` yields False
    at once while another process holds it; ``wait=True`` blocks until it is free. The kernel drops it
    when its process dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            _flock(fh, LOCK_EX | (0 if wait else LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            _flock(fh, LOCK_UN)


#: the file in an output folder that its run locks and names itself in (:class:`FolderLock`)
LOCK_FILE = ".posbias.lock"


def lock_holder(folder: str | Path) -> str:
    """The run a folder's lock file names (``posbias pid 123``), or "another process" where it names none
    or cannot be read: what a refused run says it waits for."""
    try:
        return (Path(folder) / LOCK_FILE).read_text().strip() or "another process"
    except OSError:
        return "another process"


class FolderBusy(ValueError):
    """Another run holds the output folder."""


_HELD: dict[Path, int] = {}  # folders this process holds, with the nesting depth


class FolderLock:
    """``with FolderLock(out): ...`` — one posbias run per output folder at a time; ``shared=True``
    (studies) admits other shared holders and refuses only an exclusive one (and is refused by it).
    Re-entrant within a process (the command line holds it around a workflow's run and its report;
    the run takes it too)."""

    def __init__(self, folder: str | Path, *, shared: bool = False) -> None:
        self.folder = check_out_dir(folder)
        self.shared = shared
        self._fh: Any = None
        self._nested = False
        self._created = False

    def __enter__(self) -> "FolderLock":
        key = self.folder.resolve()
        if _HELD.get(key):
            _HELD[key] += 1
            self._nested = True
            return self
        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_FILE
        fh = open(path, "a+")
        try:
            _flock(fh, (LOCK_SH if self.shared else LOCK_EX) | LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise FolderBusy(f"output folder {str(self.folder)!r} is in use by {lock_holder(self.folder)}; wait for it "
                             "to finish or choose another output folder") from None
        except OSError:  # no file locks here (_flock): leave no folder behind either
            fh.close()
            if self._created:
                path.unlink(missing_ok=True)
                self.folder.rmdir()
            raise
        fh.seek(0)
        fh.truncate()
        fh.write(f"posbias pid {os.getpid()}" + (" (a study: other studies may work there with it)" if self.shared
                                                  else ""))
        fh.flush()
        self._fh = fh
        _HELD[key] = 1
        return self

    def _alone(self) -> bool:
        """Whether no other process holds the lock (a shared one may have company: then the lock file
        stays for them)."""
        if not self.shared:
            return True
        try:
            _flock(self._fh, LOCK_EX | LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def __exit__(self, *exc: object) -> None:
        key = self.folder.resolve()
        if self._nested:
            _HELD[key] -= 1
            self._nested = False
            return
        _HELD.pop(key, None)
        if self._fh is not None:
            if (self._created and [p.name for p in self.folder.iterdir()] == [LOCK_FILE]
                    and self._alone()):
                # a run that stopped before writing anything (bad input found late) leaves no folder behind
                (self.folder / LOCK_FILE).unlink()
                try:
                    self.folder.rmdir()
                except OSError:
                    pass
            _flock(self._fh, LOCK_UN)
            self._fh.close()
            self._fh = None
