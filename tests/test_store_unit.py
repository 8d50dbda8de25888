"""The bundle store's parts, one at a time and exactly: confinement, what may be replaced, the lock's
settings, the copy a stage starts from, the fallback swap. Real files in a temporary folder; the races
and kills are in tests/reliability/test_faults.py."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import threading
import time
from pathlib import Path

import pytest

from mmopt import store
from mmopt.errors import BundleError


def bundle(folder: Path, **fields) -> Path:
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"schema_version": 2, "kind": store.KIND, **fields}))
    return folder


# ---- atomic_write ----------------------------------------------------------------------------

def test_atomic_write_replaces_the_name_never_the_file(tmp_path):
    path = tmp_path / "sub" / "deeper" / "f.json"
    store.atomic_write(path, b"one")
    other = tmp_path / "link"
    os.link(path, other)  # a staged bundle hard-links the live bundle's files
    store.atomic_write(path, b"two")
    assert path.read_bytes() == b"two" and other.read_bytes() == b"one"
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.json"]


def test_atomic_write_leaves_nothing_when_it_fails(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    store.atomic_write(path, b"old")

    def full(a, b):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError) as e:
        store.atomic_write(path, b"new")
    assert e.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: full(None, None))  # fails before the file exists
    with pytest.raises(OSError) as e:
        store.atomic_write(path, b"new")
    assert e.value.errno == errno.ENOSPC  # the write's own error, not the clean-up's


# ---- confine ---------------------------------------------------------------------------------

def test_confine_accepts_plain_relative_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    assert store.confine(tmp_path, "a.onnx", "f") == (tmp_path / "a.onnx").resolve()
    assert store.confine(tmp_path, "sub/a.onnx", "f") == (tmp_path / "sub" / "a.onnx").resolve()


@pytest.mark.parametrize("rel, problem", [
    ("/etc/passwd", "is an absolute path"),
    ("../x.onnx", "climbs out with '..'"),
    ("sub/../../x", "climbs out with '..'"),
    ("a\\b.onnx", "holds a NUL or backslash"),
    ("a\x00b", "holds a NUL or backslash"),
    ("./a.onnx", "is not normalised (write 'a.onnx')"),
    ("a//b.onnx", "is not normalised (write 'a/b.onnx')"),
    ("a/", "is not normalised (write 'a')"),
])
def test_confine_refuses_each_kind_of_escape_exactly(tmp_path, rel, problem):
    with pytest.raises(BundleError) as e:
        store.confine(tmp_path, rel, "artifacts[2].file")
    assert str(e.value) == (f"{tmp_path / 'manifest.json'}: field 'artifacts[2].file': {rel!r} {problem}. A bundle may "
                            "only name files inside itself; this manifest was edited or is not from mmopt. "
                            "Re-export the bundle.")


def test_confine_refuses_symlinks_out_the_bundle_itself_and_non_strings(tmp_path):
    b = tmp_path / "b"
    b.mkdir()
    (b / "out").symlink_to(tmp_path)
    with pytest.raises(BundleError, match=r"'out/x' resolves to .*, outside the bundle \(through a symlink\)"):
        store.confine(b, "out/x", "f")
    with pytest.raises(BundleError, match=r"'\.' resolves to"):
        store.confine(b, ".", "f")  # the bundle folder is not a file in it
    for bad in (None, "", 3, ["a"]):
        with pytest.raises(BundleError) as e:
            store.confine(b, bad, "f")
        assert str(e.value) == (f"{b / 'manifest.json'}: field 'f': must be a file name inside the bundle, got "
                                f"{bad!r}. Re-export the bundle.")


# ---- writable / is_bundle / check_replaceable / manifest_digest --------------------------------

def test_writable(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    assert store.writable(tmp_path) is True
    ro.chmod(0o555)
    try:
        assert store.writable(ro) is False  # even for root: no write bit is a choice to respect
    finally:
        ro.chmod(0o755)
    assert store.writable(tmp_path / "missing") is False


@pytest.mark.parametrize("manifest, ok", [
    ({"schema_version": 2, "kind": "mmopt-bundle"}, True),
    ({"schema_version": 1, "tools": {"mmopt": "0.1"}, "artifacts": []}, True),  # before the kind field
    ({"schema_version": 2, "tools": {"mmopt": "0.1"}, "artifacts": []}, False),
    ({"schema_version": 1, "tools": {"other": "1"}, "artifacts": []}, False),
    ({"schema_version": 1, "tools": ["mmopt"], "artifacts": []}, False),
    ({"schema_version": 1, "tools": {"mmopt": "0.1"}, "artifacts": {}}, False),
    ({"schema_version": "2", "kind": "mmopt-bundle"}, False),
    ({"kind": "mmopt-bundle"}, False),
    ({"schema_version": 2, "kind": "other"}, False),
    ([], False),
    ("not json", False),
])
def test_is_bundle(tmp_path, manifest, ok):
    (tmp_path / "manifest.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    assert store.is_bundle(tmp_path) is ok


def test_is_bundle_on_unreadable_or_missing_manifests(tmp_path):
    assert store.is_bundle(tmp_path) is False
    (tmp_path / "manifest.json").mkdir()
    assert store.is_bundle(tmp_path) is False
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "manifest.json").write_text("[" * 100000 + "]" * 100000)
    assert store.is_bundle(deep) is False


def test_check_replaceable_exactly(tmp_path):
    store.check_replaceable(tmp_path / "new")  # nothing there: fine
    empty = tmp_path / "empty"
    empty.mkdir()
    store.check_replaceable(empty)
    store.check_replaceable(bundle(tmp_path / "b"))
    link = tmp_path / "link"
    link.symlink_to(empty)
    cases = {link: f"{link}: is a symlink; give the real folder as the output path."}
    f = tmp_path / "file"
    f.write_text("x")
    cases[f] = f"{f}: exists and is not a folder. Choose another output path."
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    cases[mine] = (f"{mine}: exists, is not empty and is not an mmopt bundle; refusing to replace it. Choose an "
                   "empty or new output folder.")
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text("{}")
    cases[other] = (f"{other}: exists, is not empty and holds a manifest.json that is not an mmopt bundle's; "
                    "refusing to replace it. Choose an empty or new output folder.")
    for target, message in cases.items():
        with pytest.raises(BundleError) as e:
            store.check_replaceable(target)
        assert str(e.value) == message


def test_manifest_digest(tmp_path):
    import hashlib

    assert store.manifest_digest(tmp_path) is None
    (tmp_path / "manifest.json").write_bytes(b"{}")
    assert store.manifest_digest(tmp_path) == hashlib.sha256(b"{}").hexdigest()
    d = tmp_path / "d"
    (d / "manifest.json").mkdir(parents=True)
    with pytest.raises(BundleError, match=r"manifest.json: cannot be read \(Is a directory\)\.$"):
        store.manifest_digest(d)


# ---- the lock's settings and wait --------------------------------------------------------------

@pytest.mark.parametrize("raw, seconds", [(None, 600.0), ("2.5", 2.5), ("0", 0.0), ("-3", 0.0)])
def test_lock_timeout(monkeypatch, raw, seconds):
    if raw is None:
        monkeypatch.delenv(store.LOCK_TIMEOUT_ENV, raising=False)
    else:
        monkeypatch.setenv(store.LOCK_TIMEOUT_ENV, raw)
    assert store._lock_timeout() == seconds


def test_a_bad_lock_timeout_is_named(monkeypatch):
    monkeypatch.setenv(store.LOCK_TIMEOUT_ENV, "soon")
    with pytest.raises(BundleError) as e:
        store._lock_timeout()
    assert str(e.value) == "environment variable MMOPT_LOCK_TIMEOUT='soon': give a number of seconds."


def test_the_waiter_says_once_that_it_waits_and_gives_up_at_its_deadline(tmp_path, monkeypatch):
    monkeypatch.setenv(store.LOCK_TIMEOUT_ENV, "0.2")
    said: list[str] = []
    w = store._Waiter(tmp_path / "out", said.append)
    w.wait(held=False)
    assert said == [] and w.said is False
    w.wait(held=True)
    w.wait(held=True)
    assert said == [f"waiting for another mmopt process that is writing {tmp_path / 'out'} ..."]
    time.sleep(0.25)
    with pytest.raises(BundleError) as e:
        w.wait(held=True)
    assert str(e.value) == (f"{tmp_path / 'out'}: another mmopt process is still writing it (or a process holds a "
                            f"lock on {tmp_path}) after 0 s. Wait for it to finish (or stop it), then run again; "
                            "MMOPT_LOCK_TIMEOUT sets how long to wait.")


def test_a_second_writer_waits_for_the_first_then_works_on_what_it_left(tmp_path, monkeypatch):
    monkeypatch.setenv(store.LOCK_TIMEOUT_ENV, "30")
    target = bundle(tmp_path / "out", generation=0)
    inside, release = threading.Event(), threading.Event()

    def first():
        with store.transaction(target, keep_existing=True, log=lambda m: None) as stage:
            inside.set()
            release.wait(10)
            # replaced, never written through: the stage's files are hard links to the live bundle's
            store.atomic_write(stage / "manifest.json", json.dumps({"schema_version": 2, "kind": store.KIND,
                                                                    "generation": 1}).encode())

    t = threading.Thread(target=first)
    t.start()
    inside.wait(10)
    said: list[str] = []
    threading.Timer(0.3, release.set).start()
    with store.transaction(target, keep_existing=True, log=said.append) as stage:
        seen = json.loads((stage / "manifest.json").read_text())["generation"]
    t.join(10)
    assert seen == 1
    assert said == [f"waiting for another mmopt process that is writing {target} ...",
                    f"{target}: the other writer finished; continuing"]


# ---- transaction -------------------------------------------------------------------------------

def test_a_transaction_replaces_the_bundle_and_leaves_nothing_beside_it(tmp_path):
    target = bundle(tmp_path / "out", generation=0)
    (target / "keep.txt").write_text("k")
    (target / "sub").mkdir()
    (target / "sub" / "w.bin").write_text("w")
    (target / "ln").symlink_to("keep.txt")
    with store.transaction(target, keep_existing=True, log=lambda m: None) as stage:
        assert stage.parent == tmp_path and stage.name.startswith(".out.") and stage.name.endswith(".partial")
        assert (stage / "keep.txt").stat().st_ino == (target / "keep.txt").stat().st_ino  # hard links
        assert (stage / "sub" / "w.bin").read_text() == "w"
        assert not (stage / "ln").exists()  # symlinks are not carried into a bundle
        assert oct(stage.stat().st_mode & 0o777) == oct(0o777 & ~store._umask())
        (stage / "new.txt").write_text("n")
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt", "manifest.json", "new.txt", "sub"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_fresh_transaction_starts_empty(tmp_path):
    target = bundle(tmp_path / "out")
    with store.transaction(target, log=lambda m: None) as stage:
        assert list(stage.iterdir()) == []
        (stage / "manifest.json").write_text(json.dumps({"schema_version": 2, "kind": store.KIND}))
    assert [p.name for p in target.iterdir()] == ["manifest.json"]


def test_a_failed_or_interrupted_transaction_changes_nothing(tmp_path):
    target = bundle(tmp_path / "out", generation=0)
    said: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        with store.transaction(target, keep_existing=True, log=said.append) as stage:
            (stage / "x").write_text("x")
            raise KeyboardInterrupt
    assert said == [f"{target}: interrupted; nothing was written, the earlier bundle is unchanged"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and [p.name for p in target.iterdir()] == \
        ["manifest.json"]
    said.clear()
    with pytest.raises(KeyboardInterrupt):
        with store.transaction(tmp_path / "new", log=said.append):
            raise KeyboardInterrupt
    assert said == [f"{tmp_path / 'new'}: interrupted; nothing was written"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the folder it made is gone too


def test_a_change_by_a_process_that_ignores_the_lock_fails_the_commit(tmp_path):
    target = bundle(tmp_path / "out")
    for change in (lambda: (target / "manifest.json").write_text("{}"), lambda: (target / "new").write_text("x"),
                   lambda: (target / "manifest.json").unlink()):
        with pytest.raises(BundleError) as e:
            with store.transaction(target, log=lambda m: None):
                change()
        assert str(e.value) == (f"{target}: was changed by another process while this run worked on it (files added, "
                                "removed or rewritten by something that does not take mmopt's lock). Nothing was "
                                "written; run again.")
        for p in list(target.iterdir()):
            p.unlink()
        (target / "manifest.json").write_text(json.dumps({"schema_version": 2, "kind": store.KIND}))


def test_disk_errors_while_staging_are_named_at_the_bundle(tmp_path):
    target = bundle(tmp_path / "out")
    with pytest.raises(BundleError) as e:
        with store.transaction(target, log=lambda m: None) as stage:
            raise OSError(errno.ENOSPC, "No space left on device", str(stage / "a.onnx"))
    assert str(e.value) == (f"{target}: could not be written (No space left on device: {target / 'a.onnx'}). Nothing "
                            "was written; the earlier bundle, if any, is unchanged. Free space or choose another "
                            "output folder.")
    with pytest.raises(OSError) as e:  # not a disk error, or not in the stage: passed on as it is
        with store.transaction(target, log=lambda m: None):
            raise OSError(errno.ENOENT, "No such file or directory", "/elsewhere")
    assert not isinstance(e.value, BundleError)


def test_an_output_folder_that_cannot_be_made_or_written(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(BundleError) as e:
        with store.transaction(f / "out", log=lambda m: None):
            pass
    assert str(e.value).startswith(f"{f / 'out'}: cannot create its parent folder {f} (")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(BundleError) as e:
            with store.transaction(ro / "out", log=lambda m: None):
                pass
        assert str(e.value) == f"{ro / 'out'}: its folder {ro} is not writable. Choose another output path."
    finally:
        ro.chmod(0o755)


# ---- recover / swap ----------------------------------------------------------------------------

def test_recover_removes_only_dead_writers_siblings_of_this_bundle(tmp_path):
    target = bundle(tmp_path / "out")
    dead = tmp_path / ".out.123.abcdefgh.partial"
    assert store._abandoned(tmp_path / "missing") is False
    dead.mkdir()
    live = tmp_path / ".out.124.abcdefgi.partial"
    live.mkdir()
    others = [tmp_path / ".out.1.123.abcdefgh.partial", tmp_path / ".out.12.abc.partial",
              tmp_path / ".outx.123.abcdefgh.partial"]
    for p in others:
        p.mkdir()
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert store._flock(fd)
        said: list[str] = []
        assert store.recover(target, said.append) is False
    finally:
        os.close(fd)
    assert not dead.exists() and live.exists() and all(p.exists() for p in others)
    assert said == [f"{target}: removed .out.123.abcdefgh.partial, left by an mmopt run that is gone"]


def test_recover_puts_a_dead_fallbacks_old_bundle_back_onto_an_empty_folder(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    old = bundle(tmp_path / ".out.99.abcdefgh.old", generation=4)
    partial = tmp_path / ".out.10.abcdefgh.partial"  # sorts before the .old: the .old is handled first
    partial.mkdir()
    said: list[str] = []
    assert store.recover(target, said.append) is True
    assert json.loads((target / "manifest.json").read_text())["generation"] == 4 and not old.exists()
    assert said == [f"{target}: restored the earlier bundle from .out.99.abcdefgh.old, left by a run killed during "
                    "its commit"]
    assert partial.exists()  # the caller locks the restored folder, then recovers again
    said.clear()
    assert store.recover(target, said.append) is False and not partial.exists()


def test_recover_keeps_an_old_bundle_it_cannot_put_back(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    old = bundle(tmp_path / ".out.99.abcdefgh.old")
    partial = tmp_path / ".out.99.abcdefgh.partial"
    partial.mkdir()
    said: list[str] = []
    assert store.recover(target, said.append) is False
    assert old.exists() and not partial.exists() and said == [
        f"{target}: kept .out.99.abcdefgh.old (the earlier bundle, left by a run killed during its commit): {target} "
        "is not an mmopt bundle now. Move it back by hand if you need it.",
        f"{target}: removed .out.99.abcdefgh.partial, left by an mmopt run that is gone"]
    new = bundle(tmp_path / "new")  # once the target is a bundle, an old copy beside it is litter
    old2 = bundle(tmp_path / ".new.99.abcdefgh.old")
    assert store.recover(new, said.append) is False and not old2.exists()


def test_the_exchange_swaps_two_folders_in_one_step(tmp_path):
    a, b = bundle(tmp_path / "a", n=1), bundle(tmp_path / "b", n=2)
    assert store._exchange(a, b) is True
    assert json.loads((a / "manifest.json").read_text())["n"] == 2
    with pytest.raises(OSError) as e:
        store._exchange(a, tmp_path / "missing")
    assert (e.value.errno, e.value.strerror, e.value.filename) == (errno.ENOENT, os.strerror(errno.ENOENT),
                                                                   str(tmp_path / "missing"))


def test_the_two_rename_fallback(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "_exchange", lambda a, b: False)
    target = bundle(tmp_path / "out", n=1)
    stage = bundle(tmp_path / ".out.1.abcdefgh.partial", n=2)
    old = store.swap_in(stage, target, store._Waiter(target, lambda m: None))
    assert old.parent == tmp_path and re.fullmatch(rf"\.out\.{os.getpid()}\.[0-9a-f]{{8}}\.old", old.name)
    assert json.loads((old / "manifest.json").read_text())["n"] == 1
    assert json.loads((target / "manifest.json").read_text())["n"] == 2 and not stage.exists()


def test_copy_falls_back_to_copying_where_hard_links_fail(tmp_path, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_text("f")
    dst.mkdir()

    def no_links(a, b):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    store._copy_tree(src, dst)
    assert (dst / "d" / "f").read_text() == "f"
    assert (dst / "d" / "f").stat().st_ino != (src / "d" / "f").stat().st_ino


def test_a_folder_this_writer_made_is_dropped_only_if_empty(tmp_path):
    made = tmp_path / "made"
    made.mkdir()
    store._drop_if_empty(made, created=False)
    assert made.exists()
    store._drop_if_empty(made, created=True)
    assert not made.exists()
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    store._drop_if_empty(full, created=True)
    assert (full / "x").exists()


def test_folders_that_cannot_be_locked_opened_made_or_replaced(tmp_path, monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(BundleError) as e:
        store._open_dir(f)
    assert str(e.value) == f"{f}: cannot be opened (Not a directory). Choose another output path."
    assert store._open_dir(tmp_path / "missing") is None
    with pytest.raises(BundleError) as e:
        store.check_replaceable(Path("/"))
    assert str(e.value) == ("/: is a mount point, which cannot be replaced atomically. Write the bundle to a folder "
                            "inside it, e.g. -o /bundle.")
    waiter = store._Waiter(tmp_path / "x", lambda m: None)
    assert store._make_empty(tmp_path, waiter) is False  # exists already
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    assert store._make_empty(dangling, waiter) is False and dangling.is_symlink()
    assert store._make_empty(tmp_path / "made", waiter) is True and (tmp_path / "made").is_dir()

    def no_mkdir(self, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", no_mkdir)
    with pytest.raises(BundleError) as e:
        store._make_empty(tmp_path / "denied", waiter)
    assert str(e.value) == (f"{tmp_path / 'denied'}: cannot be created (Permission denied). Choose an output path in "
                            "a folder you can write.")
    monkeypatch.undo()

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(BundleError) as e:
            store._flock(fd)
    finally:
        os.close(fd)
    assert str(e.value) == ("cannot lock the bundle folder (No locks available): this filesystem does not support "
                            "flock on folders (NFS or CIFS?). Write the bundle on a local disk, then copy it.")


def test_a_ctrl_c_a_library_swallowed_still_stops_the_commit(tmp_path, monkeypatch):
    """torch's exporter catches a KeyboardInterrupt and retries with another strategy; the CLI's handler has
    noted the signal, and the transaction refuses to commit what the interrupted run went on to write."""
    from mmopt import errors

    monkeypatch.setattr(errors, "_INTERRUPTED", [False])
    target = bundle(tmp_path / "out", generation=0)
    said: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        with store.transaction(target, log=said.append) as stage:
            (stage / "manifest.json").write_text(json.dumps({"schema_version": 2, "kind": store.KIND}))
            errors.note_interrupt()  # the signal arrived; the library swallowed its KeyboardInterrupt
    assert json.loads((target / "manifest.json").read_text())["generation"] == 0
    assert said == [f"{target}: interrupted; nothing was written, the earlier bundle is unchanged"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
