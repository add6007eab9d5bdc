import os
import signal
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU the `triton` backend's programs run in Triton's interpreter (tests/test_table_flash.py),
# which must be switched on before triton is first imported; with one they compile, as do the
# programs of torch.compile, so the switch stays off there
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("TRITON_INTERPRET") == "1":
    import _triton_interpreter

    _triton_interpreter.mend()  # (its glue only: what the programs compute is untouched)

# In pytest-xdist's workers (`make test`: one per core) each worker takes its share of the cores as torch
# threads, and hands that count to the processes its tests start, unless OMP_NUM_THREADS says otherwise.
# On 2 cores (2026-12-07) the suite took 648 s in one process; in two workers of two threads each,
# contending for the cores, 576 s; of one thread each, 443 s
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "OMP_NUM_THREADS" not in os.environ:
    from posbias.cli import usable_cores

    share = max(1, (usable_cores() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(share)
    os.environ["OMP_NUM_THREADS"] = str(share)


def pytest_collection_modifyitems(config, items):
    """Every test marked ``cuda`` in one xdist group, which :func:`pytest_xdist_make_scheduler` keeps
    together on a machine with CUDA."""
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(pytest.mark.xdist_group("cuda"))


def pytest_xdist_make_scheduler(config, log):
    """Where CUDA is, `make test`'s workers (xdist's default ``--dist load``) schedule by group: the tests
    marked ``cuda`` run in one worker, one at a time, as ``gpu_check.sh`` runs them, rather than one per
    core all at once on one GPU (each a CUDA context and its own share of the memory, where some tests
    reach for tens of GiB). Elsewhere, and under any other ``--dist``, xdist's own choice (None)."""
    if torch.cuda.is_available() and config.getvalue("dist") == "load":
        from xdist.scheduler import LoadGroupScheduling

        return LoadGroupScheduling(config, log)
    return None


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler (Ctrl-C raises KeyboardInterrupt) for the test, as a terminal's
    foreground job has it. A job that a non-interactive shell starts in the background (``pytest … &``)
    inherits SIGINT ignored, and Python then installs no handler: nothing can interrupt it, and posbias
    rightly holds nothing (``stopping.between_steps``). Three Ctrl-C tests failed that way on
    2026-12-05, and the 'returned instead of raising' once seen under coverage had that cause. A child
    started meanwhile (a torchrun launcher) gets SIGINT's default action: exec resets a handled signal,
    while an ignored one stays ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """A small local corpus (about 41 KB) for end-to-end study runs in seconds."""
    f = tmp_path_factory.mktemp("corpus") / "data.txt"
    f.write_text("".join(f"row {i}: pack my box with {i % 17} dozen liquor jugs\n" for i in range(900)))
    return f


@pytest.fixture
def saved_figures(monkeypatch):
    """``{file name: figure}`` of every figure the test then has saved (none is written), kept open to be
    read and closed when the test ends: what a figure draws, where a file of the right name is not enough."""
    from posbias import plot

    kept = {}
    monkeypatch.setattr(plot, "save_figure", lambda fig, path: kept.setdefault(Path(path).name, fig) and Path(path))
    yield kept
    plot.pyplot().close("all")


@pytest.fixture(autouse=True)
def _stand_in_cuda(request, monkeypatch):
    """A test (case) marked ``stand_in_cuda`` runs with CPU tensors reading as CUDA and the CUDA ops
    replaced by stand-ins (``tests/_stand_in_cuda.py``): its CUDA branches, rehearsed without a GPU."""
    if request.node.get_closest_marker("stand_in_cuda") is None:
        yield
        return
    from _stand_in_cuda import pretend_cuda

    with pretend_cuda(monkeypatch):
        yield
