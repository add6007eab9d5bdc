"""Dry run of the ``triton`` backend's CUDA tests on a machine without a GPU, before a GPU is lent.

The CUDA tests of the ``triton`` backend (``tests/test_table_flash.py``, and the Hugging Face models on
it in ``tests/test_hf.py``) run only where CUDA is. A mistake in a test itself (an import that binds
the wrong object, a tolerance, an argument) would then be found on the GPU, in a session's few device
minutes. This script copies the tests to a temporary folder with ``"cuda"`` read as ``"cpu"`` and the
CUDA skips removed, lets the ``triton`` backend take CPU tensors, and runs its programs in Triton's
interpreter, so those tests run here as written otherwise:

    .venv/bin/python tests/dry_run_cuda.py                 # every triton CUDA test but bf16's (10-15 min)
    .venv/bin/python tests/dry_run_cuda.py -k dropout      # narrowed further (other pytest arguments pass on)

Not part of the suite (slow; it checks the tests, not the compiled programs): bf16 cases are left out,
Triton's interpreter computing bf16 dots wrongly (3.9), and so is the no-recompile test, which reads
the compiled programs' cache. It found, on 2026-12-05, a CUDA test that imported the function
``posbias.attention`` where it meant the module.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = ("test_table_flash.py", "test_hf.py")

SHIM = '''

# --- dry run (tests/dry_run_cuda.py): the triton backend on CPU tensors, in Triton's interpreter ---
import functools as _functools
import sys as _sys

import posbias.attention  # noqa: F401,E402
import posbias.kernels.table_flash as _table_flash  # noqa: E402

_attention = _sys.modules["posbias.attention"]  # (the package's attribute of that name is the function)


def _usable_on_any_device(scheme, q, q_pos, k_pos, causal, contiguous):  # every check but the device's
    from types import SimpleNamespace

    import torch

    as_if = SimpleNamespace(device=torch.device("cuda"), dtype=q.dtype, shape=q.shape)
    return _table_flash.table_flash_usable(scheme, as_if, q_pos, k_pos, causal, contiguous)


_kernel = _functools.partial(_table_flash.table_flash_kernel, interpret=True)
_attention.table_flash_usable = _usable_on_any_device
_attention.table_flash_kernel = _kernel
_attention.BACKENDS["triton"] = _kernel
'''


def cpu_twin(text: str) -> str:
    """A test file's text with its CUDA cases made CPU cases."""
    for cuda, cpu in (('device="cuda"', 'device="cpu"'), ('.to("cuda")', '.to("cpu")'), ('"cuda", lq=1', '"cpu", lq=1'),
                      ('dtype, "cuda"', 'dtype, "cpu"'), ('fast_calls, "cuda", "triton"', 'fast_calls, "cpu", "triton"'),
                      ("@NO_CUDA\n", "")):
        text = text.replace(cuda, cpu)
    return text


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        tests = Path(tmp) / "tests"
        shutil.copytree(ROOT / "tests", tests)
        for name in FILES:
            (tests / name).write_text(cpu_twin((tests / name).read_text()))
        with open(tests / "conftest.py", "a") as f:
            f.write(SHIM)
        select = "(triton or table_flash) and not bfloat16 and not dtype0 and not new_length"
        if "-k" in argv:  # narrowed, not replaced (pytest keeps the last -k)
            at = argv.index("-k")
            select, argv = f"({select}) and ({argv[at + 1]})", argv[:at] + argv[at + 2:]
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore", "-m", "cuda",
               "-k", select, "-c", str(ROOT / "pyproject.toml"), "--rootdir", tmp,
               *(str(tests / name) for name in FILES), *argv]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        return subprocess.run(cmd, cwd=tmp, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
