"""The shape of the package: layers that only point down, short functions, and a scheme that is one
file plus one registry line."""

import ast
import importlib.util
from pathlib import Path

import pytest

import posbias
from posbias.cli import main
from posbias.schemes import SCHEMES, ToeplitzScheme

PKG = Path(posbias.__file__).parent
ROOT = PKG.parent

# Lower numbers sit lower. A module may import its own layer and any layer below it, never above.
LAYERS = {
    "_version": 0, "config": 0, "store": 0, "stopping": 0, "data": 0, "diagonals": 0, "positions": 0, "schemes": 0,
    "kernels": 1,
    "attention": 2, "testing": 2,
    "model": 3, "checkpoint": 3,
    "train": 4, "finetune": 4, "evaluate": 4, "passkey": 4, "study": 4, "retrofit": 4, "diagnose": 4,
    "plot": 4, "report": 4, "clean": 4,
    "integrations": 5,  # adapts other libraries: may import anything below the command line
    "cli": 6,
}
MAX_LINES = 60


def _layer(module: str) -> int:
    """The layer of ``posbias.x.y`` (by its first component below the package)."""
    parts = module.split(".")
    if parts == ["posbias"]:
        return 7  # the catalogue (__init__) imports everything; nothing inside the package imports it
    return LAYERS[parts[1]]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """(line, imported posbias module) for every import in the file, lazy ones included."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "posbias":
                    yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "posbias":
                continue
            for a in node.names:  # `from . import store` imports the module posbias.store
                sub = f"{target}.{a.name}"
                yield node.lineno, sub if _is_module(sub) else target


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def test_imports_only_point_down():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        here = _module_name(path)
        if here == "posbias":
            continue
        for line, target in _imports(path):
            if target == "posbias" or _layer(target) > _layer(here):
                bad.append(f"{path.relative_to(ROOT)}:{line} ({here}, layer {_layer(here)}) imports {target}")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_every_module_has_a_layer():
    for path in PKG.rglob("*.py"):
        _layer(_module_name(path))  # KeyError names a module the layer map does not know


def test_functions_are_short_or_say_why():
    long = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                doc = ast.get_docstring(node) or ""
                if n > MAX_LINES and "Long because" not in doc:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"functions over {MAX_LINES} lines without a stated reason:\n" + "\n".join(long)


def test_no_references_to_documents_outside_the_repository():
    for path in PKG.rglob("*.py"):
        text = path.read_text()
        assert "SPEC §" not in text and "case study" not in text, path


# -- a new scheme: one file + one registry line ---------------------------------------------------
class Toy(ToeplitzScheme):
    """A toy Toeplitz bias, ``−0.1 · |i − j|`` capped at ``cap``: what a new scheme file holds."""

    name = "toy"
    family = "additive"
    summary = "toy capped linear penalty"
    paper = "a test"

    def __init__(self, *, n_heads: int, head_dim: int, cap: int = 20) -> None:
        super().__init__(n_heads=n_heads, head_dim=head_dim)
        self.cap = cap

    @property
    def flat_beyond(self) -> int:
        return self.cap

    def bias_at(self, offset):
        return (-0.1 * offset.abs().clamp(max=self.cap).float()).expand(self.n_heads, *offset.shape)


@pytest.fixture()
def toy(monkeypatch):
    monkeypatch.setitem(SCHEMES, "toy", Toy)  # the one registry line
    return Toy


def test_a_new_scheme_is_listed_shown_and_plotted(toy, tmp_path, capsys):
    assert main(["list"]) == 0
    assert "toy" in capsys.readouterr().out
    assert main(["show", "toy", "--cap", "5", "--heads", "2"]) == 0
    out = capsys.readouterr().out
    assert "cap=5" in out and "bias by distance" in out
    pytest.importorskip("matplotlib")
    assert main(["plot", "--out", str(tmp_path), "--heads", "2", "--max-plot-distance", "32"]) == 0
    assert (tmp_path / "heatmap_toy.png").exists()


def test_a_new_scheme_is_benchmarked_and_studied(toy, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_attention", ROOT / "benchmarks" / "bench_attention.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert "toy" in bench.default_schemes()
    from posbias.study import StudyConfig, default_schemes

    assert "toy" in default_schemes() and "toy" in StudyConfig().schemes
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    argv = ["extrapolate", "--schemes", "toy", "--train-len", "16", "--eval-lens", "16", "32", "--steps", "2",
            "--batch-size", "2", "--d-model", "16", "--layers", "1", "--heads", "2", "--eval-tokens", "256",
            "--data", str(text), "--out", str(tmp_path / "run"), "--quiet"]
    assert main(argv) == 0
    assert "| toy |" in (tmp_path / "run" / "results.md").read_text()


@pytest.mark.parametrize("job, start", [("model", "posbias.train"), ("evaluation", "posbias.evaluate"),
                                        ("diagnose", "posbias.diagnose"), ("retrofit", "posbias.retrofit")])
def test_the_code_that_makes_a_result_is_in_its_key(job, start):
    """Every posbias module that a job reaches (``start`` and what it imports, transitively) is covered
    by ``store.JOB_CODE[job]``, whose fingerprint the job's keys carry (``model``: ``store.MODEL_CODE``)
    — except modules that compute no numbers (checkpoint files, the results store, the version): a
    module added to a job's path (retrofit scoring passkey cells with diagnose's counterfactual) cannot
    silently stay out of its keys."""
    from posbias import store

    covered = {f"posbias.{p[:-3]}" if p.endswith(".py") else f"posbias.{p}" for p in store.JOB_CODE[job]}
    no_numbers = {"posbias.checkpoint", "posbias.store", "posbias._version", "posbias.stopping"}
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = ROOT.joinpath(*name.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        todo += [target for _, target in _imports(path) if _is_module(target)]
    missing = sorted(m for m in seen if m not in no_numbers and not any(m == c or m.startswith(c + ".") for c in covered))
    assert not missing, f"modules on the {job} path outside store.JOB_CODE[{job!r}]: {missing}"
    assert {"posbias.kernels.toeplitz", "posbias.schemes.fire", "posbias.model"} <= seen  # the walk did walk
