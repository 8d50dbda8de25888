"""The bundle store: where a bundle's files may be, who may write it, and how a write commits.

Four guarantees, each in one place here (docs/reliability.md says how each is tested):

- **Confinement.** ``confine`` is the only way a path read from a manifest becomes a file path: it
  must be relative, normalised, free of ``..`` and resolve (symlinks included) inside the bundle.
- **Single writer.** ``transaction`` holds an exclusive ``flock`` on the bundle folder (a bundle not
  made yet is first created empty, under a brief lock on its parent) from before the manifest is read
  until the commit, and commits only if ``manifest.json`` is unchanged since then. A second writer waits, saying so, then works on
  the bundle the first one left.
- **Atomic replace.** The new bundle is written into a hidden sibling folder, then swapped with the
  old one in one ``renameat2(RENAME_EXCHANGE)``: at every instant OUT is either the old bundle or the
  new one. Where the kernel or filesystem lacks the exchange, two renames are used under the parent's
  lock, and a kill between them is repaired by the next writer (the old bundle is put back).
- **Nothing foreign is replaced.** A folder is replaced only when it is empty or holds an mmopt
  bundle (its manifest names mmopt's kind); anything else is refused.

Writers leave hidden siblings only while they run: ``.OUT.<pid>.<random>.partial`` (the bundle being
written, or the old one just swapped out) and ``.OUT.<pid>.old`` (fallback swap). The next writer of
OUT removes those whose process is gone, and says so.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from mmopt_runtime.paths import escape
from mmopt.errors import BundleError, MmoptError, interrupted

KIND = "mmopt-bundle"
MANIFEST = "manifest.json"
LOCK_TIMEOUT_ENV = "MMOPT_LOCK_TIMEOUT"  # seconds a writer waits for another one (default 600)
Log = Callable[[str], None]


# ---- one atomic writer ------------------------------------------------------------------------
def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``path`` whole or not at all: a temporary sibling, then one rename over the old name. The
    old name is replaced, never written through (a staged bundle hard-links the live bundle's files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---- confinement -----------------------------------------------------------------------------
def confine(bundle: str | Path, rel: Any, field: str) -> Path:
    """``bundle / rel`` resolved, if ``rel`` is a plain relative path that stays inside ``bundle``.

    ``field`` names where ``rel`` was read (e.g. ``artifacts[2].file``) for the error message. Nothing
    is opened: a path is refused before any file it names is touched.
    """
    root = Path(bundle).resolve()
    where = f"{Path(bundle) / MANIFEST}: field '{field}'"
    if not isinstance(rel, str) or not rel:
        raise BundleError(f"{where}: must be a file name inside the bundle, got {rel!r}. Re-export the bundle.")
    full, problem = escape(root, rel, "bundle")
    if problem:
        raise BundleError(f"{where}: {rel!r} {problem}. A bundle may only name files inside itself; this "
                          "manifest was edited or is not from mmopt. Re-export the bundle.")
    return full


def writable(folder: Path) -> bool:
    """May a new entry be made in ``folder``? A folder with no write bit at all counts as read-only even
    for root, who could write there anyway: a read-only folder is a choice to respect."""
    try:
        mode = folder.stat().st_mode
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK) and bool(mode & 0o222)


# ---- what may be replaced ------------------------------------------------------------------
def is_bundle(folder: Path) -> bool:
    """True when ``folder/manifest.json`` parses as an mmopt bundle manifest (mmopt's kind and a schema
    version; schema 1 bundles, written before the kind field existed, are known by their tool list)."""
    try:
        text = (folder / MANIFEST).read_text()
        d = json.loads(text)
    except (OSError, ValueError, RecursionError):
        return False
    if not isinstance(d, dict) or not isinstance(d.get("schema_version"), int):
        return False
    if d.get("kind") == KIND:
        return True
    tools = d.get("tools")
    return d.get("schema_version") == 1 and isinstance(tools, dict) and "mmopt" in tools \
        and isinstance(d.get("artifacts"), list)


@dataclasses.dataclass(frozen=True)
class Kind:
    """What a store folder holds: its noun in messages, the file that marks it as mmopt's, whether a folder is
    one (``mine``), and a name to suggest for it. Bundles, packages and Triton repositories are written through
    the one ``transaction``, each with its kind."""

    noun: str
    marker: str
    mine: Callable[[Path], bool]
    suggest: str


BUNDLE = Kind("bundle", MANIFEST, lambda p: is_bundle(p), "bundle")


def check_replaceable(target: Path, kind: Kind = BUNDLE) -> None:
    if target.is_symlink():
        raise BundleError(f"{target}: is a symlink; give the real folder as the output path.")
    if not target.exists():
        return
    if os.path.ismount(target):
        raise BundleError(f"{target}: is a mount point, which cannot be replaced atomically. Write the {kind.noun} "
                          f"to a folder inside it, e.g. -o {target / kind.suggest}.")
    if not target.is_dir():
        raise BundleError(f"{target}: exists and is not a folder. Choose another output path.")
    try:
        empty = not any(target.iterdir())
    except OSError as e:
        raise BundleError(f"{target}: cannot be listed ({e.strerror}). Choose another output path.") from None
    if not empty and not kind.mine(target):
        what = f"holds a {kind.marker} that is not an mmopt {kind.noun}'s" if (target / kind.marker).exists() \
            else f"is not an mmopt {kind.noun}"
        raise BundleError(f"{target}: exists, is not empty and {what}; refusing to replace it. "
                          "Choose an empty or new output folder.")


def manifest_digest(folder: Path, marker: str = MANIFEST) -> str | None:
    try:
        return hashlib.sha256((folder / marker).read_bytes()).hexdigest()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise BundleError(f"{folder / MANIFEST}: cannot be read ({e.strerror}).") from None


# ---- single writer -------------------------------------------------------------------------
def _lock_timeout() -> float:
    raw = os.environ.get(LOCK_TIMEOUT_ENV, "600")
    try:
        return max(0.0, float(raw))
    except ValueError:
        raise BundleError(f"environment variable {LOCK_TIMEOUT_ENV}={raw!r}: give a number of seconds.") from None


def _flock(fd: int) -> bool:
    """Try to flock ``fd`` exclusively; False when another process holds it. A filesystem that cannot
    flock a folder (NFS, CIFS) is a clear error rather than a traceback."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        raise BundleError(f"cannot lock the bundle folder ({e.strerror}): this filesystem does not support "
                          "flock on folders (NFS or CIFS?). Write the bundle on a local disk, then copy it.") from None


