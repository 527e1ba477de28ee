"""Performance modes (runtime/perf.py): choosing a mode, and what each mode changes, on the CPU with
the tiny FLUX-architecture model. Speed is measured in bench/gpu/perf_bench.py, never here."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fluxstack.errors import UsageError

torch = pytest.importorskip("torch", reason="the runtime extra is not installed")
pytest.importorskip("diffusers", reason="the runtime extra is not installed")

from fluxstack.runtime import fp8, perf  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fluxstack.runtime.tiny import generate

    out = tmp_path_factory.mktemp("tiny")
    generate(out)
    return out / "store"


def tiny_variant(store: Path, task: str = "text-to-image") -> object:
    from fluxstack.manifest import Manifest
    from fluxstack.runtime.variants import BASE_DEFAULTS, Variant

    paths = {"transformer": store / "diffusion_models/flux1-tiny.safetensors", "vae": store / "vae/ae-tiny.safetensors",
             "clip": store / "text_encoders/clip_l-tiny.safetensors",
             "t5": store / "text_encoders/t5xxl-tiny.safetensors", "config": store / "configs/tiny-flux",
             "tokenizers": store / "tokenizers/tiny-flux"}
    manifest = Manifest(name="tiny", description="", path=Path("tiny"), include=[], own_files=[], files=[])
    defaults = {**BASE_DEFAULTS, "steps": 4, "width": 64, "height": 64, "max_sequence_length": 64}
    return Variant("tiny-flux", task, manifest, paths, defaults, {})


def transformer_inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens, text = 16, 8
    ids = torch.zeros(tokens, 3)
    ids[:, 1] = torch.arange(tokens) // 4
    ids[:, 2] = torch.arange(tokens) % 4
    return {"hidden_states": torch.randn(1, tokens, 64, generator=g),
            "encoder_hidden_states": torch.randn(1, text, 32, generator=g),
            "pooled_projections": torch.randn(1, 32, generator=g), "timestep": torch.tensor([0.5]),
            "guidance": torch.tensor([3.5]), "img_ids": ids, "txt_ids": torch.zeros(text, 3), "return_dict": False}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_mode_names_and_unknown_mode() -> None:
    assert perf.PERF_MODES == ("auto", "exact", "bf16", "fp8", "fast")
    with pytest.raises(UsageError, match=r"unknown performance mode 'turbo'.*exact, bf16, fp8, fast"):
        perf.choose_perf("turbo", "full", "cuda")


def test_cpu_runs_exact_and_refuses_gpu_modes_by_name() -> None:
    assert perf.choose_perf("auto", "cpu", "cpu")[0] == "exact"
    assert perf.choose_perf("exact", "cpu", "cpu") == ("exact", "requested")
    for mode in ("bf16", "fp8", "fast"):
        with pytest.raises(UsageError, match=f"'{mode}' cannot run here: it needs a CUDA GPU"):
            perf.choose_perf(mode, "cpu", "cpu")


def test_offload_profiles_keep_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(perf, "fp8_unsupported_reason", lambda: None)
    mode, why = perf.choose_perf("auto", "model-offload", "cuda")
    assert mode == "exact" and "model-offload profile moves weights" in why
    with pytest.raises(UsageError, match="use --profile full or fp8"):
        perf.choose_perf("fp8", "sequential-offload", "cuda")


def test_auto_takes_the_fastest_mode_the_gpu_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(perf, "fp8_unsupported_reason", lambda: None)
    monkeypatch.setattr(perf, "compiler_missing_reason", lambda: None)
    assert perf.choose_perf("auto", "full", "cuda")[0] == perf.AUTO_ORDER[0]
    # the fp8 memory profile (24 GB cards) never holds bf16 transformer weights on the GPU
    assert perf.choose_perf("auto", "fp8", "cuda")[0] in ("fp8", "fast")
    with pytest.raises(UsageError, match="fp8 memory profile avoids"):
        perf.choose_perf("bf16", "fp8", "cuda")
    # an older GPU: auto falls back to bf16 and says why; fp8 by name is refused with the reason
    monkeypatch.setattr(perf, "fp8_unsupported_reason", lambda: "A100 has compute capability 8.0")
    mode, why = perf.choose_perf("auto", "full", "cuda")
    assert mode == "bf16" and "compute capability 8.0" in why
    with pytest.raises(UsageError, match=r"compute capability 8\.0"):
        perf.choose_perf("fast", "full", "cuda")
    assert perf.choose_perf("auto", "fp8", "cuda")[0] == "exact"


@pytest.fixture
def gpu_host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A host whose GPU runs fp8 (this machine has none), with an empty PATH and Python's headers in a
    folder of the test's own: each test adds what the host has."""
    monkeypatch.setattr(perf, "fp8_unsupported_reason", lambda: None)
    monkeypatch.delenv("CC", raising=False)
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    include = tmp_path / "include"
    include.mkdir()
    real = perf.sysconfig.get_paths
    monkeypatch.setattr(perf.sysconfig, "get_paths", lambda *a, **k: {**real(*a, **k), "include": str(include)})
    return tmp_path


