"""Which pipelines a store can serve: a manifest's runtime section, checked against the store."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxstack.errors import UsageError
from fluxstack.manifest import Manifest, load_manifest
from fluxstack.store import Store

# The guide's defaults; a manifest's runtime.defaults overrides them.
BASE_DEFAULTS = {"steps": 50, "guidance": 3.5, "width": 1024, "height": 1024, "max_sequence_length": 512}


@dataclass
class Variant:
    name: str
    task: str  # text-to-image | image-edit
    manifest: Manifest
    paths: dict[str, Path]  # transformer, vae, clip, t5, config, tokenizers
    defaults: dict[str, Any]
    sha256: dict[str, str] = field(default_factory=dict)  # role -> sha256, for image metadata

    @property
    def guidance_distilled(self) -> bool:
        """schnell-style models ignore guidance; their config has guidance_embeds false."""
        import json

        config = json.loads((self.paths["config"] / "transformer" / "config.json").read_text())
        return not config.get("guidance_embeds", True)


def problems(store: Store, manifest: Manifest) -> list[str]:
    """What keeps this manifest's variant from loading: no ready marker, missing files."""
    found = []
    if manifest.unlocked():
        found.append(f"{len(manifest.unlocked())} entries of {manifest.name} have no sha256 yet: run "
                     f"`fluxstack manifest lock {manifest.name}` where the Hub is reachable, then seed it")
    if not store.ready_path(manifest.name).exists():
        found.append(f"no ready marker {store.ready_path(manifest.name)}: run `fluxstack seed {manifest.name}`")
    for f in manifest.files:
        if not store.final_path(f).exists():
            found.append(f"missing {f.dest}")
    return found


def load_variant(store: Store, name: str) -> Variant:
    manifest = load_manifest(name)
    runtime = manifest.runtime
    if runtime is None:
        raise UsageError(f"manifest {manifest.name} has no runtime section, so the diffusers runtime cannot serve "
                         "it; use a *-runtime manifest (fluxstack manifest list).")
    found = problems(store, manifest)
    if found:
        raise UsageError(f"the store {store.root} is not ready for {manifest.name}:\n  " + "\n  ".join(found))
    by_dest = {f.dest: f for f in manifest.files}
    roles = ("transformer", "vae", "clip", "t5", "config", "tokenizers")
    paths = {role: store.root / runtime[role] for role in roles}
    sha = {role: by_dest[runtime[role]].sha256 or "" for role in ("transformer", "vae", "clip", "t5")}
    defaults = {**BASE_DEFAULTS, **runtime.get("defaults", {})}
    return Variant(runtime["variant"], runtime["task"], manifest, paths, defaults, sha)
