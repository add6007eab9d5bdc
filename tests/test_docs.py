"""The README and the pages under docs/ link to each other: every relative link names a file that
exists, and every ``#anchor`` a heading of that file (as GitHub makes anchors from headings); every test,
project file and ``posbias.…`` name a page cites exists, and every ``posbias`` command it prints parses."""
import ast
import functools
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@functools.lru_cache(maxsize=None)  # a page is linked from many places: read each once
def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a Markdown file: each heading lower-cased, with everything but letters,
    digits, spaces, hyphens and underscores dropped and spaces made hyphens; a repeated one gets -1, -2, …"""
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = None if in_code else re.match(r"^#{1,6} (.*)$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_anchors_follow_githubs_rule():
    page = ROOT / "README.md"
    assert {"conventions", "schemes-posbias-list", "layout", "exact-fast-attention",
            "train-short-test-long-posbias-extrapolate-make-demo"} <= anchors(page)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_and_anchor_resolves(page):
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # links inside code blocks are code
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+://|^mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.relative_to(ROOT)}: " + ", ".join(broken)


def test_the_readme_points_to_every_page_of_docs():
    """Each page under docs/ is reachable from the README, directly or from a page it links."""
    reached, todo = set(), [ROOT / "README.md"]
    while todo:
        page = todo.pop()
        if page in reached:
            continue
        reached.add(page)
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            path = target.partition("#")[0]
            if path.endswith(".md") and "://" not in path:
                todo.append((page.parent / path).resolve())
    assert not set(PAGES) - reached, sorted(p.name for p in set(PAGES) - reached)


def _table_after(text: str, marker: str) -> list[list[str]]:
    """The rows (cells stripped) of the first Markdown table after ``marker``."""
    rows, started = [], False
    for line in text[text.index(marker):].splitlines():
        if line.startswith("|"):
            started = True
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not set("".join(cells)) <= set("-: "):
                rows.append(cells)
        elif started:
            break
    return rows


def test_the_readmes_demo_numbers_are_those_of_docs_study():
    """The README's three-seed demo table repeats docs/study.md's (ppl @ 64 and ppl@1024 / ppl@64,
    mean over seeds), so the front page cannot drift from the measurement it summarises."""
    study = _table_after((ROOT / "docs" / "study.md").read_text(encoding="utf-8"), "## Demo preset, three seeds")
    readme = _table_after((ROOT / "README.md").read_text(encoding="utf-8"), "The demo preset, three seeds")
    header, ratio, ppl = readme
    by_scheme = {row[0]: row for row in study[1:]}
    assert sorted(header[1:]) == sorted(by_scheme)
    for i, scheme in enumerate(header[1:], 1):
        assert ratio[i] == by_scheme[scheme][-1], scheme
        assert ppl[i] == by_scheme[scheme][1].split(" ± ")[0], scheme


def _words(page: str) -> str:
    """A page's text with every run of whitespace one space (a sentence may wrap anywhere)."""
    return " ".join((ROOT / page).read_text(encoding="utf-8").split())


def test_the_demo_settings_the_docs_state_are_the_presets():
    """The published demo tables name the settings that made them: they must be the demo preset's (a
    changed preset would make `make demo` disagree with every number the docs print)."""
    from posbias.study import PRESETS

    demo = PRESETS["demo"]
    readme, study = _words("README.md"), _words("docs/study.md")
    said = re.search(r"The demo preset, three seeds \([^;]*; train at (\d+) bytes, (\d+) steps, (\d+) layers;", readme)
    assert said and tuple(map(int, said.groups())) == (demo["train_len"], demo["steps"], demo["n_layers"])
    said = re.search(r"Train at (\d+) bytes, (\d+) steps × (\d+) sequences, d_model (\d+), (\d+) layers, (\d+) heads",
                     study)
    assert said and tuple(map(int, said.groups())) == (demo["train_len"], demo["steps"], demo["batch_size"],
                                                        demo["d_model"], demo["n_layers"], demo["n_heads"])
    assert f"ppl@{max(demo['eval_lens'])} / ppl@{demo['train_len']}, mean ± std over seeds" in readme


def test_the_published_cpu_preset_studies_and_the_preset_list_state_the_presets_settings():
    """Each published `--preset cpu` report names the settings that made it (its "Trained at …" line,
    written by the report from the config, the defaults the preset leaves to StudyConfig included), and
    docs/study.md's list of presets states the cpu and gpu presets' lengths, steps and seeds: all must be
    the presets' own, or the published numbers are not what the command makes."""
    from posbias.study import PRESETS, StudyConfig

    cpu = StudyConfig(**PRESETS["cpu"])
    pages = sorted((ROOT / "docs").glob("study-cpu-preset-*.md"))
    assert pages
    for page in pages:
        said = re.search(r"Trained at (\d+) tokens for (\d+) steps \(batch (\d+), lr ([\d.e-]+), positional parameters "
                         r"at ([\d.]+)× lr without weight decay\); d_model (\d+), (\d+) layers, (\d+) heads;",
                         page.read_text(encoding="utf-8"))
        assert said, page.name
        assert tuple(map(float, said.groups())) == (cpu.train_len, cpu.steps, cpu.batch_size, cpu.lr, cpu.pos_lr_mult,
                                                    cpu.d_model, cpu.n_layers, cpu.n_heads), page.name
    said = re.search(r"`cpu` \(train (\d+), evaluate to (\d+), ([\d,]+) steps, [^)]*\), `gpu` \((\d+) seeds, ([\d,]+) "
                     r"steps, evaluate to (\d+)\)", _words("docs/study.md"))
    gpu = PRESETS["gpu"]
    assert said and (int(said[1]), int(said[2]), int(said[3].replace(",", ""))) == (
        cpu.train_len, max(cpu.eval_lens), cpu.steps)
    assert (int(said[4]), int(said[5].replace(",", "")), int(said[6])) == (
        len(gpu["seeds"]), gpu["steps"], max(gpu["eval_lens"]))


