"""`fluxstack generate`: the guide's flux_demo.py as a command, talking to a running runtime."""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from fluxstack.errors import CheckFailed, UsageError


def generate(url: str, body: dict[str, Any], out: Path, timeout: float,
             token: str | None = None) -> dict[str, Any]:
    """POST a generation; write the image(s) to out (out-1.png, out-2.png, ... for several).

    With a token it goes as `Authorization: Bearer`, for the gateway. HTTPS uses the system's
    trust store; SSL_CERT_FILE=ca.pem trusts a gateway's self-signed CA."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(f"{url.rstrip('/')}/v1/images/generations", data=json.dumps(body).encode(),
                                     headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read())
    except urllib.error.HTTPError as err:
        try:
            message = json.loads(err.read()).get("error", err.reason)
        except ValueError:
            message = err.reason
        if err.code == 401:
            hint = "the token was not accepted" if token else "a token is needed: --token-file FILE or $FLUXSTACK_TOKEN"
            raise UsageError(f"the gateway at {url} refused the request (HTTP 401): {hint}") from None
        cls = UsageError if err.code in (400, 413, 422) else CheckFailed
        raise cls(f"the runtime at {url} refused the request (HTTP {err.code}): {message}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise UsageError(f"{url} presented a certificate this machine does not trust ({reason.verify_message}); "
                             "for a gateway's self-signed CA set SSL_CERT_FILE=ca.pem (docs/gateway.md)") from None
        raise UsageError(f"cannot reach the runtime at {url} ({reason}); is it running? "
                         "(`docker compose up runtime`, or pass --url)") from None
    images = [base64.b64decode(item["b64_json"]) for item in payload["data"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{i + 1}{out.suffix}")
                                            for i in range(len(images))]
    for path, png in zip(paths, images, strict=True):
        path.write_bytes(png)
    return {"seed": payload["seed"], "model": payload["model"], "files": [str(p) for p in paths]}
