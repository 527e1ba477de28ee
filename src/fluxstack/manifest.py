"""Model manifests: YAML data validated against manifests/schema.json, with includes.

A manifest names the files a FLUX system needs (repo, revision, path), where they
go in the store (dest) and what their bytes must be (size, sha256). Includes are
resolved depth-first; the same file reached twice is merged, the same dest with
different bytes is an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from fluxstack.datadirs import shipped_dir
from fluxstack.errors import UsageError

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
MANIFESTS_ENV = "FLUXSTACK_MANIFESTS_DIR"
# ComfyUI's canonical model folders, then the folders the diffusers runtime reads configs from.
MODEL_FOLDERS = ("diffusion_models", "text_encoders", "vae", "loras", "style_models", "clip_vision",
                 "configs", "tokenizers")


@dataclass(frozen=True)
class ManifestFile:
    repo: str
    revision: str
    path: str
    dest: str
    size: int | None
    sha256: str | None
    gated: bool
    license: str
    source: str = field(default="", compare=False)  # "file.yaml:line", for messages

    @property
    def locked(self) -> bool:
        return self.sha256 is not None and self.size is not None

    def key(self) -> tuple[str, str | None, int | None]:
        """Identity for merging: the same bytes at the same place, whichever repo serves them."""
        return (self.dest, self.sha256, self.size)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("source")
        return data


@dataclass
class Manifest:
    name: str
    description: str
    path: Path
    include: list[str]
    own_files: list[ManifestFile]
    files: list[ManifestFile]  # own files plus everything included, merged
    runtime: dict[str, Any] | None = None  # how the diffusers runtime assembles a pipeline

    @property
    def total_size(self) -> int:
        return sum(f.size or 0 for f in self.files)

    def digest(self) -> str:
        """A hash of the resolved file list: changes whenever any wanted byte changes."""
        rows = sorted((f.dest, f.repo, f.revision, f.path, f.size, f.sha256) for f in self.files)
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()

    def unlocked(self) -> list[ManifestFile]:
        return [f for f in self.files if not f.locked]


def default_manifests_dir() -> Path:
    """$FLUXSTACK_MANIFESTS_DIR, else ./manifests, else the checkout this package lives in."""
    return shipped_dir(MANIFESTS_ENV, "manifests", "schema.json")


def manifest_path(name_or_path: str, manifests_dir: Path | None = None) -> Path:
    """Map a manifest name (flux-dev) or a path (./my.yaml) to its file."""
    if name_or_path.endswith((".yaml", ".yml")) or os.sep in name_or_path:
        path = Path(name_or_path)
    else:
        path = (manifests_dir or default_manifests_dir()) / f"{name_or_path}.yaml"
    if not path.is_file():
        where = manifests_dir or default_manifests_dir()
        known = ", ".join(sorted(available_manifests(where))) or "none"
        raise UsageError(
            f"manifest {name_or_path!r} not found (looked for {path}). "
            f"Known manifests in {where}: {known}. Pass a name from that list, a path to a "
            f".yaml file, or set {MANIFESTS_ENV}."
        )
    return path


def available_manifests(manifests_dir: Path) -> list[str]:
    return sorted(p.stem for p in manifests_dir.glob("*.yaml")) if manifests_dir.is_dir() else []


@cache
def _schema() -> dict[str, Any]:
    path = default_manifests_dir() / "schema.json"
    if not path.is_file():
        raise UsageError(f"manifest schema not found at {path}; set {MANIFESTS_ENV} to the manifests folder")
    return json.loads(path.read_text())


def _line_of(node: yaml.Node, json_path: Iterable[Any]) -> int:
    """Line (1-based) of the YAML node at json_path; the deepest existing parent otherwise."""
    for part in json_path:
        if isinstance(node, yaml.MappingNode):
            match = [v for k, v in node.value if k.value == part]
            if not match:
                break
            node = match[0]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
    return node.start_mark.line + 1


def _parse(path: Path) -> tuple[dict[str, Any], yaml.Node]:
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UsageError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict) or node is None:
        raise UsageError(f"{path}:1: a manifest must be a YAML mapping with name, description and files")
    return data, node


def validate_document(path: Path) -> list[str]:
    """Schema problems of one manifest file, each as 'file:line: message'."""
    import jsonschema  # imported here: the runtime loads manifests it trusts without a schema

    data, node = _parse(path)
    validator = jsonschema.Draft202012Validator(_schema())
    problems = []
    for error in sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path))):
        line = _line_of(node, error.absolute_path)
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        problems.append(f"{path}:{line}: {where}: {error.message}")
    if not problems and data["name"] != path.stem:
        line = _line_of(node, ["name"])
        problems.append(f"{path}:{line}: name {data['name']!r} must match the file name {path.stem!r}")
    return problems


def _load_one(path: Path) -> tuple[dict[str, Any], list[ManifestFile]]:
    problems = validate_document(path)
    if problems:
        raise UsageError("invalid manifest:\n  " + "\n  ".join(problems))
    data, node = _parse(path)
    files = []
    for index, entry in enumerate(data.get("files", [])):
        line = _line_of(node, ["files", index])
        files.append(ManifestFile(**entry, source=f"{path}:{line}"))
    return data, files


def merge_files(files: Iterable[ManifestFile]) -> list[ManifestFile]:
    """Deduplicate by dest; the same dest with different bytes is an error naming both sources."""
    merged: dict[str, ManifestFile] = {}
    for f in files:
        seen = merged.get(f.dest)
        if seen is None:
            merged[f.dest] = f
        elif seen.key() != f.key():
            raise UsageError(
                f"conflicting entries for {f.dest}: {seen.source} wants {seen.repo} sha256={seen.sha256} "
                f"size={seen.size}, {f.source} wants {f.repo} sha256={f.sha256} size={f.size}. "
                "Give one of them a different dest or make them agree."
            )
    return list(merged.values())


def load_manifest(name_or_path: str, manifests_dir: Path | None = None) -> Manifest:
    """Load a manifest and everything it includes (includes resolve next to the including file)."""
    return _load(manifest_path(name_or_path, manifests_dir), stack=())


def _load(path: Path, stack: tuple[str, ...]) -> Manifest:
    resolved = str(path.resolve())
    if resolved in stack:
        chain = " -> ".join(Path(p).stem for p in (*stack, resolved))
        raise UsageError(f"manifest include cycle: {chain}. Remove one of these includes.")
    data, own = _load_one(path)
    collected: list[ManifestFile] = []
    for name in data.get("include", []):
        child_path = path.parent / f"{name}.yaml"
        if not child_path.is_file():
            raise UsageError(f"{path}: includes {name!r}, but {child_path} does not exist")
        collected.extend(_load(child_path, (*stack, resolved)).files)
    collected.extend(own)
    manifest = Manifest(
        name=data["name"],
        description=data["description"],
        path=path,
        include=list(data.get("include", [])),
        own_files=own,
        files=merge_files(collected),
        runtime=data.get("runtime"),
    )
    _check_runtime(manifest)
    return manifest


def _check_runtime(manifest: Manifest) -> None:
    """Every file and folder the runtime section names must be something this manifest seeds."""
    if manifest.runtime is None:
        return
    dests = {f.dest for f in manifest.files}
    problems = []
    for role in ("transformer", "vae", "clip", "t5"):
        if manifest.runtime[role] not in dests:
            problems.append(f"runtime.{role} {manifest.runtime[role]!r} is not a dest of any file")
    for role in ("config", "tokenizers"):
        prefix = manifest.runtime[role].rstrip("/") + "/"
        if not any(d.startswith(prefix) for d in dests):
            problems.append(f"runtime.{role} {manifest.runtime[role]!r} holds no file of the manifest")
    if problems:
        raise UsageError(f"{manifest.path}: " + "; ".join(problems))


def write_files(manifest: Manifest, files: list[ManifestFile]) -> None:
    """Rewrite the manifest's own file entries (used by `manifest lock`), atomically."""
    data, _ = _parse(manifest.path)
    data["files"] = [f.to_dict() for f in files]
    tmp = manifest.path.with_name(f".{manifest.path.name}.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False, width=120), encoding="utf-8")
    os.replace(tmp, manifest.path)