@functools.lru_cache(maxsize=None)  # the same for every page: parsed once
def _defined_in_tests() -> dict[str, set[str]]:
    """Each function and class name under tests/, with the files (``tests/x.py``) that define it."""
    names: dict[str, set[str]] = {}
    for file in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.setdefault(node.name, set()).add(f"tests/{file.name}")
    return names


CITED_TEST = re.compile(r"`(?:(tests/[\w/]+\.py)::)?(\w+)`")
CITED_PATH = re.compile(r"`((?:posbias|tests|benchmarks|tools|docs|\.ci)/[\w/.\-]+)`")
CITED_NAME = re.compile(r"(?<![\w./-])posbias(?:\.\w+)+")


def _resolves(dotted: str) -> bool:
    """Whether ``posbias.a.b`` names something: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def broken_citations(text: str, defined: dict[str, set[str]]) -> list[str]:
    """What a page cites that is not there: a test (``tests/x.py::name`` must be defined in that file;
    a bare ``test_…`` in some test file, or be a test module's name), a file of the project, or a
    ``posbias.…`` name. A guarantee that points at a renamed test is a claim nothing checks."""
    broken = []
    for m in CITED_TEST.finditer(text):
        file, name = m.groups()
        if file:
            if file not in defined.get(name, set()):
                broken.append(f"{file}::{name}")
        elif name.startswith("test_") and name not in defined and not (ROOT / "tests" / f"{name}.py").exists():
            broken.append(name)
    broken += [path for path in CITED_PATH.findall(text) if not (ROOT / path).exists()]
    broken += [name for name in CITED_NAME.findall(text) if not _resolves(name)]
    return broken


def test_the_citing_rule_catches_what_is_not_there():
    defined = {"test_a": {"tests/test_x.py"}}
    assert broken_citations("`test_a`, `tests/test_x.py::test_a`, `tests/test_docs.py`, `posbias.build`, "
                            "`.posbias.lock`, `posbias.attention.attention_probs`", defined) == []
    assert broken_citations("`test_b` `tests/test_y.py::test_a` `tools/nothing.py` `posbias.attention_probs`",
                            defined) == ["test_b", "tests/test_y.py::test_a", "tools/nothing.py",
                                         "posbias.attention_probs"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_test_file_and_name_a_page_cites_exists(page):
    broken = broken_citations(page.read_text(encoding="utf-8"), _defined_in_tests())
    assert not broken, f"{page.relative_to(ROOT)} cites what is not there: " + ", ".join(broken)


def _commands(text: str) -> list[str]:
    """The ``posbias …`` command lines of a page: in code blocks (a comment after `` #`` dropped) and in
    inline code; fragments with an ellipsis are prose, not commands."""
    found, in_code = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        if in_code and (m := re.match(r"^\s*(?:\$ )?(?:\.venv/bin/)?posbias (.*)$", line)):
            found.append(m.group(1).split(" #")[0].strip())
        if not in_code:
            found += [m.group(1).strip() for m in re.finditer(r"`(?:\.venv/bin/)?posbias ([^`]*)`", line)]
    return [c for c in found if "…" not in c and not c.startswith("posbias:")]


def test_every_command_a_page_gives_parses():
    """Each ``posbias …`` command the README and docs print parses with the command line as it is: no
    unknown flag, scheme, choice or value (a renamed flag left in the docs fails here). A prose mention
    that names a command without its required arguments (``posbias diagnose``) is no command."""
    import contextlib
    import io
    import shlex

    from posbias.cli import build_parser

    parser, checked, bad = build_parser(), 0, []
    for page in PAGES:
        for command in _commands(page.read_text(encoding="utf-8")):
            argv = shlex.split(command)
            if "-h" in argv or "--help" in argv:
                continue
            if argv[:1] == ["show"] and len(argv) > 1:  # a label, t5@max_distance=64: as the command line reads it
                argv[1] = argv[1].partition("@")[0]
            said = io.StringIO()
            try:
                with contextlib.redirect_stderr(said):
                    _, extra = parser.parse_known_args(argv)
            except (SystemExit, Exception) as exc:  # the parser's own errors are exceptions of the CLI's
                why = str(exc) if not isinstance(exc, SystemExit) else said.getvalue().strip()
                if "arguments are required" not in why and "expected at least one argument" not in why:
                    bad.append(f"{page.name}: posbias {command} ({why})")
                continue
            checked += 1
            if extra:
                bad.append(f"{page.name}: posbias {command} (unknown: {' '.join(extra)})")
    assert checked >= 40 and not bad, "\n".join(bad)
