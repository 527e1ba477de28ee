"""The HTTP API (FastAPI): generation, health, readiness, metrics. OpenAPI at /docs."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException

from fluxstack import __version__
from fluxstack.runtime.engine import Engine, Job, NonFinite, OutOfMemory, random_seed
from fluxstack.runtime.variants import problems
from fluxstack.runtime.worker import QueueFull, WaitedTooLong, Worker
from fluxstack.store import Store

MAX_PROMPT_CHARS = 2000
ALLOWED = {
    "prompt": f"1..{MAX_PROMPT_CHARS} characters, not only spaces",
    "width": "16..4096, a multiple of 16", "height": "16..4096, a multiple of 16",
    "steps": "1..100", "guidance": "0..30", "seed": "0..2^63-1", "n": "1..4",
    "max_sequence_length": "1..512", "loras": "at most 4", "weight": "-4..4",
    "response_format": "png or b64_json",
}


@dataclass(frozen=True)
class Settings:
    queue_size: int = 8
    timeout: float = 300.0   # seconds a request may wait in the queue
    max_pixels: int = 2048 * 2048


class LoraRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128, description="file name in loras/ without .safetensors")
    weight: float = Field(1.0, ge=-4, le=4)


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = Field(None, description="variant name (GET /v1/models); default: the first loaded")
    width: int | None = Field(None, ge=16, le=4096, description="multiple of 16; default per model")
    height: int | None = Field(None, ge=16, le=4096, description="multiple of 16; default per model")
    steps: int | None = Field(None, ge=1, le=100, description="default: 50 for dev, 4 for schnell")
    guidance: float | None = Field(None, ge=0, le=30, description="default 3.5")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="same seed, same request: same bytes")
    n: int = Field(1, ge=1, le=4, description="number of images")
    loras: list[LoraRequest] = Field(default_factory=list, max_length=4)
    response_format: Literal["png", "b64_json"] = "b64_json"
    image: str | None = Field(None, description="base64 input image, for image-edit models (Kontext)")
    max_sequence_length: int | None = Field(None, ge=1, le=512, description="T5 tokens; 512 dev, 256 schnell")

    @field_validator("prompt")
    @classmethod
    def prompt_has_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the prompt is empty")
        return value

    @field_validator("width", "height")
    @classmethod
    def multiple_of_16(cls, value: int | None) -> int | None:
        if value is not None and value % 16:
            raise ValueError(f"must be a multiple of 16, got {value}")
        return value


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("fluxstack_requests_total", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("fluxstack_generation_seconds", "Generation request latency (queue + run)",
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256),
                                 registry=self.registry)
        self.queue_depth = Gauge("fluxstack_queue_depth", "Requests waiting for the GPU worker",
                                 registry=self.registry)
        self.images = Counter("fluxstack_images_generated", "Images generated", registry=self.registry)
        self.gpu_memory = Gauge("fluxstack_gpu_memory_allocated_bytes", "GPU memory allocated by torch",
                                registry=self.registry)
        self.gpu_peak = Gauge("fluxstack_gpu_memory_peak_bytes", "Peak GPU memory allocated by torch",
                              registry=self.registry)


def _error(status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": message}
    if field:
        body["errors"] = [{"field": field, "message": message}]
    return JSONResponse(body, status_code=status, headers=headers)


def _decode_image(data: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        raw = base64.b64decode(data, validate=True)
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError):
        return None
    return image.convert("RGB")


def _fit(size: tuple[int, int], area: int) -> tuple[int, int]:
    """The input image's aspect ratio at about `area` pixels, both sides multiples of 16."""
    w, h = size
    scale = (area / (w * h)) ** 0.5
    return max(16, round(w * scale / 16) * 16), max(16, round(h * scale / 16) * 16)


