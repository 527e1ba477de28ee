"""`fluxstack doctor`: how exposed is this host? Listening ports and where, whether the gateway
demands authentication, whether secret files are private. Exit 0 all good, 1 a check failed,
2 usage or environment error."""

from __future__ import annotations

import ipaddress
import os
import shutil
import ssl
import stat
import subprocess
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fluxstack.errors import UsageError

PROC_NET = Path("/proc/net")
LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


@dataclass
class Check:
    name: str
    status: str  # ok, FAIL, info
    detail: str


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    listening: list[dict[str, object]] = field(default_factory=list)
    auth: str = "unknown"

    @property
    def failed(self) -> bool:
        return any(c.status == "FAIL" for c in self.checks)

    def to_json(self) -> dict[str, object]:
        return {"ok": not self.failed, "auth": self.auth, "listening": self.listening,
                "checks": [asdict(c) for c in self.checks]}


def _decode_address(hex_addr: str) -> str:
    """/proc/net/tcp{,6} hold addresses as host-order 32-bit words in hex."""
    raw = bytes.fromhex(hex_addr)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def listening_sockets(proc_net: Path = PROC_NET) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket in this network namespace."""
    found: set[tuple[str, int]] = set()
    for name in ("tcp", "tcp6"):
        path = proc_net / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            parts = line.split()
            if len(parts) < 4 or parts[3] != LISTEN:
                continue
            addr, port = parts[1].split(":")
            found.add((_decode_address(addr), int(port, 16)))
    if not found and not (proc_net / "tcp").exists():
        raise UsageError(f"cannot read {proc_net}/tcp: doctor needs Linux's /proc")
    return sorted(found, key=lambda a: (a[1], a[0]))


def docker_published() -> list[tuple[str, int, str]]:
    """(host address, port, container) of ports Docker publishes: with the userland proxy off they
    are iptables rules, not sockets, and would be missed by /proc alone."""
    docker = os.environ.get("DOCKER", "docker")
    if shutil.which(docker) is None:
        return []
    try:
        out = subprocess.run([docker, "ps", "--format", "{{.Names}}\t{{.Ports}}"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode:
        return []
    published = []
    for line in out.stdout.splitlines():
        name, _, ports = line.partition("\t")
        for spec in ports.split(", "):
            # 127.0.0.1:8443->8443/tcp, [::]:8443->8443/tcp, 0.0.0.0:8443->8443/tcp
            host, arrow, _ = spec.partition("->")
            if not arrow or ":" not in host:
                continue
            addr, _, port = host.rpartition(":")
            if port.isdigit():
                published.append((addr.strip("[]"), int(port), name))
    return published


def is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def probe_auth(url: str, token: str | None, timeout: float = 5.0) -> tuple[str, str]:
    """('on'|'off'|'absent'|'broken', detail) for the gateway at url. The probe checks this host's own
    gateway, so it does not verify the (often self-signed) certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE

    def status(path: str, bearer: str | None = None) -> int:
        headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
        request = urllib.request.Request(url.rstrip("/") + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code

    try:
        health = status("/healthz")
        anonymous = status("/v1/models")
    except (urllib.error.URLError, OSError) as err:
        return "absent", f"no gateway answers at {url} ({getattr(err, 'reason', err)})"
    if health != 200:
        return "broken", f"{url}/healthz answered HTTP {health}"
    if anonymous != 401:
        return "off", f"{url}/v1/models answered HTTP {anonymous} without a token"
    if token is None:
        return "on", f"{url} refuses requests without a token (401)"
    with_token = status("/v1/models", token)
    if with_token == 401:
        return "on", f"{url} demands a token, but refused the one in the token file (401): stale file?"
    return "on", f"{url} refuses requests without a token and accepts the token file's (HTTP {with_token})"


def check_secret_file(path: Path) -> Check:
    """A token or key file must be readable by its owner only (0400 or 0600)."""
    try:
        st = path.stat()
    except OSError as exc:
        return Check(f"secret {path}", "FAIL", f"cannot stat: {exc.strerror}")
    if not stat.S_ISREG(st.st_mode):
        return Check(f"secret {path}", "FAIL", "not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        return Check(f"secret {path}", "FAIL", f"mode {mode:04o} lets group or others read it; chmod 0400 {path}")
    return Check(f"secret {path}", "ok", f"mode {mode:04o}, owner uid {st.st_uid}")


def run_doctor(gateway_url: str, gateway_port: int, service_ports: dict[int, str],
               secret_files: list[Path], token_file: Path | None) -> Report:
    report = Report()
    sockets = listening_sockets()
    published = docker_published()
    seen: dict[tuple[str, int], str] = {}
    for addr, port in sockets:
        seen[(addr, port)] = ""
    for addr, port, container in published:
        seen[(addr, port)] = container
    token = None
    if token_file is not None:
        try:
            # The gateway's format: one token a line, '#' comments; the first token is probed.
            lines = [line.strip() for line in token_file.read_text().splitlines()]
            token = next((line for line in lines if line and not line.startswith("#")), None)
        except OSError as exc:
            raise UsageError(f"cannot read --token-file {token_file}: {exc.strerror}") from None
    auth, auth_detail = probe_auth(gateway_url, token)
    report.auth = auth
    exposed_services = []
    for (addr, port), container in sorted(seen.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        local = is_loopback(addr)
        role = "gateway" if port == gateway_port else service_ports.get(port, "")
        report.listening.append({"address": addr, "port": port, "loopback": local, "role": role or None,
                                 "container": container or None})
        where = f"{addr}:{port}" + (f" ({role})" if role else "") + (f" [{container}]" if container else "")
        if local:
            continue
        if role == "gateway":
            ok = auth == "on"
            report.checks.append(Check(f"listen {where}", "ok" if ok else "FAIL",
                                       "reachable from the network, behind authentication" if ok else
                                       f"reachable from the network and authentication is {auth}: {auth_detail}"))
        elif role:
            exposed_services.append(where)
            report.checks.append(Check(f"listen {where}", "FAIL",
                                       "a fluxstack service reachable from the network without authentication; "
                                       "publish it on 127.0.0.1 (FLUXSTACK_BIND) or enable the gateway "
                                       "(compose/gateway.yaml)"))
        else:
            report.checks.append(Check(f"listen {where}", "info", "not a fluxstack port; reachable from the network"))
    if auth in ("off", "broken"):
        report.checks.append(Check("gateway auth", "FAIL", auth_detail))
    elif auth == "on":
        refused = "refused the one" in auth_detail
        report.checks.append(Check("gateway auth", "FAIL" if refused else "ok", auth_detail))
    else:
        report.checks.append(Check("gateway auth", "info", f"{auth_detail}; services are "
                                   + ("exposed without it" if exposed_services else "local only")))
    for path in secret_files:
        report.checks.append(check_secret_file(path))
    return report


def default_secret_files() -> list[Path]:
    """The gateway's token file and TLS key, and the Hugging Face token, where configured."""
    names = [os.environ.get("GATEWAY_TOKENS_FILE"), os.environ.get("GATEWAY_TLS_KEY_FILE"),
             os.environ.get("HF_TOKEN_FILE"), "/etc/fluxstack/gateway-tokens"]
    files: list[Path] = []
    for name in names:
        if name and name != "/dev/null" and Path(name).exists() and Path(name) not in files:
            files.append(Path(name))
    return files

