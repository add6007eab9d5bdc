"""``posbias clean``: what the installed posbias would never reuse is listed, with its reason, and
removed only with ``--delete``; everything a later run would reuse stays (the re-run reuses it)."""

import fcntl
import json
import shutil

import pytest
import torch
from _helpers import STUDY as TINY_STUDY, TINY_L as L, one_line_error, tiny_checkpoint

from posbias import clean, store
from posbias.cli import main
from posbias.data import local_corpus
from posbias.diagnose import DiagnoseConfig, run_diagnose
from posbias.retrofit import RetrofitConfig, run_retrofit

STUDY = ["--schemes", "t5", *TINY_STUDY]


def _study(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    assert main(["extrapolate", *STUDY, "--data", str(text_file), "--out", str(out)]) == 0
    capsys.readouterr()
    return out, next((out / "models").glob("t5-seed0-*"))


def _listed(found):
    return {(str(s.path.relative_to(found.root)), s.what) for s in found.stale}


def test_a_study_folder_lists_only_what_no_run_reuses(tmp_path, text_file, capsys):
    out, mdir = _study(tmp_path, text_file, capsys)
    fresh = clean.find(out)
    assert fresh.stale == [] and fresh.reports == [] and fresh.checked == 2  # the model and its evaluation
    # a model of older code beside it, an evaluation of an older format, and what interrupted writes leave
    old = mdir.with_name("t5-seed0-0123456789")
    shutil.copytree(mdir, old)
    key = json.loads((old / "key.json").read_text())
    (old / "key.json").write_text(json.dumps({**key, "code": "000000000000"}))
    evaluation = next(mdir.glob("eval-*.json"))
    data = json.loads(evaluation.read_text())
    data["key"]["format"] -= 1
    (mdir / "eval-0000000000.json").write_text(json.dumps(data))
    (mdir / "key.json.123.tmp").write_text("{")
    (mdir / "final.tmp").mkdir()
    shutil.copytree(mdir / "final", mdir / "final.old")  # the checkpoint is whole: the .old copy is left over
    found = clean.find(out)
    rel = str(mdir.relative_to(out))
    assert _listed(found) == {(str(old.relative_to(out)), "trained model"), (f"{rel}/eval-0000000000.json", "evaluation"),
                              (f"{rel}/key.json.123.tmp", "unfinished write"), (f"{rel}/final.tmp", "unfinished write"),
                              (f"{rel}/final.old", "unfinished write")}
    why = {s.what: s.why for s in found.stale}
    assert why["trained model"].startswith("made by other posbias code (model code 000000000000, installed ")
    assert why["evaluation"] == f"evaluation format {data['key']['format']} (installed {data['key']['format'] + 1})"
    assert found.reports == []  # results.md names the model that stays
    assert main(["clean", str(out)]) == 0  # lists, removes nothing
    said = capsys.readouterr().out
    assert f"{out}: 5 stale item(s) of 4 keyed result(s) checked" in said and "nothing removed; add --delete" in said
    assert old.exists() and (mdir / "final.old").exists()
    (mdir / "eval-1111111111.json").write_text("[1, 2]")  # not a posbias evaluation: listed, nothing breaks
    (mdir / "cache-2222222222.json").write_text("[1, 2]")
    assert {s.why for s in clean.find(out).stale if s.path.name.endswith("2.json") or s.path.name.endswith("1.json")} \
        == {"it cannot be read"}
    assert main(["clean", str(out), "--delete"]) == 0
    assert "removed " in capsys.readouterr().out
    assert not old.exists() and not (mdir / "final.tmp").exists() and not (mdir / "final.old").exists()
    assert clean.find(out).stale == []
    assert main(["extrapolate", *STUDY, "--data", str(text_file), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "reusing the model trained with these exact settings" in said  # nothing fresh was lost
    assert "no run will reuse" not in said
    (mdir / "last.tmp").mkdir()
    assert main(["extrapolate", *STUDY, "--data", str(text_file), "--out", str(out)]) == 0
    assert f"{out} also holds 1 older result(s), 0.0 MiB, that no run will reuse" in capsys.readouterr().out


def test_a_report_made_from_stale_models_is_named_and_kept(tmp_path, text_file, capsys):
    out, mdir = _study(tmp_path, text_file, capsys)
    key = json.loads((mdir / "key.json").read_text())
    (mdir / "key.json").write_text(json.dumps({**key, "device": "cpu"}))  # as keys named a CPU before
    assert [s.why for s in clean.find(out).stale] == ["its key names no processor (made before keys named the CPU): "
                                                      "no run reuses it"]
    (mdir / "key.json").write_text(json.dumps({**key, "torch": "1.0"}))
    found = clean.find(out)
    assert [(s.what, s.why) for s in found.stale] == [("trained model", f"made with torch 1.0 (installed {torch.__version__})")]
    assert found.reports == [(out / "results.md", f"1 of its 1 models' results are stale or gone ({mdir.name}): "
                                                  "re-run the study to refresh it")]
    assert main(["clean", str(out), "--delete"]) == 0
    assert "report results.md: 1 of its 1 models" in capsys.readouterr().out
    assert (out / "results.md").exists() and not mdir.exists()


def test_diagnose_and_retrofit_caches_record_what_made_them(tmp_path, text_file):
    corpus = local_corpus(text_file)
    path = tiny_checkpoint(tmp_path / "t", "t5", max_distance=L)
    rep = run_diagnose(path, DiagnoseConfig(length=2 * L, windows=1, eval_tokens=16 * L, passkey_steps=2, passkey_samples=1),
                       corpus=corpus, out=tmp_path / "d")
    cache = tmp_path / "d" / rep.cache
    assert json.loads(cache.read_text())[store.MADE_BY] == store.made_by("diagnose", "cpu")
    (tmp_path / "d" / "diagnose.json").write_text(json.dumps(rep.to_json()))  # as the report writes it
    res = run_retrofit(path, RetrofitConfig(to=2 * L, methods=["t5-distance"], finetune_steps=1, eval_tokens=16 * L),
                       tmp_path / "r", corpus=corpus)
    (tmp_path / "r" / "results.json").write_text(json.dumps(res.to_json()))
    assert json.loads((tmp_path / "r" / res.cache).read_text())[store.MADE_BY] == store.made_by("retrofit", "cpu")
    (tmp_path / "comparison.json").write_text(json.dumps({"rows": [{"model": "d"}]}))  # a diagnosis of several models
    assert clean.find(tmp_path).stale == [] and clean.find(tmp_path).reports == []
    # caches of older code (one without the record at all), and the models their runs made beside them
    made = json.loads(cache.read_text())
    assert made[store.MADE_BY]["device"] == store.device_key("cpu")
    made[store.MADE_BY]["device"] = "cpu"  # as keys named a CPU before
    cache.write_text(json.dumps(made))
    assert [s.why for s in clean.find(tmp_path / "d").stale][0].startswith("its key names no processor")
    made[store.MADE_BY].update(device=store.device_key("cpu"), code="000000000000")
    cache.write_text(json.dumps(made))
    rcache = tmp_path / "r" / res.cache
    rcache.write_text(json.dumps({k: v for k, v in json.loads(rcache.read_text()).items() if k != store.MADE_BY}))
    found = clean.find(tmp_path)
    key = rep.cache[len("cache-"):-len(".json")]
    assert _listed(found) == {(f"d/{rep.cache}", "diagnose cache"), (f"d/models/passkey-ft2-{key}", "model of a stale cache"),
                              (f"r/{res.cache}", "cache"), (f"r/models/t5-distance-ft1-{res.cache[6:-5]}", "model of a stale cache")}
    assert {s.why for s in found.stale if s.what == "cache"} == {"written before caches recorded their code: made by an older posbias"}
    assert [r.name for r, _ in found.reports] == ["diagnose.json", "results.json", "comparison.json"]  # no .md here
    assert found.reports[-1][1] == "1 of its 1 models' reports are stale or gone (d): re-run the diagnosis to refresh it"
    (tmp_path / "comparison.json").write_text(json.dumps({"rows": [{"model": "gone"}]}))
    assert clean.find(tmp_path / "r").reports[-1][0].name == "results.json"  # only what lies under the folder named
    assert clean.find(tmp_path).reports[-1][1].startswith("1 of its 1 models' reports are stale or gone (gone)")


def test_clean_passes_over_a_folder_a_run_works_in_and_refuses_one_above_it(tmp_path, text_file, capsys):
    out, mdir = _study(tmp_path, text_file, capsys)
    (mdir / "final.tmp").mkdir()  # would be listed, were the folder free
    with open(out / ".posbias.lock") as fh:  # another run's lock (a study's is shared)
        fcntl.flock(fh.fileno(), fcntl.LOCK_SH)
        assert main(["clean", str(tmp_path), "--delete"]) == 0
        said = capsys.readouterr().out
        assert f"{out}: passed over, in use by " in said and f"{tmp_path}: nothing stale" in said
        assert (mdir / "final.tmp").exists()
        one_line_error(capsys, main(["clean", str(out)]), "is in use by", "nothing was listed or removed")
        with pytest.raises(ValueError, match="is in use"), clean.locked(out / "models"):  # below a run's folder
            pass
    assert main(["clean", str(tmp_path), "--delete"]) == 0
    assert not (mdir / "final.tmp").exists()
    one_line_error(capsys, main(["clean", str(tmp_path / "missing")]), "is not a folder (it does not exist)")
    one_line_error(capsys, main(["clean", str(out / "results.md")]), "is not a folder")


def test_diagnose_of_a_study_folder_passes_over_stale_models_beside_current_ones(tmp_path, text_file, capsys):
    """A study re-run after an upgrade keeps the old model folders beside the new ones; diagnosing the
    folder examines the current model of each name (what its report is about), says it passed the
    others over, and still examines a stale model that has no current one beside it."""
    from posbias.cli import _model_targets

    out, mdir = _study(tmp_path, text_file, capsys)
    for k, (name, scheme) in enumerate((("t5-seed0-0123456789", "t5"), ("alibi-seed0-0123456789", "alibi"))):
        old = mdir.with_name(name)
        shutil.copytree(mdir, old)
        key = json.loads((old / "key.json").read_text())
        (old / "key.json").write_text(json.dumps({**key, "code": "000000000000", "scheme": scheme}))
        if k == 0:  # two models in the folder, the current one and a stale one of its name
            assert [name for _, name, _ in _model_targets([str(out)])] == [mdir.name]
            assert "passing over 1 model folder(s)" in capsys.readouterr().out
    got = _model_targets([str(out)])
    assert [(label, name) for label, name, _ in got] == [("alibi-seed0", "alibi-seed0-0123456789"),
                                                         ("t5-seed0", mdir.name)]
    assert "passing over 1 model folder(s) of an older posbias or torch" in capsys.readouterr().out
    # named one by one, a stale model is examined as asked
    assert [name for _, name, _ in _model_targets([str(mdir.with_name("t5-seed0-0123456789") / "final")])] == [
        "t5-seed0-0123456789"]


def test_what_is_judged_and_freed_in_a_folder_of_caches_and_models(tmp_path, capsys):
    """Built by hand, no run: a stale cache's models go with it and a fresh cache's stay; a stale model
    folder is listed once, not its contents again; a JSON file that is no report is not judged as one;
    the count of results checked and the bytes removed are the ones listed."""
    now = store.made_by("diagnose", "cpu")
    (tmp_path / "cache-aaaaaaaaaa.json").write_text(json.dumps({store.MADE_BY: {**now, "code": "000000000000"}}))
    (tmp_path / "cache-bbbbbbbbbb.json").write_text(json.dumps({store.MADE_BY: now, "ppl": 3.0}))
    for name in ("passkey-ft2-aaaaaaaaaa", "passkey-ft2-bbbbbbbbbb"):
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "model.safetensors").write_bytes(b"w" * 3000)
    stale_model = tmp_path / "models" / "t5-seed0-cccccccccc"  # a study model of older code, with its own leftovers
    (stale_model / "final.tmp").mkdir(parents=True)
    (stale_model / "key.json").write_text(json.dumps({**store.made_by("model"), "code": "000000000000"}))
    (stale_model / "eval-dddddddddd.json").write_text("{}")
    (tmp_path / "notes.json").write_text(json.dumps({"rows": [1], "cache": 3}))  # the user's, not a report
    # reports whose records or rows are not what a run writes: judged without a crash
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "results.json").write_text(json.dumps({"records": [1, {"label": "t5"}]}))
    (tmp_path / "comparison.json").write_text(json.dumps({"rows": [3, {"model": 1}]}))
    found = clean.find(tmp_path)
    assert _listed(found) == {("cache-aaaaaaaaaa.json", "diagnose cache"),
                              ("models/passkey-ft2-aaaaaaaaaa", "model of a stale cache"),
                              ("models/t5-seed0-cccccccccc", "trained model")}
    assert found.checked == 3 and found.reports == []  # two caches and the model folder (not what is in it)
    size = found.size
    assert size == sum(store.disk_size(s.path) for s in found.stale) and size > 3000
    assert main(["clean", str(tmp_path)]) == 0
    assert f"{tmp_path}: 3 stale item(s) of 3 keyed result(s) checked" in capsys.readouterr().out
    assert clean.remove(found) == size
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["passkey-ft2-bbbbbbbbbb"]
    assert main(["clean", str(tmp_path), "--delete"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{tmp_path}: nothing stale (1 keyed result(s) checked)",
                                                    "removed 0.0 MiB"]
    (tmp_path / ".posbias.lock").write_text("")  # a lock file that names no holder
    assert store.lock_holder(tmp_path) == "another process"


def test_a_report_names_the_first_three_of_its_stale_models(tmp_path):
    """A study's report and a comparison of diagnoses whose models are gone are named with the first
    three of those models and how many more, every one where there are four or fewer."""
    for n in (3, 4, 5):
        study, compared = tmp_path / f"study{n}", tmp_path / f"compared{n}"
        study.mkdir()
        compared.mkdir()
        names = [f"t5-seed{k}" for k in range(n)]
        (study / "results.json").write_text(json.dumps({"records": [{"model_dir": f"models/{m}"} for m in names]}))
        (compared / "comparison.json").write_text(json.dumps({"rows": [{"model": m} for m in names]}))
        listed = ", ".join(names) if n <= 4 else ", ".join(names[:3]) + f" and {n - 3} more"
        assert clean.find(study).reports == [(study / "results.json", f"{n} of its {n} models' results are stale "
                                              f"or gone ({listed}): re-run the study to refresh it")]
        assert clean.find(compared).reports == [(compared / "comparison.json", f"{n} of its {n} models' reports are "
                                                 f"stale or gone ({listed}): re-run the diagnosis to refresh it")]


def test_clean_holds_every_free_run_folder_beside_a_busy_one(tmp_path):
    """While ``clean`` works it holds the lock of every run folder it may list, those sorted after a
    busy one too, and leaves alone what lies below the busy one."""
    for sub in ("a", "a/inner", "b"):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
        (tmp_path / sub / store.LOCK_FILE).touch()

    def free(sub):  # another open file of the lock: refused at once while the folder is held
        with store.item_lock(tmp_path / sub / store.LOCK_FILE, wait=False) as held:
            return held

    with open(tmp_path / "a" / store.LOCK_FILE) as busy:
        fcntl.flock(busy.fileno(), fcntl.LOCK_SH)  # a run works in a/
        with clean.locked(tmp_path) as held:
            assert list(held.busy) == [tmp_path / "a"]
            assert not free("b") and free("a/inner")
    assert free("b")

