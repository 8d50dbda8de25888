"""The bundle's single source of truth: ``manifest.json`` and the atomic folder it lives in.

A bundle is a folder of artifacts (ONNX graphs, engines) plus ``manifest.json``. Every artifact
carries its sha256, the stage and config that made it and its parent, so lineage is explicit and a
tampered file is caught. A bundle is only ever written into a temporary sibling folder that replaces
the old one when complete: a failed run leaves the previous bundle untouched.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from mmopt.errors import BundleError
from mmopt.spec import ComponentSpec, TensorSpec

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Artifact:
    """A produced file: which component, which stage made it from which parent, with what config."""

    id: str
    component: str
    stage: str
    precision: str
    file: str
    sha256: str
    bytes: int
    parent: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Manifest:
    model: dict[str, Any]
    model_inputs: list[TensorSpec]
    model_outputs: list[TensorSpec]
    components: dict[str, ComponentSpec]
    artifacts: list[Artifact] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    # ---- lookup by name -------------------------------------------------------------------
    def artifact(self, component: str, precision: str = "fp32", stage: str | None = None) -> Artifact:
        """The newest ONNX artifact of ``component`` at ``precision``; ``stage="engine"`` (or another
        stage name) selects that stage instead. Engines are never returned for a plain ONNX lookup."""
        found = [a for a in self.artifacts if a.component == component and a.precision == precision
                 and (a.stage == stage if stage is not None else a.stage != "engine")]
        if not found:
            have = sorted({f"{a.component}/{a.precision}" for a in self.artifacts})
            raise BundleError(f"bundle has no {precision} artifact for component '{component}'"
                              f"{' from stage ' + stage if stage else ''}. It has: {', '.join(have) or 'nothing'}.")
        return found[-1]

    def by_id(self, artifact_id: str) -> Artifact:
        for a in self.artifacts:
            if a.id == artifact_id:
                return a
        raise BundleError(f"bundle has no artifact '{artifact_id}'.")

    def precisions(self) -> list[str]:
        seen: list[str] = []
        for a in self.artifacts:
            if a.stage != "engine" and a.precision not in seen:
                seen.append(a.precision)
        return seen

    def add(self, bundle: Path, component: str, stage: str, precision: str, file: str,
            parent: str | None = None, config: dict[str, Any] | None = None, **extra: Any) -> Artifact:
        path = Path(bundle) / file
        art = Artifact(id=f"{component}/{stage}/{precision}", component=component, stage=stage,
                       precision=precision, file=file, sha256=sha256_file(path), bytes=path.stat().st_size,
                       parent=parent, config=config or {}, extra=extra)
        self.artifacts = [a for a in self.artifacts if a.id != art.id] + [art]
        return art

    # ---- (de)serialisation ----------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "created": self.created, "tools": self.tools,
                "model": self.model,
                "model_inputs": [t.to_json() for t in self.model_inputs],
                "model_outputs": [t.to_json() for t in self.model_outputs],
                "components": {k: c.to_json() for k, c in self.components.items()},
                "artifacts": [a.to_json() for a in self.artifacts],
                "results": self.results}

    def write(self, bundle: Path) -> None:
        _write_json(Path(bundle) / MANIFEST, self.to_json())

    @classmethod
    def read(cls, bundle: str | Path) -> "Manifest":
        bundle = Path(bundle)
        path = bundle / MANIFEST
        if not path.is_file():
            raise BundleError(f"{bundle}: not an mmopt bundle (no {MANIFEST}). "
                              "Create one with `mmopt export mmopt.toml -o DIR`.")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{path}: not valid JSON ({e}). Re-run `mmopt export` to rebuild the bundle.") from None
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(f"{path}: schema_version {version!r}, this mmopt reads {SCHEMA_VERSION}. "
                              "Re-export the bundle with this version of mmopt.")
        try:
            return cls(model=d["model"],
                       model_inputs=[TensorSpec.from_json(t) for t in d["model_inputs"]],
                       model_outputs=[TensorSpec.from_json(t) for t in d["model_outputs"]],
                       components={k: ComponentSpec.from_json(c) for k, c in d["components"].items()},
                       artifacts=[Artifact(**a) for a in d["artifacts"]],
                       results=d.get("results", {}), tools=d.get("tools", {}), created=d.get("created", ""))
        except (KeyError, TypeError) as e:
            raise BundleError(f"{path}: malformed manifest ({type(e).__name__}: {e}). "
                              "Re-run `mmopt export` to rebuild the bundle.") from None

    def check_files(self, bundle: Path) -> list[tuple[str, str]]:
        """Every artifact whose file is missing or whose sha256 differs: [(file, problem)]."""
        problems = []
        for a in self.artifacts:
            path = Path(bundle) / a.file
            if not path.is_file():
                problems.append((a.file, "missing"))
            elif sha256_file(path) != a.sha256:
                problems.append((a.file, "sha256 mismatch (modified after export)"))
        return problems

    def verified(self, bundle: Path) -> "Manifest":
        problems = self.check_files(bundle)
        if problems:
            rows = "\n".join(f"  {f}: {p}" for f, p in problems)
            raise BundleError(f"{bundle}: bundle failed its integrity check:\n{rows}\n"
                              "Re-run `mmopt export` (or restore the files) before using this bundle.")
        return self


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@contextlib.contextmanager
def staged_bundle(target: str | Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it replaces ``target`` in one rename.

    With ``keep_existing`` the folder starts as a copy (hard links where possible) of the current
    bundle, for stages that add artifacts to it. On any exception the temporary folder is removed
    and ``target`` is exactly as it was.
    """
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise BundleError(f"{target}: exists and is not a folder. Choose another output path.")
    if target.exists() and any(target.iterdir()) and not (target / MANIFEST).exists():
        raise BundleError(f"{target}: exists, is not empty and is not an mmopt bundle; refusing to replace it. "
                          "Choose an empty or new output folder.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        if keep_existing and target.is_dir():
            for src in target.iterdir():
                if src.is_file():
                    try:
                        os.link(src, tmp / src.name)
                    except OSError:
                        shutil.copy2(src, tmp / src.name)
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
