from pathlib import Path

import pytest

from fluxstack.errors import UsageError
from fluxstack.manifest import load_manifest
from fluxstack.store import Store

torch = pytest.importorskip("torch", reason="the runtime extra is not installed")


def test_kontext_output_keeps_the_input_aspect_in_multiples_of_16() -> None:
    from fluxstack.runtime.app import _fit

    assert _fit((96, 64), 64 * 64) == (80, 48)
    assert _fit((1000, 1000), 1024 * 1024) == (1024, 1024)
    w, h = _fit((4000, 3000), 1024 * 1024)
    assert w % 16 == h % 16 == 0 and abs(w / h - 4 / 3) < 0.05


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answers")
def test_without_a_gpu_auto_means_cpu_and_gpu_profiles_are_refused() -> None:
    from fluxstack.runtime.engine import choose_profile

    assert choose_profile("auto") == ("cpu", "cpu")
    with pytest.raises(UsageError, match="needs a CUDA GPU"):
        choose_profile("fp8")
    with pytest.raises(UsageError, match="unknown memory profile"):
        choose_profile("turbo")


def test_store_problems_name_the_marker_the_files_and_the_lock(tmp_path: Path) -> None:
    from fluxstack.runtime.variants import load_variant, problems

    manifest = load_manifest("flux-dev-runtime")
    found = problems(Store(tmp_path), manifest)
    assert any("fluxstack manifest lock flux-dev-runtime" in p for p in found)
    assert any("fluxstack seed flux-dev-runtime" in p for p in found)
    assert "missing diffusion_models/flux1-dev.safetensors" in found
    with pytest.raises(UsageError, match="not ready for flux-dev-runtime"):
        load_variant(Store(tmp_path), "flux-dev-runtime")
    with pytest.raises(UsageError, match="no runtime section"):
        load_variant(Store(tmp_path), "flux-dev")


def test_runtime_manifests_point_at_files_they_seed() -> None:
    for name in ("flux-dev-runtime", "flux-schnell-runtime", "flux-kontext-dev-runtime"):
        m = load_manifest(name)
        dests = {f.dest for f in m.files}
        assert m.runtime is not None and m.runtime["transformer"] in dests and m.runtime["t5"] in dests
    assert load_manifest("flux-schnell-runtime").runtime["defaults"]["steps"] == 4
    assert load_manifest("flux-kontext-dev-runtime").runtime["task"] == "image-edit"
