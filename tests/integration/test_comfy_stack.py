"""ComfyUI in the compose stack, end to end on CPU: random-weight models ComfyUI really loads
(hidden 3072, 1 double + 1 single block; full-size T5-XXL in fp8 and CLIP-L, generated here) ->
the mirror service -> the seeder service -> the comfyui service; `fluxstack comfy ready` and
`fluxstack comfy run` against it, for every shipped workflow.

Needs COMFYUI_SRC (a tree of the pinned commit: GitHub is unreachable here, CI has none) and
about 14 GB of disk and 12 GB of RAM; skips without the source tree, saying so."""

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fluxstack.comfy.client import ComfyClient
from fluxstack.comfy.workflows import load_index
from helpers import (
    COMFYUI_TAG,
    DOCKER,
    REPO,
    cli_env,
    fluxstack,
    free_port,
    make_comfyui_image,
    needs_comfyui_src,
)

pytestmark = needs_comfyui_src
PROJECT = ["-p", "fluxstack-comfytest", "--profile", "mirror"]


def compose(*args: str, env: dict[str, str], check: bool = True, timeout: float = 1200) -> \
        subprocess.CompletedProcess[str]:
    result = subprocess.run([DOCKER, "compose", *PROJECT, *args], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"docker compose {args} exited {result.returncode}:\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result




@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    if shutil.which(DOCKER) is None:
        pytest.skip("no Docker engine")
    build = make_comfyui_image()
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    sample = tmp_path_factory.mktemp("comfy-sample")
    manifests = Path(fluxstack("comfy", "sample-store", sample, check=True, timeout=900).stdout.strip())
    for name in ("flux-dev", "flux-realism-lora", "flux-redux-dev", "flux-kontext-dev-fp8"):
        fluxstack("--manifests-dir", manifests, "seed", name, "--models-dir", sample / "store", "--endpoint",
                  "http://127.0.0.1:9", check=True, timeout=900)  # files are in place: hashed, marked ready
    port = free_port()
    env = {"FLUXSTACK_MANIFEST": "flux-dev", "FLUXSTACK_MANIFESTS_HOST_DIR": str(manifests),
           "MIRROR_STORE_DIR": str(sample / "store"), "HF_ENDPOINT": "http://mirror:8090", "SPACE_MARGIN": "0",
           "COMFYUI_PORT": str(port), "MIRROR_PORT": str(free_port()), "FLUXSTACK_COMFYUI_IMAGE": COMFYUI_TAG,
           # Models are dropped after each prompt: two full-size T5 copies would not fit in CI-class RAM.
           "COMFYUI_ARGS": "--cache-none"}
    compose("build", "seeder", env=env)
    try:
        compose("up", "-d", "--wait", "comfyui", env=env)
        yield f"http://127.0.0.1:{port}", env
    finally:
        compose("down", "-v", env=env, check=False)


def ready(env: dict[str, str], *workflows: str) -> subprocess.CompletedProcess[str]:
    return compose("run", "--rm", "--no-deps", "-T", "seeder", "comfy", "ready", *workflows, "--url",
                   "http://comfyui:8188", env=env, check=False)


def run(url: str, workflow: str, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return fluxstack("comfy", "run", workflow, "--url", url, "--out", out, "--steps", "1", *extra, timeout=1200,
                     env=cli_env(FLUXSTACK_MANIFESTS_DIR=str(REPO / "manifests")))


def png_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def test_seeded_stack_is_healthy_and_ready_for_text_to_image(stack: tuple[str, dict[str, str]]) -> None:
    _, env = stack
    seeder = compose("ps", "-a", "--format", "json", "seeder", env=env).stdout
    assert '"ExitCode":0' in seeder.replace(" ", "")
    logs = compose("logs", "seeder", env=env).stdout
    assert "flux-dev: ready" in logs and "using mirror http://mirror:8090" in logs
    result = ready(env, "flux-dev-t2i")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok  comfyui http://comfyui:8188: answers, version 0.8.0" in result.stdout
    assert result.stdout.count("verified (") == 4


def test_a_workflow_whose_models_are_not_seeded_says_which_seed_to_run(stack: tuple[str, dict[str, str]],
                                                                       tmp_path: Path) -> None:
    url, env = stack
    result = ready(env, "flux-kontext-dev-fp8-edit")
    assert result.returncode == 1
    assert "diffusion_models/flux1-dev-kontext_fp8_scaled.safetensors: missing from /models: run " \
           "`fluxstack seed flux-kontext-dev-fp8`" in result.stdout
    picture = tmp_path / "in.png"
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 30, 30)).save(picture)
    refused = run(url, "flux-kontext-dev-fp8-edit", tmp_path / "out", "--image", str(picture))
    assert refused.returncode == 2
    assert "flux1-dev-kontext_fp8_scaled.safetensors is not in the store (diffusion_models/, asked for by node 1 " \
           "(Load Diffusion Model)): run `fluxstack seed flux-kontext-dev-fp8`" in refused.stderr
    no_image = run(url, "flux-dev-redux", tmp_path / "out")
    assert no_image.returncode == 2
    assert "input image 'fluxstack-reference.png' is not in ComfyUI's input folder" in no_image.stderr


