"""Every study scheme on every device: the automatic backend against the dense reference on the same
device (outputs, q/k/v and parameter gradients, query offsets, decoding), low precision within the
reference's own rounding, and FlexAttention's backward where it has one (CUDA).

The CUDA cases carry the ``cuda`` marker (``pytest -m cuda`` runs them alone) and skip cleanly without
a CUDA device (issue 12). Their CPU twins run everywhere, so the checks themselves are exercised on
every machine and a GPU session starts from tests that are known to be right."""

import copy
import types

import pytest
import torch
from _helpers import ATTENTION_MODULE, CUDA, CUDA_PATHS, NO_CUDA, REHEARSED, STAND_IN, compare, randomized, within_reference_rounding

from posbias import SCHEMES, ToeplitzScheme
from posbias.attention import CUDA_VALIDATED, attention, attention_reference, choose_backend
from posbias.integrations.flex import flex_available

STUDY = [n for n, c in SCHEMES.items() if c.family in ("additive", "rotary") and c.in_study]
WITH_SCORE_MOD = [n for n in STUDY if issubclass(SCHEMES[n], ToeplitzScheme)] + ["fire"]


@pytest.mark.parametrize("device", REHEARSED)
@pytest.mark.parametrize("name", STUDY)
def test_auto_backend_matches_reference_on_device(name, device):
    """Training shape (gradients to q, k, v and the scheme's parameters), then 37 queries at the end."""
    compare(randomized(name), "auto", device=device)
    compare(randomized(name), "auto", lq=37, device=device)


@pytest.mark.parametrize("device", REHEARSED)
@pytest.mark.parametrize("name", STUDY)
def test_decoding_one_query_against_a_long_cache(name, device):
    s = randomized(name).to(device)
    q = torch.randn(1, 3, 1, 16, device=device)
    k, v = (torch.randn(1, 3, 3000, 16, device=device) for _ in range(2))
    pos = torch.tensor([2999], device=device)
    with torch.no_grad():
        out = attention(q, k, v, s, q_pos=pos)
        ref = attention_reference(q, k, v, s, q_pos=pos)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_the_half_precision_rule_measures_each_tensor_against_the_float32_truth():
    """``posbias.testing`` (the tests' and the precision benchmark's rule): the reference itself passes
    with room to spare; a path off by a few units of bfloat16 in its output fails, and one whose output
    is a float32 copy is refused; ``grad=False`` judges the output alone; the rule is twice the
    reference's error plus the allowance, equality included."""
    from posbias.testing import rounding_errors, rule_holds

    s = randomized("alibi")
    torch.manual_seed(0)
    errors = rounding_errors(s, torch.bfloat16, lq=8, lk=64, run=attention_reference)
    assert len(errors) == 4 and rule_holds(errors) and all(f == r for f, r, _ in errors)
    assert all(a == torch.finfo(torch.bfloat16).eps * m for (_, _, a), m in zip(errors, [
        t.abs().max().item() for t in _truth(s, 8, 64)]))
    off = lambda q, k, v, scheme: attention_reference(q, k, v, scheme) + 0.1  # noqa: E731
    bad = rounding_errors(s, torch.bfloat16, lq=8, lk=64, grad=False, run=off)
    assert len(bad) == 1 and not rule_holds(bad) and bad[0][0] > 0.09
    with pytest.raises(ValueError, match="the path returned torch.float32 for torch.bfloat16 inputs"):
        rounding_errors(s, torch.bfloat16, lq=8, lk=64, run=lambda q, k, v, sc: attention_reference(q, k, v, sc).float())
    assert rule_holds([(3.0, 1.0, 1.0)]) and not rule_holds([(3.0, 1.0, 1.0), (3.0001, 1.0, 1.0)])


def _truth(scheme, lq, lk):
    """The float32 truth's output and q/k/v gradients as ``rounding_errors`` draws them (from seed 0)."""
    torch.manual_seed(0)
    low = [(torch.randn(1, 3, n, 16) * 2).to(torch.bfloat16) for n in (lq, lk, lk)]
    exact = [t.float().requires_grad_() for t in low]
    g = torch.randn(1, 3, lq, 16)
    out = attention_reference(*exact, scheme)
    return [out.detach(), *torch.autograd.grad((out * g).sum(), exact)]


@pytest.mark.parametrize("device", REHEARSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["t5", "alibi", "kerple-log", "fire"])
def test_low_precision_within_the_references_own_rounding(name, dtype, device):
    """The automatic backend in bf16/fp16, judged by the reference in the same precision
    (:func:`_helpers.within_reference_rounding`)."""
    within_reference_rounding(randomized(name), dtype, device)


