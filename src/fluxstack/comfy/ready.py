"""`fluxstack comfy ready`: the models the configured workflows need are in the store, verified.

"Verified" means what the seeder recorded: a ready marker lists the file with the manifest's
sha256 and size, and the file on disk still has that size. Optionally ComfyUI answers and
lists each file, which is what a user of the UI will see.
"""

from __future__ import annotations

import urllib.error
from dataclasses import asdict, dataclass

from fluxstack.comfy.client import ComfyClient
from fluxstack.comfy.workflows import Workflow, manifest_entry
from fluxstack.errors import UsageError
from fluxstack.manifest import ManifestFile
from fluxstack.store import Store


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def verified_entries(store: Store) -> set[tuple[str, str, int]]:
    """(dest, sha256, size) of every file some ready marker vouches for."""
    seen = set()
    for marker in store.ready_markers().values():
        for entry in marker.get("files", []):
            seen.add((entry.get("dest"), entry.get("sha256"), entry.get("size")))
    return seen


def check_file(store: Store, f: ManifestFile, verified: set[tuple[str, str, int]], manifest: str) -> Check:
    path = store.root / f.dest
    seed = f"run `fluxstack seed {manifest}`"
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return Check(f.dest, False, f"missing from {store.root}: {seed}")
    if size != f.size:
        return Check(f.dest, False, f"{size} bytes, the manifest says {f.size}: {seed} (it replaces the file)")
    if (f.dest, f.sha256, f.size) not in verified:
        return Check(f.dest, False, f"present but no seed verified it against manifest {manifest}: {seed}")
    return Check(f.dest, True, f"verified ({f.size} bytes, sha256 {(f.sha256 or '')[:12]}…)")


def check_ready(workflows: list[Workflow], store: Store, client: ComfyClient | None) -> list[Check]:
    if not store.root.is_dir():
        raise UsageError(f"model store {store.root} does not exist; pass --models-dir or seed first")
    verified = verified_entries(store)
    checks: list[Check] = []
    listed: dict[str, list[str]] = {}
    if client is not None:
        try:
            version = client.system_stats()["system"]["comfyui_version"]
            checks.append(Check(f"comfyui {client.url}", True, f"answers, version {version}"))
        except UsageError as exc:
            checks.append(Check(f"comfyui {client.url}", False, str(exc)))
            client = None
    for workflow in workflows:
        manifest = workflow.load_manifest()
        for ref in workflow.model_refs():
            name = f"{workflow.name}: {ref.dest}"
            entry = manifest_entry(ref, manifest)
            if entry is None:
                checks.append(Check(name, False, f"manifest {manifest.name} does not provide it: the workflow and "
                                                 "its manifest disagree (`fluxstack comfy check`)"))
                continue
            check = check_file(store, entry, verified, manifest.name)
            if check.ok and client is not None:
                if ref.folder not in listed:
                    try:
                        listed[ref.folder] = client.models(ref.folder)
                    except urllib.error.HTTPError as err:
                        listed[ref.folder] = []
                        check = Check(name, False, f"ComfyUI cannot list {ref.folder} (HTTP {err.code})")
                if check.ok and ref.filename not in listed[ref.folder]:
                    check = Check(name, False, f"verified in the store but ComfyUI does not list it in {ref.folder}: "
                                               "is the store mounted at /models in the comfyui container?")
            checks.append(Check(name, check.ok, check.detail))
    return checks
