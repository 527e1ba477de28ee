"""`fluxstack manifest lock`: pin revisions to commits and fill size/sha256 from Hub metadata.

LFS files (all weights) carry their sha256 in the Hub's paths-info answer, so no
weight byte is downloaded. Small non-LFS files (configs, tokenizers) only have a
git blob id there; they are fetched and hashed, up to SMALL_FILE_LIMIT bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import httpx2
from huggingface_hub import HfApi
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from fluxstack.errors import FluxstackError, UsageError
from fluxstack.http_client import Client
from fluxstack.hub import TOKEN_HELP, Source
from fluxstack.manifest import COMMIT_RE, Manifest, ManifestFile

SMALL_FILE_LIMIT = 16 << 20


@dataclass(frozen=True)
class Change:
    dest: str
    field: str
    old: object
    new: object


def _api_error(exc: Exception, repo: str, source: Source) -> FluxstackError:
    if isinstance(exc, GatedRepoError):
        return UsageError(f"{repo} is gated on {source.endpoint}: accept its license at "
                          f"https://huggingface.co/{repo}, then {TOKEN_HELP}.")
    if isinstance(exc, RevisionNotFoundError):
        return UsageError(f"a revision of {repo} in the manifest does not exist on {source.endpoint}.")
    if isinstance(exc, RepositoryNotFoundError):
        return UsageError(f"{repo} not found on {source.endpoint} (or it is private/gated and no valid token "
                          f"was given: {TOKEN_HELP}).")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        return UsageError(f"{source.endpoint} answered HTTP {status} for {repo}; try again later.")
    return UsageError(f"cannot reach {source.endpoint} for {repo} ({type(exc).__name__}); check the network or "
                      "--endpoint / HF_ENDPOINT.")


def _hash_small(source: Source, f: ManifestFile, size: int) -> str:
    if size > SMALL_FILE_LIMIT:
        raise UsageError(f"{f.path} in {f.repo} is not an LFS file and has {size} bytes: fluxstack will not "
                         "download it just to hash it. Fill its sha256 by hand from a trusted copy.")
    client = Client(timeout=60)
    try:
        response, _ = client.get(source.url(f), source.headers())
        body = response.read()
    finally:
        client.close()
    if response.status != 200:
        raise source.http_error(response.status, {k.lower(): v for k, v in response.getheaders()}, f)
    return hashlib.sha256(body).hexdigest()


def lock_files(files: list[ManifestFile], source: Source) -> tuple[list[ManifestFile], list[Change]]:
    api = HfApi(endpoint=source.endpoint, token=source.token.value if source.token else False)
    groups: dict[tuple[str, str], list[ManifestFile]] = {}
    for f in files:
        groups.setdefault((f.repo, f.revision), []).append(f)
    locked: dict[str, ManifestFile] = {}
    changes: list[Change] = []
    for (repo, revision), group in groups.items():
        try:
            commit = revision if COMMIT_RE.match(revision) else api.model_info(repo, revision=revision).sha
            infos = {i.path: i for i in api.get_paths_info(repo, [f.path for f in group], revision=commit)}
        except (HfHubHTTPError, httpx2.HTTPError, OSError) as exc:
            raise _api_error(exc, repo, source) from None
        assert commit is not None
        for f in group:
            info = infos.get(f.path)
            if info is None or not hasattr(info, "size"):
                raise UsageError(f"{f.path} does not exist in {repo} at {revision} ({commit}) on "
                                 f"{source.endpoint}; fix the path at {f.source}.")
            if info.lfs is not None:
                sha256, size = info.lfs.sha256, info.lfs.size
            else:
                sha256, size = _hash_small(source, replace(f, revision=commit), info.size), info.size
            new = replace(f, revision=commit, sha256=sha256, size=size)
            for name in ("revision", "sha256", "size"):
                if getattr(f, name) != getattr(new, name):
                    changes.append(Change(f.dest, name, getattr(f, name), getattr(new, name)))
            locked[f.dest] = new
    return [locked[f.dest] for f in files], changes


def lock_manifest(manifest: Manifest, source: Source) -> tuple[list[ManifestFile], list[Change]]:
    """Lock the manifest's own entries (included manifests are locked on their own)."""
    return lock_files(manifest.own_files, source)
