"""The bundle's single source of truth: ``manifest.json`` and the atomic folder it lives in.

A bundle is a folder of artifacts (ONNX graphs, engines) plus ``manifest.json``. Every artifact
carries its sha256, the stage and config that made it and its parent, so lineage is explicit and a
tampered file is caught. A bundle is only ever written into a temporary sibling folder that replaces
the old one when complete: a failed run leaves the previous bundle untouched.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmopt import store
from mmopt.errors import BundleError
from mmopt.spec import ComponentSpec, TensorSpec
from mmopt_runtime.package import sha256_file as _sha256

SCHEMA_VERSION = 2  # 2: "kind" names an mmopt bundle; every document is checked against MANIFEST_SCHEMA
MANIFEST = store.MANIFEST


_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}


def external_data(graph: Path) -> Path:
    """Where an ONNX graph past 2 GB keeps its weights: ``FILE.onnx.data`` beside it (``stages.export.save``
    writes it there; the manifest hashes it; caches key on it)."""
    return graph.with_name(graph.name + ".data")


def sha256_file(path: Path) -> str:
    """sha256 of a file, computed once per process for one version of it (a multi-GB checkpoint is
    checked by reference.load and again inside the bundle's lock)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = _sha256(path)  # the runtime's reader: one way to hash a file
    return _DIGESTS[key]


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
    def find(self, component: str, precision: str = "fp32", stage: str | None = None) -> Artifact | None:
        """The one artifact lookup: the newest ONNX artifact of ``component`` at ``precision``, or None;
        ``stage="engine"`` (or another stage name) selects that stage instead. Engines are never returned
        for a plain ONNX lookup."""
        found = [a for a in self.artifacts if a.component == component and a.precision == precision
                 and (a.stage == stage if stage is not None else a.stage != "engine")]
        return found[-1] if found else None

    def artifact(self, component: str, precision: str = "fp32", stage: str | None = None) -> Artifact:
        """As ``find``, raising a ``BundleError`` that lists what the bundle has when there is none."""
        found = self.find(component, precision, stage)
        if found is None:
            have = sorted({f"{a.component}/{a.precision}" for a in self.artifacts})
            raise BundleError(f"bundle has no {precision} artifact for component '{component}'"
                              f"{' from stage ' + stage if stage else ''}. It has: {', '.join(have) or 'nothing'}.")
        return found

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
        path = store.confine(bundle, file, f"{component}/{stage}/{precision} file")
        data = external_data(path)
        if data.is_file():
            extra = {**extra, "external_data": {"file": f"{file}.data", "sha256": sha256_file(data),
                                                "bytes": data.stat().st_size}}
        art = Artifact(id=f"{component}/{stage}/{precision}", component=component, stage=stage,
                       precision=precision, file=file, sha256=sha256_file(path), bytes=path.stat().st_size,
                       parent=parent, config=config or {}, extra=extra)
        self.artifacts = [a for a in self.artifacts if a.id != art.id] + [art]
        return art

    def fingerprint(self) -> str:
        """What makes two bundles comparable: the same model inputs, outputs and component interfaces
        (re-exports of a retrained model keep it; another model does not)."""
        d = self.to_json()
        key = {k: d[k] for k in ("model_inputs", "model_outputs", "components")}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    # ---- (de)serialisation ----------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "kind": store.KIND, "created": self.created, "tools": self.tools,
                "model": self.model,
                "model_inputs": [t.to_json() for t in self.model_inputs],
                "model_outputs": [t.to_json() for t in self.model_outputs],
                "components": {k: c.to_json() for k, c in self.components.items()},
                "artifacts": [a.to_json() for a in self.artifacts],
                "results": self.results}

    def write(self, bundle: Path) -> None:
        data = json.dumps(self.to_json(), indent=2, sort_keys=False, default=_json_default) + "\n"
        store.atomic_write(Path(bundle) / MANIFEST, data.encode())

    @classmethod
    def read(cls, bundle: str | Path) -> "Manifest":
        """Parse, validate against the one manifest schema, and confine every file path (nothing else
        is opened): any manifest that gets past here names only files inside ``bundle``."""
        bundle = Path(bundle)
        path = bundle / MANIFEST
        if not path.is_file():
            raise BundleError(f"{bundle}: not an mmopt bundle (no {MANIFEST}). "
                              "Create one with `mmopt export mmopt.toml -o DIR`.")
        if path.is_symlink():
            store.confine(bundle, MANIFEST, MANIFEST)  # a manifest.json linked in from elsewhere is refused
        d = read_json(path, "Re-run `mmopt export` to rebuild the bundle.")
        version = d.get("schema_version") if isinstance(d, dict) else None
        if isinstance(d, dict) and d.get("kind") == store.KIND and version != SCHEMA_VERSION:
            raise BundleError(f"{path}: schema_version {version!r}, this mmopt reads {SCHEMA_VERSION}. "
                              "Re-export the bundle with this version of mmopt.")
        if isinstance(d, dict) and d.get("kind") is None and version == 1:
            raise BundleError(f"{path}: a bundle of an older mmopt (schema_version 1), this mmopt reads "
                              f"{SCHEMA_VERSION}. Re-export it with this version: `mmopt export mmopt.toml -o {bundle}`.")
        validate(d, MANIFEST_SCHEMA, path, "Re-run `mmopt export` to rebuild the bundle.")
        for i, a in enumerate(d["artifacts"]):
            store.confine(bundle, a["file"], f"artifacts[{i}].file")
            for key in ("engine", "source_onnx", "external_data"):  # files named beside the artifact's own
                if isinstance(a["extra"].get(key), dict) and "file" in a["extra"][key]:
                    store.confine(bundle, a["extra"][key]["file"], f"artifacts[{i}].extra.{key}.file")
        for key in ("config", "checkpoint", "config_absolute"):
            if key in d["model"] or key != "config_absolute":
                external_path(path, d["model"].get(key), f"model.{key}")
        _check_references(d, path)
        return cls(model=d["model"],
                   model_inputs=[TensorSpec.from_json(t) for t in d["model_inputs"]],
                   model_outputs=[TensorSpec.from_json(t) for t in d["model_outputs"]],
                   components={k: ComponentSpec.from_json(c) for k, c in d["components"].items()},
                   artifacts=[Artifact(**a) for a in d["artifacts"]],
                   results=d["results"], tools=d["tools"], created=d["created"])

    def file(self, bundle: Path, artifact: Artifact) -> Path:
        """The artifact's file, confined to ``bundle`` (the only way to turn an artifact into a path)."""
        return store.confine(bundle, artifact.file, f"artifact '{artifact.id}' file")

    def check_files(self, bundle: Path) -> list[tuple[str, str]]:
        """Every artifact whose file is missing or whose sha256 differs: [(file, problem)]."""
        problems = []
        for a in self.artifacts:
            files = [(a.file, self.file(Path(bundle), a), a.sha256)]
            data = a.extra.get("external_data")
            if isinstance(data, dict):
                files.append((data.get("file"), store.confine(bundle, data.get("file"), f"artifact '{a.id}' "
                              "external data"), data.get("sha256")))
            for name, path, want in files:
                if not path.is_file():
                    problems.append((name, "missing"))
                elif sha256_file(path) != want:
                    problems.append((name, "sha256 mismatch (modified after export)"))
        return problems

    @classmethod
    def read_checked(cls, bundle: str | Path) -> tuple["Manifest", list[tuple[str, str]]]:
        """The manifest and its files' problems, from one generation of the bundle: a writer may swap a
        new bundle in while the files are hashed, so a mismatch seen across a swap is read again."""
        bundle = Path(bundle)
        for _ in range(5):
            before = _inode(bundle)
            manifest = cls.read(bundle)
            problems = manifest.check_files(bundle)
            if not problems or _inode(bundle) == before:
                return manifest, problems
        return manifest, problems

    @classmethod
    def read_verified(cls, bundle: str | Path) -> "Manifest":
        """``read`` with every file's sha256 checked; ``BundleError`` listing each missing or changed file."""
        manifest, problems = cls.read_checked(bundle)
        if problems:
            rows = "\n".join(f"  {f}: {p}" for f, p in problems)
            raise BundleError(f"{bundle}: bundle failed its integrity check:\n{rows}\n"
                              "Re-run `mmopt export` (or restore the files) before using this bundle.")
        return manifest


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")