def test_compiled_modes_need_a_c_compiler_and_python_headers(gpu_host: Path) -> None:
    (gpu_host / "include/Python.h").write_text("")
    # No compiler: auto runs exact and says why; a compiled mode by name is refused with what to install.
    mode, why = perf.choose_perf("auto", "full", "cuda")
    assert mode == "exact" and "C compiler" in why
    with pytest.raises(UsageError, match=r"'fp8' cannot run here: .*install gcc.*--perf exact"):
        perf.choose_perf("fp8", "full", "cuda")
    gcc = gpu_host / "bin/gcc"
    gcc.write_text("#!/bin/sh\n")
    gcc.chmod(0o755)
    assert perf.choose_perf("auto", "full", "cuda")[0] == "fp8"
    # A compiler without Python's headers is not enough either.
    (gpu_host / "include/Python.h").unlink()
    with pytest.raises(UsageError, match=r"Python\.h is missing: install them \(Debian/Ubuntu: python3-dev\)"):
        perf.choose_perf("bf16", "full", "cuda")


def test_step_cache_schedule() -> None:
    assert perf.computed_steps(4) == [True] * 4  # schnell: every step runs
    plan = perf.computed_steps(28)
    assert sum(plan) == 18 and all(plan[:4]) and all(plan[-4:])
    assert not any(plan[i] and plan[i + 1] for i in range(4, 23))  # never two skips... nor two runs in the middle
    assert all(plan[i] or plan[i - 1] for i in range(1, 28))  # a skipped step always follows a computed one


def test_step_cache_reuses_the_previous_output_on_skipped_steps() -> None:
    class Counter(torch.nn.Module):
        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return x * self.calls

    model = Counter()
    cache = perf.StepCache(model)
    cache.start(28)
    outs = [model(torch.ones(1)) for _ in range(28)]
    assert model.calls == 18 and cache.skipped == 10
    assert outs[4] is outs[3]  # step 4 is skipped: step 3's output again
    cache.start(4)
    [model(torch.ones(1)) for _ in range(4)]
    assert model.calls == 22  # a new request starts a new schedule


def test_a_quantized_model_survives_torch_save_and_load(tmp_path: Path) -> None:
    # pickle, like torch.compile's caches, finds the layer class by its import path: a class made
    # inside a function cannot be saved at all
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
    assert fp8.quantize_linears(model) == 2
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    x = torch.randn(3, 32)
    assert isinstance(loaded[0], fp8.Fp8Linear) and loaded[2].weight.dtype == torch.float8_e4m3fn
    assert torch.equal(loaded(x), model(x))


def test_fused_qkv_gives_the_same_output_and_drops_the_unfused_copies(tiny: Path) -> None:
    from diffusers import FluxTransformer2DModel

    t = FluxTransformer2DModel.from_single_file(str(tiny / "diffusion_models/flux1-tiny.safetensors"),
                                                config=str(tiny / "configs/tiny-flux"), subfolder="transformer",
                                                torch_dtype=torch.float32, local_files_only=True)
    x = transformer_inputs()
    with torch.no_grad():
        ref = t(**x)[0]
        params = sum(p.numel() for p in t.parameters())
        perf.fuse_qkv(t)
        fused = t(**x)[0]
    assert t.transformer_blocks[0].attn.to_q is None and t.transformer_blocks[0].attn.to_qkv is not None
    assert sum(p.numel() for p in t.parameters()) == params  # the same weights, once
    assert rel(fused, ref) < 1e-5


