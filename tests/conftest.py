import inspect
import os
import signal
import sys
from pathlib import Path

import numpy
import pytest
import torch

# Without a GPU the `triton` backend's programs run in Triton's interpreter (tests/test_table_flash.py),
# which must be switched on before triton is first imported; with one they compile, as do the
# programs of torch.compile, so the switch stays off there
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _mend_triton_interpreter() -> None:
    """Triton 3.6's interpreter (the one torch 2.11's CUDA builds ship) turns a loop bound computed in a
    program, a 1-element array there, into an int with ``int(array)``, which NumPy 2.4 refuses ("only
    0-dimensional arrays can be converted to Python scalars"): every program of the ``triton`` backend
    then fails in it. Triton 3.7 squeezes the array first; this gives the older interpreter the same
    (only its Python glue: what the programs compute is untouched)."""
    try:
        int(numpy.zeros(1))
        return  # NumPy before 2.4: the old conversion still works
    except TypeError:
        pass
    try:
        import triton.runtime.interpreter as interpreter
    except ImportError:
        return
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or "int(self.handle.data))" not in inspect.getsource(patch):
        return  # another Triton: nothing to mend

    def mended(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = mended


if os.environ.get("TRITON_INTERPRET") == "1":
    _mend_triton_interpreter()


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
