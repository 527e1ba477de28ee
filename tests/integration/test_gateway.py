"""The authenticating gateway, through the real container in the real compose stack: every route
refuses no token and a wrong one (401) and serves the right one; the browser session cookie; the
CLI generating through it over verified TLS; tokens absent from every log; limits; rotation
without a rebuild; services unpublished and hardened; `fluxstack doctor` on the result.
ComfyUI routes (UI, /api, the /ws WebSocket, `fluxstack comfy run`) need COMFYUI_SRC."""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from gateway_stack import DOCKER, GATEWAY_UID, NO_COMFYUI, Stack, free_port, get_stack

from helpers import cli_env, fluxstack

GENERATE = json.dumps({"prompt": "a cat holding a sign", "seed": 5, "width": 64, "height": 64, "steps": 2,
                       "response_format": "png"}).encode()
RUNTIME_ROUTES = [("GET", "/v1/models", None), ("GET", "/docs", None), ("GET", "/openapi.json", None),
                  ("GET", "/readyz", None), ("GET", "/metrics", None),
                  ("POST", "/v1/images/generations", GENERATE)]
COMFYUI_ROUTES = [("GET", "/", None), ("GET", "/api/system_stats", None), ("GET", "/api/models/diffusion_models", None),
                  ("GET", "/api/queue", None), ("GET", "/api/history", None)]


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest) -> Stack:
    return get_stack(request.config)


def routes(stack: Stack) -> list[tuple[str, str, bytes | None]]:
    return RUNTIME_ROUTES + (COMFYUI_ROUTES if stack.comfyui else [])


def call(stack: Stack, route: tuple[str, str, bytes | None], token: str | None = None, **kw: object):
    method, path, body = route
    headers = {"Content-Type": "application/json"} if body else {}
    return stack.request(path, token, method=method, body=body, headers=headers | kw.pop("headers", {}), **kw)


def test_health_is_the_only_open_route(stack: Stack) -> None:
    assert stack.request("/healthz").status == 200
    for route in routes(stack):
        for token in (None, "wrong-" + secrets.token_hex(16), stack.token[:-1]):
            r = call(stack, route, token)
            assert r.status == 401, (route, r.status, r.body[:200])
            assert r.headers["www-authenticate"] == 'Bearer realm="fluxstack"'
            assert "authentication required" in r.json()["error"]  # type: ignore[index]


def test_every_route_serves_the_right_token(stack: Stack) -> None:
    for route in routes(stack):
        r = call(stack, route, stack.token)
        assert r.status == 200, (route, r.status, r.body[:300])
    png = call(stack, RUNTIME_ROUTES[-1], stack.token).body
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "tiny-flux" in str(stack.request("/v1/models", stack.token).json())
    docs = stack.request("/docs", stack.token).body.decode()
    assert "/_gateway/swagger-ui/swagger-ui-bundle.js" in docs and "cdn.jsdelivr.net" not in docs
    assert stack.request("/_gateway/swagger-ui/swagger-ui-bundle.js").status == 200


def test_a_service_that_is_not_deployed_is_a_clear_502(stack: Stack) -> None:
    if stack.comfyui:
        pytest.skip("ComfyUI is deployed in this run")
    r = stack.request("/api/system_stats", stack.token)
    assert r.status == 502 and "not answering" in r.json()["error"]  # type: ignore[index]
    assert stack.request("/v1/models", stack.token).status == 200  # the runtime is unaffected


def test_a_browser_gets_the_login_page_and_a_session_cookie(stack: Stack) -> None:
    page = stack.request("/v1/models", headers={"Accept": "text/html"})
    assert page.status == 401 and b"Access token" in page.body
    assert stack.request("/login/session", "wrong-" + secrets.token_hex(16), method="POST").status == 401
    login = stack.request("/login/session", stack.token, method="POST")
    assert login.status == 204
    cookie = login.headers["set-cookie"]
    assert all(flag in cookie for flag in ("HttpOnly", "Secure", "SameSite=Strict"))
    session = cookie.split(";")[0]
    assert stack.token not in session  # the cookie is derived from the token, not the token
    assert stack.request("/v1/models", headers={"Cookie": session}).status == 200
    forged = session.split("=")[0] + "=" + secrets.token_hex(32)
    assert stack.request("/v1/models", headers={"Cookie": forged}).status == 401
    logout = stack.request("/logout")  # 303 to /login, followed
    assert logout.status == 200 and b"Access token" in logout.body