def test_fp8_blocks_stay_close_to_the_bf16_output(tiny: Path) -> None:
    from diffusers import FluxTransformer2DModel

    t = FluxTransformer2DModel.from_single_file(str(tiny / "diffusion_models/flux1-tiny.safetensors"),
                                                config=str(tiny / "configs/tiny-flux"), subfolder="transformer",
                                                torch_dtype=torch.float32, local_files_only=True)
    x = transformer_inputs(1)
    with torch.no_grad():
        ref = t(**x)[0]
        perf.fuse_qkv(t)
        n = fp8.quantize_linears(t.transformer_blocks) + fp8.quantize_linears(t.single_transformer_blocks)
        out = t(**x)[0]
    assert n > 0 and t.transformer_blocks[0].attn.to_qkv.weight.dtype == torch.float8_e4m3fn
    # weight-only e4m3 (the CPU path): about 2% RMS per weight, far from a different function
    assert 0 < rel(out, ref) < 0.1


def test_exact_mode_output_is_the_plain_pipeline_output(tiny: Path) -> None:
    from fluxstack.runtime.engine import Engine, Job, build_pipeline

    v = tiny_variant(tiny)
    job = Job(variant="tiny-flux", prompt="a cat", width=64, height=64, steps=4, guidance=3.5, seed=3, n=1,
              max_sequence_length=64)
    engine = Engine([v], tiny / "loras", "cpu", perf="exact")
    engine.load()
    assert (engine.perf, engine.profile) == ("exact", "cpu")
    png = engine.generate(job)[0]
    pipe = build_pipeline(v, "cpu", "cpu")  # the path before performance modes existed
    with torch.inference_mode():
        plain = pipe(prompt="a cat", width=64, height=64, num_inference_steps=4, guidance_scale=3.5,
                     max_sequence_length=64, generator=torch.Generator("cpu").manual_seed(3), output_type="np").images
    import io

    import numpy as np
    from PIL import Image

    served = np.asarray(Image.open(io.BytesIO(png)))
    assert np.array_equal(served, pipe.numpy_to_pil(plain)[0])


@pytest.mark.parametrize(("task", "tokens"), [("text-to-image", 16), ("image-edit", 32)])
def test_the_warm_up_runs_the_shape_a_default_request_runs(tiny: Path, task: str, tokens: int) -> None:
    """The compiled modes warm up before /readyz turns ready; an image-edit (Kontext) model's transformer
    also sees the input image's tokens, so its warm-up needs an input image to compile that shape."""
    from fluxstack.runtime.engine import Engine

    v = tiny_variant(tiny, task)
    engine = Engine([v], tiny / "loras", "cpu", perf="exact")
    engine.load()
    seen: list[int] = []
    engine.pipes["tiny-flux"].transformer.register_forward_hook(lambda _m, _args, kw, _o: seen.append(
        kw["hidden_states"].shape[1]), with_kwargs=True)
    engine._warm_up(v)
    assert seen == [tokens]  # one step; 64x64 is 16 latent tokens, and 16 more of the input image


def test_loras_need_the_exact_mode(tiny: Path) -> None:
    from fluxstack.runtime.engine import Engine, Job

    engine = Engine([tiny_variant(tiny)], tiny / "loras", "cpu")
    engine.perf = "fp8"  # as on a GPU; the check comes before anything runs
    engine.pipes["tiny-flux"] = object()
    job = Job(variant="tiny-flux", prompt="a cat", width=64, height=64, steps=4, guidance=3.5, seed=3, n=1,
              max_sequence_length=64, loras=[("tiny-style", 1.0)])
    with pytest.raises(UsageError, match="LoRAs need --perf exact"):
        engine.generate(job)


@pytest.mark.parametrize(("mode", "words"), [("turbo", "unknown performance mode 'turbo'"),
                                             ("fp8", "'fp8' cannot run here: it needs a CUDA GPU")])
