"""`fluxstack comfy ready` against a store the real seeder filled from the real mirror.

ComfyUI itself is not needed for the store half of readiness (that path runs in CI); the
ComfyUI half (the server lists each file) runs in test_comfy_stack.py when a source tree is given."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from helpers import REPO, MiB, cli_env, fluxstack, make_models, start_mirror, write_manifest

FILES = [("org/m", "unet.safetensors", "diffusion_models/flux1-dev.safetensors", 3 * MiB + 1),
         ("org/m", "t5.safetensors", "text_encoders/t5xxl_fp16.safetensors", 2 * MiB),
         ("org/m", "clip.safetensors", "text_encoders/clip_l.safetensors", MiB),
         ("org/m", "ae.safetensors", "vae/ae.safetensors", MiB + 7)]


@pytest.fixture
def stack(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A seeded store, manifests named like the shipped ones, and the shipped t2i workflow."""
    models = make_models(tmp_path / "upstream", FILES)
    manifests = tmp_path / "manifests"
    manifest = write_manifest(manifests, "flux-dev", models)
    shutil.copy(REPO / "manifests" / "schema.json", manifests)
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    shutil.copy(REPO / "workflows" / "flux-dev-t2i.api.json", workflows)
    (workflows / "index.yaml").write_text(yaml.safe_dump({"workflows": {"flux-dev-t2i": {"manifest": "flux-dev"}}}))
    env = cli_env(FLUXSTACK_MANIFESTS_DIR=str(manifests), FLUXSTACK_WORKFLOWS_DIR=str(workflows))
    mirror = start_mirror(tmp_path / "upstream", "--manifest", manifest, env=env)
    try:
        fluxstack("seed", "flux-dev", "--models-dir", tmp_path / "store", "--endpoint", mirror.url,
                  "--space-margin", "0", env=env, check=True)
    finally:
        mirror.stop()
    return tmp_path / "store", env


def ready(store: Path, env: dict[str, str], *extra: str) -> tuple[int, str]:
    result = fluxstack("comfy", "ready", "flux-dev-t2i", "--models-dir", store, *extra, env=env)
    return result.returncode, result.stdout + result.stderr


def test_ready_when_every_file_is_seeded_and_verified(stack: tuple[Path, dict[str, str]]) -> None:
    store, env = stack
    code, out = ready(store, env)
    assert code == 0, out
    assert out.count("  ok  flux-dev-t2i: ") == 4 and "ComfyUI ready for flux-dev-t2i" in out
    result = fluxstack("comfy", "ready", "--models-dir", store, "--json",
                       env={**env, "FLUXSTACK_WORKFLOWS": "flux-dev-t2i"})
    assert result.returncode == 0 and all(c["ok"] for c in json.loads(result.stdout))


def test_not_ready_names_the_file_and_the_seed_command(stack: tuple[Path, dict[str, str]]) -> None:
    store, env = stack
    (store / "vae" / "ae.safetensors").unlink()
    with open(store / "text_encoders" / "clip_l.safetensors", "r+b") as fh:
        fh.truncate(1000)
    code, out = ready(store, env)
    assert code == 1
    assert "FAIL  flux-dev-t2i: vae/ae.safetensors: missing from" in out
    assert "FAIL  flux-dev-t2i: text_encoders/clip_l.safetensors: 1000 bytes, the manifest says 1048576" in out
    assert out.count("run `fluxstack seed flux-dev`") == 2
    assert "not ready for flux-dev-t2i: 2 of 4 checks failed" in out


def test_a_file_no_seed_verified_is_not_ready(stack: tuple[Path, dict[str, str]]) -> None:
    store, env = stack
    for marker in (store / ".fluxstack").glob("ready-*.json"):
        marker.unlink()  # e.g. a seed was interrupted: the files may be there, the proof is not
    code, out = ready(store, env)
    assert code == 1 and out.count("present but no seed verified it against manifest flux-dev") == 4


def test_an_unreachable_comfyui_fails_readiness_with_the_reason(stack: tuple[Path, dict[str, str]]) -> None:
    store, env = stack
    code, out = ready(store, env, "--url", "http://127.0.0.1:9")
    assert code == 1
    assert "FAIL  comfyui http://127.0.0.1:9: cannot reach ComfyUI at http://127.0.0.1:9" in out


def test_ready_refuses_unknown_workflows_and_a_missing_store(stack: tuple[Path, dict[str, str]]) -> None:
    store, env = stack
    unknown = fluxstack("comfy", "ready", "sdxl", "--models-dir", store, env=env)
    assert unknown.returncode == 2 and "unknown workflow(s) sdxl; shipped: flux-dev-t2i" in unknown.stderr
    nostore = fluxstack("comfy", "ready", "flux-dev-t2i", "--models-dir", store / "nope", env=env)
    assert nostore.returncode == 2 and "does not exist; pass --models-dir or seed first" in nostore.stderr
    nothing = fluxstack("comfy", "ready", "--models-dir", store, env={k: v for k, v in env.items()
                                                                     if k != "FLUXSTACK_WORKFLOWS"})
    assert nothing.returncode == 2 and "set FLUXSTACK_WORKFLOWS" in nothing.stderr