def create_app(engine: Engine, worker: Worker, store: Store, settings: Settings, metrics: Metrics) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        worker.start()
        yield

    app = FastAPI(title="fluxstack runtime", version=__version__, lifespan=lifespan,
                  description="FLUX.1 image generation on a verified model store (diffusers).")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for err in exc.errors():
            loc = [str(p) for p in err["loc"] if p != "body"]
            field = ".".join(loc) or "body"
            allowed = ALLOWED.get(loc[-1] if loc else "", "")
            message = f"{field}: {err['msg']}" + (f" (allowed: {allowed})" if allowed else "")
            errors.append({"field": field, "message": message})
        metrics.requests.labels(request.url.path, "422").inc()
        return JSONResponse({"error": "; ".join(e["message"] for e in errors), "errors": errors}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        # The framework's own refusals (an unparseable body, an unknown route) in the API's error shape,
        # so every 4xx has an `error` a user can read (found by fuzzing through the gateway).
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.get("/healthz", summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Models loaded and their files verified in the store")
    async def readyz() -> JSONResponse:
        missing = [p for v in engine.variants.values() for p in problems(store, v.manifest)]
        ready = engine.ready.is_set() and not missing
        body = {"ready": ready, "loading": not engine.ready.is_set() and engine.load_error is None,
                "error": engine.load_error, "missing": missing, "profile": engine.profile, "device": engine.device,
                "perf": engine.perf, "perf_why": engine.perf_why, "startup": engine.startup(),
                "variants": [{"name": v.name, "task": v.task, "manifest": v.manifest.name}
                             for v in engine.variants.values()]}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        if engine.device == "cuda":
            import torch

            metrics.gpu_memory.set(torch.cuda.memory_allocated())
            metrics.gpu_peak.set(torch.cuda.max_memory_allocated())
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", summary="Loaded model variants and available LoRAs")
    async def models() -> dict[str, Any]:
        return {"data": [{"id": v.name, "task": v.task, "manifest": v.manifest.name, "defaults": v.defaults}
                         for v in engine.variants.values()],
                "loras": sorted(engine.available_loras())}

    @app.post("/v1/images/generations", summary="Generate images",
              responses={200: {"content": {"image/png": {}, "application/json": {}}},
                         422: {"description": "invalid input; the message names the field"},
                         429: {"description": "queue full; see Retry-After"},
                         500: {"description": "the model produced NaN/inf pixels"},
                         503: {"description": "not ready, waited too long, or out of GPU memory"}})
    async def generate(req: GenerationRequest) -> Response:
        route = "/v1/images/generations"
        started = time.monotonic()
        response = await _generate(req)
        metrics.requests.labels(route, str(response.status_code)).inc()
        if response.status_code == 200:
            metrics.latency.observe(time.monotonic() - started)
        return response

    async def _generate(req: GenerationRequest) -> Response:
        if not engine.ready.is_set():
            reason = engine.load_error or "models are still loading"
            return _error(503, f"not ready: {reason}; see /readyz", headers={"Retry-After": "10"})
        name = req.model or next(iter(engine.variants))
        variant = engine.variants.get(name)
        if variant is None:
            return _error(422, f"model: unknown model {name!r} (allowed: {', '.join(engine.variants)})", "model")
        d = variant.defaults
        width, height = req.width or d["width"], req.height or d["height"]
        image = None
        if variant.task == "image-edit":
            if req.image is None:
                return _error(422, f"image: {name} edits an image; send it base64-encoded in 'image'", "image")
            image = _decode_image(req.image)
            if image is None:
                return _error(422, "image: not a decodable image (base64 PNG, JPEG or WebP)", "image")
            if req.width is None and req.height is None:
                width, height = _fit(image.size, d["width"] * d["height"])
        elif req.image is not None:
            return _error(422, f"image: {name} is a text-to-image model and takes no input image", "image")
        if width * height > settings.max_pixels:
            return _error(422, f"width x height: {width}x{height} is {width * height} pixels, more than the "
                               f"{settings.max_pixels} this service allows", "width")
        known = engine.available_loras()
        for lora in req.loras:
            if lora.name not in known:
                return _error(422, f"loras: unknown LoRA {lora.name!r} (allowed: {', '.join(known) or 'none'}; "
                                   "put .safetensors files in the store's loras/ folder)", "loras")
        if req.loras and engine.perf not in ("", "exact"):
            return _error(422, f"loras: LoRAs need the exact performance mode; this runtime runs {engine.perf!r}, "
                               "which fuses and compiles the transformer (restart with --perf exact)", "loras")
        if req.response_format == "png" and req.n > 1:
            return _error(422, "response_format: png returns one image; use b64_json for n > 1", "response_format")
        seed = req.seed if req.seed is not None else random_seed()
        job = Job(variant=name, prompt=req.prompt, width=width, height=height, steps=req.steps or d["steps"],
                  guidance=req.guidance if req.guidance is not None else d["guidance"], seed=seed, n=req.n,
                  max_sequence_length=req.max_sequence_length or d["max_sequence_length"],
                  loras=[(lora.name, lora.weight) for lora in req.loras], image=image)
        try:
            future = worker.submit(job)
        except QueueFull as exc:
            return _error(429, str(exc), headers={"Retry-After": str(exc.retry_after)})
        try:
            images = await asyncio.wrap_future(future)
        except (WaitedTooLong, OutOfMemory) as exc:
            return _error(503, str(exc), headers={"Retry-After": "30"})
        except NonFinite as exc:
            return _error(500, str(exc))
        if req.response_format == "png":
            return Response(images[0], media_type="image/png", headers={"X-Seed": str(seed)})
        return JSONResponse({"model": name, "seed": seed,
                             "data": [{"b64_json": base64.b64encode(png).decode()} for png in images]})

    return app
