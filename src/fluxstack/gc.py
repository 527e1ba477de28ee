"""`fluxstack gc`: remove what no manifest in use needs, and never a file fluxstack did not put there.

In use: manifests with a ready marker in the store, plus those named with --keep.
Removed: verified files the seeder recorded that no manifest in use references,
partials whose sha256 no known manifest wants, and the quarantine. Files the
user put in the store by hand (their own LoRAs, say) are listed, never touched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from fluxstack.manifest import MODEL_FOLDERS, available_manifests, default_manifests_dir, load_manifest
from fluxstack.store import Store


@dataclass
class GcPlan:
    remove: list[tuple[Path, int, str]] = field(default_factory=list)  # path, bytes, why
    unmanaged: list[Path] = field(default_factory=list)
    in_use: list[str] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(size for _, size, _ in self.remove)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def plan_gc(store: Store, keep: list[str]) -> GcPlan:
    plan = GcPlan()
    markers = store.ready_markers()
    plan.in_use = sorted(set(markers) | set(keep))
    wanted = {e["dest"] for m in markers.values() for e in m.get("files", [])}
    for name in keep:
        wanted |= {f.dest for f in load_manifest(name).files}

    state = store.load_state()
    for dest in sorted(set(state) - wanted):
        path = store.root / dest
        if path.exists():
            plan.remove.append((path, _size(path), "no manifest in use needs it"))

    known_shas = {e.get("sha256") for m in markers.values() for e in m.get("files", [])}
    for name in available_manifests(default_manifests_dir()):
        known_shas |= {f.sha256 for f in load_manifest(name).files}
    for name in keep:
        known_shas |= {f.sha256 for f in load_manifest(name).files}
    if store.partial_dir.is_dir():
        for path in sorted(store.partial_dir.iterdir()):
            if path.name.split(".", 1)[0] not in known_shas:
                plan.remove.append((path, _size(path), "partial download no manifest wants"))
    if store.quarantine_dir.is_dir():
        for path in sorted(store.quarantine_dir.iterdir()):
            plan.remove.append((path, _size(path), "quarantined bad download"))

    for folder in MODEL_FOLDERS:
        base = store.root / folder
        for dirpath, _, filenames in os.walk(base):
            for filename in filenames:
                rel = str((Path(dirpath) / filename).relative_to(store.root))
                if rel not in state and rel not in wanted:
                    plan.unmanaged.append(Path(dirpath) / filename)
    return plan


def apply_gc(store: Store, plan: GcPlan) -> None:
    state = store.load_state()
    for path, _, _ in plan.remove:
        path.unlink(missing_ok=True)
        rel = str(path.relative_to(store.root)) if path.is_relative_to(store.root) else ""
        state.pop(rel, None)
    store.save_state(state)
