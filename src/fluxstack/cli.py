"""The `fluxstack` command: the one entry point the Makefile, the containers and Ansible call."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from fluxstack import __version__
from fluxstack.errors import FluxstackError, UsageError
from fluxstack.units import human_size, parse_size


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _emit_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- seed ----------------------------------------------------------------------------
def cmd_seed(args: argparse.Namespace) -> int:
    from fluxstack.download import Options
    from fluxstack.hub import Source, is_hub, resolve_endpoint, resolve_token
    from fluxstack.manifest import load_manifest
    from fluxstack.progress import make_reporter
    from fluxstack.seeder import Seeder, SeedOptions
    from fluxstack.store import Store

    manifest = load_manifest(args.manifest)
    endpoint = resolve_endpoint(args.endpoint)
    if not is_hub(endpoint):
        os.environ["HF_HUB_DISABLE_XET"] = "1"  # Xet would bypass the mirror
    source = Source(endpoint, resolve_token(args.token_file))
    options = SeedOptions(
        jobs=args.jobs,
        download=Options(connections=args.connections, retries=args.retries, timeout=args.timeout,
                         preallocate=not args.no_preallocate),
        dry_run=args.dry_run, verify=args.verify, full=args.full, space_margin=args.space_margin,
        skip_space_check=args.skip_space_check, lock_timeout=args.lock_timeout)
    store = Store(args.models_dir)
    reporter = make_reporter(manifest.total_size, args.json)
    try:
        report = Seeder(manifest, store, source, options, reporter).run()
    finally:
        reporter.close()
    if args.json:
        _emit_json(report.to_json())
    for o in report.outcomes:
        if args.dry_run or args.verify or o.status not in ("cached", "downloaded"):
            _say(f"{o.status:>10}  {o.dest}  {human_size(o.size)}{'  ' + o.detail if o.detail else ''}")
    total = human_size(manifest.total_size)
    if report.error is not None:
        _say(f"fluxstack: error: {report.error}")
    elif args.dry_run:
        _say(f"{manifest.name}: dry run, {len(manifest.files)} files, {total}; "
             f"{human_size(report.needed_bytes)} to download, {human_size(report.free_bytes)} free")
    elif report.ready:
        fetched = sum(o.downloaded for o in report.outcomes)
        _say(f"{manifest.name}: ready, {len(manifest.files)} files ({total}) verified in {report.seconds:.2f} s, "
             f"{human_size(fetched)} downloaded; marker {store.ready_path(manifest.name)}")
    else:
        bad = [o.dest for o in report.outcomes if o.status not in ("cached", "verified", "downloaded")]
        _say(f"{manifest.name}: NOT ready; {len(bad)} file(s) need attention: {', '.join(bad)}. "
             f"Run `fluxstack seed {manifest.name}` to repair.")
    if args.dry_run and report.needed_bytes + options.space_margin > report.free_bytes and report.needed_bytes:
        return 2
    return report.exit_code


# -- manifest ------------------------------------------------------------------------
def cmd_manifest_list(args: argparse.Namespace) -> int:
    from fluxstack.manifest import available_manifests, default_manifests_dir, load_manifest

    rows = []
    for name in available_manifests(default_manifests_dir()):
        m = load_manifest(name)
        rows.append({"name": name, "files": len(m.files), "bytes": m.total_size,
                     "unlocked": len(m.unlocked()), "description": m.description})
    if args.json:
        _emit_json(rows)
    for r in rows:
        flag = f"  ({r['unlocked']} unlocked)" if r["unlocked"] else ""
        print(f"{r['name']:<28} {r['files']:>2} files {human_size(r['bytes']):>10}{flag}  {r['description']}",
              file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_manifest_show(args: argparse.Namespace) -> int:
    from fluxstack.manifest import load_manifest

    m = load_manifest(args.name)
    if args.json:
        _emit_json({"name": m.name, "description": m.description, "include": m.include,
                    "total_bytes": m.total_size, "digest": m.digest(), "files": [f.to_dict() for f in m.files]})
        return 0
    print(f"{m.name}: {m.description}")
    if m.include:
        print(f"includes: {', '.join(m.include)}")
    for f in m.files:
        size = human_size(f.size) if f.size is not None else "size unknown"
        sha = f.sha256[:12] if f.sha256 else "UNLOCKED"
        gated = " gated" if f.gated else ""
        print(f"  {f.dest:<60} {size:>10}  {sha}  {f.repo}@{f.revision[:12]}{gated}")
    print(f"total: {len(m.files)} files, {human_size(m.total_size)}")
    if m.unlocked():
        print(f"problem: {len(m.unlocked())} entries have no sha256/size; run `fluxstack manifest lock {m.name}`")
        return 1
    return 0


def cmd_manifest_validate(args: argparse.Namespace) -> int:
    from fluxstack.manifest import available_manifests, default_manifests_dir, load_manifest

    names = args.names or available_manifests(default_manifests_dir())
    failed = 0
    for name in names:
        try:
            m = load_manifest(name)
        except UsageError as exc:
            print(f"FAIL {name}: {exc}")
            failed += 1
            continue
        note = f"; {len(m.unlocked())} unlocked entries (seed refuses them)" if m.unlocked() else ""
        print(f"ok   {name}: {len(m.files)} files, {human_size(m.total_size)}{note}")
    return 1 if failed else 0


def cmd_manifest_lock(args: argparse.Namespace) -> int:
    from fluxstack.hub import Source, resolve_endpoint, resolve_token
    from fluxstack.lock import lock_manifest
    from fluxstack.manifest import load_manifest, write_files

    manifest = load_manifest(args.name)
    source = Source(resolve_endpoint(args.endpoint), resolve_token(args.token_file))
    files, changes = lock_manifest(manifest, source)
    for c in changes:
        print(f"{c.dest}: {c.field} {c.old} -> {c.new}")
    if not changes:
        print(f"{manifest.name}: already locked, matches {source.endpoint}")
        return 0
    if args.check:
        print(f"{manifest.name}: {len(changes)} difference(s) with {source.endpoint}; not written (--check)")
        return 1
    write_files(manifest, files)
    print(f"{manifest.name}: wrote {len(changes)} change(s) to {manifest.path}; review them with git diff")
    return 0


# -- gc ------------------------------------------------------------------------------
def cmd_gc(args: argparse.Namespace) -> int:
    from fluxstack.gc import apply_gc, plan_gc
    from fluxstack.store import Store

    store = Store(args.models_dir)
    if not store.meta.is_dir():
        raise UsageError(f"{args.models_dir} is not a fluxstack store (no .fluxstack folder); check --models-dir")
    with store.locked(args.lock_timeout, _say):
        plan = plan_gc(store, args.keep)
        if not args.dry_run:
            apply_gc(store, plan)
    verb = "would remove" if args.dry_run else "removed"
    if args.json:
        _emit_json({"dry_run": args.dry_run, "in_use": plan.in_use, "bytes": plan.bytes,
                    "remove": [{"path": str(p), "bytes": n, "why": why} for p, n, why in plan.remove],
                    "unmanaged": [str(p) for p in plan.unmanaged]})
    for path, size, why in plan.remove:
        _say(f"{verb} {path} ({human_size(size)}): {why}")
    for path in plan.unmanaged:
        _say(f"kept {path}: not put there by fluxstack")
    _say(f"gc: {verb} {len(plan.remove)} item(s), {human_size(plan.bytes)}; in use: {', '.join(plan.in_use) or 'none'}")
    return 0


# -- mirror --------------------------------------------------------------------------
def cmd_mirror_serve(args: argparse.Namespace) -> int:
    from fluxstack.hub import read_token_file
    from fluxstack.manifest import load_manifest
    from fluxstack.mirror import serve
    from fluxstack.store import Store

    store = Store(args.models_dir)
    if args.manifest:
        files = [f for name in args.manifest for f in load_manifest(name).files]
    else:
        from fluxstack.manifest import ManifestFile

        files = [ManifestFile(**e) for m in store.ready_markers().values() for e in m.get("files", [])]
    token = read_token_file(args.token_file, "--token-file").value if args.token_file else None
    with contextlib.suppress(KeyboardInterrupt):
        serve(store, files, args.host, args.port, token, args.max_rate)
    return 0


# -- runtime -------------------------------------------------------------------------
def cmd_runtime_serve(args: argparse.Namespace) -> int:
    from fluxstack.runtime.engine import choose_profile
    from fluxstack.runtime.perf import choose_perf
    from fluxstack.runtime.variants import load_variant
    from fluxstack.store import Store

    # Refuse an unknown or impossible memory profile / performance mode first (exit 2), not in /readyz.
    profile, device = choose_profile(args.profile, args.gpu_memory_limit)
    perf, why = choose_perf(args.perf, profile, device)
    store = Store(args.models_dir)
    names = args.manifest or [os.environ.get("FLUXSTACK_RUNTIME_MANIFEST", "flux-dev-runtime")]
    variants = [load_variant(store, name) for name in names]  # refuses to start when the store is not ready
    os.environ["HF_HUB_OFFLINE"] = "1"
    import uvicorn

    from fluxstack.runtime.app import Metrics, Settings, create_app
    from fluxstack.runtime.engine import Engine
    from fluxstack.runtime.worker import Worker

    settings = Settings(queue_size=args.queue_size, timeout=args.timeout, max_pixels=args.max_pixels)
    metrics = Metrics()
    engine = Engine(variants, store.root / "loras", args.profile, args.gpu_memory_limit, perf=args.perf,
                    compile_cache=args.compile_cache, prepared_weights=args.prepared_weights,
                    read_threads=args.read_threads)
    worker = Worker(engine, settings.queue_size, settings.timeout, metrics)
    app = create_app(engine, worker, store, settings, metrics)
    _say(f"runtime: memory profile {profile} on {device}, performance mode {perf} ({why})")
    _say(f"runtime: serving {', '.join(v.name for v in variants)} from {store.root} on http://{args.host}:{args.port}")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from fluxstack.comfy.commands import read_token
    from fluxstack.runtime.client import generate

    body: dict[str, Any] = {"prompt": args.prompt, "n": args.n, "response_format": "b64_json"}
    for key in ("model", "width", "height", "steps", "guidance", "seed"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    loras = []
    for spec in args.lora:
        name, _, weight = spec.partition(":")
        try:
            loras.append({"name": name, "weight": float(weight) if weight else 1.0})
        except ValueError:
            raise UsageError(f"--lora {spec!r}: the weight after ':' must be a number (example: style:0.8)") from None
    if loras:
        body["loras"] = loras
    if args.image is not None:
        import base64

        try:
            body["image"] = base64.b64encode(args.image.read_bytes()).decode()
        except OSError as exc:
            raise UsageError(f"cannot read --image {args.image}: {exc.strerror}") from None
    result = generate(args.url, body, args.out, args.timeout, read_token(args.token_file))
    for path in result["files"]:
        print(path)
    _say(f"generated with {result['model']}, seed {result['seed']}")
    return 0


# -- doctor --------------------------------------------------------------------------
def cmd_doctor(args: argparse.Namespace) -> int:
    from fluxstack.doctor import default_secret_files, run_doctor

    services = {args.runtime_port: "runtime", args.comfyui_port: "comfyui", args.mirror_port: "mirror"}
    secrets = args.secret_file or default_secret_files()
    if args.token_file is not None and args.token_file not in secrets:
        secrets.append(args.token_file)
    url = args.gateway_url or f"https://127.0.0.1:{args.gateway_port}"
    report = run_doctor(url, args.gateway_port, services, secrets, args.token_file)
    if args.json:
        _emit_json(report.to_json())
    out = sys.stderr if args.json else sys.stdout
    for c in report.checks:
        print(f"{c.status:<5} {c.name}: {c.detail}", file=out)
    local = sum(1 for s in report.listening if s["loopback"])
    print(f"doctor: {len(report.listening)} listening port(s), {local} on loopback only; gateway auth "
          f"{report.auth}; {'a check FAILED' if report.failed else 'no problem found'}", file=out)
    return 1 if report.failed else 0


def cmd_dev_tiny_model(args: argparse.Namespace) -> int:
    from fluxstack.runtime.tiny import generate

    manifest = generate(args.out, seed=args.seed, name=args.name)
    _say(f"tiny model written to {args.out / 'store'}; manifest {manifest}")
    print(manifest)
    return 0


# -- parser --------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from fluxstack.store import default_models_dir

    parser = argparse.ArgumentParser(prog="fluxstack", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fluxstack {__version__}")
    parser.add_argument("--manifests-dir", type=Path, help="folder of manifest YAML files "
                        "(default: $FLUXSTACK_MANIFESTS_DIR, ./manifests, or the checkout's manifests/)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def store_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--models-dir", type=Path, default=default_models_dir(),
                       help="the model store (default: $FLUXSTACK_MODELS_DIR or ./models)")
        p.add_argument("--lock-timeout", type=float, default=None,
                       help="seconds to wait for another writer on the store (default: wait)")

    def source_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--endpoint", help="Hub or mirror URL (default: $HF_ENDPOINT or https://huggingface.co)")
        p.add_argument("--token-file", type=Path, help="file holding a Hugging Face token "
                       "(else $HF_TOKEN, $HF_TOKEN_PATH, /run/secrets/hf_token)")

    p = sub.add_parser("seed", help="download and verify a manifest's files into the store")
    p.add_argument("manifest", help="manifest name (flux-dev) or path to a .yaml file")
    store_args(p)
    source_args(p)
    p.add_argument("--jobs", type=_positive, default=4, help="files downloaded at once (default 4)")
    p.add_argument("--connections", type=_positive, default=4,
                   help="connections per large file, each on its own byte range (default 4)")
    p.add_argument("--dry-run", action="store_true", help="show what would be downloaded; change nothing")
    p.add_argument("--verify", action="store_true", help="check the store against the manifest; download nothing")
    p.add_argument("--full", action="store_true", help="rehash every file instead of trusting the state cache")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("--space-margin", type=_size_arg, default=1 << 30,
                   help="free space to keep beyond the download (default 1GiB)")
    p.add_argument("--skip-space-check", action="store_true",
                   help="do not refuse to start when free space looks short (thin-provisioned or network storage)")
    p.add_argument("--no-preallocate", action="store_true",
                   help="do not reserve each file's space before downloading (for copy-on-write filesystems)")
    p.add_argument("--retries", type=int, default=5, help="retries per request on network errors (default 5)")
    p.add_argument("--timeout", type=float, default=60.0, help="socket timeout in seconds (default 60)")
    p.set_defaults(func=cmd_seed)

    p = sub.add_parser("gc", help="remove stale partials and files no manifest in use needs")
    store_args(p)
    p.add_argument("--keep", action="append", default=[], metavar="MANIFEST",
                   help="also keep this manifest's files (repeatable); ready manifests are always kept")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed")
    p.add_argument("--json", action="store_true", help="print the plan as JSON on stdout")
    p.set_defaults(func=cmd_gc)

    m = sub.add_parser("manifest", help="list, show, validate and lock manifests")
    msub = m.add_subparsers(dest="manifest_command", required=True, metavar="ACTION")
    p = msub.add_parser("list", help="the manifests this installation knows")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_manifest_list)
    p = msub.add_parser("show", help="files, sizes and problems of one manifest (with includes)")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_manifest_show)
    p = msub.add_parser("validate", help="check manifests against the schema (all when none named)")
    p.add_argument("names", nargs="*")
    p.set_defaults(func=cmd_manifest_validate)
    p = msub.add_parser("lock", help="pin commits and fill size/sha256 from Hub metadata (no weights downloaded)")
    p.add_argument("name")
    source_args(p)
    p.add_argument("--check", action="store_true", help="report differences, write nothing; exit 1 if any")
    p.set_defaults(func=cmd_manifest_lock)

    mr = sub.add_parser("mirror", help="serve a seeded store to other hosts, Hugging Face-compatible")
    mrsub = mr.add_subparsers(dest="mirror_command", required=True, metavar="ACTION")
    p = mrsub.add_parser("serve", help="serve the store read-only (HF_ENDPOINT=http://HOST:PORT on clients)")
    p.add_argument("--models-dir", type=Path, default=default_models_dir())
    p.add_argument("--manifest", action="append", default=[],
                   help="serve these manifests' files (repeatable; default: every ready manifest)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--token-file", type=Path, help="require this bearer token from clients")
    p.add_argument("--max-rate", type=_size_arg, default=None,
                   help="cap on total bytes/s sent, e.g. 500MiB (default: no cap)")
    p.set_defaults(func=cmd_mirror_serve)

    rt = sub.add_parser("runtime", help="the diffusers image service")
    rtsub = rt.add_subparsers(dest="runtime_command", required=True, metavar="ACTION")
    p = rtsub.add_parser("serve", help="serve /v1/images/generations from a seeded store")
    p.add_argument("--models-dir", type=Path, default=default_models_dir())
    p.add_argument("--manifest", action="append", default=[],
                   help="runtime manifest to serve (repeatable; default $FLUXSTACK_RUNTIME_MANIFEST, "
                   "else flux-dev-runtime)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--profile", default=os.environ.get("FLUXSTACK_PROFILE", "auto"),
                   help="memory profile: auto, full, fp8, model-offload, sequential-offload, cpu (default auto)")
    p.add_argument("--perf", default=os.environ.get("FLUXSTACK_PERF", "auto"),
                   help="performance mode: auto, exact, bf16, fp8, fast (default $FLUXSTACK_PERF, else auto: the "
                   "fastest mode this GPU runs within its error bound; docs/performance.md)")
    p.add_argument("--compile-cache", type=Path, default=None,
                   help="folder for compiled kernels, kept across restarts (default $FLUXSTACK_COMPILE_CACHE, "
                   "else ~/.cache/fluxstack/torch-compile)")
    p.add_argument("--no-prepared-weights", dest="prepared_weights", action="store_false",
                   default=os.environ.get("FLUXSTACK_PREPARED_WEIGHTS", "1") != "0",
                   help="in the fp8 modes, do not keep the quantized transformer in the compile cache (it takes "
                   "12 GB there for FLUX.1-dev and makes later starts faster; env FLUXSTACK_PREPARED_WEIGHTS=0)")
    p.add_argument("--read-threads", type=_non_negative, default=os.environ.get("FLUXSTACK_READ_THREADS", "4"),
                   help="threads reading the big weight files in the background while the runtime starts (default "
                   "$FLUXSTACK_READ_THREADS, else 4; 0 reads each file when it is needed, one at a time, "
                   "which suits spinning disks)")
    p.add_argument("--queue-size", type=_positive, default=8, help="requests waiting for the GPU (default 8)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a request may wait in the queue")
    p.add_argument("--max-pixels", type=_positive, default=2048 * 2048, help="largest width x height accepted")
    p.add_argument("--gpu-memory-limit", type=_size_arg, default=None, metavar="SIZE",
                   help="cap this process's GPU memory, e.g. 40GiB, to share the card (auto profile respects it)")
    p.set_defaults(func=cmd_runtime_serve)

    p = sub.add_parser("generate", help="ask a running runtime for an image")
    p.add_argument("prompt")
    p.add_argument("--out", type=Path, default=Path("flux.png"), help="PNG to write (default flux.png)")
    p.add_argument("--url", default=os.environ.get("FLUXSTACK_URL", "http://127.0.0.1:8000"),
                   help="the runtime, or a gateway: https://HOST:8443 (default $FLUXSTACK_URL or http://127.0.0.1:8000)")
    p.add_argument("--token-file", type=Path, default=os.environ.get("FLUXSTACK_TOKEN_FILE"),
                   help="file with the gateway's bearer token (else $FLUXSTACK_TOKEN); never on the command line")
    p.add_argument("--model")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("-n", type=_positive, default=1, help="number of images")
    p.add_argument("--lora", action="append", default=[], metavar="NAME[:WEIGHT]")
    p.add_argument("--image", type=Path, help="input image for image-edit models (Kontext)")
    p.add_argument("--timeout", type=float, default=900.0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("doctor", help="report this host's exposure: listening ports, gateway auth, secret files")
    p.add_argument("--gateway-url", help="the gateway to probe (default https://127.0.0.1:GATEWAY_PORT)")
    p.add_argument("--gateway-port", type=int, default=int(os.environ.get("GATEWAY_PORT", "8443")))
    p.add_argument("--runtime-port", type=int, default=int(os.environ.get("RUNTIME_PORT", "8000")))
    p.add_argument("--comfyui-port", type=int, default=int(os.environ.get("COMFYUI_PORT", "8188")))
    p.add_argument("--mirror-port", type=int, default=int(os.environ.get("MIRROR_PORT", "8090")))
    p.add_argument("--token-file", type=Path, help="a gateway token: checks the gateway accepts it, and its mode")
    p.add_argument("--secret-file", type=Path, action="append", default=[],
                   help="a secret file whose mode to check (repeatable; default: $GATEWAY_TOKENS_FILE, "
                   "$GATEWAY_TLS_KEY_FILE, $HF_TOKEN_FILE, /etc/fluxstack/gateway-tokens)")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.set_defaults(func=cmd_doctor)

    from fluxstack.comfy.commands import add_parser as add_comfy_parser

    add_comfy_parser(sub, default_models_dir())

    dev = sub.add_parser("dev", help="developer tools")
    devsub = dev.add_subparsers(dest="dev_command", required=True, metavar="ACTION")
    p = devsub.add_parser("tiny-model", help="write a tiny random FLUX-architecture model and its manifest")
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="tiny-flux")
    p.set_defaults(func=cmd_dev_tiny_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.manifests_dir is not None:
        os.environ["FLUXSTACK_MANIFESTS_DIR"] = str(args.manifests_dir)
    try:
        return int(args.func(args))
    except FluxstackError as exc:
        _say(f"fluxstack: error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        _say("fluxstack: interrupted; partial downloads are kept and the next run resumes them")
        return 130
