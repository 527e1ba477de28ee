"""`fluxstack generate`: the guide's flux_demo.py as a command, talking to a running runtime."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from fluxstack.errors import CheckFailed, UsageError


def generate(url: str, body: dict[str, Any], out: Path, timeout: float) -> dict[str, Any]:
    """POST a generation; write the image(s) to out (out-1.png, out-2.png, ... for several)."""
    request = urllib.request.Request(f"{url.rstrip('/')}/v1/images/generations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read())
    except urllib.error.HTTPError as err:
        try:
            message = json.loads(err.read()).get("error", err.reason)
        except ValueError:
            message = err.reason
        cls = UsageError if err.code in (400, 422) else CheckFailed
        raise cls(f"the runtime at {url} refused the request (HTTP {err.code}): {message}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise UsageError(f"cannot reach the runtime at {url} ({reason}); is it running? "
                         "(`docker compose up runtime`, or pass --url)") from None
    images = [base64.b64decode(item["b64_json"]) for item in payload["data"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{i + 1}{out.suffix}")
                                            for i in range(len(images))]
    for path, png in zip(paths, images, strict=True):
        path.write_bytes(png)
    return {"seed": payload["seed"], "model": payload["model"], "files": [str(p) for p in paths]}