# ---- the one schema a manifest must satisfy ---------------------------------------------------
_STR = {"type": "string"}
_OBJ = {"type": "object"}
_SHA = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_SHAPE = {"type": "array", "maxItems": 64, "items": {"type": "integer", "minimum": 0}}
_TENSOR = {
    "type": "object", "required": ["name", "dtype", "shape", "shapes"],
    "properties": {
        "name": _STR, "dtype": _STR,
        "shape": {"type": "array", "maxItems": 64, "items": {"anyOf": [{"type": "integer", "minimum": 0}, _STR]}},
        "shapes": {"type": "object", "required": ["min", "opt", "max"], "additionalProperties": _SHAPE},
        "range": {"type": ["array", "null"], "minItems": 2, "maxItems": 2, "items": {"type": "number"}},
    },
}
_TENSORS = {"type": "array", "items": _TENSOR}
MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["schema_version", "kind", "created", "tools", "model", "model_inputs", "model_outputs",
                 "components", "artifacts", "results"],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "kind": {"const": store.KIND},
        "created": _STR,
        "tools": {"type": "object", "additionalProperties": _STR},
        "model": {
            "type": "object", "required": ["config", "config_sha256", "factory", "checkpoint", "checkpoint_sha256"],
            "properties": {"config": _STR, "config_absolute": _STR, "config_sha256": _SHA,
                           "definition_sha256": _SHA, "factory": _STR,
                           "checkpoint": {"type": ["string", "null"]},
                           "checkpoint_sha256": {"anyOf": [_SHA, {"type": "null"}]},
                           "fusion": _STR, "output_sources": {"type": "object", "additionalProperties": _STR},
                           "dims": _OBJ},
        },
        "model_inputs": _TENSORS,
        "model_outputs": _TENSORS,
        "components": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["name", "kind", "module", "inputs", "outputs", "sources"],
            "properties": {"name": _STR, "kind": {"enum": ["encoder", "fusion"]}, "module": _STR,
                           "inputs": _TENSORS, "outputs": _TENSORS,
                           "sources": {"type": "object", "additionalProperties": _STR},
                           "glue": {"type": "boolean"},
                           "repeats": {"type": "array", "items": {
                               "type": "object", "additionalProperties": _STR}}}}},
        "artifacts": {"type": "array", "items": {
            "type": "object", "additionalProperties": False,
            "required": ["id", "component", "stage", "precision", "file", "sha256", "bytes", "parent", "config",
                         "parity", "extra"],
            "properties": {"id": _STR, "component": _STR, "stage": _STR, "precision": _STR, "file": _STR,
                           "sha256": _SHA, "bytes": {"type": "integer", "minimum": 0},
                           "parent": {"type": ["string", "null"]}, "config": _OBJ, "parity": _OBJ,
                           "extra": _OBJ}}},
        "results": {"type": "object", "properties": {
            "policies": {"type": "object", "additionalProperties": {
                "type": "object", "additionalProperties": {"type": "string"}}},
            "parity": {
            "type": "object", "additionalProperties": {"type": "object", "additionalProperties": {
                "type": "object", "required": ["outputs", "failed", "cos_min", "max_abs", "max_rel", "argmax"],
                "properties": {"outputs": {"type": "integer"}, "failed": {"type": "integer"},
                               "cos_min": {"type": "number"}, "max_abs": {"type": "number"},
                               "max_rel": {"type": "number"}, "argmax": {"type": ["number", "null"]}}}}}}},
    },
}


