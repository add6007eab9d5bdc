"""Mutation testing: does the test suite fail when the code is wrong?

Each mutant is the module with one small change to its syntax tree: a comparison turned (``<`` ↔ ``<=``,
``==`` ↔ ``!=``, ``in`` ↔ ``not in``), an arithmetic operator swapped (``+`` ↔ ``-``, ``*`` ↔ ``/``), an
integer constant plus one, a float constant × 1.5, a boolean flipped, a unary minus or ``not`` dropped,
``and`` ↔ ``or``, ``min`` ↔ ``max`` (and ``floor`` ↔ ``ceil``, ``clamp_min`` ↔ ``clamp_max``). The tests
given run on each mutant (``pytest -x``, so a killed mutant costs the time to its first failure); a
mutant they pass *survived*: either a change no test can see (an equivalent mutant, e.g. ``<`` → ``<=``
where both sides agree at the boundary) or a behaviour no test pins down. Read each survivor and say
which.

The mutants run in a copy of the project's files (those git tracks or does not ignore, with uncommitted
changes), made in a temporary folder with ``PYTHONPATH`` pointing there, so the working tree is never touched, whatever
stops the run. Docstrings are not mutated.

    python tools/mutate.py posbias/schemes/kerple.py tests/test_golden.py tests/test_schemes.py
    python tools/mutate.py posbias/kernels/toeplitz.py tests/test_kernels.py --sample 20 --seed 1
    python tools/mutate.py posbias/schemes/t5.py tests/test_cli.py --only 49 125   # the mutants numbered so
    python tools/mutate.py posbias/schemes/fire.py tests/test_kernels.py -k piecewise
    python tools/mutate.py posbias/report/diagnose.py tests/test_retrofit.py --per-line
    python tools/mutate.py posbias/cli.py tests/test_cli.py --changed-since main --jobs 2   # what a change touched

``--changed-since REV`` takes only the mutants on the lines ``git diff REV`` shows added or changed in the
working tree (committed since REV or not): after a module's campaign, its later changes alone.
``--jobs N`` runs N mutants at a time, each in a copy of its own.

``--per-line`` runs each mutant against only the tests that execute its line: the unmutated run is
measured by coverage.py with one context per test, and a mutant of a line no test reaches in this
process (or reaches only at import or in a fixture), and a module-level statement or a ``def``'s header
(its defaults) wherever the module was first imported, runs every test given. For a module behind
end-to-end tests that is minutes saved a mutant: the tests that never reach a line cannot see it changed.

Prints one line per mutant and a summary (killed, survived, timed out), and ``--log FILE`` writes one
JSON record per mutant. Exit status 0 whatever survives: it is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SWAP_COMPARE = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
                ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
SWAP_BINARY = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
               ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult}
SWAP_CALL = {"min": "max", "max": "min", "minimum": "maximum", "maximum": "minimum", "amin": "amax", "amax": "amin",
             "clamp_min": "clamp_max", "clamp_max": "clamp_min", "floor": "ceil", "ceil": "floor"}


@dataclass(frozen=True)
class Mutant:
    index: int  # its place in the walk of the module's tree (stable for one version of the file)
    line: int
    what: str  # e.g. "Lt -> LtE"


def _changed(value: bool | int | float) -> bool | int | float:
    """A constant's mutant: a boolean flipped, an integer plus one, a float × 1.5 (0.0 → 1.0)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    return value * 1.5 if value else 1.0


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def _sites(tree: ast.AST) -> list[tuple[ast.AST, str, str]]:
    """``(node, kind, description)`` for every place a mutation applies, in ``ast.walk`` order."""
    skip = _docstrings(tree)
    sites = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sites += [(node, f"compare:{i}", f"{type(op).__name__} -> {SWAP_COMPARE[type(op)].__name__}")
                      for i, op in enumerate(node.ops) if type(op) in SWAP_COMPARE]
        elif isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in SWAP_BINARY:
            sites.append((node, "binary", f"{type(node.op).__name__} -> {SWAP_BINARY[type(node.op)].__name__}"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and id(node) not in skip:
            sites.append((node, "constant", f"{node.value} -> {_changed(node.value)}"))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
            sites.append((node, "drop", f"drop {type(node.op).__name__}"))
        elif isinstance(node, ast.BoolOp):
            sites.append((node, "boolop", f"{type(node.op).__name__} -> {'Or' if isinstance(node.op, ast.And) else 'And'}"))
        elif isinstance(node, ast.Call):
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if name in SWAP_CALL:
                sites.append((node, "call", f"{name} -> {SWAP_CALL[name]}"))
    return sites


class _Drop(ast.NodeTransformer):
    def __init__(self, target: ast.AST) -> None:
        self.target = target

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        self.generic_visit(node)
        return node.operand if node is self.target else node


def mutants(source: str) -> list[Mutant]:
    return [Mutant(i, getattr(node, "lineno", 0), what) for i, (node, _, what) in enumerate(_sites(ast.parse(source)))]


def mutated(source: str, index: int) -> str:
    """The module's source with mutation ``index`` applied (re-printed by ``ast.unparse``)."""
    tree = ast.parse(source)
    node, kind, _ = _sites(tree)[index]
    if kind.startswith("compare:"):
        i = int(kind.split(":")[1])
        node.ops[i] = SWAP_COMPARE[type(node.ops[i])]()
    elif kind == "binary":
        node.op = SWAP_BINARY[type(node.op)]()
    elif kind == "constant":
        node.value = _changed(node.value)
    elif kind == "drop":
        tree = _Drop(node).visit(tree)
    elif kind == "boolop":
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    elif kind == "call":
        if isinstance(node.func, ast.Name):
            node.func.id = SWAP_CALL[node.func.id]
        else:
            node.func.attr = SWAP_CALL[node.func.attr]
    return ast.unparse(ast.fix_missing_locations(tree))


def project_files(root: Path = ROOT) -> list[str]:
    """The files a mutant's copy of the project holds: those git tracks and those it does not ignore
    (a test file not yet added runs too; before, it was left out and "no tests ran")."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout
    return sorted({f.decode() for f in out.split(b"\0") if f})


def changed_lines(module: str, rev: str, root: Path = ROOT) -> set[int]:
    """The lines of ``module`` in the working tree that ``git diff REV`` shows added or changed (hunks of
    new lines; a pure deletion leaves no line to mutate). A revision git does not know is a
    ``ValueError`` with git's own words."""
    got = subprocess.run(["git", "diff", "-U0", "--no-color", rev, "--", module], cwd=root, capture_output=True, text=True)
    if got.returncode:
        raise ValueError(f"git diff {rev}: {got.stderr.strip().splitlines()[0] if got.stderr.strip() else 'failed'}")
    lines: set[int] = set()
    for start, count in re.findall(r"^@@ -\S+ \+(\d+)(?:,(\d+))? @@", got.stdout, re.M):
        lines.update(range(int(start), int(start) + (1 if count == "" else int(count))))
    return lines


def _copy_project(into: Path) -> None:
    for name in project_files():
        src = ROOT / name
        if src.is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, into / name)


# The test runs going on, and whether the tool is stopping (Ctrl-C, `kill`, an error): then each run
# is killed and none starts, under one lock so that no run starts between the two
RUNNING: set[subprocess.Popen] = set()
STOPPING = threading.Event()
_LOCK = threading.Lock()


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float) -> tuple[str, str]:
    with _LOCK:
        if STOPPING.is_set():
            return "stopped", ""
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        RUNNING.add(proc)
    with proc:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return "timeout", ""
        except BaseException:  # the tool stops (Ctrl-C, `kill`) during a run in its main thread, the unmutated
            proc.kill()  # one: leaving `with proc` would wait for the run to end
            raise
        finally:
            RUNNING.discard(proc)
    last = out.strip().splitlines()[-1] if out.strip() else ""
    return ("survived" if proc.returncode == 0 else "killed"), last


