"""The one rule for a path a manifest names: a plain relative path that stays inside its folder. Bundles
(``mmopt.store.confine``) and packages (``mmopt_runtime.package.confined``) both apply it, each with its own
error; nothing is opened, so a path is refused before any file it names is touched. And the one cache folder."""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath


def cache_dir() -> Path:
    """mmopt's folder in the user's cache, ``${XDG_CACHE_HOME:-~/.cache}/mmopt``: the engine cache, the TensorRT
    timing cache and the Triton server's venv live under it."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mmopt"


def escape(root: Path, rel: str, kind: str) -> tuple[Path, str | None]:
    """``(root / rel resolved, None)`` when ``rel`` names a file inside ``root``, else ``(that, why not)``:
    a NUL or backslash, an absolute path, a '..', a path not written in normal form, or a resolution (through
    a symlink) outside the ``kind`` ("bundle", "package") or onto the folder itself."""
    pure = PurePosixPath(rel)
    full = Path(root).resolve()
    if "\x00" in rel or "\\" in rel:
        return full, "holds a NUL or backslash"
    if pure.is_absolute():
        return full, "is an absolute path"
    if ".." in pure.parts:
        return full, "climbs out with '..'"
    if str(pure) != rel:  # also "./a", which PurePosixPath writes "a"
        return full, f"is not normalised (write {str(pure)!r})"
    root_r, full = full, (full / rel).resolve()
    if full == root_r or root_r not in full.parents:
        return full, f"resolves to {full}, outside the {kind} (through a symlink)"
    return full, None