def _inode(folder: Path) -> int | None:
    try:
        return os.stat(folder).st_ino
    except OSError:
        return None


def read_json(path: Path, fix: str, error: type[Exception] = BundleError) -> Any:
    """``path`` parsed as JSON, or ``error`` naming the file (unreadable, not UTF-8, not JSON, too deep)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror}). {fix}") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text, so not JSON. {fix}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e}). {fix}") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply to be a manifest or report. {fix}") from None


def validate(document: Any, schema: dict[str, Any], path: Path, fix: str, error: type[Exception] = BundleError) -> None:
    """Check the whole ``document`` against ``schema`` (jsonschema); the first problem names its field."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    try:
        problem = jsonschema.exceptions.best_match(validator.iter_errors(document))
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply to be checked. {fix}") from None
    if problem is not None:
        field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in problem.absolute_path).lstrip(".")
        shown = problem.message if len(problem.message) < 300 else problem.message[:300] + "..."
        raise error(f"{path}: field '{field or '(top level)'}': {shown}. {fix}")


def external_path(manifest: Path, value: Any, field: str) -> Path | None:
    """``model.config`` / ``model.checkpoint``: the user's own files, outside the bundle by nature, recorded
    relative to the bundle's folder (a project moved or cloned as a whole keeps working), or absolute where
    no relative path exists. Either way normalised (no ``a/../b``, no NUL); their sha256 is checked against
    the manifest before the model is built (``mmopt.reference``)."""
    if value is None and field == "model.checkpoint":
        return None
    ok = isinstance(value, str) and value != "" and os.path.normpath(value) == value and "\x00" not in value
    if not ok:
        raise BundleError(f"{manifest}: field '{field}': {value!r} is not a normalised path. mmopt records the "
                          "config and checkpoint a bundle was exported from relative to the bundle (or absolute); "
                          "this manifest was edited or is not from mmopt. Re-export the bundle, or pass --config.")
    if re.match(r"^[A-Za-z]:[\\/]", value) or ("\\" in value and os.sep == "/"):
        return Path(value)  # written on Windows: it names no file here (the caller says to pass --config)
    bundle = Path(manifest).parent.resolve()
    path = Path(value) if os.path.isabs(value) else Path(os.path.normpath(bundle / value))
    if path.exists() and (path.resolve() == bundle or bundle in path.resolve().parents):
        # mmopt never writes the user's files into a bundle (export replaces the folder): a manifest naming a
        # config or checkpoint inside its own bundle would make the bundle run code it brought along
        raise BundleError(f"{manifest}: field '{field}': {value!r} lies inside the bundle. The config and the "
                          "checkpoint a bundle was exported from are the user's files, outside it: a bundle must "
                          "not bring the code it runs. Re-export the bundle, or pass --config.")
    return path


