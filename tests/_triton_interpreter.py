"""Mends to Triton's interpreter (``TRITON_INTERPRET=1``), which runs the ``triton`` backend's programs
on the CPU in the tests (tests/test_table_flash.py, tests/_guard_pages.py). Each changes only the
interpreter's Python glue, never what a program computes, and each applies only to the Triton whose
source it recognises (another version is left as it is).

* :func:`mend_index_of_one_element_arrays`: Triton 3.6 with NumPy 2.4, where every program failed.
* :func:`patch_the_language_once_per_launch`: speed. Triton's interpreter patches ``triton.language``
  (its builtins made to run on NumPy) when a program is launched, and again on every call of a
  ``@triton.jit`` helper inside it, ~1 ms a call (``inspect.getmembers`` over the language's modules);
  the backend's programs call helpers hundreds to thousands of times a launch. A helper that sees the
  same language modules as the launch in progress finds them patched already, so its repeat is
  skipped. Measured 2026-12-07 (Triton 3.9, torch 2.13 CPU, 2 threads, same sitting):
  tests/test_table_flash.py 241 s → 164 s, its slowest interpreted test 11.9 s → 7.1 s.

:func:`mend` applies both; tests/conftest.py calls it where the interpreter is on."""

import inspect

import numpy


def mend_index_of_one_element_arrays() -> bool:
    """Triton 3.6's interpreter (the one torch 2.11's CUDA builds ship) turns a loop bound computed in a
    program, a 1-element array there, into an int with ``int(array)``, which NumPy 2.4 refuses ("only
    0-dimensional arrays can be converted to Python scalars"): every program of the ``triton`` backend
    then fails in it. Triton 3.7 squeezes the array first; this gives the older interpreter the same.
    Whether it applied."""
    try:
        int(numpy.zeros(1))
        return False  # NumPy before 2.4: the old conversion still works
    except TypeError:
        pass
    try:
        import triton.runtime.interpreter as interpreter
    except ImportError:
        return False
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or "int(self.handle.data))" not in inspect.getsource(patch):
        return False  # another Triton: nothing to mend

    def mended(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = mended
    return True


def _language_modules(fn, tl) -> frozenset:
    """The ids of the language modules ``fn`` sees, as Triton's ``_patch_lang`` finds them."""
    return frozenset(id(v) for v in fn.__globals__.values() if v is tl or v is tl.core)


def patch_the_language_once_per_launch() -> bool:
    """A launch (``GridExecutor.__call__``) patches the language through ``_patch_lang(fn)`` and undoes it
    with the returned scope's ``restore()`` when the launch ends; a helper's call
    (``InterpretedFunction.__call__``) calls ``_patch_lang`` again and drops the scope. Here a call made
    while the launch's patch is in place, for a function that sees no language module left unpatched
    (by the launch, or by a helper of another module earlier in it), returns an empty scope instead: the
    repeat would set the same attributes to the same behaviour (the builtins already replaced are no
    longer builtins, so it skips those). Every patch that does run, and the undoing, are Triton's own.
    Whether it applied: Triton 3.9's interpreter has the shape its source is checked for here; another
    is left alone."""
    try:
        import triton.language as tl
        import triton.runtime.interpreter as interpreter
    except ImportError:
        return False
    real = getattr(interpreter, "_patch_lang", None)
    scope_class = getattr(interpreter, "_LangPatchScope", None)
    if real is None or scope_class is None or getattr(real, "once_per_launch", False):
        return False
    launch = inspect.getsource(interpreter.GridExecutor.__call__)
    helper = inspect.getsource(interpreter.InterpretedFunction.__call__)
    if ("patch_scope = _patch_lang(self.fn)" not in launch or "patch_scope.restore()" not in launch
            or "_patch_lang(self.fn)\n" not in helper):
        return False
    patched = []  # (scope, language modules) of the patches in place, the latest last

    def patch_lang(fn):
        modules = _language_modules(fn, tl)
        if patched and modules <= frozenset().union(*(m for _, m in patched)):
            return scope_class()  # a helper inside the launch: nothing to patch, nothing to undo
        scope = real(fn)
        patched.append((scope, modules))
        undo = scope.restore

        def restore():
            del patched[[s for s, _ in patched].index(scope):]  # and any a helper left after it
            undo()

        scope.restore = restore
        return scope

    patch_lang.once_per_launch = True
    patch_lang.original = real
    interpreter._patch_lang = patch_lang
    return True


def mend() -> None:
    mend_index_of_one_element_arrays()
    patch_the_language_once_per_launch()