def test_the_cli_generates_through_the_gateway_over_verified_tls(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "cat.png"
    args = ["generate", "a cat", "--url", stack.url, "--out", out, "--seed", "3", "--width", "64", "--height", "64",
            "--steps", "2"]
    refused = fluxstack(*args, env=cli_env(SSL_CERT_FILE=str(stack.ca)))
    assert refused.returncode == 2 and "HTTP 401" in refused.stderr and "--token-file" in refused.stderr
    untrusted = fluxstack(*args, env=cli_env(FLUXSTACK_TOKEN=stack.token, SSL_CERT_FILE="/dev/null"))
    assert untrusted.returncode == 2 and "does not trust" in untrusted.stderr
    # The token file the operator handed out (a user's copy: readable by the user).
    mine = tmp_path / "token"
    mine.write_text(stack.token + "\n")
    mine.chmod(0o600)
    done = fluxstack(*args, "--token-file", mine, env=cli_env(SSL_CERT_FILE=str(stack.ca)))
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stack.token not in done.stdout + done.stderr


def test_tokens_and_sessions_never_reach_a_log(stack: Stack) -> None:
    session = stack.request("/login/session", stack.token, method="POST").headers["set-cookie"].split(";")[0]
    stack.request("/v1/models", headers={"Cookie": session})
    stack.request("/v1/models", "wrong-" + secrets.token_hex(16))
    logs = stack.logs()
    assert '"GET /v1/models" 200' in logs and "auth=cookie" in logs and "auth=bearer" in logs  # logging works
    assert stack.token not in logs
    assert session.split("=", 1)[1] not in logs
    assert "Authorization" not in logs and "Bearer " not in logs


def test_body_size_and_generation_rate_are_limited(stack: Stack) -> None:
    stack.restart_gateway(GATEWAY_MAX_BODY="1m", GATEWAY_GEN_RATE="6r/m", GATEWAY_GEN_BURST="3")
    try:
        big = json.dumps({"prompt": "x", "image": base64.b64encode(os.urandom(2 << 20)).decode()}).encode()
        r = stack.request("/v1/images/generations", stack.token, method="POST", body=big,
                          headers={"Content-Type": "application/json"})
        assert r.status == 413 and "GATEWAY_MAX_BODY" in r.json()["error"]  # type: ignore[index]
        bad = json.dumps({"prompt": ""}).encode()  # refused by the runtime (422) without running the model
        statuses = [stack.request("/v1/images/generations", stack.token, method="POST", body=bad,
                                  headers={"Content-Type": "application/json"}).status for _ in range(8)]
        assert statuses[:4] == [422] * 4 and 429 in statuses[4:], statuses
        limited = stack.request("/v1/images/generations", stack.token, method="POST", body=bad,
                                headers={"Content-Type": "application/json"})
        assert limited.status == 429 and "too many generation requests" in limited.json()["error"]  # type: ignore[index]
        assert stack.request("/v1/models", stack.token).status == 200  # other routes are not rate-limited
    finally:
        stack.restart_gateway()


def test_a_token_is_rotated_without_rebuilding_anything(stack: Stack) -> None:
    image = subprocess.run([DOCKER, "inspect", "-f", "{{.Image}}", gateway_id(stack)], capture_output=True,
                           text=True).stdout
    old = stack.token
    session = stack.request("/login/session", old, method="POST").headers["set-cookie"].split(";")[0]
    new = secrets.token_urlsafe(32)
    stack.token_file.chmod(0o600)
    stack.token_file.write_text(f"# rotated {time.strftime('%F')}\n{new}\n")
    stack.token_file.chmod(0o400)
    stack.compose("restart", "gateway")
    wait_healthy(stack)
    assert stack.request("/v1/models", old).status == 401
    assert stack.request("/v1/models", headers={"Cookie": session}).status == 401  # old sessions end too
    assert stack.request("/v1/models", new).status == 200
    assert subprocess.run([DOCKER, "inspect", "-f", "{{.Image}}", gateway_id(stack)], capture_output=True,
                          text=True).stdout == image


def test_a_token_file_the_gateway_cannot_read_stops_it_with_the_fix(stack: Stack, tmp_path: Path) -> None:
    unreadable = tmp_path / "tokens"
    unreadable.write_text(secrets.token_hex(32))
    unreadable.chmod(0o600)  # owned by root, not the gateway's uid
    run = subprocess.run([DOCKER, "run", "--rm", "-v", f"{unreadable}:/run/secrets/gateway_tokens:ro",
                          "--tmpfs", "/var/lib/fluxstack-gateway:uid=10001", "fluxstack/gateway:dev"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert f"chown {GATEWAY_UID}" in run.stderr and "chmod 0400" in run.stderr
    short = tmp_path / "short"
    short.write_text("tooshort\n")
    os.chown(short, GATEWAY_UID, GATEWAY_UID)
    run = subprocess.run([DOCKER, "run", "--rm", "-v", f"{short}:/run/secrets/gateway_tokens:ro",
                          "--tmpfs", "/var/lib/fluxstack-gateway:uid=10001", "fluxstack/gateway:dev"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "line 1" in run.stderr and "tooshort" not in run.stderr


def gateway_id(stack: Stack) -> str:
    return stack.compose("ps", "-q", "gateway").stdout.strip()


def wait_healthy(stack: Stack) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if stack.request("/healthz").status == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, "the gateway did not come back"
        time.sleep(1)


def test_only_the_gateway_is_published_and_every_container_is_hardened(stack: Stack) -> None:
    ids = stack.compose("ps", "-q").stdout.split()
    info = json.loads(subprocess.run([DOCKER, "inspect", *ids], capture_output=True, text=True, check=True).stdout)
    published = {c["Config"]["Labels"]["com.docker.compose.service"]: c["NetworkSettings"]["Ports"] for c in info}
    for service, ports in published.items():
        bound = [b for binds in (ports or {}).values() for b in (binds or [])]
        if service == "gateway":
            assert bound == [{"HostIp": "127.0.0.1", "HostPort": str(stack.port)}]
        elif service != "mirror":  # the fleet cache serves other hosts' seeders by design (own token option)
            assert bound == [], (service, bound)
    for c in info:
        service = c["Config"]["Labels"]["com.docker.compose.service"]
        host = c["HostConfig"]
        assert host["ReadonlyRootfs"] and host["CapDrop"] == ["ALL"], service
        assert "no-new-privileges:true" in host["SecurityOpt"], service
        uid = subprocess.run([DOCKER, "exec", c["Id"], "id", "-u"], capture_output=True, text=True).stdout.strip()
        assert uid == "10001", service
        if service in ("runtime", "comfyui"):
            touch = subprocess.run([DOCKER, "exec", c["Id"], "touch", "/models/x"], capture_output=True, text=True)
            assert "Read-only file system" in touch.stderr, service


def test_doctor_reports_auth_on_and_private_token_files(stack: Stack, tmp_path: Path) -> None:
    ok = fluxstack("doctor", "--json", "--gateway-port", str(stack.port), "--token-file", stack.token_file)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    report = json.loads(ok.stdout)
    assert report["auth"] == "on" and report["ok"]
    assert {"address": "127.0.0.1", "port": stack.port, "loopback": True, "role": "gateway"}.items() <= \
        next(s for s in report["listening"] if s["port"] == stack.port).items()
    assert f"mode 0400, owner uid {GATEWAY_UID}" in ok.stdout
    loose = tmp_path / "tokens"
    loose.write_text(stack.token)
    loose.chmod(0o644)
    bad = fluxstack("doctor", "--gateway-port", str(stack.port), "--secret-file", str(loose))
    assert bad.returncode == 1 and f"FAIL  secret {loose}: mode 0644" in bad.stdout
    wrong = tmp_path / "wrong"
    wrong.write_text("wrong-" + secrets.token_hex(16))
    wrong.chmod(0o600)
    stale = fluxstack("doctor", "--gateway-port", str(stack.port), "--token-file", str(wrong))
    assert stale.returncode == 1 and "refused the one in the token file" in stale.stdout



def test_doctor_fails_a_service_port_open_to_the_network(stack: Stack) -> None:
    with socket.socket() as exposed:  # what `FLUXSTACK_BIND=0.0.0.0` without the gateway looks like
        exposed.bind(("0.0.0.0", 0))
        exposed.listen()
        port = exposed.getsockname()[1]
        report = fluxstack("doctor", "--gateway-port", str(stack.port), "--runtime-port", str(port),
                           "--secret-file", str(stack.token_file))
    assert report.returncode == 1
    assert f"FAIL  listen 0.0.0.0:{port} (runtime): a fluxstack service reachable from the network without " \
           "authentication" in report.stdout


def test_the_operators_certificate_is_served_when_given(stack: Stack, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-days", "2", "-subj", "/CN=gpu07.example.org", "-addext", "subjectAltName=DNS:gpu07.example.org",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    tokens = tmp_path / "tokens"
    tokens.write_text(secrets.token_hex(32))
    for path in (tokens, key):
        os.chown(path, GATEWAY_UID, GATEWAY_UID)
        path.chmod(0o400)
    port = free_port()
    cid = subprocess.run([DOCKER, "run", "-d", "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
                          "--tmpfs", "/var/lib/fluxstack-gateway:uid=10001", "-p", f"127.0.0.1:{port}:8443",
                          "-v", f"{tokens}:/run/secrets/gateway_tokens:ro",
                          "-v", f"{cert}:/run/secrets/gateway_tls_cert:ro",
                          "-v", f"{key}:/run/secrets/gateway_tls_key:ro", "fluxstack/gateway:dev"],
                         capture_output=True, text=True, check=True).stdout.strip()
    try:
        context = ssl.create_default_context(cafile=str(cert))
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                        context.wrap_socket(raw, server_hostname="gpu07.example.org") as tls:
                    served = ssl.DER_cert_to_PEM_cert(tls.getpeercert(binary_form=True))
                break
            except (OSError, ssl.SSLError):
                assert time.monotonic() < deadline, subprocess.run([DOCKER, "logs", cid], capture_output=True,
                                                                   text=True).stderr
                time.sleep(0.5)
        assert served.split() == cert.read_text().split()
        logs = subprocess.run([DOCKER, "logs", cid], capture_output=True, text=True).stderr
        assert "TLS: operator certificate subject=CN=gpu07.example.org" in logs
    finally:
        subprocess.run([DOCKER, "rm", "-f", cid], capture_output=True)


# -- ComfyUI through the gateway ------------------------------------------------------------------
needs_comfyui = pytest.mark.skipif(not os.environ.get("COMFYUI_SRC"), reason=NO_COMFYUI)


class WebSocket:
    """wss://…/ws by hand (RFC 6455: handshake, then the server's unmasked text frames)."""

    def __init__(self, stack: Stack, headers: dict[str, str]) -> None:
        raw = socket.create_connection(("127.0.0.1", stack.port), timeout=30)
        self.sock = stack.ssl_context().wrap_socket(raw, server_hostname="127.0.0.1")
        self.client_id = secrets.token_hex(8)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET /ws?clientId={self.client_id} HTTP/1.1", f"Host: 127.0.0.1:{stack.port}",
                 "Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
                 "Sec-WebSocket-Version: 13", *(f"{k}: {v}" for k, v in headers.items())]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            head += chunk
        status_line, _, rest = head.partition(b"\r\n")
        self.status = status_line.decode()
        self.buffer = rest.partition(b"\r\n\r\n")[2]

    def _need(self, n: int) -> None:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the WebSocket was closed")
            self.buffer += chunk

    def message(self) -> dict[str, object]:
        """The next text message (binary previews are skipped)."""
        while True:
            self._need(2)
            opcode, length, offset = self.buffer[0] & 0x0F, self.buffer[1] & 0x7F, 2
            if length == 126:
                self._need(4)
                length, offset = int.from_bytes(self.buffer[2:4], "big"), 4
            elif length == 127:
                self._need(10)
                length, offset = int.from_bytes(self.buffer[2:10], "big"), 10
            self._need(offset + length)
            payload, self.buffer = self.buffer[offset:offset + length], self.buffer[offset + length:]
            if opcode == 8:
                raise ConnectionError("the WebSocket was closed")
            if opcode == 1:
                return json.loads(payload)

    def close(self) -> None:
        self.sock.close()


def websocket_first_message(stack: Stack, headers: dict[str, str]) -> tuple[str, bytes]:
    ws = WebSocket(stack, headers)
    try:
        return ws.status, (json.dumps(ws.message()).encode() if " 101 " in ws.status else b"")
    finally:
        ws.close()


@needs_comfyui
def test_the_comfyui_websocket_works_through_the_gateway(stack: Stack) -> None:
    assert " 401 " in websocket_first_message(stack, {})[0]
    assert " 401 " in websocket_first_message(stack, {"Authorization": "Bearer wrong-" + secrets.token_hex(16)})[0]
    status, message = websocket_first_message(stack, {"Authorization": f"Bearer {stack.token}"})
    assert " 101 " in status
    assert json.loads(message)["type"] == "status"
    # A browser's WebSocket carries the session cookie, not a header.
    session = stack.request("/login/session", stack.token, method="POST").headers["set-cookie"].split(";")[0]
    status, message = websocket_first_message(stack, {"Cookie": session,
                                                      "Origin": f"https://127.0.0.1:{stack.port}"})
    assert " 101 " in status and json.loads(message)["type"] == "status"


@needs_comfyui
def test_fluxstack_comfy_run_works_through_the_gateway(stack: Stack, tmp_path: Path) -> None:
    """A whole `comfy run` (upload of the graph, queue, history, /api/view download) through the
    gateway. The graph needs no model (the tiny store has none ComfyUI can load): ComfyUI paints an
    image and saves it."""
    if fluxstack("comfy", "run", "--help").returncode:
        pytest.skip("`fluxstack comfy run` is not in this checkout")
    graph = tmp_path / "red.json"
    graph.write_text(json.dumps({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 0xFF0000}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "gateway"}}}))
    token = tmp_path / "token"
    token.write_text(stack.token)
    token.chmod(0o600)
    args = ["comfy", "run", graph, "--url", stack.url, "--out", tmp_path / "out"]
    refused = fluxstack(*args, env=cli_env(SSL_CERT_FILE=str(stack.ca)), timeout=300)
    assert refused.returncode == 2 and "401" in refused.stderr
    run = fluxstack(*args, "--token-file", token, env=cli_env(SSL_CERT_FILE=str(stack.ca)), timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    from PIL import Image

    pngs = list((tmp_path / "out").rglob("*.png"))
    with Image.open(pngs[0]) as image:
        assert image.size == (64, 48) and image.convert("RGB").getpixel((10, 10)) == (255, 0, 0)
    assert stack.token not in run.stdout + run.stderr + stack.logs()


@needs_comfyui
def test_comfyui_has_no_node_installer_and_cannot_change_its_code(stack: Stack) -> None:
    cid = stack.compose("ps", "-q", "comfyui").stdout.strip()

    def run(*cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([DOCKER, "exec", cid, *cmd], capture_output=True, text=True)

    assert run("python3", "-c", "import comfyui_manager").returncode != 0  # the installer is not in the image
    assert "--enable-manager" not in run("cat", "/proc/1/cmdline").stdout
    touch = run("touch", "/opt/comfyui/custom_nodes/x.py")
    assert touch.returncode != 0  # no node can be dropped in either


@needs_comfyui
def test_comfyui_outputs_are_pruned_by_age_and_size(stack: Stack, tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "output").mkdir(parents=True)
    old, older, newer = data / "output" / "old.png", data / "output" / "a.bin", data / "output" / "b.bin"
    old.write_bytes(b"x")
    older.write_bytes(os.urandom(1536 << 10))
    newer.write_bytes(os.urandom(1536 << 10))
    now = time.time()
    os.utime(old, (now - 10 * 86400, now - 10 * 86400))
    os.utime(older, (now - 3600, now - 3600))
    for path in (data, data / "output", old, older, newer):
        os.chown(path, GATEWAY_UID, GATEWAY_UID)
    cid = subprocess.run([DOCKER, "run", "-d", "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
                          "--security-opt", "no-new-privileges:true", "-v", f"{data}:/data",
                          "-e", "COMFYUI_OUTPUT_MAX_AGE_DAYS=7", "-e", "COMFYUI_OUTPUT_MAX_MB=2",
                          "-e", "COMFYUI_PRUNE_INTERVAL=1", "fluxstack/comfyui:test"],
                         capture_output=True, text=True, check=True).stdout.strip()
    try:
        deadline = time.monotonic() + 60
        while (old.exists() or older.exists()) and time.monotonic() < deadline:
            time.sleep(1)
        logs = subprocess.run([DOCKER, "logs", cid], capture_output=True, text=True)
        assert not old.exists() and not older.exists() and newer.exists(), logs.stdout[-2000:] + logs.stderr[-2000:]
        assert "pruned (age) /data/output/old.png" in logs.stdout
        assert "pruned (over 2 MB) /data/output/a.bin" in logs.stdout
    finally:
        subprocess.run([DOCKER, "rm", "-f", cid], capture_output=True)


@needs_comfyui
def test_an_idle_websocket_outlives_ordinary_proxy_timeouts(stack: Stack) -> None:
    """A browser tab watching a long FLUX run may hear nothing for minutes: silence longer than
    nginx's default 60 s must not cut the WebSocket. After 75 s idle it still carries progress."""
    ws = WebSocket(stack, {"Authorization": f"Bearer {stack.token}"})
    try:
        assert " 101 " in ws.status and ws.message()["type"] == "status"
        time.sleep(75)
        graph = {"1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1,
                                                                "color": 0}},
                 "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
        body = json.dumps({"prompt": graph, "client_id": ws.client_id}).encode()
        queued = stack.request("/api/prompt", stack.token, method="POST", body=body,
                               headers={"Content-Type": "application/json"})
        assert queued.status == 200, queued.body
        prompt_id = queued.json()["prompt_id"]  # type: ignore[index]
        seen = []
        while not any(m.get("type") == "executing" and m.get("data", {}).get("node") is None for m in seen):
            seen.append(ws.message())
        assert any(m.get("data", {}).get("prompt_id") == prompt_id for m in seen)
    finally:
        ws.close()
