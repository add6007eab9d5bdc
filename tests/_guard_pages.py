"""What ``compute-sanitizer`` checks on a GPU, for the ``triton`` backend's programs in Triton's
interpreter on the CPU: that no program reads or writes memory past either end of a tensor it is given.

A program's masked loads must not touch an element the mask excludes, but a mask one element too wide
reads a value that the next mask hides, so the output cannot show it (campaign 16 found two such
mutants). On a GPU that read can fault, or not, depending on what lies beyond the allocation.

Here every tensor a program is launched with is first copied into memory that ends (``side="after"``)
or starts (``"before"``) exactly at a page the process may not touch (``mprotect(PROT_NONE)``). The
interpreter reads through the tensors' raw addresses, so a read or write one element past the end (or
before the start) is a segmentation fault at that instruction. Run it in a subprocess with ``python -X
faulthandler`` and the fault's Python traceback names the program's line. After each launch, what
the program wrote is copied back into the original tensors, so the calls compute exactly as they would
without the guard.

Run as a script (``python -X faulthandler tests/_guard_pages.py after``), it runs :func:`run_cases` under
the guard; ``tests/test_table_flash.py`` does this in a subprocess. Linux only."""

import ctypes
import mmap
import sys

import torch

PAGE = mmap.PAGESIZE
PROT_NONE = 0  # (Linux; Python's mmap module has PROT_READ and PROT_WRITE but not this one)
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def guarded_copy(t: torch.Tensor, side: str, keep: list) -> torch.Tensor:
    """A copy of contiguous ``t`` that ends (``side="after"``) or starts (``"before"``) exactly at a page
    no one may read or write. ``keep`` holds the mappings while the copy is in use."""
    if side not in ("after", "before"):
        raise ValueError(f"side must be 'after' or 'before', not {side!r}")
    if not t.is_contiguous():
        raise ValueError("guarded_copy needs a contiguous tensor (every tensor the programs get is one)")
    nbytes = t.numel() * t.element_size()
    pages = max(1, -(-nbytes // PAGE))
    memory = mmap.mmap(-1, (pages + 1) * PAGE)
    whole = torch.frombuffer(memory, dtype=torch.uint8)
    guard = pages * PAGE if side == "after" else 0
    if _LIBC.mprotect(whole.data_ptr() + guard, PAGE, PROT_NONE) != 0:
        raise OSError(ctypes.get_errno(), "mprotect failed")
    start = pages * PAGE - nbytes if side == "after" else PAGE
    copy = whole[start:start + nbytes].view(t.dtype).view(t.shape)
    copy.copy_(t)
    keep.append((memory, whole))
    return copy


class _Guarded:
    """A program whose every launch (``program[grid](*args, **kw)``) gets guarded copies of its tensors;
    a tensor passed twice (a stand-in pointer) stays one copy."""

    def __init__(self, program, side: str) -> None:
        self.program, self.side = program, side

    def __getitem__(self, grid):
        def launch(*args, **kw):
            keep, copies = [], {}

            def guard(a):
                if not isinstance(a, torch.Tensor):
                    return a
                key = (a.data_ptr(), a.numel(), a.dtype)
                if key not in copies:
                    copies[key] = (a, guarded_copy(a, self.side, keep))
                return copies[key][1]

            self.program[grid](*map(guard, args), **{k: guard(a) for k, a in kw.items()})
            with torch.no_grad():
                for original, copy in copies.values():
                    # written ones only: copying onto an input saved for backward would bump its version
                    if not torch.equal(original.reshape(-1).view(torch.uint8), copy.reshape(-1).view(torch.uint8)):
                        original.copy_(copy)

        return launch


def install(side: str) -> None:
    """Every program :func:`posbias.kernels.table_programs.programs` returns from now on runs guarded."""
    from _helpers import wrapping_programs
    from posbias.kernels import table_programs

    table_programs.programs = wrapping_programs(lambda program: _Guarded(program, side))


def run_cases(side: str) -> None:
    """Forward and both backward programs over tiles cut at every edge: lengths not a multiple of the
    tile and one short of one, a decoding query, queries past and before the keys, each kind of bias
    (a table, one clipped at a tile's edge, ALiBi's line, FIRE's MLP past its threshold), dropout, and
    the keys split for inference."""
    from test_table_flash import check, fire_with_kinks_at, fire_with_kinks_inside

    from _helpers import perturb_, randomized
    from posbias import build
    from posbias.kernels.table_flash import table_flash_kernel
    from posbias.attention import attention_reference

    install(side)
    torch.manual_seed(0)
    t5 = {"num_buckets": 8, "max_distance": 10}
    check(randomized("t5", **t5), lq=21, lk=34)
    check(randomized("t5", **t5, bidirectional=True), causal=False, lq=31, lk=47)
    check(randomized("t5", **t5, bidirectional=True), causal=False, lq=47, lk=31, q0=0)
    check(randomized("t5", **t5, bidirectional=True), causal=False, lq=1, lk=50, q0=140, k0=40)
    check(randomized("offset", max_distance=18, bidirectional=True), causal=False, lq=50, lk=50)
    check(randomized("alibi"), lq=1, lk=50)
    check(randomized("alibi", symmetric=True), causal=False, lq=31, lk=47, dropout=(0.3, 2))
    check(perturb_(build("kerple-log", n_heads=3, head_dim=12)), lq=21, lk=34, d=12)  # head dim padded to 16
    # three kinks inside x ∈ (0, 1), so the far tiles reach the last piece; L = 5: every query past it
    check(fire_with_kinks_at(torch.tensor([0.2, 0.5, 0.8]), L=5.0), causal=False, lq=17, lk=33, q0=20, k0=5, atol=1e-5)
    fire = fire_with_kinks_inside(20.0).requires_grad_(False)
    q, k, v = (torch.randn(1, 3, n, 16) for n in (3, 70, 70))
    q_pos, k_pos = torch.arange(67, 70), torch.arange(70)
    out = table_flash_kernel(q, k, v, fire, q_pos=q_pos, k_pos=k_pos, causal=True, scale=fire.default_scale(),
                             interpret=True, splits=3)
    torch.testing.assert_close(out, attention_reference(q, k, v, fire, q_pos=q_pos, k_pos=k_pos), atol=1e-5, rtol=1e-4)


if __name__ == "__main__":
    import _triton_interpreter

    _triton_interpreter.mend()  # as under pytest (tests/conftest.py)
    run_cases(sys.argv[1])
    print("no access past a tensor's ends")