def test_text_to_image_runs_on_cpu_and_downloads_the_image(stack: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    url, _ = stack
    result = run(url, "flux-dev-t2i", tmp_path, "--width", "256", "--height", "256", "--prompt", "a red fox",
                 "--seed", "7")
    assert result.returncode == 0, result.stderr[-3000:]
    images = [Path(line) for line in result.stdout.split()]
    assert len(images) == 1 and images[0].parent == tmp_path and png_size(images[0]) == (256, 256)
    assert not list(tmp_path.glob(".*.part"))


@pytest.fixture(scope="module")
def all_seeded(stack: tuple[str, dict[str, str]]) -> tuple[str, dict[str, str]]:
    url, env = stack
    for name in ("flux-realism-lora", "flux-redux-dev", "flux-kontext-dev-fp8"):
        compose("run", "--rm", "-T", "seeder", "seed", name, "--models-dir", "/models", "--space-margin", "0",
                env=env)
    return url, env


def test_every_workflow_is_ready_once_its_manifest_is_seeded(all_seeded: tuple[str, dict[str, str]]) -> None:
    _, env = all_seeded
    result = ready(env, *load_index(REPO / "workflows"))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("workflow", ["flux-dev-lora", "flux-dev-redux"])
def test_lora_and_redux_workflows_run_to_an_image(all_seeded: tuple[str, dict[str, str]], workflow: str,
                                                  tmp_path: Path) -> None:
    url, _ = all_seeded
    from PIL import Image

    picture = tmp_path / "reference.png"
    Image.new("RGB", (96, 96), (20, 120, 200)).save(picture)
    extra = ["--image", str(picture)] if workflow == "flux-dev-redux" else []
    result = run(url, workflow, tmp_path / "out", "--width", "256", "--height", "256", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    assert png_size(Path(result.stdout.split()[0])) == (256, 256)


def test_kontext_edit_is_accepted_and_a_timed_out_run_is_cancelled(all_seeded: tuple[str, dict[str, str]],
                                                                    tmp_path: Path) -> None:
    """Accepted = /api/prompt validated the whole graph against the seeded store. Kontext rescales
    its input to ~1 megapixel (minutes on CPU), so a short --timeout ends the run: `comfy run`
    must then cancel its prompt in ComfyUI rather than leave it running."""
    url, _ = all_seeded
    from PIL import Image

    picture = tmp_path / "edit.png"
    Image.new("RGB", (64, 64), (10, 200, 10)).save(picture)
    result = run(url, "flux-kontext-dev-fp8-edit", tmp_path / "out", "--image", str(picture), "--timeout", "5")
    assert result.returncode == 1
    assert "did not finish within 5 s" in result.stderr and "cancelled prompt" in result.stderr
    prompt_id = result.stderr.split("as prompt ")[1].split()[0]
    client = ComfyClient(url)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        queue = client.get_json("/api/queue")
        if not any(item[1] == prompt_id for item in queue["queue_running"] + queue["queue_pending"]):
            break
        time.sleep(1)
    else:
        raise AssertionError("the cancelled prompt is still queued or running in ComfyUI")
    status = client.get_json(f"/api/history/{prompt_id}").get(prompt_id, {}).get("status", {})
    assert status.get("status_str") != "success"  # interrupted, not finished


@pytest.mark.parametrize("name", ["flux-dev-t2i", "flux-dev-lora", "flux-dev-redux", "flux-kontext-dev-fp8-edit"])
def test_shipped_ui_files_match_the_pinned_comfyui(stack: tuple[str, dict[str, str]], name: str,
                                                   tmp_path: Path) -> None:
    url, _ = stack
    out = tmp_path / f"{name}.ui.json"
    result = fluxstack("comfy", "ui", name, "--url", url, "--out", out)
    assert result.returncode == 0, result.stderr
    shipped = json.loads((REPO / "workflows" / f"{name}.ui.json").read_text())
    assert json.loads(out.read_text()) == shipped, f"regenerate with `fluxstack comfy ui {name}`"
