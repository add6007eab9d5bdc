"""tools/mutate.py, the mutation-testing tool: each site gives one mutant, and each mutant changes what
its site computes and nothing else."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = '''"""A module docstring, not mutated."""


def f(x, y):
    """Nor this one."""
    if x < y and not x == 3:
        return min(x, y) * 2 - 1
    return -y / 4.0 + (x in (1,)) + True
'''


@pytest.fixture(scope="module")
def mutate():
    spec = importlib.util.spec_from_file_location("mutate", ROOT / "tools" / "mutate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["mutate"] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def _f(source):
    scope = {}
    exec(compile(source, "<mutant>", "exec"), scope)
    return scope["f"]


def test_every_site_gives_a_mutant_that_changes_one_thing(mutate):
    sites = mutate.mutants(SOURCE)
    assert sorted(m.what for m in sites) == sorted([
        "And -> Or", "Lt -> LtE", "drop Not", "Eq -> NotEq", "3 -> 4", "Sub -> Add", "Mult -> Div", "min -> max",
        "2 -> 3", "1 -> 2", "Add -> Sub", "Add -> Sub", "Div -> Mult", "drop USub", "4.0 -> 6.0", "In -> NotIn",
        "1 -> 2", "True -> False"])
    assert all(m.line in (6, 7, 8) for m in sites)
    original = _f(SOURCE)
    assert (original(1, 2), original(3, 5), original(5, 2)) == (1, -0.25, 0.5)
    for m in sites:
        text = mutate.mutated(SOURCE, m.index)
        assert "A module docstring, not mutated." in text and "Nor this one." in text
        changed = _f(text)
        # every mutant of this function differs from it on one of these inputs (none is equivalent here)
        assert any(changed(x, y) != original(x, y) for x, y in [(1, 2), (3, 5), (5, 2), (2, 2), (1, 1)]), m


def test_the_tool_refuses_what_it_cannot_mutate(mutate, capsys):
    with pytest.raises(SystemExit):
        mutate.main(["posbias/nosuch.py", "tests/test_golden.py"])
    assert "is not a Python file of the project" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mutate.main(["posbias/schemes/kerple.py", "tests/test_golden.py", "--only", "999"])
    assert "--only 999 is not a mutant of posbias/schemes/kerple.py" in capsys.readouterr().err
    assert mutate.main(["posbias/schemes/kerple.py", "tests/test_golden.py", "--list"]) == 0
    assert "line   52  drop USub" in capsys.readouterr().out


def test_the_tests_marked_slow_run_only_when_asked(mutate):
    """By default a mutant runs the fast tests (``-m "not slow"``); ``--slow`` runs the end-to-end ones
    too, for a mutant only they can catch (two processes sharing a study folder)."""
    fast = mutate.pytest_command(["tests/test_faults.py"], "two_runs")
    args = fast[fast.index("pytest") + 1:]  # after `python -m pytest`
    assert args[args.index("-m") + 1] == "not slow" and args[-3:] == ["tests/test_faults.py", "-k", "two_runs"]
    every = mutate.pytest_command(["tests/test_faults.py"], slow=True)
    assert "-m" not in every[every.index("pytest") + 1:] and every[-1] == "tests/test_faults.py" and "-x" in every


def test_a_mutants_copy_holds_the_files_git_does_not_ignore(mutate, tmp_path):
    """Tracked files and untracked ones git does not ignore (a new test file not yet added); never an
    ignored one (a virtual environment, a build)."""
    import subprocess

    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    for name, text in (("kept.py", "1"), (".gitignore", "build/\n"), ("tests/test_new.py", "2"), ("build/out.so", "3")):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    git("add", "kept.py", ".gitignore")
    assert mutate.project_files(tmp_path) == [".gitignore", "kept.py", "tests/test_new.py"]


def test_per_line_runs_a_mutant_against_the_tests_that_reach_its_line(mutate):
    """--per-line: coverage.py's per-test contexts become pytest node ids (every parametrisation, a
    test in a class); code run at import or in a fixture (the empty context) maps to every test; a
    line inside a statement of several lines is found at the statement's first line."""
    ids = ["tests/test_a.py::test_f", "tests/test_a.py::test_g[1]", "tests/test_a.py::test_g[2]",
           "tests/test_b.py::TestC::test_f", "tests/test_b.py::test_f"]
    got = mutate.tests_by_line({3: ["test_a.test_g"], 4: ["test_a.test_f", "test_b.TestC.test_f"], 5: ["", "test_a.test_f"],
                                6: ["test_b.test_f"]}, ids)
    assert got == {3: ["tests/test_a.py::test_g[1]", "tests/test_a.py::test_g[2]"],
                   4: ["tests/test_a.py::test_f", "tests/test_b.py::TestC::test_f"], 5: ids, 6: ["tests/test_b.py::test_f"]}
    starts = mutate.statement_starts("x = 1\nif x:\n    y = f(1,\n          2)\n")
    assert starts == {1: 1, 2: 2, 3: 3, 4: 3}
    # module statements, class bodies and a def's header (decorators, defaults over two lines) run at
    # import, wherever the module was first imported: every test is theirs; function bodies are not
    source = ("N = 512\n@dec(1)\ndef f(a=32,\n      b=N):\n    return a + b\n\n\nclass C:\n    k = 2\n\n"
              "    def g(self, c=3):\n        return c\n")
    assert mutate.run_at_import(source) == {1, 2, 3, 4, 6, 7, 8, 9, 10, 11}


