"""The compose stack behind the real gateway container, shared by the gateway, fuzzing and browser
tests (started once per session, on first use): tiny FLUX model -> mirror service -> seeder ->
runtime on CPU, and ComfyUI when COMFYUI_SRC names a ComfyUI tree; compose.yaml plus
compose/gateway.yaml exactly as an operator runs them, on a loopback port of its own."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers import REPO, fluxstack, free_port

DOCKER = os.environ.get("DOCKER", "docker")
COMFYUI_SRC = os.environ.get("COMFYUI_SRC", "")
COMFYUI_TAG = "fluxstack/comfyui:test"
PROJECT = "fxs-gw-test"
GATEWAY_UID = 10001
NO_COMFYUI = ("COMFYUI_SRC is not set: no ComfyUI source tree to build from (GitHub is unreachable here; "
              "CI has none)")




@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


@dataclass
class Stack:
    work: Path
    url: str
    port: int
    token_file: Path
    ca: Path
    env: dict[str, str]
    comfyui: bool
    extra_settings: dict[str, str] = field(default_factory=dict)

    @property
    def token(self) -> str:
        """The current token: the file's first line that is not a comment (it may have been rotated)."""
        lines = [line.strip() for line in self.token_file.read_text().splitlines()]
        return next(line for line in lines if line and not line.startswith("#"))

    def compose(self, *args: str, check: bool = True, timeout: float = 900,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        files = ["-f", "compose.yaml", "-f", "compose/gateway.yaml"]
        proc = subprocess.run([DOCKER, "compose", "-p", PROJECT, *files, "--profile", "mirror", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **self.env, **(env or {})})
        if check and proc.returncode:
            raise AssertionError(f"docker compose {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def request(self, path: str, token: str | None = None, *, method: str = "GET", body: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 120) -> Response:
        headers = dict(headers or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.url + path, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self.ssl_context()) as r:
                return Response(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read())
        except urllib.error.HTTPError as err:
            return Response(err.code, {k.lower(): v for k, v in err.headers.items()}, err.read())

    def logs(self) -> str:
        proc = self.compose("logs", "--no-color", check=False)
        return proc.stdout + proc.stderr

    def restart_gateway(self, **settings: str) -> None:
        """Recreate the gateway with other settings (GATEWAY_GEN_RATE=...), or with none to go back."""
        self.extra_settings = settings
        self.compose("up", "-d", "--wait", "--no-deps", "--force-recreate", "gateway", env=settings)


_stack: Stack | None = None


def docker_compose_missing() -> str | None:
    if shutil.which(DOCKER) is None or subprocess.run([DOCKER, "compose", "version"], capture_output=True).returncode:
        return "no Docker engine with the compose plugin (.ci/run installs both)"
    return None


def get_stack(config: pytest.Config) -> Stack:
    global _stack
    if _stack is None:
        reason = docker_compose_missing()
        if reason:
            pytest.skip(reason)
        _stack = _start()
        config.add_cleanup(_stop)
    return _stack


def _start() -> Stack:
    work = Path(tempfile.mkdtemp(prefix="fxs-gw-"))
    made = fluxstack("dev", "tiny-model", work / "gen", check=True)
    manifest = Path(made.stdout.strip())
    fluxstack("seed", manifest, "--models-dir", work / "gen" / "store", "--endpoint", "http://127.0.0.1:9",
              "--space-margin", "0", check=True)
    manifests = work / "manifests"
    manifests.mkdir()
    for src in [*REPO.glob("manifests/*.yaml"), REPO / "manifests" / "schema.json", *(work / "gen").glob("*.yaml")]:
        shutil.copy(src, manifests / src.name)
    # The operator's token file: owned by the gateway's uid, readable by it alone.
    token_file = work / "gateway-tokens"
    token_file.write_text(secrets.token_hex(32) + "\n")
    os.chown(token_file, GATEWAY_UID, GATEWAY_UID)
    token_file.chmod(0o400)
    port = free_port()
    ca_bundle = "/etc/ssl/certs/ca-certificates.crt"
    env = {"FLUXSTACK_MANIFEST": "tiny-flux", "FLUXSTACK_PROFILE": "cpu", "HF_ENDPOINT": "http://mirror:8090",
           "SPACE_MARGIN": "0", "MIRROR_STORE_DIR": str(work / "gen" / "store"),
           "FLUXSTACK_MANIFESTS_HOST_DIR": str(manifests), "GATEWAY_TOKENS_FILE": str(token_file),
           "GATEWAY_BIND": "127.0.0.1", "GATEWAY_PORT": str(port), "MIRROR_PORT": str(free_port()),
           # Fuzzing sends hundreds of generations: the per-client limit gets its own test.
           "GATEWAY_GEN_RATE": "6000r/m", "GATEWAY_GEN_BURST": "1000",
           "CA_BUNDLE": ca_bundle if Path(ca_bundle).exists() else "/dev/null",
           "FLUXSTACK_COMFYUI_IMAGE": COMFYUI_TAG}
    stack = Stack(work, f"https://127.0.0.1:{port}", port, token_file, work / "ca.pem", env, bool(COMFYUI_SRC))
    try:
        services = ["runtime", "gateway"]
        if COMFYUI_SRC:
            args = [f"COMFYUI_SRC={COMFYUI_SRC}", f"COMFYUI_IMAGE={COMFYUI_TAG}", f"DOCKER={DOCKER}"]
            if os.environ.get("COMFYUI_TREE"):
                args.append(f"COMFYUI_TREE={os.environ['COMFYUI_TREE']}")
            build = subprocess.run(["make", "image-comfyui", *args], cwd=REPO, capture_output=True, text=True,
                                   timeout=3000)
            assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
            services.append("comfyui")
        stack.compose("build", "runtime", "gateway", timeout=3000)
        stack.compose("up", "-d", "--wait", "--no-build", *services, timeout=1200)
        ca = stack.compose("exec", "-T", "gateway", "cat", "/var/lib/fluxstack-gateway/tls/ca.pem").stdout
        stack.ca.write_text(ca)
        deadline = time.monotonic() + 300
        while stack.request("/readyz", stack.token).status != 200:
            assert time.monotonic() < deadline, "the runtime did not become ready through the gateway"
            time.sleep(2)
    except BaseException:
        print(stack.logs()[-5000:])
        _stop(stack)
        raise
    return stack


def _stop(stack: Stack | None = None) -> None:
    stack = stack or _stack
    if stack is None:
        return
    stack.compose("down", "-v", "--remove-orphans", check=False, timeout=300)
    shutil.rmtree(stack.work, ignore_errors=True)