def portable_path(path: Path, bundle: Path) -> str:
    """How a manifest records the user's file ``path`` for the bundle at ``bundle``: relative to it where
    possible (``external_path`` reads it back)."""
    path, bundle = Path(path).resolve(), Path(bundle).resolve()
    try:
        return Path(os.path.relpath(path, bundle)).as_posix()  # forward slashes: readable on every OS
    except ValueError:  # another drive (Windows): no relative path exists
        return str(path)


def staged_bundle(target: str | Path, keep_existing: bool = False, log: Any = None):
    """A write transaction on the bundle at ``target`` (see ``mmopt.store.transaction``)."""
    return store.transaction(target, keep_existing, log)


def _check_references(d: dict[str, Any], path: Path) -> None:
    """What the schema cannot say: names that must point at each other."""
    fix = "Re-run `mmopt export` to rebuild the bundle."
    for name, c in d["components"].items():
        ins = [t["name"] for t in c["inputs"]]
        for field, sources in [("sources", c["sources"]),
                               *((f"repeats[{i}]", r) for i, r in enumerate(c.get("repeats", [])))]:
            if set(sources) != set(ins):
                raise BundleError(f"{path}: field 'components.{name}.{field}': names {sorted(sources)}, the "
                                  f"component's inputs are {ins}. {fix}")
    for i, a in enumerate(d["artifacts"]):
        if a["component"] not in d["components"]:
            raise BundleError(f"{path}: field 'artifacts[{i}].component': '{a['component']}' is not a component "
                              f"of this bundle ({', '.join(d['components'])}). {fix}")