def test_per_line_measures_which_test_runs_each_line(mutate, tmp_path):
    """The unmutated run under coverage.py on a project of one module and two tests: each line of the
    module maps to the tests that ran it, the module's import to both."""
    pytest.importorskip("coverage")
    import os

    (tmp_path / "tests").mkdir()
    (tmp_path / "mod.py").write_text("def f(x):\n    if x:\n        return 1\n    return 2\n")
    (tmp_path / "tests" / "test_m.py").write_text(
        "import mod\n\n\ndef test_one():\n    assert mod.f(1) == 1\n\n\ndef test_two():\n    assert mod.f(0) == 2\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    status, last, ids, by_line = mutate._covered(mutate.pytest_command(["tests"]), tmp_path, env, tmp_path / "mod.py")
    assert status == "survived" and "2 passed" in last
    assert ids == ["tests/test_m.py::test_one", "tests/test_m.py::test_two"]
    assert by_line == {1: ids, 2: ids, 3: ids[:1], 4: ids[1:]}


def test_changed_since_takes_the_lines_git_diff_shows_added_or_changed(mutate, tmp_path):
    """``--changed-since REV``: the working tree's lines in the hunks of ``git diff REV`` (committed since
    or not; a changed line, added ones, none for a pure deletion); a revision git does not know is a
    ValueError in git's words."""
    import subprocess

    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "root")
    m = tmp_path / "m.py"
    m.write_text("a = 1\nb = 2\nc = 3\nd = 4\ne = 5\n")
    git("add", "m.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "m")
    assert mutate.changed_lines("m.py", "HEAD", tmp_path) == set()
    m.write_text("a = 1\nb = 20\nc = 3\nd = 4\nx = 0\ny = 0\n")  # b changed; e deleted, x and y added
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "changed")
    m.write_text("a = 1\nb = 20\nc = 3\nx = 0\ny = 0\n")  # and d deleted, uncommitted
    assert mutate.changed_lines("m.py", "HEAD", tmp_path) == set()  # (a deletion alone leaves no line)
    assert mutate.changed_lines("m.py", "HEAD~1", tmp_path) == {2, 4, 5}
    with pytest.raises(ValueError, match="git diff nosuch: fatal: bad revision 'nosuch'"):
        mutate.changed_lines("m.py", "nosuch", tmp_path)


MODULE = "posbias/schemes/kerple.py"


@pytest.fixture
def module_copies(mutate, monkeypatch):
    """``main``'s copies of the project hold :data:`MODULE` alone (the runs here read nothing else)."""
    def copy(into):
        (into / MODULE).parent.mkdir(parents=True)
        (into / MODULE).write_text((ROOT / MODULE).read_text())

    monkeypatch.setattr(mutate, "_copy_project", copy)


@pytest.fixture
def stand_in_runs(mutate, monkeypatch, module_copies):
    """``main`` with its pytest runs stood in, in copies of the module alone: a run reads the module its
    copy holds, sleeps 0.2 s, records (mutant, copy, pytest command) in ``state["seen"]``, and calls even
    mutants survivors and odd ones killed (the unmutated module survives); two runs in one copy at once
    fail the test. ``state["fail"]``: a mutant whose run raises."""
    import threading
    import time

    source = (ROOT / MODULE).read_text()
    which = {mutate.mutated(source, i): i for i in range(len(mutate.mutants(source)))}
    lock, busy = threading.Lock(), set()
    state = {"seen": [], "at_once": 0, "fail": None}

    def run(cmd, cwd, env, timeout):
        text = (Path(cwd) / MODULE).read_text()
        with lock:
            assert cwd not in busy, "two runs in one copy"
            busy.add(cwd)
            state["at_once"] = max(state["at_once"], len(busy))
        try:
            time.sleep(0.2)
            assert (Path(cwd) / MODULE).read_text() == text and env["PYTHONPATH"] == str(cwd)
            if text not in which:  # the unmutated run
                return "survived", "1 passed"
            if which[text] == state["fail"]:
                raise RuntimeError("a run that fails")
            state["seen"].append((which[text], cwd, cmd))
            return ("killed" if which[text] % 2 else "survived"), "1 failed"
        finally:
            with lock:
                busy.discard(cwd)

    monkeypatch.setattr(mutate, "_run", run)
    return state


