"""The read-ahead reader's GPU path (pinned staging buffers, one batched copy per range on a side stream)
against safetensors' own loader, byte for byte. Runs only where CUDA is available; CI covers the CPU path
(tests/unit/test_weights_read.py) and has no GPU.
"""

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")]


@pytest.mark.parametrize(("threads", "chunk"), [(1, 64 << 20), (4, 4099), (3, 1 << 20)])
def test_gpu_reads_are_what_safetensors_reads(tmp_path: Path, threads: int, chunk: int) -> None:
    from safetensors.torch import load_file, save_file

    from fluxstack.runtime import weights_read

    g = torch.Generator().manual_seed(0)
    tensors = {f"w{i}": torch.randn(97 + i, 61, generator=g).to(dtype)
               for i, dtype in enumerate([torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn] * 5)}
    tensors["scale"] = torch.tensor(0.5)
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    expected = load_file(str(path), device="cuda")
    got = weights_read.read(path, "cuda", threads=threads, chunk=chunk)
    for name, t in expected.items():
        assert got[name].device.type == "cuda" and got[name].dtype == t.dtype, name
        assert torch.equal(got[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name
    converted = weights_read.read(path, "cuda", "bfloat16", threads=threads, chunk=chunk)
    assert torch.equal(converted["w2"], expected["w2"].to(torch.bfloat16))  # fp16 -> bf16 on arrival
    assert converted["w3"].dtype == torch.float8_e4m3fn  # fp8 stays as stored
