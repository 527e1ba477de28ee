"""Where files come from: the endpoint (Hub or a mirror), the token, URLs and HTTP errors.

The token is wrapped so that it cannot leak through repr(), logs or exception
messages; only Token.header() ever exposes it, straight into a request header.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from huggingface_hub import hf_hub_url

from fluxstack import __version__
from fluxstack.errors import FluxstackError, UsageError
from fluxstack.manifest import ManifestFile

HUB_ENDPOINT = "https://huggingface.co"
SECRET_TOKEN_FILE = Path("/run/secrets/hf_token")
TOKEN_HELP = ("pass a read token with --token-file FILE, the HF_TOKEN or HF_TOKEN_PATH environment "
              f"variables, or a compose secret at {SECRET_TOKEN_FILE}")


@dataclass(frozen=True)
class Token:
    value: str = field(repr=False)
    source: str

    def __str__(self) -> str:
        return f"<token from {self.source}>"

    def header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.value}"}


def read_token_file(path: Path, what: str) -> Token:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UsageError(f"cannot read the token file {path} ({what}): {exc.strerror}") from None
    if not value:
        raise UsageError(f"the token file {path} ({what}) is empty; put a Hugging Face read token in it")
    return Token(value, f"{what} {path}")


def resolve_token(token_file: Path | None) -> Token | None:
    """--token-file, then HF_TOKEN, then HF_TOKEN_PATH, then the compose secret, then `hf auth login`'s file."""
    if token_file is not None:
        return read_token_file(token_file, "--token-file")
    if os.environ.get("HF_TOKEN", "").strip():
        return Token(os.environ["HF_TOKEN"].strip(), "HF_TOKEN")
    if os.environ.get("HF_TOKEN_PATH"):
        return read_token_file(Path(os.environ["HF_TOKEN_PATH"]), "HF_TOKEN_PATH")
    if SECRET_TOKEN_FILE.is_file():
        return read_token_file(SECRET_TOKEN_FILE, "secret")
    login_file = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "token"
    if login_file.is_file():
        return read_token_file(login_file, "hf auth login file")
    return None


def resolve_endpoint(cli_value: str | None) -> str:
    endpoint = (cli_value or os.environ.get("HF_ENDPOINT") or HUB_ENDPOINT).rstrip("/")
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"endpoint {endpoint!r} is not an http(s) URL (example: https://hf-mirror.com)")
    return endpoint


def is_hub(endpoint: str) -> bool:
    host = urlsplit(endpoint).hostname or ""
    return host == "huggingface.co" or host.endswith(".huggingface.co")


@dataclass(frozen=True)
class Source:
    """An endpoint plus credentials: everything needed to fetch a manifest file."""

    endpoint: str
    token: Token | None

    def url(self, f: ManifestFile) -> str:
        return hf_hub_url(f.repo, f.path, revision=f.revision, endpoint=self.endpoint)

    def headers(self) -> dict[str, str]:
        headers = {"User-Agent": f"fluxstack/{__version__}", "Accept-Encoding": "identity"}
        if self.token is not None:
            headers.update(self.token.header())
        return headers

    def mirror_warning(self) -> str | None:
        if is_hub(self.endpoint):
            return None
        host = urlsplit(self.endpoint).netloc
        if self.token is None:
            return f"using mirror {self.endpoint} (Xet disabled)"
        return (f"using mirror {self.endpoint} (Xet disabled); your Hugging Face token ({self.token.source}) "
                f"is sent to {host}: use a mirror you trust with it")

    def http_error(self, status: int, headers: dict[str, str], f: ManifestFile) -> FluxstackError:
        """Turn an HTTP error answer into a message that says what to do."""
        code = headers.get("x-error-code", "")
        where = f"{f.repo} (revision {f.revision}) on {self.endpoint}"
        if status in (401, 403) and (code == "GatedRepo" or f.gated):
            told = ("no token was found" if self.token is None else
                    f"the token from {self.token.source} was refused: its account must have accepted the license")
            return UsageError(
                f"access to {where} was refused (HTTP {status}): the repo is gated. Accept its license at "
                f"https://huggingface.co/{f.repo} while logged in, then {TOKEN_HELP}; {told}.")
        if status in (401, 403):
            return UsageError(
                f"{self.endpoint} refused {f.repo} (HTTP {status}): the repo does not exist there, is private, "
                f"or the endpoint needs a token ({TOKEN_HELP}).")
        if status == 404 and code == "RevisionNotFound":
            return UsageError(f"revision {f.revision!r} not found in {f.repo} on {self.endpoint}; fix the "
                              f"revision at {f.source} or run `fluxstack manifest lock`.")
        if status == 404 and code == "RepoNotFound":
            return UsageError(f"repo {f.repo} not found on {self.endpoint}; fix the repo at {f.source}.")
        if status == 404:
            return UsageError(f"{f.path} not found in {where} (HTTP 404); fix the path at {f.source}.")
        return UsageError(f"{self.endpoint} answered HTTP {status} for {f.path} in {f.repo}; "
                          "try again later or use another endpoint (--endpoint / HF_ENDPOINT).")