def _logged(path):
    import json

    return sorted((r["index"], r["status"], r["seconds"], r.get("tests")) for r in map(json.loads, path.read_text().splitlines()))


def test_jobs_run_each_mutant_once_in_a_copy_no_other_run_is_using(mutate, stand_in_runs, capsys, tmp_path):
    """``--jobs 2``: two mutants at a time, each run in a copy of the project of its own that holds that
    mutant and no other while it runs; every mutant is run, reported and logged once, with its status
    and the seconds its run took. Without ``--jobs``, one at a time in one copy."""
    chosen = list(range(6))
    log = tmp_path / "log.jsonl"
    assert mutate.main([MODULE, "tests/test_golden.py", "--only", *map(str, chosen), "--jobs", "2", "--log", str(log)]) == 0
    seen = stand_in_runs["seen"]
    assert sorted(i for i, *_ in seen) == chosen and len({cwd for _, cwd, _ in seen}) == 2 and stand_in_runs["at_once"] == 2
    out = capsys.readouterr().out
    logged = _logged(log)
    assert [(i, status) for i, status, *_ in logged] == [(i, "killed" if i % 2 else "survived") for i in chosen]
    assert all(0.2 <= seconds < 5 for _, _, seconds, _ in logged)
    assert "6 mutants: 3 killed, 3 survived, 0 timed out" in out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("  survived")] == ["0", "2", "4"]
    seen.clear()
    stand_in_runs["at_once"] = 0
    assert mutate.main([MODULE, "tests/test_golden.py", "--only", "0", "1", "2"]) == 0
    assert [i for i, *_ in seen] == [0, 1, 2] and len({cwd for _, cwd, _ in seen}) == 1 and stand_in_runs["at_once"] == 1


def test_per_line_hands_each_mutant_the_tests_of_its_line(mutate, stand_in_runs, monkeypatch, tmp_path):
    """Through ``main``, ``--per-line`` runs a mutant on a line that coverage saw one test reach with that
    test alone, and one on a line no test reached with every test; the log counts them."""
    import ast

    printed_source = ast.unparse(ast.parse((ROOT / MODULE).read_text()))
    printed, at_import = mutate.mutants(printed_source), mutate.run_at_import(printed_source)
    inside = [m.index for m in printed if m.line not in at_import]
    one, other = inside[0], next(i for i in inside if printed[i].line != printed[inside[0]].line)
    ids = ["tests/test_golden.py::test_a", "tests/test_golden.py::test_b"]
    covered = []
    monkeypatch.setattr(mutate, "_covered", lambda cmd, work, env, target: covered.append((target.name, target.read_text())) or (
        "survived", "2 passed", ids, {printed[one].line: ids[:1]}))
    log = tmp_path / "log.jsonl"
    assert mutate.main([MODULE, "tests/test_golden.py", "--per-line", "--only", str(one), str(other), "--log", str(log)]) == 0
    assert covered == [("kerple.py", printed_source)]  # coverage measured the module as printed
    cmds = {i: cmd for i, _, cmd in stand_in_runs["seen"]}
    assert ids[0] in cmds[one] and ids[1] not in cmds[one] and set(ids) <= set(cmds[other])
    assert [tests for *_, tests in _logged(log)] == ([1, 2] if one < other else [2, 1])


def test_a_run_that_fails_stops_the_mutants_not_yet_started(mutate, stand_in_runs):
    """An error in one run (the tool's, not a test's) ends the whole run: the mutants queued behind it
    are cancelled, not run (the one the freed worker took meanwhile may finish)."""
    stand_in_runs["fail"] = 0
    with pytest.raises(RuntimeError, match="a run that fails"):
        mutate.main([MODULE, "tests/test_golden.py", "--only", "0", "1", "2", "3"])
    assert [i for i, *_ in stand_in_runs["seen"]] in ([], [1])