def pytest_command(tests: list[str], keyword: str | None = None, *, slow: bool = False) -> list[str]:
    """The pytest run on each mutant: stop at the first failure; without ``slow``, leave out the tests
    marked slow; ``keyword``: pytest's ``-k``."""
    return [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *([] if slow else ["-m", "not slow"]),
            *tests, *(["-k", keyword] if keyword else [])]


def statement_starts(source: str) -> dict[int, int]:
    """Each line of ``source`` → the first line of the innermost statement holding it (coverage.py
    reports a statement of several lines at its first)."""
    starts: dict[int, int] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.stmt):
            for line in range(node.lineno, (node.end_lineno or node.lineno) + 1):
                if starts.get(line, 0) <= node.lineno:
                    starts[line] = node.lineno
    return starts


def run_at_import(source: str) -> set[int]:
    """The lines of ``source`` outside every function body: module and class statements, and a ``def``'s
    header (its decorators and default values), all run when the module is imported. coverage.py gives
    such a line the context of the test that first imported the module, which is every test's concern:
    a module imported inside a test (``from posbias.plot import ...``) would otherwise send a changed
    default or module constant to that one test alone."""
    lines = set(range(1, len(source.splitlines()) + 1))
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.body[0].lineno > node.lineno:
            lines -= set(range(node.body[0].lineno, (node.end_lineno or node.lineno) + 1))
    return lines


