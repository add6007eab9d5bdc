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