@pytest.mark.parametrize("device", REHEARSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["t5", "alibi", "kerple-log", "fire"])
@pytest.mark.parametrize("lq, lk", [(300, 300), (16, 300), (1, 3000)])
def test_low_precision_inference_within_the_references_own_rounding(name, dtype, device, lq, lk):
    """Without autograd the CPU paths hand bf16/fp16 inputs to the fused op as they are (no float32
    copy of the cache): prefill, a chunk and one decoding query, judged as above."""
    within_reference_rounding(randomized(name), dtype, device, lq=lq, lk=lk, grad=False)


@pytest.mark.cuda
@NO_CUDA
@pytest.mark.parametrize("name", STUDY)
def test_cuda_agrees_with_cpu(name):
    """The same scheme and inputs on both devices: the automatic backends agree (outputs and the
    scheme's parameter gradients)."""
    base = randomized(name)
    qkv = [torch.randn(1, 3, 700, 16) for _ in range(3)]
    results = []
    for device in ("cpu", "cuda"):
        # a copy per device: Module.to moves parameters *and their gradients* in place, so the CPU
        # run's gradients would follow the module to the GPU (found on the first GPU run)
        s = copy.deepcopy(base).to(device)
        # fresh leaves on each device (rope/nope/sinusoidal have no parameters: the inputs' gradients are compared)
        q, k, v = (x.to(device).detach().clone().requires_grad_() for x in qkv)
        out = attention(q, k, v, s)
        out.square().sum().backward()
        grads = [q.grad, k.grad, v.grad] + [p.grad for p in s.parameters() if p.grad is not None]
        results.append([out.detach().cpu().clone()] + [g.cpu().clone() for g in grads])
    assert len(results[0]) == len(results[1])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
@NO_CUDA
@pytest.mark.skipif(not flex_available(), reason="this torch has no FlexAttention")
@pytest.mark.parametrize("name", WITH_SCORE_MOD)
def test_flex_backend_trains_on_cuda(name):
    """FlexAttention's backward (CUDA only): gradients to q, k, v and, through what the score_mod
    captures (a per-offset table; FIRE's weights), to the scheme's parameters; training shape and 37
    queries at the end."""
    compare(randomized(name), "flex", device="cuda")
    compare(randomized(name), "flex", lq=37, device="cuda")


@pytest.mark.parametrize("device", [CUDA, STAND_IN])
@pytest.mark.parametrize("name", STUDY)
def test_auto_does_not_pick_a_path_no_gpu_run_has_validated(name, device):
    """Issue 12's rule: until a GPU run validates a CUDA fast path (``CUDA_VALIDATED``: banded and alibi
    since 2026-12-04, an H200), ``auto`` keeps to the reference blocks (``blockwise``) or plain SDPA
    on CUDA, and takes a validated path for each scheme it runs exactly (the CUDA order, not the CPU's:
    no ``toeplitz`` or ``windowed``, which stand on the CPU's fused op)."""
    s = randomized(name).to(device)
    q, pos = torch.randn(1, 3, 64, 16, device=device), torch.arange(64, device=device)
    assert CUDA_VALIDATED == ("banded", "alibi")  # (CUDA_PATHS changes with this list)
    for trains in (False, True):
        with torch.set_grad_enabled(trains):
            assert choose_backend(s, q, q_pos=pos, k_pos=pos, causal=True) == CUDA_PATHS[name]


def test_cuda_candidates_are_the_validated_paths_only(monkeypatch):
    """The CUDA order is plain SDPA, then exactly the paths listed as validated; the CPU order is untouched."""
    att = ATTENTION_MODULE
    # what a GPU run validated (an H200, 2026-12-04: benchmarks/results-cuda-2026-12-04-h200.md); a path
    # joins with the run that validates it, and this line changes with it
    assert att.CUDA_VALIDATED == ("banded", "alibi")
    assert att._candidates("cuda", True, 4096, True) == ("sdpa", *att.CUDA_VALIDATED)
    monkeypatch.setattr(att, "CUDA_VALIDATED", ("flex",))
    assert att._candidates("cuda", False, 100, True) == ("sdpa", "flex")
    assert att._candidates("cpu", True, 4096, True) == ("sdpa", "banded", "windowed", "toeplitz", "alibi")
    assert att._candidates("cpu", False, 4096, True) == ("sdpa", "toeplitz", "windowed", "alibi")


@pytest.mark.parametrize("device", REHEARSED)
def test_the_gpu_preset_study_runs_end_to_end(device, tmp_path, text_file):
    """``posbias extrapolate --preset gpu`` on the device, shrunk to seconds (one seed, 3 steps, a tiny
    model): every scheme of the study trains and is scored, the results name the device, and every
    perplexity is finite."""
    import json

    from posbias.cli import main

    out = tmp_path / "study"
    argv = ["extrapolate", "--preset", "gpu", "--device", device, "--seeds", "0", "--train-len", "16",
            "--eval-lens", "16", "32", "--steps", "3", "--batch-size", "4", "--d-model", "32", "--layers", "1",
            "--heads", "2", "--eval-tokens", "256", "--quiet", "--data", str(text_file), "--out", str(out)]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["study"]["device"] == device
    records = results["records"]
    assert {r["scheme"] for r in records} == set(results["study"]["schemes"]) and len(results["study"]["schemes"]) >= 8
    assert len(records) == 2 * len(results["study"]["schemes"])
    assert all(torch.isfinite(torch.tensor(r["ppl"])) and r["train_wall_s"] > 0 for r in records)


