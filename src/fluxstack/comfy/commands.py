"""`fluxstack comfy …`: run, check and export the shipped workflows; check ComfyUI's readiness."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from fluxstack.errors import CheckFailed, UsageError

TOKEN_ENV = "FLUXSTACK_TOKEN"
DEFAULT_URL = "http://127.0.0.1:8188"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def read_token(path: Path | None) -> str | None:
    """From --token-file, else $FLUXSTACK_TOKEN; never from the command line (it would show in ps)."""
    if path is not None:
        try:
            return path.read_text().strip() or None
        except OSError as exc:
            raise UsageError(f"cannot read --token-file {path}: {exc.strerror}") from None
    return os.environ.get(TOKEN_ENV) or None


def client_for(args: argparse.Namespace, timeout: float = 30.0) -> Any:
    from fluxstack.comfy.client import ComfyClient

    return ComfyClient(args.url, read_token(args.token_file), timeout)


def cmd_run(args: argparse.Namespace) -> int:
    from fluxstack.comfy.client import PromptTimeout, outputs_of
    from fluxstack.comfy.workflows import apply_overrides, find_workflow, parse_set

    workflow, graph = find_workflow(args.workflow)
    client = client_for(args)
    overrides: list[tuple[str, Any]] = []
    shortcuts = {"prompt": args.prompt, "seed": args.seed, "steps": args.steps, "width": args.width,
                 "height": args.height, "image": args.image}
    for key, value in shortcuts.items():
        if value is None:
            continue
        targets = workflow.params.get(key, []) if workflow else []
        if not targets:
            raise UsageError(f"--{key} is not mapped for {args.workflow}; use --set NODE.INPUT=VALUE")
        if key == "image":
            value = client.upload_image(Path(value))
        overrides += [(target, value if isinstance(value, str) else str(value)) for target in targets]
    for text in args.set:
        target, value = parse_set(text)
        if value.startswith("@"):
            value = client.upload_image(Path(value[1:]))
        overrides.append((target, value))
    graph = apply_overrides(graph, overrides)
    manifest = workflow.manifest if workflow else None
    prompt_id = client.submit(graph, manifest)
    _say(f"submitted {args.workflow} as prompt {prompt_id} to {client.url}")
    try:
        entry = client.wait(prompt_id, args.timeout, on_status=lambda s: _say(f"  {s}"))
    except (PromptTimeout, KeyboardInterrupt):
        client.cancel(prompt_id)  # a run we gave up on must not keep the GPU busy
        _say(f"cancelled prompt {prompt_id} in ComfyUI")
        raise
    files = [client.download(item, args.out) for item in outputs_of(entry)]
    if not files:
        raise CheckFailed("the workflow finished but produced no output image (does it end in a SaveImage node?)")
    for path in files:
        print(path)
    return 0


def cmd_ready(args: argparse.Namespace) -> int:
    from fluxstack.comfy.ready import check_ready
    from fluxstack.comfy.workflows import load_index
    from fluxstack.store import Store

    names = args.workflow or [w for w in os.environ.get("FLUXSTACK_WORKFLOWS", "").replace(",", " ").split() if w]
    if not names:
        raise UsageError("name the workflows to check (`fluxstack comfy ready flux-dev-t2i`) or set "
                         "FLUXSTACK_WORKFLOWS")
    index = load_index()
    unknown = [n for n in names if n not in index]
    if unknown:
        raise UsageError(f"unknown workflow(s) {', '.join(unknown)}; shipped: {', '.join(sorted(index))}")
    client = client_for(args, timeout=10.0) if args.url else None
    checks = check_ready([index[n] for n in names], Store(args.models_dir), client)
    if args.json:
        json.dump([c.to_json() for c in checks], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for c in checks:
            print(f"{'ok' if c.ok else 'FAIL':>4}  {c.name}: {c.detail}")
    failed = [c for c in checks if not c.ok]
    if not args.json:
        _say(f"ComfyUI {'not ' if failed else ''}ready for {', '.join(names)}"
             + (f": {len(failed)} of {len(checks)} checks failed" if failed else ""))
    return 1 if failed else 0


def cmd_check(args: argparse.Namespace) -> int:
    from fluxstack.comfy.workflows import load_index, missing_from_manifest

    problems = 0
    for workflow in load_index().values():
        if args.workflow and workflow.name not in args.workflow:
            continue
        manifest = workflow.load_manifest()
        failures = [f"node {ref.node} loads {ref.dest}, which manifest {manifest.name} does not provide"
                    for ref in missing_from_manifest(workflow, manifest)]
        if not workflow.ui_path.is_file():
            failures.append(f"no UI-format file {workflow.ui_path.name} (`fluxstack comfy ui {workflow.name}`)")
        for failure in failures:
            print(f"FAIL  {workflow.name}: {failure}")
        if not failures:
            print(f"  ok  {workflow.name}: {len(workflow.model_refs())} model files, all in {manifest.name}")
        problems += len(failures)
    return 1 if problems else 0


def cmd_ui(args: argparse.Namespace) -> int:
    from fluxstack.comfy.ui_format import to_ui
    from fluxstack.comfy.workflows import find_workflow

    workflow, graph = find_workflow(args.workflow)
    object_info = client_for(args).get_json("/api/object_info")
    ui = json.dumps(to_ui(graph, object_info), indent=2) + "\n"
    target = args.out or (workflow.ui_path if workflow else None)
    if target is None:
        sys.stdout.write(ui)
    else:
        target.write_text(ui)
        _say(f"wrote {target}")
    return 0


def cmd_sample_store(args: argparse.Namespace) -> int:
    from fluxstack.comfy.sample_models import generate

    manifests = generate(args.out, seed=args.seed)
    _say(f"random-weight models in {args.out / 'store'}; their manifests in {manifests} — seed or serve them with "
         f"`fluxstack --manifests-dir {manifests} …` (images will be noise: this proves plumbing, not FLUX)")
    print(manifests)
    return 0


def add_parser(sub: Any, default_models_dir: Path) -> None:
    comfy = sub.add_parser("comfy", help="run the shipped ComfyUI workflows and check ComfyUI's readiness")
    csub = comfy.add_subparsers(dest="comfy_command", required=True, metavar="ACTION")

    def server_args(p: argparse.ArgumentParser, url: str | None = DEFAULT_URL) -> None:
        p.add_argument("--url", default=os.environ.get("FLUXSTACK_COMFY_URL", url),
                       help=f"ComfyUI (or the gateway in front of it); default $FLUXSTACK_COMFY_URL or {url}")
        p.add_argument("--token-file", type=Path, default=os.environ.get("FLUXSTACK_TOKEN_FILE"),
                       help=f"file with the gateway's bearer token (default $FLUXSTACK_TOKEN_FILE, else ${TOKEN_ENV})")

    p = csub.add_parser("run", help="submit a workflow, wait for it and download its images")
    p.add_argument("workflow", help="a shipped workflow name (see workflows/index.yaml) or an API-format .json")
    p.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="override a node input (NODE = id or title); VALUE @PATH uploads an image")
    for name, kind in (("prompt", str), ("seed", int), ("steps", int), ("width", int), ("height", int)):
        p.add_argument(f"--{name}", type=kind)
    p.add_argument("--image", type=Path, help="input image (Redux, Kontext): uploaded to ComfyUI for you")
    p.add_argument("--out", type=Path, default=Path("comfy-out"), help="folder for the images (default comfy-out)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the result")
    server_args(p)
    p.set_defaults(func=cmd_run)

    p = csub.add_parser("ready", help="are the models the workflows need in the store, verified (and listed)?")
    p.add_argument("workflow", nargs="*", help="workflows to check (default $FLUXSTACK_WORKFLOWS)")
    p.add_argument("--models-dir", type=Path, default=default_models_dir)
    p.add_argument("--json", action="store_true")
    server_args(p, url=None)
    p.set_defaults(func=cmd_ready)

    p = csub.add_parser("check", help="every model file a workflow loads is in the manifest it names")
    p.add_argument("workflow", nargs="*")
    p.set_defaults(func=cmd_check)

    p = csub.add_parser("sample-store", help="write random-weight models ComfyUI loads, named like the shipped "
                        "manifests' files (~7 GB), to smoke-test a deployment offline")
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_sample_store)

    p = csub.add_parser("ui", help="write a workflow's UI-format file from a running ComfyUI's node definitions")
    p.add_argument("workflow")
    p.add_argument("--out", type=Path, help="file to write (default: the shipped <name>.ui.json)")
    server_args(p)
    p.set_defaults(func=cmd_ui)