def test_cli_refuses_a_mode_it_cannot_run_with_exit_2(tmp_path: Path, mode: str, words: str) -> None:
    from helpers import fluxstack

    if mode != "turbo" and torch.cuda.is_available():
        pytest.skip("checks the no-GPU answer")
    (tmp_path / ".fluxstack").mkdir()
    result = fluxstack("runtime", "serve", "--models-dir", tmp_path, "--manifest", "tiny-flux", "--perf", mode)
    assert result.returncode == 2
    assert words in result.stderr


def quantized_tiny(tiny: Path) -> object:
    from diffusers import FluxTransformer2DModel

    t = FluxTransformer2DModel.from_single_file(str(tiny / "diffusion_models/flux1-tiny.safetensors"),
                                                config=str(tiny / "configs/tiny-flux"), subfolder="transformer",
                                                torch_dtype=torch.float32, local_files_only=True)
    for block in [*t.transformer_blocks, *t.single_transformer_blocks]:
        perf.fuse_qkv(block)
        fp8.quantize_linears(block)
    return t


def test_prepared_weights_load_to_the_same_transformer(tiny: Path, tmp_path: Path) -> None:
    from fluxstack.runtime import prepared

    t = quantized_tiny(tiny)
    path = prepared.prepared_path(tmp_path, "ab" * 32)
    stale = tmp_path / f"{'ab' * 8}-0000000000000000.safetensors"  # the same file, older software
    stale.write_bytes(b"old")
    dead = path.with_name(path.name + ".0badc0de.part")  # a writer killed two hours ago
    dead.write_bytes(b"half")
    os.utime(dead, (time.time() - 7200, time.time() - 7200))
    alive = path.with_name(path.name + ".0000beef.part")  # another runtime writing right now
    alive.write_bytes(b"in progress")
    size = prepared.save(t, path)
    assert path.stat().st_size == size and not stale.exists()
    assert sorted(tmp_path.glob("*.part")) == [alive]
    from safetensors.torch import load_file

    from fluxstack.runtime import weights_read

    # what the runtime's background reader reads is what safetensors reads
    loaded = prepared.load(tiny / "configs/tiny-flux", weights_read.read(path, "cpu", threads=3, chunk=4096))
    assert all(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
               for a, b in zip(loaded.state_dict().values(), load_file(str(path)).values(), strict=True))
    assert isinstance(loaded.transformer_blocks[0].attn.to_qkv, fp8.Fp8Linear)
    assert loaded.single_transformer_blocks[0].proj_mlp.weight.dtype == torch.float8_e4m3fn
    x = transformer_inputs(2)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), t.state_dict().values(), strict=True))
    with torch.no_grad():
        assert rel(loaded(**x)[0], t(**x)[0]) < 1e-6  # the same weights; float32 summation order aside
    # another transformer file, or another format/torch/diffusers, is another file
    assert prepared.prepared_path(tmp_path, "cd" * 32) != path