def tests_by_line(contexts: dict[int, list[str]], node_ids: list[str]) -> dict[int, list[str]]:
    """coverage.py's ``test_function`` contexts of each line (``test_mod.test_f``, ``test_mod.Class.test_f``;
    ``""`` for code run at import or in a fixture) as the pytest node ids they name among ``node_ids``
    (every parametrisation of a test); a line with the empty context maps to every node id."""
    named: dict[str, list[str]] = {}  # context → its node ids: ``tests/test_mod.py::Class::test_f[p]`` → test_mod.Class.test_f
    for n in node_ids:
        path, *name = n.split("[")[0].split("::")
        named.setdefault(".".join([Path(path).stem, *name]), []).append(n)
    return {line: (list(node_ids) if "" in found else sorted({n for c in found for n in named.get(c, [])}))
            for line, found in contexts.items()}


def _covered(cmd: list[str], work: Path, env: dict, target: Path) -> tuple[str, str, list[str], dict[int, list[str]]]:
    """The unmutated run under coverage.py, one context per test: its status and last line, the node
    ids it collected, and the tests that ran each line of ``target`` (:func:`tests_by_line`)."""
    from coverage import CoverageData

    args = cmd[cmd.index("pytest") + 1:]
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", *args], cwd=work, env=env,
                               capture_output=True, text=True).stdout  # args hold one -q: a node id a line
    node_ids = [line for line in collected.splitlines() if "::" in line]
    if not node_ids:
        raise SystemExit(f"mutate.py: the tests given collect nothing to run:\n{collected}")
    rc = work / ".mutate-coveragerc"
    rc.write_text(f"[run]\ndynamic_context = test_function\ninclude = {target}\ndata_file = {work / '.mutate-coverage'}\n")
    status, last = _run([sys.executable, "-m", "coverage", "run", f"--rcfile={rc}", "-m", "pytest", *args], work, env,
                        3600)
    data = CoverageData(basename=str(work / ".mutate-coverage"))
    data.read()
    measured = next((f for f in data.measured_files() if Path(f).resolve() == target.resolve()), None)
    contexts = {} if measured is None else data.contexts_by_lineno(measured)
    return status, last, node_ids, tests_by_line(contexts, node_ids)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("module", help="the file to mutate, relative to the project root (e.g. posbias/schemes/t5.py)")
    p.add_argument("tests", nargs="+", help="test files or node ids pytest runs on each mutant")
    p.add_argument("-k", dest="keyword", help="pytest's -k: only the tests this expression selects")
    p.add_argument("--sample", type=int, default=0, help="mutants drawn at random (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    p.add_argument("--only", type=int, nargs="+", help="the mutants of these numbers (as printed) alone")
    p.add_argument("--timeout", type=float, default=0, help="seconds per mutant (default: 3 × the unmutated run)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the test runs (default 1)")
    p.add_argument("--log", help="append one JSON record per mutant to this file")
    p.add_argument("--slow", action="store_true",
                   help="run the tests marked slow too (end-to-end runs; left out by default, so a mutant only they "
                        "catch reads as a survivor)")
    p.add_argument("--per-line", action="store_true",
                   help="run each mutant against only the tests that execute its line (the unmutated run measured "
                        "by coverage.py); a line no test reaches in this process runs them all")
    p.add_argument("--changed-since", metavar="REV",
                   help="only the mutants on lines `git diff REV` shows added or changed (committed or not)")
    p.add_argument("--jobs", type=int, default=1, help="mutants run at a time, each in its own copy (default 1)")
    p.add_argument("--list", action="store_true", help="print the mutants and exit")
    args = p.parse_args(argv)
    STOPPING.clear()
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `… --list | head` ends quietly
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill`: the copy is removed, as on Ctrl-C

    if args.per_line and importlib.util.find_spec("coverage") is None:
        p.error("--per-line needs coverage.py (pip install coverage; the project's test extra has it)")
    module = Path(args.module)
    if not (ROOT / module).is_file() or module.suffix != ".py":
        p.error(f"{args.module!r} is not a Python file of the project")
    source = (ROOT / module).read_text()
    every = mutants(source)
    if not every:
        p.error(f"{args.module} has no place a mutation applies")
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: give 1 or more")
    if args.log:  # refused now, not after the first mutant has run
        try:
            open(args.log, "a").close()
        except OSError as e:
            p.error(f"--log {args.log}: {e.strerror}")
    if args.only and args.changed_since:
        p.error("--only and --changed-since choose the mutants two ways: give one")
    candidates = every
    if args.changed_since:
        try:
            changed = changed_lines(args.module, args.changed_since)
        except ValueError as e:
            p.error(str(e))
        candidates = [m for m in every if m.line in changed]
        if not candidates:
            print(f"{module}: no mutation site on the {len(changed)} lines changed since {args.changed_since}")
            return 0
    if args.list:
        for m in candidates:
            print(f"{m.index:4d}  line {m.line:4d}  {m.what}")
        return 0
    if args.only:
        bad = [i for i in args.only if not 0 <= i < len(every)]
        if bad:
            p.error(f"--only {bad[0]} is not a mutant of {args.module} (0 ... {len(every) - 1})")
        chosen = [every[i] for i in args.only]
    else:
        chosen = list(candidates)
        random.Random(args.seed).shuffle(chosen)
        chosen = chosen[:args.sample] if args.sample > 0 else sorted(chosen, key=lambda m: m.index)

    cmd = pytest_command(args.tests, args.keyword, slow=args.slow)
    with ExitStack() as stack:
        works = [Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="posbias-mutants-")))
                 for _ in range(min(args.jobs, len(chosen)))]
        printed_source = ast.unparse(ast.parse(source))
        for work in works:
            _copy_project(work)
            (work / module).write_text(printed_source)  # the unmutated module as the mutants print it
        work = works[0]
        env_of = {w: dict(os.environ, PYTHONPATH=str(w), OMP_NUM_THREADS=str(args.threads)) for w in works}
        start = time.time()
        if args.per_line:
            status, last, node_ids, by_line = _covered(cmd, work, env_of[work], work / module)
            starts, at_import = statement_starts(printed_source), run_at_import(printed_source)
            # the mutants' lines in the re-printed module coverage measured (same walk, other line numbers)
            printed = mutants(printed_source)
            assert [m.what for m in printed] == [m.what for m in every], "ast.unparse changed the mutation sites"
        else:
            status, last = _run(cmd, work, env_of[work], 3600)
        took = time.time() - start
        print(f"{module}: {len(every)} mutation sites; unmutated run {status} in {took:.0f} s ({last})", flush=True)
        if status != "survived":
            print("the tests fail (or hang) on the unmutated module: nothing to measure", file=sys.stderr)
            return 1
        timeout = args.timeout or max(30.0, 3 * took)
        counts = {"killed": 0, "survived": 0, "timeout": 0}
        survivors = []
        free: queue.Queue = queue.Queue()
        for w in works:
            free.put(w)

        def tests_of(m: Mutant) -> list[str] | None:
            if not args.per_line:
                return None
            line = printed[m.index].line
            return node_ids if line in at_import else (by_line.get(line) or by_line.get(starts.get(line, line)) or node_ids)

        def one(m: Mutant) -> tuple[str, str, float, list[str] | None]:
            """The mutant in a copy no other mutant is using: (status, pytest's last line, seconds, the
            tests its line selected under --per-line)."""
            w = free.get()
            try:
                (w / module).write_text(mutated(source, m.index))
                tests = tests_of(m)
                t0 = time.time()
                status, last = _run(cmd if tests is None else pytest_command(tests, slow=args.slow), w, env_of[w], timeout)
                return status, last, time.time() - t0, tests
            finally:
                free.put(w)

        with ThreadPoolExecutor(len(works)) as pool:
            running = {pool.submit(one, m): m for m in chosen}
            try:
                for done in as_completed(running):
                    m = running[done]
                    status, last, took, tests = done.result()
                    counts[status] += 1
                    ran = f"  ({len(tests)} tests)" if tests is not None else ""
                    print(f"{m.index:4d}  line {m.line:4d}  {m.what:<18} {status:<9} {took:4.0f} s{ran}", flush=True)
                    if status == "survived":
                        survivors.append(m)
                    if args.log:
                        with open(args.log, "a") as f:
                            f.write(json.dumps({"module": str(module), "index": m.index, "line": m.line, "what": m.what,
                                                "status": status, "seconds": round(took, 1), "pytest": last,
                                                **({"tests": len(tests)} if tests is not None else {})}) + "\n")
            except BaseException:  # (Ctrl-C, `kill`, an error): no mutant starts, none goes on running; leaving
                # the pool waits for its threads, so the copies are removed once no run uses them
                pool.shutdown(wait=False, cancel_futures=True)
                with _LOCK:
                    STOPPING.set()
                    for proc in RUNNING:
                        proc.kill()
                raise
    lines = source.splitlines()
    print(f"{len(chosen)} mutants: {counts['killed']} killed, {counts['survived']} survived, "
          f"{counts['timeout']} timed out")
    for m in sorted(survivors, key=lambda m: m.index):
        print(f"  survived {m.index:4d}  line {m.line:4d}  {m.what:<18} {lines[m.line - 1].strip()[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