def gpu_check(out, *stages, **env):
    """``bash benchmarks/gpu_check.sh STAGES`` on this machine's CPU, its logs under ``out``."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    return subprocess.run(["bash", str(script), *stages], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PY": sys.executable, "DEVICE": "cpu", "OUT": str(out), **env})


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script itself runs the CUDA tests")
def test_the_gpu_session_script_runs_its_stages_and_keeps_their_logs(tmp_path):
    """``benchmarks/gpu_check.sh`` is what a GPU session runs (README, docs/attention.md): its plumbing, checked on any
    machine. The tests stage (``pytest -m cuda``; every case skips without CUDA) writes its log and the
    environment's; the precision stage runs ``bench_precision.py`` with ``PRECISION_ARGS``, a path that
    cannot run on the device named in its row; an unknown stage is refused with exit 2."""
    r = gpu_check(tmp_path, "tests", "precision",
                  PRECISION_ARGS="--cases t5:banded t5:triton --queries 1 --keys 200 --seeds 1")
    assert r.returncode == 0, r.stdout + r.stderr
    log = (tmp_path / "tests.log").read_text()
    assert "-m cuda" in log and "== tests: exit 0" in log
    assert "skipped" in log and "failed" not in log
    assert "torch " + torch.__version__ in (tmp_path / "environment.log").read_text()
    log = (tmp_path / "precision.log").read_text()
    assert r.returncode == 0 and "== precision: exit 0" in log and "| t5 | banded | 1 | 1 of 1 | 1.00 |" in log, log
    assert "| t5 | triton | 1 | cannot run: needs CUDA tensors" in log
    bad = gpu_check(tmp_path, "bogus")
    assert bad.returncode == 2 and "unknown stage 'bogus'" in bad.stderr and "sanitize or precision" in bad.stderr


def test_the_gpu_session_script_runs_the_triton_tests_under_compute_sanitizer_where_it_has_one(tmp_path):
    """The ``sanitize`` stage: without the tool it says where it looked and skips (exit 0); with one (here a
    stand-in that prints what it was given) it runs the triton backend's CUDA tests under memcheck, failing
    on any error it finds, with PyTorch's caching allocator off (each tensor an allocation of its own)."""
    import sys

    r = gpu_check(tmp_path, "sanitize", SANITIZER=str(tmp_path / "none"))
    assert r.returncode == 0 and f"no compute-sanitizer at {tmp_path / 'none'}" in (tmp_path / "sanitize.log").read_text()
    tool = tmp_path / "compute-sanitizer"
    tool.write_text('#!/bin/sh\necho "given: $*"\necho "caching off: $PYTORCH_NO_CUDA_MEMORY_CACHING"\n')
    tool.chmod(0o755)
    r = gpu_check(tmp_path, "sanitize", SANITIZER=str(tool))
    log = (tmp_path / "sanitize.log").read_text()
    assert r.returncode == 0 and "== sanitize: exit 0" in log, log
    assert f"given: --tool memcheck --error-exitcode 1 {sys.executable} -m pytest -m cuda" in log
    assert "tests/test_table_flash.py" in log and "caching off: 1" in log


def test_make_test_runs_every_cuda_test_in_one_worker(request, monkeypatch):
    """Every test marked ``cuda`` this session collected is in xdist's group "cuda" (tests/conftest.py),
    and where CUDA is, `make test`'s workers schedule by group: on a GPU machine those tests run in one
    worker, one at a time, not one per core on the one GPU. Elsewhere xdist's own scheduling is kept (its
    default measured 392–463 s for the suite here). The hooks on stand-ins, then on this session's items."""
    import conftest
    from xdist.scheduler import LoadGroupScheduling

    class Item:
        def __init__(self, *marks):
            self.marks = [m.mark for m in marks]

        def get_closest_marker(self, name):
            return next((m for m in self.marks if m.name == name), None)

        def add_marker(self, decorator):
            self.marks.append(decorator.mark)

    items = [Item(pytest.mark.cuda), Item(), Item(pytest.mark.slow, pytest.mark.cuda), Item(pytest.mark.slow)]
    conftest.pytest_collection_modifyitems(request.config, items)
    assert [[(m.name, m.args) for m in item.marks if m.name == "xdist_group"] for item in items] == [
        [("xdist_group", ("cuda",))], [], [("xdist_group", ("cuda",))], []]
    cuda = [item for item in request.session.items if item.get_closest_marker("cuda") is not None]
    assert all([m.args for m in item.iter_markers("xdist_group")] == [("cuda",)] for item in cuda)
    assert not any(item.get_closest_marker("xdist_group") for item in request.session.items
                   if item.get_closest_marker("cuda") is None)
    config = types.SimpleNamespace()
    for cuda, dist, chosen in ((True, "load", LoadGroupScheduling), (False, "load", type(None)),
                               (True, "loadfile", type(None))):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        config.getvalue = {"dist": dist, "tx": ["2*popen"]}.get
        assert type(conftest.pytest_xdist_make_scheduler(config, None)) is chosen, (cuda, dist)