def test_a_damaged_prepared_file_is_removed_and_the_store_file_used(tiny: Path, tmp_path: Path) -> None:
    from fluxstack.runtime import engine, prepared, weights_read

    path = prepared.prepared_path(tmp_path, "ab" * 32)
    prepared.save(quantized_tiny(tiny), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a disk that lost the second half
    transformer, note = engine._load_prepared(path, tiny / "configs/tiny-flux", "cpu")
    assert transformer is None and "unusable, removed" in note and not path.exists()
    assert engine._load_prepared(path, tiny / "configs/tiny-flux", "cpu") == (None, f"none yet at {path}")
    # the same when the background reader found the damage
    prepared.save(quantized_tiny(tiny), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    transformer, note = engine._load_prepared(path, tiny / "configs/tiny-flux", "cpu",
                                              weights_read.Prefetch([(path, "cpu", None)]))
    assert transformer is None and "unusable, removed (DamagedFile: " in note and not path.exists()
    assert engine._load_prepared(None, tiny, "cpu") == (None, "off")


def test_a_gpu_too_full_for_the_prepared_file_says_so_and_keeps_it(tiny: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake out-of-memory error (CI has no GPU to fill), raised where reading the file onto the GPU
    would raise it (the background reader, which hands it over): the file is not damaged, so it stays."""
    from fluxstack.runtime import engine, prepared, weights_read

    path = prepared.prepared_path(tmp_path, "ab" * 32)
    prepared.save(quantized_tiny(tiny), path)

    def full_gpu(*_args: object, **_kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 72.00 MiB")

    monkeypatch.setattr(weights_read, "read", full_gpu)
    with pytest.raises(UsageError, match="too little free memory for the prepared transformer") as caught:
        engine._load_prepared(path, tiny / "configs/tiny-flux", "cuda", weights_read.Prefetch([(path, "cuda", None)]))
    assert "the file is kept): free GPU memory" in str(caught.value) and "CUDA out of memory" in str(caught.value)
    assert path.exists()


def test_a_prepared_file_that_cannot_be_written_costs_only_the_speed_up(tiny: Path, tmp_path: Path) -> None:
    from fluxstack.runtime import engine

    blocked = tmp_path / "cache-is-a-file"
    blocked.write_text("not a folder")  # stands for a full or read-only cache volume: writing raises OSError
    note = engine._save_prepared(quantized_tiny(tiny), blocked / "prepared" / "x.safetensors", "none yet")
    assert note.startswith("none yet; not written (") and "the next start converts the store's file again" in note
    assert blocked.read_text() == "not a folder"


@pytest.mark.parametrize("prompt", ["a cat", "un chat ✓ 猫"])
def test_parallel_png_decodes_to_the_same_pixels_with_the_metadata(prompt: str) -> None:
    import io

    import numpy as np
    from PIL import Image

    from fluxstack.runtime import png

    rng = np.random.default_rng(0)
    smooth = np.linspace(0, 255, 300 * 517 * 3).reshape(300, 517, 3).astype(np.uint8)  # strips of uneven length
    for pixels in (rng.integers(0, 256, (300, 517, 3), dtype=np.uint8), smooth):
        data = png.encode(pixels, {"fluxstack": '{"seed": 1}', "Description": prompt})
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            assert image.mode == "RGB" and np.array_equal(np.asarray(image), pixels)
            assert image.info["Description"] == prompt and image.info["fluxstack"] == '{"seed": 1}'
    assert len(png.encode(smooth, {})) < smooth.nbytes / 10  # the Up filter + deflate really compress
    with pytest.raises(ValueError, match="height x width x 3 uint8"):
        png.encode(np.zeros((4, 4, 4), dtype=np.uint8), {})


def test_t5_read_ahead_is_the_model_transformers_loads_and_a_file_lacking_weights_is_refused(
        tiny: Path, tmp_path: Path) -> None:
    """The runtime builds T5 empty and hands it the tensors read ahead (in the compute dtype); the model is
    transformers' own, and a file without one of its weights is refused by name, not left uninitialised."""
    from safetensors.torch import load_file, save_file
    from transformers import T5EncoderModel

    from fluxstack.runtime import engine, weights_read

    config_dir, weights = tiny / "configs/tiny-flux/text_encoder_2", tiny / "text_encoders/t5xxl-tiny.safetensors"
    config = T5EncoderModel.config_class.from_pretrained(str(config_dir))
    reference = T5EncoderModel.from_pretrained(None, config=config, state_dict=load_file(str(weights)),
                                               dtype=torch.bfloat16).eval()
    prefetch = weights_read.Prefetch([(weights, "cpu", "bfloat16")])
    t5 = engine._assign_text_encoder(T5EncoderModel, config_dir, weights,
                                     engine._state_dict(weights, "cpu", "bfloat16", prefetch))
    ids = torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(t5(ids)[0], reference(ids)[0]) and t5.dtype == torch.bfloat16
    state = load_file(str(weights))
    del state["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    save_file(state, str(tmp_path / "t5.safetensors"))
    with pytest.raises(UsageError, match=r"t5.safetensors lacks 1 weights the model needs \(first: "
                                         r"encoder.block.1.layer.1.DenseReluDense.wo.weight\)"):
        engine._assign_text_encoder(T5EncoderModel, config_dir, tmp_path / "t5.safetensors",
                                    weights_read.read(tmp_path / "t5.safetensors", "cpu"))
