"""Faults: processes killed at every step of a commit, writers racing, a writer that ignores the lock.

The commit protocol is driven in subprocesses (``commit_driver.py``) that SIGKILL themselves at each
step, with the atomic exchange and with the two-rename fallback. After every kill, OUT holds a whole
bundle (the old or the new one; with the fallback, the next writer restores the old one), and the next
writer removes what the dead one left, saying so. Real ``mmopt`` processes are killed and raced too.
"""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from reliability_support import cli, litter, refused, snapshot

from mmopt import store
from mmopt.errors import BundleError
from support import ROOT

DRIVER = Path(__file__).with_name("commit_driver.py")
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def fake_bundle(folder: Path, generation: int = 0) -> Path:
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"schema_version": 2, "kind": store.KIND,
                                                      "generation": generation}))
    (folder / f"gen{generation}.txt").write_text("old\n")
    return folder


def generation(folder: Path) -> int:
    return json.loads((folder / "manifest.json").read_text())["generation"]


def drive(target: Path, step: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DRIVER), str(target), step, *flags], env=ENV, capture_output=True,
                          text=True, timeout=60)


STEPS = [("staged", (), 0), ("written", (), 0), ("swapped", (), 1),
         ("old-renamed", ("--two-renames",), None), ("new-renamed", ("--two-renames",), 1)]


@pytest.mark.parametrize("step, flags, left", STEPS, ids=[f"{s}{'-two-renames' if f else ''}" for s, f, _ in STEPS])
def test_sigkill_at_every_commit_step_leaves_a_whole_bundle_and_the_next_writer_recovers(tmp_path, step, flags, left):
    target = fake_bundle(tmp_path / "out")
    old = snapshot(target)
    r = drive(target, step, *flags)
    assert r.returncode == -signal.SIGKILL, r.stderr
    if left is None:  # the fallback's one gap: between its renames OUT is absent, the old bundle beside it
        assert not target.exists() and any(n.endswith(".old") for n in litter(tmp_path))
    else:
        assert store.is_bundle(target) and generation(target) == left
        assert (target / f"gen{left}.txt").exists()
        if left == 0:
            assert snapshot(target) == old
    assert litter(tmp_path), "a killed writer leaves its hidden folder"
    r = drive(target, "none", *flags)  # the next writer: recovers, then commits on top
    assert r.returncode == 0, r.stderr
    assert "removed" in r.stderr or "restored" in r.stderr
    if left is None:
        assert "restored the earlier bundle" in r.stderr
    assert generation(target) == (left or 0) + 1
    assert litter(tmp_path) == []


def test_a_commit_that_ran_to_the_end_leaves_nothing_beside_it(tmp_path):
    target = fake_bundle(tmp_path / "out")
    for flags in ((), ("--two-renames",)):
        r = drive(target, "none", *flags)
        assert r.returncode == 0 and "note:" not in r.stderr, r.stderr
    assert generation(target) == 2 and litter(tmp_path) == []


def test_a_writer_that_ignores_the_lock_makes_the_commit_fail_cleanly(tmp_path):
    """A pause between read and commit, during which someone else rewrites manifest.json: no lost update."""
    target = fake_bundle(tmp_path / "out")
    with pytest.raises(BundleError, match="changed by another process"):
        with store.transaction(target, keep_existing=True, log=lambda m: None) as stage:
            (stage / "manifest.json").unlink()
            (stage / "manifest.json").write_text(json.dumps({"schema_version": 2, "kind": store.KIND,
                                                             "generation": 5}))
            (target / "manifest.json").write_text(json.dumps({"schema_version": 2, "kind": store.KIND,
                                                              "generation": 9}))  # the other writer
    assert generation(target) == 9 and litter(tmp_path) == []


def _hold_lock(folder: Path, seconds: float) -> subprocess.Popen:
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(float(sys.argv[2]))")
    p = subprocess.Popen([sys.executable, "-c", code, str(folder), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_second_writer_waits_with_a_message_then_commits(tmp_path):
    target = fake_bundle(tmp_path / "out")
    holder = _hold_lock(target, 1.0)
    said: list[str] = []
    t0 = time.monotonic()
    with store.transaction(target, keep_existing=True, log=said.append) as stage:
        (stage / "x.txt").write_text("mine")
    holder.wait()
    assert time.monotonic() - t0 > 0.5
    assert any("waiting for another mmopt process" in s for s in said)
    assert (target / "x.txt").read_text() == "mine"


def test_lock_timeout_is_a_clear_error_and_the_bundle_is_untouched(project):
    holder = _hold_lock(project.bundle, 20)
    try:
        before = snapshot(project.bundle)
        r = cli("quantize", project.bundle, "-p", "image=fp16", env={store.LOCK_TIMEOUT_ENV: "0.3"})
        refused(r, "another mmopt process is still writing it", store.LOCK_TIMEOUT_ENV)
        assert snapshot(project.bundle) == before and litter(project.root) == []
    finally:
        holder.kill()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o027, 0o750), (0o002, 0o775)])