def test_results_keys_name_the_device_by_kind(monkeypatch):
    """Keys carry what a device is, not its index: runs on cuda:0 and cuda:1 share results. A CPU is
    named by its model and the instruction set torch uses, so a model trained on another kind of
    processor (other rounding) is not reused: the study's model key, and with it the evaluation's,
    differ."""
    from posbias import store
    from posbias.data import local_corpus
    from posbias.study import StudyConfig, arms, model_key

    here = store.device_key("cpu")
    assert here == f"cpu ({store.cpu_name()}, {torch.backends.cpu.get_cpu_capability()})" and store.cpu_name()
    cfg = StudyConfig(schemes=("t5",))
    arm = arms(cfg)[0]
    corpus = local_corpus(__file__)
    key = store.config_key(model_key(cfg, arm, 0, corpus))
    monkeypatch.setattr(store, "cpu_name", lambda: "Another CPU")
    assert store.device_key("cpu") == f"cpu (Another CPU, {torch.backends.cpu.get_cpu_capability()})"
    assert store.config_key(model_key(cfg, arm, 0, corpus)) != key


def test_a_cpu_is_named_by_its_family_and_model_too(tmp_path):
    """A virtual machine may call processors of several generations "AMD EPYC"; the key adds the x86
    family and model numbers of the first processor listed, and names a CPU without them (ARM) by
    its model name alone."""
    from posbias import store

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
                    "model name\t: AMD EPYC\nstepping\t: 1\n\nprocessor\t: 1\ncpu family\t: 26\nmodel\t\t: 2\n")
    assert store.cpu_name(str(info)) == "AMD EPYC family 25 model 17"
    zen5 = tmp_path / "zen5"
    zen5.write_text("processor\t: 0\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n")
    assert store.cpu_name(str(zen5)) == "AMD EPYC family 26 model 2"
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nmodel name\t: Neoverse-V2\nCPU part\t: 0xd4f\n")
    assert store.cpu_name(str(arm)) == "Neoverse-V2"
    half = tmp_path / "half"  # a family without a model number (or the reverse) is no generation: the name alone
    half.write_text("processor\t: 0\ncpu family\t: 6\nmodel name\t: Some CPU\n")
    assert store.cpu_name(str(half)) == "Some CPU"
    half.write_text("processor\t: 0\nmodel\t\t: 85\nmodel name\t: Some CPU\n")
    assert store.cpu_name(str(half)) == "Some CPU"
    assert store.cpu_name(str(tmp_path / "missing")) != ""


def test_devices_are_checked_and_keyed_as_on_a_machine_with_two_gpus(monkeypatch):
    """Without a GPU, the CUDA branches run against a machine torch is told has two "Fake GPU"s:
    ``cuda`` (no index) and ``cuda:1`` are devices, ``cuda:2`` is refused naming the count; a CPU is
    keyed as a CPU there too, and a GPU by its model whatever its index."""
    from posbias import store

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "Fake GPU")
    assert store.check_device("cuda") == "cuda" and store.check_device("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match=r"^--device cuda:2: only 2 CUDA device\(s\) here$"):
        store.check_device("cuda:2", "--device")
    with pytest.raises(ValueError, match=r"^device 'mps': posbias runs on cpu or cuda$"):
        store.check_device("mps")
    assert store.check_device("cpu") == "cpu"
    assert store.device_key("cuda") == store.device_key("cuda:1") == "cuda (Fake GPU)"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (3 * 2**30, 80 * 2**30))  # (free, total)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev=None: types.SimpleNamespace(total_memory=80 * 2**30))
    assert store.free_memory("cuda:1") == 3 * 2**30 and store.device_memory("cuda:1") == 80 * 2**30
    assert store.device_key("cpu") == f"cpu ({store.cpu_kind()})"


@pytest.mark.cuda
@NO_CUDA
def test_cuda_keys_name_the_gpu_model_not_its_index():
    from posbias.store import device_key

    name = torch.cuda.get_device_name(0)
    assert device_key("cuda") == device_key("cuda:0") == f"cuda ({name})"