def _open_dir(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise BundleError(f"{path}: cannot be opened ({e.strerror}). Choose another output path.") from None


class _Waiter:
    """The one waiting policy of every lock here: poll, say once that we wait, give up at the deadline."""

    def __init__(self, target: Path, log: Log):
        self.target, self.log, self.said = target, log, False
        self.deadline = time.monotonic() + _lock_timeout()

    def wait(self, held: bool) -> None:
        if held and not self.said:
            self.log(f"waiting for another mmopt process that is writing {self.target} ...")
            self.said = True
        if time.monotonic() > self.deadline:
            raise BundleError(f"{self.target}: another mmopt process is still writing it (or a process holds a "
                              f"lock on {self.target.parent}) after {_lock_timeout():.0f} s. Wait for it to finish "
                              f"(or stop it), then run again; {LOCK_TIMEOUT_ENV} sets how long to wait.")
        time.sleep(0.05)


@contextlib.contextmanager
def _locked_dir(path: Path, waiter: _Waiter) -> Iterator[None]:
    """A short exclusive lock on a folder (the bundle's parent), within the waiter's deadline."""
    while True:
        fd = _open_dir(path)
        if fd is None:
            raise BundleError(f"{path}: disappeared while mmopt was writing beside it.")
        try:
            if _flock(fd):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        waiter.wait(held=True)
    try:
        yield
    finally:
        os.close(fd)


def _make_empty(target: Path, waiter: _Waiter) -> bool:
    """Create ``target`` as an empty folder (modes from the umask) under a brief lock on its parent, so
    the writer can lock the bundle folder itself. True if this call created it."""
    with _locked_dir(target.parent, waiter):
        if target.exists() or target.is_symlink():
            return False
        try:
            target.mkdir()
        except OSError as e:
            raise BundleError(f"{target}: cannot be created ({e.strerror}). Choose an output path in a folder "
                              "you can write.") from None
        return True


@contextlib.contextmanager
def writer_lock(target: Path, log: Log, kind: Kind = BUNDLE) -> Iterator[tuple[bool, _Waiter]]:
    """Exclusive lock on the bundle folder ``target`` for one writer; yields whether this writer created
    ``target`` (as an empty folder, when it did not exist) and the waiting policy for later locks.

    The lock is ``flock`` on the folder itself, so it leaves no file behind and dies with its process.
    A commit swaps the folder for a new inode: a waiter that wakes holding the old one tries again.
    """
    waiter = _Waiter(target, log)
    created = False
    try:
        while True:
            if not target.exists() and not target.is_symlink():
                created = _make_empty(target, waiter) or created
            if not target.is_dir() or target.is_symlink():
                check_replaceable(target, kind)  # a file or a symlink: say so
            fd = _open_dir(target)
            held = False
            if fd is not None:
                try:
                    if _flock(fd):
                        try:
                            if os.fstat(fd).st_ino == os.stat(target).st_ino:
                                break
                        except FileNotFoundError:
                            pass
                    else:
                        held = True
                except BaseException:
                    os.close(fd)
                    raise
                os.close(fd)  # held by another writer, or the folder we locked was swapped meanwhile
            waiter.wait(held)
    except BaseException:
        _drop_if_empty(target, created)
        raise
    try:
        if waiter.said:
            log(f"{target}: the other writer finished; continuing")
        yield created, waiter
    finally:
        os.close(fd)


# ---- stale siblings ------------------------------------------------------------------------
def _abandoned(path: Path) -> bool:
    """Is ``path`` a folder no live writer holds? Every writer holds a flock on its stage and on the old
    bundle folder it swaps out for its whole life; a dead one holds nothing (pids are not trusted: they
    are reused, and differ inside containers)."""
    fd = _open_dir(path)
    if fd is None:
        return False
    try:
        return _flock(fd)
    except BundleError:
        return False
    finally:
        os.close(fd)


def _remove(p: Path, target: Path, log: Log) -> None:
    shutil.rmtree(p, ignore_errors=True)
    if p.exists():
        log(f"{target}: could not remove {p.name}, left by an mmopt run that is gone; remove it by hand")
    else:
        log(f"{target}: removed {p.name}, left by an mmopt run that is gone")


def writers_left(target: Path, suffixes: tuple[str, ...] = ("partial", "old")) -> list[Path]:
    """What writers of ``target`` leave beside it while they run: ``.OUT.<pid>.<8 random chars>.partial`` (the
    stage, or the old folder just swapped out) and ``.old`` (the two-rename fallback's old folder), nothing
    looser: a sibling's folders (OUT.1's are .OUT.1.<pid>...) must never match. Live writers' too."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.\d+\.[A-Za-z0-9_]{{8}}\.({'|'.join(suffixes)})$")
    try:
        return sorted(p for p in target.parent.iterdir() if pattern.match(p.name))
    except OSError:
        return []


def recover(target: Path, log: Log, kind: Kind = BUNDLE) -> bool:
    """Repair or remove what killed writers of ``target`` left beside it (call holding ``target``'s lock).

    A dead writer's ``.old`` (the two-rename fallback, killed between its renames) is the earlier bundle:
    it is put back when ``target`` is the empty folder this writer just found or made, and removed only
    once ``target`` is a bundle; otherwise it is kept and the log says so. Returns True when ``target``
    was replaced, so the caller must lock the restored folder again.
    """
    siblings = writers_left(target)
    if not siblings:
        return False
    dead = [p for p in siblings if p.is_dir() and not p.is_symlink() and _abandoned(p)]
    for p in sorted(dead, key=lambda p: not p.name.endswith(".old")):
        if p.name.endswith(".old") and not kind.mine(target):
            if kind.mine(p) and target.is_dir() and not any(target.iterdir()):
                os.rename(p, target)  # onto the empty folder: one atomic step
                log(f"{target}: restored the earlier {kind.noun} from {p.name}, left by a run killed during its "
                    "commit")
                return True
            log(f"{target}: kept {p.name} (the earlier {kind.noun}, left by a run killed during its commit): "
                f"{target} is not an mmopt {kind.noun} now. Move it back by hand if you need it.")
            continue
        _remove(p, target, log)
    return False


# ---- atomic replace ------------------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2). False where the OS or filesystem cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_in(stage: Path, target: Path, waiter: _Waiter) -> Path:
    """Make ``stage`` the folder at ``target`` (which exists: this writer holds its lock). Returns where the
    old bundle folder now is, for the caller to remove. The caller holds signals off around it."""
    if _exchange(stage, target):
        return stage  # ``stage`` now holds the old bundle
    # Two renames. The parent's lock keeps new writers out of the gap between them; an exception in the
    # gap puts the old bundle back; a kill in the gap is repaired by the next writer's ``recover``.
    old = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.old")
    with _locked_dir(target.parent, waiter):
        os.rename(target, old)
        try:
            os.rename(stage, target)
        except BaseException:
            os.rename(old, target)
            raise
    return old


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _copy_tree(src: Path, dst: Path) -> None:
    """Hard links where possible (later stages replace files, never write through them)."""
    for entry in src.iterdir():
        if entry.is_symlink():
            continue
        if entry.is_dir():
            (dst / entry.name).mkdir()
            _copy_tree(entry, dst / entry.name)
        elif entry.is_file():
            try:
                os.link(entry, dst / entry.name)
            except OSError:
                shutil.copy2(entry, dst / entry.name)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for entry in folder.rglob("*"):
        if entry.is_file() and not entry.is_symlink():
            _fsync(entry)
    _fsync(folder)


def _stderr(message: str) -> None:
    import sys

    print(f"note: {message}", file=sys.stderr)


@contextlib.contextmanager
def transaction(target: str | Path, keep_existing: bool = False, log: Log | None = None,
                kind: Kind = BUNDLE) -> Iterator[Path]:
    """Yield a hidden folder beside ``target``; when the block succeeds it replaces ``target`` atomically.

    With ``keep_existing`` the folder starts as a copy of the current bundle (hard links) for stages that
    add to it; read the manifest from the yielded folder, not from ``target``. The lock is held from the
    start of the block to the commit. On any exception (KeyboardInterrupt included) the folder is removed
    and ``target`` is exactly as it was.
    """
    log = log or _stderr
    target = Path(os.path.abspath(target))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BundleError(f"{target}: cannot create its parent folder {target.parent} ({e.strerror}). "
                          "Choose an output path in a folder you can write.") from None
    if not writable(target.parent):
        raise BundleError(f"{target}: its folder {target.parent} is not writable. Choose another output path.")
    while True:
        with writer_lock(target, log, kind) as (created, waiter):
            if recover(target, log, kind):
                continue  # an earlier bundle was put back at target: lock that folder instead
            with _commit(target, keep_existing, log, created, waiter, kind) as stage:
                yield stage
            return


def _listing(folder: Path) -> list[tuple[str, int, int]]:
    return sorted((e.name, e.stat(follow_symlinks=False).st_ino, e.stat(follow_symlinks=False).st_mtime_ns)
                  for e in os.scandir(folder))


@contextlib.contextmanager
def _commit(target: Path, keep_existing: bool, log: Log, created: bool, waiter: _Waiter,
            kind: Kind = BUNDLE) -> Iterator[Path]:
    """The transaction's body, holding ``target``'s lock: stage, yield, check, swap; or clean up."""
    check_replaceable(target, kind)
    before, listed = manifest_digest(target, kind.marker), _listing(target)
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".partial",
                                      dir=target.parent))
    except OSError as e:
        _drop_if_empty(target, created)
        raise BundleError(f"{target}: cannot write beside it in {target.parent} ({e.strerror}). "
                          "Choose an output path in a folder you can write.") from None
    stage_fd = _open_dir(stage)
    _flock(stage_fd)  # marks the stage as live for ``recover`` in other processes
    committed = False
    try:
        os.chmod(stage, 0o777 & ~_umask())  # mkdtemp's 0700 would hide the bundle from a serving user
        if keep_existing:
            _copy_tree(target, stage)
        yield stage
        if interrupted():  # a Ctrl-C that a library swallowed (torch's exporter retries after one): no commit
            raise KeyboardInterrupt
        if manifest_digest(target, kind.marker) != before or _listing(target) != listed:
            raise BundleError(f"{target}: was changed by another process while this run worked on it (files "
                              "added, removed or rewritten by something that does not take mmopt's lock). "
                              "Nothing was written; run again.")
        _fsync_tree(stage)  # the new bundle is on disk before any name points at it
        with _signals_deferred():  # a Ctrl-C lands after the swap *and* its record, never between them
            try:
                old = swap_in(stage, target, waiter)
            except OSError as e:
                raise BundleError(f"{target}: the commit failed ({e.strerror}); the earlier {kind.noun} is "
                                  "unchanged. Choose another output folder.") from None
            committed = True
        _fsync(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        if committed:  # only a signal after the swap gets here: the new bundle is in place
            if isinstance(e, KeyboardInterrupt):
                log(f"{target}: interrupted just after the commit; the new {kind.noun} is in place")
            raise
        shutil.rmtree(stage, ignore_errors=True)
        _drop_if_empty(target, created)
        if isinstance(e, KeyboardInterrupt):
            log(f"{target}: interrupted; nothing was written" + (f", the earlier {kind.noun} is unchanged"
                                                                 if before is not None or listed else ""))
        elif isinstance(e, MmoptError) and str(stage) in str(e):  # name the bundle, not the hidden stage
            e.args = (str(e).replace(str(stage), str(target)), *e.args[1:])
        elif isinstance(e, OSError) and e.errno in _DISK_ERRORS and str(stage) in str(e.filename or ""):
            where = str(e.filename).replace(str(stage), str(target))
            raise BundleError(f"{target}: could not be written ({e.strerror}: {where}). Nothing was written; "
                              f"the earlier {kind.noun}, if any, is unchanged. Free space or choose another output "
                              "folder.") from None
        raise
    finally:
        os.close(stage_fd)


_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.ENAMETOOLONG,
                errno.EFBIG}


def _drop_if_empty(target: Path, created: bool) -> None:
    if created:
        with contextlib.suppress(OSError):
            target.rmdir()  # only ever succeeds on the empty folder this writer made
