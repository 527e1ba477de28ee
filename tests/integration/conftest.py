from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import MiB, Upstream, fluxstack, make_models, start_mirror, write_manifest


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    root = tmp_path_factory.mktemp("upstream")
    models = make_models(root / "store", [
        ("test-org/tiny-flux", "flux1-tiny.safetensors", "diffusion_models/flux1-tiny.safetensors", 1 << 30),
        ("test-org/tiny-flux", "ae.safetensors", "vae/ae-tiny.safetensors", 3 * MiB + 17),
        ("test-org/encoders", "clip/clip_l.safetensors", "text_encoders/clip-tiny.safetensors", 200 * MiB + 5),
        ("test-org/encoders", "tokenizer/vocab.json", "tokenizers/tiny/vocab.json", 4321),
        ("test-org/tiny-flux", "empty.txt", "configs/tiny/empty.txt", 0),
    ])
    manifest = write_manifest(root / "manifests", "tiny-flux", models)
    mirror = start_mirror(root / "store", "--manifest", manifest)
    yield Upstream(root, manifest, models, mirror)
    mirror.stop()


@pytest.fixture
def small_upstream(tmp_path: Path) -> Iterator[Upstream]:
    """A fresh upstream per test (for tests that corrupt or throttle it)."""
    models = make_models(tmp_path / "upstream", [
        ("test-org/small", "model.safetensors", "diffusion_models/small.safetensors", 150 * MiB + 3),
        ("test-org/small", "vae.safetensors", "vae/small-vae.safetensors", 2 * MiB),
    ])
    manifest = write_manifest(tmp_path / "manifests", "small", models)
    mirror = start_mirror(tmp_path / "upstream", "--manifest", manifest)
    yield Upstream(tmp_path, manifest, models, mirror)
    mirror.stop()


@pytest.fixture(scope="session")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny FLUX model through the real path: generated, served by the mirror, seeded into a store.

    Returns (store, manifest); tiny-flux-kontext.yaml (an image-edit variant of the same files) sits
    next to the manifest and is seeded too."""
    pytest.importorskip("diffusers", reason="the runtime extra is not installed (pip install -e .[runtime])")
    work = tmp_path_factory.mktemp("tiny")
    made = fluxstack("dev", "tiny-model", work / "gen", check=True)
    manifest = Path(made.stdout.strip())
    mirror = start_mirror(work / "gen" / "store", "--manifest", manifest)
    try:
        for m in (manifest, manifest.with_name("tiny-flux-kontext.yaml")):
            fluxstack("seed", m, "--models-dir", work / "models", "--endpoint", mirror.url, "--space-margin", "0",
                      check=True)
    finally:
        mirror.stop()
    return work / "models", manifest
