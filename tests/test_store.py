"""The results store's own rules (``posbias.store``): names, keys, atomic files, folder syncs, locks,
sizes.

Full disks, interrupted runs and checkpoint swaps are tested where they bite (test_faults.py), the
device keys with the devices (test_devices.py). A lock another process holds is played by another open
file of it: ``flock`` locks belong to an open file, so this process's own are refused too."""

import contextlib
import errno
import fcntl
import json
import os
import re
from pathlib import Path

import pytest

from posbias import store


@contextlib.contextmanager
def held_elsewhere(lock, *, shared=False):
    """The lock file ``lock`` taken by another open file (as by another process), for the block."""
    with open(lock, "a+") as fh:
        fcntl.flock(fh, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        yield


def taken(lock) -> bool:
    """Whether another open file of ``lock`` is refused it."""
    try:
        with held_elsewhere(lock):
            return False
    except BlockingIOError:
        return True


def test_a_label_is_one_path_component():
    """Scheme labels and retrofit rows name folders: anything but letters, digits and ``-_.=`` becomes
    ``_`` (a ``/`` would make a sub-folder, an ``@`` or a space is awkward in a shell)."""
    assert store.folder_name("fire@init_L=128") == "fire_init_L=128"
    assert store.folder_name("pi/tuned") == "pi_tuned"
    assert store.folder_name("t5 (n=32).v2-x") == "t5__n=32_.v2-x"
    assert store.folder_name("kerple-log") == "kerple-log"


def test_a_result_is_written_whole_into_folders_it_creates(tmp_path):
    """``write_text``/``write_json`` create the folders above the file, leave no temporary beside it,
    and replace what the file held; JSON keeps one value per line (readable diffs) unless asked for
    none, and a file that is not JSON is an error naming it and what to do."""
    target = store.write_text(tmp_path / "a" / "b" / "results.md", "old")
    assert target.read_text() == "old" and target == tmp_path / "a" / "b" / "results.md"
    store.write_text(target, "new")
    assert target.read_text() == "new" and [p.name for p in target.parent.iterdir()] == ["results.md"]
    data = {"ppl": [1.5, 2.0], "label": "t5"}
    f = store.write_json(tmp_path / "c" / "r.json", data)
    assert f.read_text() == json.dumps(data, indent=1) and store.read_json(f) == data
    assert store.write_json(f, data, indent=None).read_text() == json.dumps(data)
    f.write_text('{"ppl": [1.5,')  # cut short
    with pytest.raises(ValueError, match=rf"^{re.escape(repr(str(f)))} is not valid JSON \(.*\); delete it to recompute$"):
        store.read_json(f)


def test_a_results_key_is_its_settings_whatever_their_order():
    """``config_key`` hashes a canonical dump: the same settings in another order (a dict built in another
    order, nested too) give the same key; another value, another key."""
    a = {"model": {"d_model": 64, "scheme": "t5"}, "train": {"lr": 1e-3, "steps": 10}, "threads": 2}
    b = {"threads": 2, "train": {"steps": 10, "lr": 1e-3}, "model": {"scheme": "t5", "d_model": 64}}
    assert store.config_key(a) == store.config_key(b) and len(store.config_key(a)) == 10
    assert store.config_key({**a, "threads": 1}) != store.config_key(a)
    assert store.config_key({"path": Path("x")}) == store.config_key({"path": "x"})  # what JSON cannot: as str


def test_disk_size_of_a_file_and_of_a_folder(tmp_path):
    """What ``clean`` reports freeing: a file's bytes, or the bytes of every file under a folder (nested
    folders included; a link is not counted, the file it names is)."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "x.bin").write_bytes(b"0" * 1000)
    (tmp_path / "a" / "b" / "y.bin").write_bytes(b"1" * 234)
    (tmp_path / "a" / "link").symlink_to(tmp_path / "a" / "x.bin")
    assert store.disk_size(tmp_path / "a" / "x.bin") == 1000
    assert store.disk_size(tmp_path / "a") == 1234
    assert store.disk_size(tmp_path / "a" / "b") == 234


def test_a_write_that_fails_before_its_file_exists_keeps_its_own_error(tmp_path):
    """``replacing``'s clean-up after a failure must not raise one of its own where the temporary file
    was never created (a picture whose drawing fails, a refused write): the original error goes on, an
    OSError naming the target, and nothing is left."""
    with pytest.raises(RuntimeError, match="drawing failed"):
        with store.replacing(tmp_path / "a.png"):
            raise RuntimeError("drawing failed")
    with pytest.raises(OSError) as err:
        with store.replacing(tmp_path / "b.md"):
            raise OSError(errno.EACCES, "Permission denied")
    assert err.value.errno == errno.EACCES and err.value.filename == str(tmp_path / "b.md")
    assert list(tmp_path.iterdir()) == []


def test_an_item_lock_says_whether_it_is_held(tmp_path):
    """``item_lock`` (one study at a time makes a model) yields True where it took the lock and False at
    once, without waiting, where another open file holds it (flock: another process, or another open
    file of this one); the lock file stays for the next taker."""
    lock = tmp_path / "locks" / "model.lock"
    with store.item_lock(lock, wait=False) as held:
        assert held
        with store.item_lock(lock, wait=False) as again:  # another open file of it: refused at once
            assert not again
    with held_elsewhere(lock), store.item_lock(lock, wait=False) as held:
        assert not held
    with store.item_lock(lock, wait=True) as held:
        assert held and taken(lock)  # held for the block
    assert not taken(lock) and lock.exists()  # and free after it


def test_free_memory_is_the_memory_available_in_bytes(monkeypatch, tmp_path):
    """On Linux the CPU's free memory is ``/proc/meminfo``'s ``MemAvailable`` (kB, what can be had without
    swapping, not ``MemFree``), in bytes; None where it cannot be read."""
    info = tmp_path / "meminfo"
    real_open = open
    monkeypatch.setattr(store, "open", lambda path, *a, **k: real_open(info if path == "/proc/meminfo" else path, *a, **k),
                        raising=False)
    info.write_text("MemTotal:       24000000 kB\nMemFree:          100000 kB\nMemAvailable:   12000000 kB\n")
    assert store.free_memory("cpu") == 12000000 * 1024
    info.write_text("MemTotal:       24000000 kB\nMemFree:          100000 kB\n")  # a kernel before 3.14
    assert store.free_memory("cpu") is None
    info.unlink()
    assert store.free_memory("cpu") is None


def test_memory_in_messages_is_mib_below_a_gib_and_three_figures_past_a_pib():
    """Sizes in the memory refusals and notes: MiB below 1 GiB (where a GiB figure read 0), GiB with one
    decimal and thousands separators from 1 GiB, three significant figures from 2^50 bytes."""
    assert [store.memory_text(n) for n in (10 * 2**20, 2**30 - 2**19, 2**30, 3.5 * 2**30, 1536 * 2**30, 2**50, 2**64)] \
        == ["10.0 MiB", "1,023.5 MiB", "1.0 GiB", "3.5 GiB", "1,536.0 GiB", "1.05e+06 GiB", "1.72e+10 GiB"]


def test_a_message_names_a_few_of_many_and_counts_the_rest():
    """One form for every list a message gives: all the names up to one past ``shown`` (an "and 1 more"
    would take the room of the name), else the first ``shown`` and how many more, in the given order."""
    names = [f"w{k}" for k in range(8)]
    assert [store.listed(names[:n]) for n in (0, 1, 2, 4, 5, 8)] == [
        "", "w0", "w0, w1", "w0, w1, w2, w3", "w0, w1, w2 and 2 more", "w0, w1, w2 and 5 more"]
    assert store.listed(iter(names), 5) == "w0, w1, w2, w3, w4 and 3 more"
    assert store.listed(names[:6], 5) == "w0, w1, w2, w3, w4, w5"
    assert store.listed([3, Path("a")], 1) == "3, a"


def test_a_busy_folder_names_its_holder(tmp_path):
    """A second run into a folder another holds is refused at once, naming the holder the lock file
    records ("another process" where it records none), and takes nothing from it."""
    lock = tmp_path / ".posbias.lock"
    for recorded, named in [("posbias pid 4242 (a study: other studies may work there with it)",
                             "posbias pid 4242 (a study: other studies may work there with it)"),
                            ("", "another process")]:
        lock.write_text(recorded)
        with held_elsewhere(lock), pytest.raises(store.FolderBusy, match=(
                rf"^output folder {re.escape(repr(str(tmp_path)))} is in use by {re.escape(named)}; wait for it to "
                "finish or choose another output folder$")):
            with store.FolderLock(tmp_path):
                pass
        assert lock.read_text() == recorded


def test_a_job_cache_keeps_each_measurement_as_it_is_made(tmp_path):
    """``JobCache`` (diagnose's and retrofit's measurements): each ``put`` writes the whole file, so an
    interrupted run keeps what it measured; a new cache on the file reads it back, with what made it
    recorded afresh; without a file it lives in memory only."""
    f = tmp_path / "cache-abc.json"
    cache = store.JobCache(f, "diagnose", "cpu")
    cache.put("ppl@64", 3.5)
    on_disk = store.read_json(f)
    assert on_disk["ppl@64"] == 3.5 and on_disk[store.MADE_BY] == store.made_by("diagnose", "cpu")
    again = store.JobCache(f, "diagnose", "cpu")
    assert again.data == on_disk
    again.put("ppl@128", 4.0)
    assert store.read_json(f) == {**on_disk, "ppl@128": 4.0}
    memory = store.JobCache(None, "retrofit", "cpu")
    memory.put("x", 1)
    assert memory.data["x"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["cache-abc.json"]


def test_a_folder_is_synced_or_passed_over_where_it_cannot_be(tmp_path, monkeypatch):
    """``fsync_dir`` syncs the folder itself (its entries: what a file's own fsync leaves unwritten),
    passes over a file system that cannot (EINVAL) and a folder that cannot be opened, and names the
    folder on a real error."""
    synced, real = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.path.samestat(os.fstat(fd), os.stat(tmp_path))),
                                                 real(fd))[1])
    store.fsync_dir(tmp_path)
    assert synced == [True]
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EINVAL, "Invalid argument")))
    store.fsync_dir(tmp_path)
    store.fsync_dir(tmp_path / "missing")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(OSError) as err:
        store.fsync_dir(tmp_path)
    assert err.value.errno == errno.EIO and err.value.filename == str(tmp_path)


def test_folder_lock_removes_only_the_empty_folder_it_created(tmp_path):
    """A run refused after taking the lock (bad input found late) leaves no folder holding just a lock
    file; a folder that existed before, or that got results, stays. The lock file names its holder
    alone; the lock is re-entrant at any depth and free once the outermost holder exits."""
    fresh = tmp_path / "runs" / "fresh"
    with pytest.raises(RuntimeError), store.FolderLock(fresh):
        assert (fresh / ".posbias.lock").exists()
        raise RuntimeError("refused")
    assert not fresh.exists() and (tmp_path / "runs").is_dir()
    fresh.mkdir()
    lock = fresh / store.LOCK_FILE
    lock.write_text("posbias pid 1 (a study: an old holder's line, left behind)")
    with store.FolderLock(fresh):
        assert lock.read_text() == f"posbias pid {os.getpid()}"  # the holder, and it alone
        with store.FolderLock(fresh):  # re-entrant: the inner exit removes nothing
            (fresh / "results.md").write_text("x")
            with store.FolderLock(fresh), store.FolderLock(fresh):  # and at any depth keeps the lock
                assert taken(lock)
            assert taken(lock)
        with store.FolderLock(fresh):  # taken again after an inner exit
            assert taken(lock)
        assert taken(lock)
    assert (fresh / "results.md").exists() and not taken(lock)
    with store.FolderLock(fresh):  # one level in and out, then in again: still this run's
        with store.FolderLock(fresh):
            pass
        with store.FolderLock(fresh):
            assert taken(lock)
    before = tmp_path / "existing"
    before.mkdir()
    with store.FolderLock(before):
        pass
    assert before.is_dir()
    study = tmp_path / "runs" / "study"
    with pytest.raises(RuntimeError), store.FolderLock(study, shared=True):  # a study alone in it: the same
        raise RuntimeError("refused")
    assert not study.exists()
    with contextlib.ExitStack() as other:
        with store.FolderLock(study, shared=True):  # another study takes it too (shared) and stays
            assert (study / store.LOCK_FILE).read_text() == f"posbias pid {os.getpid()} (a study: other studies " \
                                                             "may work there with it)"
            other.enter_context(held_elsewhere(study / store.LOCK_FILE, shared=True))
        assert (study / store.LOCK_FILE).exists()  # its lock file is kept for it
