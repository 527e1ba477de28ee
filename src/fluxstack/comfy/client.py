"""A ComfyUI API client (stdlib HTTP): submit a graph, follow it, fetch its images.

ComfyUI answers a bad graph with HTTP 400 and per-node error records; `explain_rejection`
turns those into sentences that say what to do (seed a manifest, upload an image, fix a value).
"""

from __future__ import annotations

import json
import mimetypes
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxstack.comfy.workflows import MODEL_INPUTS, Graph
from fluxstack.errors import CheckFailed, UsageError


class PromptTimeout(CheckFailed):
    """The prompt was still queued or running when we stopped waiting."""


@dataclass(frozen=True)
class OutputFile:
    filename: str
    subfolder: str
    type: str


class ComfyClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    # -- transport -------------------------------------------------------------------
    def _open(self, path: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> Any:
        headers = dict(headers or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(f"{self.url}{path}", data=data, headers=headers,
                                         method="POST" if data is not None else "GET")
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as err:
            if err.code in (401, 403):
                raise UsageError(f"ComfyUI at {self.url} refused the request (HTTP {err.code}): "
                                 "pass the gateway token with --token-file FILE or $FLUXSTACK_TOKEN") from None
            raise
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise UsageError(f"cannot reach ComfyUI at {self.url} ({reason}); is it running? "
                             "(`docker compose up comfyui`, or pass --url)") from None

    def get_json(self, path: str) -> Any:
        with self._open(path) as response:
            return json.loads(response.read())

    def post_json(self, path: str, body: Any) -> Any:
        with self._open(path, json.dumps(body).encode(), {"Content-Type": "application/json"}) as response:
            return json.loads(response.read())

    # -- API -------------------------------------------------------------------------
    def system_stats(self) -> dict[str, Any]:
        return self.get_json("/api/system_stats")

    def models(self, folder: str) -> list[str]:
        return self.get_json(f"/api/models/{urllib.parse.quote(folder)}")

    def upload_image(self, path: Path) -> str:
        """Upload into ComfyUI's input folder; returns the name LoadImage takes."""
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read input image {path}: {exc.strerror}") from None
        boundary = uuid.uuid4().hex
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        body = b"".join([
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{path.name}"\r\n'
            f"Content-Type: {ctype}\r\n\r\n".encode(), content,
            f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="overwrite"\r\n\r\ntrue'
            f"\r\n--{boundary}--\r\n".encode()])
        try:
            with self._open("/upload/image", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}) as r:
                answer = json.loads(r.read())
        except urllib.error.HTTPError as err:
            raise UsageError(f"ComfyUI refused the image {path} (HTTP {err.code}): {err.read()[:200]!r}") from None
        return f"{answer['subfolder']}/{answer['name']}" if answer.get("subfolder") else answer["name"]

    def submit(self, graph: Graph, manifest: str | None = None) -> str:
        body = {"prompt": graph, "client_id": uuid.uuid4().hex}
        try:
            return self.post_json("/api/prompt", body)["prompt_id"]
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                answer = json.loads(raw)
            except ValueError:
                raise UsageError(f"ComfyUI rejected the workflow (HTTP {err.code}): {raw[:300]!r}") from None
            raise UsageError(explain_rejection(answer, graph, manifest)) from None

    def wait(self, prompt_id: str, timeout: float, on_status: Callable[[str], None] = lambda _: None,
             poll: float = 0.5) -> dict[str, Any]:
        """Poll /api/history until the prompt finished; raise CheckFailed when it failed."""
        deadline = time.monotonic() + timeout
        said = ""
        while time.monotonic() < deadline:
            entry = self.get_json(f"/api/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                    entry["status"]["completed"] or entry["status"].get("status_str") == "error"):
                if entry["status"].get("status_str") == "error":
                    raise CheckFailed(explain_failure(entry))
                return entry
            state = self._queue_state(prompt_id)
            if state != said:
                on_status(state)
                said = state
            time.sleep(poll)
        raise PromptTimeout(f"the workflow did not finish within {timeout:.0f} s (prompt {prompt_id} is still "
                          "queued or running in ComfyUI); raise --timeout or check `docker compose logs comfyui`")

    def cancel(self, prompt_id: str) -> None:
        """Drop the prompt from the queue, or stop it if it runs (only this prompt, not someone else's)."""
        for path, body in (("/api/queue", {"delete": [prompt_id]}), ("/api/interrupt", {"prompt_id": prompt_id})):
            with self._open(path, json.dumps(body).encode(), {"Content-Type": "application/json"}):
                pass

    def _queue_state(self, prompt_id: str) -> str:
        queue = self.get_json("/api/queue")
        if any(item[1] == prompt_id for item in queue.get("queue_running", [])):
            return "running"
        pending = [item[1] for item in queue.get("queue_pending", [])]
        if prompt_id in pending:
            return f"queued ({pending.index(prompt_id) + 1} ahead of it: {len(pending) - 1})"
        return "finishing"

    def download(self, item: OutputFile, out_dir: Path) -> Path:
        query = urllib.parse.urlencode({"filename": item.filename, "subfolder": item.subfolder, "type": item.type})
        out_dir.mkdir(parents=True, exist_ok=True)
        final = out_dir / Path(item.filename).name
        partial = final.with_name(f".{final.name}.part")
        with self._open(f"/api/view?{query}") as response, open(partial, "wb") as fh:
            while chunk := response.read(1 << 20):
                fh.write(chunk)
        os.replace(partial, final)  # never a half-written image under its final name
        return final


def outputs_of(entry: dict[str, Any]) -> list[OutputFile]:
    files = []
    for node_output in entry.get("outputs", {}).values():
        for image in node_output.get("images", []):
            if image.get("type") == "output":
                files.append(OutputFile(image["filename"], image.get("subfolder", ""), image["type"]))
    return files


def _node_label(graph: Graph, node_id: str) -> str:
    node = graph.get(node_id, {})
    title = node.get("_meta", {}).get("title")
    kind = node.get("class_type", "?")
    return f"node {node_id} ({title})" if title and title != kind else f"node {node_id} ({kind})"


def explain_rejection(answer: dict[str, Any], graph: Graph, manifest: str | None) -> str:
    """ComfyUI's 400 body -> one actionable line per problem."""
    lines = []
    for node_id, record in (answer.get("node_errors") or {}).items():
        kind = record.get("class_type") or graph.get(node_id, {}).get("class_type", "")
        for error in record.get("errors", []):
            info = error.get("extra_info") or {}
            input_name = info.get("input_name", "")
            value = info.get("received_value")
            folder = MODEL_INPUTS.get(kind, {}).get(input_name)
            if error.get("type") == "value_not_in_list" and folder:
                seed = f"`fluxstack seed {manifest}`" if manifest else "`fluxstack seed <the manifest that has it>`"
                lines.append(f"{value} is not in the store ({folder}/, asked for by {_node_label(graph, node_id)}): "
                             f"run {seed}")
            elif kind == "LoadImage" and input_name == "image":
                value = value if value is not None else graph.get(node_id, {}).get("inputs", {}).get("image")
                lines.append(f"input image {value!r} is not in ComfyUI's input folder ({_node_label(graph, node_id)}): "
                             f"pass --image PATH or --set {node_id}.image=@PATH and it is uploaded for you")
            else:
                where = f"{_node_label(graph, node_id)}" + (f" input {input_name}" if input_name else "")
                detail = error.get("details") or ""
                detail = "" if detail == input_name else detail
                lines.append(f"{where}: {error.get('message', error.get('type'))}" + (f" ({detail})" if detail else ""))
    if not lines:
        error = answer.get("error") or {}
        message = error.get("message", "rejected") if isinstance(error, dict) else str(error)
        details = error.get("details", "") if isinstance(error, dict) else ""
        lines.append(f"{message}" + (f": {details}" if details else ""))
    return "ComfyUI rejected the workflow:\n  " + "\n  ".join(lines)


def explain_failure(entry: dict[str, Any]) -> str:
    for event, data in entry.get("status", {}).get("messages", []):
        if event == "execution_error":
            return (f"the workflow failed in node {data.get('node_id')} ({data.get('node_type')}): "
                    f"{data.get('exception_type', 'error')}: {str(data.get('exception_message', '')).strip()} "
                    "(a corrupt model file fails only here: `fluxstack seed <manifest> --verify --full` "
                    "checks the store)")
        if event == "execution_interrupted":
            return "the workflow was interrupted in ComfyUI (someone pressed Cancel or the server restarted)"
    return "the workflow failed in ComfyUI; see `docker compose logs comfyui`"