def test_changed_since_chooses_the_mutants_through_main(mutate, monkeypatch, capsys):
    """``--changed-since``: only the mutants on the changed lines are listed (or run); none on them is
    said in one line, exit 0; with ``--only`` it is refused."""
    every = mutate.mutants((ROOT / MODULE).read_text())
    line = every[0].line
    monkeypatch.setattr(mutate, "changed_lines", lambda module, rev: {line} if rev == "some" else set())
    assert mutate.main([MODULE, "tests/test_golden.py", "--changed-since", "some", "--list"]) == 0
    listed = [int(row.split()[0]) for row in capsys.readouterr().out.splitlines()]
    assert listed == [m.index for m in every if m.line == line] and listed
    assert mutate.main([MODULE, "tests/test_golden.py", "--changed-since", "none"]) == 0
    assert capsys.readouterr().out == f"{MODULE}: no mutation site on the 0 lines changed since none\n"
    with pytest.raises(SystemExit):
        mutate.main([MODULE, "tests/test_golden.py", "--changed-since", "some", "--only", "1"])
    assert "--only and --changed-since choose the mutants two ways: give one" in capsys.readouterr().err


def test_a_log_that_cannot_be_written_is_refused_before_any_run(mutate, monkeypatch, capsys, tmp_path):
    """``--log`` in a folder that does not exist was a traceback after the first mutant had run, its
    result lost; it is a usage error before the unmutated run."""
    monkeypatch.setattr(mutate, "_run", lambda *a: pytest.fail("a run started"))
    with pytest.raises(SystemExit):
        mutate.main([MODULE, "tests/test_golden.py", "--only", "0", "--log", str(tmp_path / "no" / "log.jsonl")])
    assert f"--log {tmp_path / 'no' / 'log.jsonl'}: No such file or directory" in capsys.readouterr().err


def test_a_stopping_tool_kills_the_runs_going_on(mutate, monkeypatch, module_copies):
    """When the tool stops early (here one run's error; Ctrl-C and `kill` take the same path) a test run
    still going on in another copy is killed at once, not waited for, and no run starts after it."""
    import ast
    import time

    source = (ROOT / MODULE).read_text()
    first, unmutated = mutate.mutated(source, 0), ast.unparse(ast.parse(source))
    real, ended = mutate._run, []

    def run(cmd, cwd, env, timeout):
        text = (Path(cwd) / MODULE).read_text()
        if text == first:
            deadline = time.time() + 30
            while not mutate.RUNNING and time.time() < deadline:  # until the other copy's run is going
                time.sleep(0.02)
            raise RuntimeError("a run that fails")
        if text == unmutated:
            return "survived", "1 passed"
        ended.append(real([sys.executable, "-c", "import time; time.sleep(60)"], cwd, env, timeout)[0])
        return ended[-1], ""

    monkeypatch.setattr(mutate, "_run", run)
    t0 = time.time()
    with pytest.raises(RuntimeError, match="a run that fails"):
        mutate.main([MODULE, "tests/test_golden.py", "--only", "0", "1", "2", "--jobs", "2"])
    # the sleeping run was killed (a run the freed worker took meanwhile was killed too, or never started)
    assert time.time() - t0 < 30 and "killed" in ended and set(ended) <= {"killed", "stopped"}
    assert not mutate.RUNNING and mutate.STOPPING.is_set()
    assert mutate._run is run and real([sys.executable, "-c", "pass"], Path.cwd(), {}, 10) == ("stopped", "")


def test_a_run_in_the_main_thread_is_killed_when_the_tool_stops(mutate, tmp_path):
    """The unmutated run (and ``--per-line``'s coverage run) goes on in the tool's own thread: a Ctrl-C
    or `kill` there (here a signal handler's exception) kills it; leaving ``with proc`` used to wait
    for the run to end, and a run that outlived its tool was left behind."""
    import os
    import signal
    import time

    class Stop(Exception):
        pass

    def stop(*_):
        raise Stop

    pid = tmp_path / "pid"
    child = f"import os, time; open({str(pid)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    mutate.STOPPING.clear()
    old = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    t0 = time.time()
    try:
        with pytest.raises(Stop):
            mutate._run([sys.executable, "-c", child], tmp_path, dict(os.environ), 120)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert time.time() - t0 < 30 and not mutate.RUNNING
    with pytest.raises(ProcessLookupError):  # gone, and reaped
        os.kill(int(pid.read_text()), 0)