def test_new_bundles_get_the_modes_the_umask_implies(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        with store.transaction(tmp_path / "out", log=lambda m: None) as stage:
            (stage / "manifest.json").write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == mode


def test_exported_bundle_is_readable_by_others(exported):
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(exported.bundle.stat().st_mode) == 0o777 & ~mask
    for f in exported.bundle.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask


def test_export_with_failing_precision_keeps_the_earlier_bundle(project):
    (project.root / "badcal.py").write_text("def cal():\n    raise RuntimeError('bucket gone')\n    yield\n")
    text = project.config.read_text().replace("toydata:calibration_batches", "badcal:cal")
    project.config.write_text(text + '\n[precision]\nimage = "int8"\n')
    before = snapshot(project.bundle)
    r = cli("export", project.config, "-o", project.bundle)
    refused(r, "calibration.source", "bucket gone")
    assert snapshot(project.bundle) == before and litter(project.root) == []


def _mmopt(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mmopt", *args], env={**ENV, "COLUMNS": "200"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _export_until_staged(project) -> subprocess.Popen:
    """A real ``mmopt export`` over the project's bundle, returned once its staged folder exists."""
    p = _mmopt("export", str(project.config), "-o", str(project.bundle))
    deadline = time.monotonic() + 120
    while not litter(project.root) and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert litter(project.root), "the export never staged its bundle"
    return p


def test_export_killed_mid_run_keeps_the_old_bundle_and_the_next_run_cleans_up(project):
    before = snapshot(project.bundle)
    p = _export_until_staged(project)
    time.sleep(0.5)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert snapshot(project.bundle) == before
    assert cli("verify", project.bundle).code == 0  # readers never see the dead writer's folder
    r = cli("export", project.config, "-o", project.bundle)
    assert r.code == 0, r.err
    assert "left by an mmopt run that is gone" in r.text
    assert litter(project.root) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_export_stopped_by_a_signal_cleans_up_after_itself(project, sig):
    before = snapshot(project.bundle)
    p = _export_until_staged(project)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    # 130, or death by SIGINT (-2) when the interpreter re-raises it on the way out: a shell shows $? = 130
    assert p.returncode in (130, -signal.SIGINT) and "Traceback" not in err, err
    assert "interrupted; nothing was written, the earlier bundle is unchanged" in " ".join(err.split())
    assert snapshot(project.bundle) == before and litter(project.root) == []


def test_two_quantize_runs_on_one_bundle_lose_no_update(project):
    holder = _hold_lock(project.bundle, 12)  # both runs reach the lock while it is held: they must queue
    a = _mmopt("quantize", str(project.bundle), "-p", "image=fp16", "--no-sensitivity")
    b = _mmopt("quantize", str(project.bundle), "-p", "text=fp16", "--no-sensitivity")
    outs = [p.communicate(timeout=300) for p in (a, b)]
    holder.wait()
    assert a.returncode == 0 and b.returncode == 0, outs
    assert all("waiting for another mmopt process" in err for _, err in outs), outs
    ids = {x["id"] for x in json.loads(project.manifest.read_text())["artifacts"]}
    assert {"image/fp16/fp16", "text/fp16/fp16"} <= ids
    assert cli("verify", project.bundle).code == 0 and litter(project.root) == []


def _dead_pid() -> int:
    return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # no process can have it


def test_recovery_never_touches_another_bundles_folders(tmp_path):
    """``out``'s next writer removes only ``out``'s dead folders, not those of ``out.<n>`` beside it."""
    target = fake_bundle(tmp_path / "out")
    dead = _dead_pid()
    theirs = tmp_path / f".out.{dead}.{dead + 1}.abcdefgh.partial"  # the stage of a bundle named out.<dead>
    theirs.mkdir()
    mine = tmp_path / f".out.{dead}.abcdefgh.partial"
    mine.mkdir()
    said: list[str] = []
    with store.transaction(target, keep_existing=True, log=said.append):
        pass
    assert theirs.exists() and not mine.exists()
    assert any(mine.name in s for s in said)


def test_writers_of_two_new_bundles_in_one_folder_do_not_wait_for_each_other(tmp_path, monkeypatch):
    """Only the bundle folder is locked for the run; its parent only while the empty folder is made."""
    monkeypatch.setenv(store.LOCK_TIMEOUT_ENV, "2")  # fail, not hang, if the parent were held
    said: list[str] = []
    with store.transaction(tmp_path / "a", log=said.append) as stage_a:
        (stage_a / "manifest.json").write_text("{}")
        with store.transaction(tmp_path / "b", log=said.append) as stage_b:  # would wait forever if not
            (stage_b / "manifest.json").write_text("{}")
    assert not said and (tmp_path / "a" / "manifest.json").exists() and (tmp_path / "b" / "manifest.json").exists()


def test_a_failed_first_export_leaves_no_folder_behind(tmp_path):
    with pytest.raises(RuntimeError):
        with store.transaction(tmp_path / "new", log=lambda m: None):
            raise RuntimeError("export failed")
    assert list(tmp_path.iterdir()) == []


def test_an_error_between_the_fallback_renames_puts_the_old_bundle_back(tmp_path, monkeypatch):
    target = fake_bundle(tmp_path / "out")
    before = snapshot(target)
    monkeypatch.setattr(store, "_exchange", lambda a, b: False)
    real = os.rename
    calls = []

    def rename(a, b):
        calls.append(b)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(BundleError, match="the earlier bundle is unchanged"):
        with store.transaction(target, keep_existing=True, log=lambda m: None) as stage:
            (stage / "new.txt").write_text("x")
    monkeypatch.undo()
    assert snapshot(target) == before and litter(tmp_path) == []


@pytest.mark.parametrize("now", ["empty folder", "someone's files"])
def test_an_old_bundle_left_by_a_killed_fallback_is_restored_or_kept_never_deleted(tmp_path, now):
    old = fake_bundle(tmp_path / f".out.{_dead_pid()}.abcdefgh.old", generation=4)
    target = tmp_path / "out"
    target.mkdir()  # e.g. a CI step made the folder again after the crash
    if now != "empty folder":
        (target / "notes.txt").write_text("mine")
    said: list[str] = []
    if now == "empty folder":
        with store.transaction(target, keep_existing=True, log=said.append) as stage:
            assert generation(stage) == 4  # the writer works on the restored bundle
        assert generation(target) == 4 and not old.exists()
        assert any("restored the earlier bundle" in s for s in said)
    else:
        with pytest.raises(BundleError, match="not an mmopt bundle"):
            with store.transaction(target, log=said.append):
                pass
        assert old.exists() and (target / "notes.txt").read_text() == "mine"
        assert any("kept" in s for s in said)


def test_errors_name_the_bundle_not_its_hidden_stage(tmp_path):
    target = fake_bundle(tmp_path / "out")
    with pytest.raises(BundleError) as e:
        with store.transaction(target, keep_existing=True, log=lambda m: None) as stage:
            raise BundleError(f"{stage / 'text.onnx'}: sha256 mismatch")
    assert str(e.value) == f"{target / 'text.onnx'}: sha256 mismatch"


@pytest.mark.parametrize("err", [28, 122, 30], ids=["ENOSPC", "EDQUOT", "EROFS"])
def test_a_full_disk_while_writing_is_a_clear_error(tmp_path, err):
    target = fake_bundle(tmp_path / "out")
    before = snapshot(target)
    with pytest.raises(BundleError, match="could not be written"):
        with store.transaction(target, keep_existing=True, log=lambda m: None) as stage:
            raise OSError(err, os.strerror(err), str(stage / "image.int8.onnx"))
    assert snapshot(target) == before and litter(tmp_path) == []


def test_no_writer_starts_between_the_fallback_renames(tmp_path):
    """While one writer is between its two renames (OUT absent), a second waits for it, then commits
    on top of the first one's bundle."""
    target = fake_bundle(tmp_path / "out")
    first = subprocess.Popen([sys.executable, str(DRIVER), str(target), "pause-between", "--two-renames"], env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert first.stdout.readline().strip() == "between"
    assert not target.exists()
    second = drive(target, "none", "--two-renames")
    first.wait(timeout=60)
    assert first.returncode == 0 and second.returncode == 0, second.stderr
    assert generation(target) == 2 and litter(tmp_path) == []


def test_waiters_woken_by_an_exchange_lock_the_new_folder(tmp_path):
    """Three writers queued on one bundle: each wakes on the folder the last one swapped in, so none
    works from a stale copy and the generation counts all three."""
    target = fake_bundle(tmp_path / "out")
    first = subprocess.Popen([sys.executable, str(DRIVER), str(target), "slow"], env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert first.stdout.readline().strip() == "staged"
    others = [subprocess.Popen([sys.executable, str(DRIVER), str(target), "none"], env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in (first, *others):
        p.wait(timeout=60)
        assert p.returncode == 0, p.stderr.read()
    assert generation(target) == 3 and litter(tmp_path) == []


def test_a_leftover_is_judged_by_its_lock_not_by_its_pid(tmp_path):
    """Pids are reused and differ inside containers: a leftover named after a live pid (1) but held by
    no one is removed; one held by a live writer is left alone, whatever pid its name carries."""
    target = fake_bundle(tmp_path / "out")
    orphan = tmp_path / ".out.1.abcdefgh.partial"
    orphan.mkdir()
    live = tmp_path / f".out.{_dead_pid()}.ijklmnop.partial"
    live.mkdir()
    holder = _hold_lock(live, 10)
    try:
        with store.transaction(target, keep_existing=True, log=lambda m: None):
            pass
        assert not orphan.exists() and live.exists()
    finally:
        holder.kill()


def test_files_added_to_the_bundle_during_a_run_are_not_lost(tmp_path):
    target = fake_bundle(tmp_path / "out")
    with pytest.raises(BundleError, match="was changed by another process"):
        with store.transaction(target, keep_existing=True, log=lambda m: None):
            (target / "notes.txt").write_text("mine")  # a process that ignores mmopt's lock
    assert (target / "notes.txt").read_text() == "mine" and litter(tmp_path) == []


def test_a_held_parent_folder_times_out_clearly(tmp_path, monkeypatch):
    """``flock DIR cmd`` is a common CI idiom: mmopt making a new bundle inside DIR waits, then says why."""
    monkeypatch.setenv(store.LOCK_TIMEOUT_ENV, "0.5")
    holder = _hold_lock(tmp_path, 10)
    try:
        with pytest.raises(BundleError, match="holds a lock on"):
            with store.transaction(tmp_path / "new", log=lambda m: None):
                pass
        assert not (tmp_path / "new").exists()
    finally:
        holder.kill()


def test_external_weights_of_a_large_graph_are_hashed_and_checked(tmp_path):
    """A graph past 2 GB keeps its weights in FILE.data: the manifest hashes that file too, and a changed
    or missing one fails the integrity check like the graph itself."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from mmopt.manifest import Manifest
    from mmopt.spec import ComponentSpec, TensorSpec
    from mmopt.stages.export import save

    x = TensorSpec("x", "float32", ("batch", 64), {"min": (1, 64), "opt": (2, 64), "max": (4, 64)})
    y = TensorSpec("y", "float32", ("batch", 64), {"min": (1, 64), "opt": (2, 64), "max": (4, 64)})
    comp = ComponentSpec("image", "encoder", "enc", (x,), (y,), {"x": "input:x"})
    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")  # past onnx's 1 KiB external threshold
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])], [w])
    bundle = tmp_path / "b"
    bundle.mkdir()
    save(helper.make_model(graph), bundle / "image.onnx", large=True)
    assert (bundle / "image.onnx.data").exists()
    cfg = tmp_path / "mmopt.toml"
    cfg.write_text("x")
    from mmopt.manifest import sha256_file

    m = Manifest(model={"config": str(cfg), "config_sha256": sha256_file(cfg), "factory": "m:f", "checkpoint": None,
                        "checkpoint_sha256": None}, model_inputs=[x], model_outputs=[y], components={"image": comp})
    m.add(bundle, "image", "export", "fp32", "image.onnx")
    m.write(bundle)
    assert Manifest.read_checked(bundle)[1] == []
    (bundle / "image.onnx.data").write_bytes(b"\0" * 64)
    assert Manifest.read_checked(bundle)[1] == [("image.onnx.data", "sha256 mismatch (modified after export)")]
    onnx.checker.check_model(str(bundle / "image.onnx"))  # the graph itself is untouched
